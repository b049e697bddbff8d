"""Run directories: atomic writes, the refusal matrix (writing nothing), metrics, the reader."""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import replace

import pytest
import torch
from helpers import snapshot
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from flatlora import FlatLoraError
from flatlora.runs import (
    RunDir,
    RunIdentity,
    atomic_directory,
    atomic_write_json,
    latest_checkpoint,
    list_runs,
    load_run,
)
from flatlora.testing import tiny_model

CONFIG = dict(method="eflat-lora", hparams={"rho": 0.05, "lr": 1e-3, "steps": 4}, data={"spec": "x.csv"}, model="m")
IDENTITY = RunIdentity(**CONFIG)


def test_atomic_write_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"a": 1})

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left


def test_atomic_directory_leaves_the_old_folder_on_an_error(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("killed")
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_directory_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("old")
    real_replace = os.replace

    def fail_moving_the_new_folder_in(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_the_new_folder_in)
    with pytest.raises(OSError, match="disk gone"), atomic_directory(target) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_get_the_modes_of_plain_writes(tmp_path):
    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    run = RunDir.create(tmp_path / "r", IDENTITY)
    run.append_metrics({"step": 1})
    run.truncate_metrics(1)
    with atomic_directory(tmp_path / "adapter") as tmp:
        (tmp / "w").write_text("x")
    assert mode(run.run_json) == mode(run.metrics_file) == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "adapter") == mode(tmp_path / "plain")


def test_lifecycle_and_versions(tmp_path):
    run = RunDir.create(tmp_path / "r", IDENTITY)
    info = run.info
    assert info["status"] == "running" and info["format"] == 1 and {"torch", "peft", "python"} <= set(info["versions"])
    run.fail("boom")
    assert run.info["status"] == "failed" and run.info["error"] == "boom"
    again = RunDir.create(tmp_path / "r", IDENTITY, resume=True)
    assert again.info["status"] == "running" and again.info["error"] is None
    again.finish({"test_accuracy": 0.75}, wall_time_s=1.5)
    loaded = load_run(tmp_path / "r")
    assert loaded.status == "done" and loaded.final == {"test_accuracy": 0.75} and loaded.method == "eflat-lora"
    assert loaded.info["created"] <= loaded.info["updated"]


def test_the_keyword_form_of_the_identity_writes_the_same_run_json(tmp_path, monkeypatch):
    """``RunDir.create(out, method=, hparams=, data=, model=)`` (the older form) is the RunIdentity's run."""
    import flatlora.run_dir

    monkeypatch.setattr(flatlora.run_dir, "_now", lambda: "2024-01-01T00:00:00+00:00")
    RunDir.create(tmp_path / "a", IDENTITY)
    RunDir.create(tmp_path / "b", **CONFIG)
    assert (tmp_path / "a" / "run.json").read_bytes() == (tmp_path / "b" / "run.json").read_bytes()
    assert RunDir.check(tmp_path / "a", IDENTITY, resume=True) == RunDir.check(tmp_path / "a", resume=True, **CONFIG)
    assert RunDir.check(tmp_path / "c", IDENTITY) == "new"
    with pytest.raises(TypeError, match="not both"):
        RunDir.check(tmp_path / "c", IDENTITY, method="lora")
    with pytest.raises(TypeError):
        RunDir.create(tmp_path / "c", method="lora")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("setup", "kwargs", "match"),
    [
        ("done", {}, "finished: pass --overwrite"),
        ("done", {"resume": True}, "finished: pass --overwrite"),
        ("failed", {}, "pass --resume"),
        ("running", {}, "pass --resume"),
        ("other", {}, r"different run \(differs in hparams.rho\)"),
        ("other", {"resume": True}, "different run"),
        ("junk", {}, "holds no run"),
        ("not-an-object", {"resume": True}, "not an object"),
    ],
)
def test_refusals_write_nothing(tmp_path, setup, kwargs, match):
    folder = tmp_path / "r"
    if setup == "junk":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    elif setup == "not-an-object":
        folder.mkdir()
        (folder / "run.json").write_text("[]")
    else:
        run = RunDir.create(folder, IDENTITY)
        run.append_metrics({"step": 1, "loss": 0.5})
        if setup == "done":
            run.finish({})
        elif setup == "failed":
            run.fail("x")
    wanted = replace(IDENTITY, hparams={**CONFIG["hparams"], "rho": 0.1}) if setup == "other" else IDENTITY
    before = snapshot(folder)
    with pytest.raises(FlatLoraError, match=match):
        RunDir.create(folder, wanted, **kwargs)
    assert snapshot(folder) == before


