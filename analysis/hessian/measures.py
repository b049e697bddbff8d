"""The Hessian measures on a model: top eigenvalues, trace, spectral density, per-layer curvature.

Each builds a :class:`~flatlora_analysis.hessian.operator.HessianOperator` on the probe set in a space
and runs an algorithm of this package on it (or, with ``backend="pyhessian"``, the same
quantity through the ``pyhessian`` package). The model is left bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora.versions import package_versions
from flatlora_analysis.guard import measuring
from flatlora_analysis.hessian.density import broadened_density, slq
from flatlora_analysis.hessian.lanczos import eigsh_eigenvalues, lanczos_eigenvalues, power_eigenvalues
from flatlora_analysis.hessian.operator import HessianOperator
from flatlora_analysis.hessian.result_types import DensityResult, EigenResult, LayerCurvatureResult, TraceResult
from flatlora_analysis.hessian.trace import TRACE_METHODS, hutchinson, hutchpp
from flatlora_analysis.objective import ModelObjective
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.spaces import build_space

SOLVERS = ("lanczos", "eigsh", "power")
BACKENDS = ("flatlora", "pyhessian")
Progress = Callable[[int, int], None]


def _check(choice: str, options: tuple[str, ...], what: str) -> None:
    if choice not in options:
        raise FlatLoraError(f"unknown {what} {choice!r}: use one of {', '.join(options)}")


@contextlib.contextmanager
def hessian_operator(
    model: nn.Module,
    probe: ProbeSet,
    space: str = "lora",
    *,
    hvp: str = "auto",
    device: str | torch.device | None = None,
    groups: list[str] | None = None,
) -> Iterator[HessianOperator]:
    """The Hessian of the probe-set loss in ``space`` as an operator, for the body of a ``with``.

    The model is in eval mode on ``device`` meanwhile, and restored (and verified) after.
    """
    with measuring(model, device) as dev:
        sp = build_space(model, space)
        if groups is not None:
            sp = sp.restrict(groups)
        with HessianOperator(ModelObjective(model, probe, sp, dev), hvp) as op:
            yield op


STARTS = ("random", "gradient")


def check_start(start: str, solver: str = "lanczos", backend: str = "flatlora") -> None:
    """Refuse an unknown Lanczos start, or a gradient start asked of a solver that takes none."""
    if start not in STARTS:
        raise FlatLoraError(f"unknown --eig-start {start!r}: use random or gradient")
    if start == "gradient" and (solver != "lanczos" or backend != "flatlora"):
        raise FlatLoraError(
            "start='gradient' is a Lanczos start: use solver='lanczos' (flatlora backend), or start='random'"
        )


def top_eigenvalues(
    model: nn.Module,
    probe: ProbeSet,
    k: int = 1,
    space: str = "lora",
    tol: float | None = None,
    which: str = "algebraic",
    *,
    solver: str = "lanczos",
    backend: str = "flatlora",
    max_iter: int | None = None,
    hvp: str = "auto",
    start: str = "random",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> EigenResult:
    """The k largest Hessian eigenvalues of the probe-set loss in ``space``.

    Args:
        model: a peft LoRA model (any model for ``space="all"``); left bit-identical.
        probe: the probe set.
        k: how many eigenvalues.
        space: ``lora`` (default), ``b``, ``merged`` or ``all``.
        tol: relative accuracy asked of each eigenvalue (the Lanczos error bound); default
            1e-5 for ``lanczos`` and ``eigsh`` (a few products more than 1e-3 buys four digits),
            1e-3 for power iteration (PyHessian's own stopping rule and default).
        which: ``algebraic`` (largest values) or ``magnitude`` (largest |values|).
        solver: ``lanczos`` (full reorthogonalisation, default), ``eigsh`` (scipy ARPACK on
            the host) or ``power`` (PyHessian's deflated power iteration).
        backend: ``flatlora`` or ``pyhessian`` (the package, through an adapter; power
            iteration, largest magnitude).
        max_iter: products cap (Lanczos, eigsh) or per eigenvalue (power).
        hvp: ``auto``, ``autograd`` (double backward) or ``fd`` (finite differences).
        start: ``random`` (a seeded random vector) or ``gradient`` (the unit sum of the clean
            gradient and that random vector: fewer products where the gradient leans on the top
            eigenvectors, as it does near a minimum; the Lanczos solver only). The gradient is the
            shared clean one of the space (computed once per model and probe).
        seed: seed of the start vector.
        device: where to measure.
        progress: ``progress(done, total)`` callback per product.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` (descending), ``hvps``, ``converged``.

    Raises:
        FlatLoraError: an unknown space, solver or backend, k larger than the space.
    """
    _check(solver, SOLVERS, "solver")
    _check(backend, BACKENDS, "backend")
    check_start(start, solver, backend)
    if tol is None:
        tol = 1e-3 if (solver == "power" or backend == "pyhessian") else 1e-5
    settings = MEASURES["top_eigenvalues"].record(
        probe, k=k, space=space, tol=tol, which=which, solver=solver, backend=backend, max_iter=max_iter,
        start=start, seed=seed,
    )  # fmt: skip
    if backend == "pyhessian":
        from flatlora_analysis.hessian.pyhessian_backend import pyhessian_eigenvalues

        est, meta = pyhessian_eigenvalues(
            model, probe, space, k=k, tol=tol, max_iter=max_iter or 100, seed=seed, device=device
        )
    else:
        with hessian_operator(model, probe, space, hvp=hvp, device=device) as op:
            op.progress, op.budget = progress, max_iter or max(100, 4 * k + 40)
            run = {"lanczos": lanczos_eigenvalues, "eigsh": eigsh_eigenvalues, "power": power_eigenvalues}[solver]
            kwargs = {"max_iter": max_iter} if max_iter is not None else {}
            if start == "gradient":
                kwargs["toward"] = op.objective.loss_and_grad(None)[1]
            est = run(op, k, which=which, tol=tol, seed=seed, **kwargs)
            meta = {**op.meta}
    return EigenResult(
        est.eigenvalues,
        est.products,
        est.converged,
        est.errors,
        settings,
        {**meta, **est.meta, "iterations": est.iterations, "versions": package_versions()},
    )


def hessian_trace(
    model: nn.Module,
    probe: ProbeSet,
    space: str = "lora",
    *,
    method: str = "hutch++",
    samples: int = 99,
    tol: float | None = None,
    backend: str = "flatlora",
    hvp: str = "auto",
    batched: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> TraceResult:
    """tr(H) of the probe-set loss in ``space`` with a standard error.

    Args:
        method: ``hutch++`` (default; ``samples`` products in all) or ``hutchinson`` (up to
            ``samples`` probes; with ``tol``, it stops once stderr <= tol * |trace|).
        batched: products in blocks (``HessianOperator.matmat``); False: one at a time (the
            reference mode). The same estimate to round-off.
        backend: ``flatlora`` or ``pyhessian`` (its Hutchinson; its own relative-change stop
            at ``tol``, 1e-3 by default, as PyHessian has it).
        Others as :func:`top_eigenvalues`.

    Raises:
        FlatLoraError: an unknown space, method or backend; samples too few.
    """
    _check(method, TRACE_METHODS, "trace method")
    _check(backend, BACKENDS, "backend")
    settings = MEASURES["trace"].record(
        probe, space=space, method=method, samples=samples, tol=tol, backend=backend, seed=seed
    )
    if backend == "pyhessian":
        from flatlora_analysis.hessian.pyhessian_backend import pyhessian_trace

        est, meta = pyhessian_trace(model, probe, space, samples=samples, tol=tol or 1e-3, seed=seed, device=device)
    else:
        with hessian_operator(model, probe, space, hvp=hvp, device=device) as op:
            op.progress, op.budget = progress, samples
            est = (
                hutchpp(op, samples, seed=seed, batched=batched)
                if method == "hutch++"
                else hutchinson(op, samples, tol=tol, seed=seed, batched=batched)
            )
            meta = {**op.meta}
    return TraceResult(
        est.trace,
        est.stderr,
        est.products,
        est.converged,
        settings,
        {**meta, **est.meta, "versions": package_versions()},
    )


def spectral_density(
    model: nn.Module,
    probe: ProbeSet,
    space: str = "lora",
    *,
    steps: int = 40,
    runs: int = 1,
    sigma: float | None = None,
    points: int = 512,
    backend: str = "flatlora",
    hvp: str = "auto",
    batched: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> DensityResult:
    """The Hessian's spectral density by stochastic Lanczos quadrature (``runs`` x ``steps`` products).

    ``batched``: the runs in lockstep, one block product a step (False: one after another).

    ``backend="pyhessian"`` is accepted and runs this implementation: PyHessian 0.1's density
    calls ``torch.eig``, removed from torch; the result's meta says so.
    """
    _check(backend, BACKENDS, "backend")
    settings = MEASURES["density"].record(
        probe, space=space, steps=steps, runs=runs, sigma=sigma, points=points, backend=backend, seed=seed
    )
    with hessian_operator(model, probe, space, hvp=hvp, device=device) as op:
        op.progress, op.budget = progress, steps * runs
        quad = slq(op, steps, runs, seed=seed, batched=batched)
        meta = {**op.meta}
    grid, density, used_sigma = broadened_density(quad.nodes, quad.weights, sigma=sigma, points=points)
    if backend == "pyhessian":
        meta["backend_note"] = "pyhessian 0.1 density calls the removed torch.eig: computed by flatlora's SLQ"
    return DensityResult(
        quad.nodes,
        quad.weights,
        grid,
        density,
        used_sigma,
        quad.products,
        settings,
        {**meta, **quad.meta, "versions": package_versions()},
    )


def layer_curvature(
    model: nn.Module,
    probe: ProbeSet,
    space: str = "lora",
    *,
    tol: float = 1e-3,
    trace_samples: int = 30,
    trace_method: str = "hutch++",
    max_iter: int | None = None,
    hvp: str = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LayerCurvatureResult:
    """Top eigenvalue and trace of each layer's diagonal Hessian block (every other layer held fixed).

    Costs one eigenvalue and one trace run per layer; each product is a full backward pass.
    """
    _check(trace_method, TRACE_METHODS, "trace method")
    settings = MEASURES["layers"].record(
        probe,
        space=space,
        tol=tol,
        trace_samples=trace_samples,
        trace_method=trace_method,
        max_iter=max_iter,
        seed=seed,
    )
    with measuring(model, device) as dev:
        full = build_space(model, space)
        layers = full.groups
        eig, tr, se = [], [], []
        hvps = 0
        meta: dict[str, Any] = {}
        for i, layer in enumerate(layers):
            with HessianOperator(ModelObjective(model, probe, full.restrict([layer]), dev), hvp) as op:
                kwargs = {"max_iter": max_iter} if max_iter is not None else {}
                est = lanczos_eigenvalues(op, 1, tol=tol, seed=seed, **kwargs)
                t = (
                    hutchpp(op, trace_samples, seed=seed)
                    if trace_method == "hutch++"
                    else hutchinson(op, trace_samples, seed=seed)
                )
                eig.append(est.eigenvalues[0])
                tr.append(t.trace)
                se.append(t.stderr)
                hvps += op.n_products
                meta = {**op.meta}
            if progress is not None:
                progress(i + 1, len(layers))
    meta.pop("dim", None)
    return LayerCurvatureResult(
        layers, np.array(eig), np.array(tr), np.array(se), hvps, settings, {**meta, "versions": package_versions()}
    )
