"""Micro-batches chosen from the memory budget: how large a probe batch's graph is, and how to split it.

A gradient holds the forward's saved tensors of one batch until its backward; a Hessian-vector
product by double backward holds those and the saved tensors of the ``create_graph`` backward.
:func:`measure_graph` counts exactly those bytes (saved-tensor hooks, weights and buffers left
out: they are resident anyway) on one and on two rows of the probe's widest batch, which gives a
fixed part and a part per row. :func:`plan_graphs` then picks, for the budget of
:mod:`flatlora_analysis.memory`:

- **kept**: every batch's product graph built once and kept across all products (fastest;
  only where the whole probe's graphs fit the budget, and only for Hessian products);
- **batches**: the probe's own batches, one graph at a time, where each fits;
- **micro-batches** of ``rows`` rows, one graph at a time, where a batch does not fit.

Splitting changes nothing but the summation order: each micro-batch enters with its own
weight (its examples or scored tokens over the whole probe's), so the loss, gradient and
products are the whole-probe values (:meth:`flatlora_analysis.probe.ProbeSet.split_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from flatlora_analysis.checkpointing import suspended
from flatlora_analysis.memory import MemoryBudget, announce, format_bytes
from flatlora_analysis.probe import Batch, ProbeSet, batch_size_of

# The saved tensors are not all a graph costs: the backward's transient activation gradients,
# autograd's buffers and the allocator's slack come on top. On SmolLM2-135M (4 E2E pairs, CPU)
# the peak RSS grew by 1.7x the saved bytes for a gradient and 2.0-2.7x for a product's kept
# graph; 3 keeps the estimate on the safe side of both.
OVERHEAD = 3.0


@dataclass(frozen=True)
class GraphSize:
    """Estimated bytes of one batch's graph: ``fixed + rows * per_row`` (rows at the probe's widest batch)."""

    fixed: int
    per_row: int

    def bytes(self, rows: int) -> int:
        return int(OVERHEAD * (self.fixed + rows * self.per_row))


@dataclass(frozen=True)
class GraphPlan:
    """How a measure walks the probe within the budget.

    Attributes:
        mode: ``kept`` (all graphs built once, kept across products), ``batches`` (the
            probe's batches one at a time) or ``micro-batches`` (split to ``rows`` rows).
        rows: rows per micro-batch (None unless ``micro-batches``).
        graph_bytes: the estimate for the largest graph held at once.
        kept_bytes: the estimate for keeping every batch's graph.
        budget: the budget it was chosen for.
        purpose: ``gradients`` or ``Hessian products``.
    """

    mode: str
    rows: int | None
    graph_bytes: int
    kept_bytes: int
    budget: MemoryBudget
    purpose: str
    over_budget: bool = False

    def meta(self) -> dict[str, Any]:
        out = {"mode": self.mode, "graph_bytes": self.graph_bytes, "kept_bytes": self.kept_bytes,
               "budget": self.budget.bytes, "budget_source": self.budget.source}  # fmt: skip
        if self.rows is not None:
            out["micro_batch_rows"] = self.rows
        if self.over_budget:
            out["over_budget"] = True
        return out

    def describe(self) -> str:
        """One line for the console: what was chosen, on what estimate, within which budget."""
        if self.mode == "kept":
            what = f"graphs kept across products (estimated {format_bytes(self.kept_bytes)})"
        elif self.mode == "batches":
            what = f"one probe batch's graph at a time (estimated {format_bytes(self.graph_bytes)})"
        else:
            what = (
                f"micro-batches of {self.rows} row(s), one graph at a time (estimated {format_bytes(self.graph_bytes)})"
            )
            if self.purpose == "Hessian products":
                what += f"; keeping every graph would need {format_bytes(self.kept_bytes)}"
        line = f"memory for {self.purpose}: {what}; budget {format_bytes(self.budget.bytes)} ({self.budget.source})"
        if self.over_budget:
            line += ": one row alone exceeds it, so it runs a row at a time (raise --max-memory or use fewer tokens)"
        return line


def _width(batch: Batch) -> int:
    ids = batch.get("input_ids")
    if torch.is_tensor(ids) and ids.dim() >= 2:
        return int(ids.shape[1])
    return max((int(v.shape[1]) for v in batch.values() if torch.is_tensor(v) and v.dim() >= 2), default=1)


def _rows(batch: Batch, index: torch.Tensor) -> Batch:
    n = batch_size_of(batch)
    return {k: v.index_select(0, index.to(v.device)) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}  # fmt: skip


def _sample_rows(probe: ProbeSet, batch: Batch) -> list[torch.Tensor]:
    """Indices of one and of two rows of ``batch`` that carry a loss (scored tokens under token weighting)."""
    n = batch_size_of(batch)
    usable = list(range(n))
    if probe.weighting == "tokens":
        labels = batch["labels"]
        usable = [i for i in range(n) if int((labels[i, 1:] != -100).sum()) > 0]
        mask = batch.get("attention_mask")
        if torch.is_tensor(mask):  # the longest rows: the estimate errs on the large side
            usable.sort(key=lambda i: -int(mask[i].sum()))
    picks = [usable[:1]] + ([usable[:2]] if len(usable) >= 2 else [])
    return [torch.tensor(p) for p in picks]


def saved_storage_bytes(fn: Callable[[], Any], exclude: Collection[int] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    Args:
        fn: builds the graph to count (a forward; a ``create_graph`` backward counts too).
        exclude: storage data pointers left out (the weights: resident anyway).

    Returns:
        The sum of the saved storages' sizes, each storage once.
    """
    seen: dict[int, int] = {}
    # The graph holds what pack returns. A saved output returned as itself would hold its own grad_fn,
    # a reference cycle that outlives the count (about a quarter GiB on SmolLM2-135M, per plan made):
    # the graph holds an index instead, and the tensors go with the list once counted.
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        saved.append(t)
        return len(saved) - 1

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, saved.__getitem__):
            fn()
    finally:
        saved.clear()
    return sum(seen.values())


