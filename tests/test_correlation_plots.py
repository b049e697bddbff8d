"""Sharpness-generalization correlation, and every figure builder (plotly and matplotlib)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from flatlora import FlatLoraError
from flatlora_analysis import correlate, correlation_table, granulated_kendall, plots
from flatlora_analysis.landscape import LandscapeResult


def grid_rows(measure_of, seed=0):
    """Runs on a full grid of method x rho x lr x seed with a gap that depends on every axis."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (method, rho, lr, s) in enumerate(
        itertools.product(["lora", "eflat-lora"], [0.01, 0.05, 0.1], [1e-3, 1e-2], [1, 2, 3])
    ):
        gap = 0.3 * (method == "lora") + rho + 5 * lr + 0.01 * s + 0.001 * rng.random()
        rows.append(
            {
                "name": f"run{i}",
                "method": method,
                "rho_train": rho,
                "lr": lr,
                "seed": s,
                "gap": gap,
                "test_accuracy": 0.9 - gap,
                "measure": measure_of(gap, rng),
            }
        )
    return rows


def test_kendall_and_spearman_equal_scipys():
    rows = grid_rows(lambda gap, rng: gap + rng.normal(0, 0.05))
    x = [r["measure"] for r in rows]
    y = [r["gap"] for r in rows]
    result = correlate(rows, "measure", "gap", n_resamples=100)
    assert result.kendall["value"] == stats.kendalltau(x, y).statistic
    assert result.spearman["value"] == stats.spearmanr(x, y).statistic
    assert result.n_runs == 36 and set(result.settings["axes"]) == {"method", "rho_train", "lr", "seed"}


def test_granulated_kendall_is_one_when_the_measure_is_the_gap_and_near_zero_for_noise():
    exact = correlate(grid_rows(lambda gap, rng: gap), "measure", "gap", n_resamples=50)
    assert exact.granulated["value"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in exact.granulated["per_axis"].values())
    assert exact.kendall["value"] == pytest.approx(1.0)
    noise = [
        correlate(grid_rows(lambda gap, rng: rng.random(), seed=s), "measure", "gap", n_resamples=0) for s in range(20)
    ]
    assert abs(np.mean([n.granulated["value"] for n in noise])) < 0.1


def test_granulated_kendall_by_hand_on_a_small_grid():
    hp = [{"method": m, "seed": s} for m in ("a", "b") for s in (1, 2)]
    measure = [1.0, 2.0, 3.0, 0.0]
    gap = [1.0, 2.0, 0.0, 3.0]
    psi, per_axis = granulated_kendall(measure, gap, hp, ["method", "seed"])
    # seed axis: groups a (1, 2 vs 1, 2: tau 1) and b (3, 0 vs 0, 3: tau -1) -> 0
    # method axis: groups seed1 (1, 3 vs 1, 0: -1) and seed2 (2, 0 vs 2, 3: -1) -> -1
    assert per_axis == {"seed": 0.0, "method": -1.0} and psi == -0.5


def test_confidence_intervals_contain_the_point_value():
    rows = grid_rows(lambda gap, rng: gap + rng.normal(0, 0.1))
    result = correlate(rows, "measure", "test_accuracy", n_resamples=300)
    for stat in (result.kendall, result.spearman, result.granulated):
        assert stat["low"] <= stat["value"] <= stat["high"]
    assert result.kendall["value"] < 0  # sharper -> less accurate, here by construction


def test_too_few_runs_is_refused_and_the_table_skips_them():
    rows = grid_rows(lambda gap, rng: gap)[:2]
    with pytest.raises(FlatLoraError, match="at least 3 runs"):
        correlate(rows, "measure", "gap")
    assert correlation_table(rows, ["measure"]) == []


# ----------------------------------------------------------------------------- figures


def quadratic_plane():
    x = np.linspace(-1, 1, 5)
    y = np.linspace(-2, 2, 7)  # not square, so a transposition cannot hide
    z = x[:, None] ** 2 + 10 * y[None, :] ** 2  # z[i, j] at (x[i], y[j])
    return LandscapeResult(
        "pca",
        x,
        z,
        0.0,
        y=y,
        trajectory=np.array([[0.5, 1.0], [0.0, 0.0]]),
        trajectory_steps=np.array([1.0, 2.0]),
        explained_variance=np.array([0.6, 0.3]),
    )


def test_2d_orientation_is_right_in_the_plotly_builder():
    r = quadratic_plane()
    fig = plots.landscape_2d_figure(r)
    surface, contour = fig.data[0], fig.data[1]
    for trace in (surface, contour):
        z = np.asarray(trace.z)
        for i, j in itertools.product(range(5), range(7)):
            # plotly draws z[row][col] at (x[col], y[row])
            assert z[j][i] == trace.x[i] ** 2 + 10 * trace.y[j] ** 2
    assert any(t.name == "trajectory" for t in fig.data)
    assert "PC1 (60.0% of variance)" in fig.layout.xaxis.title.text


