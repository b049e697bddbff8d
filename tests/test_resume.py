"""Resume keeps the books: a run killed (kill -9) at any phase and resumed with --resume writes the
metrics.jsonl of an uninterrupted run, once each, and its wall time adds up across the attempts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatlora import cli
from flatlora.run_callbacks import BOOKS_FILE

# Runs the CLI and SIGKILLs itself at a phase: "training" (inside step 4, after the checkpoint of
# step 2 and the log of step 3) or "final" (during the final evaluation of the dev split).
KILLER = """
import os, signal, sys
from flatlora import cli
from flatlora.trainer import FlatLoraTrainer

phase = sys.argv[1]
if phase == "training":
    step = FlatLoraTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)

    FlatLoraTrainer.training_step = training_step
else:
    evaluate = FlatLoraTrainer.evaluate

    def final_evaluate(self, *args, metric_key_prefix="eval", **kwargs):
        if metric_key_prefix == "dev":
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self, *args, metric_key_prefix=metric_key_prefix, **kwargs)

    FlatLoraTrainer.evaluate = final_evaluate
sys.exit(cli.main(sys.argv[2:]))
"""
TIMING = ("_runtime", "_per_second")


def argv(csv_file, model_dir, out, *extra):
    return [
        "train",
        "--method",
        "eflat-lora",
        "--data",
        str(csv_file),
        "--model",
        str(model_dir),
        "--shots",
        "4",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def shape(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["phase"], sorted(k for k in r if not k.endswith(TIMING))) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, csv_file, tiny_model_dir):
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert cli.main(argv(csv_file, tiny_model_dir, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["training", "final"])
def test_a_run_killed_at_each_phase_resumes_to_the_records_of_an_uninterrupted_run(
    tmp_path, csv_file, tiny_model_dir, uninterrupted, phase
):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, phase, *argv(csv_file, tiny_model_dir, out)], capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running"  # killed: nothing marked it failed
    (checkpoint,) = (out / "checkpoint").glob("checkpoint-*")
    assert checkpoint.name == ("checkpoint-2" if phase == "training" else "checkpoint-6")
    books = json.loads((checkpoint / BOOKS_FILE).read_text())["wall_time_s"]
    assert info["wall_time_s"] == pytest.approx(books) and books > 0

    started = time.perf_counter()
    assert cli.main([*argv(csv_file, tiny_model_dir, out), "--resume"]) == 0
    resume_seconds = time.perf_counter() - started

    whole, resumed = records(uninterrupted), records(out)
    assert shape(resumed) == shape(whole)  # each record once: no duplicate step-6 records
    summaries = [r for r in resumed if r["phase"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["train_loss"] > 0  # no zero-step summary
    for a, b in zip(whole, resumed):
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith(TIMING):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["step"], a["phase"], key)
    final = json.loads((out / "run.json").read_text())
    assert final["status"] == "done"
    assert final["metrics"] == pytest.approx(json.loads((uninterrupted / "run.json").read_text())["metrics"])
    # the wall time adds the work up to the checkpoint to this attempt's
    assert books < final["wall_time_s"] < books + resume_seconds
