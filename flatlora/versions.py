"""The versions of Python and the packages that produced a result, recorded beside it."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

PACKAGES = ("flatlora", "torch", "transformers", "peft", "accelerate")
"""The packages whose versions are recorded (those not installed are left out)."""


def package_versions() -> dict[str, str]:
    """Python's version and the installed version of each package in :data:`PACKAGES`.

    Returns:
        ``{"python": "3.x.y", "torch": ..., ...}``, in the order of :data:`PACKAGES`; a package
        that is not installed has no entry.
    """
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out
