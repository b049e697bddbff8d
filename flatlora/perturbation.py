"""The perturbation math of METHODS.md, as pure functions on tensors.

Flat-LoRA picks a SAM perturbation in the full weight space and carries it into B. Written
naively that forms an m x n gradient estimate and pseudo-inverts m x r and r x n matrices for
every layer. With ``SA = (A A^T)^+`` and ``SB = (B^T B)^+`` (both r x r) everything reduces to

    G_hat A^+     = 1/(2s) (gB SA + B SB (gA A^T) SA)                          (m x r)
    ||G_hat||_F^2 = 1/(4s^2) [tr(SA gB^T gB) + tr(SB gA gA^T) + 2 tr(SA gB^T B SB gA A^T)]

at O((m + n) r^2) flops and O(r^2) extra memory per layer. No function here forms an m x n
matrix. Shapes follow peft: A is (r, n), B is (m, r), gA and gB match them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flatlora.errors import FlatLoraError

NORMS = ("global", "layer")


def _trace_of_product(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """tr(X @ Y) for square X, Y without forming the product."""
    return (X * Y.transpose(-1, -2)).sum()


def gram_pinv(gram: torch.Tensor, sv_rtol: float) -> torch.Tensor:
    """Hermitian pseudo-inverse of an r x r Gram matrix X^T X (or X X^T).

    ``sv_rtol`` is a cutoff relative to the largest singular value of X; on the Gram matrix
    it acts squared, floored at the Gram's own rounding level so that noise is never inverted.
    """
    r = gram.shape[-1]
    eig_rtol = max(sv_rtol**2, 10 * r * torch.finfo(gram.dtype).eps)
    return torch.linalg.pinv(gram, hermitian=True, rtol=eig_rtol)


def _default_sv_rtol(dtype: torch.dtype, r: int) -> float:
    return max(r, 10) * torch.finfo(dtype).eps


def _check_inputs(As, Bs, grad_As, grad_Bs, scalings) -> None:
    sizes = {len(As), len(Bs), len(grad_As), len(grad_Bs), len(scalings)}
    if len(sizes) != 1:
        raise FlatLoraError(
            "As, Bs, grad_As, grad_Bs and scalings must have one entry per layer: "
            f"got lengths {[len(As), len(Bs), len(grad_As), len(grad_Bs), len(scalings)]}"
        )
    for i, (A, B, gA, gB) in enumerate(zip(As, Bs, grad_As, grad_Bs)):
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise FlatLoraError(
                f"layer {i}: A must be (r, n) and B (m, r), got {tuple(A.shape)} and {tuple(B.shape)}; "
                "pass LoraPair.a_matrix / b_matrix"
            )
        if gA.shape != A.shape or gB.shape != B.shape:
            raise FlatLoraError(f"layer {i}: gradient shapes {tuple(gA.shape)}, {tuple(gB.shape)} do not match A, B")


class _Workspace:
    """Scratch buffers reused across layers of equal shape, so a sweep over L layers pays the
    allocation (and, on CPU, the page faults of fresh memory) once per shape, not per layer."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]


def _stack_b(B, gB, dtype, workspace: _Workspace) -> torch.Tensor:
    """[B, gB] as one (m x 2r) matrix in ``dtype``, written into a reused buffer."""
    m, r = B.shape
    Y = workspace.get((m, 2 * r), dtype, B.device)
    Y[:, :r].copy_(B.detach())
    Y[:, r:].copy_(gB.detach())
    return Y


