"""Loss landscapes: the ANALYSIS.md checks, interpolation, the CLI, torchrun, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_fixtures import TinyClassifier, assert_same_state, lora_wrap, model_state, train_tiny_runs
from analysis_fixtures import write_reviews_csv as write_csv
from helpers import copy_tree

from flatlora import cli
from flatlora.testing import save_tiny_text_model, tiny_batches, tiny_model
from flatlora_analysis import (
    ProbeSet,
    build_space,
    evaluate_loss,
    hessian_operator,
    interpolate,
    landscape_1d,
    landscape_2d,
)
from flatlora_analysis.landscape import LandscapeResult, filter_normalize, random_directions
from flatlora_analysis.loading import load_model


def classifier_probe(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return ProbeSet.from_batches([{"x": x[:16], "labels": y[:16]}, {"x": x[16:], "labels": y[16:]}])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runs_source):
    """A writable copy of the session's tiny runs (landscapes are stored inside a run)."""
    return copy_tree(tiny_runs_source, tmp_path_factory.mktemp("landscape-runs") / "runs")


@pytest.mark.parametrize("space", ["merged", "lora", "b", "all"])
def test_origin_value_equals_the_clean_loss_exactly_and_the_model_is_untouched(space):
    model = lora_wrap(TinyClassifier(6, 5, 3))
    model.train()
    before = model_state(model)
    probe = classifier_probe()
    one = landscape_1d(model, probe, steps=7, span=0.5, space=space)
    two = landscape_2d(model, probe, steps=5, span=0.5, space=space)
    assert one.x[3] == 0.0 and one.z[3] == one.clean_loss
    assert two.z[2, 2] == two.clean_loss == one.clean_loss
    assert one.clean_loss == evaluate_loss(model, probe)
    assert np.array_equal(one.x, -one.x[::-1])  # symmetric
    assert_same_state(before, model_state(model))


def test_filter_normalized_rows_match_the_weight_row_norms_and_1d_tensors_are_zeroed():
    model = tiny_model("gpt2")  # merged offsets of Conv1D weights: rows are columns of the stored matrix
    space = build_space(model, "merged")
    [d] = random_directions(space, seed=3, count=1)
    for entry, direction in zip(space.entries, d):
        rows = entry.row_dim
        np.testing.assert_allclose(
            direction.norm(dim=1 - rows).numpy(), entry.value.norm(dim=1 - rows).numpy(), rtol=1e-5
        )
    everything = build_space(model, "all")
    [d_all] = random_directions(everything, seed=3, count=1)
    assert all(torch.count_nonzero(t) == 0 for t, e in zip(d_all, everything.entries) if e.value.dim() == 1)
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(filter_normalize(torch.ones(2, 2), w).norm(dim=1).numpy(), [5.0, 0.0])