def test_overwrite_replaces_any_folder(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    RunDir.create(folder, IDENTITY, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]
    done = RunDir.create(tmp_path / "done", IDENTITY)
    done.append_metrics({"step": 1})
    done.finish({"test_accuracy": 1.0})
    fresh = RunDir.create(done.path, IDENTITY, overwrite=True)
    assert fresh.info["status"] == "running" and fresh.info["metrics"] == {} and fresh.read_metrics() == []


def test_resume_keeps_the_logged_metrics(tmp_path):
    run = RunDir.create(tmp_path / "r", IDENTITY)
    run.append_metrics({"step": 1, "loss": 0.5})
    resumed = RunDir.create(
        tmp_path / "r", replace(IDENTITY, hparams=dict(reversed(CONFIG["hparams"].items()))), resume=True
    )
    assert resumed.info["status"] == "running" and resumed.read_metrics() == [{"step": 1, "loss": 0.5}]


def test_metrics_lines_nan_half_lines_and_truncation(tmp_path):
    run = RunDir.create(tmp_path / "r", IDENTITY)
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": torch.tensor(0.1 * step), "gap": float("nan")})
    with open(run.metrics_file, "a") as handle:
        handle.write('{"step": 4, "lo')  # a crash mid-line
    records = run.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["gap"] is None
    assert math.isclose(records[2]["loss"], 0.3, rel_tol=1e-6)
    run.truncate_metrics(2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_saved_adapter_holds_the_model_weights(tmp_path):
    model = tiny_model("bert")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    run = RunDir.create(tmp_path / "r", IDENTITY)
    target = run.save_adapter(model)
    saved = load_file(target / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert (run.save_adapter(model, step=7) / "adapter_config.json").exists()
    assert load_run(run.path).adapter_path == target


def test_list_runs_skips_broken_ones_and_filters(tmp_path):
    for name, status in [("a", "done"), ("b", "failed"), ("nested/c", "done")]:
        run = RunDir.create(tmp_path / name, IDENTITY)
        run.update(status=status)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    (tmp_path / "broken-list").mkdir()
    (tmp_path / "broken-list" / "run.json").write_text("[]")
    with pytest.warns(UserWarning, match="broken") as caught:
        runs = list_runs(tmp_path)
    assert sum("skipping" in str(w.message) for w in caught) == 2
    assert [r.path.relative_to(tmp_path).as_posix() for r in runs] == ["a", "b", "nested/c"]
    with pytest.warns(UserWarning):
        assert [r.path.name for r in list_runs(tmp_path, status="done")] == ["a", "c"]
    with pytest.raises(FlatLoraError, match="unknown run status"):
        list_runs(tmp_path, status="finished")


def test_latest_checkpoint_orders_by_number(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for n in (9, 10, 2):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_a_run_of_a_newer_format_is_refused_in_one_line_when_read(tmp_path):
    run = RunDir.create(tmp_path / "new", IDENTITY)
    RunDir.create(tmp_path / "old", IDENTITY)
    run.update(format=99)
    before = snapshot(run.path)
    with pytest.raises(FlatLoraError, match=r"run format 99.*newer.*upgrade flatlora") as info:
        load_run(run.path)
    assert "\n" not in str(info.value)
    with pytest.raises(FlatLoraError, match="upgrade flatlora"):
        RunDir.create(run.path, IDENTITY, resume=True)
    assert snapshot(run.path) == before
    with pytest.warns(UserWarning, match="upgrade flatlora"):
        assert [r.path.name for r in list_runs(tmp_path)] == ["old"]


def test_a_run_records_its_local_data_as_an_absolute_path(tmp_path, monkeypatch, capsys, csv_file, tiny_model_dir):
    """A relative --data is re-read from any working directory (the report, the dashboard, a study)."""
    import shutil
    from pathlib import Path

    from flatlora import cli
    from flatlora.experiment import TrainConfig
    from flatlora_analysis import ProbeSet

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(csv_file, work / "data" / "reviews.csv")
    monkeypatch.chdir(work)
    argv = ["train", "--data", "data/reviews.csv", "--model", tiny_model_dir, "--shots", "4", "--steps", "1",
            "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 0
    spec = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["spec"]
    assert spec == str((work / "data" / "reviews.csv").resolve())
    monkeypatch.chdir(tmp_path)
    assert ProbeSet.from_run(tmp_path / "run", "train", n=4, batch_size=4).n_examples == 4
    assert TrainConfig(data="tweets").data_spec()["spec"] == "tweets"  # names stay names
    assert TrainConfig(data="owner/no-such-dataset").data_spec()["spec"] == "owner/no-such-dataset"
    assert Path(spec).is_absolute()
    # a run recorded before paths were made absolute still matches its own config (here: finished, not different)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    info["data"]["spec"] = "data/reviews.csv"
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "holds this run, finished" in capsys.readouterr().err
