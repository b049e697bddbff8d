"""Lanczos runs in lockstep: one block product advances every run by one step.

Each :class:`Lane` is an ordinary Lanczos run (:class:`~flatlora_analysis.hessian.krylov.Lanczos`)
on the operator or on one diagonal block of it (``index``: the coordinates of a layer; the
block's product is the product of the vector padded with zeros, read back on ``index``).
:func:`run_lockstep` stacks the current vector of every lane still running into a
(dim, lanes) block, multiplies once with ``matmat``, and feeds each lane its column, so
L per-layer runs and the SLQ runs cost as many block products as the longest of them
takes steps. A lane stops at a fixed number of steps (SLQ) or, with ``k``, once its k
wanted Ritz values meet the error bound of :func:`~flatlora_analysis.hessian.lanczos.lanczos_eigenvalues`
(after at least ``min_steps``), or at ``max_iter``. The results equal the same runs done
one after another to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from flatlora_analysis.hessian.krylov import Lanczos, check_ritz, ritz_pairs
from flatlora_analysis.hessian.operators import matmat


@dataclass
class Lane:
    """One run of a lockstep group.

    Attributes:
        v0: the start vector, in the lane's coordinates (length ``len(index)``, or dim).
        index: the full-space coordinates of the lane's diagonal block; None for the whole space.
        steps: a fixed number of steps (SLQ); None to stop on convergence of ``k`` values.
        k, which, tol, max_iter, min_steps: the eigenvalue stop (as ``lanczos_eigenvalues``).
    """

    v0: torch.Tensor
    index: torch.Tensor | None = None
    steps: int | None = None
    k: int = 1
    which: str = "algebraic"
    tol: float = 1e-3
    max_iter: int = 100
    min_steps: int = 0
    group: str | None = None  # products by ``op.layer_matvec(group, q)``, one lane at a time, not in the block
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    it: Any = field(init=False, default=None)
    done: bool = field(init=False, default=False)
    converged: bool = field(init=False, default=False)
    _ritz: Any = field(init=False, default=None)
    _cap: int = field(init=False, default=0)  # the step count it never passes (set by ``start``)

    def start(self, device: Any) -> None:
        dim = len(self.v0)
        self.it = Lanczos(SimpleNamespace(dim=dim, device=device), self.v0, self.generator)
        cap = self.steps if self.steps is not None else max(self.max_iter, self.min_steps)
        self._cap = min(cap, dim)

    def feed(self, w: torch.Tensor) -> None:
        self.it.feed(w)
        m = len(self.it.alpha)
        if self.steps is None and m >= self.k:
            self._ritz = check_ritz(self.it, self.k, self.which, self.tol)
            self.converged = self._ritz[4]
            self.done = self.converged and m >= self.min_steps
        self.done = self.done or m >= self._cap

    def eigen(self) -> tuple[list[float], list[float], list[torch.Tensor]]:
        """(values, error bounds, unit Ritz vectors in the lane's coordinates) of the k wanted values."""
        theta, S, idx, errors, _ = self._ritz if self._ritz is not None else check_ritz(self.it, 1, self.which, 1.0)
        values, vectors = ritz_pairs(self.it, theta, S, idx)
        return values, list(np.asarray(errors, dtype=float)), vectors

    def tridiagonal(self, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) of the first ``steps`` steps (all by default): the Lanczos T's prefix."""
        m = len(self.it.alpha) if steps is None else min(steps, len(self.it.alpha))
        return np.array(self.it.alpha[:m]), np.array(self.it.beta[: m - 1])


def run_lockstep(op: Any, lanes: list[Lane]) -> int:
    """Advance every lane to its stop with one block product per step; returns the block products made.

    Lanes with a ``group`` take their products one at a time from ``op.layer_matvec`` (pruned
    block products, cheaper than a column of the block where batching gains little, as on a CPU).
    """
    for lane in lanes:
        lane.start(op.device)
    calls = 0
    while active := [lane for lane in lanes if not lane.done]:
        for lane in [lane for lane in active if lane.group is not None]:
            lane.feed(op.layer_matvec(lane.group, lane.it.current()).to(torch.float64))
        active = [lane for lane in active if lane.group is None]
        if not active:
            continue
        V = torch.zeros((op.dim, len(active)), dtype=torch.float64, device=op.device)
        for j, lane in enumerate(active):
            q = lane.it.current()
            if lane.index is None:
                V[:, j] = q
            else:
                V[lane.index, j] = q
        W = matmat(op, V).to(torch.float64)
        calls += 1
        for j, lane in enumerate(active):
            lane.feed(W[:, j] if lane.index is None else W[lane.index, j])
    return calls
