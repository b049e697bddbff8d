"""The Lanczos kernel: an incremental Lanczos run, its Ritz pairs and error bounds, and the top-k check.

:func:`flatlora_analysis.hessian.lanczos.lanczos_eigenvalues` runs it on one operator,
:mod:`flatlora_analysis.hessian.lockstep` runs several in step on one block product and
:mod:`flatlora_analysis.hessian.shared` reads every Hessian measure off it. Operators need
``matvec``, ``dim``, ``dtype``, ``device`` and ``n_products``; basis vectors are kept in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.operators import DeflatedOperator, random_vectors

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


def select_ritz(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values, in descending order of the value."""
    order = np.argsort(-np.abs(theta) if which == "magnitude" else -theta, kind="stable")[:k]
    return order[np.argsort(-theta[order], kind="stable")]


class Lanczos:
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
        """The basis vectors taken so far, as rows (steps x dim, float64)."""
        return self.Q[: len(self.alpha)]

    def _grow(self) -> None:
        bigger = torch.zeros((min(self.dim, 2 * self.Q.shape[0]), self.dim), dtype=torch.float64, device=self.Q.device)
        bigger[: self.Q.shape[0]] = self.Q
        self.Q = bigger

    def current(self) -> torch.Tensor:
        """The basis vector whose product the next :meth:`feed` takes."""
        return self.Q[len(self.alpha)]

    def step(self) -> None:
        """One step: the current vector's product by ``op.matvec``, fed back."""
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


