"""The training methods, one class each over :class:`LoRAMethod`, and a factory by name."""

from __future__ import annotations

import inspect

import torch

from flatlora.errors import FlatLoraError
from flatlora.methods.bar import BAR
from flatlora.methods.base import LoRAMethod
from flatlora.methods.eflat import EFlatLoRA
from flatlora.methods.flat import FlatLoRA
from flatlora.methods.registry import REGISTRY
from flatlora.methods.rwp import RWPLoRA
from flatlora.methods.sam import LoRASAM

BUILT_IN: tuple[type[LoRAMethod], ...] = (LoRAMethod, LoRASAM, FlatLoRA, EFlatLoRA, RWPLoRA, BAR)

METHODS: dict[str, type[LoRAMethod]] = REGISTRY
"""Every method class by name: the built-in ones in the order above, then any registered later."""
for _cls in BUILT_IN:  # the registry fills in import order; list the built-ins in the documented order
    METHODS[_cls.name] = METHODS.pop(_cls.name)


def method_options(name: str) -> set[str]:
    """The keyword options a method accepts (its own and the base class's)."""
    cls = get_method_class(name)
    options: set[str] = set()
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer:
            break
        if "__init__" in vars(klass):
            options |= {
                p.name
                for p in inspect.signature(klass.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")
            }
    return options - {"model"}


def get_method_class(name: str) -> type[LoRAMethod]:
    if name not in METHODS:
        raise FlatLoraError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, model: torch.nn.Module, **kwargs) -> LoRAMethod:
    """Build method ``name`` (``lora``, ``lora-sam``, ``flat-lora``, ``eflat-lora``, ``rwp-lora``, ``bar``)."""
    cls = get_method_class(name)
    unknown = set(kwargs) - method_options(name)
    if unknown:
        raise FlatLoraError(
            f"option(s) {', '.join(sorted(unknown))} do not apply to method {name}: "
            f"it takes {', '.join(sorted(method_options(name)))}"
        )
    return cls(model, **kwargs)


__all__ = ["BAR", "METHODS", "EFlatLoRA", "FlatLoRA", "LoRAMethod", "LoRASAM", "RWPLoRA", "make_method"]