def test_same_seed_same_directions_other_seed_other_directions():
    space = build_space(tiny_model("bert"), "merged")
    a, b = random_directions(space, seed=1), random_directions(space, seed=1)
    c = random_directions(space, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not torch.equal(a[0][0], c[0][0])


def test_second_difference_at_zero_matches_d_h_d_from_the_hvp_engine():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    space = build_space(model, "merged")
    [d] = random_directions(space, seed=5, count=1)
    h = 1e-3
    curve = landscape_1d(model, probe, steps=3, span=h, direction=d)
    second = (curve.z[2] - 2 * curve.z[1] + curve.z[0]) / h**2
    with hessian_operator(model, probe, "merged") as op:
        v = space.flatten(d)
        dhd = float(v @ op.matvec(v))
    assert second == pytest.approx(dhd, rel=1e-5)


def test_lora_rescaling_leaves_a_merged_space_landscape_unchanged():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    before = landscape_2d(model, probe, steps=5, span=0.3)
    with torch.no_grad():
        layer = model.base_model.model.lin
        layer.lora_A["default"].weight.mul_(8.0)
        layer.lora_B["default"].weight.div_(8.0)
    after = landscape_2d(model, probe, steps=5, span=0.3)
    np.testing.assert_allclose(after.z, before.z, rtol=1e-12)
    assert before.meta["cosine"] == after.meta["cosine"] and abs(before.meta["cosine"]) < 0.5


def test_interpolation_hits_each_adapters_own_loss_at_its_end_points(runs):
    a, b = runs / "lora-seed1", runs / "eflat-lora-seed1"
    model_a, _ = load_model(a, device="cpu")
    model_b, _ = load_model(b, device="cpu")
    probe = ProbeSet.from_run(a, "train")
    line = interpolate(model_a, probe, b / "adapter", steps=4, extend=0.25)
    assert list(line.x) == [-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert line.z[1] == pytest.approx(evaluate_loss(model_a, probe), rel=1e-6)
    assert line.z[5] == pytest.approx(evaluate_loss(model_b, probe), rel=1e-5)
    base_line = interpolate(model_a, probe, None, steps=2, extend=0.0)
    with model_a.disable_adapter():
        base_loss = evaluate_loss(model_a, probe, space="all")
    assert base_line.z[0] == pytest.approx(base_loss, rel=1e-5)
    assert base_line.z[-1] == pytest.approx(evaluate_loss(model_a, probe), rel=1e-5)


def test_pca_plane_projects_the_saved_trajectory(runs):
    run = runs / "eflat-lora-seed1"
    model, _ = load_model(run, device="cpu")
    probe = ProbeSet.from_run(run, "train", n=6)
    plane = landscape_2d(model, probe, steps=5, pca=run)
    assert plane.kind == "pca" and list(plane.trajectory_steps) == [2, 4, 6]
    assert plane.trajectory.shape == (3, 2)
    np.testing.assert_allclose(plane.trajectory[-1], [0.0, 0.0], atol=1e-9)  # the last step is the adapter
    assert 0 < plane.explained_variance.sum() <= 1 + 1e-12
    assert plane.settings["span"] == pytest.approx(1.2 * np.abs(plane.trajectory).max())


def test_results_round_trip_through_the_store(tmp_path):
    from flatlora_analysis.store import ResultStore, cached, result_key

    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()
    result = landscape_2d(model, probe, steps=3, span=0.1)
    settings = {"steps": 3, "span": 0.1}
    again, reused, _ = cached([tmp_path], "adapter", probe.fingerprint(), "landscape_2d", settings, lambda: result)
    assert not reused and again is result
    again, reused, _ = cached([tmp_path], "adapter", probe.fingerprint(), "landscape_2d", settings, lambda: 1 / 0)
    assert reused and isinstance(again, LandscapeResult)
    np.testing.assert_array_equal(again.z, result.z)
    assert again.settings == json.loads(json.dumps(result.settings))
    # another setting, probe or adapter is another key: never the stored result
    key = result_key("adapter", probe.fingerprint(), "landscape_2d", settings)
    for other in (
        result_key("adapter", probe.fingerprint(), "landscape_2d", {**settings, "span": 0.2}),
        result_key("adapter", "another-probe", "landscape_2d", settings),
        result_key("another", probe.fingerprint(), "landscape_2d", settings),
    ):
        assert other != key and ResultStore(tmp_path).get(other) is None
    # a file of the store's older format under the same name is recomputed, never read
    store = ResultStore(tmp_path / "old")
    store.folder.mkdir()
    store.path(key).write_text(json.dumps({"parts": {}, "result": result.to_dict()}))
    assert store.get(key) is None
    _, reused, _ = cached([store], "adapter", probe.fingerprint(), "landscape_2d", settings, lambda: result)
    assert not reused and json.loads(store.path(key).read_text())["format"] == 2


def test_cli_saves_and_reuses_landscapes(runs, capsys):
    run = runs / "lora-seed1"
    argv = ["landscape", str(run), "--2d", "--steps", "3", "--examples", "6", "--no-progress"]
    assert cli.main(argv) == 0
    assert "computed" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert len(list((run / "analysis").glob("result-*.json"))) == 1


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    other_root = tmp_path / "other"
    wide = save_tiny_text_model(other_root / "wide-bert", seed=1)
    config = json.loads((Path(wide) / "config.json").read_text())
    from transformers import BertConfig, BertForSequenceClassification

    config.update(hidden_size=48, intermediate_size=96)
    BertForSequenceClassification(
        BertConfig(**{k: v for k, v in config.items() if k != "architectures"})
    ).save_pretrained(wide)
    other = train_tiny_runs(other_root / "runs", write_csv(other_root / "r.csv"), wide, methods=("lora",))
    run = tmp_path / "copy"
    shutil.copytree(runs / "lora-seed1", run, ignore=shutil.ignore_patterns("analysis", "trajectory"))
    cases = [
        (["--between", str(other / "lora-seed1")], "does not match"),
        (["--pca"], "no saved trajectory"),
        (["--steps", "1"], "steps must be"),
        (["--span", "0"], "span must be"),
        (["--span", "-1", "--2d"], "span must be"),
    ]
    for extra, match in cases:
        assert cli.main(["landscape", str(run), *extra, "--no-progress"]) == 2, match
        err = capsys.readouterr().err.strip()
        assert err.startswith("flatlora: error:") and "\n" not in err and match in err, err
        assert not (run / "analysis").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_a_two_rank_torchrun_grid_equals_the_one_process_grid_bit_for_bit(runs, tmp_path):
    bindir = Path(sys.executable).parent
    torchrun, flatlora = shutil.which("torchrun", path=str(bindir)), shutil.which("flatlora", path=str(bindir))
    assert torchrun and flatlora
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    grids = {}
    for name, prefix in (("one", []), ("two", [torchrun, "--standalone", "--nproc_per_node=2", "--no-python"])):
        run = tmp_path / name
        shutil.copytree(runs / "lora-seed1", run)
        shutil.rmtree(run / "analysis", ignore_errors=True)
        cmd = [*prefix, flatlora, "landscape", str(run), "--2d", "--steps", "5", "--examples", "6", "--no-progress"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("landscape computed") == 1  # rank 0 alone reports and writes
        [stored] = (run / "analysis").glob("result-*.json")
        grids[name] = np.asarray(json.loads(stored.read_text())["result"]["z"])
    assert np.array_equal(grids["one"], grids["two"])


def test_tiny_archs_have_landscapes():
    for arch in ("gpt2", "vit", "llama"):
        model = tiny_model(arch)
        probe = ProbeSet.from_batches(tiny_batches(arch, 1, 3))
        result = landscape_2d(model, probe, steps=3, span=0.2)
        assert result.z.shape == (3, 3) and result.z[1, 1] == result.clean_loss
