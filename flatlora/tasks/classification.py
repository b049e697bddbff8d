"""The classification task: few-shot splits, the classifier with its LoRA adapter, accuracy and loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flatlora.errors import FlatLoraError
from flatlora.tasks.base import TaskSetup

if TYPE_CHECKING:
    from flatlora.config import TrainConfig

DEFAULT_CLASSIFICATION_TEST_CAP = 1000
"""Test examples when --test-cap is not given."""
DEFAULT_CLASSIFICATION_EVAL_BATCH = 64
"""Evaluation batch of a classifier when --eval-batch-size is not given."""


def prepare_data(config: TrainConfig) -> dict[str, Any]:
    """The classification splits of a config (few-shot when ``shots`` is set).

    Args:
        config: A resolved classification config.

    Returns:
        ``{"train", "dev"?, "test"}`` TextDatasets, the test split capped at ``test_cap``.

    Raises:
        FlatLoraError: the config is a causal-LM one, the data cannot be read, or it has no
            test split and no ``shots`` to hold one out.
    """
    from flatlora.data import cap_test, load_data, make_few_shot

    kwargs = {}
    if config.text_column is not None:
        kwargs["text_column"] = config.text_column
    if config.label_column is not None:
        kwargs["label_column"] = config.label_column
    splits = load_data(config.data, **kwargs)
    if config.task == "causal-lm":
        raise FlatLoraError("prepare_data builds classification splits: use flatlora.tasks.causal.prepare_causal_data")
    if config.shots is not None:
        return make_few_shot(splits, config.shots, config.seed, test_cap=config.test_cap)
    if "test" not in splits:
        raise FlatLoraError(
            f"data {config.data!r} has no test split: pass --shots K (a test set is then held out), "
            "or a GLUE folder with test.tsv"
        )
    return {**splits, "test": cap_test(splits["test"], config.test_cap)}


def accuracy(eval_pred: Any) -> dict[str, float]:
    """Accuracy and the mean cross-entropy per example, from the gathered logits and labels.

    The returned ``loss`` replaces the Trainer's own, which averages per-batch means and, over
    several processes, weighs the duplicates that even out an uneven last batch.

    Args:
        eval_pred: The Trainer's ``(logits, labels)`` of a whole split.

    Returns:
        ``{"loss", "accuracy"}``.
    """
    import numpy as np

    logits, labels = eval_pred
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    labels = np.asarray(labels)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return {"loss": float(loss), "accuracy": float((logits.argmax(-1) == labels).mean())}


def classification_setup(config: TrainConfig) -> TaskSetup:
    """The data, classifier and metrics of a classification run.

    Args:
        config: A resolved classification config.

    Returns:
        The run's :class:`TaskSetup` (final metrics: loss and accuracy).

    Raises:
        FlatLoraError: the data or the model cannot be loaded as asked.
    """
    from flatlora.base_dtype import torch_dtype
    from flatlora.data import TextClassificationCollator
    from flatlora.models import canonical_model_id, load_classifier

    splits = prepare_data(config)
    train = splits["train"]
    model, tokenizer = load_classifier(
        config.model,
        num_labels=train.num_labels,
        lora=config.lora_options(),
        seed=config.seed,
        dtype=torch_dtype(config.dtype),
    )
    data = {**config.data_spec(), "label_names": train.label_names, "sizes": {k: len(v) for k, v in splits.items()}}
    return TaskSetup(
        model=model,
        tokenizer=tokenizer,
        model_id=canonical_model_id(config.model),
        data=data,
        splits=splits,
        datasets=splits,
        collator=TextClassificationCollator(tokenizer, config.max_length),
        compute_metrics=accuracy,
        final_metrics=("loss", "accuracy"),
    )
