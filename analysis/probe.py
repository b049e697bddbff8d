"""Probe sets: the fixed batches every measure evaluates on, with exact example weighting.

The loss over a probe set is the mean over its examples: a batch whose loss is a mean over
its n_b examples enters with weight n_b / N, so an uneven last batch does not bias it. A
custom ``loss_fn(outputs, batch)`` may return that mean (scalar) or one loss per example.
A causal-LM probe set (``weighting="tokens"``) is the mean over every scored token instead: the
model's loss of a batch is the mean over its t_b target tokens and enters with weight t_b / T,
so batches of uneven rows and lengths do not bias it either.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.probe_build import (
    SPLITS,
    Batch,
    batch_size_of,
    batches_description,
    data_parts,
    dataset_parts,
    run_parts,
    scored_tokens,
    shard_batches,
    split_batches,
)

LossFn = Callable[[Any, Batch], torch.Tensor]
__all__ = ["SPLITS", "WEIGHTINGS", "Batch", "LossFn", "ProbeSet", "batch_size_of", "scored_tokens", "takes_logits_mask"]
WEIGHTINGS = ("examples", "tokens")


_NO_MASK: set[type] = set()  # model classes seen to return full logits despite a logits_to_keep mask


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def takes_logits_mask(model: torch.nn.Module) -> bool:
    """Whether the (peft-wrapped) causal LM's forward takes ``logits_to_keep`` (transformers >= 4.50 LMs do)."""
    cls = type(_base_model(model))
    return cls not in _NO_MASK and _forward_takes_logits_to_keep(cls)


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class, once: every probe batch of every product asks."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class ProbeSet:
    """Fixed HF dict batches and how their loss is taken.

    Attributes:
        batches: the batches (dicts of tensors), in order.
        loss_fn: ``loss_fn(outputs, batch)`` -> mean loss (scalar) or per-example losses (vector);
            None takes ``outputs.loss`` (the model's mean loss from ``labels``).
        description: where the batches came from (run, split, n, batch size), for reports.
        weighting: ``"examples"`` (each batch by its rows) or ``"tokens"`` (causal LMs: by its
            scored target tokens; ``loss_fn`` must then return the batch's token-mean loss).
        totals: (examples, scored tokens) of the whole probe set when this one is a rank's
            shard (:meth:`shard`): the denominators of the weights, so the ranks' losses sum to
            the whole set's; None for a whole set.
    """

    batches: tuple[Batch, ...]
    loss_fn: LossFn | None = None
    description: dict[str, Any] = field(default_factory=dict)
    weighting: str = "examples"
    totals: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.batches:
            raise FlatLoraError("the probe set is empty: pass at least one batch (or a split with examples)")
        for batch in self.batches:
            if not isinstance(batch, dict):
                raise FlatLoraError(
                    f"a probe batch is a {type(batch).__name__}, not a dict: pass HF-style dict batches"
                )
            if self.loss_fn is None and "labels" not in batch:
                raise FlatLoraError("probe batches need 'labels' for the model's loss, or pass loss_fn=")
            batch_size_of(batch)
        if self.weighting not in WEIGHTINGS:
            raise FlatLoraError(f"unknown weighting {self.weighting!r}: use examples or tokens")
        if self.weighting == "tokens" and self.n_tokens == 0:
            raise FlatLoraError("the probe set has no scored token (every label is -100): pass batches with targets")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Batch],
        loss_fn: LossFn | None = None,
        description: dict[str, Any] | None = None,
        weighting: str = "examples",
    ) -> ProbeSet:
        """A probe set of the given dict batches (a list, a DataLoader, ...), read once.

        Raises:
            FlatLoraError: no batch, a batch that is not a dict, or no labels without ``loss_fn``.
        """
        batches = tuple(dict(b) for b in batches)
        return cls(batches, loss_fn, batches_description(description), weighting)

    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], Batch],
        *,
        n: int | None = None,
        batch_size: int = 32,
        description: dict[str, Any] | None = None,
        weighting: str = "examples",
    ) -> ProbeSet:
        """The first ``n`` examples of ``dataset`` (all by default), batched by ``collate_fn``.

        See :func:`flatlora_analysis.probe_build.dataset_parts`.
        """
        parts = dataset_parts(
            dataset, collate_fn, n=n, batch_size=batch_size, description=description, weighting=weighting
        )
        return cls.from_batches(parts.batches, description=parts.description, weighting=parts.weighting)

    @classmethod
    def from_data(
        cls,
        data: str | Path,
        tokenizer: Any,
        *,
        split: str = "train",
        n: int | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        shots: int | None = None,
        seed: int = 13,
        test_cap: int | None = 1000,
        text_column: str | None = None,
        label_column: str | None = None,
        task: str = "classification",
        prompt_column: str | None = None,
        target_column: str | None = None,
        chat_template: bool = True,
    ) -> ProbeSet:
        """A probe set from a data spec (as ``flatlora train --data`` takes) and a tokenizer.

        ``task="causal-lm"`` builds the batches training builds (prompt and padding -100 in
        ``labels``, EOS after each target, the chat template unless ``chat_template=False``), its
        loss the mean over every target token of the probe set; ``n`` counts (prompt, target) pairs.
        See :func:`flatlora_analysis.probe_build.data_parts`.
        """
        parts = data_parts(
            data, tokenizer, split=split, n=n, batch_size=batch_size, max_length=max_length, shots=shots, seed=seed,
            test_cap=test_cap, text_column=text_column, label_column=label_column, task=task,
            prompt_column=prompt_column, target_column=target_column, chat_template=chat_template,
        )  # fmt: skip
        return cls.from_batches(parts.batches, description=parts.description, weighting=parts.weighting)

    @classmethod
    def from_run(
        cls, run: str | Path | Any, split: str = "train", n: int | None = None, batch_size: int = 32
    ) -> ProbeSet:
        """The run's own data, rebuilt from run.json (same few-shot sample, tokenizer, max length).

        Args:
            run: a run directory (path or :class:`flatlora.runs.Run`).
            split: ``"train"``, ``"dev"`` or ``"test"``.
            n: the first n examples of the split; None for all of it.
            batch_size: examples per probe batch.
        """
        parts = run_parts(run, split, n=n, batch_size=batch_size)
        return cls(tuple(parts.batches), None, parts.description, parts.weighting)

    # -- use ---------------------------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        return [batch_size_of(b) for b in self.batches]

    @property
    def n_examples(self) -> int:
        """Examples of the probe set (of the whole set, for a shard)."""
        return self.totals[0] if self.totals is not None else sum(self.batch_sizes)

    @property
    def n_tokens(self) -> int:
        """Scored target tokens over the probe set (causal-LM batches; 0 where labels are not 2-D; whole set)."""
        if self.totals is not None:
            return self.totals[1]
        return sum(
            scored_tokens(b) for b in self.batches if torch.is_tensor(b.get("labels")) and b["labels"].dim() == 2
        )

    def batch_weight(self, batch: Batch) -> float:
        """This batch's weight in the probe-set mean: n_b / N, or t_b / T under token weighting."""
        if self.weighting == "tokens":
            return scored_tokens(batch) / self.n_tokens
        return batch_size_of(batch) / self.n_examples

    def weighting_settings(self) -> dict[str, Any]:
        """What a result records of the weighting: nothing for examples (the default), else the token count."""
        return {} if self.weighting == "examples" else {"weighting": "tokens", "n_tokens": self.n_tokens}

    def to(self, device: str | torch.device) -> ProbeSet:
        """The same probe set with every tensor on ``device``."""
        moved = tuple({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches)
        return ProbeSet(moved, self.loss_fn, self.description, self.weighting, self.totals)

    def shard(self, rank: int, world: int) -> ProbeSet:
        """Rank ``rank``'s share of every batch (contiguous rows), weighted as in the whole set.

        The sum over ranks of their shards' losses (and so of their gradients and Hessian
        products) is the whole set's loss: data-parallel products all-reduce to it.

        Raises:
            FlatLoraError: fewer examples than ranks.
        """
        desc = {**self.description, "shard": [rank, world]}
        batches = shard_batches(self.batches, rank, world, self.n_examples)
        return ProbeSet(batches, self.loss_fn, desc, self.weighting, (self.n_examples, self.n_tokens))

    def split_rows(self, rows: int) -> ProbeSet:
        """The same probe set in micro-batches of at most ``rows`` rows, weighted as the whole set.

        Each batch is cut into contiguous chunks; a chunk enters with its own examples (or
        scored tokens) over the whole set's, so the loss, its gradient and Hessian products are
        the same sums in another order. Chunks without a scored token are left out under token
        weighting (their weight is zero, their token mean undefined).

        Raises:
            FlatLoraError: ``rows`` not a whole number >= 1.
        """
        chunks = split_batches(self.batches, rows, tokens=self.weighting == "tokens")  # refuses a bad rows
        if max(self.batch_sizes) <= rows:
            return self
        desc = {**self.description, "micro_batch_rows": rows}
        return ProbeSet(chunks, self.loss_fn, desc, self.weighting, (self.n_examples, self.n_tokens))

    def weighted_loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """This batch's share of the probe-set mean loss: mean_b * n_b / N (or sum of per-example / N)."""
        if self.loss_fn is None:
            loss = getattr(outputs, "loss", None)
            if loss is None:
                raise FlatLoraError("the model returned no loss for a probe batch: include 'labels' or pass loss_fn=")
        else:
            loss = self.loss_fn(outputs, batch)
        if loss.dim() == 0:
            return loss * self.batch_weight(batch)
        if self.weighting == "tokens":
            raise FlatLoraError("under token weighting loss_fn must return the batch's token-mean loss (a scalar)")
        return loss.sum() / self.n_examples

    def batch_loss(self, model: torch.nn.Module, batch: Batch, overrides: dict[str, torch.Tensor] | None = None):
        """This batch's share of the probe-set loss of ``model`` with parameter ``overrides`` (functional call).

        Under token weighting with the model's own loss, the LM head runs on the scored
        positions only (``logits_to_keep`` as a boolean mask, where the model takes one): the
        same token-mean cross-entropy over the same tokens, without the vocabulary-sized logits
        of prompt and padding positions, which dominate a small LLM's memory in Hessian products.
        """
        from torch.func import functional_call

        mask = self._scored_mask(model, batch)
        if mask is None:
            outputs = functional_call(model, overrides or {}, args=(), kwargs=batch, strict=False)
            return self.weighted_loss(outputs, batch)
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = functional_call(
            model, overrides or {}, args=(), kwargs={**kwargs, "logits_to_keep": mask}, strict=False
        )
        targets = batch["labels"][:, 1:][mask[:, :-1]]
        logits = outputs.logits
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:  # a model that ignored the mask
            _NO_MASK.add(type(_base_model(model)))
            return self.batch_loss(model, batch, overrides)
        # at least float32, as transformers' loss takes it (which also casts float64 down: here it stays)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
        return loss * self.batch_weight(batch)

    def _scored_mask(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
        """(B, T) bool: position p of a row is kept when it predicts a scored label (labels[p + 1] != -100)."""
        if self.weighting != "tokens" or self.loss_fn is not None or not takes_logits_mask(model):
            return None
        labels = batch["labels"]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask

    def fingerprint(self) -> str:
        """A content hash of the batches (tensors' bytes and dtypes), for caches."""
        h = hashlib.sha256()
        if self.weighting != "examples":  # example-weighted fingerprints stay what they were
            h.update(f"weighting={self.weighting}".encode())
        for batch in self.batches:
            for key in sorted(batch):
                value = batch[key]
                h.update(key.encode())
                if torch.is_tensor(value):
                    t = value.detach().cpu().contiguous()
                    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                else:
                    h.update(repr(value).encode())
        return h.hexdigest()[:16]
