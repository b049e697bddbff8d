"""``lora-sam``: SAM on all LoRA factors as one vector (the paper's Eq. 7 baseline), and ASAM."""

from __future__ import annotations

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod
from flatlora.perturbation import sam_perturbation


class LoRASAM(LoRAMethod):
    """eps = rho g / ||g|| over every A and B (one global norm), two passes per step.

    With ``adaptive=True`` (ASAM): eps = rho T^2 g / ||T g||, T = |theta| + eta.
    """

    name = "lora-sam"
    two_pass = True
    uses_rho = True

    def __init__(self, model, base_optimizer=None, *, adaptive: bool = False, eta: float = 0.01, **kwargs) -> None:
        if adaptive and not eta >= 0:
            raise FlatLoraError(f"eta must be >= 0, got {eta}: pass a non-negative ASAM offset")
        super().__init__(model, base_optimizer, **kwargs)
        self.adaptive = adaptive
        self.eta = eta

    def _perturbation(self, grads):
        grads = [g if g is not None else t.new_zeros(t.shape) for g, t in zip(grads, self.factor_params)]
        eps = sam_perturbation(self.factor_params, grads, self.rho, adaptive=self.adaptive, eta=self.eta)
        self._log[keys.EPS_NORM] = sum(e.float().square().sum().to(eps[0].device) for e in eps).sqrt()
        return list(zip(self.factor_params, eps))
