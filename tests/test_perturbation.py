"""The r x r perturbation math against the direct pseudo-inverse formulas of METHODS.md."""

from __future__ import annotations

import pytest
import torch

from flatlora import FlatLoraError, flat_lora_eps_b
from flatlora.perturbation import flat_lora_directions, realized_sq_norms, sam_perturbation

F64 = torch.float64


def direct_eps_b(As, Bs, gAs, gBs, scalings, rho, norm):
    """METHODS.md section 3 as written: G_hat (m x n) from pseudo-inverses, then eps_W A^+ / s."""
    G = [
        0.5 * ((gB / s) @ torch.linalg.pinv(A.T) + torch.linalg.pinv(B.T) @ (gA / s))
        for A, B, gA, gB, s in zip(As, Bs, gAs, gBs, scalings)
    ]
    norms = [torch.linalg.norm(g) for g in G]
    total = torch.sqrt(sum(n**2 for n in norms))
    return [
        (rho * g / (total if norm == "global" else n)) @ torch.linalg.pinv(A) / s
        for g, n, A, s in zip(G, norms, As, scalings)
    ]


def random_layers(case: str, seed: int = 0, rslora: bool = False):
    """Layers of mixed shapes whose gradients come from a full-weight gradient G (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    As, Bs, gAs, gBs, scalings = [], [], [], [], []
    for m, n, r in [(30, 20, 4), (17, 40, 6), (25, 25, 3), (64, 48, 8)]:
        A = torch.randn(r, n, generator=g, dtype=F64)
        if case == "rank_deficient":
            A = torch.randn(r, 2, generator=g, dtype=F64) @ torch.randn(2, n, generator=g, dtype=F64)
        B = torch.zeros(m, r, dtype=F64) if case == "b_zero" else torch.randn(m, r, generator=g, dtype=F64)
        if case == "rank_deficient":
            B[:, 0] = 0
        s = 16 / r**0.5 if rslora else 16 / r
        G = torch.randn(m, n, generator=g, dtype=F64)
        As.append(A)
        Bs.append(B)
        gAs.append(s * B.T @ G)
        gBs.append(s * G @ A.T + 0.1 * torch.randn(m, r, generator=g, dtype=F64))
        scalings.append(s)
    return As, Bs, gAs, gBs, scalings


@pytest.mark.parametrize("case", ["random", "b_zero", "rank_deficient"])
@pytest.mark.parametrize("norm", ["global", "layer"])
@pytest.mark.parametrize("rslora", [False, True])
def test_eps_b_equals_direct_formula_float64(case, norm, rslora):
    As, Bs, gAs, gBs, scalings = random_layers(case, rslora=rslora)
    ours = flat_lora_eps_b(As, Bs, gAs, gBs, scalings, 0.3, norm)
    reference = direct_eps_b(As, Bs, gAs, gBs, scalings, 0.3, norm)
    for o, r in zip(ours, reference):
        assert o.dtype == F64 and o.shape == r.shape
        assert torch.linalg.norm(o - r) / torch.linalg.norm(r) < 1e-10


@pytest.mark.parametrize("case", ["random", "b_zero", "rank_deficient"])
def test_gradient_estimate_norms_equal_direct(case):
    As, Bs, gAs, gBs, scalings = random_layers(case, seed=3)
    _, sq = flat_lora_directions(As, Bs, gAs, gBs, scalings)
    for A, B, gA, gB, s, value in zip(As, Bs, gAs, gBs, scalings, sq):
        G_hat = 0.5 * ((gB / s) @ torch.linalg.pinv(A.T) + torch.linalg.pinv(B.T) @ (gA / s))
        assert abs(value - G_hat.square().sum()) / G_hat.square().sum() < 1e-10


@pytest.mark.parametrize("case", ["random", "b_zero", "rank_deficient"])
def test_realized_full_space_norm_is_at_most_rho(case):
    As, Bs, gAs, gBs, scalings = random_layers(case, seed=1)
    rho = 0.05
    eps = flat_lora_eps_b(As, Bs, gAs, gBs, scalings, rho, "global")
    direct = torch.sqrt(sum(torch.linalg.norm(s * e @ A) ** 2 for e, A, s in zip(eps, As, scalings)))
    realized = realized_sq_norms(eps, As, scalings).sum().sqrt()
    assert torch.allclose(realized, direct, rtol=1e-12)
    assert realized <= rho * (1 + 1e-12)
    per_layer = realized_sq_norms(flat_lora_eps_b(As, Bs, gAs, gBs, scalings, rho, "layer"), As, scalings).sqrt()
    assert (per_layer <= rho * (1 + 1e-12)).all()


def test_square_invertible_factors_realize_the_exact_sam_step():
    """With A and B square and invertible, G_hat = G and s eps_B A = rho G / ||G|| exactly."""
    g = torch.Generator().manual_seed(0)
    r, s = 6, 2.0
    A, B, G = (torch.randn(r, r, generator=g, dtype=F64) for _ in range(3))
    (eps,) = flat_lora_eps_b([A], [B], [s * B.T @ G], [s * G @ A.T], [s], 0.2)
    assert torch.allclose(s * eps @ A, 0.2 * G / torch.linalg.norm(G), atol=1e-12)


def test_rho_zero_and_zero_gradient_give_zero_without_nan():
    As, Bs, gAs, gBs, scalings = random_layers("random")
    for e in flat_lora_eps_b(As, Bs, gAs, gBs, scalings, 0.0):
        assert torch.equal(e, torch.zeros_like(e))
    zeros = [torch.zeros_like(t) for t in gAs], [torch.zeros_like(t) for t in gBs]
    for e in flat_lora_eps_b(As, Bs, *zeros, scalings, 0.1):
        assert torch.equal(e, torch.zeros_like(e))


def test_low_precision_inputs_keep_their_dtype_and_stay_accurate():
    As, Bs, gAs, gBs, scalings = random_layers("random", seed=5)
    ref = flat_lora_eps_b(As, Bs, gAs, gBs, scalings, 0.1)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)]:
        cast = [[t.to(dtype) for t in ts] for ts in (As, Bs, gAs, gBs)]
        out = flat_lora_eps_b(*cast, scalings, 0.1)
        for o, r in zip(out, ref):
            assert o.dtype == dtype
            assert torch.linalg.norm(o.double() - r) / torch.linalg.norm(r) < tol


def test_bad_arguments_raise_project_error():
    As, Bs, gAs, gBs, scalings = random_layers("random")
    with pytest.raises(FlatLoraError, match="rho"):
        flat_lora_eps_b(As, Bs, gAs, gBs, scalings, -0.1)
    with pytest.raises(FlatLoraError, match="norm"):
        flat_lora_eps_b(As, Bs, gAs, gBs, scalings, 0.1, norm="spectral")
    with pytest.raises(FlatLoraError, match="one entry per layer"):
        flat_lora_eps_b(As, Bs[:-1], gAs, gBs, scalings, 0.1)
    with pytest.raises(FlatLoraError, match=r"\(r, n\)"):
        flat_lora_eps_b([A.T for A in As], Bs, gAs, gBs, scalings, 0.1)


def test_sam_perturbation_is_rho_times_unit_gradient_over_all_tensors():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    grads = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    flat = torch.cat([t.flatten() for t in grads])
    eps = sam_perturbation(params, grads, 0.3)
    assert torch.allclose(torch.cat([e.flatten() for e in eps]), 0.3 * flat / flat.norm(), rtol=1e-6)
    # ASAM: rho T^2 g / ||T g||, T = |theta| + eta
    eta = 0.1
    T = torch.cat([p.abs().flatten() + eta for p in params])
    expected = 0.3 * T * T * flat / (T * flat).norm()
    adaptive = sam_perturbation(params, grads, 0.3, adaptive=True, eta=eta)
    assert torch.allclose(torch.cat([e.flatten() for e in adaptive]), expected, rtol=1e-6)
    zero = sam_perturbation(params, [torch.zeros_like(t) for t in grads], 0.3)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in zero)
