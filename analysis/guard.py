"""Measures never change a model: the context every measure runs in, and the proof that it held.

A measure evaluates through ``torch.func.functional_call`` with parameter overrides, so no
weight is ever written. :func:`measuring` puts the model in eval mode (dropout off) on the
requested device for the duration and restores mode and device afterwards; on the way out
it checks, at the cost of metadata only (no copy of any weight), that every parameter is the
same object, unmodified in place (its version counter), with the same ``requires_grad``,
dtype, device and ``.grad``. A change is a bug of this package: ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _grad_record(tensor: torch.Tensor) -> tuple[Any, ...]:
    grad = tensor.grad
    return (None,) if grad is None else (id(grad), grad._version, grad.dtype, grad.device)


def fingerprint(model: nn.Module, *, versions: bool = True) -> dict[str, tuple[Any, ...]]:
    """Identity, version, requires_grad, dtype, device and ``.grad`` of every parameter and buffer."""
    out: dict[str, tuple[Any, ...]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[f"param:{name}"] = (
            id(p),
            p._version if versions else None,
            p.requires_grad,
            p.dtype,
            p.device if versions else None,
            *_grad_record(p),
        )
    for name, b in model.named_buffers(remove_duplicate=False):
        out[f"buffer:{name}"] = (id(b), b._version if versions else None, b.dtype)
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means where the model already is."""
    return model_device(model) if device is None else torch.device(device)


@contextlib.contextmanager
def measuring(model: nn.Module, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Eval mode on ``device`` for the body; mode and device restored and verified afterwards.

    Yields the device the measure runs on. Raises ``RuntimeError`` if the body changed any
    parameter, buffer, ``.grad`` or ``requires_grad`` of the model.
    """
    target = resolve_device(model, device)
    original = model_device(model)
    moved = target != original
    modes = [(m, m.training) for m in model.modules()]
    before = fingerprint(model, versions=not moved)
    failed = False
    try:
        if moved:
            model.to(target)
        model.eval()
        yield target
    except BaseException:
        failed = True
        raise
    finally:
        if moved:
            model.to(original)
        for module, mode in modes:
            module.training = mode
        if not failed:
            after = fingerprint(model, versions=not moved)
            changed = [k for k in before if before[k] != after.get(k)] + [k for k in after if k not in before]
            if changed:
                raise RuntimeError(f"a measure changed the model it measured ({', '.join(changed[:3])}, ...)")
