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
from flatlora_analysis.hessian.operators import matmat, random_vectors

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass
class TraceEstimate:
    trace: float
    stderr: float
    products: int
    samples: np.ndarray
    converged: bool
    meta: dict[str, Any] = field(default_factory=dict)


def _stats(samples: np.ndarray, axis: int = -1):
    """(mean, standard error) over ``axis``, inf with one sample: floats for a 1-D array, arrays otherwise."""
    n = samples.shape[axis]
    mean = samples.mean(axis=axis)
    se = samples.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.shape(mean), math.inf)
    return (float(mean), float(se)) if samples.ndim == 1 else (mean, se)


def _quadratic_forms(op: Any, V: torch.Tensor, batched: bool) -> list[float]:
    """v^T A v for each row v of V (k, dim): one block product, or k single ones."""
    if batched:
        return (V * matmat(op, V.T).T.to(torch.float64)).sum(1).tolist()
    return [float(v @ op.matvec(v).to(torch.float64)) for v in V]


def hutchinson(
    op: Any,
    samples: int = 100,
    *,
    tol: float | None = None,
    min_samples: int = 10,
    seed: int = 0,
    batched: bool = False,
    block: int = 8,
) -> TraceEstimate:
    """Hutchinson's estimator over up to ``samples`` Rademacher probes.

    With ``tol``, stops once at least ``min_samples`` probes give stderr <= tol * |mean|.
    ``batched``: the probes go through ``matmat`` ``block`` at a time (all at once without
    ``tol``); the estimate is the same to round-off (with ``tol`` it stops at the same probe,
    the rest of its block spent).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise FlatLoraError(f"samples={samples!r}: pass an integer >= 2 (a standard error needs two)")
    generator = torch.Generator().manual_seed(seed)
    start = op.n_products
    values: list[float] = []
    converged = tol is None
    step = (samples if tol is None else max(1, block)) if batched else 1
    while len(values) < samples and not (converged and tol is not None):
        n = min(step, samples - len(values))
        V = torch.cat(
            [random_vectors(op.dim, 1, generator=generator, device=op.device, kind="rademacher") for _ in range(n)]
        )  # fmt: skip  (one draw a probe: the same probes as unbatched)
        for value in _quadratic_forms(op, V, batched):
            values.append(value)
            if tol is not None and len(values) >= max(2, min_samples):
                mean, se = _stats(np.array(values))
                if se <= tol * abs(mean):
                    converged = True
                    break
    arr = np.array(values)
    mean, se = _stats(arr)
    return TraceEstimate(mean, se, op.n_products - start, arr, converged, {"method": "hutchinson", "tol": tol})


def hutchpp(op: Any, samples: int = 99, *, seed: int = 0, batched: bool = False) -> TraceEstimate:
    """Hutch++ with ``samples`` products in all (a third each for sketch, projection and residual).

    ``batched``: each third is one ``matmat`` (the same estimate to round-off).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 6:
        raise FlatLoraError(f"samples={samples!r}: Hutch++ needs an integer >= 6 products")
    generator = torch.Generator().manual_seed(seed)
    start = op.n_products
    m = samples // 3
    m = min(m, op.dim)
    S = random_vectors(op.dim, m, generator=generator, device=op.device, kind="rademacher")
    if batched:
        AS = matmat(op, S.T).T.to(torch.float64)
    else:
        AS = torch.stack([op.matvec(s).to(torch.float64) for s in S])
    Q, _ = torch.linalg.qr(AS.T)  # (dim, m), orthonormal columns
    exact = float(sum(_quadratic_forms(op, Q.T.contiguous(), batched)))
    n_res = max(2, samples - 2 * m)
    G = random_vectors(op.dim, n_res, generator=generator, device=op.device, kind="rademacher")
    R = G - (G @ Q) @ Q.T
    arr = np.array(_quadratic_forms(op, R, batched))
    mean, se = _stats(arr)
    return TraceEstimate(
        exact + mean,
        se,
        op.n_products - start,
        arr,
        True,
        {"method": "hutch++", "sketch": m, "residual_probes": n_res, "exact_part": exact},
    )
