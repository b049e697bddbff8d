"""matplotlib twins of the plotly builders, for PNG files (README figures, papers, offline use).

Each returns a ``matplotlib.figure.Figure`` built without pyplot (no global state); save it
with ``fig.savefig("name.png", dpi=150)``. Grids follow ``z[i, j]`` at ``(x[i], y[j])``; matplotlib
draws ``C[row, column]`` at ``(x[column], y[row])``, so the builders pass ``z.T``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flatlora_analysis.plots.style import PALETTE, color_for, correlation_title, result_object


def _figure(cols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * cols, height), layout="constrained")
    axes = [fig.add_subplot(1, cols, i + 1) for i in range(cols)]
    return fig, axes


def landscape_1d_png(curves: Mapping[str, Any], title: str = "Loss along a direction") -> Figure:
    fig, (ax,) = _figure()
    labels = list(curves)
    for label, result in curves.items():
        r = result_object(result)
        color = color_for(label, labels)
        ax.plot(np.asarray(r.x), np.asarray(r.z), color=color, label=label)
        ax.plot([0.0], [r.clean_loss], "o", color=color)
    ax.set(title=title, xlabel="step along the direction (t)", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def landscape_2d_png(result: Any, title: str = "Loss landscape") -> Figure:
    """A 3-D surface and a filled map with contour lines (and the trajectory, if any)."""
    from flatlora_analysis.plots.style import axis_labels

    r = result_object(result)
    x, y, z = np.asarray(r.x), np.asarray(r.y), np.asarray(r.z)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    X, Y = np.meshgrid(x, y)  # X[row, col] = x[col], Y[row, col] = y[row]
    ax3.plot_surface(X, Y, z.T, cmap="viridis", linewidth=0)
    xl, yl = axis_labels(r)
    ax3.set(xlabel=xl, ylabel=yl, zlabel="loss")
    ax = fig.add_subplot(1, 2, 2)
    mesh = ax.pcolormesh(x, y, z.T, shading="nearest", cmap="viridis")
    ax.contour(X, Y, z.T, colors="white", linewidths=0.6)
    fig.colorbar(mesh, ax=ax, label="loss")
    ax.plot([0], [0], "o", color="white", markeredgecolor="black", label="adapter")
    path = getattr(r, "trajectory", None)
    if path is not None and len(path):
        path = np.asarray(path)
        ax.plot(path[:, 0], path[:, 1], "-o", color=PALETTE[1], markersize=3, label="trajectory")
    ax.set(xlabel=xl, ylabel=yl)
    ax.legend(loc="upper right")
    fig.suptitle(title)
    return fig


def density_png(densities: Mapping[str, Any], title: str = "Hessian spectral density (SLQ)") -> Figure:
    fig, (ax,) = _figure()
    labels = list(densities)
    for label, result in densities.items():
        r = result_object(result)
        ax.semilogy(
            np.asarray(r.grid), np.maximum(np.asarray(r.density), 1e-12), color=color_for(label, labels), label=label
        )
    ax.set(title=title, xlabel="eigenvalue", ylabel="density")
    ax.legend()
    return fig


def layer_bars_png(layers: Mapping[str, Any], title: str = "Per-layer top eigenvalue") -> Figure:
    fig, (ax,) = _figure(width=9)
    labels = list(layers)
    width = 0.8 / max(len(labels), 1)
    for k, (label, result) in enumerate(layers.items()):
        r = result_object(result)
        pos = np.arange(len(r.layers)) + k * width
        ax.bar(pos, np.asarray(r.eigenvalues), width, color=color_for(label, labels), label=label)
        ax.set_xticks(
            np.arange(len(r.layers)) + 0.4 - width / 2,
            [n.removeprefix("base_model.model.") for n in r.layers],
            rotation=60,
            ha="right",
            fontsize=7,
        )
    ax.set(title=title, ylabel="lambda_max of the layer's block")
    ax.legend()
    return fig


def history_png(
    histories: Mapping[str, Sequence[dict[str, Any]]], key: str = "loss", title: str | None = None
) -> Figure:
    fig, (ax,) = _figure()
    labels = list(histories)
    for label, records in histories.items():
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        if pts:
            ax.plot(*zip(*pts), "-o", markersize=3, color=color_for(label, labels), label=label)
    ax.set(title=title or f"{key} over training", xlabel="step", ylabel=key)
    ax.legend()
    return fig


def realized_norm_png(
    histories: Mapping[str, Sequence[dict[str, Any]]], title: str = "Realized perturbation norm against rho"
) -> Figure:
    fig, (ax,) = _figure()
    labels = list(histories)
    for label, records in histories.items():
        pts = [(r["step"], r["realized_norm"], r.get("rho")) for r in records if r.get("realized_norm") is not None]
        if not pts:
            continue
        steps, norms, rhos = zip(*pts)
        color = color_for(label, labels)
        ratio = np.mean([n / r for n, r in zip(norms, rhos) if r]) if any(rhos) else float("nan")
        ax.plot(steps, norms, "-o", markersize=3, color=color, label=f"{label}: realized ({100 * ratio:.0f}% of rho)")
        if any(r is not None for r in rhos):
            ax.plot(steps, rhos, "--", color=color, label=f"{label}: rho")
    ax.set(title=title, xlabel="step", ylabel="norm in the full weight space")
    ax.legend(fontsize=8)
    return fig


def ema_error_png(series: Mapping[str, Any], title: str = "Theorem 2: EMA vs exact perturbation") -> Figure:
    fig, (a1, a2) = _figure(cols=2)
    labels = list(series)
    for label, result in series.items():
        r = result_object(result)
        color = color_for(label, labels)
        a1.plot(np.asarray(r.steps), np.asarray(r.rel_error), "-o", markersize=3, color=color, label=label)
        a2.plot(np.asarray(r.steps), np.asarray(r.cosine), "-o", markersize=3, color=color, label=label)
    a1.set(title="relative error", xlabel="step")
    a2.set(title="cosine", xlabel="step")
    a1.legend()
    fig.suptitle(title)
    return fig


def balance_png(trajectories: Mapping[str, Any], title: str = "Balancedness ||A||^2 - ||B||^2") -> Figure:
    fig, (ax,) = _figure()
    labels = list(trajectories)
    for label, result in trajectories.items():
        r = result_object(result)
        ax.plot(
            np.asarray(r.steps), np.asarray(r.total), "-o", markersize=3, color=color_for(label, labels), label=label
        )
    ax.set(title=title, xlabel="step", ylabel="||A||^2 - ||B||^2")
    ax.legend()
    return fig


def sharpness_bars_png(entries: Sequence[dict[str, Any]], title: str = "Sharpness (perturbed - clean loss)"):
    fig, (ax,) = _figure(width=8)
    names = [e["name"] for e in entries]
    measures = list(dict.fromkeys(f"{s['kind']} rho={s['rho']:g}" for e in entries for s in e.get("sharpness", [])))
    width = 0.8 / max(len(entries), 1)
    for k, e in enumerate(entries):
        values = {f"{s['kind']} rho={s['rho']:g}": (s["value"], s.get("stderr") or 0) for s in e.get("sharpness", [])}
        ys = [values.get(m, (np.nan, 0))[0] for m in measures]
        errs = [values.get(m, (np.nan, 0))[1] for m in measures]
        ax.bar(
            np.arange(len(measures)) + k * width,
            ys,
            width,
            yerr=errs,
            color=color_for(e["name"], names),
            label=e["name"],
        )
    ax.set_xticks(np.arange(len(measures)) + 0.4 - width / 2, measures)
    ax.set(title=title, ylabel="loss increase")
    ax.legend()
    return fig


def correlation_scatter_png(
    rows: Sequence[dict[str, Any]], measure: str, target: str = "test_accuracy", correlation: Any = None
) -> Figure:
    """The matplotlib twin of ``correlation_scatter_figure`` (``correlation``: already computed, for the title)."""
    fig, (ax,) = _figure()
    usable = [r for r in rows if r.get(measure) is not None and r.get(target) is not None]
    methods = list(dict.fromkeys(r.get("method") or "adapter" for r in usable))
    for method in methods:
        pts = [r for r in usable if (r.get("method") or "adapter") == method]
        ax.scatter([r[measure] for r in pts], [r[target] for r in pts], color=color_for(method, methods), label=method)
    ax.set(title=correlation_title(measure, target, correlation), xlabel=measure, ylabel=target)
    ax.legend()
    return fig
