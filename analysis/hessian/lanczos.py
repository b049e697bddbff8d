"""Extreme eigenvalues of a symmetric operator: Lanczos, power iteration, and scipy's eigsh.

Operators need ``matvec``, ``dim``, ``dtype``, ``device`` and ``n_products`` (see
``flatlora_analysis.hessian.operator``). Vectors of the Krylov basis are kept in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.operators import DeflatedOperator, ShiftedOperator, as_linear_operator, random_vectors

WHICH = ("algebraic", "magnitude")


@dataclass
class EigenEstimate:
    """Eigenvalues (descending), products used, convergence, and per-value error estimates."""

    eigenvalues: np.ndarray
    products: int
    converged: bool
    iterations: int
    errors: np.ndarray
    eigenvectors: list[torch.Tensor] = field(default_factory=list, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values, in descending order of the value."""
    order = np.argsort(-np.abs(theta) if which == "magnitude" else -theta, kind="stable")[:k]
    return order[np.argsort(-theta[order], kind="stable")]


def lanczos_tridiagonal(
    op: Any, steps: int, v0: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``steps`` Lanczos steps with full reorthogonalisation from ``v0``.

    Returns (alpha, beta, Q): the diagonal (steps,), the off-diagonal (steps - 1,) of the
    tridiagonal T = Q^T A Q, and the basis Q (steps x dim, float64). An exhausted Krylov space
    (beta = 0) continues from a fresh random vector orthogonal to Q, so T stays exact.
    """
    it = _Lanczos(op, v0, generator or torch.Generator().manual_seed(0))
    for _ in range(steps):
        it.step()
    return np.array(it.alpha), np.array(it.beta[: len(it.alpha) - 1]), it.basis()


class _Lanczos:
    """Incremental Lanczos with full (twice) reorthogonalisation against the whole basis.

    A step is :meth:`current` (the vector to multiply) then :meth:`feed` (its product), so
    several runs can share one block product (:mod:`flatlora_analysis.hessian.lockstep`);
    :meth:`step` does both with ``op.matvec``. ``coefs[j]`` keeps the reorthogonalisation
    coefficients of step j, so that A q_j = Q_{<=j}^T coefs[j] + beta_j q_{j+1} is known
    without storing the products (:meth:`products`).
    """

    def __init__(self, op: Any, v0: torch.Tensor, generator: torch.Generator) -> None:
        self.op, self.generator = op, generator
        self.dim = op.dim
        self.Q = torch.zeros((min(self.dim, 64), self.dim), dtype=torch.float64, device=op.device)
        v0 = v0.to(device=op.device, dtype=torch.float64)
        self.Q[0] = v0 / v0.norm()
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.coefs: list[torch.Tensor] = []
        self.exhausted = False

    def basis(self) -> torch.Tensor:
        return self.Q[: len(self.alpha)]

    def _grow(self) -> None:
        bigger = torch.zeros((min(self.dim, 2 * self.Q.shape[0]), self.dim), dtype=torch.float64, device=self.Q.device)
        bigger[: self.Q.shape[0]] = self.Q
        self.Q = bigger

    def current(self) -> torch.Tensor:
        """The basis vector whose product the next :meth:`feed` takes."""
        return self.Q[len(self.alpha)]

    def step(self) -> None:
        self.feed(self.op.matvec(self.current()))

    def feed(self, w: torch.Tensor) -> None:
        """Take w = A q_j for the current q_j: alpha_j, beta_j and the next basis vector."""
        j = len(self.alpha)
        q = self.Q[j]
        w = w.to(device=q.device, dtype=torch.float64)
        a = float(q @ w)
        self.alpha.append(a)
        basis = self.Q[: j + 1]
        coef = torch.zeros(j + 1, dtype=torch.float64, device=q.device)
        for _ in range(2):  # twice is enough (Kahan), keeps T's eigenvalues exact to rounding
            c = basis @ w
            w = w - basis.T @ c
            coef += c
        self.coefs.append(coef)
        b = float(w.norm())
        self.beta.append(b)
        if j + 1 >= self.dim:
            return
        if j + 1 >= self.Q.shape[0]:
            self._grow()
        scale = max(abs(a), b, 1e-300)
        if b <= 1e-10 * scale:  # an invariant subspace: continue from a fresh direction
            self.beta[-1] = 0.0
            self.exhausted = True
            r = random_vectors(self.dim, generator=self.generator, device=self.Q.device, unit=True)
            for _ in range(2):
                r = r - basis.T @ (basis @ r)
            self.Q[j + 1] = r / r.norm()
        else:
            self.Q[j + 1] = w / b

    def products(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """A q_j for every basis vector, rebuilt from the coefficients (to rounding), as rows (m x dim).

        ``index``: only those coordinates (m x len(index)), so a caller can go layer by layer
        without holding m full-length products.
        """
        m = len(self.alpha)
        rows = min(m + 1, self.dim)
        C = torch.zeros((m, rows), dtype=torch.float64, device=self.Q.device)
        for j, coef in enumerate(self.coefs):
            C[j, : j + 1] = coef
            if j + 1 < rows:
                C[j, j + 1] = self.beta[j]
        Q = self.Q[:rows] if index is None else self.Q[:rows, index]
        return C @ Q

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values and the last components of their unit Ritz vectors in the basis."""
        alpha = np.array(self.alpha)
        if len(alpha) == 1:
            return alpha, np.ones((1, 1))
        theta, S = eigh_tridiagonal(alpha, np.array(self.beta[: len(alpha) - 1]))
        return theta, S


def _check_ritz(it: _Lanczos, k: int, which: str, tol: float):
    """(indices of the wanted Ritz values, their error bounds, converged) after the latest step."""
    theta, S = it.ritz()
    idx = _select(theta, k, which)
    m = len(it.alpha)
    if m == it.dim:
        return theta, S, idx, np.zeros(len(idx)), True
    resid = np.abs(it.beta[m - 1] * S[-1, idx])
    gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) if m > 1 else np.inf for i in idx])
    errors = np.minimum(resid, np.where(gaps > 0, resid**2 / np.maximum(gaps, 1e-300), np.inf))
    # One step is never enough to judge (a single Ritz value has no gap to bound by).
    converged = m > max(1, k) and bool(np.all(errors <= tol * np.maximum(np.abs(theta[idx]), 1e-30)))
    return theta, S, idx, errors, converged


