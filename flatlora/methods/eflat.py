"""``eflat-lora``: the paper's EFlat-LoRA, an EMA of Flat-LoRA's perturbation, one pass per step."""

from __future__ import annotations

from typing import Any

import torch

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LossFn
from flatlora.methods.flat import FlatLoRA
from flatlora.methods.rng import RngSnapshot
from flatlora.perturbation import cosine

EMA_KEY = "ema_perturbation"
EMA_RADII = ("ema", "rho")


class EFlatLoRA(FlatLoRA):
    """B + e_bar_{t-1} for the pass; then e_bar_t = beta e_bar_{t-1} + (1 - beta) eps_B_t.

    eps_B_t is Flat-LoRA's perturbation built from this step's gradients with the clean A, B.
    ``beta`` weights the previous average (PyTorch/Adam convention; one public implementation
    puts 0.9 on the new term instead). e_bar lives in the optimizer state, so a resumed run
    continues bit-identically. ``diagnostics_every=k`` runs the Theorem-2 check every k steps.

    ``ema_radius="ema"`` applies e_bar itself (the paper's rule): an average of unit-radius
    directions that turn from step to step is shorter than each, so the realized radius falls
    below rho. ``ema_radius="rho"`` applies e_bar rescaled so that its full-weight size
    ||s e_bar A|| is rho (over all layers, or per layer with ``norm="layer"``), keeping its
    direction; e_bar itself keeps accumulating unscaled. Same cost per step; rho = 0 is LoRA.
    """

    name = "eflat-lora"
    two_pass = False

    def __init__(
        self,
        model,
        base_optimizer=None,
        *,
        beta: float = 0.9,
        diagnostics_every: int = 0,
        ema_radius: str = "ema",
        **kwargs,
    ) -> None:
        if ema_radius not in EMA_RADII:
            raise FlatLoraError(f"unknown ema_radius {ema_radius!r} (--ema-radius): use ema (the paper's rule) or rho")
        if not 0 <= beta < 1:
            raise FlatLoraError(f"beta must lie in [0, 1), got {beta}: 0.9 is the default")
        if diagnostics_every < 0:
            raise FlatLoraError(f"diagnostics_every must be >= 0 (0 = off), got {diagnostics_every}")
        super().__init__(model, base_optimizer, **kwargs)
        self.beta = beta
        self.diagnostics_every = diagnostics_every
        self.ema_radius = ema_radius

    def ema(self, pair) -> torch.Tensor:
        """e_bar of one layer, shaped like its B; fp32 when B is half precision."""
        state = self.state[pair.B]
        if EMA_KEY not in state:
            dtype = torch.float32 if pair.B.element_size() < 4 else pair.B.dtype
            state[EMA_KEY] = torch.zeros(pair.B.shape, dtype=dtype, device=pair.B.device)
        return state[EMA_KEY]

    def _perturbation(self, grads):
        emas = [self.ema(p) for p in self.pairs]
        applied = emas if self.ema_radius == "ema" else self._at_radius(emas, self.rho)
        self._log_b_perturbation([e.flatten(1) for e in applied])
        return [(p.B, e) for p, e in zip(self.pairs, applied)]

    def _at_radius(self, emas: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
        """e_bar scaled to full-weight size rho (globally, or per layer under norm="layer"); zero stays zero."""
        sq = self._realized_sq_norms([e.flatten(1) for e in emas])
        sizes = sq.sqrt() if self.norm == "layer" else sq.sum().sqrt().expand_as(sq)
        factors = torch.where(sizes > 0, rho / sizes.clamp_min(1e-300), torch.zeros_like(sizes))
        return [e * f.to(e.dtype) for e, f in zip(emas, factors.to(emas[0].device))]

    def _before_update(self, rho: float) -> None:
        eps_Bs = self._eps_b(None, rho)
        # e_bar_{t-1}, applied in this step's pass, against this step's exact eps_B
        cos = cosine([self.ema(p) for p in self.pairs], [e.reshape(p.B.shape) for p, e in zip(self.pairs, eps_Bs)])
        if cos is not None:
            self._log[keys.EMA_COSINE] = cos
        self._log_rotation(eps_Bs)
        for pair, eps in zip(self.pairs, eps_Bs):
            self.ema(pair).mul_(self.beta).add_(eps.reshape(pair.B.shape), alpha=1 - self.beta)
        self._log[keys.TARGET_EPS_B_NORM] = torch.stack([e.float().norm().to(eps_Bs[0].device) for e in eps_Bs]).norm()

    def diagnose(self, loss_fn: LossFn) -> dict[str, Any]:
        if self.diagnostics_every and self.steps_done % self.diagnostics_every == 0:
            return self.theorem2_check(loss_fn)
        return {}

    def theorem2_check(self, loss_fn: LossFn) -> dict[str, Any]:
        """The paper's Theorem 2, live: e_bar against the exact Flat-LoRA eps_B on this batch.

        Returns ||e_bar - eps_B|| / ||eps_B||, their cosine, and L(B + e_bar) - L(B + eps_B),
        every loss with the same dropout masks as the step's own pass (the RNG is replayed and
        left as found, so the check does not change the training run).
        """
        rng = RngSnapshot()
        try:
            clean = loss_fn()
            grads = torch.autograd.grad(clean, self.factor_params, allow_unused=True)
            eps = [e.reshape(p.B.shape) for p, e in zip(self.pairs, self._eps_b(grads, self.rho))]
            emas = [self.ema(p) for p in self.pairs]
            if self.ema_radius == "rho":  # the perturbation the step applies
                emas = self._at_radius(emas, self.rho)
            with torch.no_grad():
                rng.restore()
                loss_sam = self._loss_at(loss_fn, eps)
                rng.restore()
                loss_ema = self._loss_at(loss_fn, emas)
                diff = torch.stack([(m.double() - e.double()).norm() for m, e in zip(emas, eps)]).norm()
                n_eps = torch.stack([e.double().norm() for e in eps]).norm()
                n_ema = torch.stack([m.double().norm() for m in emas]).norm()
                dot = sum((m.double() * e.double()).sum() for m, e in zip(emas, eps))
        finally:
            rng.restore()
        rel = (diff / n_eps).item() if n_eps > 0 else float("nan")
        cosine = (dot / (n_ema * n_eps)).item() if n_eps > 0 and n_ema > 0 else float("nan")
        return {
            keys.T2_CLEAN_LOSS: clean.detach(),
            keys.T2_SAM_LOSS: loss_sam,
            keys.T2_EMA_LOSS: loss_ema,
            keys.T2_LOSS_GAP: loss_ema - loss_sam,
            keys.T2_REL_ERROR: rel,
            keys.T2_COSINE: cosine,
        }

    def _loss_at(self, loss_fn: LossFn, deltas: list[torch.Tensor]) -> torch.Tensor:
        self._apply([(p.B, d) for p, d in zip(self.pairs, deltas)])
        try:
            return loss_fn().detach()
        finally:
            self.restore()
