"""flatlora: sharpness-aware LoRA fine-tuning (LoRA-SAM, Flat-LoRA, EFlat-LoRA, ...) on peft models."""

from flatlora.errors import FlatLoraError
from flatlora.lora import LoraPair, find_lora_pairs
from flatlora.methods import (
    BAR,
    METHODS,
    EFlatLoRA,
    FlatLoRA,
    LoRAMethod,
    LoRASAM,
    RWPLoRA,
    make_method,
)
from flatlora.perturbation import flat_lora_eps_b
from flatlora.schedules import RhoSchedule

__version__ = "0.1.0"

__all__ = [
    "BAR",
    "METHODS",
    "EFlatLoRA",
    "FlatLoRA",
    "FlatLoraError",
    "LoRAMethod",
    "LoRASAM",
    "LoraPair",
    "RWPLoRA",
    "RhoSchedule",
    "find_lora_pairs",
    "flat_lora_eps_b",
    "make_method",
]
