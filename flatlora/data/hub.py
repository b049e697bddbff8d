"""Data through the optional `datasets` package (``pip install 'flatlora[hub]'``).

Three sources share one conversion: a GLUE task from the Hugging Face Hub (``load_hub``), any
hub dataset id (``load_hub_dataset``), and a local folder in a layout `datasets` reads
(``load_datasets_folder``: one written by ``save_to_disk``, or data files ``load_dataset``
takes). Offline (``HF_DATASETS_OFFLINE=1``), hub names load from the local cache or fail with
one line naming both fixes: the network, or a local folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatlora.data.dataset import TextDataset
from flatlora.data.glue import GLUE_TASKS, _glue_task_key
from flatlora.data.labels import _build_datasets, _RawExamples
from flatlora.data.tables import SUPPORTED_SOURCES, _detect_text_columns
from flatlora.errors import FlatLoraError

HUB_EXTRA = "flatlora[hub]"
"""The extra that installs `datasets`."""

SAVED_DATASET_FILES: tuple[str, ...] = ("dataset_dict.json", "state.json")
"""What ``save_to_disk`` writes at the top of its folder (a DatasetDict, a Dataset)."""

DATA_FILE_SUFFIXES: tuple[str, ...] = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
"""Files ``load_dataset(folder)`` reads (splits from names such as train-*.parquet, validation.csv)."""

LOCAL_FIX = (
    "pass --data a local folder instead: one saved with datasets' save_to_disk, one load_dataset reads "
    f"(train/validation/test parquet, CSV or JSON files), or a {SUPPORTED_SOURCES}"
)


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise FlatLoraError(
            f"{what} needs the `datasets` package, which is not installed: pip install '{HUB_EXTRA}' "
            f"(or pip install datasets), or pass a local path to a {SUPPORTED_SOURCES}"
        ) from None
    return datasets


def _load(load: Callable[[], Any], what: str, fix: str) -> Any:
    try:
        return load()
    except Exception as error:  # no network, offline mode, a bad folder: many different types
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise FlatLoraError(f"could not load {what} ({type(error).__name__}: {reason}): {fix}") from None


def load_hub(name: str) -> dict[str, TextDataset]:
    """A GLUE task ("sst2", "glue/sst2", "mnli", ...) from the Hugging Face Hub, or its cache offline.

    Returns {"train", "test"} where "test" is the GLUE validation split (matched for MNLI,
    mismatched for "mnli-mm"): GLUE's own test split has no labels, and the few-shot
    protocol reports on the original validation set.
    """
    task_key = _glue_task_key(name)
    if task_key not in GLUE_TASKS:
        raise FlatLoraError(f"unknown GLUE task {name!r}: pass one of {', '.join(GLUE_TASKS)}, or a local path")
    datasets = _datasets(f"loading {name!r} from the Hub")
    config = GLUE_TASKS[task_key].hub_config
    fix = f"connect to the network (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE unset), or {LOCAL_FIX}"
    splits = _load(lambda: datasets.load_dataset("glue", config), f"glue/{config} from the Hugging Face Hub", fix)
    return convert_splits(splits, f"glue/{task_key}", task=task_key)


def load_hub_dataset(repo_id: str, **columns: str | None) -> dict[str, TextDataset]:
    """Any hub dataset with a text (or text pair) column and a label column, e.g. "stanfordnlp/imdb"."""
    datasets = _datasets(f"loading {repo_id!r} from the Hub")
    fix = f"connect to the network (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE unset), or {LOCAL_FIX}"
    splits = _load(lambda: datasets.load_dataset(repo_id), f"{repo_id} from the Hugging Face Hub", fix)
    return convert_splits(splits, repo_id, **columns)


def is_datasets_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``save_to_disk`` dataset or data files ``load_dataset`` reads."""
    if any((folder / name).is_file() for name in SAVED_DATASET_FILES):
        return True
    for place in (folder, folder / "data"):
        if place.is_dir() and any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in place.iterdir() if p.is_file()):
            return True
    return False


