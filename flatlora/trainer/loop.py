"""The plain training loop over dict batches (tests, notebooks, the demo) and evaluation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from flatlora import log_keys as keys
from flatlora.errors import FlatLoraError
from flatlora.methods.base import LoRAMethod

Batch = dict[str, Any]
BatchLossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The HF convention: the model computes its own loss from ``labels`` in the batch."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise FlatLoraError("the model returned no loss: put labels in the batch or pass loss_fn=")
    return out.loss


def to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    if device is None:
        return batch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Iterate again from the start when exhausted (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise FlatLoraError("the data loader yielded no batch: check the dataset is not empty")


def train_loop(
    model: torch.nn.Module,
    method: LoRAMethod,
    batches: Iterable[Batch],
    steps: int,
    *,
    loss_fn: BatchLossFn = model_loss,
    lr_scheduler: Any = None,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run ``steps`` optimizer steps of ``method``, cycling over ``batches``.

    Each step is ``method.train_step`` on one batch, so two-pass methods see the same batch
    twice. Returns one log record per step (``step``, ``lr``, ``loss`` and the method's
    quantities); ``callback`` gets each record as it is made. ``progress`` shows a tqdm bar on
    a terminal, and a plain line every tenth of the run where stderr is not one (CI, a log file).
    """
    if steps < 0:
        raise FlatLoraError(f"steps must be >= 0, got {steps}")
    model.train()
    records = []
    data = _cycle(batches)
    bar = None
    plain = progress and not sys.stderr.isatty()
    every = max(1, steps // 10)
    if progress and not plain:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=method.name, unit="step")
    started = time.perf_counter()
    for _ in range(steps):
        batch = to_device(next(data), device)
        lr = method.param_groups[0]["lr"]
        record = method.train_step(lambda batch=batch: loss_fn(model, batch))
        record = {keys.STEP: method.steps_done, keys.LR: lr, **record}
        if lr_scheduler is not None:
            lr_scheduler.step()
        records.append(record)
        if callback is not None:
            callback(record)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{record[keys.LOSS]:.4f}")
        elif plain and (len(records) % every == 0 or len(records) == steps):
            seconds = time.perf_counter() - started
            print(
                f"{method.name}: step {len(records)}/{steps} loss {record[keys.LOSS]:.4f} ({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    if bar is not None:
        bar.close()
    return records


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean loss per example (uneven batches weighted by size) and accuracy, in eval mode.

    Accuracy is reported for classification outputs (logits of shape (batch, classes)).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss, total, correct, classified = 0.0, 0, 0, 0
    try:
        for batch in batches:
            batch = to_device(batch, device)
            out = model(**batch)
            n = batch["labels"].shape[0]
            total_loss += float(out.loss) * n
            total += n
            if out.logits.dim() == 2:
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                classified += n
    finally:
        model.train(was_training)
    if total == 0:
        raise FlatLoraError("evaluation got no examples: check the evaluation set is not empty")
    result = {"loss": total_loss / total}
    if classified:
        result["accuracy"] = correct / classified
    return result
