"""`flatlora report` and `landscape` on causal-LM adapters: stock peft ones, causal runs, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from analysis import ProbeSet, load_model
from flatlora import cli

pytest.importorskip("gguf", reason="causal-LM tests use the default LLM's tokenizer (pip install gguf)")

QUICK = ["--quick", "--examples", "6", "--batch-size", "4", "--no-progress"]


def stock_adapter(base_dir: str, folder: Path, *, seed: int = 0, **lora) -> Path:
    """A CAUSAL_LM adapter saved by peft itself, with nonzero B (a trained adapter's shape)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    is_gpt2 = base.config.model_type == "gpt2"
    options = {
        "target_modules": ["c_attn", "c_proj"] if is_gpt2 else ["q_proj", "v_proj"],
        "fan_in_fan_out": is_gpt2,
        **lora,
    }
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, **options))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target"])
        for i in range(8):
            writer.writerow([f"name[Place {i}], food[Thai]", f"Place {i} serves Thai food" + " nearby" * (i % 3)])
    return path


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_report_on_a_stock_peft_causal_lm_adapter(tmp_path, pairs_csv, arch, request):
    base = request.getfixturevalue(f"tiny_{arch}_dir")
    adapter = stock_adapter(base, tmp_path / "adapter")
    out = tmp_path / "R"
    argv = ["report", str(adapter), "--base-model", base, "--data", str(pairs_csv), "--out", str(out), *QUICK]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    [entry] = report["entries"]
    assert entry["task"] == "causal-lm" and entry["kind"] == "adapter"
    lam = entry["hessian"]["top_eigenvalues"]["eigenvalues"][0]
    assert math.isfinite(lam)
    assert entry["hessian"]["top_eigenvalues"]["settings"]["weighting"] == "tokens"
    # The report's clean loss is the token mean over every scored token of its probe.
    model, tokenizer = load_model(adapter, base, device="cpu")
    probe = ProbeSet.from_data(pairs_csv, tokenizer, task="causal-lm", n=6, batch_size=4)
    with torch.no_grad():
        total = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in probe.batches)
    clean = entry["sharpness"][0]["clean_loss"]
    assert clean == pytest.approx(total / probe.n_tokens, rel=1e-5)
    md = (out / "report.md").read_text()
    assert "probe_perplexity" in md and "causal-lm" in md