def load_datasets_folder(path: str | Path, task: str | None = None, **columns: str | None) -> dict[str, TextDataset]:
    """A local folder in a layout `datasets` reads, through `datasets` as a hub download would go.

    ``save_to_disk`` folders load with ``load_from_disk``, others with ``load_dataset(folder)``.
    ``task`` (default: the folder's name when it is a GLUE task) picks GLUE's columns, label
    names and test split; otherwise the columns are detected as in ``load_table``.
    """
    folder = Path(path)
    datasets = _datasets(f"reading the datasets folder {folder}")
    saved = any((folder / name).is_file() for name in SAVED_DATASET_FILES)
    load = (lambda: datasets.load_from_disk(str(folder))) if saved else (lambda: datasets.load_dataset(str(folder)))
    fix = "write it with save_to_disk or as train/validation/test data files, or pass a GLUE-format folder"
    splits = _load(load, f"the datasets folder {folder}", fix)
    if not hasattr(splits, "keys"):  # one Dataset: a pool
        splits = {"train": splits}
    task_key = _glue_task_key(task or folder.name)
    return convert_splits(splits, folder.name, task=task_key if task_key in GLUE_TASKS else None, **columns)


def convert_splits(
    splits: Any,
    name: str,
    *,
    task: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, TextDataset]:
    """`datasets` splits -> {"train", "dev"?, "test"?} TextDatasets sharing one label vocabulary.

    A GLUE ``task`` gives its columns, label names and test split (the validation set). Else
    the columns are detected, "test" is the test split when it is labelled (with "validation"
    as dev), or the validation split.
    """
    glue = GLUE_TASKS.get(task) if task else None
    label_column = label_column or "label"
    if "train" not in splits:
        raise FlatLoraError(f"{name} has no train split (found: {', '.join(splits)}): give it one")
    first = splits["train"]
    columns = list(getattr(first, "column_names", None) or (first[0] if len(first) else {}))
    if glue is not None and text_column is None:
        text_column, text_pair_column = glue.text_column, glue.text_pair_column
    else:
        text_column, text_pair_column = _detect_text_columns(columns, text_column, text_pair_column, Path(name))
    if label_column not in columns:
        raise FlatLoraError(
            f"no label column {label_column!r} in {name} (columns found: {', '.join(columns)}): "
            "pass --label-column with one of those columns"
        )
    names = _label_names(first, label_column) or (list(glue.label_names) if glue else None)
    chosen = {"train": "train", **_evaluation_splits(splits, label_column, glue)}
    raws = [
        _raw(splits[source], f"{name}/{split}", text_column, text_pair_column, label_column, names)
        for split, source in chosen.items()
    ]
    return dict(zip(chosen, _build_datasets(raws, names), strict=True))


def _evaluation_splits(splits: Any, label_column: str, glue: Any) -> dict[str, str]:
    if glue is not None and glue.hub_test_split in splits:
        return {"test": glue.hub_test_split}
    validation = next((s for s in splits if s.startswith("validation")), None)
    if "test" in splits and _labelled(splits["test"], label_column):
        return {"dev": validation, "test": "test"} if validation else {"test": "test"}
    return {"test": validation} if validation else {}


def _labelled(split: Any, label_column: str) -> bool:
    return all(label is not None and label != -1 for label in _column(split, label_column))


def _column(split: Any, column: str) -> list:
    return list(split[column]) if hasattr(split, "column_names") else [row[column] for row in split]


def _label_names(split: Any, label_column: str) -> list[str] | None:
    """The ClassLabel names of a `datasets` split, if it carries them."""
    features = getattr(split, "features", None) or {}
    names = getattr(features.get(label_column), "names", None)
    return list(names) if names else None


def _raw(split: Any, name: str, text: str, pair: str | None, label: str, names: list[str] | None) -> _RawExamples:
    texts = list(zip(map(str, _column(split, text)), map(str, _column(split, pair)) if pair else [None] * len(split)))
    labels = [
        str(names[value]) if names and isinstance(value, int) and 0 <= value < len(names) else str(value)
        for value in _column(split, label)
    ]
    return _RawExamples(name, texts, labels)
