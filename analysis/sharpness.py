"""Sharpness: perturbed loss minus clean loss on a probe set, for a perturbation set of radius rho.

Kinds (ANALYSIS.md, "Sharpness"); c = 1, or c = |w| + eta with ``adaptive=True``:

- ``sam``: one ascent step, delta = rho c^2 g / ||c g|| (what SAM optimizes);
- ``worst``: projected gradient ascent in the ball ||delta / c|| <= rho (``norm="l2"`` or
  ``"linf"``) started at the SAM point, with momentum 0.75, step-size halving and restarts
  from the best point (Andriushchenko et al. 2023); never below ``sam`` at the same rho;
- ``average``: E[L(w + delta)] - L(w), delta ~ N(0, rho^2 diag(c^2)), with a standard error;
- ``flat-lora``: the paper's perturbation, the full-space SAM step carried into B, through
  the trainer's own ``flatlora.perturbation.flat_lora_eps_b``.

On L(w) = 1/2 w^T H w at w = 0: worst-case l2 = 1/2 rho^2 lambda_max(H), average-case
= 1/2 rho^2 tr(H), adaptive average-case = 1/2 rho^2 sum_i H_ii c_i^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import measuring
from flatlora_analysis.objective import ModelObjective, Objective
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.results import Result
from flatlora_analysis.spaces import build_space

KINDS = ("sam", "worst", "average", "flat-lora")
# the settings of sharpness() that apply to one kind only (a result of another kind does not record them)
KIND_SETTINGS = {
    "sam": (),
    "worst": ("norm", "steps", "restarts"),
    "average": ("samples",),
    "flat-lora": ("flat_norm",),
}
NORMS = ("l2", "linf")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SharpnessResult(Result):
    """One sharpness figure: ``value = perturbed_loss - clean_loss`` and every setting.

    ``stderr`` is the standard error of ``value`` for ``average`` (0 otherwise); ``meta`` holds
    the passes used, the realized perturbation norm and the versions.
    """

    kind: str
    rho: float
    value: float
    clean_loss: float
    perturbed_loss: float
    stderr: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _check_rhos(rho: float | Sequence[float]) -> list[float]:
    rhos = [rho] if isinstance(rho, (int, float)) else list(rho)
    if not rhos:
        raise FlatLoraError("no rho given: pass a radius > 0 or a list of them")
    for r in rhos:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
            raise FlatLoraError(f"rho must be a finite number > 0, got {r!r}: pass a positive radius")
    return [float(r) for r in rhos]


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return v / n if n > 0 else torch.zeros_like(v)


def _project(z: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return z.clamp(-rho, rho)
    n = z.norm()
    return z * (rho / n) if n > rho else z


def _ascent_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    return torch.sign(g) if norm == "linf" else _unit(g)


# ----------------------------------------------------------------------------- algorithms


def sam_delta(grad: torch.Tensor, rho: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SAM's step in a space: rho c^2 g / ||c g|| (c = 1 without ``scale``); 0 where g = 0."""
    if scale is None:
        return rho * _unit(grad)
    return scale * (rho * _unit(scale * grad))


