"""Which task a run is (classification or causal-lm), and the config with the task's defaults filled in."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlora.data.causal import CAUSAL_LM, CLASSIFICATION, TASKS, detect_prompt_target, is_e2e_folder
from flatlora.errors import FlatLoraError
from flatlora.tasks.causal import DEFAULT_CAUSAL_EVAL_BATCH, DEFAULT_CAUSAL_TEST_CAP, generation_settings
from flatlora.tasks.classification import DEFAULT_CLASSIFICATION_EVAL_BATCH, DEFAULT_CLASSIFICATION_TEST_CAP

if TYPE_CHECKING:
    from flatlora.config import TrainConfig


def data_task(config: Any) -> str | None:
    """The task the data and column options imply, or None when they do not say.

    Args:
        config: Anything with ``data``, ``prompt_column``, ``target_column``, ``label_column``
            and ``text_column`` (a TrainConfig, or the report's data options).

    Returns:
        ``"causal-lm"``, ``"classification"`` or None.

    Raises:
        FlatLoraError: a table has both prompt/target and label columns.
    """
    from flatlora.data.load import KNOWN_DATA_NAMES

    spec = str(config.data).strip()
    if config.prompt_column or config.target_column:
        return CAUSAL_LM
    if config.label_column:
        return CLASSIFICATION
    if spec.lower() == "e2e" or is_e2e_folder(Path(spec).expanduser()):
        return CAUSAL_LM
    if spec.lower() in KNOWN_DATA_NAMES:
        return CLASSIFICATION
    path = Path(spec).expanduser()
    if path.is_dir():
        return CLASSIFICATION if (path / "train.tsv").is_file() else None
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        from flatlora.data.causal import table_columns

        try:
            columns = table_columns(path)
        except FlatLoraError:
            return None  # the loader reports the file's problem
        pair, label = detect_prompt_target(columns) is not None, "label" in columns
        if pair and label:
            raise FlatLoraError(
                f"{path} has both prompt/target and label columns: pass --task causal-lm or --task classification"
            )
        if pair or (config.text_column and not label):
            return CAUSAL_LM
        if label:
            return CLASSIFICATION
    return None


def resolve_task(config: TrainConfig) -> TrainConfig:
    """The config with its task, data, model defaults and test cap filled in.

    Args:
        config: The run's settings as given.

    Returns:
        A copy with ``task``, ``data``, ``test_cap`` and ``eval_batch_size`` set.

    Raises:
        FlatLoraError: an unknown task, a task the data contradicts, causal-LM options on a
            classification run, or generation settings out of range (each in one line, with the fix).
    """
    if config.task is not None and config.task not in TASKS:
        raise FlatLoraError(f"unknown --task {config.task!r}: use classification or causal-lm")
    if config.data is None:
        config = dataclasses.replace(config, data="e2e" if config.task == CAUSAL_LM else "tweets")
    implied = data_task(config)
    task = config.task or implied or CLASSIFICATION
    if implied is not None and implied != task:
        what = "a causal-LM data set (prompt/target pairs)" if implied == CAUSAL_LM else "a classification data set"
        fix = (
            "pass --task causal-lm (or drop --task)"
            if implied == CAUSAL_LM
            else "pass --task classification, or causal-LM data (e2e, an E2E folder, prompt/target columns)"
        )
        raise FlatLoraError(f"--data {config.data} is {what}, not {task} data: {fix}")
    if task == CLASSIFICATION:
        given = {
            "--prompt-column": config.prompt_column is not None,
            "--target-column": config.target_column is not None,
            "--gguf-file": config.gguf_file is not None,
            "--no-chat-template": not config.chat_template,
            "--generate": bool(config.generate),
        }
        flags = ", ".join(flag for flag, set_ in given.items() if set_)
        if flags:
            raise FlatLoraError(f"{flags} apply to causal-LM runs only: drop them, or pass --task causal-lm")
    cap = config.test_cap
    if cap == "auto":
        cap = DEFAULT_CAUSAL_TEST_CAP if task == CAUSAL_LM else DEFAULT_CLASSIFICATION_TEST_CAP
    if task == CAUSAL_LM:
        if not (isinstance(config.generate, int) and config.generate >= 0):
            raise FlatLoraError(f"--generate must be a whole number >= 0 (0: off), got {config.generate!r}")
        generation_settings(config)  # beam settings out of range are refused before anything runs
    eval_batch = config.eval_batch_size or (
        DEFAULT_CAUSAL_EVAL_BATCH if task == CAUSAL_LM else DEFAULT_CLASSIFICATION_EVAL_BATCH
    )
    return dataclasses.replace(config, task=task, test_cap=cap, eval_batch_size=eval_batch)
