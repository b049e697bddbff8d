"""Radius schedules: rho decays from ``rho`` to ``rho_min`` over the run (METHODS.md section 5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flatlora.errors import FlatLoraError

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class RhoSchedule:
    """rho_t for step t = 0, 1, ... of a run of ``total_steps`` optimizer steps.

    ``constant`` keeps ``rho``; ``linear`` and ``cosine`` go from ``rho`` at t = 0 to
    ``rho_min`` at t = total_steps and stay there.
    """

    rho: float
    kind: str = "constant"
    rho_min: float = 0.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise FlatLoraError(f"unknown rho schedule {self.kind!r}: use one of {', '.join(SCHEDULES)}")
        if not self.rho >= 0:
            raise FlatLoraError(f"rho must be >= 0, got {self.rho}: pass a non-negative radius")
        if self.kind != "constant":
            if not 0 <= self.rho_min <= self.rho:
                raise FlatLoraError(
                    f"rho_min must lie in [0, rho] = [0, {self.rho}], got {self.rho_min}: lower rho_min"
                )
            if self.total_steps is None or self.total_steps < 1:
                raise FlatLoraError(
                    f"the {self.kind} rho schedule needs total_steps >= 1: pass the run's number of optimizer steps"
                )

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.rho
        progress = min(step / self.total_steps, 1.0)
        if self.kind == "linear":
            weight = 1.0 - progress
        else:
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.rho_min + (self.rho - self.rho_min) * weight
