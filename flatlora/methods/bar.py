"""``bar``: an approximation of balancedness-aware regularization (Li, Zhang and He, NeurIPS 2024).

BAR's exact oBAR/nBAR rules are not public. Under SAM, to first order,
d/dt (||B||^2 - ||A||^2) = 2 rho (||gB||^2 - ||gA||^2) / ||g||, while plain gradient flow keeps
||B||^2 - ||A||^2 constant. This one-pass method adds that drift explicitly: per layer,
gA += c A and gB -= c B with c = mu_t D / (||A||^2 + ||B||^2), D = (||gB||^2 - ||gA||^2) / ||g||,
which under gradient flow gives exactly the drift 2 mu_t D. mu_t is the method's ``rho``
with its schedule (linear or cosine decay, as in the paper).
"""

from __future__ import annotations

import torch

from flatlora import log_keys as keys
from flatlora.methods.base import LoRAMethod


class BAR(LoRAMethod):
    """Approximation of BAR: SAM's first-order balancedness drift as an explicit gradient term."""

    name = "bar"
    uses_rho = True

    def _before_update(self, rho: float) -> None:
        grad_As, grad_Bs = self._factor_grads(None)
        sq_A = [g.float().square().sum() for g in grad_As]
        sq_B = [g.float().square().sum() for g in grad_Bs]
        device = sq_A[0].device
        grad_norm = torch.stack([t.to(device) for t in sq_A + sq_B]).sum().sqrt()
        coefficients = []
        for pair, a2, b2 in zip(self.pairs, sq_A, sq_B):
            if pair.A.grad is None or pair.B.grad is None:
                continue
            size = pair.A.detach().float().square().sum() + pair.B.detach().float().square().sum()
            drift = (b2 - a2).to(device) / grad_norm
            c = torch.where((grad_norm > 0) & (size > 0), rho * drift / size.to(device), torch.zeros_like(drift))
            pair.A.grad.add_(pair.A.detach() * c.to(pair.A.device))
            pair.B.grad.sub_(pair.B.detach() * c.to(pair.B.device))
            coefficients.append(c)
        if coefficients:
            self._log[keys.BAR_COEFFICIENT_MEAN] = torch.stack(coefficients).mean()
