"""The causal-LM half of a training run: task inference, data, evaluation metrics, generation and scoring.

``flatlora.experiment.train_run`` calls these when a run's task is ``causal-lm``. The loss of a
split is the mean over every target token of the split (each batch weighted by its token
count), its perplexity exp(loss); with ``generate`` > 0 the final evaluation also decodes the
first N test prompts, scores them with the E2E metrics and saves them as generations.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from flatlora.data.causal import CAUSAL_LM, CLASSIFICATION, TASKS, detect_prompt_target, is_e2e_folder
from flatlora.errors import FlatLoraError
from flatlora.log_keys import GENERATION_METRICS, final_key

GENERATIONS_FILE = "generations.jsonl"
CAUSAL_ONLY = ("prompt_column", "target_column", "gguf_file", "chat_template")
"""TrainConfig fields that mean something for causal LMs only (absent from a classifier's identity)."""
DEFAULT_CAUSAL_TEST_CAP = 50
"""Test prompts (E2E: MRs, each with all its references) when --test-cap is not given."""
DEFAULT_CLASSIFICATION_TEST_CAP = 1000
DEFAULT_CLASSIFICATION_EVAL_BATCH = 64
DEFAULT_CAUSAL_EVAL_BATCH = 8
"""Evaluation batch of a causal LM: B x T x V logits of 8 rows stay in cache (3.5x the examples/s of 64 here)."""


def data_task(config) -> str | None:
    """The task the data and column options imply, or None when they do not say."""
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


def resolve_task(config):
    """The config with its task, data, model defaults and test cap filled in; contradictions refused in one line."""
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


def generation_settings(config):
    from flatlora.generation import GenerationSettings

    return GenerationSettings.preset(
        config.decoding,
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size or DEFAULT_CAUSAL_EVAL_BATCH,
    )


def prepare_causal_data(config) -> dict[str, Any]:
    """{"train", "dev"?, "test"} CausalLMDatasets for a causal-LM config."""
    from flatlora.data.causal import load_causal_data, make_causal_splits

    splits = load_causal_data(config.data, config.prompt_column, config.target_column, config.text_column)
    return make_causal_splits(splits, config.shots, config.seed, config.test_cap)


def encode_splits(config, splits: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Every split tokenized (targets that cannot fit --max-length refused, with the fix)."""
    from flatlora.data.lm_encode import encode_dataset

    return {
        name: encode_dataset(ds, tokenizer, config.max_length, chat_template=config.chat_template, split=name)
        for name, ds in splits.items()
    }


def data_sizes(splits: dict[str, Any], encoded: dict[str, Any]) -> dict[str, Any]:
    """What run.json says of each split: pairs, prompts, scored tokens and prompts cut to fit."""
    return {
        name: {
            "pairs": len(ds),
            "prompts": len(ds.groups()),
            "target_tokens": encoded[name].scored_tokens(),
            "truncated_prompts": encoded[name].truncated_prompts,
        }
        for name, ds in splits.items()
    }


def token_nll(logits, labels):
    """Per example (shape B x 2): the summed next-token NLL over target tokens and their count.

    ``preprocess_logits_for_metrics`` of the Trainer: only these two numbers per example are
    gathered across batches and ranks, never the B x T x V logits.
    """
    import torch

    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != -100
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    return torch.stack([(nll * mask).sum(1), mask.sum(1).to(nll.dtype)], dim=1)


def causal_metrics(eval_pred) -> dict[str, float]:
    """Token-mean loss and perplexity of a split from the gathered per-example sums."""
    import numpy as np

    sums = np.asarray(eval_pred[0][0] if isinstance(eval_pred[0], tuple) else eval_pred[0], dtype=np.float64)
    tokens = sums[:, 1].sum()
    loss = float(sums[:, 0].sum() / tokens) if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")}


def generate_and_score(config, model, tokenizer, test, run) -> dict[str, Any]:
    """Decode the first ``config.generate`` test prompts, score them, save generations.jsonl; the test_* metrics."""
    from flatlora.atomic import atomic_write_text
    from flatlora.generation import generate_texts, score_generations

    groups = test.groups()[: config.generate]
    prompts = [prompt for prompt, _ in groups]
    references = [refs for _, refs in groups]
    settings = generation_settings(config)
    predictions = generate_texts(
        model,
        tokenizer,
        prompts,
        settings,
        chat_template=config.chat_template,
        max_prompt_length=config.max_length,
        progress=config.progress,
    )
    scores = score_generations(predictions, references)
    if run is not None:
        lines = [
            json.dumps({"source": p, "prediction": h, "references": r}, ensure_ascii=False)
            for p, h, r in zip(prompts, predictions, references)
        ]
        atomic_write_text(Path(run.path) / GENERATIONS_FILE, "\n".join(lines) + "\n")
    metrics = {final_key("test", name.lower()): scores.get(name) for name in GENERATION_METRICS}
    info = {
        "prompts": len(prompts),
        "settings": settings.as_dict(),
        "unavailable": dict(scores.get("unavailable") or {}),
        "file": GENERATIONS_FILE,
    }
    return {"metrics": metrics, "generation": info}
