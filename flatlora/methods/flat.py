"""``flat-lora``: the paper's Flat-LoRA, a full-space SAM perturbation carried into B (two passes)."""

from __future__ import annotations

import torch

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod
from flatlora.perturbation import NORMS, cosine, flat_lora_eps_b, realized_sq_norms

PREVIOUS_KEY = "previous_eps_b"  # eps_B of the last step, per B: the rotation diagnostic's other end


class FlatLoRA(LoRAMethod):
    """First pass at (A, B); second pass at (A, B + eps_B) with eps_B = (1/s) eps_W A^+.

    ``norm="global"`` (default) normalises G_hat over all layers, SAM's ball in the full
    weight space; ``norm="layer"`` per layer, as one public implementation does.
    """

    name = "flat-lora"
    two_pass = True
    uses_rho = True
    needs_plain_lora = True

    def __init__(self, model, base_optimizer=None, *, norm: str = "global", **kwargs) -> None:
        if norm not in NORMS:
            raise FlatLoraError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
        super().__init__(model, base_optimizer, **kwargs)
        self.norm = norm

    def _eps_b(self, grads, rho: float) -> list[torch.Tensor]:
        """The exact Flat-LoRA perturbation of every B at the current (clean) weights."""
        grad_As, grad_Bs = self._factor_grads(grads)
        As = [p.a_matrix.detach() for p in self.pairs]
        Bs = [p.b_matrix.detach() for p in self.pairs]
        scalings = [p.scaling for p in self.pairs]
        return flat_lora_eps_b(As, Bs, grad_As, grad_Bs, scalings, rho, self.norm)

    def _realized_sq_norms(self, eps_Bs: list[torch.Tensor]) -> torch.Tensor:
        """||s eps_B A||_F^2 per layer (float64): the full-weight size of B perturbations."""
        return realized_sq_norms(eps_Bs, [p.a_matrix for p in self.pairs], [p.scaling for p in self.pairs])

    def _log_b_perturbation(self, eps_Bs: list[torch.Tensor]) -> None:
        per_layer = torch.stack([e.float().norm().to(eps_Bs[0].device) for e in eps_Bs])
        realized = self._realized_sq_norms(eps_Bs).sum().sqrt()
        self._log.update(
            {
                keys.EPS_B_NORM: per_layer.square().sum().sqrt(),
                keys.EPS_B_NORM_PER_LAYER: per_layer,
                keys.REALIZED_NORM: realized,
            }
        )
        if self.rho > 0:
            self._log[keys.REALIZED_RATIO] = realized / self.rho

    def _log_rotation(self, eps_Bs: list[torch.Tensor]) -> None:
        """cos(eps_B_t, eps_B_{t-1}) over all layers; eps_B_t kept in the state for the next step (and resume)."""
        now = [eps.detach().reshape(pair.B.shape) for pair, eps in zip(self.pairs, eps_Bs)]
        prev = [self.state[pair.B].get(PREVIOUS_KEY) for pair in self.pairs]
        if all(p is not None for p in prev):
            cos = cosine(prev, now)
            if cos is not None:
                self._log[keys.EPS_ROTATION_COSINE] = cos
        for pair, eps in zip(self.pairs, now):
            self.state[pair.B][PREVIOUS_KEY] = eps.to(torch.float32 if pair.B.element_size() < 4 else pair.B.dtype)

    def _perturbation(self, grads):
        eps_Bs = self._eps_b(grads, self.rho)
        self._log_b_perturbation(eps_Bs)
        self._log_rotation(eps_Bs)
        return [(p.B, e) for p, e in zip(self.pairs, eps_Bs)]
