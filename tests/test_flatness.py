"""The literature's flatness measures: closed forms, a dense float64 Hessian, invariances, bit-identity, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analysis_fixtures import TinyClassifier, assert_same_state, lora_wrap, model_state

from flatlora import FlatLoraError
from flatlora.testing import tiny_batches, tiny_model
from flatlora_analysis import ProbeSet, evaluate_loss
from flatlora_analysis.flatness import (
    PacBayesResult,
    RelativeFlatnessResult,
    adaptive_sharpness,
    logit_normalized,
    noise_direction,
    normalize_logits,
    pac_bayes_flatness,
    pac_bayes_sigma,
    relative_flatness,
)
from flatlora_analysis.results import Result


class Quadratic:
    """L(w0 + delta) = 1/2 (w0 + delta)^T H (w0 + delta): the Objective protocol in closed form."""

    def __init__(self, w0, H):
        self.w0, self.H = w0, H
        self.dim, self.dtype, self.device = len(w0), torch.float64, torch.device("cpu")

    def point(self):
        return self.w0

    def loss(self, delta):
        w = self.w0 if delta is None else self.w0 + delta
        return float(0.5 * w @ self.H @ w)

    def loss_and_grad(self, delta):
        w = self.w0 if delta is None else self.w0 + delta
        return float(0.5 * w @ self.H @ w), self.H @ w


def classifier_and_probe(seed=0, n=24, classes=3):
    model = lora_wrap(TinyClassifier(6, 5, classes), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    probe = ProbeSet.from_batches([{"x": x[:16], "labels": y[:16]}, {"x": x[16:], "labels": y[16:]}])
    return model, probe


def test_normalized_logits_are_centered_unit_vectors():
    z = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    out = normalize_logits(z)
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2), atol=1e-15)
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))  # a constant row: the floor, no NaN
    assert torch.allclose(normalize_logits(7 * z[:1] + 3), out[:1], atol=1e-15)  # scale and shift invariant


def test_logit_normalized_loss_is_the_cross_entropy_of_normalized_logits():
    model, probe = classifier_and_probe()
    x = torch.cat([b["x"] for b in probe.batches])
    y = torch.cat([b["labels"] for b in probe.batches])
    with torch.no_grad():
        logits = model(x=x).logits
    expected = float(torch.nn.functional.cross_entropy(normalize_logits(logits), y))
    assert evaluate_loss(model, logit_normalized(probe)) == pytest.approx(expected, rel=1e-13)


def test_adaptive_sharpness_is_invariant_to_rescaling_the_logit_layer():
    """With |w|-scaled perturbations and normalized logits, scaling the head by 10 changes nothing."""
    model, probe = classifier_and_probe()
    before = model_state(model)
    plain = adaptive_sharpness(model, probe, 0.05, space="all", steps=8)
    assert_same_state(before, model_state(model))
    assert plain.value > 0 and plain.settings["logit_normalization"] and plain.settings["norm"] == "linf"
    assert plain.settings["adaptive"] and plain.settings["eta"] == 0.0
    unnormalized = adaptive_sharpness(model, probe, 0.05, space="all", steps=8, logit_normalization=False)
    head = model.base_model.model.head
    with torch.no_grad():
        head.weight.mul_(10)
        head.bias.mul_(10)
    scaled = adaptive_sharpness(model, probe, 0.05, space="all", steps=8)
    assert scaled.value == pytest.approx(plain.value, rel=1e-9)
    rescaled_plain = adaptive_sharpness(model, probe, 0.05, space="all", steps=8, logit_normalization=False)
    assert abs(rescaled_plain.value - unnormalized.value) > 0.1 * abs(unnormalized.value)  # what it protects against


def test_adaptive_linf_sharpness_of_a_linear_loss_is_rho_sum_abs_g_w():
    """For L = g^T w the l-inf |w|-ball maximum is rho sum |g_i w_i| (the SAM start is already optimal)."""
    from flatlora_analysis.sharpness import worst_case

    g = torch.tensor([0.5, -2.0, 1.0, 0.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.3, -2.0, 4.0], dtype=torch.float64)

    class Linear(Quadratic):
        def loss(self, delta):
            return float(g @ (w if delta is None else w + delta))

        def loss_and_grad(self, delta):
            return self.loss(delta), g

    best, _, _ = worst_case(Linear(w, None), 0.01, scale=w.abs(), norm="linf", steps=3)
    assert best - float(g @ w) == pytest.approx(0.01 * float((g * w).abs().sum()), rel=1e-12)


def test_pac_bayes_sigma_solves_the_quadratic_exactly_for_its_draws():
    """With antithetic pairs the estimate is 1/2 sigma^2 A + 1/2 eps^2 B exactly: the bisection must find its root."""
    H = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=torch.float64))
    H[0, 1] = H[1, 0] = 0.4
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    samples, eps, target, seed = 6, 1e-2, 0.05, 3
    found = pac_bayes_sigma(Quadratic(w0, H), target, eps=eps, samples=samples, rtol=1e-4, seed=seed)
    z = torch.stack([noise_direction(i, 4, seed) for i in range(samples)])
    A = float(torch.einsum("ij,jk,ik->", z * w0.abs(), H, z * w0.abs())) / samples
    B = float(torch.einsum("ij,jk,ik->", z, H, z)) / samples
    exact = math.sqrt((2 * target - eps**2 * B) / A)
    assert found["bracket"] == "met"
    assert found["sigma"] == pytest.approx(exact, rel=2e-4)
    assert found["increase"] == pytest.approx(target, rel=1e-3)
    assert found["slope"] == pytest.approx(A / 2, rel=1e-6)  # d increase / d sigma^2


def test_pac_bayes_sigma_matches_the_expected_value_within_its_error():
    """E[increase] = 1/2 sum_i H_ii (sigma^2 w_i^2 + eps^2): sigma* in closed form, within the stated error."""
    H = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    w0 = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    target, eps = 0.1, 1e-3
    found = pac_bayes_sigma(Quadratic(w0, H), target, eps=eps, samples=400, rtol=1e-3, seed=0)
    diag = torch.diagonal(H)
    sigma2 = float((2 * target - eps**2 * diag.sum()) / (diag * w0**2).sum())
    stderr_sigma2 = found["increase_stderr"] / found["slope"]
    assert abs(found["sigma"] ** 2 - sigma2) <= 4 * stderr_sigma2
    assert stderr_sigma2 < 0.2 * sigma2


def test_pac_bayes_sigma_reports_its_bounds():
    H = torch.eye(2, dtype=torch.float64)
    w0 = torch.ones(2, dtype=torch.float64)
    flat = pac_bayes_sigma(Quadratic(w0, 1e-6 * H), 0.1, samples=2)
    assert flat["bracket"] == "above" and flat["sigma"] == 64.0 and math.isnan(flat["slope"])
    sharp = pac_bayes_sigma(Quadratic(w0, 1e6 * H), 0.1, eps=1e-2, samples=2)
    assert sharp["bracket"] == "below" and sharp["sigma"] == 1e-6
    with pytest.raises(FlatLoraError, match="target"):
        pac_bayes_sigma(Quadratic(w0, H), 0.0)
    with pytest.raises(FlatLoraError, match="samples"):
        pac_bayes_sigma(Quadratic(w0, H), 0.1, samples=1)


def test_pac_bayes_flatness_on_a_model_leaves_it_untouched_and_round_trips():
    model, probe = classifier_and_probe()
    before = model_state(model)
    result = pac_bayes_flatness(model, probe, 0.05, samples=4, seed=1)
    assert_same_state(before, model_state(model))
    assert isinstance(result, PacBayesResult) and result.meta["bracket"] == "met"
    assert result.value == pytest.approx(1 / result.sigma**2)
    assert result.increase == pytest.approx(0.05, rel=0.05) and result.stderr > 0
    assert result.clean_loss == pytest.approx(evaluate_loss(model, probe, space="merged"), rel=1e-12)
    again = Result.from_dict(result.to_dict())
    assert again.value == result.value and again.settings == result.settings
    assert pac_bayes_flatness(model, probe, 0.05, samples=4, seed=1).value == result.value  # bit-exact rerun


def test_relative_flatness_equals_the_dense_float64_hessian_formula():
    """kappa = sum_{s,s'} <w_s, w_s'> sum_j d2L / dW_sj dW_s'j, from torch.autograd.functional.hessian."""
    model, probe = classifier_and_probe(classes=4)
    head = model.base_model.model.head
    x = torch.cat([b["x"] for b in probe.batches])
    y = torch.cat([b["labels"] for b in probe.batches])
    with torch.no_grad():
        features = torch.tanh(model.base_model.model.lin(x))

    def loss(weight):
        return torch.nn.functional.cross_entropy(features @ weight.T + head.bias, y)

    W = head.weight.detach()
    H = torch.autograd.functional.hessian(loss, W)  # (C, d, C, d)
    trace_blocks = torch.einsum("sjtj->st", H)
    expected = float(((W @ W.T) * trace_blocks).sum())
    before = model_state(model)
    result = relative_flatness(model, probe)
    assert_same_state(before, model_state(model))
    assert isinstance(result, RelativeFlatnessResult) and result.layer.endswith("head")
    assert result.value == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(result.trace_blocks, trace_blocks.numpy(), rtol=1e-9, atol=1e-14)
    assert result.clean_loss == pytest.approx(float(loss(W)), rel=1e-12)
    assert Result.from_dict(result.to_dict()).value == result.value


def test_adaptive_sharpness_says_when_two_classes_make_it_degenerate():
    """Binary logits normalize to +-(1, -1)/sqrt(2): the loss moves only where a prediction flips."""
    model = tiny_model("bert", dtype=torch.float64)
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 4))
    z = torch.tensor([[0.3, -2.0], [5.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(normalize_logits(z).abs(), torch.full((2, 2), 2**-0.5, dtype=torch.float64))
    result = adaptive_sharpness(model, probe, 1e-4, steps=2)
    assert "two classes" in result.meta["note"] and result.value == pytest.approx(0.0, abs=1e-12)
    assert "note" not in adaptive_sharpness(model, probe, 1e-4, steps=2, logit_normalization=False).meta


def test_relative_flatness_finds_a_peft_classifiers_saved_head():
    model = tiny_model("bert", dtype=torch.float64)
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 4))
    result = relative_flatness(model, probe)
    assert "classifier" in result.layer and "modules_to_save" in result.layer
    assert result.value > 0 and result.trace_blocks.shape == (2, 2)


def test_the_classifier_measures_refuse_a_causal_lm_probe():
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    probe = ProbeSet.from_batches([batch], weighting="tokens")
    model, _ = classifier_and_probe()
    with pytest.raises(FlatLoraError, match="classifiers"):
        relative_flatness(model, probe)
    with pytest.raises(FlatLoraError, match="classifiers"):
        logit_normalized(probe)
    with pytest.raises(FlatLoraError, match=r"nn\.Linear"):
        relative_flatness(model, classifier_and_probe()[1], layer="nope")


@pytest.mark.parametrize("curvature", [1.0, 30.0, 1e-3])
def test_the_brent_search_meets_the_bisection_in_fewer_evaluations(curvature):
    """Both searches stop on a bracket of ratio 1 + rtol around one root; the secant (Brent) needs fewer draws."""
    H = curvature * torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=torch.float64))
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)

    class Quartic(Quadratic):  # not linear in sigma^2: the secant's guess is off and must be corrected
        def loss(self, delta):
            d = torch.zeros_like(w0) if delta is None else delta
            return super().loss(delta) + float(curvature * (d**4).sum())

    for objective in (Quadratic(w0, H), Quartic(w0, H)):
        secant = pac_bayes_sigma(objective, 0.05, samples=3, rtol=0.01, seed=2)
        bisection = pac_bayes_sigma(objective, 0.05, samples=3, rtol=0.01, seed=2, search="bisection")
        assert secant["bracket"] == bisection["bracket"] == "met"
        assert secant["sigma"] == pytest.approx(bisection["sigma"], rel=0.02)
        assert secant["increase"] == pytest.approx(0.05, rel=0.03)
        assert secant["evaluations"] <= 8 < 12 <= bisection["evaluations"]
    with pytest.raises(FlatLoraError, match="search"):
        pac_bayes_sigma(Quadratic(w0, H), 0.1, search="golden")
