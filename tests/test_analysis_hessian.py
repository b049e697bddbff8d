"""The Hessian measures on peft models: the HVP operator against autograd, eigenvalues, traces, backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_fixtures import TinyClassifier, TinyRegression, assert_same_state, lora_wrap, model_state
from torch.func import functional_call

from flatlora import FlatLoraError
from flatlora.testing import tiny_batches, tiny_model
from flatlora_analysis import (
    ProbeSet,
    build_space,
    hessian_operator,
    hessian_trace,
    layer_curvature,
    spectral_density,
    top_eigenvalues,
)


def classifier_probe(n=24, n_in=6, classes=3, seed=0, batch_size=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return ProbeSet.from_batches(
        {"x": x[i : i + batch_size], "labels": y[i : i + batch_size]} for i in range(0, n, batch_size)
    )


def full_hessian(op) -> torch.Tensor:
    eye = torch.eye(op.dim, dtype=torch.float64)
    return torch.stack([op.matvec(eye[i]) for i in range(op.dim)])


def reference_hessian(model, probe, space_name) -> torch.Tensor:
    """torch.autograd.functional.hessian of the probe loss as a function of the flat delta."""
    space = build_space(model, space_name)

    def loss(delta):
        overrides = space.overrides(space.split(delta))
        return sum(probe.weighted_loss(functional_call(model, overrides, args=(), kwargs=b), b) for b in probe.batches)

    model.eval()
    return torch.autograd.functional.hessian(loss, torch.zeros(space.dim, dtype=torch.float64))


@pytest.mark.parametrize("space", ["lora", "b", "merged", "all"])
def test_hvp_equals_autograd_functional_hessian_times_v(space):
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()  # three uneven batches: 10, 10, 4
    H_ref = reference_hessian(model, probe, space)
    with hessian_operator(model, probe, space, hvp="autograd") as op:
        H = full_hessian(op)
    assert op.meta["hvp"] == "autograd"
    assert torch.max(torch.abs(H - H_ref)) < 1e-10
    assert torch.allclose(H, H.T, atol=1e-12)


def test_bert_hvp_equals_autograd_functional_hessian_in_float64():
    model = tiny_model("bert", r=2, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 3))
    H_ref = reference_hessian(model, probe, "b")
    with hessian_operator(model, probe, "b") as op:
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        hv = op.matvec(v)
    assert torch.max(torch.abs(hv - H_ref @ v)) < 1e-10


def test_finite_difference_hvp_is_the_documented_fallback():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    with hessian_operator(model, probe, "lora", hvp="autograd") as exact_op:
        v = torch.randn(exact_op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        exact = exact_op.matvec(v)
    with hessian_operator(model, probe, "lora", hvp="fd") as fd_op:
        approx = fd_op.matvec(v)
    assert fd_op.meta["hvp"] == "fd"
    assert torch.allclose(approx, exact, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("space", ["lora", "merged"])
def test_top_eigenvalues_match_eigvalsh_of_the_full_hessian(space):
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    exact = np.sort(np.linalg.eigvalsh(reference_hessian(model, probe, space).numpy()))[::-1]
    result = top_eigenvalues(model, probe, k=3, space=space, tol=1e-10)
    np.testing.assert_allclose(result.eigenvalues, exact[:3], rtol=1e-8, atol=1e-12)
    assert result.converged and result.hvps > 0
    for solver in ("eigsh", "power"):
        other = top_eigenvalues(model, probe, k=1, space=space, tol=1e-12, solver=solver, max_iter=3000)
        assert other.eigenvalues[0] == pytest.approx(exact[0], rel=1e-5)


def test_merged_space_hessian_of_one_linear_layer_equals_the_full_weight_hessian():
    model = lora_wrap(TinyClassifier(4, 3, 2), r=2)
    probe = classifier_probe(n=12, n_in=4, classes=2)
    with hessian_operator(model, probe, "merged") as op:
        H_merged = full_hessian(op)
    # The same network with a plain weight W = W0 + s B A, differentiated in W directly.
    layer = model.base_model.model.lin
    W = (layer.base_layer.weight + layer.get_delta_weight("default")).detach()
    head = model.base_model.model.head

    def loss_of_w(flat_w):
        w = flat_w.view_as(W)
        total = 0
        for b in probe.batches:
            logits = head(torch.tanh(b["x"] @ w.T + layer.base_layer.bias))
            total = total + torch.nn.functional.cross_entropy(logits, b["labels"]) * len(b["labels"]) / 12
        return total

    H_full = torch.autograd.functional.hessian(loss_of_w, W.reshape(-1))
    assert torch.max(torch.abs(H_merged - H_full)) < 1e-12


def test_lora_space_a_block_is_zero_at_b_zero():
    model = lora_wrap(TinyClassifier(6, 5, 3), b_scale=0.0)  # peft's init: B = 0
    probe = classifier_probe()
    space = build_space(model, "lora")
    roles = np.concatenate([[e.role] * e.numel for e in space.entries])
    with hessian_operator(model, probe, "lora") as op:
        H = full_hessian(op).numpy()
    a = roles == "A"
    assert np.abs(H[np.ix_(a, a)]).max() == 0.0
    assert np.abs(H[np.ix_(~a, ~a)]).max() > 0  # the B block is not


def test_regression_hessian_in_merged_space_is_kron_of_the_input_covariance():
    model = lora_wrap(TinyRegression(4, 3))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    probe = ProbeSet.from_batches([{"x": x, "labels": torch.zeros(16, 3, dtype=torch.float64)}])
    cov = (x.T @ x / 16).numpy()
    result = top_eigenvalues(model, probe, k=4, space="merged", tol=1e-10)
    top = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(result.eigenvalues, [top[0]] * 3 + [top[1]], rtol=1e-8)  # each one thrice
    trace = hessian_trace(model, probe, "merged", samples=60, seed=0)
    assert abs(trace.trace - 3 * np.trace(cov)) <= 3 * trace.stderr + 1e-9


def test_our_top_eigenvalue_equals_the_pyhessian_backends():
    pytest.importorskip("pyhessian")
    model = lora_wrap(TinyClassifier(6, 5, 3), seed=3)
    probe = classifier_probe(seed=3)
    ours = top_eigenvalues(model, probe, k=1, space="lora", tol=1e-8)
    theirs = top_eigenvalues(model, probe, k=1, space="lora", tol=1e-8, backend="pyhessian", max_iter=2000)
    assert theirs.meta["backend"] == "pyhessian"
    assert theirs.eigenvalues[0] == pytest.approx(ours.eigenvalues[0], rel=1e-4)
    t_ours = hessian_trace(model, probe, "lora", method="hutchinson", samples=400, seed=1)
    t_theirs = hessian_trace(model, probe, "lora", backend="pyhessian", samples=400, tol=1e-9, seed=1)
    assert abs(t_ours.trace - t_theirs.trace) <= 4 * np.hypot(t_ours.stderr, t_theirs.stderr)


def test_pyhessian_backend_leaves_model_grads_mode_and_rng_alone():
    pytest.importorskip("pyhessian")
    model = lora_wrap(TinyClassifier(6, 5, 3))
    model.train()
    before = model_state(model)
    rng = torch.get_rng_state()
    top_eigenvalues(model, classifier_probe(), k=2, backend="pyhessian", max_iter=20)
    hessian_trace(model, classifier_probe(), backend="pyhessian", samples=5)
    assert_same_state(before, model_state(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_every_hessian_measure_leaves_the_model_bit_identical():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    model.train()
    model.base_model.model.lin.lora_A["default"].weight.grad = torch.ones(2, 6, dtype=torch.float64)
    before = model_state(model)
    probe = classifier_probe()
    top_eigenvalues(model, probe, k=2, space="merged")
    hessian_trace(model, probe, "b", samples=9)
    spectral_density(model, probe, "lora", steps=8)
    layer_curvature(model, probe, "lora", trace_samples=6)
    assert_same_state(before, model_state(model))


def test_spectral_density_and_layer_curvature_results():
    model = lora_wrap(TinyClassifier(6, 5, 3), targets=("lin", "head"))
    probe = classifier_probe()
    density = spectral_density(model, probe, "lora", steps=20, runs=2)
    np.testing.assert_allclose(density.weights.sum(1), 1.0, atol=1e-12)
    assert density.grid.shape == density.density.shape and density.hvps == 40
    exact = np.linalg.eigvalsh(reference_hessian(model, probe, "lora").numpy())
    assert density.nodes.max() == pytest.approx(exact.max(), rel=1e-6)
    per_layer = layer_curvature(model, probe, "lora", trace_samples=30, tol=1e-8)
    assert len(per_layer.layers) == 2 and per_layer.eigenvalues.shape == (2,)
    space = build_space(model, "lora")
    H = reference_hessian(model, probe, "lora").numpy()
    offset = 0
    for layer, lam in zip(per_layer.layers, per_layer.eigenvalues):
        size = sum(e.numel for e in space.entries if e.group == layer)
        block = H[offset : offset + size, offset : offset + size]
        assert lam == pytest.approx(np.linalg.eigvalsh(block).max(), rel=1e-6)
        offset += size
    restored = type(density).from_dict(density.to_dict())
    np.testing.assert_array_equal(restored.nodes, density.nodes)


def test_k_larger_than_the_space_and_unknown_names_are_refused():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    with pytest.raises(FlatLoraError, match="larger than the space"):
        top_eigenvalues(model, probe, k=1000, space="b")
    with pytest.raises(FlatLoraError, match="unknown space"):
        top_eigenvalues(model, probe, space="everything")
    with pytest.raises(FlatLoraError, match="unknown solver"):
        top_eigenvalues(model, probe, solver="arnoldi")


def test_sdpa_models_get_a_double_backward_attention_and_say_so():
    model = tiny_model("bert")
    model.base_model.model.config._attn_implementation = "sdpa"
    probe = ProbeSet.from_batches(tiny_batches("bert", 1, 4))
    result = top_eigenvalues(model, probe, k=1, max_iter=5)
    assert result.meta["attention"] == "sdpa (math backend)"
    assert model.base_model.model.config._attn_implementation == "sdpa"


def sdpa_flags() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    return (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )


@pytest.mark.parametrize("retain_graph", [True, False])
def test_an_operator_left_open_leaves_the_process_attention_as_it_was(retain_graph):
    """SDPA's backends are process-wide flags: an operator sets them around each graph's forward only, so one
    never closed (a notebook's) cannot leave every later model of the process on the math kernel, whose other
    rounding had moved a later report's clean loss in its last bits."""
    from flatlora_analysis.hessian.operator import HessianOperator
    from flatlora_analysis.objective import ModelObjective

    model = tiny_model("bert")
    model.base_model.model.config._attn_implementation = "sdpa"
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 4))
    before = sdpa_flags()
    op = HessianOperator(ModelObjective(model, probe, build_space(model, "lora"), torch.device("cpu")), "autograd",
                         retain_graph=retain_graph)  # fmt: skip
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    hv = op.matvec(v)  # a double backward through SDPA: its forward ran on the math backend
    assert sdpa_flags() == before and op.meta["attention"] == "sdpa (math backend)" and op.meta["hvp"] == "autograd"
    assert torch.allclose(op.matmat(torch.stack([v, 2 * v], 1)), torch.stack([hv, 2 * hv], 1), rtol=1e-4, atol=1e-6)
    assert sdpa_flags() == before
