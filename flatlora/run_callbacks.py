"""Trainer callbacks of a CLI run: its records in metrics.jsonl, its books, and its progress lines.

Rank 0 writes the run directory: every log as one record of metrics.jsonl (tagged with its
``phase``), trajectory adapters, and at each checkpoint the run's books (the wall time spent
so far), so that a resumed run adds up instead of starting its counts again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from flatlora import log_keys as keys
from flatlora.atomic import atomic_write_json

BOOKS_FILE = "flatlora_books.json"
"""In each checkpoint folder: the run's cumulative figures at that checkpoint (``wall_time_s``)."""


def read_books(checkpoint: str | Path | None) -> dict[str, float]:
    """The books saved with ``checkpoint`` ({"wall_time_s": 0.0} when there are none)."""
    books = {"wall_time_s": 0.0}
    if checkpoint is not None and (Path(checkpoint) / BOOKS_FILE).is_file():
        books.update(json.loads((Path(checkpoint) / BOOKS_FILE).read_text(encoding="utf-8")))
    return books


def mean_train_loss(records: list[dict[str, Any]]) -> float | None:
    """The mean step loss of a run from its training records (each the mean over its logging interval)."""
    total, last = 0.0, 0
    for record in records:
        if record.get(keys.PHASE, keys.PHASE_TRAIN) == keys.PHASE_TRAIN and keys.LOSS in record:
            step = int(record[keys.STEP])
            total += record[keys.LOSS] * (step - last)
            last = step
    return total / last if last else None


class RunDirCallback(TrainerCallback):
    """Appends each log to metrics.jsonl, saves trajectory adapters, and keeps the books at each checkpoint.

    ``wall_time_s`` counts the work that the run's result rests on: the books of the checkpoint
    this attempt resumed from, plus this attempt. A summary of an attempt that trained no step
    (a resume from the last checkpoint) is not written; the summary's ``train_loss`` is the
    mean step loss of the whole run, resumed or not.
    """

    def __init__(self, run, model, trajectory_every: int, books: dict[str, float]) -> None:
        self.run, self.model, self.every = run, model, trajectory_every
        self.prior_wall_time = float(books.get("wall_time_s") or 0.0)
        self.started = time.perf_counter()
        self.first_step = 0
        self.final = False  # set while the run's final evaluations are logged

    def wall_time(self) -> float:
        return self.prior_wall_time + time.perf_counter() - self.started

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        logs = dict(logs)
        if self.final:
            phase = keys.PHASE_FINAL
        elif keys.TRAIN_RUNTIME in logs:
            if state.global_step == self.first_step:
                return  # this attempt trained nothing: its summary would be a zero-step point
            phase = keys.PHASE_SUMMARY
            mean = mean_train_loss(self.run.read_metrics())
            if mean is not None:
                logs[keys.TRAIN_LOSS] = mean
        elif any(key.startswith("eval_") for key in logs):
            phase = keys.PHASE_EVAL
        else:
            phase = keys.PHASE_TRAIN
        self.run.append_metrics({keys.STEP: state.global_step, keys.PHASE: phase, **logs})

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.run.save_adapter(self.model, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        wall_time = self.wall_time()
        if checkpoint.is_dir():
            atomic_write_json(checkpoint / BOOKS_FILE, {"wall_time_s": wall_time})
        self.run.update(wall_time_s=wall_time)


class PlainProgress(TrainerCallback):
    """One plain line per logging interval and per evaluation (for logs that are not a terminal)."""

    def __init__(self, name: str, stream=None) -> None:
        self.name = name
        self.stream = stream
        self.started = time.perf_counter()

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self.started
        if keys.LOSS in logs:
            extra = "".join(f" {k} {logs[k]:.4g}" for k in (keys.RHO, keys.PERTURBED_LOSS) if k in logs)
            self._print(
                f"{self.name}: step {state.global_step}/{state.max_steps} loss {logs[keys.LOSS]:.4f}{extra} "
                f"({elapsed:.0f} s)"
            )
            return
        shown = [
            f"{k} {v:.4f}"
            for k, v in logs.items()
            if k.endswith(("_loss", "_accuracy", "_perplexity")) and isinstance(v, float)
        ]
        if shown and keys.TRAIN_RUNTIME not in logs:
            self._print(f"{self.name}: step {state.global_step}: {', '.join(shown)} ({elapsed:.0f} s)")


def show_progress(trainer, name: str, *, plain: bool) -> None:
    """Progress without the stock printing of every log dict (metrics.jsonl holds them).

    ``plain``: a line per logging interval (CI, nohup, a log file); otherwise tqdm's bar with
    the last loss.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.pop_callback(PrinterCallback)
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    if plain:
        trainer.add_callback(PlainProgress(name))
        return

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and keys.LOSS in logs:
                self.training_bar.set_postfix(loss=f"{logs[keys.LOSS]:.4f}", refresh=False)

    if had_bar:
        trainer.add_callback(BarOnly())
