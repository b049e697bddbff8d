"""Figures of the Theorem-2 study, plotly and matplotlib twins: the realized radius per method, and the beta sweep.

- ``realized_ratio_*``: realized perturbation norm / rho over training, one line per group of
  runs (a method, or eflat-lora at one beta and ema_radius), the median over the group's runs
  with the band between their quartiles; 1 is the radius asked for.
- ``beta_sweep_*``: test accuracy and test loss (mean +- std over seeds) against EFlat-LoRA's
  beta, one line per ema_radius, with LoRA and Flat-LoRA as horizontal references.
- ``prediction_*``: does rotation explain the shrinkage? The paper's rule's realized norm / rho
  against beta, measured, beside the prediction ``ema_norm_ratio(beta, c)`` (c: the run's
  median rotation cosine) times what the exact perturbation itself realizes (the beta = 0
  run of the same seed), mean +- std over seeds; one panel per data set.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from flatlora_analysis.plots.style import apply_layout, color_for

Histories = Sequence[Sequence[dict[str, Any]]]


def ratio_bands(runs: Histories) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, median, 25th, 75th percentile) of realized_norm / rho over the runs, at each logged step.

    A record's ratio is its ``realized_ratio``, or ``realized_norm / rho`` in logs that predate it.
    """
    by_step: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            ratio = r.get("realized_ratio")
            if ratio is None and r.get("realized_norm") is not None and r.get("rho"):
                ratio = r["realized_norm"] / r["rho"]
            if ratio is not None and "step" in r and r.get("phase", "train") == "train":
                by_step.setdefault(int(r["step"]), []).append(float(ratio))
    steps = np.array(sorted(by_step), dtype=float)
    values = [np.asarray(by_step[int(s)]) for s in steps]
    median = np.array([np.median(v) for v in values])
    low = np.array([np.percentile(v, 25) for v in values])
    high = np.array([np.percentile(v, 75) for v in values])
    return steps, median, low, high


