"""Figure builders: plotly for the app, the HTML report and notebooks; matplotlib twins for PNGs."""

from flatlora_analysis.plots.figures import (
    correlation_scatter_figure,
    curvature_bars_figure,
    density_figure,
    landscape_1d_figure,
    landscape_2d_figure,
    layer_bars_figure,
    sharpness_bars_figure,
)
from flatlora_analysis.plots.png import (
    balance_png,
    correlation_scatter_png,
    density_png,
    ema_error_png,
    history_png,
    landscape_1d_png,
    landscape_2d_png,
    layer_bars_png,
    realized_norm_png,
    sharpness_bars_png,
)
from flatlora_analysis.plots.study import (
    beta_sweep_figure,
    beta_sweep_png,
    prediction_figure,
    prediction_png,
    realized_ratio_figure,
    realized_ratio_png,
)
from flatlora_analysis.plots.training import balance_figure, ema_error_figure, history_figure, realized_norm_figure

__all__ = [
    "balance_figure",
    "balance_png",
    "beta_sweep_figure",
    "beta_sweep_png",
    "correlation_scatter_figure",
    "correlation_scatter_png",
    "curvature_bars_figure",
    "density_figure",
    "density_png",
    "ema_error_figure",
    "ema_error_png",
    "history_figure",
    "history_png",
    "landscape_1d_figure",
    "landscape_1d_png",
    "landscape_2d_figure",
    "landscape_2d_png",
    "layer_bars_figure",
    "layer_bars_png",
    "prediction_figure",
    "prediction_png",
    "realized_norm_figure",
    "realized_norm_png",
    "realized_ratio_figure",
    "realized_ratio_png",
    "sharpness_bars_figure",
    "sharpness_bars_png",
]
