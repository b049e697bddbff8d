"""The command line end to end on a tiny model: train, sweep (with a kill and a resume), errors."""

from __future__ import annotations

import json

import pytest
from helpers import snapshot

from flatlora import cli
from flatlora.runs import list_runs, load_run


def base_args(csv_file, model_dir, out, *extra):
    return [
        "--data",
        str(csv_file),
        "--model",
        str(model_dir),
        "--shots",
        "4",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_train_writes_a_complete_run_directory(tmp_path, csv_file, tiny_model_dir):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--method",
            "eflat-lora",
            "--rho",
            "0.1",
            "--trajectory-every",
            "2",
            *base_args(csv_file, tiny_model_dir, out),
        ]
    )
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["method"] == "eflat-lora"
    assert info["hparams"]["rho"] == 0.1 and info["hparams"]["steps"] == 4 and info["hparams"]["r"] == 8
    assert info["data"]["shots"] == 4 and info["model"] == str(tiny_model_dir)
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert 0 <= info["metrics"][key] < 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all("rho" in r and "eps_b_norm" in r for r in records if "loss" in r)
    assert any("test_accuracy" in r for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "trajectory").iterdir()) == ["step-2", "step-4"]
    run = load_run(out)
    assert run.final["test_accuracy"] == info["metrics"]["test_accuracy"]


def test_the_session_runs_of_three_methods_are_complete(tiny_runs_source):
    """lora, eflat-lora and flat-lora through the CLI: the shared session runs every report test reads."""
    for method in ("lora", "eflat-lora", "flat-lora"):
        info = json.loads((tiny_runs_source / f"{method}-seed1" / "run.json").read_text())
        assert info["status"] == "done" and info["method"] == method and info["hparams"]["steps"] == 6
        assert 0 <= info["metrics"]["test_accuracy"] <= 1 and info["metrics"]["test_loss"] > 0


