"""The dashboard on causal-LM runs: their task, perplexity and BLEU, generations, curves, landscapes, curvature."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import copy_tree, report_into_runs

pytest.importorskip("streamlit")
pytest.importorskip("gguf", reason="causal-LM tests use the default LLM's tokenizer (pip install gguf)")
from test_app import app_on, fresh_caches  # noqa: F401  (fresh_caches: autouse here too)
from test_app import chart_specs as specs


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory, tiny_causal_runs_source):
    """The session's tiny causal-LM runs with generations, and their quick report in FOLDER/report."""
    return report_into_runs(copy_tree(tiny_causal_runs_source, tmp_path_factory.mktemp("app-causal") / "runs"), 6)


def test_runs_page_lists_causal_runs_with_perplexity_bleu_and_generations(causal_folder, monkeypatch):
    at = app_on(causal_folder, monkeypatch)
    runs = at.dataframe[0].value
    assert set(runs["task"]) == {"causal-lm"}
    assert "test_accuracy" not in runs.columns  # no run has it
    info = json.loads((causal_folder / "lora" / "run.json").read_text())
    row = runs[runs["run"] == "lora"].iloc[0]
    assert row["test_perplexity"] == pytest.approx(info["metrics"]["test_perplexity"])
    assert row["test_bleu"] == pytest.approx(info["metrics"]["test_bleu"])
    generations = at.dataframe[1].value
    assert list(generations.columns) == ["source", "prediction", "references"]
    saved = [json.loads(line) for line in (causal_folder / "eflat-lora" / "generations.jsonl").read_text().splitlines()]
    assert generations["source"].tolist() == [g["source"] for g in saved]  # the first run in the list
    assert generations["references"].tolist() == [" | ".join(g["references"]) for g in saved]
    loss = specs(at)[0]
    assert {t["name"] for t in loss["data"]} == {"lora", "flat-lora", "eflat-lora", "lora-sam"}


def test_landscape_curvature_and_correlation_pages_on_causal_runs(causal_folder, monkeypatch):
    at = app_on(causal_folder, monkeypatch)
    at.switch_page("views/landscapes.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [curves] = specs(at)
    assert len([t for t in curves["data"] if t.get("mode") == "lines"]) == 4  # one curve a run
    at.switch_page("views/curvature.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.dataframe[0].value) == 4  # one row a run
    at.switch_page("views/correlation.py").run()
    assert not at.exception, [e.value for e in at.exception]
    options = at.selectbox(key="corr_target").options
    assert "test_perplexity" in options and "test_bleu" in options and "test_accuracy" not in options
    at.selectbox(key="corr_target").set_value("test_perplexity").run()
    assert "test_perplexity vs" in specs(at)[0]["layout"]["title"]["text"]


@pytest.mark.slow
def test_a_real_browser_shows_a_causal_runs_generations(causal_folder, tmp_path):
    from browser import assert_pages_render

    artifacts = Path(os.environ.get("FLATLORA_TEST_ARTIFACTS", tmp_path))
    assert_pages_render(causal_folder, [("", "Generations", "dashboard-causal-runs.png")], artifacts)
