"""Replaying random draws: the global RNG state at one moment, to get the same dropout masks again."""

from __future__ import annotations

import torch


class RngSnapshot:
    """The global RNG state (CPU and CUDA) at one moment, to replay the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        """Set the global RNG state back to this snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
