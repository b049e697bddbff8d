"""The model-bound operator: v -> H v, H the Hessian of a probe-set loss in a parameter space.

It satisfies :class:`flatlora_analysis.hessian.operators.Operator`; the pure operators (dense,
shifted, deflated) and the random probe vectors live in :mod:`flatlora_analysis.hessian.operators`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.checkpointing import checkpointing_meta, suspended
from flatlora_analysis.hessian.operators import DenseOperator, ShiftedOperator, as_linear_operator
from flatlora_analysis.micro_batch import GraphPlan, plan_graphs, planned_probe
from flatlora_analysis.objective import ModelObjective, double_backward_attention, double_backward_attention_used

HVP_METHODS = ("autograd", "fd", "auto")
__all__ = ["HVP_METHODS", "DenseOperator", "HessianOperator", "ShiftedOperator", "as_linear_operator"]


class HessianOperator:
    """v -> H v, H the Hessian of the probe-set loss in a space at the clean point.

    ``method="autograd"``: double backward, each batch weighted by its share of examples.
    Where the whole probe's graphs fit the memory budget (the objective's), each batch's
    gradient graph is built once and kept for every product (as PyHessian does); otherwise it
    is rebuilt per batch (or micro-batch, :func:`flatlora_analysis.micro_batch.plan_graphs`)
    and product, and only one such graph is held at a time; a block of products (``matmat``)
    then shares each graph across its columns. ``retain_graph`` True/False forces either way
    on the probe's own batches. ``meta["memory"]`` records the plan. ``method="fd"``: central differences of gradients,
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
        block_size: int | None = None,
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if method not in HVP_METHODS:
            raise FlatLoraError(f"unknown HVP method {method!r}: use one of {', '.join(HVP_METHODS)}")
        self.objective = objective
        self.space = objective.space
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.device = objective.device
        self.method = method
        self.fd_eps = fd_eps
        self.n_products = 0
        self.n_calls = 0  # backward passes through the graph: a block of k products is one
        # A CPU runs a batched double backward no faster a column than single products, and
        # slower once probes are long (measured on MiniLM: 0.93 a column at 8 x 32 tokens, 1.2 / 1.7 / 2.1
        # at k = 2 / 4 / 8 on 64 x 64), so it takes products one at a time unless told otherwise.
        if block_size is None:
            block_size = 16 if torch.device(self.device).type == "cuda" else 1
        self.block_size = max(1, int(block_size))
        self.batched: bool | None = None  # None: not tried yet
        self.reduce = reduce  # sums a product over data-parallel ranks in place
        self._layers: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self.progress: Callable[[int, int], None] | None = None
        self.budget = 0  # products expected, for progress reports
        self._graphs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self.attention = double_backward_attention_used(objective.model)  # entered around each graph's forward
        self.meta: dict[str, Any] = {"hvp": method, "attention": self.attention, "dim": self.dim,
                                     "block_size": self.block_size}  # fmt: skip
        self.meta.update(checkpointing_meta(objective.model))
        if "checkpointing" in self.meta:  # a create_graph backward keeps the recomputed activations anyway
            self.meta["checkpointing"]["double_backward"] = "suspended"
        self.plan: GraphPlan | None = None
        self._walk: tuple[Any, tuple] | None = None  # (the probe walked, its batches as the plan splits them)
        if retain_graph is not None:
            self.retain_graph = retain_graph
        elif method == "fd":  # gradients only: the objective plans those
            self.retain_graph = False
        else:  # the plan's estimate runs in the attention products use
            with double_backward_attention(objective.model):
                self.plan = plan_graphs(objective, objective.budget, hessian=True)
            self.retain_graph = self.plan.mode == "kept"
            self.meta["memory"] = self.plan.meta()
        self.graph_builds = 0  # forward + create_graph backward passes: a streamed product's extra cost
        if reduce is not None:
            self.meta["data_parallel"] = True

    @property
    def batches(self) -> tuple:
        """The batches products walk: the objective's probe as the plan splits it (a probe set replaced later,
        such as a rank's shard, is split the same way)."""
        probe = self.objective.probe
        if self._walk is None or self._walk[0] is not probe:
            self._walk = (probe, planned_probe(probe, self.plan).batches if self.plan is not None else probe.batches)
        return self._walk[1]

    @batches.setter
    def batches(self, batches: tuple) -> None:
        self._walk = (self.objective.probe, tuple(batches))

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the retained graphs."""
        self._graphs = None

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
        if self.reduce is not None:
            self.reduce(out)
        self._count(1)
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for a block V of shape (dim, k): one batched double backward per ``block_size`` columns.

        The columns go through the backward together (``is_grads_batched``, a vmap over the
        backward graph), which on an accelerator costs less than k single products; where a
        kernel has no batching rule, or ``method`` is ``fd``, or ``block_size`` is 1 (a CPU's
        default), the block is k single products (``meta["batched"]`` says which,
        ``meta["batched_reason"]`` why). Equal to k :meth:`matvec` calls to round-off.
        """
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise FlatLoraError(f"a block of this space has shape ({self.dim}, k), got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        k = V.shape[1]
        if k == 0:
            return V.clone()
        if self.method == "auto":  # settle double backward or finite differences on one product
            first = self.matvec(V[:, 0])
            return first[:, None] if k == 1 else torch.cat([first[:, None], self.matmat(V[:, 1:])], 1)
        if self.block_size == 1 and self.batched is None:
            self.meta["batched"] = False
            self.meta["batched_reason"] = "block_size 1 (a CPU's default: batching buys nothing there)"
        if (
            self.method == "autograd"
            and not self.retain_graph
            and k > 1
            and (self.block_size == 1 or self.batched is False)
        ):
            out = self._streamed_columns(V)
            if self.reduce is not None:
                self.reduce(out)
            self._count(k)
            return out
        if self.method != "autograd" or self.batched is False or k == 1 or self.block_size == 1:
            return torch.stack([self.matvec(V[:, j]) for j in range(k)], 1)
        blocks = []
        for cols in V.split(self.block_size, dim=1):
            try:
                out = self._autograd_block(cols)
                self.batched = self.meta["batched"] = True
                self.meta.pop("batched_reason", None)  # a block_size raised after single products
            except (RuntimeError, NotImplementedError) as err:
                if "batch" not in str(err).lower() and "vmap" not in str(err).lower():
                    raise
                self.batched = self.meta["batched"] = False
                self.meta["batched_reason"] = str(err).splitlines()[0][:200]
                blocks.append(torch.stack([self.matvec(c) for c in cols.T], 1))
                continue
            if self.reduce is not None:
                self.reduce(out)
            self._count(cols.shape[1])
            blocks.append(out)
        return torch.cat(blocks, 1)

    def layer_matvec(self, group: str, v: torch.Tensor) -> torch.Tensor:
        """H_ll v for the diagonal block of layer ``group`` (v in the layer's coordinates, entry order).

        The double backward runs from that layer's gradient to that layer's parameters only,
        through the same kept graph as full products, so autograd prunes the layers it needs
        not visit: a block product of an upper layer costs a fraction of a full one.
        """
        sel, sizes, offsets = self._layer_entries(group)
        v = v.to(device=self.device, dtype=self.dtype)
        if self.method != "autograd":  # finite differences (or not settled yet): pad, multiply, read back
            full = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for part, lo, n in zip(v.split(sizes), offsets, sizes):
                full[lo : lo + n] = part
            out = self.matvec(full)
            return torch.cat([out[lo : lo + n] for lo, n in zip(offsets, sizes)])
        parts = [p.view(self.space.entries[i].value.shape) for p, i in zip(v.split(sizes), sel)]
        total = torch.zeros(len(v), dtype=self.dtype, device=self.device)
        for leaves, grads in self._graphs_now():
            used = [(grads[i], p, leaves[i]) for i, p in zip(sel, parts) if grads[i].requires_grad]
            if not used:
                continue
            hv = torch.autograd.grad(
                [g for g, _, _ in used],
                [leaf for _, _, leaf in used],
                grad_outputs=[p for _, p, _ in used],
                retain_graph=self.retain_graph,
                allow_unused=True,
            )
            flat = iter(torch.zeros_like(leaf) if h is None else h for h, (_, _, leaf) in zip(hv, used))
            total += torch.cat([next(flat).reshape(-1).to(self.dtype) if grads[i].requires_grad
                                else torch.zeros(n, dtype=self.dtype, device=self.device)
                                for i, n in zip(sel, sizes)])  # fmt: skip
            del leaves, grads, used, hv, flat  # a streamed graph goes before the next is built
        if self.reduce is not None:
            self.reduce(total)
        self._count(1)
        return total

    def _layer_entries(self, group: str) -> tuple[list[int], list[int], list[int]]:
        """(entry indices, sizes, flat offsets) of a layer, worked out once per layer (a run asks every step)."""
        if group not in self._layers:
            sel = [i for i, e in enumerate(self.space.entries) if e.group == group]
            if not sel:
                raise FlatLoraError(f"no layer {group!r} in this space: use one of {', '.join(self.space.groups)}")
            starts = [0, *itertools.accumulate(self.space.sizes)]
            self._layers[group] = (sel, [self.space.sizes[i] for i in sel], [starts[i] for i in sel])
        return self._layers[group]

    def _count(self, products: int) -> None:
        self.n_products += products
        self.n_calls += 1
        self.meta.update(self.objective.counts(), graph_builds=self.graph_builds)
        if self.plan is not None:  # the products' plan, not the gradients' (finite differences)
            self.meta["memory"] = self.plan.meta()
        if self.progress is not None:
            self.progress(min(self.n_products, self.budget), max(self.budget, 1))

    def _graph(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        obj = self.objective
        leaves = [d.detach().requires_grad_(True) for d in self.space.split(self.space.zeros())]
        # checkpointed layers run plain: checkpointing cannot shrink a double-backward graph
        with suspended(), double_backward_attention(obj.model):
            loss = obj._batch_loss(batch, self.space.overrides(leaves))
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        obj.backwards += 1
        self.graph_builds += 1
        return leaves, [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]

    def _autograd(self, v: torch.Tensor) -> torch.Tensor:
        return self._double_backward(self.space.split(v), None)

    def _autograd_block(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        rows = V.T.contiguous()  # (k, dim): the batch dimension leads, as is_grads_batched wants
        parts = [p.view(k, *e.value.shape) for p, e in zip(rows.split(self.space.sizes, dim=1), self.space.entries)]
        return self._double_backward(parts, k).T

    def _double_backward(self, parts: list[torch.Tensor], k: int | None) -> torch.Tensor:
        """Sum over the probe's batch graphs of d(g . v)/dw, flat: (dim,), or (k, dim) for a batch of k."""
        total = torch.zeros(self.dim if k is None else (k, self.dim), dtype=self.dtype, device=self.device)
        for leaves, grads in self._graphs_now():
            used = [(g, p) for g, p in zip(grads, parts) if g.requires_grad]
            if not used:
                continue
            hv = torch.autograd.grad(
                [g for g, _ in used],
                leaves,
                grad_outputs=[p for _, p in used],
                retain_graph=self.retain_graph,
                allow_unused=True,
                is_grads_batched=k is not None,
            )
            shape = (-1,) if k is None else (k, -1)
            flat = [(torch.zeros(p.shape, dtype=self.dtype, device=self.device) if h is None else h).reshape(shape)
                    for h, p in zip(hv, parts)]  # fmt: skip
            total += torch.cat([f.to(self.dtype) for f in flat], dim=-1)
            del leaves, grads, used, hv, flat  # a streamed graph goes before the next is built
        return total

    def _streamed_columns(self, V: torch.Tensor) -> torch.Tensor:
        """H V column by column, each (micro-)batch's graph built once for all k columns, then freed."""
        k = V.shape[1]
        columns = [self.space.split(V[:, j]) for j in range(k)]
        total = torch.zeros((self.dim, k), dtype=self.dtype, device=self.device)
        for batch in self.batches:
            leaves, grads = self._graph(batch)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            if live:
                for j, parts in enumerate(columns):
                    hv = torch.autograd.grad(
                        [grads[i] for i in live],
                        leaves,
                        grad_outputs=[parts[i] for i in live],
                        retain_graph=j < k - 1,
                        allow_unused=True,
                    )
                    total[:, j] += torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1).to(self.dtype)
                                              for h, p in zip(hv, parts)])  # fmt: skip
                    del hv
            del leaves, grads
        return total

    def _graphs_now(self):
        if self.retain_graph:
            if self._graphs is None:
                self._graphs = [self._graph(b) for b in self.batches]
            return self._graphs
        return (self._graph(b) for b in self.batches)

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
