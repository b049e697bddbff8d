"""A DataLoader `collate_fn` from `TextExample`s to padded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flatlora.data.dataset import TextExample
from flatlora.errors import FlatLoraError


@dataclass
class TextClassificationCollator:
    """DataLoader `collate_fn`: a list of `TextExample`s -> a dict of padded tensors.

    The batch holds the tokenizer's outputs (input_ids, attention_mask and, for
    tokenizers that produce them, token_type_ids) plus `labels`. Pairs are passed to the
    tokenizer as its second argument; a batch must be all pairs or all single texts.
    """

    tokenizer: Any
    max_length: int = 128

    def __call__(self, examples: Sequence[TextExample]) -> dict[str, Any]:
        import torch

        if not examples:
            raise FlatLoraError("empty batch: use a DataLoader over a non-empty TextDataset")
        texts = [example.text for example in examples]
        pairs = [example.text_pair for example in examples]
        paired = [pair is not None for pair in pairs]
        if any(paired) and not all(paired):
            raise FlatLoraError("batch mixes single texts and text pairs: give every example a text_pair or none")
        encoded = self.tokenizer(
            texts,
            pairs if all(paired) else None,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(encoded)
        batch["labels"] = torch.tensor([example.label for example in examples], dtype=torch.long)
        return batch
