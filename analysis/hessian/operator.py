"""The model-bound operator: v -> H v, H the Hessian of a probe-set loss in a parameter space.

It satisfies :class:`flatlora_analysis.hessian.operators.Operator`; the pure operators (dense,
shifted, deflated) and the random probe vectors live in :mod:`flatlora_analysis.hessian.operators`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.hessian.operators import DenseOperator, ShiftedOperator, as_linear_operator
from flatlora_analysis.objective import ModelObjective, double_backward_attention

HVP_METHODS = ("autograd", "fd", "auto")
__all__ = ["HVP_METHODS", "DenseOperator", "HessianOperator", "ShiftedOperator", "as_linear_operator"]


class HessianOperator:
    """v -> H v, H the Hessian of the probe-set loss in a space at the clean point.

    ``method="autograd"``: double backward, each batch weighted by its share of examples.
    With one probe batch the gradient graph is built once and reused for every product (as
    PyHessian does); with several it is rebuilt per batch and product, so memory stays that
    of one batch. ``method="fd"``: central differences of gradients,
    (g(eps v) - g(-eps v)) / (2 eps), the documented fallback for models whose kernels have
    no double backward (accurate to about eps^2; ``fd_eps`` is relative to ||w||). ``"auto"``
    tries double backward and falls back to ``fd`` where it is not implemented.

    Use inside :func:`flatlora_analysis.guard.measuring`; call :meth:`close` (or use ``with``) to free
    the retained graph.
    """

    def __init__(
        self,
        objective: ModelObjective,
        method: str = "auto",
        *,
        fd_eps: float | None = None,
        retain_graph: bool | None = None,
    ) -> None:
        if method not in HVP_METHODS:
            raise FlatLoraError(f"unknown HVP method {method!r}: use one of {', '.join(HVP_METHODS)}")
        self.objective = objective
        self.space = objective.space
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.device = objective.device
        self.method = method
        self.retain_graph = len(objective.probe.batches) == 1 if retain_graph is None else retain_graph
        self.fd_eps = fd_eps
        self.n_products = 0
        self.progress: Callable[[int, int], None] | None = None
        self.budget = 0  # products expected, for progress reports
        self._graphs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._stack = contextlib.ExitStack()
        self.attention = self._stack.enter_context(double_backward_attention(objective.model))
        self.meta: dict[str, Any] = {"hvp": method, "attention": self.attention, "dim": self.dim}

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free retained graphs and restore the attention implementation."""
        self._graphs = None
        self._stack.close()

    # -- products ------------------------------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of the space (returned in ``self.dtype``)."""
        v = v.to(device=self.device, dtype=self.dtype)
        if self.method == "auto":
            try:
                out = self._autograd(v)
                self.method = self.meta["hvp"] = "autograd"
            except (RuntimeError, NotImplementedError) as err:
                if "not implemented" not in str(err) and "does not require grad" not in str(err):
                    raise
                self.method = self.meta["hvp"] = "fd"
                self.meta["fd_reason"] = str(err).splitlines()[0][:200]
                out = self._finite_difference(v)
        elif self.method == "autograd":
            out = self._autograd(v)
        else:
            out = self._finite_difference(v)
        self.n_products += 1
        if self.progress is not None:
            self.progress(min(self.n_products, self.budget), max(self.budget, 1))
        return out

    def _graph(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        obj = self.objective
        leaves = [d.detach().requires_grad_(True) for d in self.space.split(self.space.zeros())]
        loss = obj._batch_loss(batch, self.space.overrides(leaves))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        obj.backwards += 1
        return leaves, [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]

    def _autograd(self, v: torch.Tensor) -> torch.Tensor:
        parts = self.space.split(v)
        if self.retain_graph:
            if self._graphs is None:
                self._graphs = [self._graph(b) for b in self.objective.probe.batches]
            graphs = self._graphs
        else:
            graphs = (self._graph(b) for b in self.objective.probe.batches)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for leaves, grads in graphs:
            used = [(g, p) for g, p in zip(grads, parts) if g.requires_grad]
            if not used:
                continue
            hv = torch.autograd.grad(
                [g for g, _ in used],
                leaves,
                grad_outputs=[p for _, p in used],
                retain_graph=self.retain_graph,
                allow_unused=True,
            )
            total += self.space.flatten([torch.zeros_like(leaf) if h is None else h for h, leaf in zip(hv, leaves)])
        return total

    def _finite_difference(self, v: torch.Tensor) -> torch.Tensor:
        norm = v.norm()
        if norm == 0:
            return torch.zeros_like(v)
        if self.fd_eps is None:
            rel = torch.finfo(self.dtype).eps ** (1 / 3)
            self.fd_eps = rel * max(1.0, float(self.space.point().norm()))
        step = self.fd_eps / float(norm)
        _, g_plus = self.objective.loss_and_grad(step * v)
        _, g_minus = self.objective.loss_and_grad(-step * v)
        return (g_plus - g_minus) / (2 * step)

    # -- scipy -----------------------------------------------------------------------------------

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 on the host."""
        return as_linear_operator(self)
