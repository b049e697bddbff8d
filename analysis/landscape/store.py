"""Landscapes saved next to the run they describe (``RUN/analysis/``): NPZ arrays + JSON metadata, reused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flatlora_analysis.landscape.grid import LandscapeResult
from flatlora_analysis.results import cache_key


def landscape_paths(folder: str | Path, key: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"landscape-{key}.npz", folder / f"landscape-{key}.json"


def save_landscape(result: LandscapeResult, folder: str | Path, key: str) -> Path:
    """Write ``landscape-KEY.npz`` (the arrays) and ``landscape-KEY.json`` (the rest), each atomically."""
    import io

    from flatlora.runs import atomic_write_json

    npz, meta = landscape_paths(folder, key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    arrays = {name: np.asarray(getattr(result, name)) for name in result._arrays}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = npz.with_name(f".{npz.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(npz)
    atomic_write_json(meta, {k: v for k, v in data.items() if k not in result._arrays})
    return npz


def load_landscape(folder: str | Path, key: str) -> LandscapeResult | None:
    """The saved landscape of ``key``, or None."""
    npz, meta = landscape_paths(folder, key)
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        with np.load(npz) as arrays:
            data.update({name: arrays[name] for name in arrays.files})
    except (OSError, ValueError):
        return None
    data.pop("type", None)
    return LandscapeResult(**data)


def landscape_settings(
    *,
    steps: int,
    span: float | None,
    space: str = "merged",
    seed: int = 0,
    split: str = "train",
    n: int | None = 64,
    batch_size: int = 32,
    data: str | None = None,
    data_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that name a saved landscape (the CLI, the report and the app use the same).

    ``data_options`` are the column/task options of ``--data`` set away from their defaults.
    """
    out = {"steps": steps, "span": span, "space": space, "seed": seed, "split": split, "n": n, "batch_size": batch_size}
    if data is not None:
        out["data"] = str(data)
        out.update(data_options or {})
    return out


def landscape_key(adapter: str | Path, kind: str, settings: dict[str, Any], other: str | Path | None = None):
    """What identifies a saved landscape: the adapter's (and other's) content, the kind, its settings."""
    from flatlora_analysis.loading import adapter_hash

    parts = {"adapter": adapter_hash(adapter), "kind": kind, **settings}
    if other is not None:
        parts["other"] = adapter_hash(other)
    return parts


def cached_landscape(
    folder: str | Path | None, parts: dict[str, Any], compute: Callable[[], LandscapeResult], *, write: bool = True
) -> tuple[LandscapeResult, bool]:
    """(result, reused): read the landscape of ``parts`` from ``folder``, or compute and save it."""
    key = cache_key(parts)
    if folder is not None:
        found = load_landscape(folder, key)
        if found is not None:
            return found, True
    result = compute()
    if folder is not None and write:
        save_landscape(result, folder, key)
    return result, False
