"""Loss landscapes: directions (random, between adapters, trajectory PCA) and grids over them."""

from flatlora_analysis.landscape.directions import filter_normalize, random_directions
from flatlora_analysis.landscape.grid import LandscapeResult, interpolate, landscape_1d, landscape_2d, symmetric_grid
from flatlora_analysis.landscape.store import cached_landscape, load_landscape, save_landscape

__all__ = [
    "LandscapeResult",
    "cached_landscape",
    "filter_normalize",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "load_landscape",
    "random_directions",
    "save_landscape",
    "symmetric_grid",
]
