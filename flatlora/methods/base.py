"""The shared base of every training method: a PyTorch optimizer that wraps a base optimizer.

A step has three phases, so that the plain loop and the HF Trainer drive methods the same way:

1. ``perturb(grads)``: move the weights to the point where the update's gradient is taken
   (two-pass methods get the first-pass gradients of :attr:`factor_params`; one-pass methods
   none); the clean weights are kept as clones;
2. forward and backward at that point (all gradient-accumulation micro-batches);
3. ``restore()`` copies the clean weights back, then ``step()`` updates.

:meth:`train_step` runs all of it for one batch from a loss function. The model at rest
always holds clean weights: a checkpoint, an evaluation or a crash never sees a perturbation.

Beside it: ``base_optimizer.py`` (the checks of the LoRA factors, the base optimizer),
``registry.py`` (the methods by name) and ``rng.py`` (replaying dropout masks).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from flatlora import log_keys as keys
from flatlora.base_dtype import add_weight_offset, clear_weight_offset
from flatlora.errors import FlatLoraError
from flatlora.lora import LoraPair, balancedness, find_lora_pairs
from flatlora.methods.base_optimizer import all_finite, build_base_optimizer, check_factors
from flatlora.methods.registry import register as register_method
from flatlora.schedules import RhoSchedule

LossFn = Callable[[], torch.Tensor]
STATE_KEY = "flatlora"
STATE_FORMAT = 1


class LoRAMethod(torch.optim.Optimizer):
    """Plain LoRA (METHODS.md section 1) and the base class of every sharpness-aware method.

    Args:
        model: a peft LoRA model.
        base_optimizer: the optimizer that updates the weights; by default ``optimizer_cls``
            (AdamW) over every parameter that requires grad, with ``lr`` and ``optimizer_kwargs``
            (which are refused alongside a given ``base_optimizer``, as they would be ignored).
        rho, rho_schedule, rho_min, total_steps: the radius and its schedule (section 5).
        adapter: the adapter to train; by default each layer's active adapters.

    A subclass sets ``name`` (it registers under it in :data:`flatlora.METHODS` when defined)
    and the flags ``two_pass``, ``uses_rho``, ``needs_plain_lora``, and overrides:

    * ``_perturbation(grads)``: the (tensor, delta) pairs of this step's pass (a base layer
      instead of a tensor: the delta is a float32 offset of its half-precision weight);
    * ``_before_update(rho)``: work between a finite backward and the base optimizer's step;
    * ``_extra_state()`` / ``_load_extra_state(extra)``: state beyond ``self.state``;
    * ``diagnose(loss_fn)``: optional measurements on the step's batch before its passes.

    Breaking the perturb / restore / step protocol (perturb twice, step while perturbed) is a
    bug and raises ``RuntimeError``; what a user can get wrong raises ``FlatLoraError``.
    """

    name: ClassVar[str] = "lora"  # every subclass sets its own (refused at class definition otherwise)
    two_pass: ClassVar[bool] = False  # needs a first forward/backward to build its perturbation
    uses_rho: ClassVar[bool] = False
    needs_plain_lora: ClassVar[bool] = False  # relies on W = W0 + s B A (refuses DoRA)

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        """Register a method class under its ``name``; ``register=False`` for an abstract helper class.

        Raises:
            TypeError: the class sets no ``name`` of its own, or the name is taken.
        """
        super().__init_subclass__(**kwargs)
        if register:
            register_method(cls)

    def __init__(
        self,
        model: torch.nn.Module,
        base_optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-3,
        rho: float = 0.05,
        rho_schedule: str = "constant",
        rho_min: float = 0.0,
        total_steps: int | None = None,
        adapter: str | None = None,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.pairs: list[LoraPair] = find_lora_pairs(model, adapter)
        check_factors(self.pairs, self.name, plain_lora=self.needs_plain_lora, perturbs=self.two_pass or self.uses_rho)
        self.base_optimizer = base_optimizer = build_base_optimizer(
            model, self.pairs, base_optimizer, lr=lr, optimizer_cls=optimizer_cls, optimizer_kwargs=optimizer_kwargs
        )
        self.schedule = RhoSchedule(rho, rho_schedule, rho_min, total_steps)
        # Optimizer.__init__ would register the base's groups a second time; __setstate__
        # sets up only the hook bookkeeping. param_groups is shared with the base (property).
        self.__setstate__({"defaults": base_optimizer.defaults, "state": defaultdict(dict)})
        self.factor_params: list[torch.Tensor] = [t for p in self.pairs for t in (p.A, p.B)]
        self.steps_done = 0
        self.steps_skipped = 0
        self._clean: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._log: dict[str, Any] = {}

    # -- the optimizer contract ------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update from the gradients in ``.grad`` (taken at the perturbed point, weights restored).

        A non-finite gradient skips the update and leaves the method's state unchanged.
        """
        if closure is not None:
            raise FlatLoraError(
                f"{self.name}.step() takes no closure: drive it with train_step(loss_fn), "
                "or perturb() / forward-backward / restore() / step()"
            )
        if self._clean:
            raise RuntimeError("step() called while the weights are perturbed: call restore() after the backward pass")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        rho = self.rho
        finite = all_finite(grads)
        if finite:
            self._before_update(rho)
            self.base_optimizer.step()
        self._end_step(rho, skipped=not finite)

    @torch.no_grad()
    def skip_step(self) -> None:
        """Account a step whose update was skipped outside the method, as step() does a non-finite one.

        An fp16 loss scaler that finds an overflow never calls step(); the Trainer calls this
        instead, so step counts, the rho schedule and the log match the plain loop.
        """
        if self._clean:
            raise RuntimeError("skip_step() called while the weights are perturbed: call restore() first")
        self._end_step(self.rho, skipped=True)

    def _end_step(self, rho: float, skipped: bool) -> None:
        if skipped:
            self.steps_skipped += 1
        self._log[keys.SKIPPED] = float(skipped)
        self.steps_done += 1
        if self.uses_rho:
            self._log[keys.RHO] = rho
        per_layer = balancedness(self.pairs)
        self._log.update({keys.BALANCEDNESS: per_layer.sum(), keys.BALANCEDNESS_PER_LAYER: per_layer})

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus this method's state under the key ``"flatlora"``."""
        state = self.base_optimizer.state_dict()
        index = self._param_index()
        state[STATE_KEY] = {
            "format": STATE_FORMAT,
            "method": self.name,
            "steps_done": self.steps_done,
            "steps_skipped": self.steps_skipped,
            "state": {index[id(p)]: dict(s) for p, s in self.state.items() if s},
            "extra": self._extra_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop(STATE_KEY, None)
        if own is None:
            raise FlatLoraError(
                f"this optimizer state was not saved by a flatlora method: resume {self.name} from a "
                "checkpoint written by flatlora, or start the run afresh"
            )
        if own.get("method") != self.name or own.get("format") != STATE_FORMAT:
            raise FlatLoraError(
                f"the optimizer state belongs to method {own.get('method')!r} (format {own.get('format')}), "
                f"not {self.name!r}: resume with --method {own.get('method')}"
            )
        self.base_optimizer.load_state_dict(state_dict)
        params = self._params()
        self.state = defaultdict(dict)
        for i, saved in own["state"].items():
            p = params[int(i)]
            # Kept in its saved dtype: an fp32 EMA of a bf16 parameter stays fp32.
            self.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved.items()}
        self.steps_done = int(own["steps_done"])
        self.steps_skipped = int(own["steps_skipped"])
        self._load_extra_state(own.get("extra", {}))

    # -- the phases of a step ----------------------------------------------------------------

    @property
    def rho(self) -> float:
        """rho_t for the current step."""
        return self.schedule(self.steps_done)

    @torch.no_grad()
    def perturb(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """Move the weights to this step's perturbed point, keeping clones of the clean ones.

        Two-pass methods need ``grads``: the first-pass gradients of :attr:`factor_params`.
        """
        if self._clean:
            raise RuntimeError("perturb() called twice without restore(): restore the weights first")
        if self.two_pass and grads is None:
            raise RuntimeError(f"{self.name} needs the first-pass gradients: call perturb(grads)")
        self._apply(self._perturbation(grads))

    @torch.no_grad()
    def _apply(self, moves: list[tuple[torch.Tensor | torch.nn.Module, torch.Tensor]]) -> None:
        """Add each delta to its tensor, keeping a clone of the clean tensor for restore().

        A move whose target is a layer (a half-precision base layer) carries its delta as a
        float32 offset of the layer's weight (:func:`flatlora.base_dtype.add_weight_offset`),
        which rounding to the base dtype would lose.
        """
        for target, delta in moves:
            if isinstance(target, torch.nn.Module):
                add_weight_offset(target, delta)
                self._clean.append((target, None))
                continue
            self._clean.append((target, target.detach().clone()))
            target.add_(delta.reshape(target.shape))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the clean weights back exactly (subtracting the perturbation would drift).

        In reverse order, so that a tensor moved twice (say, by two pairs) ends at its first clone.
        """
        for target, clean in reversed(self._clean):
            if clean is None:
                clear_weight_offset(target)
            else:
                target.copy_(clean)
        self._clean = []

    @property
    def perturbed(self) -> bool:
        return bool(self._clean)

    def diagnose(self, loss_fn: LossFn) -> dict[str, Any]:
        """Optional extra measurements on this step's batch before its passes (none by default)."""
        return {}

    def train_step(self, loss_fn: LossFn) -> dict[str, Any]:
        """One optimizer step on one batch; ``loss_fn()`` runs a forward pass and returns the loss.

        Returns the step's log: ``loss`` (the first forward of the step: the clean point for
        lora, lora-sam, flat-lora and bar, the EMA point for eflat-lora, the noisy point for
        rwp-lora), ``perturbed_loss`` for two-pass methods, and the method's quantities.
        """
        self.zero_grad(set_to_none=True)
        log = self.diagnose(loss_fn)
        grads = None
        if self.two_pass:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, self.factor_params, allow_unused=True)
            log[keys.LOSS] = loss.detach()
        self.perturb(grads)
        try:
            second = loss_fn()
            second.backward()
        finally:
            self.restore()
        log[keys.PERTURBED_LOSS if self.two_pass else keys.LOSS] = second.detach()
        self.step()
        return self.pop_log(log)

    def pop_log(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The quantities logged since the last call, as floats and lists of floats."""
        log, self._log = {**self._log, **(extra or {})}, {}
        out: dict[str, Any] = {}
        for key, value in log.items():
            if torch.is_tensor(value):
                value = value.detach().float().cpu()
                out[key] = value.item() if value.dim() == 0 else value.tolist()
            else:
                out[key] = value
        return out

    # -- what subclasses define ----------------------------------------------------------------

    def _perturbation(self, grads) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, delta) pairs to add for this step's pass; plain LoRA adds nothing."""
        return []

    def _before_update(self, rho: float) -> None:
        """Work between a finite backward and the base optimizer's step."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self._params())}

    def _factor_grads(self, grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split first-pass gradients (or ``.grad``) into per-layer gA, gB matrices; None -> 0."""
        if grads is None:
            grads = [t.grad for t in self.factor_params]
        mats = [(g if g is not None else torch.zeros_like(t)).flatten(1) for g, t in zip(grads, self.factor_params)]
        return mats[0::2], mats[1::2]


register_method(LoRAMethod)
