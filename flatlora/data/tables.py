"""CSV / TSV / JSONL files: reading, text-column detection and `load_table`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlora.data.dataset import TextDataset
from flatlora.data.labels import _build_datasets, _RawExamples
from flatlora.errors import FlatLoraError

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
        f" pass --text-column (text_column=) naming the column holding the text"
    )


def _require_label_column(table: _Table, label_column: str) -> None:
    if label_column not in table.columns:
        found = ", ".join(table.columns) or "(none)"
        raise FlatLoraError(
            f"no label column {label_column!r} in {table.path} (columns found: {found}):"
            f" pass --label-column (label_column=) naming one of those columns, or add a header row if it has none"
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
