"""flatlora_analysis: measure how flat a LoRA adapter is. Never changes an adapter.

Every measure takes a peft LoRA model and a :class:`ProbeSet`, evaluates through
``torch.func.functional_call`` in eval mode, and leaves the model bit-identical. The names
below are imported on first use (as ``flatlora``'s are), so importing one module of the
package, or the package for its command-line front, does not import every measure.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "flatlora_analysis.balance": ("BalanceResult", "BalanceTrajectory", "balance_trajectory", "balancedness"),
    "flatlora_analysis.correlation": ("CorrelationResult", "correlate", "correlation_table", "granulated_kendall"),
    "flatlora_analysis.ema_error": ("EmaErrorResult", "ema_error_at_checkpoint", "ema_error_series", "ema_norm_ratio"),
    "flatlora_analysis.flatness": (
        "PacBayesResult",
        "RelativeFlatnessResult",
        "adaptive_sharpness",
        "pac_bayes_flatness",
        "relative_flatness",
    ),
    "flatlora_analysis.guard": ("measuring",),
    "flatlora_analysis.hessian": (
        "DensityResult",
        "EigenResult",
        "LayerCurvatureResult",
        "TraceResult",
        "hessian_operator",
        "hessian_trace",
        "layer_curvature",
        "spectral_density",
        "top_eigenvalues",
    ),
    "flatlora_analysis.landscape": ("LandscapeResult", "interpolate", "landscape_1d", "landscape_2d"),
    "flatlora_analysis.loading": ("Target", "load_model", "resolve_targets"),
    "flatlora_analysis.objective": ("ModelObjective", "evaluate_loss"),
    "flatlora_analysis.probe": ("ProbeSet",),
    "flatlora_analysis.results": ("Result",),
    "flatlora_analysis.sharpness": ("SharpnessResult", "sharpness"),
    "flatlora_analysis.spaces": ("SPACES", "Space", "build_space"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    # probe sets, spaces and evaluation
    "SPACES",
    "ModelObjective",
    "ProbeSet",
    "Space",
    "build_space",
    "evaluate_loss",
    "measuring",
    # loading runs and adapters
    "Target",
    "load_model",
    "resolve_targets",
    # measures
    "adaptive_sharpness",
    "balance_trajectory",
    "balancedness",
    "ema_error_at_checkpoint",
    "ema_error_series",
    "ema_norm_ratio",
    "hessian_operator",
    "hessian_trace",
    "layer_curvature",
    "pac_bayes_flatness",
    "relative_flatness",
    "sharpness",
    "spectral_density",
    "top_eigenvalues",
    # landscapes
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    # sharpness vs generalization
    "correlate",
    "correlation_table",
    "granulated_kendall",
    # results
    "BalanceResult",
    "BalanceTrajectory",
    "CorrelationResult",
    "DensityResult",
    "EigenResult",
    "EmaErrorResult",
    "LandscapeResult",
    "LayerCurvatureResult",
    "PacBayesResult",
    "RelativeFlatnessResult",
    "Result",
    "SharpnessResult",
    "TraceResult",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'flatlora_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from flatlora_analysis.balance import BalanceResult, BalanceTrajectory, balance_trajectory, balancedness
    from flatlora_analysis.correlation import CorrelationResult, correlate, correlation_table, granulated_kendall
    from flatlora_analysis.ema_error import EmaErrorResult, ema_error_at_checkpoint, ema_error_series, ema_norm_ratio
    from flatlora_analysis.flatness import (
        PacBayesResult,
        RelativeFlatnessResult,
        adaptive_sharpness,
        pac_bayes_flatness,
        relative_flatness,
    )
    from flatlora_analysis.guard import measuring
    from flatlora_analysis.hessian import (
        DensityResult,
        EigenResult,
        LayerCurvatureResult,
        TraceResult,
        hessian_operator,
        hessian_trace,
        layer_curvature,
        spectral_density,
        top_eigenvalues,
    )
    from flatlora_analysis.landscape import LandscapeResult, interpolate, landscape_1d, landscape_2d
    from flatlora_analysis.loading import Target, load_model, resolve_targets
    from flatlora_analysis.objective import ModelObjective, evaluate_loss
    from flatlora_analysis.probe import ProbeSet
    from flatlora_analysis.results import Result
    from flatlora_analysis.sharpness import SharpnessResult, sharpness
    from flatlora_analysis.spaces import SPACES, Space, build_space
