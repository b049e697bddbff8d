"""The main job end to end, shortened: flatlora demo --quick trains, measures, reports, and reuses on a rerun."""

from __future__ import annotations

import json

import pytest

from flatlora import cli

pytestmark = pytest.mark.slow  # trains and measures real models end to end: the slow tier


def test_the_quick_demo_trains_measures_reports_and_reuses(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "| eflat-lora |" in first and f"flatlora app {out}" in first
    report = json.loads((out / "report" / "report.json").read_text())
    assert [e["method"] for e in report["entries"]] == ["lora", "flat-lora", "eflat-lora"]
    eflat = report["entries"][2]
    assert eflat["ema_error"]["log"]["steps"] and eflat["ema_error"]["checkpoint"]["rel_error"]
    assert all(e["landscape_1d"]["z"] for e in report["entries"])
    assert report["correlation"]["n_runs"] == 3
    for method in ("lora", "flat-lora", "eflat-lora"):
        assert list((out / method / "analysis").glob("result-*.json"))  # the dashboard reuses these
        assert list((out / method / "trajectory").iterdir())
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "report.json" not in p.name}
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [p for p in before if after[p] != before[p] and p.parent.name != "report"]
    assert changed == []  # runs and measures reused
