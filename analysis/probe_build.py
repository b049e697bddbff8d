"""The batches of a probe set, built from a dataset, a data spec and a tokenizer, or a run's own data.

Each builder returns :class:`ProbeParts` (batches, description, weighting), which the
constructors of :class:`flatlora_analysis.probe.ProbeSet` (``from_dataset``, ``from_data``,
``from_run``) turn into a probe set; this module knows nothing of the container, so the
container imports it and not the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatlora.errors import FlatLoraError

Batch = dict[str, Any]
SPLITS = ("train", "dev", "test")


def scored_tokens(batch: Batch) -> int:
    """Target tokens a causal LM's loss averages over: labels after the shift that are not -100."""
    labels = batch.get("labels")
    if not (torch.is_tensor(labels) and labels.dim() == 2):
        raise FlatLoraError("token weighting needs 2-D 'labels' (causal-LM batches): use weighting='examples'")
    return int((labels[:, 1:] != -100).sum())


def batch_size_of(batch: Batch) -> int:
    """Examples in an HF dict batch: the length of ``labels``, else of its first tensor."""
    labels = batch.get("labels")
    if torch.is_tensor(labels) and labels.dim() > 0:
        return int(labels.shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise FlatLoraError("a probe batch holds no tensor: pass HF-style dicts such as {'input_ids': ..., 'labels': ...}")


def shard_batches(batches: Sequence[Batch], rank: int, world: int, n_examples: int) -> tuple[Batch, ...]:
    """Rank ``rank``'s contiguous rows of every batch (see :meth:`flatlora_analysis.probe.ProbeSet.shard`).

    Raises:
        FlatLoraError: fewer examples than ranks, or a rank left without a row.
    """
    if n_examples < world:
        raise FlatLoraError(
            f"a probe set of {n_examples} examples cannot be split over {world} ranks: "
            "use more examples (--examples) or fewer processes"
        )
    mine = []
    for batch in batches:
        n = batch_size_of(batch)
        rows = torch.arange(n).tensor_split(world)[rank]
        if len(rows) == 0:
            continue
        mine.append(_rows(batch, int(rows[0]), int(rows[-1]) + 1))
    if not mine:  # more ranks than rows of every batch: an empty share still joins every all-reduce
        raise FlatLoraError(f"rank {rank} of {world} gets no probe row: use batches of at least {world} examples")
    return tuple(mine)


def split_batches(batches: Sequence[Batch], rows: int, *, tokens: bool) -> tuple[Batch, ...]:
    """Every batch cut into contiguous chunks of at most ``rows`` rows (see ``ProbeSet.split_rows``).

    Under token weighting (``tokens``) a chunk without a scored token is left out.

    Raises:
        FlatLoraError: ``rows`` not a whole number >= 1.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise FlatLoraError(f"micro-batch rows={rows!r} is invalid: pass an integer >= 1")
    chunks = []
    for batch in batches:
        n = batch_size_of(batch)
        for lo in range(0, n, rows):
            chunk = _rows(batch, lo, min(lo + rows, n))
            if not (tokens and scored_tokens(chunk) == 0):
                chunks.append(chunk)
    return tuple(chunks)


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows lo:hi of every tensor of the batch that has one row per example."""
    n = batch_size_of(batch)
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()}


def batches_description(description: dict[str, Any] | None) -> dict[str, Any]:
    """What a probe set of given batches records of them: source ``batches`` unless ``description`` says otherwise."""
    return {"source": "batches", **(description or {})}


@dataclass(frozen=True)
class ProbeParts:
    """What a probe set is made of, before it is one.

    Attributes:
        batches: the HF dict batches, in order.
        description: where they came from (source, data, split, n, batch size, ...).
        weighting: ``"examples"`` or ``"tokens"`` (causal-LM batches).
    """

    batches: list[Batch]
    description: dict[str, Any] = field(default_factory=dict)
    weighting: str = "examples"


