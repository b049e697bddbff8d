"""Activation checkpointing for measures: each transformer layer is recomputed in backward, in eval mode.

A gradient (sharpness, finite-difference Hessian products) then holds each layer's input
instead of all its activations, and pays one more forward of the layers in the backward. A
Hessian-vector product by double backward gains little: its ``create_graph`` backward keeps
the recomputed activations of every layer for the second backward (benchmarks/checkpointing.py).

transformers checkpoints a layer only in train mode (dropout on), and its recompute reads the
layer's parameters when the backward runs, after ``torch.func.functional_call`` has put the
originals back: the recompute would see w, not the measured w + delta (gradients off the clean
point came out wrong by tens of percent). Here each layer's ``forward`` is wrapped with
non-reentrant :func:`torch.utils.checkpoint.checkpoint`, in whatever mode the model is in, and
the recompute runs the layer on the very tensors its forward saw (the overrides, with their
graph), so losses, gradients and double-backward Hessian products equal the plain ones to
round-off (tests/test_checkpointing.py). Forwards without gradients (loss grids,
``torch.no_grad``) run as they are.

:func:`enable_checkpointing` wraps a loaded model; :func:`checkpoint_loaded_models` makes
:func:`flatlora_analysis.loading.load_model` wrap every model it loads (``--gradient-checkpointing``).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from flatlora.errors import FlatLoraError

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""A layer's cache arguments, dropped when it is checkpointed (the recompute would write the cache twice)."""

INNER = "_flatlora_inner_forward"  # where a layer's own instance-level forward waits while it is wrapped
_DEFAULT: ContextVar[bool] = ContextVar("flatlora_checkpointing", default=False)
_SUSPENDED: ContextVar[bool] = ContextVar("flatlora_checkpointing_suspended", default=False)


def checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The modules a checkpoint wraps: transformers' per-layer blocks, outermost only.

    Those are ``GradientCheckpointingLayer``s (transformers 4.5x and later); in older versions, the
    entries of the layer lists beside a ``gradient_checkpointing`` flag.

    Args:
        model: A transformers model, or a peft model around one.

    Returns:
        The layers, in module order (empty for a model without any).
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = None
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if GradientCheckpointingLayer is not None and isinstance(module, GradientCheckpointingLayer):
            found.append((name, module))
        elif GradientCheckpointingLayer is None and hasattr(module, "gradient_checkpointing"):
            for child_name, child in module.named_children():
                if isinstance(child, nn.ModuleList):
                    found += [(f"{name}.{child_name}.{i}", layer) for i, layer in enumerate(child)]
    return [module for _, module in found]


def _is_wrapped(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def _held_tensors(layer: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """(owner dict, name, tensor) of every parameter and buffer of the layer, as they are now (overrides included)."""
    held = []
    for module in layer.modules():
        for store in (module._parameters, module._buffers):
            held += [(store, name, tensor) for name, tensor in store.items() if tensor is not None]
    return held


def _run_on(held: list[tuple[dict[str, Any], str, torch.Tensor]], forward: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)`` with the layer's tensors set to ``held`` (its forward's) and put back after."""
    swapped = [(store, name, store[name]) for store, name, tensor in held if store.get(name) is not tensor]
    try:
        for store, name, tensor in held:
            store[name] = tensor
        return forward(*args, **kwargs)
    finally:
        for store, name, original in swapped:
            store[name] = original


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover (transformers without cache classes)
        return False
    return isinstance(value, Cache)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward under a non-reentrant checkpoint whose recompute sees this call's tensors."""
    forward = self.__dict__.get(INNER) or type(self).forward.__get__(self)
    if not torch.is_grad_enabled() or _SUSPENDED.get():
        return forward(*args, **kwargs)
    args = tuple(None if _is_cache(a) else a for a in args)  # GPT-2 passes its cache by position
    kwargs = {k: None if k in CACHE_KWARGS or _is_cache(v) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    run = functools.partial(_run_on, _held_tensors(self), forward, **kwargs)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def enable_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer layer of ``model`` in the measures' gradients and Hessian products.

    Works in eval mode (dropout stays off) and through parameter overrides; calling it twice
    changes nothing. Undo with :func:`disable_checkpointing`.

    Args:
        model: A transformers model, or a peft model around one.

    Returns:
        How many layers are checkpointed.

    Raises:
        FlatLoraError: the model has no transformer layers to checkpoint.
    """
    layers = checkpoint_layers(model)
    if not layers:
        raise FlatLoraError(
            f"{type(model).__name__} has no transformer layers to checkpoint: drop --gradient-checkpointing"
        )
    for layer in layers:
        if not _is_wrapped(layer):
            if "forward" in layer.__dict__:  # an instance-level forward (accelerate's hooks): wrapped, not replaced
                layer.__dict__[INNER] = layer.__dict__["forward"]
            layer.forward = types.MethodType(_checkpointed_forward, layer)
    return len(layers)


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (a model without it is left alone)."""
    for module in model.modules():
        if _is_wrapped(module):
            del module.forward
            if INNER in module.__dict__:
                module.forward = module.__dict__.pop(INNER)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether :func:`enable_checkpointing` wraps any layer of ``model``."""
    return any(_is_wrapped(module) for module in model.modules())


def checkpointing_meta(model: nn.Module) -> dict[str, Any]:
    """What a result's ``meta`` records of checkpointing: ``{"checkpointing": {...}}``, or {} without it."""
    layers = sum(_is_wrapped(module) for module in model.modules())
    if not layers:
        return {}
    return {"checkpointing": {"layers": layers, "kind": "non-reentrant activation checkpointing"}}


@contextlib.contextmanager
def checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """``model`` with its layers checkpointed (``enabled``) for the body, as it was afterwards.

    Raises:
        FlatLoraError: ``enabled`` and the model has no transformer layers to checkpoint.
    """
    was = is_checkpointing(model)
    if enabled and not was:
        enable_checkpointing(model)
    try:
        yield model
    finally:
        if enabled and not was:
            disable_checkpointing(model)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Wrapped layers run plain in the body: for double-backward graphs, which checkpointing cannot shrink.

    A ``create_graph`` backward keeps every recomputed activation for the second backward, so
    a checkpointed Hessian-vector product holds as much as a plain one and pays extra forwards.
    """
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


@contextlib.contextmanager
def checkpoint_loaded_models(enabled: bool = True) -> Iterator[None]:
    """Every model :func:`flatlora_analysis.loading.load_model` loads in the body is checkpointed (``enabled``)."""
    token = _DEFAULT.set(enabled)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def checkpointed_command(command: Callable[[Any], int]) -> Callable[[Any], int]:
    """A CLI command run with its ``--gradient-checkpointing`` applied to every model it loads."""

    @functools.wraps(command)
    def run(args: Any) -> int:
        with checkpoint_loaded_models(getattr(args, "gradient_checkpointing", False)):
            return command(args)

    return run


def apply_default(model: nn.Module) -> nn.Module:
    """Checkpoint ``model`` where the context asks for it (:func:`checkpoint_loaded_models`); returns it."""
    if _DEFAULT.get():
        enable_checkpointing(model)
    return model


__all__ = [
    "CACHE_KWARGS",
    "apply_default",
    "checkpoint_layers",
    "checkpoint_loaded_models",
    "checkpointed_command",
    "checkpointing",
    "checkpointing_meta",
    "disable_checkpointing",
    "enable_checkpointing",
    "is_checkpointing",
    "suspended",
]
