"""Shared test setup and fixtures: slow tests run only with --runslow or FLATLORA_SLOW=1."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

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

# after the environment above: huggingface_hub reads HF_HUB_OFFLINE once, when transformers first imports it
from analysis_fixtures import train_tiny_causal_runs, train_tiny_runs, write_pairs_csv, write_reviews_csv  # noqa: E402
from helpers import copy_tree, report_into_runs  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("FLATLORA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FLATLORA_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT classifier with the bundled model's tokenizer, saved once per session."""
    from flatlora.testing import save_tiny_text_model

    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory):
    """60 short reviews in two classes, as a CSV with text and label columns."""
    return write_reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="session")
def tiny_runs_source(tmp_path_factory, csv_file, tiny_model_dir):
    """Three tiny finished runs (lora, eflat-lora, flat-lora; seed 1, 6 steps), trained once per session.

    Read only: a test or module fixture that writes into a run copies the folder first (``copy_tree``).
    """
    return train_tiny_runs(tmp_path_factory.mktemp("tiny-runs") / "runs", csv_file, tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_report_source(tmp_path_factory, tiny_runs_source):
    """The tiny runs with their quick report in FOLDER/report, as ``flatlora demo`` leaves them (read only)."""
    return report_into_runs(copy_tree(tiny_runs_source, tmp_path_factory.mktemp("tiny-report") / "runs"), 8)


# -- causal LMs: the default LLM's tokenizer (from its GGUF file, a few seconds) and tiny models using it


@pytest.fixture(scope="session")
def llm_tokenizer():
    from flatlora.causal_lm import load_causal_tokenizer

    return load_causal_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llm_tokenizer):
    from flatlora.testing import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", tokenizer=llm_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, llm_tokenizer):
    from flatlora.testing import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", tokenizer=llm_tokenizer)


@pytest.fixture(scope="session")
def pairs_csv(tmp_path_factory) -> Path:
    """Eight E2E-shaped prompt/target pairs as a CSV."""
    return write_pairs_csv(tmp_path_factory.mktemp("pairs") / "pairs.csv")


@pytest.fixture(scope="session")
def tiny_causal_runs_source(tmp_path_factory, pairs_csv, tiny_gpt2_dir):
    """Four tiny causal-LM runs on the tiny GPT-2 (lora, flat-lora, eflat-lora, lora-sam), each with scored
    generations, trained once per session. Read only: copy before writing.

    Scored without the Java metrics (BLEU and NIST; METEOR, ROUGE_L and CIDEr recorded as unavailable): the
    METEOR jar takes 5 s a run to start, and no test of these runs reads them. The Java metrics of a CLI run
    are tested on the real SmolLM2 (tests/test_llm_real.py) and against the official script (test_e2e_metrics).
    """
    from flatlora.generation import e2e_metrics

    methods = (("lora", 0.0), ("flat-lora", 0.5), ("eflat-lora", 0.5), ("lora-sam", 0.05))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(e2e_metrics, "_java_setup", lambda: "the tests' session runs are scored without Java")
        root = tmp_path_factory.mktemp("causal-runs") / "runs"
        return train_tiny_causal_runs(root, pairs_csv, tiny_gpt2_dir, methods)
