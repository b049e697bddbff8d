"""Causal-LM runs as classifier runs are: killed and resumed, two torchrun ranks, bf16, rho schedules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_resume import KILLER, TIMING, records, shape
from test_torchrun import torchrun

from flatlora import cli

pytest.importorskip("gguf", reason="causal-LM tests use the default LLM's tokenizer (pip install gguf)")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = [
        json.dumps({"prompt": f"count {i}", "target": " ".join(str(j) for j in range(i % 5 + 1))}) for i in range(16)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def argv(pairs, model_dir, out, *extra):
    return ["train", "--method", "eflat-lora", "--data", str(pairs), "--model", model_dir, "--shots", "4",
            "--steps", "6", "--batch-size", "4", "--save-every", "2", "--eval-every", "2", "--log-every", "1",
            "--lora-dropout", "0", "--eval-batch-size", "3", "--test-cap", "none", "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_a_killed_causal_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, pairs, tiny_llama_dir):
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert cli.main(argv(pairs, tiny_llama_dir, whole)) == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "training", *argv(pairs, tiny_llama_dir, out)], capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cli.main([*argv(pairs, tiny_llama_dir, out), "--resume"]) == 0
    a, b = records(whole), records(out)
    assert shape(a) == shape(b)
    for x, y in zip(a, b):
        for key, value in x.items():
            if isinstance(value, float) and not key.endswith(TIMING):
                assert y[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (x["step"], key)
    assert json.loads((out / "run.json").read_text())["metrics"] == pytest.approx(
        json.loads((whole / "run.json").read_text())["metrics"]
    )


@pytest.mark.slow
def test_two_ranks_give_the_token_mean_loss_of_one_process(tmp_path, pairs, tiny_llama_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    args = argv(pairs, tiny_llama_dir, one)
    assert cli.main(args) == 0
    args_two = [a if a != str(one) else str(two) for a in args]
    at = args_two.index("--batch-size")
    args_two[at + 1] = "2"  # two ranks of 2: the same global batch
    code, _, codes, err = torchrun(args_two, tmp_path / "logs")
    assert code == 0 and codes == {0: 0, 1: 0}, err[-3000:]
    m1, m2 = (json.loads((d / "run.json").read_text())["metrics"] for d in (one, two))
    assert set(m1) == set(m2) and "test_perplexity" in m1
    for key, value in m1.items():
        # uneven eval batches of 3 over 2 ranks: the gathered per-example sums give the same token mean
        assert m2[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--rho-schedule", "cosine", "--rho-min", "0.01"]])
def test_bf16_and_rho_schedules_train_a_causal_lm(tmp_path, pairs, tiny_llama_dir, extra):
    out = tmp_path / "run"
    assert cli.main(argv(pairs, tiny_llama_dir, out, *extra)) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["metrics"]["test_perplexity"] > 1
    rhos = [r["rho"] for r in records(out) if r.get("phase") == "train"]
    if "cosine" in extra:
        assert rhos[0] > rhos[-1] >= 0.01


def test_a_causal_sweep_summarises_perplexity_over_seeds(tmp_path, pairs, tiny_llama_dir, capsys):
    out = tmp_path / "sweep"
    argv_ = ["sweep", "--methods", "lora", "--seeds", "1,2", "--data", str(pairs), "--model", tiny_llama_dir,
             "--shots", "4", "--steps", "2", "--batch-size", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(argv_) == 0
    text = capsys.readouterr().out
    assert "| method | rho | lr | seeds | test perplexity (mean ± std) |" in text and "| lora |  | 0.001 | 2 |" in text
