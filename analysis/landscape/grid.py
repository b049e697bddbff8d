"""Loss landscapes: 1-D curves, 2-D planes (random or trajectory PCA) and interpolation between adapters.

Each grid point costs one forward pass over the probe set; the perturbed weights are
``origin + a d1 + b d2`` for the few overridden tensors, a negligible cost next to the
forward. Grids are symmetric and hold the origin exactly, and ``z[i, j]`` is the loss at
``(x[i], y[j])``. Under ``torchrun`` (an initialised process group) each rank evaluates every
world_size-th point and all ranks receive the full grid; the values do not depend on the
split, so two ranks give the same ``z`` as one process, bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import measuring
from flatlora_analysis.landscape import directions as dirs
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.results import Result
from flatlora_analysis.spaces import build_space

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LandscapeResult(Result):
    """A loss landscape: ``z[i]`` at ``x[i]`` (1-D) or ``z[i, j]`` at ``(x[i], y[j])`` (2-D).

    ``kind``: ``1d``, ``2d``, ``pca`` or ``interpolation``. For ``pca``, ``trajectory`` holds
    the saved steps projected onto the plane and ``explained_variance`` the ratios of PC1, PC2.
    """

    kind: str
    x: np.ndarray
    z: np.ndarray
    clean_loss: float
    y: np.ndarray = field(default_factory=lambda: np.empty(0))
    trajectory: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))
    trajectory_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    explained_variance: np.ndarray = field(default_factory=lambda: np.empty(0))
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("x", "z", "y", "trajectory", "trajectory_steps", "explained_variance")

    def origin_value(self) -> float:
        i = int(np.flatnonzero(self.x == 0)[0]) if self.kind != "interpolation" else int(np.argmin(np.abs(self.x)))
        if self.z.ndim == 1:
            return float(self.z[i])
        return float(self.z[i, int(np.flatnonzero(self.y == 0)[0])])


def symmetric_grid(steps: int, span: float) -> np.ndarray:
    """``steps`` points from -span to span holding 0 exactly (an even count is raised by one)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise FlatLoraError(f"steps must be a whole number >= 2, got {steps!r}")
    if not (isinstance(span, (int, float)) and span > 0 and math.isfinite(span)):
        raise FlatLoraError(f"span must be a finite number > 0, got {span!r}")
    half = steps // 2
    return span * np.arange(-half, half + 1, dtype=float) / half


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_points(
    model: nn.Module,
    probe: ProbeSet,
    axes: list[dirs.Axis],
    points: list[tuple[float, float]],
    progress: Progress | None = None,
) -> np.ndarray:
    """The probe-set loss at each (a, b); split over ranks when a process group is running."""
    rank, world = _world()
    mine = list(range(rank, len(points), world))
    values = {}
    for n, i in enumerate(mine):
        a, b = points[i]
        overrides = {ax.key: ax.at(a, b) for ax in axes}
        total = 0.0
        with torch.no_grad():
            for batch in probe.batches:
                total += float(probe.batch_loss(model, batch, overrides).double())
        values[i] = total
        if progress is not None:
            progress(n + 1, len(mine))
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict[int, float] | None] = [None] * world
        dist.all_gather_object(gathered, values)
        values = {k: v for part in gathered for k, v in part.items()}
    return np.array([values[i] for i in range(len(points))])


def _clean_loss(model: nn.Module, probe: ProbeSet) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in probe.batches:
            total += float(probe.batch_loss(model, batch).double())
    return total


def _meta(axes, start: float, points: int) -> dict[str, Any]:
    _, world = _world()
    return {
        "cosine": dirs.cosine(axes),
        "seconds": time.perf_counter() - start,
        "grid_points": points,
        "world_size": world,
        "d1_norm": float(dirs._flat([a.d1 for a in axes]).norm()),
    }


