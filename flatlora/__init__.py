"""flatlora: sharpness-aware LoRA fine-tuning (LoRA-SAM, Flat-LoRA, EFlat-LoRA, ...) on peft models.

The names a notebook needs are exported here and imported on first use, so ``import flatlora``
stays light (no torch, transformers or peft until a name that needs them is touched).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from flatlora.errors import FlatLoraError

try:
    __version__ = metadata.version("flatlora")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS: dict[str, tuple[str, ...]] = {
    # methods
    "flatlora.methods": (
        "BAR",
        "METHODS",
        "EFlatLoRA",
        "FlatLoRA",
        "LoRAMethod",
        "LoRASAM",
        "RWPLoRA",
        "make_method",
    ),
    "flatlora.schedules": ("RhoSchedule",),
    "flatlora.lora": ("LoraPair", "find_lora_pairs"),
    "flatlora.perturbation": ("flat_lora_eps_b",),
    # training
    "flatlora.trainer": ("FlatLoraTrainer", "evaluate", "train_loop"),
    "flatlora.models": ("LoraOptions", "load_classifier"),
    "flatlora.adapters": ("load_adapter",),
    "flatlora.testing": ("tiny_batches", "tiny_model"),
    "flatlora.data": ("load_data", "make_few_shot"),
    # run directories
    "flatlora.runs": ("Run", "RunDir", "list_runs", "load_run"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "BAR",
    "METHODS",
    "EFlatLoRA",
    "FlatLoRA",
    "FlatLoraError",
    "FlatLoraTrainer",
    "LoRAMethod",
    "LoRASAM",
    "LoraOptions",
    "LoraPair",
    "RWPLoRA",
    "RhoSchedule",
    "Run",
    "RunDir",
    "__version__",
    "evaluate",
    "find_lora_pairs",
    "flat_lora_eps_b",
    "list_runs",
    "load_adapter",
    "load_classifier",
    "load_data",
    "load_run",
    "make_few_shot",
    "make_method",
    "tiny_batches",
    "tiny_model",
    "train_loop",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'flatlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from flatlora.adapters import load_adapter
    from flatlora.data import load_data, make_few_shot
    from flatlora.lora import LoraPair, find_lora_pairs
    from flatlora.methods import BAR, METHODS, EFlatLoRA, FlatLoRA, LoRAMethod, LoRASAM, RWPLoRA, make_method
    from flatlora.models import LoraOptions, load_classifier
    from flatlora.perturbation import flat_lora_eps_b
    from flatlora.runs import Run, RunDir, list_runs, load_run
    from flatlora.schedules import RhoSchedule
    from flatlora.testing import tiny_batches, tiny_model
    from flatlora.trainer import FlatLoraTrainer, evaluate, train_loop