def check_ritz(
    it: Lanczos, k: int, which: str, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The wanted Ritz values of a run after its latest step, with their error bounds.

    A Ritz value theta_i lies within min(r_i, r_i^2 / gap_i) of an eigenvalue, r_i =
    |beta_m s_{m,i}| its residual and gap_i the distance to the nearest other Ritz value.

    Args:
        it: the Lanczos run.
        k: how many values are wanted.
        which: ``algebraic`` (largest values) or ``magnitude`` (largest |values|).
        tol: the relative accuracy that makes a value converged.

    Returns:
        (theta, S, idx, errors, converged): every Ritz value, the eigenvectors of T, the
        indices of the wanted values (descending), their error bounds, and whether every
        bound is within ``tol`` of its value (never after a single step).
    """
    theta, S = it.ritz()
    idx = select_ritz(theta, k, which)
    m = len(it.alpha)
    if m == it.dim:
        return theta, S, idx, np.zeros(len(idx)), True
    resid = np.abs(it.beta[m - 1] * S[-1, idx])
    gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) if m > 1 else np.inf for i in idx])
    errors = np.minimum(resid, np.where(gaps > 0, resid**2 / np.maximum(gaps, 1e-300), np.inf))
    # One step is never enough to judge (a single Ritz value has no gap to bound by).
    converged = m > max(1, k) and bool(np.all(errors <= tol * np.maximum(np.abs(theta[idx]), 1e-30)))
    return theta, S, idx, errors, converged


def ritz_pairs(
    it: Lanczos, theta: np.ndarray, S: np.ndarray, idx: np.ndarray
) -> tuple[list[float], list[torch.Tensor]]:
    """The Ritz values ``theta[idx]`` and their Ritz vectors in the full space.

    Args:
        it: the Lanczos run.
        theta, S, idx: as :func:`check_ritz` returns them.

    Returns:
        (values, vectors): floats, and float64 vectors of length ``it.dim``.
    """
    Q = it.basis()
    return list(theta[idx].astype(float)), [torch.from_numpy(S[:, i]).to(Q) @ Q for i in idx]


def lanczos_run(
    op: Any,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    v0: torch.Tensor | None = None,
) -> tuple[list[float], list[float], list[torch.Tensor], bool, int]:
    """One Lanczos run on ``op`` until the k wanted values converge (:func:`check_ritz`) or ``max_iter`` steps.

    Args:
        op: the operator.
        k, which, tol: the wanted values and their relative accuracy.
        max_iter: the step cap.
        generator: draws the start vector (unless ``v0``) and any restart of an exhausted space.
        v0: the start vector.

    Returns:
        (values, errors, vectors, converged, iterations).
    """
    start = random_vectors(op.dim, generator=generator, device=op.device, unit=True) if v0 is None else v0
    it = Lanczos(op, start, generator)
    converged = False
    idx, errors, theta, S = np.arange(1), np.full(k, np.inf), np.zeros(1), np.ones((1, 1))
    while len(it.alpha) < max_iter:
        it.step()
        if len(it.alpha) < k:
            continue
        theta, S, idx, errors, converged = check_ritz(it, k, which, tol)
        if converged:
            break
    values, vectors = ritz_pairs(it, theta, S, idx)
    return values, list(errors), vectors, converged, len(it.alpha)


def start_toward(random: torch.Tensor, toward: torch.Tensor | None) -> torch.Tensor:
    """A Lanczos start: the unit sum of a seeded random unit vector and the unit ``toward`` direction.

    ``toward`` is a direction expected to lie near the top eigenvectors, such as the clean
    gradient (which concentrates in the top Hessian eigenspace: Gur-Ari et al. 2018): the run
    then meets the top eigenvalue in fewer steps. The random half keeps a component along
    every eigenvector (almost surely), so no eigenvalue is missed because ``toward`` is
    orthogonal to it.

    Args:
        random: a random unit vector, shape (dim,), float64.
        toward: a direction of the space, shape (dim,); None, zero or not finite: ``random`` alone.

    Returns:
        A unit float64 vector of shape (dim,).
    """
    if toward is None:
        return random
    toward = toward.to(device=random.device, dtype=torch.float64)
    norm = toward.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return random
    mixed = toward / norm + random
    return mixed / mixed.norm()


def check_eigen_request(dim: int, k: int, which: str, tol: float) -> None:
    """Refuse, in one line each, an eigenvalue request a Lanczos run cannot serve.

    Raises:
        FlatLoraError: an unknown ``which``, ``k`` not a whole number in [1, dim], ``tol`` <= 0.
    """
    if which not in WHICH:
        raise FlatLoraError(f"unknown which={which!r}: use algebraic or magnitude")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlatLoraError(f"k={k!r}: pass an integer >= 1")
    if k > dim:
        raise FlatLoraError(f"k={k} is larger than the space ({dim} dimensions): ask for at most {dim}")
    if not tol > 0:
        raise FlatLoraError(f"tol must be > 0, got {tol}")


def verify_top_k(
    op: Any,
    values: list[float],
    errors: list[float],
    vectors: list[torch.Tensor],
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Top-1 runs on A deflated by the found vectors, taking in a missed value (lists updated in place).

    A Krylov space from one vector holds one direction of each eigenspace, so an exactly
    repeated eigenvalue appears once; each check (k >= 2) looks for a value above the weakest
    found and swaps it in, until a check finds none.

    Args:
        op: the operator.
        values, errors, vectors: the k values found, their error bounds and Ritz vectors.
        k, which, tol, max_iter, generator: as the run that found them.

    Returns:
        (checks run, their iterations).
    """
    checks = iterations = 0
    while 2 <= k < op.dim - len(vectors) and checks < k:
        checks += 1
        extra, extra_err, extra_vec, ok, n = lanczos_run(
            DeflatedOperator(op, vectors), 1, which, tol, max_iter, generator
        )
        iterations += n
        key = (lambda x: abs(x)) if which == "magnitude" else (lambda x: x)
        weakest = min(range(k), key=lambda i: key(values[i]))
        if not (ok and key(extra[0]) - key(values[weakest]) > tol * abs(values[weakest]) + extra_err[0]):
            break
        values[weakest], errors[weakest], vectors[weakest] = extra[0], extra_err[0], extra_vec[0]
    return checks, iterations


def eigen_estimate(
    values: list[float],
    errors: list[float],
    vectors: list[torch.Tensor],
    converged: bool,
    iterations: int,
    products: int,
    return_vectors: bool,
    meta: dict[str, Any],
) -> EigenEstimate:
    """The values found, sorted descending with their errors (and vectors, if ``return_vectors``).

    Args:
        values, errors, vectors: as :func:`lanczos_run` returns them.
        converged, iterations, products, meta: recorded as given.
        return_vectors: keep the Ritz vectors in the estimate.
    """
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