def worst_case(
    objective: Objective,
    rho: float,
    *,
    scale: torch.Tensor | None = None,
    norm: str = "l2",
    steps: int = 20,
    restarts: int = 0,
    momentum: float = 0.75,
    seed: int = 0,
    start: tuple[float, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> tuple[float, torch.Tensor, dict[str, Any]]:
    """Max of L(w + c z) over ||z|| <= rho by projected gradient ascent; returns (loss, delta, meta).

    The first run starts at the SAM point (the l-inf analogue rho sign(c g) for ``linf``), so
    the result is never below ``sam``; ``restarts`` more runs start at random points of the
    sphere. Each run takes ``steps`` projected steps along the normalized gradient (the sign
    for ``linf``), of initial size 2 rho, with momentum. A step that gains less than a quarter
    of what its first-order model predicts halves the step size and the run restarts from its
    best point; a step that gains at least three quarters of it grows the step (up to 2 rho).
    A run's last point needs its loss only: a run costs ``steps`` gradients and one loss.
    """
    c = torch.ones(objective.dim, dtype=objective.dtype, device=objective.device) if scale is None else scale
    g = torch.Generator(device="cpu").manual_seed(seed)
    clean, grad0 = start if start is not None else objective.loss_and_grad(None)
    best_loss, best_delta = -math.inf, torch.zeros_like(c)
    evaluations = halvings = 0
    total = (restarts + 1) * steps
    for run in range(restarts + 1):
        if run == 0 and grad0.norm() > 0:
            z = rho * _ascent_direction(c * grad0, norm)
        else:
            rand = torch.randn(objective.dim, generator=g, dtype=torch.float64).to(c)
            z = rho * (torch.sign(rand) if norm == "linf" else _unit(rand))
        loss, grad = objective.loss_and_grad(c * z)
        evaluations += 1
        run_best, run_best_z, run_best_grad = loss, z, grad
        step_size = 2 * rho
        z_prev = z
        for k in range(1, steps + 1):
            gz = c * grad  # the gradient in z
            u = _project(z + step_size * _ascent_direction(gz, norm), rho, norm)
            alpha = 1.0 if z_prev is z else momentum
            z_new = _project(z + alpha * (u - z) + (1 - alpha) * (z - z_prev), rho, norm)
            predicted = float(gz @ (z_new - z))
            last = k == steps  # no step follows from the last point's gradient
            new_loss, new_grad = (objective.loss(c * z_new), None) if last else objective.loss_and_grad(c * z_new)
            evaluations += 0 if last else 1
            gain = new_loss - loss
            if new_loss > run_best:
                run_best, run_best_z, run_best_grad = new_loss, z_new, new_grad
            if predicted > 0 and gain < 0.25 * predicted:
                step_size /= 2
                halvings += 1
                z = z_prev = run_best_z
                loss, grad = run_best, run_best_grad
            else:
                if predicted > 0 and gain >= 0.75 * predicted:
                    step_size = min(1.5 * step_size, 2 * rho)
                z_prev, z, loss, grad = z, z_new, new_loss, new_grad
            if progress is not None:
                progress(run * steps + k, total)
        if run_best > best_loss:
            best_loss, best_delta = run_best, c * run_best_z
    return best_loss, best_delta, {"gradient_evaluations": evaluations, "halvings": halvings, "clean_loss": clean}


def average_case(
    objective: Objective,
    rhos: Sequence[float],
    *,
    scale: torch.Tensor | None = None,
    samples: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[tuple[float, float]]:
    """(mean of L(w + delta), its standard error) per rho, delta = rho c eps, eps ~ N(0, I).

    The same draws eps serve every rho (common random numbers), from a seeded generator.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise FlatLoraError(f"samples={samples!r}: pass an integer >= 2 (a standard error needs two)")
    g = torch.Generator(device="cpu").manual_seed(seed)
    losses = np.zeros((len(rhos), samples))
    for i in range(samples):
        eps = torch.randn(objective.dim, generator=g, dtype=torch.float64).to(
            device=objective.device, dtype=objective.dtype
        )
        if scale is not None:
            eps = eps * scale
        for j, rho in enumerate(rhos):
            losses[j, i] = objective.loss(rho * eps)
        if progress is not None:
            progress(i + 1, samples)
    return [(float(row.mean()), float(row.std(ddof=1) / math.sqrt(samples))) for row in losses]


# ----------------------------------------------------------------------------- on a model


def _flat_lora_deltas(model, objective: ModelObjective, rhos, grad, norm: str) -> list[tuple[torch.Tensor, float]]:
    """Flat-LoRA's eps_B per rho as flat vectors of the ``b`` space, with the realized full-space norm."""
    from flatlora.lora import find_lora_pairs
    from flatlora.perturbation import flat_lora_eps_b, realized_sq_norms

    pairs = find_lora_pairs(model)
    space = objective.space  # the lora space: A, B per pair, in pair order
    parts = space.split(grad)
    gA = [p.flatten(1) for p in parts[0::2]]
    gB = [p.flatten(1) for p in parts[1::2]]
    As = [p.a_matrix.detach() for p in pairs]
    Bs = [p.b_matrix.detach() for p in pairs]
    scalings = [p.scaling for p in pairs]
    out = []
    for rho in rhos:
        eps = flat_lora_eps_b(As, Bs, gA, gB, scalings, rho, norm)
        realized = float(realized_sq_norms(eps, As, scalings).sum().sqrt())
        tensors = [
            t for a, b, e in zip(parts[0::2], parts[1::2], eps) for t in (torch.zeros_like(a), e.reshape(b.shape))
        ]
        out.append((space.flatten(tensors), realized))
    return out


def sharpness(
    model: nn.Module,
    probe: ProbeSet,
    rho: float | Sequence[float] = 0.05,
    kind: str = "sam",
    space: str | None = None,
    adaptive: bool = False,
    *,
    eta: float = 0.01,
    norm: str = "l2",
    steps: int = 20,
    restarts: int = 0,
    samples: int = 10,
    flat_norm: str = "global",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SharpnessResult | list[SharpnessResult]:
    """Sharpness of ``model`` on ``probe``: L(w + delta) - L(w) for the perturbation of ``kind``.

    Args:
        model: a peft LoRA model (any model for ``space="all"``); left bit-identical.
        probe: the probe set.
        rho: a radius > 0, or a list of them (one result each, sharing the work).
        kind: ``sam``, ``worst``, ``average`` or ``flat-lora``.
        space: ``merged`` (default), ``lora``, ``b`` or ``all``; ``flat-lora`` perturbs B
            (``rho`` is its full-weight-space radius) and takes only ``b`` or None.
        adaptive: c = |w| + ``eta`` per coordinate instead of 1 (not for ``flat-lora``).
        norm: ``l2`` or ``linf`` ball (``worst`` only).
        steps, restarts: projected-ascent steps and random restarts (``worst``).
        samples: Gaussian draws (``average``).
        flat_norm: ``global`` or ``layer`` normalisation of ``flat-lora`` (as the trainer's ``norm``).
        seed: seed of the random draws.
        device: where to measure (default: where the model is).
        progress: ``progress(done, total)`` callback.

    Returns:
        A :class:`SharpnessResult` for a scalar ``rho``; a list, one per rho, otherwise.

    Raises:
        FlatLoraError: rho <= 0, an unknown kind, space or norm, an empty probe set.
    """
    if kind not in KINDS:
        raise FlatLoraError(f"unknown sharpness kind {kind!r}: use one of {', '.join(KINDS)}")
    if norm not in NORMS:
        raise FlatLoraError(f"unknown norm {norm!r}: use l2 or linf")
    if norm == "linf" and kind != "worst":
        raise FlatLoraError("norm='linf' applies to kind='worst' only: drop it, or use kind='worst'")
    if not (isinstance(steps, int) and steps >= 1 and isinstance(restarts, int) and restarts >= 0):
        raise FlatLoraError(f"steps must be >= 1 and restarts >= 0, got {steps!r} and {restarts!r}")
    if adaptive and not eta >= 0:
        raise FlatLoraError(f"eta must be >= 0, got {eta}")
    rhos = _check_rhos(rho)
    if kind == "flat-lora":
        if space not in (None, "b"):
            raise FlatLoraError(
                "kind='flat-lora' perturbs B (rho is its full-weight-space radius): pass space='b' or None"
            )
        if adaptive:
            raise FlatLoraError("kind='flat-lora' has no adaptive variant: pass adaptive=False")
        space = "b"
    space = space or "merged"
    # a result records its own rho (_package), and of the settings of one kind only its own kind's
    others = sorted({name for k, names in KIND_SETTINGS.items() if k != kind for name in names})
    settings = MEASURES["sharpness"].record(
        probe, leave_out=("rho", *others), kind=kind, space=space, adaptive=adaptive, eta=eta if adaptive else None,
        norm=norm, steps=steps, restarts=restarts, samples=samples, flat_norm=flat_norm, seed=seed,
    )  # fmt: skip
    results = []
    with measuring(model, device) as dev:
        sp = build_space(model, "lora" if kind == "flat-lora" else space)
        objective = ModelObjective(model, probe, sp, dev)
        scale = sp.point().abs() + eta if adaptive else None
        if kind == "average":
            clean = objective.loss(None)
            for r, (mean, se) in zip(
                rhos, average_case(objective, rhos, scale=scale, samples=samples, seed=seed, progress=progress)
            ):
                results.append((r, mean, clean, se, {}))
        else:
            clean, grad = objective.loss_and_grad(None)
            for i, r in enumerate(rhos):
                if kind == "sam":
                    delta = sam_delta(grad, r, scale)
                    results.append((r, objective.loss(delta), clean, 0.0, {"delta_norm": float(delta.norm())}))
                elif kind == "worst":
                    sub = None if progress is None else (lambda d, t, i=i: progress(i * t + d, t * len(rhos)))
                    best, delta, info = worst_case(
                        objective,
                        r,
                        scale=scale,
                        norm=norm,
                        steps=steps,
                        restarts=restarts,
                        seed=seed,
                        start=(clean, grad),
                        progress=sub,
                    )
                    info.pop("clean_loss")
                    results.append((r, best, clean, 0.0, {**info, "delta_norm": float(delta.norm())}))
            if kind == "flat-lora":
                for r, (delta, realized) in zip(rhos, _flat_lora_deltas(model, objective, rhos, grad, flat_norm)):
                    results.append((r, objective.loss(delta), clean, 0.0, {"realized_norm": realized}))
        counts = objective.counts()
    return _package(results, settings, counts, scalar=isinstance(rho, (int, float)))


def _package(rows, settings, counts, scalar: bool):
    out = [
        SharpnessResult(
            kind=settings["kind"],
            rho=r,
            value=p - c,
            clean_loss=c,
            perturbed_loss=p,
            stderr=se,
            settings={**settings, "rho": r},
            meta={**counts, **extra},
        )
        for r, p, c, se, extra in rows
    ]
    return out[0] if scalar else out
