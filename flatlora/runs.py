"""The run directory: the contract between training and analysis (DESIGN.md, "The data flow").

    run.json        format, status (running | done | failed), method, hparams, data, model,
                    metrics (final), versions, created/updated, error, wall_time_s
    metrics.jsonl   one JSON object per logged step
    adapter/        peft save_pretrained of the final, clean adapter (safetensors)
    trajectory/     step-N/ adapters saved every k steps (optional)
    checkpoint/     HF Trainer checkpoints, for --resume (the optimizer state holds the EMA)

Every file is written atomically (``flatlora.atomic``: temporary name, fsync, rename), so a
reader never sees a half-written run.json or adapter, and a killed process leaves no partial file.

This module is the reading side (:class:`Run`, :func:`load_run`, :func:`list_runs`) and the one
import path for the rest: the writer :class:`~flatlora.run_dir.RunDir`, the files and format
(``flatlora.run_files``) and a run's identity (``flatlora.run_identity``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlora.atomic import atomic_directory, atomic_write_json, atomic_write_text
from flatlora.errors import FlatLoraError
from flatlora.run_dir import RunDir
from flatlora.run_files import (
    METRICS_FILE,
    RUN_FORMAT,
    RUN_JSON,
    STATUSES,
    check_format,
    latest_checkpoint,
    load_json_object,
    read_metrics_file,
    read_run_json,
    require_run_dir,
)
from flatlora.run_identity import IDENTITY_KEYS, RunIdentity, absolute_data_spec, config_of


@dataclass
class Run:
    """A run directory as read by analysis, reports and the app.

    Attributes:
        path: the run's folder.
        info: its run.json.
    """

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
    """The run in ``path``.

    Raises:
        FlatLoraError: ``path`` is not a run directory, or its run.json is unreadable or newer.
    """
    path = Path(path)
    require_run_dir(path)
    return Run(path, read_run_json(path / RUN_JSON))


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
            info = load_json_object(run_json)
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


__all__ = [
    "IDENTITY_KEYS",
    "METRICS_FILE",
    "RUN_FORMAT",
    "RUN_JSON",
    "STATUSES",
    "Run",
    "RunDir",
    "RunIdentity",
    "absolute_data_spec",
    "atomic_directory",
    "atomic_write_json",
    "atomic_write_text",
    "check_format",
    "config_of",
    "latest_checkpoint",
    "list_runs",
    "load_run",
    "read_metrics_file",
]
