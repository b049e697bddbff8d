"""One store of measured results, keyed by (adapter content, probe content, measure, complete settings).

Whoever computes a result (the report into ``OUT/cache``, ``flatlora landscape`` and the
dashboard into ``RUN/analysis``) saves it once as ``result-KEY.json``; every reader looks a
result up by the same key in the folders it knows (:func:`find`), so a figure is never shown
for settings it was not computed with: the key holds every setting of the measure
(:meth:`flatlora_analysis.registry.Measure.complete`), the adapter's content hash and the
probe set's content fingerprint. Files of older formats (the report cache before this store,
``landscape-KEY.npz``) have other names and are never read: their measures are recomputed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flatlora_analysis.results import Result, cache_key

STORE_FORMAT = 2


def result_key(adapter: str, probe: str, measure: str, settings: dict[str, Any]) -> str:
    """The key of a result: adapter content hash, probe fingerprint, measure name, complete settings."""
    parts = {"format": STORE_FORMAT, "adapter": adapter, "probe": probe, "measure": measure, "settings": settings}
    return cache_key(parts)


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return Result.from_dict(value) if isinstance(value, dict) and "type" in value else value


def _encode(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value.to_dict() if hasattr(value, "to_dict") else value


class ResultStore:
    """A folder of ``result-KEY.json`` files: {key parts, seconds, result}; writes are atomic."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"result-{key}.json"

    def get_record(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key`` (its ``result`` as JSON values), or None (absent or damaged)."""
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("format") == STORE_FORMAT else None

    def get(self, key: str) -> Any:
        """The stored result of ``key`` (a Result, or a list of them), or None."""
        record = self.get_record(key)
        return None if record is None else _decode(record["result"])

    def put(self, key: str, parts: dict[str, Any], value: Any, seconds: float) -> None:
        from flatlora.atomic import atomic_write_json

        record = {"format": STORE_FORMAT, **parts, "seconds": seconds, "result": _encode(value)}
        atomic_write_json(self.path(key), record)


def find(stores: Sequence[ResultStore | str | Path], key: str) -> Any:
    """The result of ``key`` from the first store that has it, or None."""
    for store in stores:
        store = store if isinstance(store, ResultStore) else ResultStore(store)
        found = store.get(key)
        if found is not None:
            return found
    return None


def cached(
    stores: Sequence[ResultStore | str | Path],
    adapter: str,
    probe: str,
    measure: str,
    settings: dict[str, Any],
    compute: Callable[[], Any],
    *,
    write: bool = True,
) -> tuple[Any, bool, float]:
    """(result, reused, seconds): looked up in every store, else computed and saved in the first one.

    ``write=False`` looks up but saves nothing (a rank other than 0).

    ``seconds`` is the stored computing time of a reused result.
    """
    key = result_key(adapter, probe, measure, settings)
    resolved = [s if isinstance(s, ResultStore) else ResultStore(s) for s in stores]
    for store in resolved:
        record = store.get_record(key)
        if record is not None:
            return _decode(record["result"]), True, float(record.get("seconds", 0.0))
    start = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - start
    if resolved and write:
        parts = {"adapter": adapter, "probe": probe, "measure": measure, "settings": settings}
        resolved[0].put(key, parts, value, seconds)
    return value, False, seconds
