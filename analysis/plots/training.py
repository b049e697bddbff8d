"""plotly figures of quantities over training: logged histories, realized perturbation norms, Theorem 2, balancedness.

Builders take run histories (lists of metric records) or result objects (or their
``to_dict()`` form), one line per label; no file I/O and no Streamlit here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flatlora_analysis.plots.style import apply_layout, color_for, result_object


def history_figure(
    histories: Mapping[str, Sequence[dict[str, Any]]],
    key: str = "loss",
    title: str | None = None,
    y_title: str | None = None,
) -> go.Figure:
    """One logged quantity (``loss``, ``balancedness``, ``t2_rel_error``, ...) over steps, one line per run."""
    fig = go.Figure()
    labels = list(histories)
    for label, records in histories.items():
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        if points:
            xs, ys = zip(*points)
            fig.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines+markers", name=label, line={"color": color_for(label, labels)})
            )
    return apply_layout(fig, title or f"{key} over training", "step", y_title or key)


def realized_norm_figure(
    histories: Mapping[str, Sequence[dict[str, Any]]],
    title: str = "Realized perturbation norm ||s eps_B A|| against rho",
) -> go.Figure:
    """The full-space norm of each step's perturbation (solid) against that step's rho (dashed).

    EFlat-LoRA applies an average of past perturbations, which is shorter than rho; the
    hover text and the legend give the mean ratio realized / rho, so the shortfall is read off.
    """
    fig = go.Figure()
    labels = list(histories)
    for label, records in histories.items():
        points = [
            (r["step"], r["realized_norm"], r.get("rho"))
            for r in records
            if r.get("realized_norm") is not None and "step" in r
        ]
        if not points:
            continue
        steps, norms, rhos = zip(*points)
        color = color_for(label, labels)
        ratios = [n / r for n, r in zip(norms, rhos) if r]
        mean_ratio = float(np.mean(ratios)) if ratios else float("nan")
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=norms,
                mode="lines+markers",
                line={"color": color},
                name=f"{label}: realized (mean {100 * mean_ratio:.0f}% of rho)",
                customdata=np.array(ratios if len(ratios) == len(norms) else [np.nan] * len(norms)),
                hovertemplate="step %{x}<br>norm %{y:.4g}<br>%{customdata:.1%} of rho",
            )
        )
        if any(r is not None for r in rhos):
            fig.add_trace(
                go.Scatter(x=steps, y=rhos, mode="lines", line={"color": color, "dash": "dash"}, name=f"{label}: rho")
            )
    return apply_layout(fig, title, "step", "norm in the full weight space")


def ema_error_figure(series: Mapping[str, Any], title: str = "Theorem 2: EMA vs exact Flat-LoRA perturbation"):
    """||e_bar - eps_B|| / ||eps_B|| and the cosine over steps, one line per label."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("relative error", "cosine"))
    labels = list(series)
    for label, result in series.items():
        r = result_object(result)
        color = color_for(label, labels)
        fig.add_trace(
            go.Scatter(
                x=np.asarray(r.steps),
                y=np.asarray(r.rel_error),
                mode="lines+markers",
                name=label,
                line={"color": color},
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=np.asarray(r.steps),
                y=np.asarray(r.cosine),
                mode="lines+markers",
                name=label,
                line={"color": color},
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, template="plotly_white")
    return fig


def balance_figure(trajectories: Mapping[str, Any], title: str = "Balancedness sum ||A||^2 - ||B||^2") -> go.Figure:
    """The summed balancedness over a run's saved trajectory, one line per label."""
    fig = go.Figure()
    labels = list(trajectories)
    for label, result in trajectories.items():
        r = result_object(result)
        fig.add_trace(
            go.Scatter(
                x=np.asarray(r.steps),
                y=np.asarray(r.total),
                mode="lines+markers",
                name=label,
                line={"color": color_for(label, labels)},
            )
        )
    return apply_layout(fig, title, "step", "||A||^2 - ||B||^2")