def dataset_parts(
    dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], Batch],
    *,
    n: int | None = None,
    batch_size: int = 32,
    description: dict[str, Any] | None = None,
    weighting: str = "examples",
) -> ProbeParts:
    """The first ``n`` examples of ``dataset`` (all by default), batched by ``collate_fn``.

    Args:
        dataset: indexable examples.
        collate_fn: turns a list of examples into one dict batch.
        n: how many examples (None: all).
        batch_size: examples per batch.
        description: recorded with ``n`` and ``batch_size``.
        weighting: the probe set's weighting.

    Returns:
        The parts; their description holds ``n`` (the count taken) and ``batch_size``.

    Raises:
        FlatLoraError: ``n`` or ``batch_size`` not a whole number >= 1, an empty dataset.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise FlatLoraError(f"n={n!r} probe examples is invalid: pass an integer >= 1, or None for all")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlatLoraError(f"batch_size={batch_size!r} is invalid: pass an integer >= 1")
    count = len(dataset) if n is None else min(n, len(dataset))
    if count == 0:
        raise FlatLoraError("the probe set is empty: the split has no examples; choose another split")
    examples = [dataset[i] for i in range(count)]
    batches = [collate_fn(examples[i : i + batch_size]) for i in range(0, count, batch_size)]
    desc = {"n": count, "batch_size": batch_size, **(description or {})}
    return ProbeParts(batches, desc, weighting)


def data_parts(
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
) -> ProbeParts:
    """The batches of a data spec (as ``flatlora train --data`` takes it) read with ``tokenizer``.

    Arguments as :meth:`flatlora_analysis.probe.ProbeSet.from_data` takes them.

    Raises:
        FlatLoraError: an unknown task, a split the data does not have, bad ``n``/``batch_size``.
    """
    if task == "causal-lm":
        return _causal_data_parts(
            data, tokenizer, split=split, n=n, batch_size=batch_size, max_length=max_length, shots=shots,
            seed=seed, test_cap=test_cap, prompt_column=prompt_column, target_column=target_column,
            text_column=text_column, chat_template=chat_template,
        )  # fmt: skip
    if task != "classification":
        raise FlatLoraError(f"unknown task {task!r}: use classification or causal-lm")
    from flatlora.data import TextClassificationCollator, cap_test, load_data, make_few_shot

    columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v is not None}
    splits = load_data(data, **columns)
    if shots is not None:  # the run's few-shot sample (LM-BFF), rebuilt from its seed
        splits = make_few_shot(splits, shots, seed, test_cap=test_cap)
    elif "test" in splits:
        splits = {**splits, "test": cap_test(splits["test"], test_cap)}
    if split not in splits:
        raise FlatLoraError(f"data {str(data)!r} has no {split!r} split (it has {', '.join(splits)}): pass --split")
    desc = {"source": "data", "data": str(data), "split": split, "shots": shots, "seed": seed}
    return dataset_parts(
        splits[split],
        TextClassificationCollator(tokenizer, max_length),
        n=n,
        batch_size=batch_size,
        description=desc,
    )


def _causal_data_parts(data, tokenizer, *, split, n, batch_size, max_length, shots, seed, test_cap,
                       prompt_column, target_column, text_column, chat_template) -> ProbeParts:  # fmt: skip
    from flatlora.data.causal import load_causal_data, make_causal_splits
    from flatlora.data.lm_encode import CausalLMCollator, encode_dataset

    splits = load_causal_data(data, prompt_column, target_column, text_column)
    splits = make_causal_splits(splits, shots, seed, test_cap)
    if split not in splits:
        raise FlatLoraError(f"data {str(data)!r} has no {split!r} split (it has {', '.join(splits)}): pass --split")
    encoded = encode_dataset(splits[split], tokenizer, max_length, chat_template=chat_template, split=split)
    desc = {"source": "data", "data": str(data), "split": split, "shots": shots, "seed": seed, "task": "causal-lm"}
    return dataset_parts(
        encoded, CausalLMCollator(tokenizer.pad_token_id), n=n, batch_size=batch_size, description=desc,
        weighting="tokens",
    )  # fmt: skip


def run_parts(run: str | Path | Any, split: str = "train", n: int | None = None, batch_size: int = 32) -> ProbeParts:
    """A run's own data, rebuilt from run.json (same few-shot sample, tokenizer, max length).

    Args:
        run: a run directory (path or :class:`flatlora.runs.Run`).
        split: ``"train"``, ``"dev"`` or ``"test"``.
        n: the first n examples of the split; None for all of it.
        batch_size: examples per probe batch.

    Returns:
        The parts, their description's source ``run`` with the run's path.

    Raises:
        FlatLoraError: an unknown split, a run.json that names no data spec.
    """
    from flatlora.models import resolve_model_path
    from flatlora.runs import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    if split not in SPLITS:
        raise FlatLoraError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    data = run.info.get("data") or {}
    if not data.get("spec"):
        raise FlatLoraError(
            f"{run.path}/run.json names no data spec: pass --data to say what to measure it on "
            "(Python: ProbeSet.from_data or from_batches)"
        )
    if run.info.get("task") == "causal-lm":
        from flatlora.causal_lm import load_causal_tokenizer

        tokenizer = load_causal_tokenizer(run.info.get("model"), run.hparams.get("gguf_file"))
        parts = data_parts(
            data["spec"], tokenizer, split=split, n=n, batch_size=batch_size, task="causal-lm",
            max_length=int(run.hparams.get("max_length", 128)), shots=data.get("shots"),
            seed=int(data.get("seed", 13)), test_cap=data.get("test_cap"), text_column=data.get("text_column"),
            prompt_column=data.get("prompt_column"), target_column=data.get("target_column"),
            chat_template=bool(run.hparams.get("chat_template", True)),
        )  # fmt: skip
        return ProbeParts(parts.batches, _from_run(parts, run), "tokens")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(run.info.get("model")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parts = data_parts(
        data["spec"],
        tokenizer,
        split=split,
        n=n,
        batch_size=batch_size,
        max_length=int(run.hparams.get("max_length", 128)),
        shots=data.get("shots"),
        seed=int(data.get("seed", 13)),
        test_cap=data.get("test_cap"),
        text_column=data.get("text_column"),
        label_column=data.get("label_column"),
    )
    return ProbeParts(parts.batches, _from_run(parts, run))


def _from_run(parts: ProbeParts, run: Any) -> dict[str, Any]:
    """The description of a run's probe set: that of its data's, its source the run."""
    return {**batches_description(parts.description), "source": "run", "run": str(run.path)}
