"""Every Hessian measure of a report in one call, by the shared engine or the reference one.

``engine="shared"`` (default): one Hessian operator, block products and shared estimators
(:mod:`flatlora_analysis.hessian.shared`). ``engine="reference"``: the four measures one
after another as :func:`top_eigenvalues`, :func:`hessian_trace`, :func:`spectral_density`
and :func:`layer_curvature` compute them (one product at a time, one run per layer), kept
for tests and the benchmark. Either way the parts are the same result types with the same
settings, so a reader cannot tell them apart except by ``meta["engine"]`` and ``shares``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora.versions import package_versions
from flatlora_analysis.guard import measuring
from flatlora_analysis.hessian.density import broadened_density
from flatlora_analysis.hessian.measures import Progress, check_start
from flatlora_analysis.hessian.operator import HessianOperator
from flatlora_analysis.hessian.result_types import DensityResult, EigenResult, LayerCurvatureResult, TraceResult
from flatlora_analysis.hessian.shared import shared_curvature
from flatlora_analysis.objective import ModelObjective
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.results import Result
from flatlora_analysis.spaces import build_space

ENGINES = ("shared", "reference")
PARTS = ("top_eigenvalues", "trace", "density", "layers")


@dataclass(frozen=True)
class CurvatureResult(Result):
    """The parts (each a result's ``to_dict``, or None where not asked), which share what, products in all."""

    top_eigenvalues: dict[str, Any] | None
    trace: dict[str, Any] | None
    density: dict[str, Any] | None
    layers: dict[str, Any] | None
    shares: dict[str, str]
    hvps: int
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def parts(self) -> dict[str, Result]:
        """The asked parts as result objects (``EigenResult``, ``TraceResult``, ...)."""
        return {name: Result.from_dict(getattr(self, name)) for name in PARTS if getattr(self, name) is not None}


def curvature(
    model: nn.Module,
    probe: ProbeSet,
    space: str = "lora",
    *,
    k: int = 3,
    tol: float = 1e-3,
    trace_samples: int = 30,
    density_steps: int = 0,
    density_runs: int = 1,
    layers: bool = False,
    layer_trace_samples: int = 12,
    engine: str = "shared",
    block_size: int | None = None,
    start: str = "random",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    data_parallel: bool = False,
) -> CurvatureResult:
    """Top-k eigenvalues, and as asked tr(H), the SLQ density and per-layer curvature, in ``space``.

    Args:
        model, probe, space, device, progress: as :func:`top_eigenvalues`.
        k, tol: the top eigenvalues (Lanczos) and their relative accuracy; ``tol`` is the
            per-layer runs' too.
        trace_samples: Hutch++ products of tr(H) (0: skip). The shared engine spends a third
            of them, as residual probes on the Lanczos basis (its sketch is free).
        density_steps, density_runs: SLQ (0 steps: skip).
        layers, layer_trace_samples: per-layer top eigenvalue and trace; the reference engine
            spends ``layer_trace_samples`` Hutch++ products per layer, the shared one reads the
            traces off the trace's products (``trace_samples`` must then be > 0).
        engine: ``shared`` (block products, shared estimators) or ``reference``.
        block_size: columns per batched double backward (shared engine; memory grows with it);
            None: 16 on a CUDA device, 1 (single products) on a CPU, where a batched column
            costs as much as a single product or more.
        start: the top-k Lanczos run's start, ``random`` or ``gradient`` (toward the clean
            gradient: fewer products; :func:`flatlora_analysis.hessian.top_eigenvalues`). The
            trace's sketch is that run's Krylov basis either way (unbiased: the residual probes
            are drawn apart from it); SLQ run 1 then runs on its own from a Rademacher vector.
        seed: of every random draw.
        data_parallel: under ``torch.distributed`` (torchrun) with several ranks, each rank
            takes its share of the probe set (:meth:`ProbeSet.shard`) and every product is
            all-reduced, so all ranks hold the same vectors and return the same result, that of
            one process to round-off (shared engine; every rank must call with the same
            arguments). Without a process group it changes nothing.

    Returns:
        :class:`CurvatureResult`; ``parts()`` gives the ``EigenResult``, ``TraceResult``,
        ``DensityResult`` and ``LayerCurvatureResult``.

    Raises:
        FlatLoraError: an unknown engine; per-layer traces asked of the shared engine without
            trace products.
    """
    if engine not in ENGINES:
        raise FlatLoraError(f"unknown Hessian engine {engine!r}: use one of {', '.join(ENGINES)}")
    rank, world = _rank_world() if data_parallel else (0, 1)
    if world > 1 and engine != "shared":
        raise FlatLoraError("data-parallel products run on the shared Hessian engine: drop --hessian-engine reference")
    if engine == "shared" and layers and not trace_samples:
        raise FlatLoraError("the shared engine reads per-layer traces off the trace's products: set trace_samples >= 6")
    check_start(start)
    settings = MEASURES["curvature"].record(
        probe, space=space, k=k, tol=tol, trace_samples=trace_samples, density_steps=density_steps,
        density_runs=density_runs, layers=layers, layer_trace_samples=layer_trace_samples, engine=engine, start=start,
        seed=seed,
    )  # fmt: skip
    if engine == "reference":
        parts = _reference(model, probe, space, settings, device, progress)
        shares: dict[str, str] = {}
        meta = {"engine": engine}
    else:
        reduce = None
        if world > 1:
            import torch.distributed as dist

            probe, reduce = probe.shard(rank, world), dist.all_reduce
        parts, shares, meta = _shared(model, probe, space, settings, block_size, device, progress, reduce)
        if world > 1:
            meta["data_parallel"] = {"ranks": world}
    hvps = sum(p.hvps for p in parts.values())
    dicts = {name: parts[name].to_dict() if name in parts else None for name in PARTS}
    return CurvatureResult(
        **dicts, shares=shares, hvps=hvps, settings=settings, meta={**meta, "versions": package_versions()}
    )


def reference_calls(space: str, s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the reference engine asks of each measure: part (its registry name) -> the settings given.

    The shared engine's parts record the settings these calls record (:func:`_recorded`), so
    a part reads the same whichever engine computed it.

    Args:
        space: the Hessian's space.
        s: the settings of :func:`curvature` (``k``, ``tol``, ``trace_samples``, ...).

    Returns:
        The asked parts in the order they run, each with the settings its measure is called with.
    """
    common = {"space": space, "seed": s["seed"]}
    calls = {"top_eigenvalues": {"k": s["k"], "tol": s["tol"], "start": s.get("start", "random"), **common}}
    if s["trace_samples"]:
        calls["trace"] = {"samples": s["trace_samples"], "batched": False, **common}
    if s["density_steps"]:
        calls["density"] = {"steps": s["density_steps"], "runs": s["density_runs"], "batched": False, **common}
    if s["layers"]:
        calls["layers"] = {"tol": s["tol"], "trace_samples": s["layer_trace_samples"], **common}
    return calls


def _reference(model, probe, space, s, device, progress) -> dict[str, Result]:
    where = {"device": device, "progress": progress}
    return {
        part: MEASURES[part].compute(model, probe, given, **where) for part, given in reference_calls(space, s).items()
    }


def _recorded(probe: ProbeSet, part: str, given: dict[str, Any], **shared: Any) -> dict[str, Any]:
    """The settings the reference engine's ``part`` records for the call ``given`` (``shared``: what differs)."""
    m = MEASURES[part]
    return m.record(probe, **m.complete(**{**given, **shared}))


def _layer_indices(space) -> tuple[list[str], list[torch.Tensor]]:
    offsets = np.cumsum([0, *space.sizes])
    names = space.groups
    index = {name: [] for name in names}
    for entry, lo, hi in zip(space.entries, offsets[:-1], offsets[1:]):
        index[entry.group].append(torch.arange(int(lo), int(hi)))
    return names, [torch.cat(index[name]).to(space.device) for name in names]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared(model, probe, space, s, block_size, device, progress, reduce=None):
    with measuring(model, device) as dev:
        # a CPU gains nothing from batched double backwards while a layer's pruned product costs
        # a fraction of a full one; an accelerator runs the block's columns side by side
        layer_products = "block" if torch.device(dev).type == "cuda" else "pruned"
        sp = build_space(model, space)
        names, indices = _layer_indices(sp) if s["layers"] else ([], None)
        objective = ModelObjective(model, probe, sp, dev)
        with HessianOperator(objective, "auto", block_size=block_size, reduce=reduce) as op:
            op.progress = progress
            op.budget = 100 + s["trace_samples"] // 3 + (s["density_runs"] - 1) * s["density_steps"] + 30 * len(names)
            toward = op.objective.loss_and_grad(None)[1] if s["start"] == "gradient" else None
            if toward is not None and reduce is not None:
                reduce(toward)  # each rank's share of the probe: the whole probe's gradient, as the products
            found = shared_curvature(
                op, s["k"], tol=s["tol"], trace_samples=s["trace_samples"], density_steps=s["density_steps"],
                density_runs=s["density_runs"], layers=indices, layer_tol=s["tol"], seed=s["seed"],
                layer_names=names if layer_products == "pruned" else None, toward=toward,
            )  # fmt: skip
            op_meta = {key: v for key, v in op.meta.items() if key != "dim"}
            calls = op.n_calls
    asked = reference_calls(space, s)
    meta = {**op_meta, "engine": "shared", "block_products": calls, "versions": package_versions()}
    if s["layers"]:
        meta["layer_products"] = layer_products
    eig = found.eigen
    parts: dict[str, Result] = {
        "top_eigenvalues": EigenResult(
            eig.eigenvalues, eig.products, eig.converged, eig.errors,
            _recorded(probe, "top_eigenvalues", asked["top_eigenvalues"]),
            {**meta, **eig.meta, "iterations": eig.iterations},
        )
    }  # fmt: skip
    if found.trace is not None:
        t = found.trace
        parts["trace"] = TraceResult(
            t.trace, t.stderr, t.products, t.converged,
            _recorded(probe, "trace", asked["trace"]),
            {**meta, **t.meta, "sketch_start": s["start"]},
        )  # fmt: skip
    if found.nodes is not None:
        grid, density, sigma = broadened_density(found.nodes, found.weights)
        parts["density"] = DensityResult(
            found.nodes, found.weights, grid, density, sigma, found.products["density"],
            _recorded(probe, "density", asked["density"]),
            {**meta, "steps": s["density_steps"], "runs": s["density_runs"], "run_1": "top_eigenvalues' Lanczos run"},
        )  # fmt: skip
    if found.layer_eigenvalues is not None:
        parts["layers"] = LayerCurvatureResult(
            names, found.layer_eigenvalues, found.layer_traces, found.layer_stderr,
            found.products["layers"],
            _recorded(probe, "layers", asked["layers"], trace_method="shared"),
            {**meta, "trace_samples_used": found.products.get("trace")},
        )  # fmt: skip
    return parts, found.shares, meta
