"""flatlora_analysis: measure how flat a LoRA adapter is. Never changes an adapter.

Every measure takes a peft LoRA model and a :class:`ProbeSet`, evaluates through
``torch.func.functional_call`` in eval mode, and leaves the model bit-identical.
"""

from flatlora_analysis.balance import BalanceResult, BalanceTrajectory, balance_trajectory, balancedness
from flatlora_analysis.checkpointing import checkpointing, disable_checkpointing, enable_checkpointing
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
    CurvatureResult,
    DensityResult,
    EigenResult,
    LayerCurvatureResult,
    TraceResult,
    curvature,
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
    "checkpointing",
    "disable_checkpointing",
    "enable_checkpointing",
    "load_model",
    "resolve_targets",
    # measures
    "adaptive_sharpness",
    "balance_trajectory",
    "balancedness",
    "curvature",
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
    "CurvatureResult",
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
