"""The run directory: the contract between training and analysis (DESIGN.md, "The data flow").

    run.json        format, status (running | done | failed), method, hparams, data, model,
                    metrics (final), versions, created/updated, error, wall_time_s
    metrics.jsonl   one JSON object per logged step
    adapter/        peft save_pretrained of the final, clean adapter (safetensors)
    trajectory/     step-N/ adapters saved every k steps (optional)
    checkpoint/     HF Trainer checkpoints, for --resume (the optimizer state holds the EMA)

Every file is written atomically (``flatlora.atomic``: temporary name, fsync, rename), so a
reader never sees a half-written run.json or adapter, and a killed process leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flatlora import log_keys as keys
from flatlora.atomic import _jsonable, atomic_directory, atomic_write_json, atomic_write_text
from flatlora.errors import FlatLoraError

RUN_FORMAT = 1
RUN_JSON = "run.json"
METRICS_FILE = "metrics.jsonl"
STATUSES = ("running", "done", "failed")
IDENTITY_KEYS = ("method", "hparams", "data", "model")


# ----------------------------------------------------------------------------- writing a run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("flatlora", "torch", "transformers", "peft", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out


def absolute_data_spec(spec: Any) -> Any:
    """A data spec naming an existing file or folder by path (a separator or a file suffix), made absolute.

    Names (tweets, sst2, glue/<task>, hub ids with no such local folder) stay as they are.
    """
    if not isinstance(spec, str) or not ("/" in spec or os.sep in spec or Path(spec).suffix):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def config_of(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run: method, hparams, data and model, as JSON values."""
    return {key: _jsonable(info.get(key)) for key in IDENTITY_KEYS}


