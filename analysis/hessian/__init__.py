"""Hessian measures: an HVP operator kept apart from the algorithms that use it."""

from flatlora_analysis.hessian.density import broadened_density, slq
from flatlora_analysis.hessian.lanczos import (
    EigenEstimate,
    eigsh_eigenvalues,
    lanczos_eigenvalues,
    lanczos_tridiagonal,
    power_eigenvalues,
)
from flatlora_analysis.hessian.measures import (
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
from flatlora_analysis.hessian.operator import HessianOperator
from flatlora_analysis.hessian.operators import (
    DeflatedOperator,
    DenseOperator,
    Operator,
    ShiftedOperator,
    random_vectors,
)
from flatlora_analysis.hessian.shared import SharedCurvature, shared_curvature
from flatlora_analysis.hessian.suite import ENGINES, CurvatureResult, curvature
from flatlora_analysis.hessian.trace import hutchinson, hutchpp

__all__ = [
    "ENGINES",
    "CurvatureResult",
    "DeflatedOperator",
    "DenseOperator",
    "DensityResult",
    "EigenEstimate",
    "EigenResult",
    "HessianOperator",
    "LayerCurvatureResult",
    "Operator",
    "SharedCurvature",
    "ShiftedOperator",
    "TraceResult",
    "broadened_density",
    "curvature",
    "eigsh_eigenvalues",
    "hessian_operator",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_eigenvalues",
    "lanczos_tridiagonal",
    "layer_curvature",
    "power_eigenvalues",
    "random_vectors",
    "shared_curvature",
    "slq",
    "spectral_density",
    "top_eigenvalues",
]
