"""Batched, deterministic generation from a causal LM (greedy or beam search), with a progress bar."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flatlora.errors import FlatLoraError

DECODING_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": 64},
    # The LoRA repository's E2E decoding (Hu et al. 2021, examples/NLG): beam 10, length penalty 0.9,
    # no repeated 4-grams, at most 64 new tokens.
    "e2e": {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "max_new_tokens": 64},
}


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy (``num_beams=1``) or beam search; never sampled, so reruns are identical."""

    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name, low in (("num_beams", 1), ("max_new_tokens", 1), ("batch_size", 1), ("no_repeat_ngram_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FlatLoraError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value!r}")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)):
            raise FlatLoraError(f"--length-penalty must be a finite number, got {self.length_penalty!r}")
        if self.length_penalty != 1.0 and self.num_beams == 1:
            raise FlatLoraError("--length-penalty applies to beam search only: pass --num-beams 2 or more, or drop it")

    @classmethod
    def preset(cls, name: str, **override: Any) -> GenerationSettings:
        """A named preset (``greedy``, ``e2e``) with some fields replaced (None values are ignored)."""
        if name not in DECODING_PRESETS:
            raise FlatLoraError(f"unknown --decoding {name!r}: use one of {', '.join(DECODING_PRESETS)}")
        return cls(**{**DECODING_PRESETS[name], **{k: v for k, v in override.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings | None = None,
    *,
    chat_template: bool = True,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> list[str]:
    """The model's continuation of each prompt, decoded without special tokens and stripped.

    Prompts are encoded as training encodes them (:func:`flatlora.data.lm_encode.encode_prompt`),
    left-padded in batches of ``settings.batch_size``; a prompt longer than ``max_prompt_length``
    keeps its last tokens. Generation stops at EOS. The model is put in eval mode and restored.
    """
    import torch
    from tqdm.auto import tqdm

    from flatlora.data.lm_encode import encode_prompt

    settings = settings or GenerationSettings()
    if tokenizer.pad_token_id is None:
        raise FlatLoraError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
    encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    if max_prompt_length is not None:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    if any(not ids for ids in encoded):
        raise FlatLoraError("a prompt encodes to no token: give every prompt some text, or use a chat template")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    options = dict(
        do_sample=False,
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if settings.num_beams > 1:
        options.update(length_penalty=settings.length_penalty, early_stopping=True)
    starts = range(0, len(encoded), settings.batch_size)
    try:
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
            chunk = encoded[start : start + settings.batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs
