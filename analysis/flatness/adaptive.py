"""Adaptive worst-case sharpness with logit normalization (Andriushchenko et al. 2023).

"A modern look at the relationship between sharpness and generalization": max L_n(w + delta)
- L_n(w) over |delta_i| <= rho |w_i| (l-inf, or the l2 ellipsoid), L_n the cross-entropy of
the logits centered and divided by their l2 norm, so that rescaling the logits changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from flatlora_analysis.flatness.common import Progress, require_classifier
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.sharpness import SharpnessResult, sharpness


def normalize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits centered over the classes and divided by their l2 norm (floored at 1e-10); shape kept (..., C)."""
    centered = logits - logits.mean(dim=-1, keepdim=True)
    return centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-10)


def _normalized_cross_entropy(outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
    logits = outputs.logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return nn.functional.cross_entropy(normalize_logits(logits), batch["labels"], reduction="mean")


def logit_normalized(probe: ProbeSet) -> ProbeSet:
    """The same probe set, its loss the cross-entropy of :func:`normalize_logits` (classifiers only)."""
    require_classifier(probe, "logit normalization")
    description = {**probe.description, "loss": "cross-entropy of normalized logits"}
    return ProbeSet(probe.batches, _normalized_cross_entropy, description, probe.weighting)


def adaptive_sharpness(
    model: nn.Module,
    probe: ProbeSet,
    rho: float = 0.001,
    *,
    norm: str = "linf",
    logit_normalization: bool = True,
    space: str | None = None,
    steps: int = 20,
    restarts: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SharpnessResult:
    """Adaptive worst-case sharpness with logit normalization (Andriushchenko et al. 2023).

    ``sharpness(kind="worst", adaptive=True, eta=0)``, i.e. the max over |delta_i| <= rho |w_i|
    (``norm="linf"``, their recommendation) or ||delta / |w| ||_2 <= rho, on the loss of
    normalized logits (``logit_normalization=False``: the plain loss). Scaling the layer that
    produces the logits (weights and bias) by any factor leaves the value unchanged.

    With two classes the normalized logits are +-(1/sqrt 2, -1/sqrt 2) whatever the model, so
    the normalized loss only moves where a prediction flips: the value is 0 or a jump, and
    ``meta["note"]`` says so (measured: 0.0 on every few-shot SST-2 adapter of the Theorem-2
    study at rho 0.001, a gradient of 1e-9). Use it with three or more classes, or with
    ``logit_normalization=False``.

    Returns:
        A :class:`SharpnessResult` whose settings add ``measure="adaptive-worst"`` and
        ``logit_normalization``.
    """
    measured = logit_normalized(probe) if logit_normalization else probe
    result = sharpness(
        model, measured, rho, kind="worst", space=space, adaptive=True, eta=0.0, norm=norm,
        steps=steps, restarts=restarts, seed=seed, device=device, progress=progress,
    )  # fmt: skip
    settings = {**result.settings, "measure": "adaptive-worst", "logit_normalization": logit_normalization}
    meta = dict(result.meta)
    if logit_normalization and _n_classes(model) == 2:
        meta["note"] = "two classes: normalized logits are constant up to sign, the value is 0 or a prediction flip"
    return dataclasses.replace(result, settings=settings, meta=meta)


def _n_classes(model: nn.Module) -> int | None:
    """The width of the model's logits (its config's num_labels), or None where it names none."""
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None
