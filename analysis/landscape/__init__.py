"""Loss landscapes: directions (random, between adapters, trajectory PCA) and grids over them."""

from flatlora_analysis.landscape.directions import filter_normalize, random_directions
from flatlora_analysis.landscape.grid import LandscapeResult, interpolate, landscape_1d, landscape_2d, symmetric_grid
from flatlora_analysis.landscape.store import landscape_call, stored_landscape

__all__ = [
    "LandscapeResult",
    "filter_normalize",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "landscape_call",
    "random_directions",
    "stored_landscape",
    "symmetric_grid",
]
