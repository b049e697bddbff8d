"""benchmarks/gpu_check.py: its CPU rehearsal (``--cpu``) runs every part of the GPU check and prints its tables.

The GPU check itself needs a GPU; ``--cpu`` runs the same code on tiny shapes in float32, where the
"device" and the reference are both the CPU, so the measures must agree exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlora.methods import BUILT_IN

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TABLE6_METHODS = ("lora", "flat-lora", "eflat-lora")
MEASURES = ("clean loss", "lambda_max", "trace", "SAM sharpness")


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def table_after(lines: list[str], title: str) -> list[list[str]]:
    """The data rows (cells stripped) of the first markdown table after the line starting with ``title``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and the separator


@pytest.fixture(scope="module")
def cpu_run() -> tuple[subprocess.CompletedProcess, list[str]]:
    done = run_script("--cpu")
    return done, done.stdout.splitlines()


def test_the_cpu_rehearsal_ends_ok(cpu_run):
    done, lines = cpu_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert lines[-1] == "gpu_check: OK"
    assert any(line.startswith("torch ") and "peft " in line for line in lines)  # the versions are printed


def test_every_method_trains_at_both_shapes(cpu_run):
    _, lines = cpu_run
    for shape in ("### tiny (SmolLM2-like)", "### tiny (Llama-2-like)"):
        rows = {row[0]: row for row in table_after(lines, shape)}
        assert {cls.name for cls in BUILT_IN} <= set(rows), f"a built-in method is not trained by gpu_check: {shape}"
        for row in rows.values():
            assert row[1] == "6" and row[-1] == "ok", row
            first, last = (float(x) for x in row[-2].split(" -> "))
            assert 0 < first < 20 and 0 < last < 20, row
        assert rows["lora"][3] == "1.000"


def test_table6_gives_the_ratios_to_lora_at_both_shapes(cpu_run):
    _, lines = cpu_run
    rows = table_after(lines, "## Table 6")
    assert [(row[0], row[1]) for row in rows] == [
        (shape, method) for shape in ("tiny (SmolLM2-like)", "tiny (Llama-2-like)") for method in TABLE6_METHODS
    ]
    for row in rows:
        time_ratio, memory_ratio = float(row[2]), float(row[4])
        assert 0 < time_ratio < 100 and 0 < memory_ratio < 100, row
        if row[1] == "lora":
            assert (row[2], row[4]) == ("1.000", "1.000")
    assert {row[3] for row in rows if row[1] != "lora"} == {"2.1", "1.1-1.2"}  # the paper's column


def test_the_cpu_copy_measures_exactly_what_the_reference_measures(cpu_run):
    _, lines = cpu_run
    rows = {row[0]: row for row in table_after(lines, "### The trained eflat-lora adapter")}
    assert set(MEASURES) <= set(rows)
    for name in MEASURES:
        reference, value, difference = rows[name][1:4]
        assert float(difference) < 1e-6 and float(value) == pytest.approx(float(reference), rel=1e-6), rows[name]
    assert float(rows["lambda_max"][1]) > 0


def test_train_run_finishes_every_method(cpu_run):
    _, lines = cpu_run
    rows = {row[0]: row for row in table_after(lines, "### train_run on cpu")}
    assert {cls.name for cls in BUILT_IN} <= set(rows)
    for row in rows.values():
        assert row[1] == "done" and row[2] == "4", row


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the GPU check")
def test_without_a_gpu_it_refuses_in_one_line_and_exits_2():
    done = run_script(timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "no CUDA device found" in message and "--cpu" in message
