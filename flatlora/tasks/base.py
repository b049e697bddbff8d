"""What a task hands the training run: :class:`TaskSetup`, the same shape for every task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

AfterTraining = Callable[[Any, int], Mapping[str, Any]]
"""``hook(run, step) -> final metrics``: run on rank 0 after the final evaluations (``run`` None elsewhere)."""


@dataclass
class TaskSetup:
    """Everything task-specific a training run needs, built by one module per task.

    Attributes:
        model: The peft-wrapped model to train.
        tokenizer: Its tokenizer (the Trainer's ``processing_class``).
        model_id: The base model as the run's identity names it.
        data: What run.json records of the data (the config's data spec, split sizes, ...).
        splits: The task's raw splits (``train``, ``dev`` when there is one, ``test``).
        datasets: The splits as the Trainer takes them (tokenized for a causal LM), same keys.
        collator: The Trainer's data collator.
        compute_metrics: The Trainer's ``compute_metrics`` (its ``loss`` replaces the Trainer's own).
        final_metrics: The metrics each final split evaluation records (``<split>_<name>``).
        preprocess_logits: The Trainer's ``preprocess_logits_for_metrics``, or None.
        run_info: More run.json fields, written beside ``task`` when the run starts.
        after_training: Called as ``after_training(run, step)`` on rank 0 once the final
            evaluations are done; writes what it adds to the run directory and returns more
            final metrics. None: nothing to do.
    """

    model: Any
    tokenizer: Any
    model_id: str
    data: dict[str, Any]
    splits: dict[str, Any]
    datasets: dict[str, Any]
    collator: Any
    compute_metrics: Callable[[Any], dict[str, float]]
    final_metrics: tuple[str, ...]
    preprocess_logits: Callable[[Any, Any], Any] | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    after_training: AfterTraining | None = None
