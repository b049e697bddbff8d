"""Extreme eigenvalues of a symmetric operator: Lanczos, power iteration, and scipy's eigsh.

Operators need ``matvec``, ``dim``, ``dtype``, ``device`` and ``n_products`` (see
``flatlora_analysis.hessian.operator``). The Lanczos kernel (one run, its Ritz pairs, the
top-k check) is :mod:`flatlora_analysis.hessian.krylov`; vectors of its basis are float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.krylov import (
    WHICH,
    EigenEstimate,
    Lanczos,
    check_eigen_request,
    eigen_estimate,
    lanczos_run,
    start_toward,
    verify_top_k,
)
from flatlora_analysis.hessian.operators import ShiftedOperator, as_linear_operator, random_vectors

__all__ = [
    "WHICH",
    "EigenEstimate",
    "check_eigen_request",
    "eigsh_eigenvalues",
    "lanczos_eigenvalues",
    "lanczos_tridiagonal",
    "power_eigenvalues",
    "relative_error",
]


def lanczos_tridiagonal(
    op: Any, steps: int, v0: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``steps`` Lanczos steps with full reorthogonalisation from ``v0``.

    Returns (alpha, beta, Q): the diagonal (steps,), the off-diagonal (steps - 1,) of the
    tridiagonal T = Q^T A Q, and the basis Q (steps x dim, float64). An exhausted Krylov space
    (beta = 0) continues from a fresh random vector orthogonal to Q, so T stays exact.
    """
    it = Lanczos(op, v0, generator or torch.Generator().manual_seed(0))
    for _ in range(steps):
        it.step()
    return np.array(it.alpha), np.array(it.beta[: len(it.alpha) - 1]), it.basis()


def lanczos_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    which: str = "algebraic",
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    verify: bool = True,
    return_vectors: bool = False,
    toward: torch.Tensor | None = None,
) -> EigenEstimate:
    """The k largest eigenvalues (algebraic, or in magnitude) by Lanczos, with an error estimate.

    Each iteration costs one product. After each, the Ritz pairs (theta_i, y_i) of T have
    residual r_i = |beta_j s_{j,i}| = ||A y_i - theta_i y_i||, so an eigenvalue lies within
    min(r_i, r_i^2 / gap_i) of theta_i (gap_i: distance to the nearest other Ritz value).
    The run stops when that bound is below ``tol * |theta_i|`` for every wanted value, or
    when the whole space is spanned (exact), or at ``max_iter`` (``converged=False``).

    A Krylov space from one vector holds one direction of each eigenspace, so an exactly
    repeated eigenvalue appears once. With ``verify`` (k >= 2), a top-1 run on A deflated
    by the k Ritz vectors found checks for a missed value above the k-th, and takes it in
    if there is one (repeated until none is): about one top-1 run of extra products.

    ``toward`` (such as the clean gradient) starts the run from that direction plus the seeded
    random vector (:func:`~flatlora_analysis.hessian.krylov.start_toward`): fewer steps where
    it leans on the top eigenvectors, the same stopping rule.
    """
    check_eigen_request(op.dim, k, which, tol)
    max_iter = min(op.dim, max_iter or max(100, 4 * k + 40))
    start = op.n_products
    generator = torch.Generator().manual_seed(seed)
    v0 = (
        None
        if toward is None
        else start_toward(random_vectors(op.dim, generator=generator, device=op.device, unit=True), toward)
    )
    values, errors, vectors, converged, iterations = lanczos_run(op, k, which, tol, max_iter, generator, v0)
    checks, extra = (0, 0)
    if verify and converged:
        checks, extra = verify_top_k(op, values, errors, vectors, k, which, tol, max_iter, generator)
    return eigen_estimate(
        values,
        errors,
        vectors,
        converged,
        iterations + extra,
        op.n_products - start,
        return_vectors,
        {"solver": "lanczos", "which": which, "tol": tol, "max_iter": max_iter, "verified": checks > 0},
    )


def power_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    which: str = "algebraic",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> EigenEstimate:
    """PyHessian's deflated power iteration (largest in magnitude; stop on a relative change < tol).

    With ``which="algebraic"``, a negative dominant value triggers a second run on
    A - lambda I, whose dominant eigenvalues are the largest algebraic ones shifted.
    """
    if which not in WHICH:
        raise FlatLoraError(f"unknown which={which!r}: use algebraic or magnitude")
    if k > op.dim:
        raise FlatLoraError(f"k={k} is larger than the space ({op.dim} dimensions): ask for at most {op.dim}")
    start = op.n_products
    generator = torch.Generator().manual_seed(seed)
    values, vectors, converged = _deflated_power(op, k, tol, max_iter, generator)
    shift = 0.0
    if which == "algebraic" and values[0] < 0:
        shift = values[0]
        shifted, vectors, converged = _deflated_power(ShiftedOperator(op, shift), k, tol, max_iter, generator)
        values = [v + shift for v in shifted]
    order = np.argsort(-np.asarray(values), kind="stable")
    return EigenEstimate(
        eigenvalues=np.asarray(values, dtype=float)[order],
        products=op.n_products - start,
        converged=converged,
        iterations=op.n_products - start,
        errors=np.full(k, np.nan),
        eigenvectors=[vectors[i] for i in order],
        meta={
            "solver": "power",
            "which": "magnitude" if which == "magnitude" else "algebraic (shifted)",
            "tol": tol,
            "max_iter": max_iter,
            "shift": shift,
        },
    )


def _deflated_power(op, k, tol, max_iter, generator):
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    all_converged = True
    for _ in range(k):
        v = random_vectors(op.dim, generator=generator, device=op.device, unit=True)
        value, converged = None, False
        for _ in range(max_iter):
            for u in vectors:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = op.matvec(v).to(torch.float64)
            new = float(hv @ v)
            norm = hv.norm()
            v = hv / norm if norm > 0 else v
            if value is not None and abs(value - new) / (abs(value) + 1e-6) < tol:
                value, converged = new, True
                break
            value = new
        values.append(value)
        vectors.append(v)
        all_converged &= converged
    return values, vectors, all_converged


def eigsh_eigenvalues(
    op: Any, k: int = 1, *, which: str = "algebraic", tol: float = 1e-3, max_iter: int | None = None, seed: int = 0
) -> EigenEstimate:
    """scipy's ARPACK ``eigsh`` (implicitly restarted Lanczos) over the operator, on the host."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    if k >= op.dim:
        raise FlatLoraError(f"eigsh needs k < dimension ({op.dim}): ask for fewer, or use solver='lanczos'")
    start = op.n_products
    v0 = random_vectors(op.dim, generator=torch.Generator().manual_seed(seed), device="cpu", unit=True).numpy()
    try:
        values = eigsh(
            as_linear_operator(op),
            k=k,
            which="LA" if which == "algebraic" else "LM",
            tol=tol,
            maxiter=max_iter,
            v0=v0,
            return_eigenvectors=False,
        )
        converged = True
    except ArpackNoConvergence as err:
        values, converged = err.eigenvalues, False
    values = np.sort(np.asarray(values, dtype=float))[::-1]
    return EigenEstimate(
        eigenvalues=values,
        products=op.n_products - start,
        converged=converged,
        iterations=op.n_products - start,
        errors=np.full(len(values), np.nan),
        meta={"solver": "eigsh", "which": which, "tol": tol},
    )


def relative_error(estimate: float, reference: float) -> float:
    return abs(estimate - reference) / max(abs(reference), math.ulp(1.0))
