"""Causal-LM probe sets: the batches training builds, the loss a mean over every scored token."""

from __future__ import annotations

import math

import pytest
import torch

from flatlora.data.lm_encode import IGNORE_INDEX
from flatlora_analysis import ProbeSet, evaluate_loss, hessian_trace, sharpness, top_eigenvalues

pytest.importorskip("gguf", reason="causal-LM probe tests use the default LLM's tokenizer (pip install gguf)")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "pairs.csv"
    rows = ["prompt,target"] + [f"count to {i}," + " ".join(str(j) for j in range(i % 6 + 1)) for i in range(14)]
    path.write_text("\n".join(rows) + "\n")
    return path


def trained_like(model_dir: str, r: int = 2):
    """The tiny LLaMA in float64 with LoRA of rank ``r``, B drawn away from zero as in a trained adapter."""
    from flatlora.causal_lm import load_causal_lm
    from flatlora.models import LoraOptions

    peft_model, tokenizer = load_causal_lm(model_dir, lora=LoraOptions(r=r, alpha=2 * r, lora_dropout=0.0), seed=3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return peft_model.double(), tokenizer


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return trained_like(tiny_llama_dir)


def token_mean(m, probe: ProbeSet) -> float:
    """The float64 reference: every scored token of every row, one row at a time, without padding."""
    total = count = 0.0
    with torch.no_grad():
        for batch in probe.batches:
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                n = int(mask.sum())
                logp = torch.log_softmax(m(input_ids=ids[None, :n]).logits[0, :-1], -1)
                target = labels[1:n]
                keep = target != IGNORE_INDEX
                total -= logp[keep.nonzero()[:, 0], target[keep]].sum().item()
                count += keep.sum().item()
    return total / count


def test_the_probe_loss_is_the_token_mean_over_uneven_batches(model, pairs):
    m, tok = model
    probe = ProbeSet.from_data(pairs, tok, task="causal-lm", split="train", shots=4, batch_size=3, n=None)
    assert probe.weighting == "tokens" and probe.batch_sizes[-1] != probe.batch_sizes[0]  # uneven
    assert probe.n_tokens == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in probe.batches)
    by_rows = ProbeSet(probe.batches, None, {}, "examples")
    reference = token_mean(m, probe)
    assert evaluate_loss(m, probe) == pytest.approx(reference, rel=1e-6)  # padded batches vs single rows
    assert abs(evaluate_loss(m, by_rows) - reference) > 1e-3  # row weighting biases it (by 0.014 here)
    assert probe.fingerprint() != by_rows.fingerprint()


def test_measures_run_on_a_causal_probe_and_state_the_weighting(model, pairs):
    m, tok = model
    probe = ProbeSet.from_data(pairs, tok, task="causal-lm", split="train", shots=4, batch_size=4, n=6)
    sharp = sharpness(m, probe, rho=0.05, kind="sam")
    eig = top_eigenvalues(m, probe, k=1, space="lora", tol=1e-4)
    trace = hessian_trace(m, probe, samples=6, space="lora")
    for result in (sharp, eig, trace):
        settings = result.settings
        assert settings["weighting"] == "tokens" and settings["n_tokens"] == probe.n_tokens
    assert math.isfinite(sharp.value) and math.isfinite(eig.eigenvalues[0]) and math.isfinite(trace.trace)


@pytest.mark.slow
def test_lambda_max_on_a_causal_probe_equals_the_dense_float64_hessian(tiny_llama_dir, pairs):
    """lambda_max against torch.autograd.functional.hessian of the probe-set loss in float64 (one backward per
    LoRA coordinate through a 49k-word head, so rank 1 here; the fast tier has the GPT-2 outside check)."""
    m, tok = trained_like(tiny_llama_dir, r=1)
    probe = ProbeSet.from_data(pairs, tok, task="causal-lm", split="train", shots=4, batch_size=4, n=6)
    eig = top_eigenvalues(m, probe, k=1, space="lora", tol=1e-4)
    from test_analysis_hessian import reference_hessian

    from flatlora_analysis.objective import double_backward_attention

    with double_backward_attention(m):  # SDPA's math backend: its fused CPU kernel has no double backward
        dense = reference_hessian(m, probe, "lora")
    assert eig.eigenvalues[0] == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-3)


def test_from_run_rebuilds_the_runs_probe(tmp_path, tiny_llama_dir, pairs):
    from flatlora.experiment import TrainConfig, train_run

    run = train_run(
        TrainConfig(method="lora", data=str(pairs), model=tiny_llama_dir, shots=4, steps=1, progress=False),
        tmp_path / "run",
    )
    from_run = ProbeSet.from_run(run, split="dev", batch_size=4)
    from flatlora.causal_lm import load_causal_tokenizer

    direct = ProbeSet.from_data(
        pairs, load_causal_tokenizer(tiny_llama_dir), task="causal-lm", split="dev", shots=4, seed=13, batch_size=4
    )
    assert from_run.weighting == "tokens" and from_run.fingerprint() == direct.fingerprint()