@pytest.mark.parametrize("method", ["lora-sam", "rwp-lora", "bar"])
def test_the_other_methods_train_a_classifier_through_the_cli(tmp_path, csv_file, tiny_model_dir, method):
    """One tiny CLI run of each method the session runs do not train (together: all six)."""
    out = tmp_path / "run"
    assert cli.main(["train", "--method", method, "--rho", "0.05", *base_args(csv_file, tiny_model_dir, out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["method"] == method and info["hparams"]["rho"] == 0.05
    assert 0 <= info["metrics"]["test_accuracy"] <= 1 and info["metrics"]["test_loss"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_sweep_resumes_after_a_kill_without_redoing_finished_runs(tmp_path, csv_file, tiny_model_dir, monkeypatch):
    from flatlora.trainer import FlatLoraTrainer

    out = tmp_path / "sweep"
    argv = ["sweep", "--methods", "lora,eflat-lora", "--seeds", "1,2", *base_args(csv_file, tiny_model_dir, out)]
    original = FlatLoraTrainer.training_step
    calls = {"n": 0}

    def killed_in_third_run(self, *args, **kwargs):
        # runs are ordered lora-seed1, lora-seed2, eflat-seed1, ...: die at step 3 of the third
        if self.method_name == "eflat-lora" and self.state.global_step == 3:
            calls["n"] += 1
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlatLoraTrainer, "training_step", killed_in_third_run)
    assert cli.main(argv) == 130
    monkeypatch.setattr(FlatLoraTrainer, "training_step", original)
    finished = {r.path.name: (r.path / "run.json").read_bytes() for r in list_runs(out, status="done")}
    assert sorted(finished) == ["lora-lr0.001-seed1", "lora-lr0.001-seed2"]
    killed = load_run(out / "eflat-lora-rho0.05-lr0.001-seed1")
    assert killed.status == "failed" and (killed.path / "checkpoint" / "checkpoint-2").is_dir()

    assert cli.main(argv) == 0
    runs = list_runs(out)
    assert len(runs) == 4 and all(r.status == "done" for r in runs)
    for name, content in finished.items():  # not redone
        assert (out / name / "run.json").read_bytes() == content
    resumed = load_run(out / "eflat-lora-rho0.05-lr0.001-seed1")
    steps = [m["step"] for m in resumed.metrics if "loss" in m]
    assert steps == [1, 2, 3, 4]  # the killed step 3 is not logged twice


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--method": "adam-sam"}, "unknown method"),
        ({"--data": "imdb-reviews"}, "unknown data"),
        ({"--data": "missing.csv"}, "not found"),
        ({"--label-column": "stars"}, "stars"),
        ({"--shots": "100"}, "k=100"),
        ({"--model": "no/such-model-here"}, "cannot load model"),
        ({"--model": "/no/such/folder"}, "cannot load model"),
        ({"--rho": "-1"}, "rho must be >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, csv_file, tiny_model_dir, capsys, change, match):
    out = tmp_path / "run"
    args = base_args(csv_file, tiny_model_dir, out)
    args = ["train", "--method", "flat-lora", *args]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if change.get("--data") == "missing.csv":
        args[args.index("--data") + 1] = str(tmp_path / "missing.csv")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatlora: error:") and "\n" not in err
    assert match in err
    assert not out.exists()


def test_an_output_folder_holding_another_run_is_refused(tmp_path, csv_file, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "lora", *base_args(csv_file, tiny_model_dir, out)]) == 0
    before = snapshot(out)
    assert cli.main(["train", "--method", "flat-lora", *base_args(csv_file, tiny_model_dir, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err
    assert snapshot(out) == before
    assert cli.main(["train", "--method", "lora", *base_args(csv_file, tiny_model_dir, out)]) == 2
    assert snapshot(out) == before


def test_help_reads_well(capsys):
    for argv in (["--help"], ["train", "--help"], ["sweep", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "eflat-lora" in text and "--resume" in text and "--seeds" in text


def test_demo_reuses_only_runs_of_the_same_settings(tmp_path, monkeypatch, capsys):
    import flatlora.experiment as experiment

    calls = []

    def fake_train_run(config, out, **kwargs):
        calls.append((config.method, config.shots))
        from flatlora.runs import RunDir

        run = RunDir.create(
            out,
            method=config.method,
            hparams=config.hparams(),
            data={**config.data_spec(), "sizes": {}},
            model="m",
            overwrite=True,
        )
        run.finish({"test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 0.5}, wall_time_s=1.0)
        return load_run(out)

    monkeypatch.setattr(experiment, "train_run", fake_train_run)
    argv = ["demo", "--out", str(tmp_path), "--methods", "lora", "eflat-lora", "--no-progress", "--no-report"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # reused
    assert cli.main([*argv, "--shots", "8"]) == 0  # other data: retrained
    assert calls == [("lora", 16), ("eflat-lora", 16), ("lora", 8), ("eflat-lora", 8)]
    assert "| eflat-lora |          50.0 |" in capsys.readouterr().out


def test_fp16_trains_on_cpu_or_is_refused_in_one_line_before_anything_is_written(
    tmp_path, csv_file, tiny_model_dir, capsys, monkeypatch
):
    import flatlora.precision

    out = tmp_path / "run"
    argv = ["train", "--method", "flat-lora", "--precision", "fp16", *base_args(csv_file, tiny_model_dir, out)]
    assert cli.main(argv) == 0
    assert load_run(out).status == "done" and load_run(out).hparams["precision"] == "fp16"
    monkeypatch.setattr(flatlora.precision, "cpu_fp16_autocast_available", lambda: False)
    other = tmp_path / "refused"
    assert cli.main([*argv[:-1], str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatlora: error: --precision fp16") and "\n" not in err and "bf16" in err
    assert not other.exists()


def test_progress_is_a_plain_line_per_log_when_stderr_is_not_a_terminal(tmp_path, csv_file, tiny_model_dir, capsys):
    from flatlora import make_method
    from flatlora.testing import tiny_batches, tiny_model
    from flatlora.trainer import train_loop

    args = [a for a in base_args(csv_file, tiny_model_dir, tmp_path / "run") if a != "--no-progress"]
    assert cli.main(["train", "--method", "flat-lora", *args]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [line for line in err.splitlines() if ": step " in line and " loss " in line]
    assert [line.split()[2] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert any("test_accuracy" in line for line in err.splitlines())

    model = tiny_model("bert")
    train_loop(model, make_method("lora", model), tiny_batches("bert", 2), 20, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and [line.split()[2] for line in err.splitlines()] == [f"{k}/20" for k in range(2, 21, 2)]
