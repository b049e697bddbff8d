"""`flatlora report` and `landscape` on causal-LM adapters: stock peft ones, causal runs, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_tree

from flatlora import cli
from flatlora_analysis import ProbeSet, load_model

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
    options = {"r": 4, "lora_alpha": 8, **options}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **options))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(folder)
    return folder


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
    # Of the literature's measures only PAC-Bayes applies to an LM (the others are defined on class logits).
    assert set(entry["flatness"]) == {"pac-bayes"}
    assert entry["flatness"]["pac-bayes"]["settings"]["weighting"] == "tokens"
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
    assert len(saved) == 1  # one result-KEY.json
    assert cli.main(argv) == 0
    assert "reused" in capsys.readouterr().out
    out = tmp_path / "elsewhere"
    assert cli.main([*argv, "--out", str(out), "--2d"]) == 0
    assert len(tree(out)) == 1 and tree(adapter / "analysis") == saved


@pytest.fixture(scope="module")
def causal_runs(tmp_path_factory, tiny_causal_runs_source):
    return copy_tree(tiny_causal_runs_source, tmp_path_factory.mktemp("causal-runs") / "runs")


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
    assert eflat["hessian"]["top_eigenvalues"]["meta"]["memory"]["budget_source"].startswith("auto: 10% of")


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

    from flatlora import FlatLoraError
    from flatlora_analysis.spaces import build_space

    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)  # as 8-bit bases store
    with pytest.raises(FlatLoraError, match=r"quantized layer.*lora or b space"):
        build_space(model, "merged")
    assert build_space(model, "lora").dim > 0 and build_space(model, "b").dim > 0


def test_the_outside_check_top_eigenvalue_equals_a_dense_float64_hessian(tmp_path, pairs_csv, tiny_gpt2_dir):
    """As the issue's outside check: a stock GPT-2 adapter, batches of 3, lambda_max vs a dense float64 Hessian."""
    import copy

    from test_analysis_hessian import reference_hessian

    from flatlora_analysis import top_eigenvalues
    from flatlora_analysis.objective import double_backward_attention

    adapter = stock_adapter(tiny_gpt2_dir, tmp_path / "adapter", target_modules=["c_attn"], r=1)
    model, tokenizer = load_model(adapter, tiny_gpt2_dir, device="cpu")
    probe = ProbeSet.from_data(pairs_csv, tokenizer, task="causal-lm", n=None, batch_size=3, split="train")
    assert len(probe.batches) >= 2
    for batch in probe.batches:
        assert {"input_ids", "attention_mask", "labels"} <= set(batch)
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            scored = (labels != -100).nonzero()[:, 0]
            assert len(scored) > 0 and labels[0] == -100  # the prompt is masked, the target scored
            assert torch.equal(labels[scored], ids[scored]) and mask[scored].all()
            assert (labels[mask == 0] == -100).all()  # padding is masked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lam = top_eigenvalues(model, probe, k=1, space="lora").eigenvalues[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model untouched
    dense_model = copy.deepcopy(model).double()
    with double_backward_attention(dense_model):
        dense = reference_hessian(dense_model, ProbeSet(probe.batches, None, {}, "tokens"), "lora")
    assert lam == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scored_positions_only_give_the_models_own_loss_and_gradient(tmp_path, pairs_csv, arch, request):
    """The LM head on scored positions only (logits_to_keep) equals the model's loss over the full logits."""
    from torch.func import functional_call

    from flatlora_analysis.probe import takes_logits_mask
    from flatlora_analysis.spaces import build_space

    base = request.getfixturevalue(f"tiny_{arch}_dir")
    model, tokenizer = load_model(stock_adapter(base, tmp_path / "adapter"), base, device="cpu")
    model = model.double()
    probe = ProbeSet.from_data(pairs_csv, tokenizer, task="causal-lm", n=None, batch_size=3)
    assert takes_logits_mask(model)
    space = build_space(model, "lora")
    for batch in probe.batches:

        def full_logits_loss(overrides, batch=batch):
            """The token-mean cross-entropy of the full float64 logits, shifted as transformers does."""
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = functional_call(model, overrides, args=(), kwargs=inputs, strict=False).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            return loss * probe.batch_weight(batch)

        leaves = [t.detach().clone().requires_grad_(True) for t in space.split(space.zeros())]
        fast = probe.batch_loss(model, batch, space.overrides(leaves))
        leaves2 = [t.detach().clone().requires_grad_(True) for t in space.split(space.zeros())]
        full = full_logits_loss(space.overrides(leaves2))
        assert fast.dtype == torch.float64 and fast.item() == pytest.approx(full.item(), rel=1e-12)
        assert fast.item() == pytest.approx(probe.weighted_loss(model(**batch), batch).item(), rel=1e-6)  # HF loss
        for a, b in zip(torch.autograd.grad(fast, leaves), torch.autograd.grad(full, leaves2)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("space", ["lora", "b", "merged", "all"])
def test_every_measure_runs_on_a_causal_probe_in_every_space(tmp_path, pairs_csv, arch, space, request):
    """Sharpness, lambda_max and a landscape on GPT-2 (Conv1D) and LLaMA adapters, the model left bit-identical."""
    from flatlora_analysis import landscape_1d, sharpness, top_eigenvalues

    base = request.getfixturevalue(f"tiny_{arch}_dir")
    model, tokenizer = load_model(stock_adapter(base, tmp_path / "adapter"), base, device="cpu")
    probe = ProbeSet.from_data(pairs_csv, tokenizer, task="causal-lm", n=5, batch_size=3)  # two uneven batches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sharp = sharpness(model, probe, 0.05, kind="worst", space=space, steps=2)
    lam = top_eigenvalues(model, probe, k=1, space=space, max_iter=8)
    line = landscape_1d(model, probe, steps=3, space=space)
    assert math.isfinite(sharp.value) and sharp.value >= -1e-6 and math.isfinite(lam.eigenvalues[0])
    assert line.clean_loss == pytest.approx(sharp.clean_loss, rel=1e-6) and np.isfinite(line.z).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
