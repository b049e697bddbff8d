"""`load_data`: which loader a name or a path goes to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flatlora.data.dataset import TextDataset
from flatlora.data.glue import GLUE_TASKS, load_glue_folder
from flatlora.data.hub import is_datasets_folder, load_datasets_folder, load_hub, load_hub_dataset
from flatlora.data.tables import SUPPORTED_SOURCES, TABLE_SUFFIXES, _missing_file_error, load_table
from flatlora.data.tweets import load_tweets
from flatlora.errors import FlatLoraError

KNOWN_DATA_NAMES: tuple[str, ...] = ("tweets", *GLUE_TASKS, *(f"glue/{t}" for t in GLUE_TASKS))
"""Names `load_data` accepts besides paths."""

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A hub dataset id (owner/name), tried on the Hub when no file or folder of that name exists."""


def load_data(spec: str | Path, **kwargs: Any) -> dict[str, TextDataset]:
    """Load data from a known name or a path; always returns a dict of splits.

    A string equal (ignoring case) to a name in `KNOWN_DATA_NAMES` is a name, even if a
    folder of that name exists (write "./sst2" for the folder): "tweets" -> `load_tweets`
    as {"train"}; a GLUE task ("sst2", "glue/sst2", ...) -> `load_hub`. Anything else is a
    path: a folder of GLUE TSVs -> `load_glue_folder`, a folder `datasets` reads (save_to_disk,
    or parquet/CSV/JSON split files) -> `load_datasets_folder`, a file -> `load_table` as
    {"train"}; an owner/name that is no path -> `load_hub_dataset`. `kwargs` (text_column,
    label_column, ...) go to the folder or file loader.
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
        if not (path / "train.tsv").is_file() and is_datasets_folder(path):
            return load_datasets_folder(path, **_column_options(kwargs, path))
        return load_glue_folder(path, **kwargs)
    if path.is_file():
        return {"train": load_table(path, **kwargs)}
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise _missing_file_error(path)
    if HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return load_hub_dataset(text, **_column_options(kwargs, text))
    raise FlatLoraError(
        f"unknown data {text!r}, neither a known name nor an existing file or folder:"
        f" pass tweets, a GLUE task ({', '.join(GLUE_TASKS)}, also as glue/<task>), a hub dataset id (owner/name)"
        f" or a path to an existing {SUPPORTED_SOURCES} or datasets folder"
    )


def _column_options(kwargs: dict[str, Any], source: object) -> dict[str, Any]:
    """The options a `datasets` source takes (its columns); others are refused."""
    allowed = {"text_column", "text_pair_column", "label_column"}
    other = sorted(k for k, v in kwargs.items() if v is not None and k not in allowed)
    if other:
        raise FlatLoraError(f"options {', '.join(other)} do not apply to the datasets source {source}: drop them")
    return {k: v for k, v in kwargs.items() if k in allowed}