def test_2d_orientation_is_right_in_the_matplotlib_builder():
    r = quadratic_plane()
    fig = plots.landscape_2d_png(r)
    ax = fig.axes[1]
    mesh = ax.collections[0]
    values = np.asarray(mesh.get_array()).reshape(7, 5)  # C[row, col] at (x[col], y[row])
    for i, j in itertools.product(range(5), range(7)):
        assert values[j, i] == r.x[i] ** 2 + 10 * r.y[j] ** 2
    offsets = mesh.get_coordinates() if hasattr(mesh, "get_coordinates") else None
    if offsets is not None:
        assert np.isclose(offsets[..., 0].max(), 1.0 + 0.25) and np.isclose(offsets[..., 1].max(), 2.0 + 1 / 3)


def _entries():
    sharp = [{"kind": "sam", "rho": 0.05, "value": v, "stderr": 0.0} for v in (0.1, 0.2)]
    eig = {"type": "EigenResult", "eigenvalues": [3.0], "hvps": 5, "converged": True}
    return [
        {
            "name": name,
            "method": name,
            "sharpness": [s],
            "hessian": {"top_eigenvalues": eig, "trace": {"trace": 1.0, "stderr": 0.1}},
            "history": [{"step": 1, "loss": 1.0, "realized_norm": 0.03, "rho": 0.05, "balancedness": 2.0}],
        }
        for name, s in zip(("lora", "eflat-lora"), sharp)
    ]


def test_every_builder_returns_the_expected_traces():
    from flatlora_analysis.ema_error import EmaErrorResult
    from flatlora_analysis.hessian import DensityResult, LayerCurvatureResult

    curve = LandscapeResult("1d", np.linspace(-1, 1, 5), np.arange(5.0), 2.0)
    one = plots.landscape_1d_figure({"lora": curve, "eflat": curve.to_dict()})
    assert [t.name for t in one.data if t.showlegend is not False] == ["lora", "eflat"]
    density = DensityResult(np.zeros((1, 3)), np.ones((1, 3)) / 3, np.linspace(-1, 1, 9), np.ones(9), 0.1, 3)
    assert len(plots.density_figure({"a": density, "b": density}).data) == 2
    layers = LayerCurvatureResult(["l1", "l2"], np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.zeros(2), 10)
    assert list(plots.layer_bars_figure({"a": layers}).data[0].y) == [1.0, 2.0]
    entries = _entries()
    assert len(plots.sharpness_bars_figure(entries).data) == 2
    assert len(plots.curvature_bars_figure(entries).data) == 4
    histories = {e["name"]: e["history"] for e in entries}
    assert len(plots.history_figure(histories, "loss").data) == 2
    realized = plots.realized_norm_figure(histories)
    assert "60% of rho" in realized.data[0].name and realized.data[1].line.dash == "dash"
    series = EmaErrorResult(
        np.array([1.0, 2.0]), np.array([0.5, 0.2]), np.array([0.8, 0.9]), np.zeros(2), np.zeros(2), np.zeros(2), "log"
    )
    assert len(plots.ema_error_figure({"eflat": series}).data) == 2
    rows = grid_rows(lambda gap, rng: gap)
    scatter = plots.correlation_scatter_figure(rows, "measure", "gap")
    assert scatter.layout.title.text == "gap vs measure" and len(scatter.data) == 2  # no statistic of its own
    computed = correlate(rows, "measure", "gap", n_resamples=0)
    for given in (computed, computed.to_dict()):
        scatter = plots.correlation_scatter_figure(rows, "measure", "gap", correlation=given)
        assert "Kendall tau = 1.00" in scatter.layout.title.text and "Psi = 1.00" in scatter.layout.title.text
    for fig in (
        plots.landscape_1d_png({"a": curve}),
        plots.density_png({"a": density}),
        plots.layer_bars_png({"a": layers}),
        plots.history_png(histories),
        plots.realized_norm_png(histories),
        plots.ema_error_png({"e": series}),
        plots.sharpness_bars_png(entries),
        plots.correlation_scatter_png(rows, "measure", "gap", correlation=computed),
    ):
        assert fig.axes and fig.axes[0].has_data()


def test_a_run_keeps_its_colour_whatever_order_a_figure_lists_the_runs_in():
    from flatlora_analysis.plots.figures import color_for

    order, other = ["lora", "flat-lora", "eflat-lora"], ["eflat-lora", "lora", "flat-lora"]
    assert [color_for(m, order) for m in other] == [color_for(m, other) for m in other]
    assert len({color_for(m, order) for m in order}) == 3
    rows = [{"name": m, "method": m, "sam": float(i), "test_accuracy": 0.5 + i / 10} for i, m in enumerate(order)]
    forward = plots.correlation_scatter_figure(rows, "sam")
    backward = plots.correlation_scatter_figure(rows[::-1], "sam")
    colours = lambda fig: {t.name: t.marker.color for t in fig.data}  # noqa: E731
    assert colours(forward) == colours(backward)
