"""Tokenizing (prompt, target) pairs for supervised causal-LM fine-tuning, and the padding collator.

HF convention: ``labels`` is aligned with ``input_ids`` (the model shifts); the prompt and the
padding are -100, so the loss is the mean over target tokens only. EOS closes every target.
With a chat template (and ``chat_template=True``) the prompt is one user turn followed by the
generation prompt of the assistant turn, which is what generation sends too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flatlora.data.causal import CausalLMDataset
from flatlora.errors import FlatLoraError

IGNORE_INDEX = -100
PLAIN_SEPARATOR = "\n"
"""Between prompt and target when no chat template is used (the prompt's text ends with it)."""


def uses_chat_template(tokenizer: Any, chat_template: bool) -> bool:
    """Whether prompts go through the tokenizer's chat template: it has one and the user did not turn it off."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """The token ids the model reads before the target (also what generation is given).

    Chat template: one user message and the assistant's generation prompt. Otherwise the
    tokenizer's special tokens (BOS where it uses one) and ``prompt + PLAIN_SEPARATOR``
    (nothing but the special tokens for plain language modelling, ``prompt == ""``).
    """
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = prompt + PLAIN_SEPARATOR if prompt else ""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_target(tokenizer: Any, target: str) -> list[int]:
    """The target's token ids followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise FlatLoraError("the tokenizer has no EOS token: use a causal-LM tokenizer that defines eos_token")
    return [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


@dataclass
class EncodedLM:
    """A tokenized :class:`CausalLMDataset`: one dict of ``input_ids`` / ``labels`` lists per pair."""

    rows: list[dict[str, list[int]]]
    name: str
    truncated_prompts: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]

    def scored_tokens(self) -> int:
        """Target tokens (EOS included) over the whole set: the loss's denominator."""
        return sum(sum(1 for t in row["labels"] if t != IGNORE_INDEX) for row in self.rows)


def encode_dataset(
    dataset: CausalLMDataset, tokenizer: Any, max_length: int, *, chat_template: bool = True, split: str = "train"
) -> EncodedLM:
    """Tokenize every pair; a prompt too long loses its first tokens, a target that cannot fit is refused.

    A target (with EOS) fits when it leaves at least one prompt token within ``max_length``
    (the whole ``max_length`` for plain language modelling). Raises FlatLoraError naming how
    many targets do not fit and the ``--max-length`` that would take them all.
    """
    rows, truncated, too_long = [], 0, []
    prompt_cache: dict[str, list[int]] = {}
    for example in dataset:
        if example.prompt not in prompt_cache:
            prompt_cache[example.prompt] = encode_prompt(tokenizer, example.prompt, chat_template)
        prompt_ids = prompt_cache[example.prompt]
        target_ids = encode_target(tokenizer, example.target)
        room = max_length - len(target_ids)
        needs_prompt = 1 if prompt_ids else 0
        if room < needs_prompt:
            too_long.append(len(target_ids) + needs_prompt)
            continue
        if len(prompt_ids) > room:
            truncated += 1
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
        rows.append({"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    if too_long:
        raise FlatLoraError(
            f"{len(too_long)} of {len(dataset)} targets of the {split} split ({dataset.name}) cannot fit "
            f"--max-length {max_length} (the longest needs {max(too_long)} tokens with EOS): "
            f"pass --max-length {max(too_long)} or more, or drop those rows"
        )
    return EncodedLM(rows, dataset.name, truncated)


@dataclass
class CausalLMCollator:
    """DataLoader ``collate_fn``: encoded rows -> right-padded ``input_ids``, ``attention_mask``, ``labels``."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        if not rows:
            raise FlatLoraError("empty batch: use a DataLoader over a non-empty encoded dataset")
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(row["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