def realized_ratio_figure(
    groups: Mapping[str, Histories], title: str = "Realized perturbation norm / rho over training"
) -> go.Figure:
    """One median line (and quartile band) per group; the dotted line at 1 is the radius asked for."""
    fig = go.Figure()
    labels = list(groups)
    for label, runs in groups.items():
        steps, median, low, high = ratio_bands(runs)
        if not len(steps):
            continue
        color = color_for(label, labels)
        fig.add_trace(go.Scatter(x=steps, y=high, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_trace(
            go.Scatter(
                x=steps, y=low, mode="lines", line={"width": 0}, fill="tonexty", fillcolor=_rgba(color, 0.2),
                showlegend=False, hoverinfo="skip",
            )
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=steps, y=median, mode="lines", line={"color": color},
                name=f"{label} (median {np.median(median):.2f}, {len(runs)} runs)",
                hovertemplate="step %{x}<br>realized / rho %{y:.3f}",
            )
        )  # fmt: skip
    fig.add_hline(y=1.0, line_dash="dot", line_color="#555")
    return apply_layout(fig, title, "step", "realized norm / rho")


def realized_ratio_png(groups: Mapping[str, Histories], title: str = "Realized perturbation norm / rho") -> Figure:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    labels = list(groups)
    for label, runs in groups.items():
        steps, median, low, high = ratio_bands(runs)
        if not len(steps):
            continue
        color = color_for(label, labels)
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        ax.plot(steps, median, color=color, label=f"{label} (median {np.median(median):.2f})")
    ax.axhline(1.0, ls=":", color="#555")
    ax.set(title=title, xlabel="step", ylabel="realized norm / rho", ylim=(0, None))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def sweep_lines(rows: Sequence[dict[str, Any]], key: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({ema_radius: (betas, means, stds)}, {reference method: (mean, std)}) of ``key`` over study rows."""
    lines: dict[str, tuple] = {}
    for radius in sorted({r["ema_radius"] for r in rows if r.get("method") == "eflat-lora"}):
        mine = [r for r in rows if r.get("method") == "eflat-lora" and r["ema_radius"] == radius]
        betas = sorted({r["beta"] for r in mine})
        stats = [_mean_std([r.get(key) for r in mine if r["beta"] == b]) for b in betas]
        lines[radius] = (np.array(betas), np.array([s[0] for s in stats]), np.array([s[1] for s in stats]))
    refs = {
        m: _mean_std([r.get(key) for r in rows if r.get("method") == m])
        for m in ("lora", "flat-lora")
        if any(r.get("method") == m for r in rows)
    }
    return lines, refs


SWEEP_KEYS = (("test_accuracy", "test accuracy"), ("test_loss", "test loss"))


def beta_sweep_figure(rows: Sequence[dict[str, Any]], title: str = "EFlat-LoRA against beta") -> go.Figure:
    """Test accuracy and loss against beta per ema_radius (error bars: std over seeds); references dashed."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[t for _, t in SWEEP_KEYS])
    names = ["lora", "flat-lora", "ema", "rho"]
    for col, (key, _) in enumerate(SWEEP_KEYS, start=1):
        lines, refs = sweep_lines(rows, key)
        for radius, (betas, means, stds) in lines.items():
            fig.add_trace(
                go.Scatter(
                    x=betas, y=means, error_y={"type": "data", "array": stds}, mode="lines+markers",
                    name=f"eflat-lora, ema_radius={radius}", legendgroup=radius, showlegend=col == 1,
                    line={"color": color_for(radius, names)},
                ),
                row=1, col=col,
            )  # fmt: skip
        for method, (mean, _) in refs.items():
            fig.add_hline(y=mean, line_dash="dash", line_color=color_for(method, names), row=1, col=col)
            fig.add_trace(
                go.Scatter(x=[None], y=[None], mode="lines", name=method, showlegend=col == 1,
                           line={"color": color_for(method, names), "dash": "dash"}),
                row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="beta", row=1, col=col)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def beta_sweep_png(rows: Sequence[dict[str, Any]], title: str = "EFlat-LoRA against beta") -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    names = ["lora", "flat-lora", "ema", "rho"]
    for i, (key, label) in enumerate(SWEEP_KEYS):
        ax = fig.add_subplot(1, 2, i + 1)
        lines, refs = sweep_lines(rows, key)
        for radius, (betas, means, stds) in lines.items():
            ax.errorbar(betas, means, yerr=stds, marker="o", capsize=3, color=color_for(radius, names),
                        label=f"eflat-lora, ema_radius={radius}")  # fmt: skip
        for method, (mean, std) in refs.items():
            ax.axhline(mean, ls="--", color=color_for(method, names), label=f"{method} ({mean:.4g} ± {std:.2g})")
        ax.set(title=label, xlabel="beta")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def prediction_lines(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"measured" | "predicted": (betas, means, stds)} of the paper's rule's realized norm / rho over study rows.

    Predicted, per run: ``predicted_ratio`` (the EMA's share of ||eps_B|| for lag-k cosines c^k)
    times the realized ratio of the beta = 0 run of its seed (eps_B's own share of rho).
    """
    ema = [r for r in rows if r.get("method") == "eflat-lora" and r.get("ema_radius") == "ema"]
    base = {r["seed"]: r.get("realized_ratio") for r in ema if r["beta"] == 0}
    betas = sorted({r["beta"] for r in ema})
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name in ("measured", "predicted"):
        stats = []
        for b in betas:
            mine = [r for r in ema if r["beta"] == b]
            if name == "measured":
                values = [r.get("realized_ratio") for r in mine]
            else:
                values = [
                    r["predicted_ratio"] * base[r["seed"]]
                    if r.get("predicted_ratio") is not None and base.get(r["seed"]) is not None
                    else None
                    for r in mine
                ]
            stats.append(_mean_std(values))
        out[name] = (np.array(betas), np.array([m for m, _ in stats]), np.array([d for _, d in stats]))
    return out


def prediction_figure(
    sets: Mapping[str, Sequence[dict[str, Any]]], title: str = "Does rotation explain the shrinkage?"
):
    """One panel per data set: measured and predicted realized norm / rho of the paper's rule against beta."""
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=list(sets))
    for col, rows in enumerate(sets.values(), start=1):
        for name, (betas, means, stds) in prediction_lines(rows).items():
            fig.add_trace(
                go.Scatter(x=betas, y=means, error_y={"type": "data", "array": stds}, mode="lines+markers",
                           name=name, legendgroup=name, showlegend=col == 1,
                           line={"color": color_for(name, ["measured", "predicted"]),
                                 "dash": "dot" if name == "predicted" else "solid"}),
                row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="beta", row=1, col=col)
    fig.update_yaxes(title_text="realized norm / rho", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def prediction_png(sets: Mapping[str, Sequence[dict[str, Any]]], title: str = "Does rotation explain the shrinkage?"):
    fig = Figure(figsize=(5 * len(sets), 4), layout="constrained")
    for i, (label, rows) in enumerate(sets.items()):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for name, (betas, means, stds) in prediction_lines(rows).items():
            ax.errorbar(betas, means, yerr=stds, marker="o", capsize=3, label=name,
                        linestyle=":" if name == "predicted" else "-",
                        color=color_for(name, ["measured", "predicted"]))  # fmt: skip
        ax.set_title(label)
        ax.set_xlabel("beta")
        ax.set_ylabel("realized norm / rho")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig
