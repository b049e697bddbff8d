"""The result types of the Hessian measures: top eigenvalues, trace, spectral density, per-layer curvature.

Frozen dataclasses of numbers and arrays (:class:`flatlora_analysis.results.Result`), what
:mod:`flatlora_analysis.hessian.measures` and the shared engine return alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flatlora_analysis.results import Result


@dataclass(frozen=True)
class EigenResult(Result):
    """Top eigenvalues of the Hessian in a space, descending; ``hvps`` products used."""

    eigenvalues: np.ndarray
    hvps: int
    converged: bool
    errors: np.ndarray = field(default_factory=lambda: np.empty(0))
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("eigenvalues", "errors")

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])


@dataclass(frozen=True)
class TraceResult(Result):
    """tr(H) in a space with its standard error."""

    trace: float
    stderr: float
    hvps: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DensityResult(Result):
    """SLQ nodes and weights (runs x steps) and the Gaussian-broadened density on ``grid``."""

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    hvps: int
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("nodes", "weights", "grid", "density")


@dataclass(frozen=True)
class LayerCurvatureResult(Result):
    """Per layer (Hessian diagonal block): top eigenvalue and trace with its standard error."""

    layers: list[str]
    eigenvalues: np.ndarray
    traces: np.ndarray
    trace_stderr: np.ndarray
    hvps: int
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("eigenvalues", "traces", "trace_stderr")
