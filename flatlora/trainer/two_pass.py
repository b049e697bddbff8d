"""The first pass of a two-pass method under the HF Trainer (PITFALLS.md, "Two-pass methods").

The gradients of the LoRA factors are taken with ``torch.autograd.grad`` inside
``accelerator.no_sync`` and the loss-context manager, so the accumulated ``.grad`` and DDP's
gradient buckets are untouched; the second pass is the stock ``training_step``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from flatlora.methods.base import LoRAMethod
from flatlora.trainer.loss_scaling import compute_loss, scaled_like_training_step

PERTURBATION_SYNC = ("local", "global")


def sync_context(trainer: Any, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """``accelerator.no_sync(model)`` under several processes, else nothing."""
    if trainer.accelerator.num_processes > 1:
        return trainer.accelerator.no_sync(model)
    return contextlib.nullcontext()


def first_pass(
    trainer: Any, method: LoRAMethod, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The first-pass gradients of ``method.factor_params`` and the loss, scaled as the Trainer reports it.

    With ``perturbation_sync="global"`` the gradients are averaged over ranks, so every rank
    builds the perturbation of the global batch.
    """
    prepared = trainer._prepare_inputs(inputs)
    model.train()
    with sync_context(trainer, model), trainer.compute_loss_context_manager():
        loss = compute_loss(trainer, model, prepared, num_items_in_batch)
        if trainer.args.n_gpu > 1:
            loss = loss.mean()
    grads = _loss_scaled_grads(trainer.accelerator.scaler, loss, method.factor_params)
    if trainer.perturbation_sync == "global" and trainer.accelerator.num_processes > 1:
        grads = all_reduce_mean(method.factor_params, grads, trainer.accelerator.num_processes)
    return grads, scaled_like_training_step(trainer, loss.detach(), num_items_in_batch)


def _loss_scaled_grads(scaler: Any, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d loss / d params, through the fp16 loss scaler when there is one (as the second pass goes).

    Without it, fp16 activation gradients of a small loss underflow to zero and the
    perturbation vanishes. An overflow gives non-finite gradients, hence a non-finite second
    pass, and the scaler skips that step as it skips any other.
    """
    if scaler is None:
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    grads = torch.autograd.grad(scaler.scale(loss), params, allow_unused=True)
    inverse = 1.0 / scaler.get_scale()
    return [None if g is None else g * inverse for g in grads]


def all_reduce_mean(
    params: list[torch.Tensor], grads: list[torch.Tensor | None], num_processes: int
) -> list[torch.Tensor]:
    """Average gradients over ranks in one flat buffer (one collective call); None counts as zero."""
    import torch.distributed as dist

    dense = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    flat = torch.cat([g.reshape(-1) for g in dense])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= num_processes
    out, offset = [], 0
    for g in dense:
        out.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return out
