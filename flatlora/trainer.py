"""Training loops: a plain loop over dict batches (tests, notebooks, the demo)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod

Batch = dict[str, Any]
BatchLossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The HF convention: the model computes its own loss from ``labels`` in the batch."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise FlatLoraError("the model returned no loss: put labels in the batch or pass loss_fn=")
    return out.loss


def to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    if device is None:
        return batch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Iterate again from the start when exhausted (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise FlatLoraError("the data loader yielded no batch: check the dataset is not empty")


def train_loop(
    model: torch.nn.Module,
    method: LoRAMethod,
    batches: Iterable[Batch],
    steps: int,
    *,
    loss_fn: BatchLossFn = model_loss,
    lr_scheduler: Any = None,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run ``steps`` optimizer steps of ``method``, cycling over ``batches``.

    Each step is ``method.train_step`` on one batch, so two-pass methods see the same batch
    twice. Returns one log record per step (``step``, ``lr``, ``loss`` and the method's
    quantities); ``callback`` gets each record as it is made.
    """
    if steps < 0:
        raise FlatLoraError(f"steps must be >= 0, got {steps}")
    model.train()
    records = []
    data = _cycle(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=method.name, unit="step")
    for _ in range(steps):
        batch = to_device(next(data), device)
        lr = method.param_groups[0]["lr"]
        record = method.train_step(lambda batch=batch: loss_fn(model, batch))
        record = {"step": method.steps_done, "lr": lr, **record}
        if lr_scheduler is not None:
            lr_scheduler.step()
        records.append(record)
        if callback is not None:
            callback(record)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    if bar is not None:
        bar.close()
    return records


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean loss per example (uneven batches weighted by size) and accuracy, in eval mode.

    Accuracy is reported for classification outputs (logits of shape (batch, classes)).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss, total, correct, classified = 0.0, 0, 0, 0
    try:
        for batch in batches:
            batch = to_device(batch, device)
            out = model(**batch)
            n = batch["labels"].shape[0]
            total_loss += float(out.loss) * n
            total += n
            if out.logits.dim() == 2:
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                classified += n
    finally:
        model.train(was_training)
    if total == 0:
        raise FlatLoraError("evaluation got no examples: check the evaluation set is not empty")
    result = {"loss": total_loss / total}
    if classified:
        result["accuracy"] = correct / classified
    return result


# ----------------------------------------------------------------------------- HF Trainer

PERTURBATION_SYNC = ("local", "global")


