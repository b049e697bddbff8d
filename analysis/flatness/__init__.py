"""The generalization literature's flatness measures, beside :func:`flatlora_analysis.sharpness.sharpness`.

Three measures that large studies found to rank generalization best, each on a model and a
probe set, each returning a result object (larger = sharper for all three):

- :func:`adaptive_sharpness`: adaptive worst-case sharpness with logit normalization
  (Andriushchenko et al. 2023, "A modern look at the relationship between sharpness and
  generalization"): max L_n(w + delta) - L_n(w) over |delta_i| <= rho |w_i| (l-inf, or the l2
  ellipsoid), L_n the cross-entropy of the logits centered and divided by their l2 norm, so
  that rescaling the logits changes nothing;
- :func:`pac_bayes_flatness`: the magnitude-aware PAC-Bayes flatness of Jiang et al. 2020
  ("Fantastic generalization measures and where to find them"): the largest sigma for which
  Gaussian noise of per-coordinate std sqrt(sigma^2 w_i^2 + eps^2) raises the expected loss by
  at most ``target``, found by bisection, reported as 1 / sigma^2;
- :func:`relative_flatness`: kappa_Tr of Petzka et al. 2021 ("Relative flatness and
  generalization") on the layer that produces a classifier's logits:
  kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}), w_s the weights into output unit s and H_{s,s'}
  the Hessian block of the loss between rows s and s'.

Each measure is a module of this package (:mod:`.adaptive`, :mod:`.pac_bayes`,
:mod:`.relative`); their names are re-exported here.
"""

from flatlora_analysis.flatness.adaptive import adaptive_sharpness, logit_normalized, normalize_logits
from flatlora_analysis.flatness.common import FLATNESS, Progress, require_classifier
from flatlora_analysis.flatness.pac_bayes import PacBayesResult, noise_direction, pac_bayes_flatness, pac_bayes_sigma
from flatlora_analysis.flatness.relative import (
    RelativeFlatnessResult,
    relative_flatness,
    relative_flatness_from_features,
)

__all__ = [
    "FLATNESS",
    "PacBayesResult",
    "Progress",
    "RelativeFlatnessResult",
    "adaptive_sharpness",
    "logit_normalized",
    "noise_direction",
    "normalize_logits",
    "pac_bayes_flatness",
    "pac_bayes_sigma",
    "relative_flatness",
    "relative_flatness_from_features",
    "require_classifier",
]
