"""Spectral density by stochastic Lanczos quadrature (SLQ, Lin, Saad and Yang 2016; Ghorbani et al. 2019).

Each run: Lanczos from a normalised Rademacher vector, T = tridiagonal (m x m), its
eigendecomposition by a symmetric solver (``eigh``): nodes are T's eigenvalues, weights the
squared first components of its eigenvectors (real, non-negative, summing to 1). Runs are
averaged; a Gaussian of width sigma turns nodes and weights into a density on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.lanczos import lanczos_tridiagonal
from flatlora_analysis.hessian.operators import random_vectors


@dataclass
class Quadrature:
    nodes: np.ndarray  # (runs, m)
    weights: np.ndarray  # (runs, m), each row sums to 1
    products: int
    meta: dict[str, Any] = field(default_factory=dict)


def slq(op: Any, steps: int = 40, runs: int = 1, *, seed: int = 0, batched: bool = False) -> Quadrature:
    """Nodes and weights of ``runs`` SLQ runs of ``steps`` Lanczos steps each.

    ``batched``: the runs advance in lockstep, one block product a step
    (:mod:`~flatlora_analysis.hessian.lockstep`); the start vectors are drawn first, so the
    nodes equal the sequential runs' to round-off unless a run exhausts its Krylov space.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FlatLoraError(f"steps={steps!r}: pass an integer >= 1")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise FlatLoraError(f"runs={runs!r}: pass an integer >= 1")
    steps = min(steps, op.dim)
    generator = torch.Generator().manual_seed(seed)
    start = op.n_products
    nodes, weights = [], []
    if batched:
        from flatlora_analysis.hessian.lockstep import Lane, run_lockstep

        lanes = [
            Lane(random_vectors(op.dim, generator=generator, device=op.device, kind="rademacher", unit=True),
                 steps=steps, generator=generator)
            for _ in range(runs)
        ]  # fmt: skip
        run_lockstep(op, lanes)
        tridiagonals = [lane.tridiagonal() for lane in lanes]
    else:
        tridiagonals = []
        for _ in range(runs):
            v0 = random_vectors(op.dim, generator=generator, device=op.device, kind="rademacher", unit=True)
            tridiagonals.append(lanczos_tridiagonal(op, steps, v0, generator=generator)[:2])
    for alpha, beta in tridiagonals:
        if len(alpha) == 1:
            theta, S = alpha, np.ones((1, 1))
        else:
            theta, S = eigh_tridiagonal(alpha, beta)
        nodes.append(theta)
        weights.append(S[0] ** 2)
    return Quadrature(np.array(nodes), np.array(weights), op.n_products - start, {"steps": steps, "runs": runs})


def broadened_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    points: int = 512,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(grid, density, sigma): sum over runs and nodes of w * N(x; node, sigma^2), averaged over runs.

    By default the grid spans the nodes with a margin and sigma is 1% of that span (at least
    a tiny positive width), so the density integrates to about 1.
    """
    flat_nodes, flat_weights = nodes.reshape(-1), weights.reshape(-1) / nodes.shape[0]
    lo, hi = float(flat_nodes.min()), float(flat_nodes.max())
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sigma = float(sigma) if sigma is not None else 0.01 * span
    if grid is None:
        grid = np.linspace(lo - 0.1 * span - 3 * sigma, hi + 0.1 * span + 3 * sigma, points)
    diff = (grid[:, None] - flat_nodes[None, :]) / sigma
    density = (flat_weights[None, :] * np.exp(-0.5 * diff**2)).sum(1) / (sigma * np.sqrt(2 * np.pi))
    return grid, density, sigma