def _load_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; OSError or ValueError if it is unreadable or not an object."""
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"holds a JSON {type(value).__name__}, not an object")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        info = _load_object(path)
    except (OSError, ValueError) as err:
        raise FlatLoraError(f"cannot read {path} ({err}): repair or delete that run directory") from None
    check_format(info, path)
    return info


def check_format(info: dict[str, Any], path: str | Path) -> None:
    """Refuse a run.json written in a newer run format than this flatlora reads."""
    found = info.get("format", RUN_FORMAT)
    if isinstance(found, int) and not isinstance(found, bool) and found > RUN_FORMAT:
        raise FlatLoraError(
            f"{path} has run format {found}, newer than the {RUN_FORMAT} this flatlora reads: "
            "upgrade flatlora (pip install -U flatlora) to read it"
        )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


class RunDir:
    """One run directory being written (training side)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def trajectory_dir(self) -> Path:
        return self.path / "trajectory"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @classmethod
    def check(
        cls,
        path: str | Path,
        *,
        method: str,
        hparams: dict[str, Any],
        data: dict[str, Any],
        model: str,
        resume: bool = False,
        overwrite: bool = False,
    ) -> str:
        """What :meth:`create` would do with ``path``, writing nothing: ``"new"``, ``"resume"`` or ``"overwrite"``.

        Raises the refusals of :meth:`create` (a file, a folder holding something else, another
        run, a finished run, an unfinished one without ``resume``), so that every rank of a
        multi-process run can check before rank 0 writes.
        """
        run = cls(path)
        wanted = config_of({"method": method, "hparams": hparams, "data": data, "model": model})
        if run.path.exists() and not run.path.is_dir():
            raise FlatLoraError(f"{run.path} is a file, not a folder: choose another --out")
        occupied = run.path.is_dir() and any(run.path.iterdir())
        if not occupied:
            if resume:  # a mistyped --out must not start a new run silently
                raise FlatLoraError(
                    f"--resume: {run.path} holds nothing to resume (no run there): check --out, or drop --resume "
                    "to start a new run"
                )
            return "new"
        if overwrite:
            return "overwrite"
        if not run.run_json.exists():
            raise FlatLoraError(
                f"{run.path} is not empty and holds no run: choose an empty or new --out, or pass --overwrite"
            )
        info = _read_json(run.run_json)
        found = config_of(info)
        if isinstance(found.get("data"), dict):  # runs from before data paths were recorded absolute
            found["data"] = {**found["data"], "spec": absolute_data_spec(found["data"].get("spec"))}
        differ = _differences(found, wanted)
        if differ:
            raise FlatLoraError(
                f"{run.path} holds a different run (differs in {', '.join(differ[:5])}): "
                "choose another --out, or pass --overwrite to replace it"
            )
        if info.get("status") == "done":
            raise FlatLoraError(f"{run.path} holds this run, finished: pass --overwrite to train it again")
        if not resume:
            raise FlatLoraError(
                f"{run.path} holds an unfinished run of this config: pass --resume to continue it, "
                "or --overwrite to start over"
            )
        return "resume"

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        method: str,
        hparams: dict[str, Any],
        data: dict[str, Any],
        model: str,
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunDir:
        """Start (or, with ``resume``, continue) a run in ``path``; refusals write nothing."""
        run = cls(path)
        identity = {"method": method, "hparams": hparams, "data": data, "model": model}
        action = cls.check(path, **identity, resume=resume, overwrite=overwrite)
        wanted = config_of(identity)
        if action == "resume":
            run.update(status="running", error=None)
            return run
        if action == "overwrite":
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        now = _now()
        atomic_write_json(
            run.run_json,
            {
                "format": RUN_FORMAT,
                "status": "running",
                **wanted,
                "metrics": {},
                "versions": _versions(),
                "created": now,
                "updated": now,
                "error": None,
                "wall_time_s": None,
            },
        )
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (one that holds run.json)."""
        run = cls(path)
        if not run.run_json.is_file():
            raise FlatLoraError(f"{run.path} is not a run directory: run flatlora train --out {run.path} first")
        return run

    @property
    def info(self) -> dict[str, Any]:
        """run.json as a dict, read afresh."""
        return _read_json(self.run_json)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge top-level ``fields`` into run.json, stamp ``updated`` and rewrite it atomically."""
        info = {**self.info, **fields, "updated": _now()}
        atomic_write_json(self.run_json, info)
        return info

    def finish(self, metrics: dict[str, Any], wall_time_s: float | None = None) -> None:
        """Mark the run done with its final metrics."""
        self.update(status="done", metrics=metrics, wall_time_s=wall_time_s, error=None)

    def fail(self, error: str) -> None:
        """Mark the run failed with the error message."""
        self.update(status="failed", error=error)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (flushed and synced; a crash can cut at most this line)."""
        line = json.dumps(_jsonable(record)) + "\n"
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (a half-written last line is ignored)."""
        return read_metrics_file(self.metrics_file)

    def truncate_metrics(self, after_step: int) -> None:
        """Keep what a resume from step ``after_step`` keeps: the records of steps <= ``after_step``.

        The run's final evaluations (``phase`` "final") go whatever their step: a resume writes
        them anew, so a run killed during its final evaluation gets no duplicate records.
        """
        kept = [
            r
            for r in self.read_metrics()
            if r.get(keys.STEP, 0) <= after_step and r.get(keys.PHASE) != keys.PHASE_FINAL
        ]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def save_adapter(self, model: Any, step: int | None = None) -> Path:
        """peft ``save_pretrained`` into adapter/ or trajectory/step-N/, atomically."""
        target = self.adapter_dir if step is None else self.trajectory_dir / f"step-{step}"
        with atomic_directory(target) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
        return target

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint/checkpoint-N folder, or None."""
        return latest_checkpoint(self.checkpoint_dir)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N, or None."""
    folder = Path(folder)
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            head, _, number = child.name.rpartition("-")
            if child.is_dir() and head == "checkpoint" and number.isdigit():
                found.append((int(number), child))
    return max(found)[1] if found else None


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a half-written last line is ignored."""
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


# ----------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """A run directory as read by analysis, reports and the app."""

    path: Path
    info: dict[str, Any]
    _metrics: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The per-step records of metrics.jsonl (read on first use)."""
        if self._metrics is None:
            self._metrics = read_metrics_file(self.path / METRICS_FILE)
        return self._metrics

    @property
    def method(self) -> str:
        return self.info.get("method", "")

    @property
    def status(self) -> str:
        return self.info.get("status", "")

    @property
    def hparams(self) -> dict[str, Any]:
        return self.info.get("hparams") or {}

    @property
    def final(self) -> dict[str, Any]:
        return self.info.get("metrics") or {}

    @property
    def group(self) -> str:
        """The run's method with what sets its perturbation apart, seeds pooled: ``eflat-lora (beta 0.9, ema)``."""
        if self.method != "eflat-lora":
            return self.method
        beta = self.hparams.get("beta")
        return (
            f"eflat-lora (beta {beta:g}, {self.hparams.get('ema_radius', 'ema')})" if beta is not None else self.method
        )

    @property
    def adapter_path(self) -> Path | None:
        path = self.path / "adapter"
        return path if (path / "adapter_config.json").exists() else None


def load_run(path: str | Path) -> Run:
    """The run in ``path`` (FlatLoraError if it is not a run directory)."""
    path = Path(path)
    RunDir.open(path)
    return Run(path, _read_json(path / RUN_JSON))


def list_runs(root: str | Path, status: str | None = None) -> list[Run]:
    """Every run directory under ``root`` (itself included), sorted by path; unreadable ones warn."""
    root = Path(root)
    if status is not None and status not in STATUSES:
        raise FlatLoraError(f"unknown run status {status!r}: use one of {', '.join(STATUSES)}")
    runs = []
    for run_json in sorted(root.rglob(RUN_JSON)):
        if any(part.startswith(".") for part in run_json.relative_to(root).parts[:-1]):
            continue  # temporary folders of atomic writes
        try:
            info = _load_object(run_json)
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping {run_json.parent}: unreadable run.json ({err})", stacklevel=2)
            continue
        try:
            check_format(info, run_json)
        except FlatLoraError as err:
            warnings.warn(f"skipping {run_json.parent}: {err}", stacklevel=2)
            continue
        run = Run(run_json.parent, info)
        if status is None or run.status == status:
            runs.append(run)
    return runs
