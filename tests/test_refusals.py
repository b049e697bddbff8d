"""Every command's refusals: one line, exit 2, no traceback, nothing written; and the dashboard's process model.

Each case is an input a new user typed that once broke the promise (a traceback, work before the
refusal, files left behind, or silence). README's table of refusals is checked against this list.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import copy_tree

from flatlora import cli

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_runs_source):
    """A folder of two tiny finished runs (copies of the session's) and damaged copies of them, and a few bad files."""
    root = tmp_path_factory.mktemp("refusals")
    for name in ("lora-seed1", "eflat-lora-seed1"):
        copy_tree(tiny_runs_source / name, root / "runs" / name)
    good = root / "runs" / "lora-seed1"

    def damaged(name, edit):
        folder = root / "bad" / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def run_json(folder, **change):
        info = json.loads((folder / "run.json").read_text())
        info.update(change)
        (folder / "run.json").write_text(json.dumps(info))

    damaged("garbage-metrics", lambda f: (f / "metrics.jsonl").write_text("garbage\n{]\nmore garbage\n"))
    damaged("binary-metrics", lambda f: (f / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n\xff\n"))
    damaged("garbage-config", lambda f: (f / "adapter" / "adapter_config.json").write_text("{not json"))
    damaged("no-weights", lambda f: (f / "adapter" / "adapter_model.safetensors").unlink())
    damaged("unknown-method", lambda f: run_json(f, method="lora-magic"))
    damaged("running", lambda f: run_json(f, status="running"))
    damaged("no-data-spec", lambda f: run_json(f, data={}))
    shutil.copytree(good / "adapter", root / "bad" / "bare-adapter")
    (root / "a-file").write_text("not a folder\n")
    three = root / "three-classes.csv"
    three.write_text("text,label\n" + "".join(f"film {i},{i % 3}\n" for i in range(12)))
    shards = root / "shards"
    shards.mkdir()
    (shards / "report.shard-1-of-2.json").write_text('{"shard": [1, 2], "entries": [')
    (shards / "report.shard-2-of-2.json").write_text('{"shard": [2, 2], "settings": {}, "targets": [], "entries": []}')
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def cases(w: Path, csv_file: str, tiny_model_dir: str) -> list[tuple[list[str], str]]:
    """(argv, a fragment of the one-line message): the refusals of every command."""
    runs, bad, out = w / "runs", w / "bad", str(w / "out")
    run = str(runs / "lora-seed1")
    rep = ["report", "--out", out, "--quick", "--no-progress"]
    land = ["landscape", "--no-progress", "--steps", "3"]
    tiny = ["--model", tiny_model_dir, "--data", csv_file, "--shots", "4", "--steps", "1", "--no-progress"]
    return [
        ([*rep, str(bad / "garbage-metrics")], "metrics.jsonl"),
        ([*rep, str(bad / "binary-metrics")], "metrics.jsonl"),
        ([*rep, run, "--density-steps=-1"], "--density-steps"),
        ([*rep, run, "--trace-samples", "3"], "--trace-samples"),
        ([*rep, run, "--eig-k", "0"], "--eig-k"),
        ([*rep, run, "--batch-size", "0"], "--batch-size"),
        ([*rep, run, "--eig-space", "nope"], "--eig-space"),
        ([*rep, run, "--space", "nope"], "--space"),
        ([*rep, run, "--examples=-1"], "--examples"),
        ([*rep, run, "--examples", "0"], "--examples"),
        ([*rep, run, "--examples", "many"], "--examples"),
        ([*rep, run, "--kinds", ""], "--kinds"),
        ([*rep, run, "--flatness", "sharpish"], "--flatness"),
        ([*rep, run, "--rho", "x"], "--rho"),
        ([*rep, run, "--device", "cuda:7"] if _has_cuda() else [*rep, run, "--device", "cuda"], "--device"),
        ([*rep, run, "--device", "nonsense"], "--device"),
        ([*rep, str(bad / "garbage-config")], "cannot read"),
        ([*rep, str(bad / "no-weights")], "no adapter weights"),
        ([*rep, str(bad / "unknown-method")], "unknown method"),
        ([*rep, str(bad / "running")], "not finished"),
        ([*rep, str(bad / "no-data-spec")], "--data"),
        ([*rep, run, "--data", str(w / "three-classes.csv")], "classes"),
        (
            [*rep, str(bad / "bare-adapter"), "--base-model", str(w / "no-such-model"), "--data", csv_file],
            "no such folder",
        ),
        (["report", "--out", str(w / "a-file"), run, "--quick"], "is a file"),
        (["report", "--out", str(w / "a-file" / "R"), run, "--quick"], "is a file"),
        (["report", "--merge", "--out", str(w / "shards")], "damaged"),
        ([*rep, run, "--shard", "0/0"], "--shard"),
        ([*rep, run, "--shard", "3/2"], "--shard"),
        ([*land, run, "--steps", "4"], "odd"),
        ([*land, run, "--device", "nonsense"], "--device"),
        ([*land, str(w / "a-file")], "is a file"),
        ([*land, run, "--between", str(runs)], "holds 2 runs"),
        ([*land, str(bad / "garbage-metrics")], "metrics.jsonl"),
        (["train", *tiny, "--target-modules", "nosuchmodule", "--out", out], "nosuchmodule"),
        (["train", *tiny, "--out", str(w / "a-file")], "is a file"),
        (["train", *tiny, "--out", str(w / "a-file" / "run")], "is a file"),
        (["train", *tiny, "--resume", "--out", out], "nothing to resume"),
        (["train", *tiny, "--shots", "0", "--out", out], "--shots"),
        (["train", *tiny, "--label-column", "nope", "--out", out], "--label-column"),
        (["sweep", *tiny, "--out", str(w / "a-file")], "is a file"),
        (["sweep", *tiny, "--lrs", "-1", "--out", out], "--lrs"),
        (["sweep", *tiny, "--lrs", "abc", "--out", out], "--lrs"),
        (["sweep", *tiny, "--seeds", "1.5", "--out", out], "--seeds"),
        (["demo", "--quick", "--no-report", "--out", str(w / "a-file")], "is a file"),
        (["app", str(w / "no-such-folder")], "does not exist"),
        (["app", str(w / "a-file")], "is a file"),
        (["app", str(runs), "--port", "-1"], "--port"),
        (["app", str(runs), "--port", "70000"], "--port"),
        (["app", str(runs), "--host", "nonsense.invalid"], "--host"),
    ]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse's refusals
        return int(stop.code)


def test_every_refusal_is_one_line_exit_2_before_any_write(world, csv_file, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    failures = []
    for argv, fragment in cases(world, str(csv_file), tiny_model_dir):
        before = snapshot(world)
        start = time.perf_counter()
        code = run_cli(argv)
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err.strip()
        after = snapshot(world)
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if not err.startswith("flatlora") or "\n" in err or "Traceback" in err:
            problems.append(f"not one line: {err[-300:]!r}")
        if fragment not in err:
            problems.append(f"{fragment!r} not in {err!r}")
        if after != before:
            problems.append(f"wrote {sorted(set(after) ^ set(before)) or 'into existing files'}")
        if seconds > 30:
            problems.append(f"refused after {seconds:.0f} s of work")
        if problems:
            failures.append(f"{' '.join(argv[:1] + argv[-3:])}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_a_bare_app_without_runs_demo_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["app"]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs/demo does not exist" in err and "\n" not in err


def test_a_busy_port_is_refused_in_one_line(world, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_cli(["app", str(world / "runs"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"port {port}" in err and "in use" in err and "\n" not in err


def test_the_readme_table_lists_tested_refusals(world, csv_file, tiny_model_dir):
    text = README.read_text()
    start = text.index("| command | input | message (one line, exit 2) |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break  # the end of the table
        rows.append(line)
    assert len(rows) >= 20
    tested = {(argv[0], fragment) for argv, fragment in cases(world, str(csv_file), tiny_model_dir)}
    tested |= {("app", "runs/demo does not exist"), ("app", "in use")}
    for row in rows:
        command, _, message = (c.strip() for c in row.strip("|").split("|"))
        quoted = message.split("`")[1::2]  # the tested fragment is the first `...` of the message
        assert quoted and (command.strip("`"), quoted[0]) in tested, row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_flatlora_app_ends_its_server(world, sig):
    pytest.importorskip("streamlit")
    port = free_port()
    flatlora = shutil.which("flatlora", path=str(Path(sys.executable).parent)) or "flatlora"
    proc = subprocess.Popen(
        [flatlora, "app", str(world / "runs"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first, first
        deadline = time.time() + 60
        while not port_answers(port) and time.time() < deadline:
            time.sleep(0.2)
        assert port_answers(port), "the dashboard never answered"
        proc.send_signal(sig)
        deadline = time.time() + 15
        while port_answers(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not port_answers(port), "the server still answers 15 s after the signal (an orphan)"
        assert proc.wait(timeout=15) is not None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_folder_with_an_unfinished_run_measures_the_finished_ones_and_names_the_rest(world, tmp_path, capsys):
    folder = tmp_path / "sweep"
    shutil.copytree(world / "runs" / "lora-seed1", folder / "lora-seed1")
    shutil.copytree(world / "bad" / "running", folder / "running")
    from flatlora_analysis.loading import resolve_targets

    targets = resolve_targets([folder])
    assert [t.name for t in targets] == ["lora-seed1"]
    assert "skipping 1 unfinished run(s): running" in capsys.readouterr().err
    shutil.rmtree(folder / "lora-seed1")
    assert run_cli(["report", str(folder), "--out", str(tmp_path / "R"), "--quick"]) == 2
    assert "holds no finished run yet" in capsys.readouterr().err
