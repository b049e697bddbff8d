"""The ``pyhessian`` package (0.1) as a backend, through an adapter that fixes what it lacks.

PyHessian calls ``model(inputs)`` and ``criterion(outputs, targets)``, moves data with
``.cuda()`` when ``cuda=True`` (its default), puts the model in eval mode, differentiates
every parameter that requires grad, leaves graphs in ``.grad``, draws from the global RNG,
and its "top" eigenvalues are the largest in magnitude. The adapter here:

- wraps the model in a module whose only parameters are the space's leaves (so PyHessian
  differentiates the chosen space, through ``functional_call``; the model's own ``.grad`` and
  ``requires_grad`` are never touched) and whose ``forward`` takes an HF dict batch;
- wraps each batch in an object with ``.size(0)``, ``.to()`` and ``.cuda()``;
- runs on the measure's device (``cuda=False`` on CPU);
- forks the global RNG around the call (seeded), and counts the products it takes;
- restores mode and device and frees the graphs afterwards.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from flatlora.errors import FlatLoraError
from flatlora_analysis.guard import measuring
from flatlora_analysis.hessian.lanczos import EigenEstimate
from flatlora_analysis.hessian.trace import TraceEstimate
from flatlora_analysis.objective import double_backward_attention
from flatlora_analysis.probe import ProbeSet, batch_size_of
from flatlora_analysis.spaces import Space, build_space


def _module():
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        raise FlatLoraError(
            "backend='pyhessian' needs the pyhessian package: pip install pyhessian (or flatlora[analysis])"
        ) from None
    # ``pyhessian.hessian`` the module is shadowed by the class of the same name.
    return sys.modules["pyhessian.hessian"]


class _Batch:
    """An HF dict batch that answers PyHessian's ``inputs.size(0)``, ``.to(device)`` and ``.cuda()``."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def size(self, dim: int = 0) -> int:
        return batch_size_of(self.batch)

    def to(self, device) -> _Batch:
        return _Batch({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.batch.items()})

    def cuda(self) -> _Batch:
        return self.to("cuda")


class _SpaceModel(nn.Module):
    """The model as PyHessian sees it: parameters = the space's leaves; forward(batch) -> outputs."""

    def __init__(self, model: nn.Module, space: Space, probe: ProbeSet) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a submodule: its parameters stay hidden
        self.space, self.probe = space, probe
        # PyHessian calls loss.backward(): detached stand-ins keep it off the model's own .grad.
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.leaves = nn.ParameterList(
            [
                nn.Parameter(torch.zeros_like(e.value) if e.role == "D" else e.value.detach(), requires_grad=True)
                for e in space.entries
            ]
        )

    def train(self, mode: bool = True) -> _SpaceModel:
        self.inner.train(mode)
        return super().train(mode)

    def forward(self, inputs: _Batch):
        overrides = dict(self.frozen)
        for e, leaf in zip(self.space.entries, self.leaves):
            overrides[e.key] = e.base + leaf if e.role == "D" else leaf
        outputs = functional_call(self.inner, overrides, args=(), kwargs=inputs.batch, strict=False)
        return outputs, inputs.batch


def _criterion(probe: ProbeSet):
    def criterion(outputs, targets):
        out, batch = outputs
        # PyHessian weights batches by size over a dataloader: hand it each batch's mean loss.
        return probe.weighted_loss(out, batch) / probe.batch_weight(batch)

    return criterion


@contextlib.contextmanager
def _session(model, probe, space_name, device, seed) -> Iterator[tuple[Any, _SpaceModel, dict[str, Any]]]:
    """A PyHessian ``hessian`` engine on the space of ``model``; ``stats["hvps"]`` counts its products."""
    module = _module()
    stats: dict[str, Any] = {"hvps": 0}
    original_hvp = module.hessian_vector_product
    original_loader = module.hessian.dataloader_hv_product

    def counted_hvp(*args, **kwargs):
        stats["hvps"] += 1
        return original_hvp(*args, **kwargs)

    def counted_loader(self, v):
        stats["hvps"] += 1
        return original_loader(self, v)

    with measuring(model, device) as dev, double_backward_attention(model) as attention:
        stats["attention"] = attention
        probe_dev = probe.to(dev)
        wrapped = _SpaceModel(model, build_space(model, space_name), probe_dev)
        module.hessian_vector_product = counted_hvp
        module.hessian.dataloader_hv_product = counted_loader
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), warnings.catch_warnings():
                # PyHessian's backward(create_graph=True) cycle: the adapter frees those .grad below.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                torch.manual_seed(seed)
                batches = [(_Batch(b), b.get("labels")) for b in probe_dev.batches]
                kwargs = {"data": batches[0]} if len(batches) == 1 else {"dataloader": batches}
                engine = module.hessian(wrapped, _criterion(probe_dev), cuda=dev.type == "cuda", **kwargs)
                yield engine, wrapped, stats
        finally:
            module.hessian_vector_product = original_hvp
            module.hessian.dataloader_hv_product = original_loader
            for leaf in wrapped.leaves:
                leaf.grad = None  # PyHessian leaves a graph there


def _meta(wrapped: _SpaceModel, stats: dict[str, Any]) -> dict[str, Any]:
    dim = sum(p.numel() for p in wrapped.leaves)
    return {"hvp": "autograd (pyhessian)", "attention": stats["attention"], "dim": dim, "backend": "pyhessian"}


def pyhessian_eigenvalues(
    model: nn.Module, probe: ProbeSet, space: str, *, k: int, tol: float, max_iter: int, seed: int, device=None
) -> tuple[EigenEstimate, dict[str, Any]]:
    """PyHessian's ``eigenvalues(maxIter, tol, top_n=k)`` (largest magnitude), sorted descending."""
    with _session(model, probe, space, device, seed) as (engine, wrapped, stats):
        meta = _meta(wrapped, stats)
        if k > meta["dim"]:
            raise FlatLoraError(
                f"k={k} is larger than the space ({meta['dim']} dimensions): ask for at most {meta['dim']}"
            )
        values, _ = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    hvps = stats["hvps"]
    est = EigenEstimate(
        np.sort(np.asarray(values, dtype=float))[::-1],
        hvps,
        hvps < k * max_iter,
        hvps,
        np.full(k, np.nan),
        meta={"solver": "pyhessian power iteration", "which": "magnitude", "tol": tol, "max_iter": max_iter},
    )
    return est, meta


def pyhessian_trace(
    model: nn.Module, probe: ProbeSet, space: str, *, samples: int, tol: float, seed: int, device=None
) -> tuple[TraceEstimate, dict[str, Any]]:
    """PyHessian's Hutchinson ``trace(maxIter, tol)`` with a standard error added."""
    with _session(model, probe, space, device, seed) as (engine, wrapped, stats):
        meta = _meta(wrapped, stats)
        values = np.asarray(engine.trace(maxIter=samples, tol=tol), dtype=float)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("inf")
    est = TraceEstimate(
        float(values.mean()),
        se,
        stats["hvps"],
        values,
        len(values) < samples,
        {"method": "pyhessian hutchinson", "tol": tol, "stop": "relative change (variance-blind)"},
    )
    return est, meta
