"""Balancedness ||A_l||_F^2 - ||B_l||_F^2 per LoRA layer and summed (the paper's Theorem 1).

From a peft model, from a saved adapter folder alone (no base model: the tensors are read
with ``peft.utils.load_peft_weights``), or along a run's saved trajectory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.results import Result

_FACTOR_KEYS = ((".lora_A.", ".lora_B."), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass(frozen=True)
class BalanceResult(Result):
    """Per layer ||A||^2, ||B||^2 and their difference; ``total`` is the sum of differences."""

    layers: list[str]
    a_sq: np.ndarray
    b_sq: np.ndarray
    total: float
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("a_sq", "b_sq")

    @property
    def per_layer(self) -> np.ndarray:
        return self.a_sq - self.b_sq


@dataclass(frozen=True)
class BalanceTrajectory(Result):
    """Balancedness at each saved step of a run: ``per_layer[t, l]`` and ``total[t]``."""

    steps: np.ndarray
    layers: list[str]
    per_layer: np.ndarray
    total: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("steps", "per_layer", "total")


def _natural(key: str) -> list[Any]:
    """Sort key that orders layer.2 before layer.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _pairs_from_tensors(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer, A, B) for every LoRA factor pair among state-dict tensors, in key order."""
    out = []
    for key in sorted(tensors, key=_natural):
        for a_tag, b_tag in _FACTOR_KEYS:
            if a_tag in key:
                b_key = key.replace(a_tag, b_tag)
                if b_key not in tensors:
                    raise FlatLoraError(f"the adapter holds {key} but not {b_key}: the adapter file is incomplete")
                layer = key.split(a_tag)[0]
                out.append((layer, tensors[key], tensors[b_key]))
    return out


def _result(pairs, source: str) -> BalanceResult:
    if not pairs:
        raise FlatLoraError(f"{source} holds no LoRA factors (lora_A/lora_B): pass a LoRA adapter")
    a_sq = np.array([float(a.detach().double().square().sum()) for _, a, _ in pairs])
    b_sq = np.array([float(b.detach().double().square().sum()) for _, _, b in pairs])
    return BalanceResult([name for name, _, _ in pairs], a_sq, b_sq, float((a_sq - b_sq).sum()), {"source": source}, {})


def balancedness(source: nn.Module | str | Path | Mapping[str, torch.Tensor]) -> BalanceResult:
    """Per-layer ||A_l||_F^2 - ||B_l||_F^2 and their sum.

    Args:
        source: a peft LoRA model, a saved adapter folder (no base model needed), or a
            state dict of adapter tensors.

    Raises:
        FlatLoraError: no LoRA factors, or an unreadable adapter folder.
    """
    if isinstance(source, nn.Module):
        from flatlora.lora import find_lora_pairs

        found = find_lora_pairs(source)
        single = len({p.adapter for p in found}) == 1
        pairs = [(p.name.rsplit("[", 1)[0] if single else p.name, p.A, p.B) for p in found]
        return _result(pairs, "model")
    if isinstance(source, (str, Path)):
        from flatlora.adapters import read_adapter_weights

        return _result(_pairs_from_tensors(read_adapter_weights(source)), str(source))
    return _result(_pairs_from_tensors(source), "tensors")


def trajectory_steps(run_path: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every adapter saved in a run's trajectory/, in step order."""
    folder = Path(run_path) / "trajectory"
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            head, _, number = child.name.partition("-")
            if head == "step" and number.isdigit() and (child / "adapter_config.json").is_file():
                found.append((int(number), child))
    return sorted(found)


def balance_trajectory(run: str | Path | Any) -> BalanceTrajectory:
    """Balancedness at every saved trajectory step of a run (``flatlora train --trajectory-every N``).

    Raises:
        FlatLoraError: the run saved no trajectory.
    """
    path = Path(getattr(run, "path", run))
    steps = trajectory_steps(path)
    if not steps:
        raise FlatLoraError(f"{path} has no saved trajectory: train with --trajectory-every N")
    results = [balancedness(folder) for _, folder in steps]
    per_layer = np.stack([r.per_layer for r in results])
    return BalanceTrajectory(
        np.array([s for s, _ in steps]), results[0].layers, per_layer, per_layer.sum(1), {"run": str(path)}, {}
    )
