"""The loss of a model over a probe set as a function of a perturbation in a space.

``ModelObjective(model, probe, space)`` is what every model measure works on: ``loss(delta)``
and ``loss_and_grad(delta)`` with delta a flat vector of the space, evaluated through
``torch.func.functional_call`` (the model is never written). The algorithms in
``flatlora_analysis.sharpness`` and ``flatlora_analysis.hessian`` see only this interface, so they are tested
on closed-form objectives too.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import fingerprint, measuring
from flatlora_analysis.memory import MemoryBudget, current_budget
from flatlora_analysis.micro_batch import GraphPlan, plan_graphs, planned_probe
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


def double_backward_attention_used(model: nn.Module) -> str:
    """What :func:`double_backward_attention` runs on the model: eager, sdpa (math backend) or eager (switched)."""
    impls = attention_implementations(model)
    if impls <= {"eager"}:
        return "eager"
    return "sdpa (math backend)" if impls <= {"eager", "sdpa"} else "eager (switched)"


@contextlib.contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[str]:
    """Attention that supports double backward, for HVPs; yields what was used.

    SDPA's fused CPU and flash kernels have no double backward: SDPA runs on its math backend
    here. Other fused implementations (flash_attention_2, flex) are switched to eager for the
    duration and switched back. The SDPA backends are process-wide flags: hold this around the
    forwards that build a double-backward graph only (the backward needs it no longer), never
    across an object's lifetime, which would leave them set for every model of the process.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = []
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str) and impl not in ("eager", "sdpa") and (config, impl) not in switched:
            switched.append((config, impl))
    used = double_backward_attention_used(model)
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
    moved to ``device`` once. Gradients walk the probe in the batches or micro-batches whose
    graphs fit the memory budget (:func:`flatlora_analysis.micro_batch.plan_graphs`), planned at
    the first gradient; ``budget`` None takes :func:`flatlora_analysis.memory.current_budget`.
    """

    def __init__(
        self, model: nn.Module, probe: ProbeSet, space: Space, device: torch.device, budget: MemoryBudget | None = None
    ) -> None:
        self.model = model
        self.probe = probe.to(device)
        self.space = space
        self.dim = space.dim
        self.dtype = space.dtype
        self.device = device
        self.forwards = 0
        self.backwards = 0
        self._budget = budget
        self.plan: GraphPlan | None = None  # of gradients, once one is taken
        self._gradient_probe: ProbeSet | None = None

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget of this objective's graphs (the context's, unless given)."""
        if self._budget is None:
            self._budget = current_budget(self.device)
        return self._budget

    def gradient_probe(self) -> ProbeSet:
        """The probe as gradients walk it: its batches, or micro-batches where a batch's graph exceeds the budget."""
        if self._gradient_probe is None:
            self.plan = plan_graphs(self, self.budget, hessian=False)
            self._gradient_probe = planned_probe(self.probe, self.plan)
        return self._gradient_probe

    def point(self) -> torch.Tensor:
        return self.space.point()

    def _batch_loss(self, batch: dict[str, Any], overrides: dict[str, torch.Tensor]) -> torch.Tensor:
        self.forwards += 1
        return self.probe.batch_loss(self.model, batch, overrides)

    def _clean_key(self, what: str) -> tuple:
        """What identifies a clean evaluation: the model's parameters (identities and in-place versions),
        the probe's content and loss, the space and the plan of its batches."""
        if not hasattr(self, "_probe_fingerprint"):
            self._probe_fingerprint = self.probe.fingerprint()
        plan = None if self.plan is None else (self.plan.mode, self.plan.rows)
        space = (self.space.name, self.dim, str(self.dtype), str(self.device))
        # the loss itself: a custom loss_fn (adaptive sharpness's normalized logits) is another function of the
        # same batches; the key holds the function, so its id cannot be reused by another while the value lives
        loss = (self.probe.loss_fn, self.probe.weighting, self.probe.totals)
        return (what, tuple(fingerprint(self.model).items()), self._probe_fingerprint, loss, space, plan)

    @torch.no_grad()
    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The probe-set loss at w + delta (delta None: the clean model, shared by the measures of this model)."""
        if delta is None:
            return _clean(self.model, self._clean_key("loss"), lambda: self._loss(None))
        return self._loss(delta)

    def _loss(self, delta: torch.Tensor | None) -> float:
        overrides = self.space.overrides(None if delta is None else self.space.split(delta))
        total = 0.0
        for batch in self.probe.batches:
            total += float(self._batch_loss(batch, overrides).double())
        return total

    def loss_and_grad(self, delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """The loss at w + delta and its gradient in the space (flat, ``self.dtype``; the clean one shared)."""
        if delta is None:
            self.gradient_probe()  # the plan is part of the key
            loss, grad = _clean(self.model, self._clean_key("grad"), lambda: self._loss_and_grad(None))
            return loss, grad.clone()
        return self._loss_and_grad(delta)

    def timed_clean_gradient(self) -> float:
        """Seconds of one clean loss and gradient, computed now (never the shared value), then shared.

        The unit of a report's costs: the gradient it times is the clean one, so the measures that
        start from it (sharpness, Flat-LoRA) take it instead of computing it again.
        """
        self.gradient_probe()  # the plan (and its estimating passes) before the clock starts
        start = time.perf_counter()
        value = self._loss_and_grad(None)
        seconds = time.perf_counter() - start
        _clean(self.model, self._clean_key("grad"), lambda: value)
        return seconds

    def _loss_and_grad(self, delta: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        delta = self.space.zeros() if delta is None else delta
        grad = torch.zeros(
            self.dim, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32, device=self.device
        )
        total = 0.0
        for batch in self.gradient_probe().batches:
            leaves = [d.detach().requires_grad_(True) for d in self.space.split(delta)]
            loss = self._batch_loss(batch, self.space.overrides(leaves))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            self.backwards += 1
            dense = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
            grad += self.space.flatten(dense).to(grad.dtype)
            total += float(loss.detach().double())
        return total, grad.to(self.dtype)

    def counts(self) -> dict[str, Any]:
        """Forward and backward passes so far, and the memory plan of the gradients where one was taken."""
        out: dict[str, Any] = {"forward_passes": self.forwards, "backward_passes": self.backwards}
        if self.plan is not None:
            out["memory"] = self.plan.meta()
        return out


# The clean loss and gradient of a model on a probe, shared by the measures that start from them (a
# report's sharpness kinds, PAC-Bayes): per model, keyed by what the value depends on, so a weight
# changed in place (its version counter) or another probe, space or plan is computed anew. A few
# entries per model: each value is one scalar or one vector of the space.
_CLEAN_VALUES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def _clean(model: nn.Module, key: tuple, compute: Any) -> Any:
    values = _CLEAN_VALUES.setdefault(model, {})
    if key not in values:
        if len(values) >= 8:
            values.pop(next(iter(values)))
        values[key] = compute()
    return values[key]


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
