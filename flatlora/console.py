"""What a command needs around its work: progress bars, device checks, quiet transformers, the process group.

Shared by the measuring commands (``flatlora landscape``, ``flatlora report``) and the demo;
nothing here measures or trains, and nothing imports the measuring package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flatlora.errors import FlatLoraError

Progress = Callable[[int, int], None]


def check_device(text: str | None) -> None:
    """Refuse a --device torch cannot parse, or a CUDA device this torch or machine lacks, in one line.

    Args:
        text: the ``--device`` value (None: the default, always accepted).

    Raises:
        FlatLoraError: not a device, or a device this machine or torch build does not have.
    """
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise FlatLoraError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatLoraError(f"--device {text}: this torch sees no CUDA device (a CPU build, or no GPU): use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FlatLoraError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps"):
        raise FlatLoraError(f"--device {text}: flatlora measures on cpu or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise FlatLoraError(f"--device {text}: this torch has no MPS backend: use cpu")


class ProgressBars:
    """A tqdm bar per labelled task, for ``progress(done, total)`` callbacks; silent when disabled.

    When stderr is not a terminal (a log file, CI, nohup), the rule of training's progress:
    plain lines, one when a task starts, at each quarter and when it ends, instead of bars
    redrawn with carriage returns.

    Args:
        enabled: show progress at all.
        plain: plain lines instead of bars (None: when stderr is not a terminal).
    """

    def __init__(self, enabled: bool, plain: bool | None = None) -> None:
        self.enabled = enabled
        self.plain = (not sys.stderr.isatty()) if plain is None else plain

    def __call__(self, label: str) -> Progress | None:
        """A ``progress(done, total)`` callback for the task ``label``, or None when disabled."""
        if not self.enabled:
            return None
        if self.plain:
            return _plain_progress(label)
        from tqdm.auto import tqdm

        state: dict[str, Any] = {}

        def update(done: int, total: int) -> None:
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr)
            bar.total = total
            bar.n = done
            bar.refresh()
            if done >= total:
                bar.close()

        return update

    def iterate(self, items: list, desc: str) -> Iterable:
        """``items``, with a bar (or a line per item) labelled ``desc`` while they are gone through."""
        if not self.enabled:
            return items
        if self.plain:
            return _plain_items(items, desc)
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="adapter", file=sys.stderr)


def _plain_progress(label: str) -> Progress:
    state = {"quarter": -1}

    def update(done: int, total: int) -> None:
        quarter = 4 * done // max(total, 1)
        if quarter > state["quarter"]:
            state["quarter"] = quarter
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    return update


def _plain_items(items: list, desc: str) -> Iterator:
    for i, item in enumerate(items, start=1):
        print(f"{desc}: {i}/{len(items)}: {getattr(item, 'name', item)}", file=sys.stderr, flush=True)
        yield item


def quiet_transformers() -> None:
    """No weight-loading bars or load reports from transformers: the command shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch set up (gloo on CPU, nccl on GPU).

    Nothing happens in a single process (WORLD_SIZE unset or 1) or when a group is already there.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def group_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
