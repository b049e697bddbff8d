"""Atomic writes: a reader never sees a half-written file or folder, and a killed process leaves none.

Used by the run directory (``flatlora.runs``) and reusable by anything that writes results
(analysis caches, reports): write to a temporary name in the same folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700; atomic writes get the modes a plain open()/mkdir() would give.
_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars as numbers, NaN/inf as null."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN/inf as null), atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on any error the old ``path`` stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable(out: str | Path, flag: str = "--out", *, folder: bool = True) -> None:
    """Refuse, writing nothing, an output path that cannot be created: a file where a folder goes, a file
    among its ancestors, or a first existing ancestor that is not writable (checked before any work)."""
    path = Path(out).expanduser().absolute()
    if folder and path.exists() and not path.is_dir():
        raise FlatLoraError(f"{flag} {out} is a file: choose a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise FlatLoraError(f"{flag} {out} lies under {probe}, which is a file: choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlatLoraError(f"{flag} {out}: {probe} is not writable: choose a folder you can write to")
