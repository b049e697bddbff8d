"""Shared test setup: slow tests run only with --runslow or FLATLORA_SLOW=1."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# No test may reach a model hub: an unknown hub id then fails at once instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
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
