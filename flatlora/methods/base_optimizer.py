"""What a method wraps: the LoRA factors it may perturb and the base optimizer that updates them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from flatlora.errors import FlatLoraError
from flatlora.lora import LoraPair, require_plain_lora


def check_factors(pairs: list[LoraPair], method: str, *, plain_lora: bool, perturbs: bool) -> None:
    """Refuse LoRA factors that method ``method`` cannot work on.

    Args:
        pairs: the model's LoRA factor pairs.
        method: the method's name, for the messages.
        plain_lora: the method relies on W = W0 + s B A (refuses DoRA and the like).
        perturbs: the method perturbs the factors, so they must require grad.

    Raises:
        FlatLoraError: a factor pair is not plain LoRA, or a perturbed factor does not require grad.
    """
    if plain_lora:
        require_plain_lora(pairs, method)
    if perturbs:
        frozen = [p.name for p in pairs if not (p.A.requires_grad and p.B.requires_grad)]
        if frozen:
            raise FlatLoraError(
                f"{method} perturbs LoRA factors that do not require grad ({frozen[0]}, ...): "
                "train the adapter with is_trainable=True / requires_grad_(True)"
            )


def build_base_optimizer(
    model: torch.nn.Module,
    pairs: list[LoraPair],
    base_optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float = 1e-3,
    optimizer_cls: type[torch.optim.Optimizer] | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer that updates the weights: ``base_optimizer``, checked, or a new one.

    Args:
        model: the peft LoRA model.
        pairs: its LoRA factor pairs, which the optimizer must hold.
        base_optimizer: an optimizer built by the caller; by default ``optimizer_cls`` (AdamW)
            over every parameter that requires grad, with ``lr`` and ``optimizer_kwargs``.
        lr: the learning rate of a new optimizer.
        optimizer_cls: the class of a new optimizer.
        optimizer_kwargs: more options of a new optimizer.

    Raises:
        FlatLoraError: ``optimizer_cls`` or ``optimizer_kwargs`` beside ``base_optimizer`` (they
            would be ignored), no trainable parameter, ``lr`` not positive, or an optimizer that
            does not hold the trainable LoRA factors.
    """
    if base_optimizer is not None and (optimizer_cls is not None or optimizer_kwargs):
        given = "optimizer_cls" if optimizer_cls is not None else "optimizer_kwargs"
        raise FlatLoraError(
            f"{given} builds the base optimizer, but base_optimizer= is given and would ignore it: "
            "set those options where you build base_optimizer, or drop base_optimizer="
        )
    if base_optimizer is None:
        optimizer_cls = optimizer_cls or torch.optim.AdamW
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise FlatLoraError("the model has no parameter that requires grad: load the adapter as trainable")
        if not lr > 0:
            raise FlatLoraError(f"lr must be > 0, got {lr}: pass a positive learning rate")
        base_optimizer = optimizer_cls(trainable, lr=lr, **(optimizer_kwargs or {}))
    in_optimizer = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
    missing = [p.name for p in pairs if p.A.requires_grad and id(p.A) not in in_optimizer]
    if missing:
        raise FlatLoraError(
            f"the base optimizer does not hold the LoRA factors of {missing[0]}: "
            "build it over the model's trainable parameters"
        )
    return base_optimizer


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """All entries finite; one device sync per device rather than one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        flags[t.device].append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())
