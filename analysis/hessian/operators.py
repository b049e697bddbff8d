"""Operators the curvature algorithms run on, apart from any model (as curvlinops separates them).

An operator is anything with ``matvec``, ``dim``, ``dtype``, ``device`` and ``n_products``
(:class:`Operator`); the algorithms of this package (Lanczos, power iteration, Hutchinson,
Hutch++, SLQ) see only that, so each is tested on a :class:`DenseOperator` of a known
spectrum, and the model-bound Hessian operator (:mod:`flatlora_analysis.hessian.operator`)
alone is tested against ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from flatlora.errors import FlatLoraError


class Operator(Protocol):
    """A symmetric linear operator on flat vectors of length ``dim``."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def n_products(self) -> int: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


def matmat(op: Any, V: torch.Tensor) -> torch.Tensor:
    """A V for a block V (dim, k): the operator's own ``matmat`` where it has one, else k products."""
    if hasattr(op, "matmat"):
        return op.matmat(V)
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], 1)


class DenseOperator:
    """A symmetric matrix as an operator (for tests and small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise FlatLoraError(f"a square matrix is needed, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_products = 0
        self.meta: dict[str, Any] = {"operator": "dense"}

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        return self.matrix @ v.to(self.dtype)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_products += V.shape[1]
        return self.matrix @ V.to(self.dtype)


class ShiftedOperator:
    """A - sigma I, sharing the product counter of A (for shifted power iteration)."""

    def __init__(self, op: Any, sigma: float) -> None:
        self.op, self.sigma = op, sigma
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    @property
    def n_products(self) -> int:
        return self.op.n_products

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v) - self.sigma * v.to(self.op.dtype)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return matmat(self.op, V) - self.sigma * V.to(self.op.dtype)


class DeflatedOperator:
    """(I - V V^T) A (I - V V^T): A with the found (orthonormal) eigenvectors V removed; products count on A."""

    def __init__(self, op: Any, vectors: list[torch.Tensor]) -> None:
        self.op = op
        self.V = torch.stack(vectors).to(device=op.device, dtype=torch.float64)
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    @property
    def n_products(self) -> int:
        return self.op.n_products

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        """v, or the columns of a block v, with the components along V removed."""
        v = v.to(torch.float64)
        return v - self.V.T @ (self.V @ v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._project(self.op.matvec(self._project(v)).to(torch.float64))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._project(matmat(self.op, self._project(V)).to(torch.float64))


def random_vectors(
    dim: int,
    count: int | None = None,
    *,
    generator: torch.Generator,
    device: Any = "cpu",
    kind: str = "gaussian",
    unit: bool = False,
) -> torch.Tensor:
    """Seeded random probe vectors in float64: shape (dim,) without ``count``, else (count, dim).

    ``kind``: ``gaussian`` (standard normal) or ``rademacher`` (random signs). ``unit``: each
    vector divided by its norm. Drawn on the CPU generator, then moved, so a seed gives the
    same vectors on every device.
    """
    shape = (dim,) if count is None else (count, dim)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).double() * 2 - 1
    elif kind == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        raise FlatLoraError(f"unknown random vector kind {kind!r}: use gaussian or rademacher")
    v = v.to(device)
    return v / v.norm(dim=-1, keepdim=True) if unit else v


def as_linear_operator(op: Any):
    """Any operator as a float64 ``scipy.sparse.linalg.LinearOperator`` on the host."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    def matvec(x):
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(op.device)
        return op.matvec(v).detach().double().cpu().numpy()

    return LinearOperator((op.dim, op.dim), matvec=matvec, rmatvec=matvec, dtype=np.float64)
