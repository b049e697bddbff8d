"""The measure algorithms on objectives and matrices with known answers (ANALYSIS.md checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analysis_fixtures import Quadratic, symmetric_with_spectrum

from flatlora import FlatLoraError
from flatlora_analysis.hessian import (
    DenseOperator,
    broadened_density,
    eigsh_eigenvalues,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    lanczos_tridiagonal,
    power_eigenvalues,
    slq,
)
from flatlora_analysis.sharpness import average_case, sam_delta, worst_case

SPECTRUM = [3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -0.1, -0.4, -0.7]
INDEFINITE = [1.0, 0.6, 0.3, 0.0, -0.5, -1.2, -2.0, -4.0]  # the most negative dominates in magnitude


# ----------------------------------------------------------------------------- sharpness closed forms


@pytest.mark.parametrize("spectrum", [SPECTRUM, INDEFINITE], ids=["mixed", "indefinite"])
def test_worst_case_l2_hits_half_rho_squared_lambda_max(spectrum):
    H = symmetric_with_spectrum(spectrum, seed=1)
    rho = 0.3
    best, delta, _ = worst_case(Quadratic(H), rho, steps=200, restarts=2, seed=0)
    expected = 0.5 * rho**2 * max(spectrum)
    assert best <= expected * (1 + 1e-9)
    assert best == pytest.approx(expected, rel=1e-3)
    assert float(delta.norm()) <= rho * (1 + 1e-9)


def test_worst_case_linf_stays_in_the_box_and_beats_any_corner_of_the_sam_sign():
    H = symmetric_with_spectrum(SPECTRUM, seed=2)
    q = Quadratic(H, w0=torch.zeros(10), center=-0.1 * torch.ones(10))  # nonzero gradient at w
    rho = 0.05
    best, delta, _ = worst_case(q, rho, norm="linf", steps=60)
    assert float(delta.abs().max()) <= rho * (1 + 1e-12)
    _, g = q.loss_and_grad(None)
    assert best >= q.loss(rho * torch.sign(g)) - 1e-15


def test_worst_is_never_below_sam_on_a_nonzero_gradient():
    H = symmetric_with_spectrum(INDEFINITE, seed=3)
    q = Quadratic(H, w0=torch.zeros(8), center=0.2 * torch.ones(8))
    clean, g = q.loss_and_grad(None)
    for rho in (0.01, 0.1, 1.0):
        sam = q.loss(sam_delta(g, rho))
        best, _, _ = worst_case(q, rho, steps=5, start=(clean, g))
        assert best >= sam


def test_worst_case_takes_a_gradient_per_step_and_only_the_loss_of_each_runs_last_point():
    H = symmetric_with_spectrum(SPECTRUM, seed=5)
    q = Quadratic(H, w0=torch.zeros(10), center=0.1 * torch.ones(10))
    counted = {"grad": 0, "loss": 0}
    loss, loss_and_grad = q.loss, q.loss_and_grad
    q.loss = lambda d=None: counted.__setitem__("loss", counted["loss"] + 1) or loss(d)
    q.loss_and_grad = lambda d=None: counted.__setitem__("grad", counted["grad"] + 1) or loss_and_grad(d)
    clean, g = loss_and_grad(None)
    best, delta, info = worst_case(q, 0.1, steps=4, restarts=1, start=(clean, g))
    assert counted == {"grad": 2 * 4, "loss": 2} and info["gradient_evaluations"] == 8
    assert best == pytest.approx(loss(delta), rel=1e-12) and best >= q.loss(sam_delta(g, 0.1)) - 1e-15


def test_average_case_hits_half_rho_squared_trace_within_four_standard_errors():
    H = symmetric_with_spectrum(SPECTRUM, seed=4)
    rho = 0.2
    [(mean, se)] = average_case(Quadratic(H), [rho], samples=4000, seed=1)
    expected = 0.5 * rho**2 * float(torch.trace(H))
    assert abs(mean - expected) <= 4 * se


def test_adaptive_average_case_hits_half_rho_squared_sum_hii_ci_squared():
    H = symmetric_with_spectrum(SPECTRUM, seed=5)
    w0 = torch.linspace(-2, 2, 10, dtype=torch.float64)
    eta = 0.1
    c = w0.abs() + eta
    rho = 0.1
    [(mean, se)] = average_case(Quadratic(H, w0=w0), [rho], scale=c, samples=4000, seed=2)
    expected = 0.5 * rho**2 * float((torch.diagonal(H) * c**2).sum())
    assert abs(mean - expected) <= 4 * se


def test_adaptive_worst_case_is_the_top_eigenvalue_of_c_h_c():
    H = symmetric_with_spectrum(SPECTRUM, seed=6)
    w0 = torch.linspace(0.5, 3, 10, dtype=torch.float64)
    c = w0.abs() + 0.01
    rho = 0.05
    best, delta, _ = worst_case(Quadratic(H, w0=w0), rho, scale=c, steps=300, restarts=2)
    expected = 0.5 * rho**2 * float(torch.linalg.eigvalsh(c[:, None] * H * c[None, :]).max())
    assert best == pytest.approx(expected, rel=2e-3)
    assert float((delta / c).norm()) <= rho * (1 + 1e-9)


def test_sam_delta_has_radius_rho_and_is_zero_for_a_zero_gradient():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert float(sam_delta(g, 0.5).norm()) == pytest.approx(0.5)
    assert torch.equal(sam_delta(torch.zeros(2), 0.5), torch.zeros(2))
    c = torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert float((sam_delta(g, 0.5, c) / c).norm()) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- eigenvalues


def test_lanczos_run_to_n_steps_reproduces_the_exact_spectrum():
    spectrum = np.linspace(-1, 5, 12)
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=7))
    alpha, beta, Q = lanczos_tridiagonal(op, 12, torch.ones(12, dtype=torch.float64))
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(T)), spectrum, atol=1e-12)
    np.testing.assert_allclose((Q @ Q.T).numpy(), np.eye(12), atol=1e-12)


def test_lanczos_top_is_the_largest_algebraic_even_when_a_negative_one_dominates():
    op = DenseOperator(symmetric_with_spectrum(INDEFINITE, seed=8))
    top = lanczos_eigenvalues(op, 3, tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues, [1.0, 0.6, 0.3], rtol=1e-8)
    assert top.converged
    mag = lanczos_eigenvalues(op, 2, which="magnitude", tol=1e-10)
    np.testing.assert_allclose(mag.eigenvalues, [-2.0, -4.0], rtol=1e-8)


def test_lanczos_k1_converges_and_is_right_not_stopped_after_two_steps():
    # hessian-eigenthings 1.0.0a5 stops k=1 after 2 steps and returns a wrong value silently.
    spectrum = np.concatenate([[10.0, 9.9], np.linspace(0, 9, 200)])
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=9))
    est = lanczos_eigenvalues(op, 1, tol=1e-6)
    assert est.converged and est.iterations > 2
    assert est.eigenvalues[0] == pytest.approx(10.0, rel=1e-6)
    short = lanczos_eigenvalues(op, 1, tol=1e-12, max_iter=3)
    assert not short.converged  # and says so


def test_lanczos_error_estimate_bounds_the_true_error():
    spectrum = np.concatenate([[5.0, 4.0, 3.9], np.linspace(-1, 3, 300)])
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=10))
    est = lanczos_eigenvalues(op, 3, tol=1e-4)
    truth = np.array([5.0, 4.0, 3.9])
    assert est.converged
    assert np.all(np.abs(est.eigenvalues - truth) <= 1e-4 * truth + 1e-12)


def test_power_iteration_returns_largest_magnitude_and_the_shift_recovers_the_algebraic_top():
    op = DenseOperator(symmetric_with_spectrum(INDEFINITE, seed=11))
    mag = power_eigenvalues(op, 1, which="magnitude", tol=1e-10, max_iter=2000)
    assert mag.eigenvalues[0] == pytest.approx(-4.0, rel=1e-6)
    alg = power_eigenvalues(op, 1, which="algebraic", tol=1e-12, max_iter=5000)
    assert alg.eigenvalues[0] == pytest.approx(1.0, rel=1e-4)


def test_eigsh_agrees_with_eigvalsh():
    op = DenseOperator(symmetric_with_spectrum(np.linspace(-3, 2, 30), seed=12))
    est = eigsh_eigenvalues(op, 3, tol=1e-10)
    np.testing.assert_allclose(est.eigenvalues, np.linspace(-3, 2, 30)[::-1][:3], rtol=1e-8)
    assert est.products == op.n_products


def test_k_larger_than_the_space_is_refused():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(FlatLoraError, match="larger than the space"):
        lanczos_eigenvalues(op, 5)
    with pytest.raises(FlatLoraError, match="larger than the space"):
        power_eigenvalues(op, 5)


# ----------------------------------------------------------------------------- trace and density


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
def test_trace_is_within_three_standard_errors(estimator):
    spectrum = np.concatenate([np.linspace(5, 1, 10), np.linspace(0.2, -0.2, 90)])
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=13))
    est = hutchinson(op, 300, seed=3) if estimator == "hutchinson" else hutchpp(op, 90, seed=3)
    assert abs(est.trace - spectrum.sum()) <= 3 * est.stderr
    assert est.stderr > 0 and est.products == op.n_products


def test_hutchpp_has_a_smaller_error_than_hutchinson_on_a_decaying_spectrum():
    spectrum = 1.0 / np.arange(1, 101) ** 2
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=14))
    assert hutchpp(op, 60, seed=1).stderr < hutchinson(op, 60, seed=1).stderr


def test_hutchinson_tolerance_stop_is_variance_aware():
    op = DenseOperator(symmetric_with_spectrum(np.linspace(1, 2, 50), seed=15))
    est = hutchinson(op, 500, tol=0.01, seed=0)
    assert est.converged and est.stderr <= 0.01 * abs(est.trace)
    assert len(est.samples) >= 10


def test_slq_weights_are_real_nonnegative_and_sum_to_one():
    spectrum = np.linspace(-1, 4, 80)
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=16))
    quad = slq(op, steps=30, runs=3, seed=0)
    assert quad.weights.dtype.kind == "f" and np.all(quad.weights >= 0)
    np.testing.assert_allclose(quad.weights.sum(1), 1.0, atol=1e-12)
    assert quad.nodes.max() == pytest.approx(4.0, rel=1e-4) and quad.nodes.min() == pytest.approx(-1.0, rel=1e-4)
    grid, density, sigma = broadened_density(quad.nodes, quad.weights)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, rel=1e-3)
    # The quadrature reproduces the first moments (tr(A)/n) exactly up to rounding.
    assert float((quad.nodes * quad.weights).sum(1).mean()) == pytest.approx(spectrum.mean(), abs=0.3)
    assert math.isfinite(sigma) and sigma > 0


def test_lanczos_finds_every_copy_of_a_repeated_top_eigenvalue():
    # One Krylov space holds one direction of an eigenspace; the deflated check finds the others.
    spectrum = np.concatenate([[2.0, 2.0, 2.0], np.linspace(-1, 1.5, 200)])
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=17))
    est = lanczos_eigenvalues(op, 4, tol=1e-8)
    np.testing.assert_allclose(est.eigenvalues, [2.0, 2.0, 2.0, 1.5], rtol=1e-6)
    single = lanczos_eigenvalues(op, 4, tol=1e-8, verify=False)
    assert np.sum(np.isclose(single.eigenvalues, 2.0)) < 3  # what the check is for


def test_the_pure_operators_and_the_random_vector_helper():
    from flatlora_analysis.hessian import DeflatedOperator, ShiftedOperator, random_vectors

    spectrum = np.array([5.0, 2.0, 1.0, -1.0])
    op = DenseOperator(symmetric_with_spectrum(spectrum, seed=3))
    _, vectors = torch.linalg.eigh(op.matrix)
    top = vectors[:, -1]
    deflated = DeflatedOperator(op, [top])
    dense = torch.stack([deflated.matvec(e) for e in torch.eye(4, dtype=torch.float64)], dim=1)
    np.testing.assert_allclose(torch.linalg.eigvalsh(dense).numpy(), [-1.0, 0.0, 1.0, 2.0], atol=1e-12)
    shifted = ShiftedOperator(op, 5.0)
    v = random_vectors(4, generator=torch.Generator().manual_seed(0), unit=True)
    assert torch.allclose(shifted.matvec(v), op.matrix @ v - 5.0 * v) and deflated.n_products == op.n_products
    assert v.norm().item() == pytest.approx(1.0, abs=1e-15)
    signs = random_vectors(6, 3, generator=torch.Generator().manual_seed(1), kind="rademacher")
    assert signs.shape == (3, 6) and set(signs.unique().tolist()) <= {-1.0, 1.0}
    again = random_vectors(6, 3, generator=torch.Generator().manual_seed(1), kind="rademacher")
    assert torch.equal(signs, again)
    with pytest.raises(FlatLoraError, match="gaussian or rademacher"):
        random_vectors(3, generator=torch.Generator(), kind="uniform")
