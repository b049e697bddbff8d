"""The loss of a model over a probe set as a function of a perturbation in a space.

``ModelObjective(model, probe, space)`` is what every model measure works on: ``loss(delta)``
and ``loss_and_grad(delta)`` with delta a flat vector of the space, evaluated through
``torch.func.functional_call`` (the model is never written). The algorithms in
``flatlora_analysis.sharpness`` and ``flatlora_analysis.hessian`` see only this interface, so they are tested
on closed-form objectives too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import measuring
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.spaces import Space, build_space


class Objective(Protocol):
    """What the sharpness algorithms need: a loss of a flat perturbation, and its gradient."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def point(self) -> torch.Tensor: ...

    def loss(self, delta: torch.Tensor | None) -> float: ...

    def loss_and_grad(self, delta: torch.Tensor | None) -> tuple[float, torch.Tensor]: ...


def attention_implementations(model: nn.Module) -> set[str]:
    """The attention implementations named by the model's configs (``eager``, ``sdpa``, ...)."""
    found = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str):
            found.add(impl)
    return found


@contextlib.contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[str]:
    """Attention that supports double backward, for HVPs; yields what was used.

    SDPA's fused CPU and flash kernels have no double backward: SDPA runs on its math backend
    here. Other fused implementations (flash_attention_2, flex) are switched to eager for the
    duration and switched back.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = []
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str) and impl not in ("eager", "sdpa") and (config, impl) not in switched:
            switched.append((config, impl))
    impls = attention_implementations(model)
    used = (
        "eager" if impls <= {"eager"} else "sdpa (math backend)" if impls <= {"eager", "sdpa"} else "eager (switched)"
    )
    try:
        for config, _ in switched:
            config._attn_implementation = "eager"
        with sdpa_kernel([SDPBackend.MATH]):
            yield used
    finally:
        for config, impl in switched:
            config._attn_implementation = impl


class ModelObjective:
    """L(w + delta) over a probe set, delta a flat vector of ``space``; eval mode, no weight written.

    Use inside :func:`flatlora_analysis.guard.measuring` (the public measures do); the probe set is
    moved to ``device`` once.
    """

    def __init__(self, model: nn.Module, probe: ProbeSet, space: Space, device: torch.device) -> None:
        self.model = model
        self.probe = probe.to(device)
        self.space = space
        self.dim = space.dim
        self.dtype = space.dtype
        self.device = device
        self.forwards = 0
        self.backwards = 0

    def point(self) -> torch.Tensor:
        return self.space.point()

    def _batch_loss(self, batch: dict[str, Any], overrides: dict[str, torch.Tensor]) -> torch.Tensor:
        self.forwards += 1
        return self.probe.batch_loss(self.model, batch, overrides)

    @torch.no_grad()
    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The probe-set loss at w + delta (delta None: the clean model)."""
        overrides = self.space.overrides(None if delta is None else self.space.split(delta))
        total = 0.0
        for batch in self.probe.batches:
            total += float(self._batch_loss(batch, overrides).double())
        return total

    def loss_and_grad(self, delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """The loss at w + delta and its gradient in the space (flat, ``self.dtype``)."""
        delta = self.space.zeros() if delta is None else delta
        grad = torch.zeros(
            self.dim, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32, device=self.device
        )
        total = 0.0
        for batch in self.probe.batches:
            leaves = [d.detach().requires_grad_(True) for d in self.space.split(delta)]
            loss = self._batch_loss(batch, self.space.overrides(leaves))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            self.backwards += 1
            dense = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
            grad += self.space.flatten(dense).to(grad.dtype)
            total += float(loss.detach().double())
        return total, grad.to(self.dtype)

    def counts(self) -> dict[str, int]:
        return {"forward_passes": self.forwards, "backward_passes": self.backwards}


def evaluate_loss(
    model: nn.Module,
    probe: ProbeSet,
    *,
    space: str = "lora",
    delta: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> float:
    """The mean loss over ``probe`` at w + delta (delta a flat vector of ``space``), in eval mode.

    Raises:
        FlatLoraError: an unknown space or a delta of the wrong size.
    """
    with measuring(model, device) as dev:
        sp = build_space(model, space)
        if delta is not None and delta.shape != (sp.dim,):
            raise FlatLoraError(f"delta has shape {tuple(delta.shape)}; the {space} space has {sp.dim} entries")
        return ModelObjective(model, probe, sp, dev).loss(None if delta is None else delta.to(dev))
