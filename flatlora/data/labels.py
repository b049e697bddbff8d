"""Label vocabularies: raw label strings read from a source -> ids 0..n-1 and their names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flatlora.data.dataset import TextDataset, TextExample
from flatlora.errors import FlatLoraError

_INT_PATTERN = re.compile(r"[+-]?\d+")


@dataclass
class _RawExamples:
    """Examples whose labels are still the strings read from a file."""

    name: str
    texts: list[tuple[str, str | None]]
    raw_labels: list[str]


def _label_vocabulary(
    raw_labels: Iterable[str], known_names: Sequence[str] | None = None
) -> tuple[dict[str, int], list[str]]:
    """Map raw label strings to ids 0..n-1 and name each id.

    With `known_names` (a GLUE task), integer labels index those names and string labels
    are looked up in them. Otherwise integer labels get ids in numeric order (so labels
    0..n-1 keep their value) and are named by their value ("1.0" counts as 1); any other
    labels get ids in sorted string order and are their own names.
    """
    distinct = sorted(set(raw_labels))
    integers = {raw: value for raw in distinct if (value := _as_int(raw)) is not None}
    if known_names:
        if len(integers) == len(distinct) and all(0 <= value < len(known_names) for value in integers.values()):
            return integers, list(known_names)
        if all(raw in known_names for raw in distinct):
            return {raw: known_names.index(raw) for raw in distinct}, list(known_names)
    if len(integers) == len(distinct):
        values = sorted(set(integers.values()))
        id_of_value = {value: index for index, value in enumerate(values)}
        return {raw: id_of_value[value] for raw, value in integers.items()}, [str(value) for value in values]
    if all(_is_float(raw) for raw in distinct):
        raise FlatLoraError(
            f"labels look like real numbers ({', '.join(distinct[:3])}, ...), i.e. regression:"
            f" flatlora does classification, so use integer or string class labels"
        )
    return {raw: index for index, raw in enumerate(distinct)}, distinct


def _as_int(text: str) -> int | None:
    """The integer a label spells ("1", "-2", "1.0"), or None."""
    if _INT_PATTERN.fullmatch(text):
        return int(text)
    if _is_float(text) and float(text).is_integer():
        return int(float(text))
    return None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _build_datasets(raws: Sequence[_RawExamples], known_names: Sequence[str] | None = None) -> list[TextDataset]:
    """Turn raw splits into datasets that share one label vocabulary."""
    mapping, names = _label_vocabulary((label for raw in raws for label in raw.raw_labels), known_names)
    datasets = []
    for raw in raws:
        examples = [
            TextExample(text, mapping[label], pair)
            for (text, pair), label in zip(raw.texts, raw.raw_labels, strict=True)
        ]
        datasets.append(TextDataset(examples, list(names), raw.name))
    return datasets
