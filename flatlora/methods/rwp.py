"""``rwp-lora``: random weight perturbation of the merged weight (Li et al. 2024's Flat-LoRA)."""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlora import log_keys as keys
from flatlora.base_dtype import HALF_DTYPES, ensure_offset_hook
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod


class RWPLoRA(LoRAMethod):
    """Gaussian noise on W' = W0 + s B A, per output row i with std f_t rho ||W'_i|| / sqrt(n).

    f_t = (1 - cos(pi t / T)) / 2 ramps the noise up over the run's T = ``total_steps``. The
    noise is added to the frozen base weight, drawn once per optimizer step (so it is held
    across accumulation micro-batches) from a dedicated generator seeded with ``seed``, whose
    state is saved with the optimizer. Named rwp-lora to avoid the clash with this paper's
    Flat-LoRA. Costs one clone of each adapted base weight while perturbed. On a half-precision
    base the noise (often below W0's resolution) is never rounded into W0: it is a float32
    offset whose term the layer adds in float32 (:mod:`flatlora.base_dtype`).
    """

    name = "rwp-lora"
    uses_rho = True
    needs_plain_lora = True

    def __init__(self, model, base_optimizer=None, *, seed: int = 0, **kwargs) -> None:
        super().__init__(model, base_optimizer, **kwargs)
        if self.schedule.total_steps is None or self.schedule.total_steps < 1:
            raise FlatLoraError(
                "rwp-lora ramps its noise over the run: pass total_steps (the number of optimizer steps)"
            )
        for pair in self.pairs:
            if pair.base_weight().dtype in HALF_DTYPES:  # refuses quantized bases now rather than at the first step
                ensure_offset_hook(pair.layer.get_base_layer())  # and base layers that cannot carry the noise
        self.seed = seed
        # One generator per device holding adapted base weights, in module order. They are
        # saved in that order and restored by position, not by device name: under DDP only
        # rank 0 saves, and its cuda:0 is rank 1's cuda:1 (all ranks draw the same noise).
        devices = list(dict.fromkeys(pair.base_weight().device for pair in self.pairs))
        self._generators: dict[torch.device, torch.Generator] = {
            device: torch.Generator(device=device).manual_seed(seed) for device in devices
        }
        # Generator states at this step's first draw: later micro-batches of the same step
        # replay them, so the noise is held across accumulation without storing it.
        self._drawn_at: int | None = None
        self._step_states: dict[torch.device, torch.Tensor] = {}

    def noise_factor(self) -> float:
        """f_t = (1 - cos(pi t / T)) / 2."""
        progress = min(self.steps_done / self.schedule.total_steps, 1.0)
        return 0.5 * (1.0 - math.cos(math.pi * progress))

    def _perturbation(self, grads):
        scale = self.noise_factor() * self.rho
        self._log[keys.NOISE_SCALE] = scale
        if scale == 0:
            return []
        if self._drawn_at == self.steps_done:
            for device, state in self._step_states.items():
                self._generators[device].set_state(state)
        else:
            self._drawn_at = self.steps_done
            self._step_states = {device: g.get_state() for device, g in self._generators.items()}
        moves = []
        for W0, pairs in self._pairs_by_base():
            transposed = pairs[0].base_transposed
            merged = (W0.T if transposed else W0.flatten(1)).float()  # (m, n) like B @ A
            for pair in pairs:  # every active adapter on this layer: W' = W0 + sum_k s_k B_k A_k
                merged = merged + pair.scaling * (pair.b_matrix.float() @ pair.a_matrix.float())
            sigma = scale * merged.norm(dim=1, keepdim=True) / math.sqrt(merged.shape[1])
            noise = torch.randn(merged.shape, generator=self._generators[W0.device], device=W0.device) * sigma
            noise = (noise.T if transposed else noise).reshape(W0.shape)
            if W0.dtype in HALF_DTYPES:  # below W0's resolution: carried as a float32 term of the layer
                moves.append((pairs[0].layer.get_base_layer(), noise))
            else:
                moves.append((W0, noise.to(W0.dtype)))
        return moves

    def _pairs_by_base(self) -> list[tuple[torch.Tensor, list]]:
        """The pairs grouped by their base weight, in module order: one noise per distinct W0."""
        groups: dict[int, tuple[torch.Tensor, list]] = {}
        for pair in self.pairs:
            W0 = pair.base_weight()
            groups.setdefault(id(W0), (W0, []))[1].append(pair)
        return list(groups.values())

    def _extra_state(self) -> dict[str, Any]:
        # keyed by the saving rank's device names for reading; restored by position
        return {"seed": self.seed, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.seed = int(extra.get("seed", self.seed))
        self._drawn_at, self._step_states = None, {}
        saved = list(extra.get("generators", {}).values())
        for generator in self._generators.values():
            generator.manual_seed(self.seed)
        if not saved:  # saved before the first draw
            return
        if len(saved) != len(self._generators):
            raise FlatLoraError(
                f"the checkpoint holds rwp-lora noise streams for {len(saved)} device(s) but this model's adapted "
                f"weights lie on {len(self._generators)}: resume with the same device layout"
            )
        for generator, state in zip(self._generators.values(), saved):
            generator.set_state(state.cpu())
