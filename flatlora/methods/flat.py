"""``flat-lora``: the paper's Flat-LoRA, a full-space SAM perturbation carried into B (two passes)."""

from __future__ import annotations

import torch

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod
from flatlora.perturbation import NORMS, flat_lora_eps_b, realized_sq_norms


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

    def _log_b_perturbation(self, eps_Bs: list[torch.Tensor]) -> None:
        per_layer = torch.stack([e.float().norm().to(eps_Bs[0].device) for e in eps_Bs])
        realized = realized_sq_norms(eps_Bs, [p.a_matrix for p in self.pairs], [p.scaling for p in self.pairs])
        self._log.update(
            {
                keys.EPS_B_NORM: per_layer.square().sum().sqrt(),
                keys.EPS_B_NORM_PER_LAYER: per_layer,
                keys.REALIZED_NORM: realized.sum().sqrt(),
            }
        )

    def _perturbation(self, grads):
        eps_Bs = self._eps_b(grads, self.rho)
        self._log_b_perturbation(eps_Bs)
        return [(p.B, e) for p, e in zip(self.pairs, eps_Bs)]