def _r_by_r_factors(
    As, Bs, grad_As, grad_Bs, scalings, sv_rtol: float | None, compute_dtype: torch.dtype, workspace: _Workspace
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer K = [SB (gA A^T) SA; SA] (2r x r) and ||G_hat_l||_F^2 as a tensor of shape (L,).

    Then G_hat A^+ = [B, gB] K / (2s). Only r x r results are kept across layers, so the extra
    memory of the whole sweep is O(L r^2) plus one (m + n) 2r workspace per layer shape.
    The six Gram products come from two stacked ones: [A; gA][A; gA]^T and [B, gB]^T [B, gB].
    """
    _check_inputs(As, Bs, grad_As, grad_Bs, scalings)
    factors, sq_norms = [], []
    for A, B, gA, gB, s in zip(As, Bs, grad_As, grad_Bs, scalings):
        if s == 0:
            raise FlatLoraError("a LoRA scaling of 0 makes the full-weight gradient undefined: use lora_alpha > 0")
        r, n = A.shape
        rtol = sv_rtol if sv_rtol is not None else _default_sv_rtol(A.dtype, r)
        X = workspace.get((2 * r, n), compute_dtype, A.device)
        X[:r].copy_(A.detach())
        X[r:].copy_(gA.detach())
        GX = X @ X.T  # [[A A^T, A gA^T], [gA A^T, gA gA^T]]
        Y = _stack_b(B, gB, compute_dtype, workspace)
        GY = Y.T @ Y  # [[B^T B, B^T gB], [gB^T B, gB^T gB]]
        SA = gram_pinv(GX[:r, :r], rtol)
        SB = gram_pinv(GY[:r, :r], rtol)
        SB_gA_At_SA = SB @ GX[r:, :r] @ SA
        sq = (
            _trace_of_product(SA, GY[r:, r:])
            + _trace_of_product(SB, GX[r:, r:])
            + 2 * _trace_of_product(GY[r:, :r], SB_gA_At_SA)
        ) / (4 * s * s)
        # The three terms sum to a squared norm; rounding can leave a tiny negative value.
        sq_norms.append(sq.clamp_min(0).to(As[0].device))
        factors.append(torch.cat([SB_gA_At_SA, SA]))
    return factors, torch.stack(sq_norms)


def flat_lora_directions(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    grad_As: Sequence[torch.Tensor],
    grad_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    sv_rtol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer ``G_hat_l @ A_l^+`` (m x r) and ``||G_hat_l||_F^2``, in ``compute_dtype``.

    G_hat = 1/2 ((1/s) gB (A^T)^+ + (1/s) (B^T)^+ gA) is the paper's estimate of the full
    weight gradient (Eq. 10-12). Returns ``(directions, sq_norms)`` with ``sq_norms`` of
    shape (L,) on the first layer's device.
    """
    workspace = _Workspace()
    factors, sq_norms = _r_by_r_factors(As, Bs, grad_As, grad_Bs, scalings, sv_rtol, compute_dtype, workspace)
    directions = [
        _stack_b(B, gB, compute_dtype, workspace) @ K / (2 * s) for B, gB, s, K in zip(Bs, grad_Bs, scalings, factors)
    ]
    return directions, sq_norms


def perturbation_scales(sq_norms: torch.Tensor, rho: float, norm: str = "global") -> torch.Tensor:
    """rho / N per layer: N is the global norm over layers or each layer's own norm; 0 where N is 0."""
    if norm not in NORMS:
        raise FlatLoraError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if not rho >= 0:
        raise FlatLoraError(f"rho must be >= 0, got {rho}: pass a non-negative radius")
    N = sq_norms.sum().sqrt().expand_as(sq_norms) if norm == "global" else sq_norms.sqrt()
    return torch.where(N > 0, rho / N.clamp_min(torch.finfo(N.dtype).tiny), torch.zeros_like(N))


def flat_lora_eps_b(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    grad_As: Sequence[torch.Tensor],
    grad_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    rho: float,
    norm: str = "global",
    *,
    sv_rtol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """Flat-LoRA's perturbation of each B (METHODS.md section 3), never forming an m x n matrix.

    eps_W = rho G_hat / N is the SAM step in the full weight space (N the global norm over
    layers, or per layer with ``norm="layer"``), carried into B as eps_B = (1/s) eps_W A^+,
    so that s eps_B A = eps_W P_A has norm at most rho.

    Args:
        As: per layer A, (r, n). Bs: per layer B, (m, r).
        grad_As, grad_Bs: dL/dA and dL/dB, same shapes.
        scalings: per layer s (alpha / r, or alpha / sqrt(r) with rslora).
        rho: radius in the full weight space, >= 0.
        norm: ``"global"`` (SAM's ball over all layers) or ``"layer"``.
        sv_rtol: singular-value cutoff of the pseudo-inverses, relative to the largest.
        compute_dtype: dtype of the r x r algebra (float64 by default; never bf16/fp16).

    Returns:
        eps_B per layer, (m, r), in each B's dtype and device.
    """
    # Two sweeps: the norms need every layer before any eps_B can be scaled, and only the
    # r x r factors are kept in between, never a full (m x r) direction per layer.
    workspace = _Workspace()
    factors, sq_norms = _r_by_r_factors(As, Bs, grad_As, grad_Bs, scalings, sv_rtol, compute_dtype, workspace)
    scales = perturbation_scales(sq_norms, rho, norm)
    eps_Bs = []
    for B, gB, s, scale, K in zip(Bs, grad_Bs, scalings, scales, factors):
        m, r = B.shape
        direction = workspace.get((m, r), compute_dtype, B.device)
        torch.matmul(_stack_b(B, gB, compute_dtype, workspace), K, out=direction)
        direction.mul_(scale.to(direction.device) / (2 * s * s))  # G_hat A^+ / (2s), then rho / (N s)
        eps_Bs.append(torch.empty_like(B).copy_(direction))
    return eps_Bs


def cosine(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """cos(x, y) of two perturbations given per layer (x_l, y_l same shapes), in float64; None if either is 0."""
    dot = sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(xs, ys))
    nx = torch.stack([x.detach().double().norm() for x in xs]).norm()
    ny = torch.stack([y.detach().double().norm() for y in ys]).norm()
    return dot / (nx * ny) if nx > 0 and ny > 0 else None


def realized_sq_norms(
    eps_Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scalings: Sequence[float]
) -> torch.Tensor:
    """||s eps_B A||_F^2 per layer, the full-space size of a B perturbation, via r x r algebra."""
    out = []
    for eps_B, A, s in zip(eps_Bs, As, scalings):
        e, a = eps_B.detach().double(), A.detach().double()
        out.append((s * s * _trace_of_product(e.T @ e, a @ a.T)).to(As[0].device))
    return torch.stack(out)


def sam_perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
) -> list[torch.Tensor]:
    """SAM's ascent step over all tensors as one vector: eps = rho g / ||g||.

    With ``adaptive`` (ASAM), eps = rho T^2 g / ||T g|| with T = |theta| + eta. One global norm
    over every tensor; a zero gradient gives a zero perturbation.
    """
    if not rho >= 0:
        raise FlatLoraError(f"rho must be >= 0, got {rho}: pass a non-negative radius")
    if adaptive and not eta >= 0:
        raise FlatLoraError(f"eta must be >= 0, got {eta}: pass a non-negative ASAM offset")
    grads = [g.detach() for g in grads]
    if adaptive:
        scales = [p.detach().abs() + eta for p in params]
        scaled = [t * g for t, g in zip(scales, grads)]
    else:
        scales, scaled = None, grads
    sq = torch.stack([g.float().square().sum().to(grads[0].device) for g in scaled]).sum()
    norm = sq.sqrt()
    factor = torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
    if adaptive:
        return [(t * t * g * factor.to(g.device)).to(g.dtype) for t, g in zip(scales, grads)]
    return [(g * factor.to(g.device)).to(g.dtype) for g in grads]
