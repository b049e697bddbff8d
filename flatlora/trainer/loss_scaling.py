"""How the HF Trainer scales a micro-batch loss, and the check that a model's loss honours it.

The stock ``training_step`` divides the loss by the accumulation steps unless the loss was
already normalised by ``num_items_in_batch`` (by the model or by ``compute_loss_func``). A
model that accepts ``**kwargs`` but ignores ``num_items_in_batch`` would then get gradients
accumulation-steps times too large; :func:`model_ignores_num_items` finds such models.
"""

from __future__ import annotations

from typing import Any

import torch


def compute_loss(trainer: Any, model: torch.nn.Module, prepared: dict, num_items_in_batch: Any) -> torch.Tensor:
    """``trainer.compute_loss`` on a shallow copy of the prepared inputs.

    The stock ``compute_loss`` pops ``labels`` when a label smoother or ``compute_loss_func``
    is set, so a dict reused for a second forward (the check below, the first pass, the
    Theorem-2 closure) would reach the model without labels.
    """
    return trainer.compute_loss(model, dict(prepared), num_items_in_batch=num_items_in_batch)


@torch.no_grad()
def model_ignores_num_items(trainer: Any, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any) -> bool:
    """Whether the model's loss is the same for two different ``num_items_in_batch`` (so it ignores it).

    Two eval-mode forwards on the batch; False when the question does not arise (the model
    takes no loss kwargs, no count is given, or ``compute_loss_func`` computes the loss).
    """
    if not trainer.model_accepts_loss_kwargs or num_items_in_batch is None or trainer.compute_loss_func is not None:
        return False
    was_training = model.training
    model.eval()
    try:
        prepared = trainer._prepare_inputs(inputs)
        with trainer.compute_loss_context_manager():
            one = compute_loss(trainer, model, prepared, num_items_in_batch)
            two = compute_loss(trainer, model, prepared, num_items_in_batch * 2)
    finally:
        model.train(was_training)
    return bool(torch.equal(one, two))


def scaled_like_training_step(trainer: Any, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """Scale a micro-batch loss the way the stock ``training_step`` scales its return value."""
    if trainer.args.n_gpu > 1:
        loss = loss.mean()
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return loss if scaled else loss / trainer.current_gradient_accumulation_steps
