"""What the flatness measures share: their names, the progress callback, the classifier check."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.probe import ProbeSet

FLATNESS = ("adaptive-worst", "pac-bayes", "relative")
Progress = Callable[[int, int], None]


def require_classifier(probe: ProbeSet, measure: str) -> None:
    """Refuse probe sets that are not single-label classification with the model's own loss.

    Args:
        probe: the probe set to check.
        measure: the measure's name, for the message.

    Raises:
        FlatLoraError: a token-weighted (causal-LM) probe set, a custom ``loss_fn``, or labels
            that are not one class index per example.
    """
    if probe.weighting != "examples":
        raise FlatLoraError(f"{measure} applies to classifiers; this probe set is a causal-LM one (token-weighted)")
    if probe.loss_fn is not None:
        raise FlatLoraError(f"{measure} needs the model's cross-entropy: pass a probe set without loss_fn=")
    for batch in probe.batches:
        labels = batch.get("labels")
        if not (torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point()):
            raise FlatLoraError(f"{measure} applies to single-label classifiers: probe labels must be class indices")
