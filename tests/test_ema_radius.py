"""EFlat-LoRA's radius-preserving variant (--ema-radius rho), the rotation diagnostics, and the EMA-norm law."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_bit_equal, trainable

from flatlora import FlatLoraError, cli, make_method
from flatlora.perturbation import realized_sq_norms
from flatlora.testing import tiny_batches, tiny_model
from flatlora.trainer import train_loop
from flatlora_analysis import ema_norm_ratio


def build(arch="bert", **kwargs):
    model = tiny_model(arch, seed=0)
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("total_steps", 8)
    return model, make_method("eflat-lora", model, **kwargs)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("norm", ["global", "layer"])
def test_rho_radius_applies_the_ema_at_radius_rho_and_keeps_it_unscaled(arch, norm):
    model, method = build(arch, rho=0.05, ema_radius="rho", norm=norm)
    logs = train_loop(model, method, tiny_batches(arch, 3, seed=1), 6)
    assert logs[0]["realized_norm"] == 0.0  # e_bar_0 = 0: nothing to rescale
    for r in logs[1:]:
        assert r["realized_norm"] == pytest.approx(
            0.05 * (len(method.pairs) ** 0.5 if norm == "layer" else 1), rel=1e-5
        )
        assert r["realized_ratio"] == pytest.approx(r["realized_norm"] / 0.05)
    emas = [method.ema(p) for p in method.pairs]  # the state: the plain EMA, smaller than its rescaled use
    applied = method._at_radius(emas, 0.05)
    sizes = realized_sq_norms([e.flatten(1) for e in applied], [p.a_matrix for p in method.pairs],
                              [p.scaling for p in method.pairs]).sqrt()  # fmt: skip
    raw = realized_sq_norms([e.flatten(1) for e in emas], [p.a_matrix for p in method.pairs],
                            [p.scaling for p in method.pairs]).sqrt()  # fmt: skip
    if norm == "layer":
        assert torch.allclose(sizes, torch.full_like(sizes, 0.05), rtol=1e-6)
    else:
        assert float(sizes.square().sum().sqrt()) == pytest.approx(0.05, rel=1e-6)
    assert float(raw.square().sum().sqrt()) < 0.05  # the EMA of turning directions is shorter than rho
    for e, a in zip(emas, applied):  # same direction
        cos = float((e.flatten() @ a.flatten()) / (e.norm() * a.norm()))
        assert cos == pytest.approx(1.0, abs=1e-6)


def test_the_paper_rule_stays_below_rho_and_logs_its_rotation():
    model, method = build(rho=0.05)
    logs = train_loop(model, method, tiny_batches("bert", 3, seed=1), 6)
    assert all(r["realized_norm"] < 0.05 for r in logs)
    assert "eps_rotation_cosine" not in logs[0] and all(-1 <= r["eps_rotation_cosine"] <= 1 for r in logs[1:])
    assert all(-1 <= r["ema_cosine"] <= 1 for r in logs[1:])


def test_rho_radius_with_rho_zero_is_lora_and_resumes_bit_identically():
    import io

    data = tiny_batches("bert", 3, seed=3)
    ref_model = tiny_model("bert", seed=0)
    ref = make_method("lora", ref_model, lr=1e-2, total_steps=8)
    train_loop(ref_model, ref, data, 8)
    model, method = build(rho=0.0, ema_radius="rho")
    train_loop(model, method, data, 8)
    assert_bit_equal(trainable(model), trainable(ref_model))

    full_model, full = build(rho=0.05, ema_radius="rho")
    full_logs = train_loop(full_model, full, data, 8)
    first_model, first = build(rho=0.05, ema_radius="rho")
    train_loop(first_model, first, data, 4)
    buffer = io.BytesIO()
    torch.save({"model": trainable(first_model), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed = build(rho=0.05, ema_radius="rho")
    resumed_model.load_state_dict(saved["model"], strict=False)
    resumed.load_state_dict(saved["optimizer"])
    rest = data[4 % len(data) :] + data[: 4 % len(data)]
    resumed_logs = train_loop(resumed_model, resumed, rest, 4)
    assert [r["loss"] for r in resumed_logs] == [r["loss"] for r in full_logs[4:]]
    assert [r["eps_rotation_cosine"] for r in resumed_logs] == [r["eps_rotation_cosine"] for r in full_logs[4:]]
    assert_bit_equal(trainable(resumed_model), trainable(full_model))


def test_unknown_or_misplaced_ema_radius_is_refused(tmp_path, csv_file, tiny_model_dir, capsys):
    with pytest.raises(FlatLoraError, match="ema_radius"):
        build(ema_radius="unit")
    argv = ["train", "--method", "lora", "--ema-radius", "rho", "--data", str(csv_file), "--model", tiny_model_dir,
            "--shots", "4", "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--ema-radius applies to eflat-lora" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_default_rule_keeps_old_run_identities_and_rho_is_recorded(tmp_path, csv_file, tiny_model_dir):
    from flatlora.experiment import TrainConfig

    assert "ema_radius" not in TrainConfig(method="eflat-lora").hparams()
    assert TrainConfig(method="eflat-lora", ema_radius="rho").hparams()["ema_radius"] == "rho"
    argv = ["train", "--method", "eflat-lora", "--ema-radius", "rho", "--rho", "0.05", "--data", str(csv_file),
            "--model", tiny_model_dir, "--shots", "4", "--steps", "12", "--log-every", "2", "--batch-size", "4",
            "--no-progress", "--out", str(tmp_path / "r")]  # fmt: skip
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("phase") == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    for r in train[1:]:  # every logged step after the first (which averages in step 1's zero EMA)
        assert r["realized_norm"] == pytest.approx(0.05, rel=1e-2)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["hparams"]["ema_radius"] == "rho"


def test_ema_norm_ratio_closed_form_against_its_sum_and_a_simulation():
    for beta in (0.0, 0.5, 0.9, 0.99):
        assert ema_norm_ratio(beta, 1.0) == pytest.approx(1.0)
        assert ema_norm_ratio(beta, 0.0) == pytest.approx(np.sqrt((1 - beta) / (1 + beta)))
        for c in (-0.5, 0.3, 0.9):  # the t-step sum converges to the stationary form (its gap shrinks as beta^t)
            assert ema_norm_ratio(beta, c, steps=400 if beta < 0.99 else 2500) == pytest.approx(
                ema_norm_ratio(beta, c), rel=1e-6
            )
    assert ema_norm_ratio(0.9, 0.0, steps=1) == pytest.approx(0.1)
    # Unit directions with lag-k correlation c^k (a normalized AR(1) walk in high dimension).
    rng = np.random.default_rng(0)
    beta, c, dim, steps = 0.9, 0.6, 4000, 400
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    ema, norms = np.zeros(dim), []
    for _ in range(steps):
        z = rng.standard_normal(dim)
        u = c * u + np.sqrt(1 - c * c) * z / np.linalg.norm(z)
        u /= np.linalg.norm(u)
        ema = beta * ema + (1 - beta) * u
        norms.append(np.linalg.norm(ema))
    assert np.mean(norms[100:]) == pytest.approx(ema_norm_ratio(beta, c), rel=0.03)
    with pytest.raises(FlatLoraError):
        ema_norm_ratio(1.0, 0.5)


def test_the_theorem2_study_script_runs_its_grid_and_tabulates_it(tmp_path, csv_file, tiny_model_dir, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "theorem2_study.py"
    spec = importlib.util.spec_from_file_location("theorem2_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = ["--data", str(csv_file), "--model", tiny_model_dir, "--seeds", "1", "--betas", "0.9", "--steps", "4",
            "--shots", "4", "--batch-size", "4", "--test-cap", "none", "--out", str(tmp_path / "study")]  # fmt: skip
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    for cell in ("lora", "flat-lora", "eflat-b0.9-ema", "eflat-b0.9-rho"):
        assert f"| {cell} | 1 |" in printed
    rows = {r["cell"]: r for r in json.loads((tmp_path / "study" / "study.json").read_text())["rows"]}
    assert rows["eflat-b0.9-rho"]["realized_ratio"] == pytest.approx(1.0, rel=1e-3)  # the radius kept
    assert rows["eflat-b0.9-ema"]["realized_ratio"] < 1.0 and rows["lora"]["realized_ratio"] is None
    assert 0 < rows["eflat-b0.9-ema"]["predicted_ratio"] <= 1
    for row in rows.values():  # every run measured by the report, the literature's measures included
        assert row["lambda_max"] is not None and row["relative_flatness"] > 0 and row["pac_bayes_flatness"] > 0
    assert rows["eflat-b0.9-ema"]["ema_rel_error_checkpoint"] >= 0 and rows["lora"]["ema_rel_error_checkpoint"] is None
    assert "| eflat-b0.9-rho |" in printed.split("PAC-Bayes")[1]  # the measures table
    for png in ("realized_ratio.png", "beta_sweep.png"):
        assert (tmp_path / "study" / png).read_bytes()[:4] == b"\x89PNG"
    assert study.main(argv) == 0  # finished runs are reused
    assert capsys.readouterr().err == ""


def test_prediction_lines_scale_the_ema_share_by_the_seeds_beta_zero_run():
    from flatlora_analysis import plots
    from flatlora_analysis.plots.study import prediction_lines

    def row(beta, seed, realized, predicted, radius="ema"):
        return {"method": "eflat-lora", "ema_radius": radius, "beta": beta, "seed": seed,
                "realized_ratio": realized, "predicted_ratio": predicted}  # fmt: skip

    rows = [row(0.0, 1, 0.8, 1.0), row(0.0, 2, 0.6, 1.0), row(0.9, 1, 0.4, 0.3), row(0.9, 2, 0.2, 0.5),
            row(0.9, 1, 1.0, 0.3, "rho"), {"method": "lora", "seed": 1, "test_loss": 1.0}]  # fmt: skip
    lines = prediction_lines(rows)
    betas, measured, spread = lines["measured"]
    assert (
        list(betas) == [0.0, 0.9]
        and measured == pytest.approx([0.7, 0.3])
        and spread[1] == pytest.approx(0.1414, abs=1e-4)
    )
    assert lines["predicted"][1] == pytest.approx([0.7, (0.3 * 0.8 + 0.5 * 0.6) / 2])  # the rho rows left out
    fig = plots.prediction_figure({"a": rows, "b": rows})
    assert [t.name for t in fig.data] == ["measured", "predicted"] * 2
    assert list(fig.data[1].y) == pytest.approx(list(lines["predicted"][1]))
    assert len(plots.prediction_png({"a": rows}).axes) == 1
