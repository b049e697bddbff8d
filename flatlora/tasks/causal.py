"""The causal-LM task: prompt/target splits, token-mean loss and perplexity, generation and its scores.

The loss of a split is the mean over every target token of the split (each batch weighted by
its token count), its perplexity exp(loss); with ``generate`` > 0 the final evaluation also
decodes the first N test prompts, scores them with the E2E metrics and saves them as
generations.jsonl.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlora.log_keys import GENERATION_METRICS, PHASE, PHASE_FINAL, final_key
from flatlora.tasks.base import TaskSetup

if TYPE_CHECKING:
    from flatlora.config import TrainConfig
    from flatlora.generation import GenerationSettings

GENERATIONS_FILE = "generations.jsonl"
DEFAULT_CAUSAL_TEST_CAP = 50
"""Test prompts (E2E: MRs, each with all its references) when --test-cap is not given."""
DEFAULT_CAUSAL_EVAL_BATCH = 8
"""Evaluation batch of a causal LM: B x T x V logits of 8 rows stay in cache (3.5x the examples/s of 64 here)."""


def generation_settings(config: TrainConfig) -> GenerationSettings:
    """The decoding settings of a config (``--decoding``, ``--num-beams``, ``--max-new-tokens``).

    Args:
        config: A causal-LM config.

    Returns:
        The :class:`flatlora.generation.GenerationSettings` to decode with.

    Raises:
        FlatLoraError: a beam setting out of range.
    """
    from flatlora.generation import GenerationSettings

    return GenerationSettings.preset(
        config.decoding,
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size or DEFAULT_CAUSAL_EVAL_BATCH,
    )


def prepare_causal_data(config: TrainConfig) -> dict[str, Any]:
    """The ``{"train", "dev"?, "test"}`` CausalLMDatasets of a causal-LM config.

    Raises:
        FlatLoraError: the data cannot be read as prompt/target pairs, or is too small for ``shots``.
    """
    from flatlora.data.causal import load_causal_data, make_causal_splits

    splits = load_causal_data(config.data, config.prompt_column, config.target_column, config.text_column)
    return make_causal_splits(splits, config.shots, config.seed, config.test_cap)


def encode_splits(config: TrainConfig, splits: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Every split tokenized, by the same names.

    Raises:
        FlatLoraError: a target cannot fit ``--max-length`` (with the fix).
    """
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


def token_nll(logits: Any, labels: Any) -> Any:
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


def causal_metrics(eval_pred: Any) -> dict[str, float]:
    """Token-mean loss and perplexity of a split from the gathered per-example sums."""
    import numpy as np

    sums = np.asarray(eval_pred[0][0] if isinstance(eval_pred[0], tuple) else eval_pred[0], dtype=np.float64)
    tokens = sums[:, 1].sum()
    loss = float(sums[:, 0].sum() / tokens) if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")}


def generate_and_score(config: TrainConfig, model: Any, tokenizer: Any, test: Any, run: Any) -> dict[str, Any]:
    """Decode the first ``config.generate`` test prompts, score them, save generations.jsonl.

    Args:
        config: A causal-LM config with ``generate`` > 0.
        model, tokenizer: The trained model and its tokenizer.
        test: The test split (a CausalLMDataset).
        run: The run directory to write generations.jsonl into, or None to write nothing.

    Returns:
        ``{"metrics": the test_* scores, "generation": what run.json records of the generation}``.
    """
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


def causal_setup(config: TrainConfig) -> TaskSetup:
    """The data, causal LM and metrics of a causal-LM run, with generation after training when asked.

    Args:
        config: A resolved causal-LM config.

    Returns:
        The run's :class:`TaskSetup` (final metrics: loss and perplexity; with ``generate`` > 0
        its ``after_training`` generates for the test prompts and adds their scores).

    Raises:
        FlatLoraError: the data, the model or the encoding cannot be done as asked.
    """
    from flatlora.base_dtype import torch_dtype
    from flatlora.causal_lm import DEFAULT_LLM_WEIGHTS, canonical_llm_id, is_default_llm, load_causal_lm
    from flatlora.data.lm_encode import CausalLMCollator, uses_chat_template

    splits = prepare_causal_data(config)
    model, tokenizer = load_causal_lm(
        config.model,
        lora=config.lora_options(),
        seed=config.seed,
        gguf_file=config.gguf_file,
        dtype=torch_dtype(config.dtype),
    )
    encoded = encode_splits(config, splits, tokenizer)
    default = is_default_llm(config.model) and config.gguf_file is None
    run_info = {
        "base_weights": DEFAULT_LLM_WEIGHTS if default else ("GGUF dequantized to float" if config.gguf_file else None),
        "chat_template_used": uses_chat_template(tokenizer, config.chat_template),
    }

    def generate(run: Any, step: int) -> dict[str, Any]:
        scored = generate_and_score(config, model, tokenizer, splits["test"], run)
        if run is not None:
            run.append_metrics({PHASE: PHASE_FINAL, "step": step, **scored["metrics"]})
            run.update(generation=scored["generation"])
        return scored["metrics"]

    return TaskSetup(
        model=model,
        tokenizer=tokenizer,
        model_id=canonical_llm_id(config.model) if config.gguf_file is None else (config.model or config.gguf_file),
        data={**config.data_spec(), "sizes": data_sizes(splits, encoded)},
        splits=splits,
        datasets=encoded,
        collator=CausalLMCollator(tokenizer.pad_token_id),
        compute_metrics=causal_metrics,
        preprocess_logits=token_nll,
        final_metrics=("loss", "perplexity"),
        run_info=run_info,
        after_training=generate if config.generate else None,
    )
