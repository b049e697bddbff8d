"""Sharpness, probe sets and spaces on models: closed forms, invariances, bit-identity, errors, architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_fixtures import TinyClassifier, TinyRegression, assert_same_state, lora_wrap, model_state

from flatlora import FlatLoraError
from flatlora.lora import find_lora_pairs
from flatlora.perturbation import flat_lora_eps_b
from flatlora.testing import TINY_ARCHS, tiny_batches, tiny_model
from flatlora_analysis import (
    ProbeSet,
    balancedness,
    build_space,
    evaluate_loss,
    hessian_trace,
    layer_curvature,
    sharpness,
    spectral_density,
    top_eigenvalues,
)


def regression_at_its_minimum(seed=0):
    """A LoRA linear regression whose labels are its own outputs: zero gradient, H = I kron (X^T X / N)."""
    model = lora_wrap(TinyRegression(4, 3), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    x[:, 0] *= 2  # a well-separated top eigenvalue: projected ascent converges like power iteration
    with torch.no_grad():
        labels = model(x=x).logits
    probe = ProbeSet.from_batches([{"x": x[:12], "labels": labels[:12]}, {"x": x[12:], "labels": labels[12:]}])
    cov = (x.T @ x / 20).numpy()
    return model, probe, cov


def classifier_probe(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return ProbeSet.from_batches([{"x": x[:16], "labels": y[:16]}, {"x": x[16:], "labels": y[16:]}])


def test_probe_loss_weights_every_example_equally():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    batches = list(probe.batches)
    whole = ProbeSet.from_batches([{k: torch.cat([b[k] for b in batches]) for k in batches[0]}])
    assert evaluate_loss(model, probe) == pytest.approx(evaluate_loss(model, whole), rel=1e-14)
    per_example = ProbeSet.from_batches(
        batches, loss_fn=lambda out, b: torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="none")
    )
    assert evaluate_loss(model, per_example) == pytest.approx(evaluate_loss(model, whole), rel=1e-14)


def test_worst_and_average_hit_their_closed_forms_on_a_quadratic_model():
    model, probe, cov = regression_at_its_minimum()
    rho = 0.1
    lam = np.linalg.eigvalsh(cov).max()
    worst = sharpness(model, probe, rho, kind="worst", steps=60)
    assert worst.clean_loss == pytest.approx(0.0, abs=1e-28)
    assert worst.value == pytest.approx(0.5 * rho**2 * lam, rel=1e-6)
    avg = sharpness(model, probe, rho, kind="average", samples=2000, seed=1)
    assert abs(avg.value - 0.5 * rho**2 * 3 * np.trace(cov)) <= 4 * avg.stderr
    assert sharpness(model, probe, rho, kind="sam").value == pytest.approx(0.0, abs=1e-28)  # no gradient


def test_worst_is_at_least_sam_and_several_rhos_come_back_in_order():
    model = tiny_model("bert")
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 4))
    rhos = [0.01, 0.05]
    sams = sharpness(model, probe, rhos, kind="sam")
    worsts = sharpness(model, probe, rhos, kind="worst", steps=5)
    assert [r.rho for r in sams] == rhos and [r.settings["rho"] for r in worsts] == rhos
    for s, w in zip(sams, worsts):
        assert w.value >= s.value and w.clean_loss == s.clean_loss
        assert w.perturbed_loss - w.clean_loss == w.value
    linf = sharpness(model, probe, 0.001, kind="worst", norm="linf", steps=3)
    assert linf.settings["norm"] == "linf" and linf.value >= 0


def test_merged_space_sharpness_is_invariant_to_lora_rescaling_and_lora_space_is_not():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    merged = sharpness(model, probe, 0.05, kind="sam", space="merged")
    lora = sharpness(model, probe, 0.05, kind="sam", space="lora")
    with torch.no_grad():
        layer = model.base_model.model.lin
        layer.lora_A["default"].weight.mul_(4.0)
        layer.lora_B["default"].weight.div_(4.0)
    assert sharpness(model, probe, 0.05, kind="sam", space="merged").value == pytest.approx(merged.value, rel=1e-10)
    assert sharpness(model, probe, 0.05, kind="sam", space="lora").value != pytest.approx(lora.value, rel=1e-3)


def test_flat_lora_kind_uses_the_trainers_perturbation_with_realized_norm_at_most_rho():
    model = lora_wrap(TinyClassifier(6, 5, 3), targets=("lin", "head"))
    probe = classifier_probe()
    rho = 0.05
    result = sharpness(model, probe, rho, kind="flat-lora")
    assert result.settings["space"] == "b" and result.meta["realized_norm"] <= rho * (1 + 1e-9)
    # Recompute by hand: eps_B from the factor gradients, then the loss with B + eps_B written in.
    pairs = find_lora_pairs(model)
    model.eval()
    loss = sum(probe.weighted_loss(model(**b), b) for b in probe.batches)
    grads = torch.autograd.grad(loss, [t for p in pairs for t in (p.A, p.B)])
    eps = flat_lora_eps_b(
        [p.A for p in pairs],
        [p.B for p in pairs],
        list(grads[0::2]),
        list(grads[1::2]),
        [p.scaling for p in pairs],
        rho,
    )
    with torch.no_grad():
        for p, e in zip(pairs, eps):
            p.B.add_(e)
        perturbed = float(sum(probe.weighted_loss(model(**b), b) for b in probe.batches))
        for p, e in zip(pairs, eps):
            p.B.sub_(e)
    assert result.perturbed_loss == pytest.approx(perturbed, rel=1e-12)


@pytest.mark.parametrize("kind", ["sam", "worst", "average", "flat-lora"])
def test_every_sharpness_kind_leaves_the_model_bit_identical(kind):
    model = lora_wrap(TinyClassifier(6, 5, 3))
    model.train()
    model.base_model.model.lin.lora_B["default"].weight.grad = torch.full((5, 2), 0.5, dtype=torch.float64)
    before = model_state(model)
    sharpness(model, classifier_probe(), [0.01, 0.1], kind=kind, steps=3, samples=3)
    assert_same_state(before, model_state(model))


def test_adaptive_sharpness_scales_by_the_weights():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    plain = sharpness(model, probe, 0.05, kind="sam", space="lora")
    adaptive = sharpness(model, probe, 0.05, kind="sam", space="lora", adaptive=True, eta=0.01)
    assert adaptive.settings["adaptive"] and adaptive.settings["eta"] == 0.01
    assert adaptive.value != pytest.approx(plain.value)


def test_bad_inputs_give_one_clear_error():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    for rho in (0, -0.1, float("nan")):
        with pytest.raises(FlatLoraError, match="rho must be"):
            sharpness(model, probe, rho)
    with pytest.raises(FlatLoraError, match="unknown sharpness kind"):
        sharpness(model, probe, 0.1, kind="max")
    with pytest.raises(FlatLoraError, match="linf"):
        sharpness(model, probe, 0.1, kind="sam", norm="linf")
    with pytest.raises(FlatLoraError, match="perturbs B"):
        sharpness(model, probe, 0.1, kind="flat-lora", space="merged")
    with pytest.raises(FlatLoraError, match="empty"):
        ProbeSet.from_batches([])
    with pytest.raises(FlatLoraError, match="labels"):
        ProbeSet.from_batches([{"x": torch.zeros(2, 6)}])
    with pytest.raises(FlatLoraError, match="no LoRA"):
        sharpness(TinyClassifier(6, 5, 3).double(), probe, 0.1)


def test_spaces_have_the_expected_tensors():
    model = tiny_model("gpt2")  # Conv1D bases: the merged offsets keep the stored (in, out) layout
    merged = build_space(model, "merged")
    assert all(e.role == "D" and e.row_dim == 1 for e in merged.entries)
    pair = find_lora_pairs(model)[0]
    assert merged.entries[0].value.shape == pair.base_weight().shape
    pairs = find_lora_pairs(model)
    assert build_space(model, "b").dim == sum(p.B.numel() for p in pairs)
    assert build_space(model, "lora").dim == sum(p.A.numel() + p.B.numel() for p in pairs)
    assert build_space(model, "all").dim == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_measure_runs_end_to_end_on_each_tiny_architecture(arch):
    model = tiny_model(arch)
    probe = ProbeSet.from_batches(tiny_batches(arch, 2, 3))
    before = model_state(model)
    for kind in ("sam", "worst", "average", "flat-lora"):
        result = sharpness(model, probe, 0.01, kind=kind, steps=2, samples=2)
        assert np.isfinite(result.value)
    eig = top_eigenvalues(model, probe, k=2, max_iter=12)
    assert eig.eigenvalues.shape == (2,) and eig.eigenvalues[0] >= eig.eigenvalues[1]
    assert np.isfinite(hessian_trace(model, probe, "b", samples=6).trace)
    assert spectral_density(model, probe, "lora", steps=4).hvps == 4
    pairs = find_lora_pairs(model)
    assert len(layer_curvature(model, probe, "merged", trace_samples=6, max_iter=6).layers) == len(pairs)
    with torch.no_grad():
        expected = sum(float(p.A.double().square().sum() - p.B.double().square().sum()) for p in pairs)
    assert balancedness(model).total == pytest.approx(expected)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_run_every_measure_with_float32_search_vectors(dtype):
    model = tiny_model("bert", dtype=dtype)
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 4))
    before = model_state(model)
    assert build_space(model, "merged").dtype == torch.float32
    for kind in ("sam", "worst", "average", "flat-lora"):
        assert np.isfinite(sharpness(model, probe, 0.05, kind=kind, steps=2, samples=2).value)
    eig = top_eigenvalues(model, probe, k=2, max_iter=10)
    assert np.all(np.isfinite(eig.eigenvalues)) and eig.eigenvalues[0] > 0
    assert np.isfinite(hessian_trace(model, probe, samples=6).trace)
    assert_same_state(before, model_state(model))
