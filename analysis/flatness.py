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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import measuring
from flatlora_analysis.objective import ModelObjective, Objective
from flatlora_analysis.probe import ProbeSet, batch_size_of
from flatlora_analysis.results import Result
from flatlora_analysis.sharpness import SharpnessResult, sharpness
from flatlora_analysis.spaces import build_space

FLATNESS = ("adaptive-worst", "pac-bayes", "relative")
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- logit normalization


def normalize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits centered over the classes and divided by their l2 norm (floored at 1e-10); shape kept (..., C)."""
    centered = logits - logits.mean(dim=-1, keepdim=True)
    return centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-10)


def _normalized_cross_entropy(outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
    logits = outputs.logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return nn.functional.cross_entropy(normalize_logits(logits), batch["labels"], reduction="mean")


def _require_classifier(probe: ProbeSet, measure: str) -> None:
    """Refuse probe sets that are not single-label classification with the model's own loss."""
    if probe.weighting != "examples":
        raise FlatLoraError(f"{measure} applies to classifiers; this probe set is a causal-LM one (token-weighted)")
    if probe.loss_fn is not None:
        raise FlatLoraError(f"{measure} needs the model's cross-entropy: pass a probe set without loss_fn=")
    for batch in probe.batches:
        labels = batch.get("labels")
        if not (torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point()):
            raise FlatLoraError(f"{measure} applies to single-label classifiers: probe labels must be class indices")


def logit_normalized(probe: ProbeSet) -> ProbeSet:
    """The same probe set, its loss the cross-entropy of :func:`normalize_logits` (classifiers only)."""
    _require_classifier(probe, "logit normalization")
    description = {**probe.description, "loss": "cross-entropy of normalized logits"}
    return ProbeSet(probe.batches, _normalized_cross_entropy, description, probe.weighting)


def adaptive_sharpness(
    model: nn.Module,
    probe: ProbeSet,
    rho: float = 0.001,
    *,
    norm: str = "linf",
    logit_normalization: bool = True,
    space: str | None = None,
    steps: int = 20,
    restarts: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SharpnessResult:
    """Adaptive worst-case sharpness with logit normalization (Andriushchenko et al. 2023).

    ``sharpness(kind="worst", adaptive=True, eta=0)``, i.e. the max over |delta_i| <= rho |w_i|
    (``norm="linf"``, their recommendation) or ||delta / |w| ||_2 <= rho, on the loss of
    normalized logits (``logit_normalization=False``: the plain loss). Scaling the layer that
    produces the logits (weights and bias) by any factor leaves the value unchanged.

    With two classes the normalized logits are +-(1/sqrt 2, -1/sqrt 2) whatever the model, so
    the normalized loss only moves where a prediction flips: the value is 0 or a jump, and
    ``meta["note"]`` says so (measured: 0.0 on every few-shot SST-2 adapter of the Theorem-2
    study at rho 0.001, a gradient of 1e-9). Use it with three or more classes, or with
    ``logit_normalization=False``.

    Returns:
        A :class:`SharpnessResult` whose settings add ``measure="adaptive-worst"`` and
        ``logit_normalization``.
    """
    measured = logit_normalized(probe) if logit_normalization else probe
    result = sharpness(
        model, measured, rho, kind="worst", space=space, adaptive=True, eta=0.0, norm=norm,
        steps=steps, restarts=restarts, seed=seed, device=device, progress=progress,
    )  # fmt: skip
    settings = {**result.settings, "measure": "adaptive-worst", "logit_normalization": logit_normalization}
    meta = dict(result.meta)
    if logit_normalization and _n_classes(model) == 2:
        meta["note"] = "two classes: normalized logits are constant up to sign, the value is 0 or a prediction flip"
    return dataclasses.replace(result, settings=settings, meta=meta)


def _n_classes(model: nn.Module) -> int | None:
    """The width of the model's logits (its config's num_labels), or None where it names none."""
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


# ----------------------------------------------------------------------------- PAC-Bayes flatness


@dataclass(frozen=True)
class PacBayesResult(Result):
    """Magnitude-aware PAC-Bayes flatness: ``value = 1 / sigma^2`` (larger = sharper).

    ``sigma`` is where the mean loss increase under noise std sqrt(sigma^2 w^2 + eps^2) meets
    ``target`` (to ``rtol``); ``increase`` and ``increase_stderr`` are the Monte-Carlo estimate
    there and its standard error over antithetic pairs; ``stderr`` is the standard error of
    ``value`` that follows (delta method through the local slope). ``meta["bracket"]`` says
    whether the target was met inside the searched range (``"met"``), or sigma sits at its
    upper bound (``"above"``: flatter than measured) or lower bound (``"below"``: the eps noise
    alone exceeds the target).
    """

    value: float
    sigma: float
    stderr: float
    target: float
    clean_loss: float
    increase: float
    increase_stderr: float
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def noise_direction(index: int, dim: int, seed: int) -> torch.Tensor:
    """The ``index``-th standard normal draw (float64, shape (dim,)) of the PAC-Bayes search with ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
    return torch.randn(dim, generator=g, dtype=torch.float64)


def pac_bayes_sigma(
    objective: Objective,
    target: float = 0.1,
    *,
    eps: float = 1e-3,
    samples: int = 8,
    rtol: float = 0.01,
    sigma_range: tuple[float, float] = (1e-6, 1.0),
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The largest sigma with E[L(w + u)] - L(w) <= target, u_i ~ N(0, sigma^2 w_i^2 + eps^2).

    The expectation is estimated on ``samples`` antithetic pairs (z, -z): the pair mean cancels
    the gradient term, so on a quadratic the estimate is exactly 1/2 mean (s z)^T H (s z),
    s = sqrt(sigma^2 w^2 + eps^2), and increasing in sigma when H is PSD. The same draws serve
    every sigma (common random numbers), so the search is a deterministic geometric bisection
    on ``sigma_range``, stopped when the bracket's ratio is below 1 + ``rtol``; the upper end
    is doubled up to 6 times when the target is not met.

    Returns:
        dict with sigma, increase, increase_stderr, slope (d increase / d sigma^2 over the last
        bracket), clean_loss, bracket, evaluations.
    """
    if not (target > 0 and math.isfinite(target)):
        raise FlatLoraError(f"target must be a finite loss increase > 0, got {target!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise FlatLoraError(f"samples={samples!r}: pass a whole number of antithetic pairs >= 2")
    if not (eps >= 0 and 0 < rtol < 1 and 0 < sigma_range[0] < sigma_range[1]):
        raise FlatLoraError("pass eps >= 0, 0 < rtol < 1 and 0 < sigma_range[0] < sigma_range[1]")
    w = objective.point().detach().to(torch.float64).abs()
    # the two ends, then the bisection steps (more if the upper end has to be doubled)
    expected = 2 + math.ceil(math.log2(math.log(sigma_range[1] / sigma_range[0]) / math.log1p(rtol)))
    clean = objective.loss(None)
    evaluations = 0

    def increase(sigma: float) -> tuple[float, float]:
        nonlocal evaluations
        std = torch.sqrt(sigma**2 * w**2 + eps**2)
        pair_means = []
        for i in range(samples):
            u = (std * noise_direction(i, objective.dim, seed).to(std.device)).to(objective.dtype)
            pair_means.append(0.5 * (objective.loss(u) + objective.loss(-u)) - clean)
        evaluations += 1
        if progress is not None:
            progress(min(evaluations, expected), expected)
        values = np.asarray(pair_means)
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(samples))

    lo, hi = sigma_range
    inc_lo, inc_hi = increase(lo), increase(hi)
    bracket = "met"
    if inc_lo[0] > target:
        sigma, found, bracket = lo, inc_lo, "below"
        slope = math.nan
    else:
        for _ in range(6):
            if inc_hi[0] >= target:
                break
            lo, inc_lo, hi = hi, inc_hi, 2 * hi
            inc_hi = increase(hi)
        if inc_hi[0] < target:
            sigma, found, bracket = hi, inc_hi, "above"
            slope = math.nan
        else:
            while hi / lo > 1 + rtol:
                mid = math.sqrt(lo * hi)
                inc_mid = increase(mid)
                if inc_mid[0] > target:
                    hi, inc_hi = mid, inc_mid
                else:
                    lo, inc_lo = mid, inc_mid
            # the end nearer the target, and the local slope in sigma^2 for the error propagation
            near_hi = abs(inc_hi[0] - target) <= abs(inc_lo[0] - target)
            sigma, found = (hi, inc_hi) if near_hi else (lo, inc_lo)
            slope = (inc_hi[0] - inc_lo[0]) / (hi**2 - lo**2)
    return {
        "sigma": sigma,
        "increase": found[0],
        "increase_stderr": found[1],
        "slope": slope,
        "clean_loss": clean,
        "bracket": bracket,
        "evaluations": evaluations,
    }


def pac_bayes_flatness(
    model: nn.Module,
    probe: ProbeSet,
    target: float = 0.1,
    *,
    space: str | None = None,
    eps: float = 1e-3,
    samples: int = 8,
    rtol: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> PacBayesResult:
    """Magnitude-aware PAC-Bayes flatness 1 / sigma^2 of ``model`` on ``probe`` (Jiang et al. 2020).

    Args:
        model: a peft LoRA model (any model for ``space="all"``); left bit-identical.
        probe: the probe set; the loss is its mean loss (Jiang et al. use the 0-1 error).
        target: the allowed increase of the expected loss (nats).
        space: the perturbed weights, ``merged`` (default: the adapted layers' W0 + s B A),
            ``lora``, ``b`` or ``all``; |w| is taken there.
        eps: the floor of the per-coordinate std (their 1e-3).
        samples: antithetic noise pairs per sigma.
        rtol: the bisection's relative precision on sigma.

    Returns:
        A :class:`PacBayesResult`; its ``stderr`` propagates the Monte-Carlo error of the
        increase through the slope of the increase in sigma^2 (NaN when sigma hit a bound).
    """
    space = space or "merged"
    with measuring(model, device) as dev:
        objective = ModelObjective(model, probe, build_space(model, space), dev)
        found = pac_bayes_sigma(objective, target, eps=eps, samples=samples, rtol=rtol, seed=seed, progress=progress)
        counts = objective.counts()
    sigma = found["sigma"]
    value = 1.0 / sigma**2
    slope = found["slope"]
    stderr = found["increase_stderr"] / slope / sigma**4 if slope > 0 else math.nan
    settings = {
        "measure": "pac-bayes", "target": target, "space": space, "eps": eps, "samples": samples,
        "rtol": rtol, "n_examples": probe.n_examples, **probe.weighting_settings(), "seed": seed,
    }  # fmt: skip
    meta = {**counts, "bracket": found["bracket"], "sigma_evaluations": found["evaluations"], "slope": slope}
    return PacBayesResult(
        value=value, sigma=sigma, stderr=stderr, target=target, clean_loss=found["clean_loss"],
        increase=found["increase"], increase_stderr=found["increase_stderr"], settings=settings, meta=meta,
    )  # fmt: skip


# ----------------------------------------------------------------------------- relative flatness


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
    _require_classifier(probe, "relative flatness")
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
    settings = {"measure": "relative", "layer": name, "n_examples": probe.n_examples}
    return RelativeFlatnessResult(
        value=kappa,
        layer=name,
        trace_blocks=blocks.cpu().numpy(),
        gram=gram.cpu().numpy(),
        clean_loss=losses / probe.n_examples,
        settings=settings,
        meta={"forward_passes": len(probe.batches) + 2, "features": int(features.shape[1])},
    )
