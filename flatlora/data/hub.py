"""GLUE tasks from the Hugging Face Hub through the optional `datasets` package."""

from __future__ import annotations

from typing import Any

from flatlora.data.dataset import TextDataset, TextExample
from flatlora.data.glue import GLUE_TASKS, _glue_task_key
from flatlora.data.tables import SUPPORTED_SOURCES
from flatlora.errors import FlatLoraError


def load_hub(name: str) -> dict[str, TextDataset]:
    """Download a GLUE task with Hugging Face `datasets` ("sst2", "glue/sst2", "mnli", ...).

    Returns {"train", "test"} where "test" is the GLUE validation split (matched for MNLI,
    mismatched for "mnli-mm"): GLUE's own test split has no labels, and the few-shot
    protocol reports on the original validation set.
    """
    task_key = _glue_task_key(name)
    if task_key not in GLUE_TASKS:
        raise FlatLoraError(f"unknown GLUE task {name!r}: pass one of {', '.join(GLUE_TASKS)}, or a local path")
    task = GLUE_TASKS[task_key]
    try:
        import datasets
    except ImportError:
        raise FlatLoraError(
            f"loading {name!r} from the Hub needs the `datasets` package, which is not installed:"
            f" pip install datasets, or pass a local path to a {SUPPORTED_SOURCES}"
        ) from None
    try:
        hub_splits = datasets.load_dataset("glue", task.hub_config)
    except Exception as error:  # no network, offline mode and Hub errors raise many different types
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise FlatLoraError(
            f"could not load glue/{task.hub_config} from the Hugging Face Hub ({type(error).__name__}: {reason}):"
            f" check the network connection, or pass a local path to a {SUPPORTED_SOURCES}"
        ) from None
    label_names = _hub_label_names(hub_splits["train"]) or list(task.label_names)
    result = {}
    for split, hub_split in (("train", "train"), ("test", task.hub_test_split)):
        examples = [
            TextExample(
                str(row[task.text_column]),
                int(row["label"]),
                str(row[task.text_pair_column]) if task.text_pair_column else None,
            )
            for row in hub_splits[hub_split]
        ]
        result[split] = TextDataset(examples, list(label_names), f"glue/{task_key}/{split}")
    return result


def _hub_label_names(hub_split: Any) -> list[str] | None:
    """The ClassLabel names of a `datasets` split, if it carries them."""
    features = getattr(hub_split, "features", None) or {}
    names = getattr(features.get("label"), "names", None)
    return list(names) if names else None
