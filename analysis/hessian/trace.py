"""Trace of a symmetric operator: Hutchinson and Hutch++, each with a standard error.

Hutchinson averages v^T A v over Rademacher v. Hutch++ (Meyer, Musco, Musco, Woodruff 2021)
spends a third of its products on a sketch Q of A's dominant range, takes tr(Q^T A Q)
exactly and runs Hutchinson on the deflated rest (I - QQ^T) A (I - QQ^T), whose variance
is far smaller when the spectrum decays. A standard error is always reported, and no run
stops on a variance-blind test: ``tol`` stops Hutchinson only once stderr <= tol * |trace|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.operators import random_vectors

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass
class TraceEstimate:
    trace: float
    stderr: float
    products: int
    samples: np.ndarray
    converged: bool
    meta: dict[str, Any] = field(default_factory=dict)


def _stats(samples: np.ndarray) -> tuple[float, float]:
    mean = float(samples.mean())
    se = float(samples.std(ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    return mean, se


def hutchinson(
    op: Any, samples: int = 100, *, tol: float | None = None, min_samples: int = 10, seed: int = 0
) -> TraceEstimate:
    """Hutchinson's estimator over up to ``samples`` Rademacher probes.

    With ``tol``, stops once at least ``min_samples`` probes give stderr <= tol * |mean|.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise FlatLoraError(f"samples={samples!r}: pass an integer >= 2 (a standard error needs two)")
    generator = torch.Generator().manual_seed(seed)
    start = op.n_products
    values: list[float] = []
    converged = tol is None
    for _ in range(samples):
        v = random_vectors(op.dim, 1, generator=generator, device=op.device, kind="rademacher")[0]
        values.append(float(v @ op.matvec(v).to(torch.float64)))
        if tol is not None and len(values) >= max(2, min_samples):
            mean, se = _stats(np.array(values))
            if se <= tol * abs(mean):
                converged = True
                break
    arr = np.array(values)
    mean, se = _stats(arr)
    return TraceEstimate(mean, se, op.n_products - start, arr, converged, {"method": "hutchinson", "tol": tol})


def hutchpp(op: Any, samples: int = 99, *, seed: int = 0) -> TraceEstimate:
    """Hutch++ with ``samples`` products in all (a third each for sketch, projection and residual)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 6:
        raise FlatLoraError(f"samples={samples!r}: Hutch++ needs an integer >= 6 products")
    generator = torch.Generator().manual_seed(seed)
    start = op.n_products
    m = samples // 3
    m = min(m, op.dim)
    S = random_vectors(op.dim, m, generator=generator, device=op.device, kind="rademacher")
    AS = torch.stack([op.matvec(s).to(torch.float64) for s in S])
    Q, _ = torch.linalg.qr(AS.T)  # (dim, m), orthonormal columns
    exact = sum(float(Q[:, i] @ op.matvec(Q[:, i]).to(torch.float64)) for i in range(Q.shape[1]))
    n_res = max(2, samples - 2 * m)
    G = random_vectors(op.dim, n_res, generator=generator, device=op.device, kind="rademacher")
    residual = []
    for g in G:
        r = g - Q @ (Q.T @ g)
        residual.append(float(r @ op.matvec(r).to(torch.float64)))
    arr = np.array(residual)
    mean, se = _stats(arr)
    return TraceEstimate(
        exact + mean,
        se,
        op.n_products - start,
        arr,
        True,
        {"method": "hutch++", "sketch": m, "residual_probes": n_res, "exact_part": exact},
    )
