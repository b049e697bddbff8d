"""Gradient checkpointing in training: transformers' own, non-reentrant (``flatlora train --gradient-checkpointing``).

Each transformer layer keeps only its input in the forward and runs again in the backward,
which trades about one more forward per step for most of the activations' memory. Every
method stays exact under it: the recompute restores the RNG state of its forward (the same
dropout masks, ``preserve_rng_state``) and, in each pass, runs in the backward before the
method restores its clean weights (perturb -> forward -> backward -> restore), so SAM's and
Flat-LoRA's second pass, EFlat-LoRA's EMA point and RWP's noise are recomputed at the point
they were taken. Losses and adapters equal those of the run without it
(tests/test_checkpointing.py), which is why the option is not part of a run's identity.

transformers checkpoints a layer in train mode only; measures, which run in eval mode and
through parameter overrides, use :mod:`flatlora_analysis.checkpointing` instead.
"""

from __future__ import annotations

import torch

from flatlora.errors import FlatLoraError

CHECKPOINT_KWARGS = {"use_reentrant": False}
"""Passed to ``torch.utils.checkpoint.checkpoint``: non-reentrant, so no input needs ``requires_grad``."""


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on transformers' non-reentrant activation checkpointing of every layer of a (peft) model.

    It acts in train mode (evaluation and generation run as before). The input-embedding
    hook transformers adds for reentrant checkpointing is removed again: non-reentrant
    checkpoints need no input that requires grad.

    Args:
        model: A peft model, or a transformers model.

    Raises:
        FlatLoraError: the model does not support gradient checkpointing.
    """
    base = _transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise FlatLoraError(
            f"{type(base).__name__} does not support gradient checkpointing: train without --gradient-checkpointing"
        )
    hooked = bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    if not hooked and hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()


def is_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any layer of the (peft) model has transformers' checkpointing turned on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in _transformers_model(model).modules())


__all__ = ["CHECKPOINT_KWARGS", "enable_gradient_checkpointing", "is_gradient_checkpointing"]
