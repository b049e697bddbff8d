"""The method's quantities (METHODS.md section 7) under the HF Trainer: one record per optimizer
step, averaged over each logging interval into ``state.log_history``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from flatlora import log_keys as keys
from flatlora.methods.base import LoRAMethod


def _scalar_items(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MethodLog:
    """Collects each optimizer step's record: the method's log, its diagnostics, the perturbed loss."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.perturbed_losses: list[torch.Tensor] = []
        self.diagnostics: dict[str, Any] | None = None

    def end_step(self, method: LoRAMethod) -> None:
        """Take the method's log of the step just made (with its diagnostics and perturbed loss)."""
        record = method.pop_log(self.diagnostics)
        self.diagnostics = None
        if self.perturbed_losses:
            record[keys.PERTURBED_LOSS] = float(torch.stack(self.perturbed_losses).sum())
        self.perturbed_losses = []
        self.records.append(record)

    def pop_means(self) -> dict[str, float]:
        """The mean of every scalar quantity over the steps since the last call."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for record in self.records:
            for key, value in _scalar_items(record).items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        self.records = []
        return {key: total / counts[key] for key, total in sums.items()}


class PopMethodLog(TrainerCallback):
    """Takes the method's log right after each optimizer step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
