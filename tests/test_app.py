"""The dashboard: every page under streamlit's AppTest on a small runs folder; empty and wrong folders."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_tree

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from flatlora_analysis import plots

MAIN = str(Path(__file__).parents[1] / "app" / "main.py")
PAGES = ("views/landscapes.py", "views/curvature.py", "views/correlation.py", "views/report.py")


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory, tiny_report_source):
    """Three tiny runs (lora, eflat-lora, flat-lora) and the quick report, as flatlora demo leaves them."""
    return copy_tree(tiny_report_source, tmp_path_factory.mktemp("app") / "runs")


@pytest.fixture(autouse=True)
def fresh_caches():
    from flatlora_app.loaders import clear_caches

    clear_caches()
    yield
    clear_caches()


def app_on(folder, monkeypatch) -> AppTest:
    monkeypatch.setenv("FLATLORA_RUNS_DIR", str(folder))
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_specs(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_runs_page_lists_the_runs_and_plots_their_curves(runs_folder, monkeypatch):
    at = app_on(runs_folder, monkeypatch)
    assert at.title[0].value == "Runs"
    assert at.metric[0].value == "3"
    table = at.dataframe[0].value
    assert sorted(table["method"]) == ["eflat-lora", "flat-lora", "lora"]
    specs = chart_specs(at)
    assert len(specs) == 4
    loss = specs[0]
    assert {t["name"] for t in loss["data"]} == {"eflat-lora-seed1", "flat-lora-seed1", "lora-seed1"}
    assert any(
        "t2_rel_error" in s["layout"]["title"]["text"] or "Theorem 2" in s["layout"]["title"]["text"] for s in specs
    )
    at.multiselect(key="runs_methods").set_value(["lora"]).run()
    assert at.metric[0].value == "1"
    assert [t["name"] for t in chart_specs(at)[0]["data"]] == ["lora-seed1"]


def test_runs_page_pools_seeds_into_the_realized_ratio_per_method(runs_folder, monkeypatch):
    from flatlora.runs import load_run

    at = app_on(runs_folder, monkeypatch)
    at.radio(key="runs_realized_per").set_value("per method").run()
    assert not at.exception, [e.value for e in at.exception]
    [ratio] = [s for s in chart_specs(at) if "realized perturbation norm / rho" in s["layout"]["title"]["text"].lower()]
    named = {t["name"].split(" (median")[0]: t for t in ratio["data"] if t.get("name")}
    eflat = load_run(runs_folder / "eflat-lora-seed1")
    assert set(named) == {"flat-lora", eflat.group} and eflat.group.startswith("eflat-lora (beta ")
    logged = [r["realized_ratio"] for r in eflat.metrics if r.get("realized_ratio") is not None]
    y = named[eflat.group]["y"]  # plotly sends numpy arrays as base64 bytes
    y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]) if isinstance(y, dict) else np.asarray(y)
    assert y.tolist() == pytest.approx(logged)  # one run: its median is its own ratio


def test_runs_page_figure_equals_the_builders(runs_folder, monkeypatch):
    from flatlora.runs import read_metrics_file

    at = app_on(runs_folder, monkeypatch)
    histories = {
        name: read_metrics_file(runs_folder / name / "metrics.jsonl")
        for name in ("eflat-lora-seed1", "flat-lora-seed1", "lora-seed1")
    }
    expected = json.loads(plots.history_figure(histories, "loss").to_json())
    page = chart_specs(at)[0]
    assert [t["y"] for t in page["data"]] == [t["y"] for t in expected["data"]]


def test_landscapes_page_reuses_the_reports_curves_and_computes_a_plane_on_request(runs_folder, monkeypatch):
    at = app_on(runs_folder, monkeypatch)
    at.switch_page("views/landscapes.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [curves] = chart_specs(at)
    assert len([t for t in curves["data"] if t.get("mode") == "lines"]) == 3
    button = next(b for b in at.button if b.label.startswith("Compute the") and "plane" in b.label)
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    specs = chart_specs(at)
    assert any(t["type"] == "surface" for s in specs for t in s["data"])
    assert any(t.get("name") == "trajectory" for s in specs for t in s["data"])  # PCA: the trajectory is drawn
    line = next(b for b in at.button if b.label == "Compute the interpolation")
    line.click().run()
    assert "Loss from t = 0 to t = 1" in chart_specs(at)[-1]["layout"]["title"]["text"]


def test_curvature_page_shows_the_reports_eigenvalues_and_computes_more(runs_folder, monkeypatch):
    at = app_on(runs_folder, monkeypatch)
    at.switch_page("views/curvature.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.dataframe[0].value) == 3
    assert chart_specs(at)[0]["layout"]["title"]["text"] == "Hessian: lambda_max and trace"
    at.selectbox(key="cv_space").set_value("b").run()
    assert any("nothing measured yet" in i.value for i in at.info)
    at.multiselect(key="cv_runs").set_value(["lora-seed1"]).run()
    next(b for b in at.button if b.label.startswith("Compute the")).click().run()
    assert not at.exception, [e.value for e in at.exception]
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert "Hessian spectral density (SLQ)" in titles and "Per-layer top eigenvalue" in titles


def test_a_curvature_result_of_other_settings_is_never_shown_as_matching(runs_folder, monkeypatch, tmp_path):
    """Stored with another tolerance or seed, lambda_max stays unshown; under the page's own key it is shown."""
    import dataclasses
    import shutil

    from flatlora_analysis import ProbeSet
    from flatlora_analysis.hessian import EigenResult
    from flatlora_analysis.loading import adapter_hash
    from flatlora_analysis.registry import measure
    from flatlora_analysis.report import ReportSettings
    from flatlora_analysis.report.measure import report_measures
    from flatlora_analysis.store import ResultStore, result_key

    root = tmp_path / "runs"
    shutil.copytree(runs_folder, root)
    run = root / "lora-seed1"
    settings = ReportSettings.from_dict(json.loads((root / "report" / "report.json").read_text())["settings"])
    probe = ProbeSet.from_run(run, settings.split, n=settings.n, batch_size=settings.batch_size)

    def key(s: ReportSettings, label: str = "hessian.top_eigenvalues") -> str:
        [(name, given)] = [(n, g) for lab, n, g in report_measures("classification", s) if lab == label]
        complete = measure(name).complete(**given)
        return result_key(adapter_hash(run / "adapter"), probe.fingerprint(), name, complete)

    shared = key(settings, "hessian.curvature")  # the report's engine keeps every Hessian measure in one result
    assert ResultStore(root / "report" / "cache").path(shared).exists()  # the page looks under the report's key
    ResultStore(root / "report" / "cache").path(shared).unlink()
    alone = dataclasses.replace(settings, hessian_engine="reference")
    own = key(alone)  # with that gone, the page asks the measure alone, with the report's settings
    fake = EigenResult(np.array([12345.0]), hvps=1, converged=True)
    others = [dataclasses.replace(alone, eig_tol=settings.eig_tol / 10), dataclasses.replace(alone, seed=7)]
    for other in others:
        assert key(other) != own
        ResultStore(run / "analysis").put(key(other), {}, fake, 0.0)

    def lambda_max_shown(at) -> list:
        table = at.dataframe[0].value
        return list(table[table["run"] == "lora-seed1"]["lambda_max"])

    at = app_on(root, monkeypatch)
    at.switch_page("views/curvature.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = lambda_max_shown(at)
    assert 12345.0 not in shown and all(v is None or np.isnan(v) for v in shown)
    ResultStore(run / "analysis").put(own, {}, fake, 0.0)  # now under the settings the page asks for
    fresh_caches_now()
    at = app_on(root, monkeypatch)
    at.switch_page("views/curvature.py").run()
    assert lambda_max_shown(at) == [12345.0]


def fresh_caches_now() -> None:
    from flatlora_app.loaders import clear_caches

    clear_caches()


def test_correlation_page_scatters_by_method_with_the_coefficients(runs_folder, monkeypatch):
    at = app_on(runs_folder, monkeypatch)
    at.switch_page("views/correlation.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [scatter] = chart_specs(at)
    assert "Kendall tau" in scatter["layout"]["title"]["text"]
    assert {t["name"] for t in scatter["data"]} == {"lora", "eflat-lora", "flat-lora"}
    assert [m.label for m in at.metric] == ["Kendall tau", "Spearman", "granulated Kendall (Psi)"]
    at.selectbox(key="corr_target").set_value("gap").run()
    assert "gap vs" in chart_specs(at)[0]["layout"]["title"]["text"]


def test_report_page_shows_and_offers_the_report(runs_folder, monkeypatch):
    at = app_on(runs_folder, monkeypatch)
    at.switch_page("views/report.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.metric[0].value == "3" and len(at.dataframe[0].value) == 3
    assert len(at.get("download_button")) == 3


@pytest.mark.parametrize("case", ["missing", "file", "empty"])
def test_empty_missing_and_wrong_folders_give_their_messages(tmp_path, monkeypatch, case):
    folder = tmp_path / "runs"
    if case == "file":
        folder.write_text("not a folder")
    elif case == "empty":
        folder.mkdir()
    at = app_on(folder, monkeypatch)
    expected = {"missing": "does not exist", "file": "is a file", "empty": "holds no runs"}[case]
    assert any(expected in i.value for i in at.info)
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception and any(expected in i.value for i in at.info), page


def test_a_run_being_written_is_flagged(runs_folder, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "live"
    shutil.copytree(runs_folder / "lora-seed1", folder / "lora-seed1")
    info = json.loads((folder / "lora-seed1" / "run.json").read_text())
    info["status"] = "running"
    (folder / "lora-seed1" / "run.json").write_text(json.dumps(info))
    at = app_on(folder, monkeypatch)
    assert any("still being written" in w.value for w in at.warning)


@pytest.mark.slow
def test_a_real_browser_renders_the_landscape_and_the_scatter(runs_folder, tmp_path):
    from browser import assert_pages_render

    artifacts = Path(os.environ.get("FLATLORA_TEST_ARTIFACTS", tmp_path))
    pages = [("landscapes", "Loss along a direction", "dashboard-landscapes.png"),
             ("correlation", "Kendall tau", "dashboard-correlation.png")]  # fmt: skip
    assert_pages_render(runs_folder, pages, artifacts)
