"""Figure builders: plotly for the app, the HTML report and notebooks; matplotlib twins for PNGs."""

from analysis.plots.figures import (
    balance_figure,
    correlation_scatter_figure,
    curvature_bars_figure,
    density_figure,
    ema_error_figure,
    history_figure,
    landscape_1d_figure,
    landscape_2d_figure,
    layer_bars_figure,
    realized_norm_figure,
    sharpness_bars_figure,
)

__all__ = [
    "balance_figure",
    "correlation_scatter_figure",
    "curvature_bars_figure",
    "density_figure",
    "ema_error_figure",
    "history_figure",
    "landscape_1d_figure",
    "landscape_2d_figure",
    "layer_bars_figure",
    "realized_norm_figure",
    "sharpness_bars_figure",
]
