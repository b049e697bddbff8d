"""A landscape request, one way for every caller: ``flatlora landscape``, the report and the dashboard.

:func:`landscape_call` turns a kind (``1d``, ``2d``, ``pca``, ``interpolation``) and its options
into the registry measure, the settings to call it with, and the settings that key it in the
result store (:mod:`flatlora_analysis.store`: a trajectory or the other adapter by content
hash, not by path); :func:`stored_landscape` looks the result up, or computes and saves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.registry import measure
from flatlora_analysis.store import ResultStore, cached

KINDS = {"1d": "landscape_1d", "2d": "landscape_2d", "pca": "landscape_2d", "interpolation": "interpolation"}


def landscape_call(
    kind: str,
    *,
    steps: int,
    span: float | None = None,
    space: str = "merged",
    seed: int = 0,
    run: str | Path | None = None,
    other: str | Path | None = None,
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(measure, settings of the call, settings of the key) of a landscape of ``kind``.

    ``run``: the run whose trajectory spans the ``pca`` plane; ``other``: the adapter folder at
    t = 1 of an ``interpolation`` (None: the base model).
    """
    from flatlora_analysis.loading import adapter_hash

    if kind not in KINDS:
        raise FlatLoraError(f"unknown landscape kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind in ("1d", "2d"):  # an unset span is the grid's 1.0: one key whether or not it was typed
        given = {"steps": steps, "span": 1.0 if span is None else span, "space": space, "seed": seed}
        if kind == "2d":
            given["pca"] = None
    elif kind == "pca":  # an unset span follows the trajectory: None stays in the key
        given = {"steps": steps, "span": span, "space": space, "seed": seed, "pca": str(run)}
    else:
        given = {"other": None if other is None else str(other), "steps": steps}
    m = measure(KINDS[kind])
    call = m.complete(**given)
    key = dict(call)
    if kind == "pca":
        key["pca"] = _trajectory_hash(Path(run))
    if kind == "interpolation":
        key["other"] = None if other is None else adapter_hash(other)
    return m.name, call, key


def _trajectory_hash(run: Path) -> str:
    """A content hash of a run's saved trajectory (every step's adapter files)."""
    from flatlora_analysis.landscape.directions import trajectory_folders
    from flatlora_analysis.loading import adapter_hash
    from flatlora_analysis.results import cache_key

    return cache_key([adapter_hash(folder) for folder in trajectory_folders(run)[0]])


def stored_landscape(
    stores: Sequence[ResultStore | str | Path],
    adapter: str,
    probe: Any,
    kind: str,
    model: Callable[[], Any],
    *,
    device: Any = None,
    progress: Callable[[int, int], None] | None = None,
    write: bool = True,
    **options: Any,
) -> tuple[Any, bool]:
    """(landscape, reused): from the first store that has it, else computed on ``model()`` and saved.

    ``adapter`` is the adapter's content hash, ``probe`` the probe set (its fingerprint keys the
    result); ``options`` go to :func:`landscape_call`. With ``write=False`` (ranks other than 0)
    nothing is saved.
    """
    name, call, key = landscape_call(kind, **options)
    m = measure(name)

    def compute():
        return m.compute(model(), probe, call, device=device, progress=progress)

    value, reused, _ = cached(stores, adapter, probe.fingerprint(), name, key, compute, write=write)
    return value, reused
