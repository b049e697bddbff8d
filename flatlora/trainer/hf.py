"""``FlatLoraTrainer``: the HF Trainer driving any flatlora method (DDP included)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod
from flatlora.precision import enable_cpu_fp16
from flatlora.trainer.loss_scaling import compute_loss, model_ignores_num_items
from flatlora.trainer.method_log import MethodLog, PopMethodLog
from flatlora.trainer.two_pass import PERTURBATION_SYNC, first_pass, sync_context


class FlatLoraTrainer(Trainer):
    """The HF Trainer driving any flatlora method (``lora``, ``flat-lora``, ``eflat-lora``, ...).

    Each micro-batch: one-pass methods apply their perturbation (EFlat-LoRA's EMA, RWP's
    noise) around the stock ``training_step``; two-pass methods first take the gradients of
    the LoRA factors with ``torch.autograd.grad`` inside ``accelerator.no_sync`` and the
    loss-context manager (the accumulated ``.grad`` is untouched), perturb, then run the stock
    ``training_step`` for the second pass (keeping gradient-accumulation scaling and
    ``num_items_in_batch``). The clean weights are copied back before the step, so gradient
    clipping, the optimizer step, checkpoints and evaluation only ever see clean weights.
    Under gradient accumulation the perturbation is applied per micro-batch: EFlat-LoRA's EMA
    and RWP's noise are the same for every micro-batch of a step; a two-pass method perturbs
    each micro-batch along that micro-batch's own first-pass gradient.

    Args:
        method: a method name of :data:`flatlora.METHODS`.
        method_kwargs: its options (rho, rho_schedule, beta, ...); ``lr`` and the base
            optimizer come from ``TrainingArguments`` (``optim``, ``learning_rate``, ...).
        perturbation_sync: ``"local"`` (each rank perturbs from its own first-pass gradient:
            SAM's m-sharpness) or ``"global"`` (first-pass gradients are all-reduced, so every
            rank uses the perturbation of the global batch). One-pass methods build theirs
            from the already averaged gradients, so they are global either way.

    The method's state (EFlat-LoRA's EMA, RWP's generator, steps done) is part of the
    optimizer's ``state_dict``, so Trainer checkpoints resume it. The method's quantities
    (METHODS.md section 7) are averaged over the steps of each logging interval and reach
    ``state.log_history``; ``loss`` is the first forward of each step, as in the plain loop.
    """

    def __init__(
        self,
        *args: Any,
        method: str = "lora",
        method_kwargs: dict[str, Any] | None = None,
        perturbation_sync: str = "local",
        **kwargs: Any,
    ) -> None:
        from flatlora.methods import get_method_class, method_options

        cls = get_method_class(method)
        method_kwargs = dict(method_kwargs or {})
        base_options = {"base_optimizer", "lr", "optimizer_cls", "optimizer_kwargs"}  # TrainingArguments' business
        unknown = set(method_kwargs) - (method_options(method) - base_options)
        if unknown:
            raise FlatLoraError(
                f"option(s) {', '.join(sorted(unknown))} do not apply to method {method} under the Trainer: "
                "set the learning rate and the base optimizer in TrainingArguments "
                "(learning_rate, optim, optim_args, weight_decay, adam_beta1, ...)"
            )
        if perturbation_sync not in PERTURBATION_SYNC:
            raise FlatLoraError(f"unknown perturbation_sync {perturbation_sync!r}: use local or global")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise FlatLoraError(
                "FlatLoraTrainer builds its own optimizer from method=...: pass the base optimizer "
                "through TrainingArguments (optim, learning_rate, weight_decay), not optimizers="
            )
        super().__init__(*args, **kwargs)
        enable_cpu_fp16(self.accelerator)  # fp16 on CPU: autocast and a loss scaler, or a one-line refusal
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise FlatLoraError(
                "flatlora methods need whole LoRA factors and their gradients, which DeepSpeed and FSDP shard: "
                "train with DDP (torchrun / accelerate launch without a DeepSpeed or FSDP config)"
            )
        self.method_name = cls.name
        self.method_kwargs = method_kwargs
        self.perturbation_sync = perturbation_sync
        self._method_class = cls
        self._num_training_steps: int | None = None
        self._method_log = MethodLog()
        self._step_started = False
        self._loss_kwargs_unchecked = True
        self.add_callback(PopMethodLog(self))

    # -- the optimizer -------------------------------------------------------------------------

    @property
    def method(self) -> LoRAMethod:
        """The flatlora method (the optimizer under accelerate's wrapper)."""
        method = self._built_method()
        if method is None:
            raise FlatLoraError("the method is built when training starts: call train() first")
        return method

    def _built_method(self) -> LoRAMethod | None:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, LoRAMethod):
            optimizer = getattr(optimizer, "optimizer", None)
        return optimizer

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._num_training_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        built = self._built_method()
        if built is not None:  # a second train(): go on with the same method, as the stock Trainer does
            self.optimizer = built  # unwrapped, so that accelerate wraps it once
            return built
        base = super().create_optimizer(model)  # the base optimizer from TrainingArguments
        kwargs = dict(self.method_kwargs)
        if self.method_name != "lora":
            kwargs.setdefault("total_steps", self._total_steps())
        self.optimizer = self._method_class(self.model if model is None else model, base, **kwargs)
        return self.optimizer

    def _total_steps(self) -> int | None:
        """The run's optimizer steps, however the Trainer came to know them.

        transformers calls ``create_optimizer`` directly (not ``create_optimizer_and_scheduler``)
        after setting ``state.max_steps``, which covers epoch-based runs (``max_steps=-1``).
        """
        for steps in (self._num_training_steps, self.state.max_steps, self.args.max_steps):
            if steps is not None and steps > 0:
                return int(steps)
        return None

    # -- a step --------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        method = self.method
        if self._loss_kwargs_unchecked:
            self._loss_kwargs_unchecked = False
            if model_ignores_num_items(self, model, inputs, num_items_in_batch):
                self.model_accepts_loss_kwargs = False
        if not self._step_started:  # the first micro-batch of an optimizer step
            self._step_started = True
            self._diagnose(method, model, inputs, num_items_in_batch)
        grads = None
        if method.two_pass:
            grads, clean = first_pass(self, method, model, inputs, num_items_in_batch)
        method.perturb(grads)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            method.restore()
        if method.two_pass:
            self._method_log.perturbed_losses.append(loss)
            # The Trainer's running "loss" is the clean loss, as in the plain loop.
            return clean
        return loss

    def _diagnose(self, method: LoRAMethod, model, inputs, num_items_in_batch) -> None:
        """The method's optional check on this step's batch, in train mode like the step itself
        (the stock training_step sets it only later; a fresh model or an evaluation leaves eval mode)."""
        model.train()
        prepared = self._prepare_inputs(inputs)

        def loss_fn():
            with sync_context(self, model), self.compute_loss_context_manager():
                return compute_loss(self, model, prepared, num_items_in_batch)

        self._method_log.diagnostics = method.diagnose(loss_fn)

    def _after_optimizer_step(self) -> None:
        method = self.method
        if self.accelerator.optimizer_step_was_skipped:  # the fp16 loss scaler found an overflow
            method.skip_step()
        self._method_log.end_step(method)
        self._step_started = False

    # -- logging -------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the method's quantities, averaged over the steps since the last log."""
        if self._method_log.records and keys.LOSS in logs:
            means = self._method_log.pop_means()
            if self.accelerator.num_processes > 1:
                means = self._mean_over_ranks(means)
            for key, value in means.items():
                logs.setdefault(key, value)
        super().log(logs, start_time)

    def _mean_over_ranks(self, means: dict[str, float]) -> dict[str, float]:
        """Average the method's quantities over ranks (every rank logs the same keys at the same step).

        Per-rank figures (a two-pass method's perturbed loss on the rank's share of the batch)
        then read as the global batch's, as the Trainer's own loss does.
        """
        names = sorted(means)
        values = torch.tensor([means[k] for k in names], dtype=torch.float64, device=self.args.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))
