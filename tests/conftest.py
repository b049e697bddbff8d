"""Shared test setup and fixtures: slow tests run only with --runslow or FLATLORA_SLOW=1."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import warnings

import pytest
import torch

# No test may reach a model hub: an unknown hub id then fails at once instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
# `datasets` offline too, with a cache of its own (read when datasets is first imported).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="flatlora-test-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("FLATLORA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FLATLORA_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


WORDS = {0: ["awful", "bad", "boring", "dull"], 1: ["great", "good", "lovely", "fun"]}
"""Words of the two classes of the tiny review task (``csv_file``)."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT classifier with the bundled model's tokenizer, saved once per session."""
    from flatlora.models import save_tiny_text_model

    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory):
    """60 short reviews in two classes, as a CSV with text and label columns."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["text,label"]
    for i in range(60):
        label = i % 2
        rows.append(f"a {rng.choice(WORDS[label])} film number {i},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


# -- causal LMs: the default LLM's tokenizer (from its GGUF file, a few seconds) and tiny models using it


@pytest.fixture(scope="session")
def llm_tokenizer():
    from flatlora.causal_lm import load_causal_tokenizer

    return load_causal_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llm_tokenizer):
    from flatlora.causal_lm import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", tokenizer=llm_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, llm_tokenizer):
    from flatlora.causal_lm import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", tokenizer=llm_tokenizer)