def landscape_1d(
    model: nn.Module,
    probe: ProbeSet,
    *,
    steps: int = 21,
    span: float = 1.0,
    space: str = "merged",
    seed: int = 0,
    filter_normalize: bool = True,
    direction: list[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LandscapeResult:
    """The loss along one direction: ``z[i] = L(w + x[i] d)``, x symmetric in [-span, span].

    Args:
        model: a peft LoRA model (any model for ``space="all"``); left bit-identical.
        probe: the probe set.
        steps, span: grid points (odd; an even count is raised by one) and half-width.
        space: ``merged`` (default), ``lora``, ``b`` or ``all``.
        seed: of the Gaussian direction (ignored with ``direction``).
        filter_normalize: rescale the direction's rows to the weight rows' norms (Li et al. 2018).
        direction: a given direction, one tensor per entry of the space.

    Raises:
        FlatLoraError: steps < 2, span <= 0, an unknown space.
    """
    x = symmetric_grid(steps, span)
    start = time.perf_counter()
    with measuring(model, device) as dev:
        sp = build_space(model, space)
        d = (
            direction
            if direction is not None
            else dirs.random_directions(sp, seed=seed, count=1, normalize=filter_normalize)[0]
        )
        axes = dirs.space_axes(sp, d)
        z = evaluate_points(model, probe.to(dev), axes, [(a, 0.0) for a in x], progress)
        clean = float(z[len(x) // 2])  # the origin is on the grid: its value is the clean loss, exactly
    settings = MEASURES["landscape_1d"].record(
        probe, leave_out=("direction",), extra={"direction": "given" if direction is not None else "gaussian"},
        steps=len(x), span=span, space=space, seed=seed, filter_normalize=filter_normalize,
    )  # fmt: skip
    return LandscapeResult("1d", x, z, clean, settings=settings, meta=_meta(axes, start, len(x)))


def landscape_2d(
    model: nn.Module,
    probe: ProbeSet,
    *,
    steps: int = 11,
    span: float | None = None,
    space: str = "merged",
    seed: int = 0,
    filter_normalize: bool = True,
    pca: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LandscapeResult:
    """The loss on a plane: ``z[i, j] = L(w + x[i] d1 + y[j] d2)``.

    Args:
        steps, span: points per axis and half-width (default 1.0; with ``pca``, in parameter
            units along the unit principal directions, by default 1.2 times the trajectory's reach).
        pca: a run directory: the plane of the first two principal components of its saved
            trajectory (``flatlora train --trajectory-every N``), with the trajectory projected
            onto it and the explained variance recorded. The model is the run's final adapter.
        Others as :func:`landscape_1d`.

    Raises:
        FlatLoraError: steps < 2, span <= 0, a run without a trajectory for ``pca``.
    """
    symmetric_grid(steps, span if span is not None else 1.0)  # check the grid before any work
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    with measuring(model, device) as dev:
        sp = build_space(model, space)
        if pca is not None:
            folders, saved_steps = dirs.trajectory_folders(pca)
            axes, coords, ratio = dirs.pca_axes(model, sp, folders, saved_steps)
            extra = {
                "trajectory": coords,
                "trajectory_steps": np.array(saved_steps, float),
                "explained_variance": ratio,
            }
            if span is None:
                span = 1.2 * float(np.abs(coords).max()) or 1.0
        else:
            d1, d2 = dirs.random_directions(sp, seed=seed, count=2, normalize=filter_normalize)
            axes = dirs.space_axes(sp, d1, d2)
        span = 1.0 if span is None else span
        x = symmetric_grid(steps, span)
        points = [(a, b) for a in x for b in x]
        z = evaluate_points(model, probe.to(dev), axes, points, progress).reshape(len(x), len(x))
        clean = float(z[len(x) // 2, len(x) // 2])  # the origin's value is the clean loss, exactly
    plane = {"plane": "pca" if pca is not None else "gaussian", "pca_run": None if pca is None else str(pca)}
    settings = MEASURES["landscape_2d"].record(
        probe, leave_out=("pca",), extra=plane, steps=len(x), span=span, space=space, seed=seed,
        filter_normalize=filter_normalize if pca is None else None,
    )  # fmt: skip
    return LandscapeResult(
        "pca" if pca is not None else "2d",
        x,
        z,
        clean,
        y=x.copy(),
        settings=settings,
        meta=_meta(axes, start, len(points)),
        **extra,
    )


def interpolate(
    model: nn.Module,
    probe: ProbeSet,
    other: str | Path | None = None,
    *,
    steps: int = 20,
    extend: float = 0.25,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LandscapeResult:
    """The loss along the merged-space line between two adapters of one base model.

    t = 0 is this model's adapter and t = 1 the adapter folder ``other`` (trained heads are
    interpolated too); with ``other=None``, t = 0 is the base model (adapter off) and t = 1
    this adapter. ``steps`` intervals between 0 and 1 (both on the grid exactly), extended
    by ``extend`` on each side.

    Raises:
        FlatLoraError: an adapter of another base model or LoRA configuration, steps < 2.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise FlatLoraError(f"steps must be a whole number >= 2, got {steps!r}")
    if not (isinstance(extend, (int, float)) and extend >= 0):
        raise FlatLoraError(f"extend must be >= 0, got {extend!r}")
    k = round(extend * steps)
    t = np.arange(-k, steps + k + 1, dtype=float) / steps
    start = time.perf_counter()
    with measuring(model, device) as dev:
        axes = dirs.line_axes(model, other)
        probe_dev = probe.to(dev)
        z = evaluate_points(model, probe_dev, axes, [(a, 0.0) for a in t], progress)
        # t = 0 is this adapter itself when going to another; from the base model, t = 1 is it up to rounding.
        clean = float(z[k]) if other is not None else _clean_loss(model, probe_dev)
    settings = MEASURES["interpolation"].record(
        probe, extra={"from": "base model" if other is None else "this adapter"},
        other=None if other is None else str(other), steps=steps, extend=extend,
    )  # fmt: skip
    return LandscapeResult("interpolation", t, z, clean, settings=settings, meta=_meta(axes, start, len(t)))