def _ritz_pairs(it: _Lanczos, theta, S, idx):
    Q = it.basis()
    return list(theta[idx].astype(float)), [torch.from_numpy(S[:, i]).to(Q) @ Q for i in idx]


def _lanczos_run(op, k, which, tol, max_iter, generator, v0=None):
    """One Lanczos run to convergence: (values, errors, vectors, converged, iterations)."""
    start = random_vectors(op.dim, generator=generator, device=op.device, unit=True) if v0 is None else v0
    it = _Lanczos(op, start, generator)
    converged = False
    idx, errors, theta, S = np.arange(1), np.full(k, np.inf), np.zeros(1), np.ones((1, 1))
    while len(it.alpha) < max_iter:
        it.step()
        if len(it.alpha) < k:
            continue
        theta, S, idx, errors, converged = _check_ritz(it, k, which, tol)
        if converged:
            break
    values, vectors = _ritz_pairs(it, theta, S, idx)
    return values, list(errors), vectors, converged, len(it.alpha)


def check_eigen_request(dim: int, k: int, which: str, tol: float) -> None:
    """Refuse, in one line each, an eigenvalue request a Lanczos run cannot serve."""
    if which not in WHICH:
        raise FlatLoraError(f"unknown which={which!r}: use algebraic or magnitude")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlatLoraError(f"k={k!r}: pass an integer >= 1")
    if k > dim:
        raise FlatLoraError(f"k={k} is larger than the space ({dim} dimensions): ask for at most {dim}")
    if not tol > 0:
        raise FlatLoraError(f"tol must be > 0, got {tol}")


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
    """
    check_eigen_request(op.dim, k, which, tol)
    max_iter = min(op.dim, max_iter or max(100, 4 * k + 40))
    start = op.n_products
    generator = torch.Generator().manual_seed(seed)
    values, errors, vectors, converged, iterations = _lanczos_run(op, k, which, tol, max_iter, generator)
    checks, extra = (0, 0)
    if verify and converged:
        checks, extra = _verify(op, values, errors, vectors, k, which, tol, max_iter, generator)
    return _estimate(
        values,
        errors,
        vectors,
        converged,
        iterations + extra,
        op.n_products - start,
        return_vectors,
        {"solver": "lanczos", "which": which, "tol": tol, "max_iter": max_iter, "verified": checks > 0},
    )


def _verify(op, values, errors, vectors, k, which, tol, max_iter, generator) -> tuple[int, int]:
    """Top-1 runs on A deflated by the found vectors, taking in a missed value (lists updated in place).

    Returns (checks run, their iterations).
    """
    checks = iterations = 0
    while 2 <= k < op.dim - len(vectors) and checks < k:
        checks += 1
        extra, extra_err, extra_vec, ok, n = _lanczos_run(
            DeflatedOperator(op, vectors), 1, which, tol, max_iter, generator
        )
        iterations += n
        key = (lambda x: abs(x)) if which == "magnitude" else (lambda x: x)
        weakest = min(range(k), key=lambda i: key(values[i]))
        if not (ok and key(extra[0]) - key(values[weakest]) > tol * abs(values[weakest]) + extra_err[0]):
            break
        values[weakest], errors[weakest], vectors[weakest] = extra[0], extra_err[0], extra_vec[0]
    return checks, iterations


def _estimate(values, errors, vectors, converged, iterations, products, return_vectors, meta) -> EigenEstimate:
    order = np.argsort(-np.asarray(values), kind="stable")
    return EigenEstimate(
        eigenvalues=np.asarray(values, dtype=float)[order],
        products=products,
        converged=converged,
        iterations=iterations,
        errors=np.asarray(errors, dtype=float)[order],
        eigenvectors=[vectors[i] for i in order] if return_vectors else [],
        meta=meta,
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