def _saved_bytes(objective: Any, batch: Batch, create_graph: bool) -> int:
    """Bytes the graph of ``batch`` saves (forward; and the create_graph backward), weights left out."""
    model, space = objective.model, objective.space
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    leaves = [d.detach().requires_grad_(True) for d in space.split(space.zeros())]

    def build() -> None:
        loss = objective.probe.batch_loss(model, batch, space.overrides(leaves))
        if create_graph:
            torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

    # a product's graph is built with checkpointed layers suspended (as HessianOperator builds it)
    with suspended() if create_graph else contextlib.nullcontext():
        return saved_storage_bytes(build, exclude=resident)


def measure_graph(objective: Any, *, create_graph: bool) -> GraphSize:
    """The graph size of the objective's probe at its widest batch, from one and two of its rows.

    Args:
        objective: a :class:`flatlora_analysis.objective.ModelObjective` (its model, space, probe).
        create_graph: the graph of a Hessian-vector product (True) or of a gradient (False).
    """
    batch = max(objective.probe.batches, key=_width)
    got = [_saved_bytes(objective, _rows(batch, index), create_graph) for index in _sample_rows(objective.probe, batch)]
    if len(got) == 1:
        return GraphSize(0, got[0])
    per_row = max(got[1] - got[0], got[1] // 2, 1)
    return GraphSize(max(got[1] - 2 * per_row, 0), per_row)


def plan_graphs(objective: Any, budget: MemoryBudget, *, hessian: bool) -> GraphPlan:
    """The cheapest way through the objective's probe whose graphs fit ``budget``.

    Args:
        objective: the model objective whose probe is walked.
        budget: bytes of graphs allowed (:func:`flatlora_analysis.memory.current_budget`).
        hessian: plan Hessian products (graphs with ``create_graph``; may be kept) rather than gradients.

    Returns:
        The :class:`GraphPlan`; it is announced once (:func:`flatlora_analysis.memory.announce`).
    """
    size = measure_graph(objective, create_graph=hessian)
    rows_each = [batch_size_of(b) for b in objective.probe.batches]
    kept = sum(size.bytes(r) for r in rows_each)
    largest = size.bytes(max(rows_each))
    purpose = "Hessian products" if hessian else "gradients"
    if hessian and kept <= budget.bytes:
        plan = GraphPlan("kept", None, kept, kept, budget, purpose)
    elif largest <= budget.bytes:
        plan = GraphPlan("batches", None, largest, kept, budget, purpose)
    else:
        fit = int((budget.bytes / OVERHEAD - size.fixed) // size.per_row)
        while size.bytes(fit + 1) <= budget.bytes:  # the float division's round-off, either way
            fit += 1
        while fit >= 1 and size.bytes(fit) > budget.bytes:
            fit -= 1
        rows = max(1, min(fit, max(rows_each) - 1))
        plan = GraphPlan("micro-batches", rows, size.bytes(rows), kept, budget, purpose, over_budget=fit < 1)
    announce(plan.describe())
    return plan


def planned_probe(probe: ProbeSet, plan: GraphPlan) -> ProbeSet:
    """The probe set as ``plan`` walks it: split to micro-batches where it says so."""
    return probe if plan.rows is None else probe.split_rows(plan.rows)


__all__ = ["OVERHEAD", "GraphPlan", "GraphSize", "measure_graph", "plan_graphs", "planned_probe", "saved_storage_bytes"]
