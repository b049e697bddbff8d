"""GLUE tasks (columns, label names, hub configs) and GLUE-format folders of TSV files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flatlora.data.dataset import TextDataset
from flatlora.data.labels import _build_datasets, _RawExamples
from flatlora.data.tables import SUPPORTED_SOURCES, _detect_text_columns, _raw_examples, _read_table, _Table
from flatlora.errors import FlatLoraError


@dataclass(frozen=True)
class GlueTask:
    """Columns and label names of one GLUE classification task."""

    text_column: str
    text_pair_column: str | None
    label_names: tuple[str, ...]
    hub_config: str
    hub_test_split: str


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, ("unacceptable", "acceptable"), "cola", "validation"),
    "sst2": GlueTask("sentence", None, ("negative", "positive"), "sst2", "validation"),
    "mrpc": GlueTask("sentence1", "sentence2", ("not_equivalent", "equivalent"), "mrpc", "validation"),
    "qqp": GlueTask("question1", "question2", ("not_duplicate", "duplicate"), "qqp", "validation"),
    "mnli": GlueTask(
        "premise",
        "hypothesis",
        ("entailment", "neutral", "contradiction"),
        "mnli",
        "validation_matched",
    ),
    "mnli-mm": GlueTask(
        "premise",
        "hypothesis",
        ("entailment", "neutral", "contradiction"),
        "mnli",
        "validation_mismatched",
    ),
    "qnli": GlueTask("question", "sentence", ("entailment", "not_entailment"), "qnli", "validation"),
    "rte": GlueTask("sentence1", "sentence2", ("entailment", "not_entailment"), "rte", "validation"),
    "wnli": GlueTask("sentence1", "sentence2", ("not_entailment", "entailment"), "wnli", "validation"),
}
"""GLUE classification tasks (STS-B is regression and is not supported)."""


def _glue_task_key(name: str) -> str:
    """Normalise 'SST-2', 'glue/sst2' or 'MNLI_mm' to a `GLUE_TASKS` key."""
    key = name.lower().removeprefix("glue/").replace("_", "-")
    return "mnli-mm" if key == "mnli-mm" else key.replace("-", "")


GLUE_SPLIT_FILES: tuple[tuple[str, str], ...] = (
    ("train", "train.tsv"),
    ("dev", "dev.tsv"),
    ("test", "test.tsv"),
)


def load_glue_folder(
    path: str | Path,
    text_column: str | None = None,
    label_column: str = "label",
    text_pair_column: str | None = None,
    task: str | None = None,
    encoding: str = "utf-8-sig",
) -> dict[str, TextDataset]:
    """Load a GLUE-format folder: train.tsv required, dev.tsv and test.tsv when present.

    Returns {"train", "dev"?, "test"?}. Each TSV has a header with `sentence` or a pair
    (`sentence1/sentence2`, `question/sentence`, `premise/hypothesis`, ...) and `label`;
    columns are detected on train.tsv as in `load_table`. `task` (default: the folder's
    name when it is a GLUE task, e.g. "sst2") supplies label names such as
    negative/positive. All splits share one label vocabulary.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FlatLoraError(f"GLUE folder {folder} not found: pass an existing {SUPPORTED_SOURCES}")
    if not (folder / "train.tsv").is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "(empty)"
        raise FlatLoraError(
            f"GLUE folder {folder} has no train.tsv (found: {present}):"
            f" put train.tsv (and dev.tsv/test.tsv) in it, or pass a single CSV/TSV/JSONL file"
        )
    task_key = _glue_task_key(task or folder.name)
    if task is not None and task_key not in GLUE_TASKS:
        raise FlatLoraError(f"unknown GLUE task {task!r}: pass one of {', '.join(GLUE_TASKS)} or task=None")
    glue_task = GLUE_TASKS.get(task_key)
    split_names: list[str] = []
    raws: list[_RawExamples] = []
    columns: tuple[str, str | None] | None = None
    for split, filename in GLUE_SPLIT_FILES:
        file_path = folder / filename
        if not file_path.is_file():
            continue
        table = _read_table(file_path, encoding)
        if columns is None:
            columns = _detect_text_columns(table.columns, text_column, text_pair_column, file_path)
        if split == "test" and label_column not in table.columns:
            raise FlatLoraError(
                f"{file_path} has no label column {label_column!r} (the official GLUE test split is"
                f" unlabelled; columns found: {', '.join(table.columns)}): replace it with labelled rows or delete it"
            )
        _check_same_text_columns(table, columns)
        split_names.append(split)
        raws.append(_raw_examples(table, f"{folder.name}/{split}", *columns, label_column))
    datasets = _build_datasets(raws, glue_task.label_names if glue_task else None)
    return dict(zip(split_names, datasets, strict=True))


def _check_same_text_columns(table: _Table, text_columns: tuple[str, str | None]) -> None:
    for column in text_columns:
        if column is not None and column not in table.columns:
            raise FlatLoraError(
                f"{table.path} lacks column {column!r} that train.tsv uses"
                f" (columns found: {', '.join(table.columns)}): give every split the same header"
            )
