"""The files of a run directory: their names, the run format, and reading them (``flatlora.runs`` has the layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError

RUN_FORMAT = 1
RUN_JSON = "run.json"
METRICS_FILE = "metrics.jsonl"
STATUSES = ("running", "done", "failed")


def load_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not JSON, or holds a JSON value other than an object.
    """
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"holds a JSON {type(value).__name__}, not an object")
    return value


def read_run_json(path: Path) -> dict[str, Any]:
    """The run.json at ``path``, as a dict.

    Raises:
        FlatLoraError: it is unreadable, not a JSON object, or of a newer run format.
    """
    try:
        info = load_json_object(path)
    except (OSError, ValueError) as err:
        raise FlatLoraError(f"cannot read {path} ({err}): repair or delete that run directory") from None
    check_format(info, path)
    return info


def check_format(info: dict[str, Any], path: str | Path) -> None:
    """Refuse a run.json written in a newer run format than this flatlora reads.

    Raises:
        FlatLoraError: ``info["format"]`` is newer than :data:`RUN_FORMAT`.
    """
    found = info.get("format", RUN_FORMAT)
    if isinstance(found, int) and not isinstance(found, bool) and found > RUN_FORMAT:
        raise FlatLoraError(
            f"{path} has run format {found}, newer than the {RUN_FORMAT} this flatlora reads: "
            "upgrade flatlora (pip install -U flatlora) to read it"
        )


def require_run_dir(path: Path) -> None:
    """Refuse a folder that holds no run.json.

    Raises:
        FlatLoraError: ``path`` is not a run directory.
    """
    if not (path / RUN_JSON).is_file():
        raise FlatLoraError(f"{path} is not a run directory: run flatlora train --out {path} first")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder in ``folder`` with the largest N, or None."""
    folder = Path(folder)
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            head, _, number = child.name.rpartition("-")
            if child.is_dir() and head == "checkpoint" and number.isdigit():
                found.append((int(number), child))
    return max(found)[1] if found else None


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a half-written last line is ignored.

    Raises:
        FlatLoraError: the file is not UTF-8, or a line before the last is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FlatLoraError(f"{path} is not UTF-8 text (a damaged metrics.jsonl): repair or delete the file") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            records.append(record)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise FlatLoraError(f"{path} line {i + 1} is not JSON: repair or delete the file") from None
    return records
