"""Mixed precision: which precisions a device can train in, and fp16 with a loss scaler on CPU.

accelerate runs fp16 autocast with a ``GradScaler`` on GPUs only; on a CPU it silently trains
in fp32. torch's CPU autocast does support float16 (in the builds that have it), so
``FlatLoraTrainer`` turns it on there with a CPU ``GradScaler``, and refuses fp16 in one
line where the build lacks it, before anything is written.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from flatlora.errors import FlatLoraError

PRECISIONS = ("fp32", "bf16", "fp16")


@functools.cache
def cpu_fp16_autocast_available() -> bool:
    """Whether this torch build's CPU autocast computes a matmul in float16."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    except (RuntimeError, ValueError):
        return False
    return out.dtype == torch.float16


def check_precision(precision: str, device_type: str) -> None:
    """Refuse a precision the device cannot train in, naming the alternatives."""
    if precision not in PRECISIONS:
        raise FlatLoraError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
    if precision == "fp16" and device_type == "cpu" and not cpu_fp16_autocast_available():
        raise FlatLoraError(
            f"--precision fp16 needs float16 autocast, which this torch build ({torch.__version__}) lacks on CPU: "
            "use --precision bf16 or fp32, or train on a GPU"
        )


def enable_cpu_fp16(accelerator: Any) -> None:
    """Give an fp16 accelerator on CPU what accelerate gives one on a GPU: autocast and a loss scaler.

    Must run before ``accelerator.prepare`` (the model's forward is wrapped in autocast there,
    and the optimizer gets the scaler). Does nothing off CPU or when a scaler is already set.
    """
    if accelerator.mixed_precision != "fp16" or accelerator.device.type != "cpu" or accelerator.scaler is not None:
        return
    check_precision("fp16", "cpu")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
