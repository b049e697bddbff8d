"""Measure results saved next to the run they describe (``RUN/analysis/result-KEY.json``) and reused.

The dashboard and notebooks compute a measure once per (adapter, settings) and read it back
afterwards; landscapes, with their arrays, have their own NPZ store in ``flatlora_analysis.landscape``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatlora_analysis.results import Result, cache_key


def result_path(folder: str | Path, parts: dict[str, Any]) -> Path:
    return Path(folder) / f"result-{cache_key(parts)}.json"


def load_result(folder: str | Path, parts: dict[str, Any]) -> Result | None:
    """The saved result of ``parts`` in ``folder``, or None."""
    try:
        data = json.loads(result_path(folder, parts).read_text(encoding="utf-8"))
        return Result.from_dict(data["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_result(
    folder: str | Path | None, parts: dict[str, Any], compute: Callable[[], Result]
) -> tuple[Result, bool]:
    """(result, reused): read the result of ``parts`` from ``folder``, or compute and save it atomically."""
    from flatlora.runs import atomic_write_json

    if folder is not None:
        found = load_result(folder, parts)
        if found is not None:
            return found, True
    result = compute()
    if folder is not None:
        atomic_write_json(result_path(folder, parts), {"parts": parts, "result": result.to_dict()})
    return result, False