def _scalar_items(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _PopMethodLog(TrainerCallback):
    """Takes the method's log right after each optimizer step."""

    def __init__(self, trainer: FlatLoraTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


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
        unknown = set(method_kwargs) - (method_options(method) - {"base_optimizer", "lr", "optimizer_cls"})
        if unknown:
            raise FlatLoraError(
                f"option(s) {', '.join(sorted(unknown))} do not apply to method {method} under the Trainer: "
                "set the learning rate and optimizer in TrainingArguments"
            )
        if perturbation_sync not in PERTURBATION_SYNC:
            raise FlatLoraError(f"unknown perturbation_sync {perturbation_sync!r}: use local or global")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise FlatLoraError(
                "FlatLoraTrainer builds its own optimizer from method=...: pass the base optimizer "
                "through TrainingArguments (optim, learning_rate, weight_decay), not optimizers="
            )
        super().__init__(*args, **kwargs)
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
        self._records: list[dict[str, Any]] = []
        self._perturbed_losses: list[torch.Tensor] = []
        self._step_started = False
        self._diagnostics: dict[str, Any] | None = None
        self._loss_kwargs_unchecked = True
        self.add_callback(_PopMethodLog(self))

    # -- the optimizer -------------------------------------------------------------------------

    @property
    def method(self) -> LoRAMethod:
        """The flatlora method (the optimizer under accelerate's wrapper)."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, LoRAMethod):
            optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            raise FlatLoraError("the method is built when training starts: call train() first")
        return optimizer

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._num_training_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        if isinstance(self.optimizer, LoRAMethod):
            return self.optimizer
        base = super().create_optimizer(model)  # the base optimizer from TrainingArguments
        kwargs = dict(self.method_kwargs)
        if self.method_name != "lora":
            kwargs.setdefault("total_steps", self._num_training_steps or self.args.max_steps or None)
        self.optimizer = self._method_class(self.model if model is None else model, base, **kwargs)
        return self.optimizer

    # -- a step --------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        method = self.method
        if self._loss_kwargs_unchecked:
            self._loss_kwargs_unchecked = False
            self._check_model_uses_num_items(model, inputs, num_items_in_batch)
        if not self._step_started:  # the first micro-batch of an optimizer step
            self._step_started = True
            self._diagnose(method, model, inputs, num_items_in_batch)
        grads = None
        if method.two_pass:
            grads, clean = self._first_pass(method, model, inputs, num_items_in_batch)
        method.perturb(grads)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            method.restore()
        if method.two_pass:
            self._perturbed_losses.append(loss)
            # The Trainer's running "loss" is the clean loss, as in the plain loop.
            return clean
        return loss

    @torch.no_grad()
    def _check_model_uses_num_items(self, model, inputs, num_items_in_batch) -> None:
        """Stop passing ``num_items_in_batch`` to a model whose loss ignores it.

        The Trainer then skips its division by the accumulation steps, so a model that accepts
        ``**kwargs`` but takes a plain mean (BertForSequenceClassification, for one) would get
        gradients accumulation-steps times too large. Two eval-mode forwards, once per run.
        """
        if not self.model_accepts_loss_kwargs or num_items_in_batch is None or self.compute_loss_func is not None:
            return
        was_training = model.training
        model.eval()
        try:
            prepared = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                one = self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)
                two = self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch * 2)
        finally:
            model.train(was_training)
        if torch.equal(one, two):
            self.model_accepts_loss_kwargs = False

    def _sync_context(self, model):
        import contextlib

        if self.accelerator.num_processes > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def _scaled_like_training_step(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Scale a micro-batch loss the way the stock ``training_step`` scales its return value."""
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _first_pass(self, method: LoRAMethod, model, inputs, num_items_in_batch):
        prepared = self._prepare_inputs(inputs)
        model.train()
        with self._sync_context(model), self.compute_loss_context_manager():
            loss = self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
        grads = list(torch.autograd.grad(loss, method.factor_params, allow_unused=True))
        if self.perturbation_sync == "global" and self.accelerator.num_processes > 1:
            grads = self._all_reduce_mean(method, grads)
        return grads, self._scaled_like_training_step(loss.detach(), num_items_in_batch)

    def _all_reduce_mean(self, method: LoRAMethod, grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Average the first-pass gradients over ranks in one flat buffer (one collective call)."""
        import torch.distributed as dist

        dense = [torch.zeros_like(p) if g is None else g for p, g in zip(method.factor_params, grads)]
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.accelerator.num_processes
        out, offset = [], 0
        for g in dense:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def _diagnose(self, method: LoRAMethod, model, inputs, num_items_in_batch) -> None:
        prepared = self._prepare_inputs(inputs)

        def loss_fn():
            with self._sync_context(model), self.compute_loss_context_manager():
                return self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)

        self._diagnostics = method.diagnose(loss_fn)

    def _after_optimizer_step(self) -> None:
        record = self.method.pop_log(self._diagnostics)
        self._diagnostics = None
        if self._perturbed_losses:
            record["perturbed_loss"] = float(torch.stack(self._perturbed_losses).sum())
        self._perturbed_losses = []
        self._records.append(record)
        self._step_started = False

    # -- logging -------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the method's quantities, averaged over the steps since the last log."""
        if self._records and "loss" in logs:
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for record in self._records:
                for key, value in _scalar_items(record).items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
            for key, total in sums.items():
                logs.setdefault(key, total / counts[key])
            self._records = []
        super().log(logs, start_time)
