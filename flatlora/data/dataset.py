"""The dataset type every loader returns: `TextExample`s with integer labels and their names."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flatlora.errors import FlatLoraError


@dataclass(frozen=True, slots=True)
class TextExample:
    """One classification example: a text (or text pair) and its integer label."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class TextDataset:
    """A list of examples with the names of their labels (`label_names[label]`).

    It is a map-style dataset: a torch DataLoader over it yields `TextExample`s, which
    `TextClassificationCollator` turns into tensors.
    """

    examples: list[TextExample]
    label_names: list[str]
    name: str = "data"

    def __post_init__(self) -> None:
        num_labels = len(self.label_names)
        for example in self.examples:
            if not 0 <= example.label < num_labels:
                raise FlatLoraError(
                    f"dataset {self.name!r} has label {example.label} outside 0..{num_labels - 1}:"
                    f" give one name per label id in label_names"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TextExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[TextExample]:
        return iter(self.examples)

    @property
    def num_labels(self) -> int:
        """Number of classes, including classes with no example here."""
        return len(self.label_names)

    @property
    def has_pairs(self) -> bool:
        """Whether the examples are sentence pairs."""
        return any(example.text_pair is not None for example in self.examples)

    def labels(self) -> list[int]:
        """The label id of every example, in order."""
        return [example.label for example in self.examples]

    def class_counts(self) -> dict[str, int]:
        """Examples per class, keyed by label name in label-id order (zeros included)."""
        counts = [0] * self.num_labels
        for example in self.examples:
            counts[example.label] += 1
        return dict(zip(self.label_names, counts, strict=True))

    def subset(self, indices: Iterable[int], name: str | None = None) -> TextDataset:
        """A dataset of the examples at `indices` (the same objects), same label names."""
        return TextDataset([self.examples[i] for i in indices], list(self.label_names), name or self.name)
