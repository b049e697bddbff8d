"""Writing a run directory (training side): create or resume it, log metrics, save adapters, finish.

The layout is in ``flatlora.runs``, the reading side beside it. Every file is written
atomically (``flatlora.atomic``), so a reader never sees a half-written run.json or adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flatlora import log_keys as keys
from flatlora.atomic import _jsonable, atomic_directory, atomic_write_json, atomic_write_text
from flatlora.errors import FlatLoraError
from flatlora.run_files import (
    METRICS_FILE,
    RUN_FORMAT,
    RUN_JSON,
    latest_checkpoint,
    read_metrics_file,
    read_run_json,
    require_run_dir,
)
from flatlora.run_identity import RunIdentity, differences, recorded_identity
from flatlora.versions import package_versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """One run directory being written (training side).

    Args:
        path: the run's folder (``--out``).
    """

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
        identity: RunIdentity | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        **fields: Any,
    ) -> str:
        """What :meth:`create` would do with ``path``, writing nothing.

        Every rank of a multi-process run can check before rank 0 writes.

        Args:
            path: the run's folder.
            identity: what identifies the run; or, the older form, its fields as keywords
                (``method=, hparams=, data=, model=``).
            resume: continue the unfinished run of this identity in ``path``.
            overwrite: replace whatever ``path`` holds.

        Returns:
            ``"new"``, ``"resume"`` or ``"overwrite"``.

        Raises:
            FlatLoraError: ``path`` is a file, a folder holding something else, another run, a
                finished run, or an unfinished one without ``resume``; or ``resume`` finds nothing.
            TypeError: both or neither of ``identity`` and its keywords are given.
        """
        run = cls(path)
        wanted = RunIdentity.resolve(identity, fields).to_json()
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
        info = read_run_json(run.run_json)
        differ = differences(recorded_identity(info), wanted)
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
        identity: RunIdentity | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        **fields: Any,
    ) -> RunDir:
        """Start (or, with ``resume``, continue) a run in ``path``; refusals write nothing.

        Args:
            path: the run's folder.
            identity: what identifies the run; or, the older form, its fields as keywords
                (``method=, hparams=, data=, model=``).
            resume: continue the unfinished run of this identity in ``path``.
            overwrite: replace whatever ``path`` holds.

        Returns:
            The run directory, its run.json ``status`` "running".

        Raises:
            FlatLoraError: the refusals of :meth:`check`.
            TypeError: both or neither of ``identity`` and its keywords are given.
        """
        run = cls(path)
        identity = RunIdentity.resolve(identity, fields)
        action = cls.check(path, identity, resume=resume, overwrite=overwrite)
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
                **identity.to_json(),
                "metrics": {},
                "versions": package_versions(),
                "created": now,
                "updated": now,
                "error": None,
                "wall_time_s": None,
            },
        )
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (one that holds run.json).

        Raises:
            FlatLoraError: ``path`` holds no run.json.
        """
        run = cls(path)
        require_run_dir(run.path)
        return run

    @property
    def info(self) -> dict[str, Any]:
        """run.json as a dict, read afresh."""
        return read_run_json(self.run_json)

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
