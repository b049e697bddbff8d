"""Relative flatness kappa_Tr (Petzka et al. 2021, "Relative flatness and generalization").

On the layer that produces a classifier's logits: kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}),
w_s the weights into output unit s and H_{s,s'} the Hessian block of the loss between rows s and s'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.flatness.common import require_classifier
from flatlora_analysis.guard import measuring
from flatlora_analysis.probe import ProbeSet, batch_size_of
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.results import Result


@dataclass(frozen=True)
class RelativeFlatnessResult(Result):
    """Relative flatness kappa_Tr of the logit layer (larger = sharper).

    ``trace_blocks`` (C, C) holds Tr(H_{s,s'}); ``gram`` (C, C) holds <w_s, w_s'>;
    ``value = sum(gram * trace_blocks)``.
    """

    value: float
    layer: str
    trace_blocks: np.ndarray
    gram: np.ndarray
    clean_loss: float
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    _arrays = ("trace_blocks", "gram")


def relative_flatness_from_features(
    features: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, example_weights: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """kappa_Tr of a linear softmax layer in closed form; returns (kappa, trace_blocks, gram).

    For L = sum_e a_e CE(W phi_e + b, y_e), the Hessian in W is
    sum_e a_e (diag(p_e) - p_e p_e^T) kron (phi_e phi_e^T), so
    Tr(H_{s,s'}) = sum_e a_e ||phi_e||^2 (diag(p_e) - p_e p_e^T)_{s,s'}.

    Args:
        features: (N, d) inputs phi_e of the layer.
        probs: (N, C) softmax probabilities p_e.
        weight: (C, d) the layer's weight W (row s = w_s).
        example_weights: (N,) a_e (1/N for a mean).
    """
    phi2 = (features.double() ** 2).sum(dim=1) * example_weights.double()  # (N,)
    p = probs.double()
    trace_blocks = torch.diag((phi2[:, None] * p).sum(0)) - torch.einsum("e,es,et->st", phi2, p, p)
    w = weight.double()
    gram = w @ w.T
    return float((gram * trace_blocks).sum()), trace_blocks, gram


def _logit_layer(model: nn.Module, batch: dict[str, Any], logits: torch.Tensor, layer: str | None) -> str:
    """The name of the nn.Linear whose output is the logits (the last one called, among equals)."""
    modules = dict(model.named_modules())
    if layer is not None:
        if not isinstance(modules.get(layer), nn.Linear):
            raise FlatLoraError(f"layer {layer!r} is not an nn.Linear of the model: pass the name of its logit layer")
        return layer
    found: list[str] = []
    hooks = []
    for name, module in modules.items():
        if isinstance(module, nn.Linear) and module.out_features == logits.shape[-1]:

            def hook(mod, args, out, name=name):
                if out.shape == logits.shape and torch.equal(out.to(logits.dtype), logits):
                    found.append(name)

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if not found:
        raise FlatLoraError(
            "no nn.Linear of the model outputs the logits (a pooled or LoRA-wrapped head): pass layer= to name it"
        )
    return found[-1]


def relative_flatness(
    model: nn.Module,
    probe: ProbeSet,
    *,
    layer: str | None = None,
    device: str | torch.device | None = None,
) -> RelativeFlatnessResult:
    """Relative flatness kappa_Tr (Petzka et al. 2021) of a classifier's logit layer on ``probe``.

    The layer is the nn.Linear whose output is the model's logits (a peft classifier's
    ``modules_to_save`` head), or ``layer``. The Hessian blocks come in closed form from the
    layer's inputs and the softmax probabilities (:func:`relative_flatness_from_features`),
    which holds for the single-label cross-entropy a classifier's own loss is: one forward
    pass over the probe set, no Hessian product.

    Raises:
        FlatLoraError: a causal-LM or multi-label probe set, no linear logit layer.
    """
    require_classifier(probe, "relative flatness")
    with measuring(model, device) as dev:
        probe = probe.to(dev)
        first = probe.batches[0]
        with torch.no_grad():
            logits0 = model(**first).logits
        name = _logit_layer(model, first, logits0, layer)
        module = dict(model.named_modules())[name]
        captured: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))
        feats, probs, weights, losses = [], [], [], 0.0
        try:
            with torch.no_grad():
                for batch in probe.batches:
                    captured.clear()
                    out = model(**batch)
                    feats.append(captured[-1].reshape(-1, captured[-1].shape[-1]))
                    logits = out.logits.double()
                    probs.append(torch.softmax(logits, dim=-1))
                    n = batch_size_of(batch)
                    weights.append(torch.full((n,), 1.0 / probe.n_examples, dtype=torch.float64, device=dev))
                    losses += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        finally:
            hook.remove()
        features = torch.cat(feats)
        if features.shape[0] != probe.n_examples:
            raise FlatLoraError(
                f"layer {name!r} sees {features.shape[0]} rows for {probe.n_examples} examples: "
                "pass layer= naming the layer that maps one feature vector to one row of logits"
            )
        kappa, blocks, gram = relative_flatness_from_features(
            features, torch.cat(probs), module.weight.detach(), torch.cat(weights)
        )
    settings = MEASURES["relative_flatness"].record(probe, extra={"measure": "relative"}, layer=name)
    return RelativeFlatnessResult(
        value=kappa,
        layer=name,
        trace_blocks=blocks.cpu().numpy(),
        gram=gram.cpu().numpy(),
        clean_loss=losses / probe.n_examples,
        settings=settings,
        meta={"forward_passes": len(probe.batches) + 2, "features": int(features.shape[1])},
    )
