"""`flatlora report` and the run-based measures: runs folders, bare adapters, resume, shards, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_tree

from flatlora import FlatLoraError, cli
from flatlora.runs import load_run
from flatlora.testing import save_tiny_text_model
from flatlora_analysis import (
    ProbeSet,
    balance_trajectory,
    balancedness,
    ema_error_at_checkpoint,
    ema_error_series,
    evaluate_loss,
    load_model,
)

# a fixed memory budget: auto follows the free memory of the moment, and another plan of the graphs moves
# the results' last bits; these reports are compared bit for bit across processes
QUICK = ["--quick", "--examples", "8", "--batch-size", "4", "--max-memory", "1GB", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runs_source):
    """A writable copy of the session's tiny runs (reports cache their results inside the runs)."""
    return copy_tree(tiny_runs_source, tmp_path_factory.mktemp("report-runs") / "runs")


@pytest.fixture(scope="module")
def quick_report(runs, tmp_path_factory):
    """One quick report of the runs folder with progress on, its folder and what it printed: the whole
    report several tests read (its stdout and stderr are not terminals: plain progress lines)."""
    out = tmp_path_factory.mktemp("quick-report") / "report"
    quick = [a for a in QUICK if a != "--no-progress"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(["report", str(runs), "--out", str(out), *quick]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def assert_close_but_meta(a, b, rel: float, where: str = "") -> None:
    """Equal structures, numbers within ``rel`` of the largest magnitude beside them; "meta" left out."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            if key != "meta":
                assert_close_but_meta(a[key], b[key], rel, f"{where}.{key}")
    elif isinstance(a, list) and a and all(isinstance(x, (int, float)) for x in a):
        scale = max(abs(float(x)) for x in a)
        assert len(a) == len(b) and all(abs(x - y) <= rel * scale for x, y in zip(a, b)), where
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_but_meta(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


# What a result records of how it was computed rather than what it is: seconds, the memory plan (the auto budget
# follows the free memory), and the passes made (a clean loss or gradient shared with an earlier measure is not
# made again, so the count depends on which measures ran before in the process; the values do not).
MACHINE_KEYS = ("cost", "memory", "forward_passes", "backward_passes", "graph_builds")


def _without_cost(value):
    """``value`` without what the machine decides (seconds, memory plans; at every depth): what two runs share."""
    if isinstance(value, dict):
        return {k: _without_cost(v) for k, v in value.items() if k not in MACHINE_KEYS}
    if isinstance(value, list):
        return [_without_cost(v) for v in value]
    return value


def first_difference(a, b, path: str = "") -> str:
    """Where two JSON values first differ (``entries[0].hessian.trace.value: 1.0 != 1.1``), for assertion messages."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r:.200} != {b!r:.200}"


def entries_without_timing(report_json: Path) -> list[dict]:
    report = json.loads(report_json.read_text())
    return [_without_cost({k: v for k, v in e.items() if k != "timing"}) for e in report["entries"]]


def snapshot(root: Path) -> dict[str, bytes]:
    return (
        {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        if root.exists()
        else {}
    )


def test_probe_set_from_a_run_rebuilds_its_own_data(runs):
    run = load_run(runs / "lora-seed1")
    probe = ProbeSet.from_run(run, "train", batch_size=5)
    assert probe.n_examples == run.info["data"]["sizes"]["train"] == 12
    assert probe.batch_sizes == [5, 5, 2]
    model, _ = load_model(runs / "lora-seed1", device="cpu")
    assert evaluate_loss(model, probe) == pytest.approx(run.final["train_loss"], rel=1e-5)
    test = ProbeSet.from_run(run, "test", n=5)
    assert test.n_examples == 5


def test_balancedness_from_the_adapter_folder_alone_matches_the_model(runs):
    run = runs / "eflat-lora-seed1"
    from_folder = balancedness(run / "adapter")
    model, _ = load_model(run, device="cpu")
    from_model = balancedness(model)
    assert from_folder.layers == from_model.layers
    np.testing.assert_allclose(from_folder.per_layer, from_model.per_layer, rtol=1e-12)
    trajectory = balance_trajectory(run)
    assert list(trajectory.steps) == [2, 4, 6]
    assert trajectory.total[-1] == pytest.approx(from_folder.total)


def test_theorem2_series_from_the_log_and_recomputed_at_the_checkpoint(runs):
    run = runs / "eflat-lora-seed1"
    series = ema_error_series(run)
    assert list(series.steps) == [1, 2, 3, 4, 5, 6]
    assert np.all(np.isfinite(series.rel_error[1:]))
    at = ema_error_at_checkpoint(run)
    assert at.source == "checkpoint" and at.steps[0] == 6
    assert np.isfinite(at.rel_error[0]) and -1 <= at.cosine[0] <= 1
    with pytest.raises(FlatLoraError, match="eflat-lora runs only"):
        ema_error_series(runs / "lora-seed1")


def test_command_line_presets_keep_their_own_sizes_unless_an_option_overrides_them():
    from flatlora_analysis.cli import settings_from_args as report_settings
    from flatlora_analysis.report import PRESETS, preset

    parser = cli.build_parser()
    for flags, name in (([], "default"), (["--quick"], "quick"), (["--full"], "full")):
        settings = report_settings(parser.parse_args(["report", "runs", "--out", "o", *flags]))
        assert settings == PRESETS[name]
    assert PRESETS["full"].batch_size == PRESETS["full"].n  # one batch: the graph is kept across products
    args = parser.parse_args(["report", "runs", "--out", "o", "--full", "--batch-size", "16", "--examples", "all"])
    settings = report_settings(args)
    assert (settings.batch_size, settings.n, settings.layers) == (16, None, True)
    args = parser.parse_args(["report", "runs", "--out", "o", "--flatness", "none"])
    assert report_settings(args).flatness == ()
    args = parser.parse_args(["report", "runs", "--out", "o", "--quick", "--flatness", "relative, pac-bayes"])
    assert report_settings(args).flatness == ("relative", "pac-bayes")
    with pytest.raises(FlatLoraError, match="layer_trace_samples must be >= 6"):
        preset("full", layer_trace_samples=3)
    # the quick preset starts Lanczos toward the clean gradient; --eig-start overrides either way
    assert (PRESETS["quick"].eig_start, PRESETS["default"].eig_start) == ("gradient", "random")
    args = parser.parse_args(["report", "runs", "--out", "o", "--quick", "--eig-start", "random"])
    assert report_settings(args).eig_start == "random"
    with pytest.raises(FlatLoraError, match="unknown --eig-start 'top'"):
        preset("default", eig_start="top")
    with pytest.raises(FlatLoraError, match="pac_bayes_rtol"):
        preset("default", pac_bayes_rtol=1.5)


def test_report_on_a_runs_folder_writes_every_file(quick_report):
    out, printed, _ = quick_report
    report = json.loads((out / "report.json").read_text())
    names = [e["name"] for e in report["entries"]]
    assert names == ["eflat-lora-seed1", "flat-lora-seed1", "lora-seed1"]
    for e in report["entries"]:
        kinds = {s["kind"] for s in e["sharpness"]}
        assert kinds == {"sam", "worst", "average", "flat-lora"}
        assert e["hessian"]["top_eigenvalues"]["hvps"] > 0 and "trace" in e["hessian"]
        assert e["balancedness"]["total"] == pytest.approx(balancedness(Path(e["path"]) / "adapter").total)
        assert e["metrics"]["test_accuracy"] == load_run(e["path"]).final["test_accuracy"]
        worst = next(s for s in e["sharpness"] if s["kind"] == "worst")
        sam = next(s for s in e["sharpness"] if s["kind"] == "sam")
        assert worst["value"] >= sam["value"]
        flat = e["flatness"]
        assert set(flat) == {"adaptive-worst", "pac-bayes", "relative"}
        assert flat["adaptive-worst"]["settings"]["logit_normalization"] and flat["adaptive-worst"]["rho"] == 0.001
        assert flat["pac-bayes"]["value"] == pytest.approx(1 / flat["pac-bayes"]["sigma"] ** 2)
        assert flat["relative"]["value"] > 0 and "classifier" in flat["relative"]["layer"]
    measures = {c["measure"] for c in report["correlation"]["rows"]}
    assert {"adaptive_sharpness_rho0.001", "pac_bayes_flatness", "relative_flatness"} <= measures
    eflat = report["entries"][0]
    assert eflat["ema_error"]["log"]["source"] == "log" and eflat["ema_error"]["checkpoint"]["source"] == "checkpoint"
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "lambda_max" in csv_lines[0] and "relative_flatness" in csv_lines[0]
    assert "| eflat-lora-seed1 |" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count("plotly.js") >= 1 and "Sharpness" in page and "<script" in page
    assert "report.html" in printed


def test_report_on_a_bare_adapter_with_base_model_and_data(runs, tmp_path, csv_file, tiny_model_dir):
    adapter = tmp_path / "downloaded-adapter"
    shutil.copytree(runs / "lora-seed1" / "adapter", adapter)
    out = tmp_path / "report"
    argv = ["report", str(adapter), "--base-model", str(tiny_model_dir), "--data", str(csv_file), "--out", str(out)]
    assert cli.main([*argv, *QUICK]) == 0
    [entry] = json.loads((out / "report.json").read_text())["entries"]
    assert entry["kind"] == "adapter" and entry["method"] is None
    # The same adapter measured as a run on the same probe data gives the same sharpness.
    run_out = tmp_path / "as-run"
    argv = ["report", str(runs / "lora-seed1"), "--data", str(csv_file), "--out", str(run_out)]
    assert cli.main([*argv, *QUICK]) == 0
    [as_run] = json.loads((run_out / "report.json").read_text())["entries"]
    assert [s["value"] for s in entry["sharpness"]] == pytest.approx([s["value"] for s in as_run["sharpness"]])


def test_sharded_two_ways_then_merged_equals_the_unsharded_report(runs, quick_report, tmp_path):
    whole = quick_report[0]  # the same settings unsharded (progress lines change no result)
    sharded = tmp_path / "sharded"
    for i in (1, 2):
        assert cli.main(["report", str(runs), "--out", str(sharded), "--shard", f"{i}/2", *QUICK]) == 0
    assert not (sharded / "report.json").exists()
    assert cli.main(["report", "--merge", "--out", str(sharded), "--no-progress"]) == 0
    got, want = entries_without_timing(sharded / "report.json"), entries_without_timing(whole / "report.json")
    assert got == want, first_difference(got, want)


@pytest.mark.slow
def test_a_killed_report_resumes_from_its_cache(runs, quick_report, tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "flatlora.cli", "report", str(runs), "--out", str(out), *QUICK]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "cache").glob("*.json"))) < 4:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    cached = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")}
    assert len(cached) >= 4 and not (out / "report.json").exists()
    assert not list((out / "cache").glob(".*.tmp"))  # atomic writes leave no half file
    assert cli.main(["report", str(runs), "--out", str(out), *QUICK]) == 0
    for name, mtime in cached.items():  # reused, not recomputed
        assert (out / "cache" / name).stat().st_mtime_ns == mtime
    fresh = quick_report[0]  # the same report made in one go
    got, want = entries_without_timing(out / "report.json"), entries_without_timing(fresh / "report.json")
    assert got == want, first_difference(got, want)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, tiny_model_dir, csv_file, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs / "lora-seed1" / "adapter", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    other_base = save_tiny_text_model(tmp_path / "wider-bert", num_labels=2, seed=1)
    config = json.loads((Path(other_base) / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 48, 96
    (Path(other_base) / "config.json").write_text(json.dumps(config))
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(**{k: v for k, v in config.items() if k != "architectures"})
    ).save_pretrained(other_base)
    no_run = tmp_path / "not-a-run"
    no_run.mkdir()
    (no_run / "metrics.jsonl").write_text("{}\n")
    cases = [
        ([str(tmp_path / "missing-adapter")], "does not exist"),
        ([str(corrupt), "--base-model", str(tiny_model_dir), "--data", str(csv_file)], "damaged"),
        ([str(runs / "lora-seed1" / "adapter"), "--base-model", other_base, "--data", str(csv_file)], "does not fit"),
        ([str(no_run)], "holds no run"),
        ([str(runs / "lora-seed1"), "--rho", "0"], "rho must be"),
        ([str(runs / "lora-seed1"), "--rho", "-0.1"], "rho must be"),
        ([str(runs / "lora-seed1"), "--eig-k", "100000"], "larger than"),
        ([str(runs / "lora-seed1" / "adapter")], "bare adapter"),
        ([str(runs / "lora-seed1"), "--layers", "--trace-samples", "0"], "--trace-samples >= 6"),
        ([str(runs / "lora-seed1"), "--data-parallel", "--shard", "1/2"], "use one of them"),
        ([str(runs / "lora-seed1"), "--data-parallel", "--hessian-engine", "reference"], "shared Hessian engine"),
    ]
    del torch
    for extra, match in cases:
        out = tmp_path / "out"
        assert cli.main(["report", *extra, "--out", str(out), "--no-progress", "--quick"]) == 2, match
        err = capsys.readouterr().err.strip()
        assert err.startswith("flatlora: error:") and "\n" not in err, err
        assert match in err, err
        assert snapshot(out) == {}, match


@pytest.mark.slow
def test_a_two_rank_torchrun_report_equals_the_one_process_report(runs, quick_report, tmp_path):
    import torch

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    bindir = Path(sys.executable).parent
    torchrun, flatlora = shutil.which("torchrun", path=str(bindir)), shutil.which("flatlora", path=str(bindir))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    outs = {"one": quick_report[0]}  # the same report in one process
    two = [torchrun, "--standalone", "--nproc_per_node=2", "--no-python"]
    for name, prefix, extra in (("two", two, []), ("products", two, ["--data-parallel"])):
        out = tmp_path / name
        cmd = [*prefix, flatlora, "report", str(runs), "--out", str(out), *QUICK, *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[name] = out
    one = entries_without_timing(outs["one"] / "report.json")
    two = entries_without_timing(outs["two"] / "report.json")
    assert two == one, first_difference(two, one)
    # the adapters on both ranks, each Hessian product split over them: the same numbers to round-off
    products = entries_without_timing(outs["products"] / "report.json")
    assert_close_but_meta(products, one, rel=1e-5)
    assert all(e["hessian"]["engine"]["name"] == "shared" for e in products)
    # a refusal on the ranks: the same one line from each, exit 2, nothing written
    bad = tmp_path / "bad"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
        flatlora,
        "report",
        str(runs),
        "--out",
        str(bad),
        "--eig-k",
        "100000",
        *QUICK,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and result.stderr.count("flatlora: error:") == 2
    assert not bad.exists()


def test_report_progress_is_plain_lines_when_stderr_is_not_a_terminal(quick_report):
    out, _, err = quick_report
    assert "\r" not in err  # no redrawn bars in a log file
    lines = err.splitlines()
    n = len(json.loads((out / "report.json").read_text())["entries"])
    counted = [line.split(": ")[1] for line in lines if line.startswith("adapters: ")]
    assert counted == [f"{i}/{n}" for i in range(1, n + 1)]
    hessian = [line for line in lines if ": Hessian (shared): " in line]
    assert hessian and all(line.rsplit(": ", 1)[1].count("/") == 1 for line in hessian)
    # which results share products, in report.json: the quick preset's trace sketch is the top-1 run's basis
    entry = json.loads((out / "report.json").read_text())["entries"][0]
    assert set(entry["hessian"]["shares"]) == {"trace"} and entry["hessian"]["engine"]["name"] == "shared"
    assert entry["hessian"]["trace"]["meta"]["sketch"] == "lanczos basis"


def test_every_measure_states_its_cost_in_gradients_and_the_memory_plan(quick_report):
    out, stdout, stderr = quick_report
    report = json.loads((out / "report.json").read_text())
    for entry in report["entries"]:
        cost = entry["cost"]
        assert cost["gradient_seconds"] > 0 and {"sharpness-sam", "hessian.curvature"} <= set(cost["measures"])
        curvature = cost["measures"]["hessian.curvature"]
        assert curvature["products"] > 0 and curvature["graph_builds"] >= 1
        assert curvature["gradients"] == pytest.approx(curvature["seconds"] / curvature["gradient_seconds"])
        memory = entry["hessian"]["top_eigenvalues"]["meta"]["memory"]
        assert memory["mode"] == "kept" and memory["budget_source"] == "--max-memory 1GB"  # tiny graphs: all kept
    assert "## Cost" in (out / "report.md").read_text() and "cost of " in stdout
    assert stderr.count("flatlora: memory for Hessian products") == 1  # told once, however many adapters
