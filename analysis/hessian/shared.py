"""The curvature measures from shared products: one Lanczos group, one set of trace probes.

:func:`shared_curvature` computes what the report's four Hessian measures compute one by
one (top-k eigenvalues, tr(H), the SLQ density, each layer's top eigenvalue and trace), on
any symmetric operator with ``matmat``, sharing products where the mathematics allows:

1. **One lockstep group** (:mod:`~flatlora_analysis.hessian.lockstep`): the top-k run, SLQ
   runs 2..R and one top-1 run per layer (on its diagonal block H_ll) advance together,
   one block product per step. The top-k run starts from a normalised Rademacher vector and
   runs at least ``density_steps`` steps, so the first ``density_steps`` steps of its
   tridiagonal T are SLQ run 1 exactly (T_m of a run is the leading m x m block of any
   longer run's T). A top-k run started toward a direction (the clean gradient) is no SLQ
   run: run 1 then advances in the group from the Rademacher vector itself.
2. **The trace on the top-k run's Krylov basis** Q (m orthonormal vectors): as Hutch++ does
   with its random sketch, tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T)); the first term
   is sum(alpha), exact and free; the second is Hutchinson's on ``trace_samples // 3``
   Rademacher probes (Hutch++'s residual share). Q is built from a start vector drawn
   before and apart from the probes, so the estimate stays unbiased.
3. **Per-layer traces from the same probes**: tr(H_ll) = tr(D_l H) (D_l the 0/1 selector
   of layer l) = sum_j (D_l q_j)^T (H q_j) + E[(D_l g)^T H (I - QQ^T) g] with Rademacher g:
   the exact part from H q_j, rebuilt from the Lanczos coefficients, and the residual part
   from the products the trace already made. Each sample carries the off-diagonal blocks
   too (sum_{m != l} g_l^T H_lm r_m), so its variance exceeds a layer's own Hutchinson run:
   the standard errors are those of these samples (n = the probe count), stated as they are.

No product is made twice; :data:`SHARES` names what each result reuses (the report writes
it into report.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from flatlora_analysis.hessian.krylov import (
    EigenEstimate,
    check_eigen_request,
    eigen_estimate,
    start_toward,
    verify_top_k,
)
from flatlora_analysis.hessian.lockstep import Lane, run_lockstep
from flatlora_analysis.hessian.operators import matmat, random_vectors
from flatlora_analysis.hessian.trace import TraceEstimate, _stats

SHARES = {
    "density": "run 1 is the first steps of the top_eigenvalues Lanczos run; runs 2.. in lockstep with it",
    "trace": "sketch: the top_eigenvalues Krylov basis (exact part sum(alpha)); residual: Hutchinson probes",
    "layers.eigenvalues": "one top-1 Lanczos run per layer block, in lockstep with top_eigenvalues",
    "layers.traces": "the trace's residual products and the Krylov basis, read per layer",
}
OWN_DENSITY = "every run in lockstep with top_eigenvalues (its start toward the gradient is no SLQ run)"


@dataclass
class SharedCurvature:
    """What :func:`shared_curvature` found; ``None`` where a part was not asked for."""

    eigen: EigenEstimate
    trace: TraceEstimate | None
    nodes: np.ndarray | None  # (runs, steps)
    weights: np.ndarray | None
    layer_eigenvalues: np.ndarray | None
    layer_traces: np.ndarray | None
    layer_stderr: np.ndarray | None
    products: dict[str, int] = field(default_factory=dict)
    block_products: int = 0
    shares: dict[str, str] = field(default_factory=dict)


def _quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(alpha) == 1:
        return alpha, np.ones(1)
    theta, S = eigh_tridiagonal(alpha, beta)
    return theta, S[0] ** 2


def shared_curvature(
    op: Any,
    k: int = 1,
    *,
    which: str = "algebraic",
    tol: float = 1e-3,
    max_iter: int | None = None,
    verify: bool = True,
    trace_samples: int = 0,
    density_steps: int = 0,
    density_runs: int = 1,
    layers: list[torch.Tensor] | None = None,
    layer_names: list[str] | None = None,
    layer_tol: float = 1e-3,
    layer_max_iter: int | None = None,
    seed: int = 0,
    toward: torch.Tensor | None = None,
) -> SharedCurvature:
    """Top-k eigenvalues, and optionally tr(H), SLQ nodes/weights and per-layer curvature, from shared products.

    Args:
        op: a symmetric operator (``matvec``, ``matmat``, ``dim``, ``device``, ``n_products``).
        k, which, tol, max_iter, verify: the top-k Lanczos run (as ``lanczos_eigenvalues``).
        trace_samples: the trace's product budget as Hutch++ counts it; ``trace_samples // 3``
            (at least 2) residual probes are spent (0: no trace, no per-layer traces).
        density_steps, density_runs: SLQ (0 steps: none).
        layers: each layer's full-space coordinates (an index tensor), for per-layer
            curvature; None for none.
        layer_names: the layers' groups: their runs then take pruned block products from
            ``op.layer_matvec`` (cheaper than block columns on a CPU); None puts them in the
            block product. Each layer's run starts where ``lanczos_eigenvalues(seed=seed)``
            on its block would, so both give the same value to round-off.
        layer_tol, layer_max_iter: the per-layer top-1 runs.
        seed: of every random draw.
        toward: a direction the top-k run starts toward (the clean gradient: fewer steps), from
            the unit sum of it and the Rademacher vector (:func:`start_toward`); SLQ run 1 is
            then a lane of its own from that Rademacher vector, as the density needs.

    Returns:
        :class:`SharedCurvature`; ``products`` counts per part (the top-k run counts the steps
        SLQ run 1 reuses once).
    """
    check_eigen_request(op.dim, k, which, min(tol, layer_tol))
    generator = torch.Generator().manual_seed(seed)
    dim, device = op.dim, op.device
    max_iter = min(dim, max_iter or max(100, 4 * k + 40))
    rademacher = random_vectors(dim, generator=generator, device=device, kind="rademacher", unit=True)
    if toward is None:  # SLQ run 1 is the top-k run's first steps
        top = Lane(rademacher, k=k, which=which, tol=tol, max_iter=max_iter, min_steps=density_steps,
                   generator=generator)  # fmt: skip
        slq_lanes = []
    else:  # a start toward the gradient is no SLQ start: run 1 goes from the Rademacher vector itself
        top = Lane(start_toward(rademacher, toward), k=k, which=which, tol=tol, max_iter=max_iter, generator=generator)
        slq_lanes = [Lane(rademacher, steps=density_steps)] if density_steps else []
    slq_lanes += [
        Lane(random_vectors(dim, generator=generator, device=device, kind="rademacher", unit=True), steps=density_steps)
        for _ in range(density_runs - 1 if density_steps else 0)
    ]
    layer_lanes = []
    for i, index in enumerate(layers or []):
        own = torch.Generator().manual_seed(seed)  # as a per-layer lanczos_eigenvalues run draws
        layer_lanes.append(
            Lane(
                random_vectors(len(index), generator=own, device=device, unit=True),
                index=index,
                tol=layer_tol,
                max_iter=min(len(index), layer_max_iter or 100),
                group=None if layer_names is None else layer_names[i],
                generator=own,
            )
        )
    calls = run_lockstep(op, [top, *slq_lanes, *layer_lanes])
    values, errors, vectors = top.eigen()
    iterations = len(top.it.alpha)
    checks = extra = 0
    if verify and top.converged:
        before = op.n_products
        checks, extra = verify_top_k(op, values, errors, vectors, k, which, tol, max_iter, generator)
        calls += op.n_products - before
    eigen = eigen_estimate(
        values,
        errors,
        vectors,
        top.converged,
        iterations + extra,
        iterations + extra,
        False,
        {"solver": "lanczos", "which": which, "tol": tol, "max_iter": max_iter, "verified": checks > 0},
    )
    products = {"top_eigenvalues": iterations + extra}
    nodes = weights = None
    if density_steps:
        density_lanes = [top, *slq_lanes] if toward is None else slq_lanes
        runs = [_quadrature(*lane.tridiagonal(density_steps)) for lane in density_lanes]
        nodes, weights = np.array([r[0] for r in runs]), np.array([r[1] for r in runs])
        products["density"] = density_steps * len(slq_lanes)  # run 1 is counted with the top-k run unless its own
    layer_eigs = np.array([lane.eigen()[0][0] for lane in layer_lanes]) if layers else None
    if layers:
        products["layers"] = sum(len(lane.it.alpha) for lane in layer_lanes)
    trace = layer_traces = layer_se = None
    if trace_samples:
        Q = top.it.basis()  # (m, dim)
        exact = float(np.sum(top.it.alpha))
        n_res = max(2, trace_samples // 3)
        G = random_vectors(dim, n_res, generator=generator, device=device, kind="rademacher").T  # (dim, n)
        R = G - Q.T @ (Q @ G)
        HR = matmat(op, R).to(torch.float64)
        calls += 1
        samples = (R * HR).sum(0).cpu().numpy()
        mean, se = _stats(samples)
        trace = TraceEstimate(
            exact + mean,
            se,
            n_res,
            samples,
            True,
            {
                "method": "hutch++",
                "sketch": "lanczos basis",
                "sketch_size": Q.shape[0],
                "residual_probes": n_res,
                "exact_part": exact,
            },
        )
        products["trace"] = n_res
        if layers:
            # sum_j (D_l q_j)^T (H q_j), H q_j rebuilt from the Lanczos coefficients, one layer at a time
            per_exact = np.array([float((Q[:, idx] * top.it.products(idx)).sum()) for idx in layers])
            per_samples = np.stack([(G[idx] * HR[idx]).sum(0).cpu().numpy() for idx in layers])  # (L, n)
            means, ses = _stats(per_samples)
            layer_traces, layer_se = per_exact + means, ses
    shares = {key: SHARES[key] for key in SHARES if _asked(key, trace_samples, density_steps, layers)}
    if toward is not None and "density" in shares:
        shares["density"] = OWN_DENSITY
    return SharedCurvature(
        eigen,
        trace,
        nodes,
        weights,
        layer_eigs,
        layer_traces,
        layer_se,
        products,
        calls,
        shares,
    )


def _asked(key: str, trace_samples: int, density_steps: int, layers) -> bool:
    if key == "density":
        return bool(density_steps)
    if key == "trace":
        return bool(trace_samples)
    if key == "layers.traces":
        return bool(layers) and bool(trace_samples)
    return bool(layers)
