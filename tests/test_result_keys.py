"""One key per stored result: what the report stores, the dashboard and ``flatlora landscape`` find by the same key.

Every registered measure is stored once on a tiny run (the report's measures by the report,
with the shared and the reference Hessian engines; the 2-D landscape and the interpolation,
which no report computes, by ``flatlora landscape``) and read back by the other readers'
own lookups, which build their keys from ``registry.MEASURES[...].complete()`` as the
writers do.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from flatlora import cli
from flatlora_analysis.loading import adapter_hash, resolve_targets
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.registry import MEASURES
from flatlora_analysis.report import ReportSettings, build_report
from flatlora_analysis.report.measure import measure_target, report_measures
from flatlora_analysis.store import ResultStore, result_key

pytest.importorskip("streamlit")

# every measure of the report, each with the fewest products and points it takes
TINY = ReportSettings(
    preset="tiny", n=4, batch_size=4, worst_steps=1, average_samples=2, eig_k=1, eig_tol=0.1, trace_samples=6,
    density_steps=2, layers=True, layer_trace_samples=6, landscape_steps=3, pac_bayes_samples=2, ema_checkpoint=False,
)  # fmt: skip
# the Hessian measures alone (each stored apart), and nothing else again
REFERENCE = dataclasses.replace(TINY, hessian_engine="reference", kinds=("sam",), flatness=(), landscape_steps=0)
NOT_IN_A_REPORT = {"landscape_2d", "interpolation"}  # flatlora landscape and the dashboard compute these
LANDSCAPE = ["--steps", "3", "--examples", "4", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_runs_source):
    """A copy of the tiny lora run measured with each Hessian engine: ROOT/shared/report, ROOT/reference/report."""
    root = tmp_path_factory.mktemp("keys")
    run = root / "runs" / "lora-seed1"
    shutil.copytree(tiny_runs_source / "lora-seed1", run, ignore=shutil.ignore_patterns("analysis"))
    # the shared engine through flatlora report's whole path (its report.json gives the dashboard its settings),
    # the reference one through the same measuring of an adapter, without the report's files
    reports = {"shared": build_report([run], root / "shared" / "report", TINY)["entries"][0]}
    cache = ResultStore(root / "reference" / "report" / "cache")
    reports["reference"] = measure_target(resolve_targets([run])[0], REFERENCE, cache)
    identity = adapter_hash(run / "adapter")
    fingerprint = ProbeSet.from_run(run, TINY.split, n=TINY.n, batch_size=TINY.batch_size).fingerprint()
    return {"root": root, "run": run, "entries": reports, "identity": identity, "fingerprint": fingerprint}


def _stores(measured, name: str) -> list[ResultStore]:
    return [ResultStore(measured["run"] / "analysis"), ResultStore(measured["root"] / name / "report" / "cache")]


def _find(stores, key):
    found = [s.get_record(key) for s in stores]
    return next((r for r in found if r is not None), None)


def test_the_report_stores_each_of_its_measures_under_the_registry_key(measured):
    stored = set()
    for name, settings in (("shared", TINY), ("reference", REFERENCE)):
        for label, measure, given in report_measures("classification", settings):
            complete = MEASURES[measure].complete(**given)
            key = result_key(measured["identity"], measured["fingerprint"], measure, complete)
            record = _find(_stores(measured, name), key)
            assert record is not None, (name, label)
            assert record["measure"] == measure and record["settings"] == complete
            stored.add(measure)
    assert stored == set(MEASURES) - NOT_IN_A_REPORT
    entry = measured["entries"]["shared"]
    assert set(entry["flatness"]) == {"adaptive-worst", "pac-bayes", "relative"}
    assert len(entry["sharpness"]) == len(TINY.kinds)


def test_the_dashboard_finds_the_reports_curvature_with_either_engine(measured):
    from flatlora_app import measures as app

    run = str(measured["run"])
    for name, settings in (("shared", TINY), ("reference", REFERENCE)):
        hess = measured["entries"][name]["hessian"]
        for part in app.CURVATURE:
            found = app.curvature(run, part, settings, root=str(measured["root"] / name))
            assert found is not None, (name, part)
            assert found.to_dict() == hess[part], (name, part)


def test_the_dashboard_and_flatlora_landscape_find_each_others_landscapes(measured, capsys):
    from flatlora_app import measures as app
    from flatlora_app.loaders import measure_defaults

    run, root = measured["run"], str(measured["root"] / "shared")
    defaults = measure_defaults(root)  # the report's probe and landscape settings, as the Landscapes page has them
    assert (defaults["n"], defaults["steps"]) == (TINY.n, TINY.landscape_steps)
    # the report's 1-D landscape: the dashboard finds it, flatlora landscape reuses it
    found = app.landscape(str(run), "1d", defaults, root=root)
    np.testing.assert_array_equal(found.z, measured["entries"]["shared"]["landscape_1d"]["z"])
    assert cli.main(["landscape", str(run), *LANDSCAPE]) == 0
    assert "1d landscape reused" in capsys.readouterr().out
    # the measures no report computes: stored by flatlora landscape, found by the dashboard
    # (flatlora landscape --2d without --span keys the grid's span 1.0, which is the report's span the dashboard asks)
    assert defaults["span"] == 1.0
    for kind, flags in (("2d", ["--2d"]), ("interpolation", ["--from-base"])):
        assert app.landscape(str(run), kind, defaults, root=root) is None
        assert cli.main(["landscape", str(run), *flags, *LANDSCAPE]) == 0
        assert f"{kind} landscape computed" in capsys.readouterr().out
        found = app.landscape(str(run), kind, defaults, root=root)
        assert found is not None and found.kind == kind, kind