def test_landscape_of_a_bare_adapter_is_saved_and_reused(tmp_path, pairs_csv, tiny_gpt2_dir, capsys):
    adapter = stock_adapter(tiny_gpt2_dir, tmp_path / "adapter")
    argv = ["landscape", str(adapter), "--base-model", tiny_gpt2_dir, "--data", str(pairs_csv), "--steps", "5",
            "--examples", "6", "--batch-size", "4", "--no-progress", "--space", "lora"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "computed" in capsys.readouterr().out
    saved = tree(adapter / "analysis")
    assert len(saved) == 2  # NPZ + JSON
    assert cli.main(argv) == 0
    assert "reused" in capsys.readouterr().out
    out = tmp_path / "elsewhere"
    assert cli.main([*argv, "--out", str(out), "--2d"]) == 0
    assert len(tree(out)) == 2 and tree(adapter / "analysis") == saved


@pytest.fixture(scope="module")
def causal_runs(tmp_path_factory, pairs_csv, tiny_gpt2_dir):
    root = tmp_path_factory.mktemp("causal-runs")
    for method, rho in (("lora", 0.0), ("flat-lora", 0.5), ("eflat-lora", 0.5), ("lora-sam", 0.05)):
        argv = ["train", "--method", method, "--data", str(pairs_csv), "--model", tiny_gpt2_dir, "--shots", "3",
                "--steps", "4", "--batch-size", "3", "--lr", "5e-3", "--generate", "3", "--test-cap", "none",
                "--no-progress", "--save-every", "2", "--out", str(root / method)]  # fmt: skip
        if rho:
            argv += ["--rho", str(rho)]
        assert cli.main(argv) == 0
    return root


def test_report_on_causal_runs_shows_perplexity_bleu_and_correlates_with_them(causal_runs, tmp_path, capsys):
    out = tmp_path / "R"
    assert cli.main(["report", str(causal_runs), "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "test_perplexity" in printed and "test_bleu" in printed
    report = json.loads((out / "report.json").read_text())
    assert {e["task"] for e in report["entries"]} == {"causal-lm"}
    rows = list(csv.DictReader((out / "report.csv").open()))
    for row, entry in zip(rows, report["entries"]):
        assert float(row["test_perplexity"]) == pytest.approx(entry["metrics"]["test_perplexity"])
        assert float(row["test_bleu"]) == pytest.approx(entry["metrics"]["test_bleu"])
        assert "test_accuracy" not in row
    targets = {c["target"] for c in report["correlation"]["rows"]}
    assert {"test_perplexity", "gap"} <= targets
    eflat = next(e for e in report["entries"] if e["method"] == "eflat-lora")
    assert "ema_error" in eflat


def test_bad_causal_input_is_one_line_exit_2_and_writes_nothing(tmp_path, pairs_csv, tiny_gpt2_dir, capsys):
    import transformers as tf
    from peft import IA3Config, get_peft_model

    adapter = stock_adapter(tiny_gpt2_dir, tmp_path / "adapter")
    dora = stock_adapter(tiny_gpt2_dir, tmp_path / "dora", use_dora=True)
    ia3 = tmp_path / "ia3"
    base = tf.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    ia3_config = IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn"], feedforward_modules=[])
    get_peft_model(base, ia3_config).save_pretrained(ia3)
    small = tmp_path / "small-vocab"  # the same shapes with a vocabulary of 1000: the tokenizer does not fit
    config = tf.AutoConfig.from_pretrained(tiny_gpt2_dir)
    config.vocab_size = 1000
    tf.GPT2LMHeadModel(config).save_pretrained(small)
    tf.AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(small)
    masked = tmp_path / "masked.csv"
    masked.write_text("prompt,target\n" + "".join(f"p{i},{'word ' * 60}\n" for i in range(4)))  # no target fits 16
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{not json")
    data = ["--data", str(pairs_csv)]
    cases = [
        ([str(adapter), "--base-model", tiny_gpt2_dir, "--data", "tweets"], "is classification data"),
        ([str(adapter), "--base-model", tiny_gpt2_dir, *data, "--task", "classification"], "is causal-LM data"),
        ([str(adapter), "--base-model", str(small), *data], "vocabulary has 1000"),
        ([str(adapter), "--base-model", tiny_gpt2_dir, *data, "--label-column", "target"], "drop --label-column"),
        ([str(ia3), "--base-model", tiny_gpt2_dir, *data], "not a LoRA adapter"),
        ([str(garbage)], "cannot read"),
        ([str(dora), "--base-model", tiny_gpt2_dir, *data], "uses DoRA"),
        ([str(adapter), "--base-model", tiny_gpt2_dir, "--data", str(masked), "--max-length", "16"], "max-length"),
        ([str(adapter), "--base-model", tiny_gpt2_dir], "bare adapter"),
    ]
    capsys.readouterr()
    for extra, match in cases:
        out = tmp_path / "out"
        assert cli.main(["report", *extra, "--out", str(out), *QUICK]) == 2, match
        err = capsys.readouterr().err.strip()
        assert err.startswith("flatlora: error:") and "\n" not in err, err
        assert match in err, err
        assert tree(out) == [] and tree(adapter / "analysis") == [], match
    # DoRA is measured where its math holds: the loss as a function of A and B (lora, b spaces).
    out = tmp_path / "dora-report"
    argv = ["report", str(dora), "--base-model", tiny_gpt2_dir, *data, "--out", str(out), "--space", "lora",
            "--kinds", "sam,worst", *QUICK]  # fmt: skip
    assert cli.main(argv) == 0
    assert math.isfinite(json.loads((out / "report.json").read_text())["entries"][0]["sharpness"][0]["value"])


def test_the_merged_space_refuses_a_quantized_base_and_lora_still_works(tiny_gpt2_dir):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from analysis.spaces import build_space
    from flatlora import FlatLoraError

    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)  # as 8-bit bases store
    with pytest.raises(FlatLoraError, match=r"quantized layer.*lora or b space"):
        build_space(model, "merged")
    assert build_space(model, "lora").dim > 0 and build_space(model, "b").dim > 0
