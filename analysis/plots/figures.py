"""plotly figure builders of measures (landscapes, curvature, sharpness, correlation): a result in, a figure out.

One set of builders serves the HTML report, the dashboard and the notebooks (the figures over
training are :mod:`flatlora_analysis.plots.training`). No file I/O and
no Streamlit here. Builders take result objects or their ``to_dict()`` form, and report
entries (dicts) where several runs are compared. Grids follow the convention of
``flatlora_analysis.landscape``: ``z[i, j]`` is the value at ``(x[i], y[j])``; plotly draws
``z[row][column]`` at ``(x[column], y[row])``, so the builders hand it ``z.T``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flatlora_analysis.plots.style import (
    apply_layout,
    axis_labels,
    color_for,
    correlation_title,
    result_object,
)

# ----------------------------------------------------------------------------- landscapes


def landscape_1d_figure(curves: Mapping[str, Any], title: str = "Loss along a direction") -> go.Figure:
    """Several 1-D landscapes overlaid: one line per label, the clean point marked at t = 0."""
    fig = go.Figure()
    labels = list(curves)
    for label, result in curves.items():
        r = result_object(result)
        color = color_for(label, labels)
        fig.add_trace(go.Scatter(x=np.asarray(r.x), y=np.asarray(r.z), mode="lines", name=label, line={"color": color}))
        fig.add_trace(
            go.Scatter(
                x=[0.0],
                y=[r.clean_loss],
                mode="markers",
                showlegend=False,
                marker={"color": color, "size": 8},
                name=f"{label} (clean)",
            )
        )
    return apply_layout(fig, title, "step along the direction (t)", "loss")


def landscape_2d_figure(result: Any, title: str = "Loss landscape") -> go.Figure:
    """Surface and contour side by side; a trajectory (if the result has one) drawn on the contour."""
    r = result_object(result)
    x, y, z = np.asarray(r.x), np.asarray(r.y), np.asarray(r.z)
    fig = make_subplots(
        rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "xy"}]], subplot_titles=("surface", "contour")
    )
    fig.add_trace(go.Surface(x=x, y=y, z=z.T, colorscale="Viridis", showscale=False, name="loss"), row=1, col=1)
    fig.add_trace(
        go.Contour(
            x=x,
            y=y,
            z=z.T,
            colorscale="Viridis",
            contours={"showlabels": True},
            colorbar={"title": "loss"},
            name="loss",
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(
            x=[0.0],
            y=[0.0],
            mode="markers",
            marker={"color": "white", "size": 9, "line": {"color": "black", "width": 1}},
            name="adapter",
        ),
        row=1,
        col=2,
    )
    path = getattr(r, "trajectory", None)
    if path is not None and len(path):
        path = np.asarray(path)
        steps = getattr(r, "trajectory_steps", None)
        fig.add_trace(
            go.Scatter(
                x=path[:, 0],
                y=path[:, 1],
                mode="lines+markers",
                name="trajectory",
                line={"color": "#d62728"},
                text=None if steps is None else [f"step {int(s)}" for s in steps],
            ),
            row=1,
            col=2,
        )
    xl, yl = axis_labels(r)
    fig.update_xaxes(title_text=xl, row=1, col=2)
    fig.update_yaxes(title_text=yl, row=1, col=2)
    fig.update_layout(
        title=title, template="plotly_white", scene={"xaxis_title": xl, "yaxis_title": yl, "zaxis_title": "loss"}
    )
    return fig


# ----------------------------------------------------------------------------- curvature


def density_figure(densities: Mapping[str, Any], title: str = "Hessian spectral density (SLQ)") -> go.Figure:
    """Gaussian-broadened spectral densities, one line per label, on a log y axis."""
    fig = go.Figure()
    labels = list(densities)
    for label, result in densities.items():
        r = result_object(result)
        fig.add_trace(
            go.Scatter(
                x=np.asarray(r.grid),
                y=np.maximum(np.asarray(r.density), 1e-12),
                mode="lines",
                name=label,
                line={"color": color_for(label, labels)},
            )
        )
    fig.update_yaxes(type="log")
    return apply_layout(fig, title, "eigenvalue", "density")


def layer_bars_figure(layers: Mapping[str, Any], title: str = "Per-layer top eigenvalue") -> go.Figure:
    """Per-layer top eigenvalue bars, one group per label."""
    fig = go.Figure()
    labels = list(layers)
    for label, result in layers.items():
        r = result_object(result)
        names = [name.removeprefix("base_model.model.") for name in r.layers]
        fig.add_trace(go.Bar(x=names, y=np.asarray(r.eigenvalues), name=label, marker_color=color_for(label, labels)))
    fig.update_layout(barmode="group")
    return apply_layout(fig, title, "layer", "lambda_max of the layer's Hessian block")


# ----------------------------------------------------------------------------- report entries


def sharpness_bars_figure(entries: Sequence[dict[str, Any]], title: str = "Sharpness (perturbed - clean loss)"):
    """One bar group per sharpness kind and rho, one bar per run; average with its standard error."""
    fig = go.Figure()
    names = [e["name"] for e in entries]
    for e in entries:
        xs, ys, errs = [], [], []
        for s in e.get("sharpness", []):
            xs.append(f"{s['kind']} rho={s['rho']:g}")
            ys.append(s["value"])
            errs.append(s.get("stderr") or 0.0)
        fig.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                name=e["name"],
                marker_color=color_for(e["name"], names),
                error_y={"type": "data", "array": errs, "visible": True},
            )
        )
    fig.update_layout(barmode="group")
    return apply_layout(fig, title, "measure", "loss increase")


def curvature_bars_figure(entries: Sequence[dict[str, Any]], title: str = "Hessian: lambda_max and trace"):
    """lambda_max and tr(H) (with its standard error) per run, side by side."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("top eigenvalue", "trace"))
    names = [e["name"] for e in entries]
    for e in entries:
        h = e.get("hessian", {})
        color = color_for(e["name"], names)
        eig = h.get("top_eigenvalues")
        if eig:
            fig.add_trace(
                go.Bar(x=[e["name"]], y=[eig["eigenvalues"][0]], marker_color=color, showlegend=False, name=e["name"]),
                row=1,
                col=1,
            )
        tr = h.get("trace")
        if tr:
            fig.add_trace(
                go.Bar(
                    x=[e["name"]],
                    y=[tr["trace"]],
                    marker_color=color,
                    showlegend=False,
                    name=e["name"],
                    error_y={"type": "data", "array": [tr["stderr"]], "visible": True},
                ),
                row=1,
                col=2,
            )
    fig.update_layout(title=title, template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- correlation


def correlation_scatter_figure(
    rows: Sequence[dict[str, Any]],
    measure: str | None = None,
    target: str = "test_accuracy",
    correlation: Any = None,
) -> go.Figure:
    """A measure against a generalization figure across runs (summary rows), coloured by method.

    ``measure`` defaults to the first measure column. ``correlation`` is the correlation of the
    pair as already computed (a :class:`~flatlora_analysis.correlation.CorrelationResult`, its
    ``to_dict()``, or a row of a report's correlation section): its tau and Psi go in the title.
    The builder computes no statistic itself.
    """
    from flatlora_analysis.correlation import measure_columns

    rows = list(rows)
    measure = measure or next(iter(measure_columns(rows)), None)
    fig = go.Figure()
    usable = [r for r in rows if r.get(measure) is not None and r.get(target) is not None]
    methods = list(dict.fromkeys(r.get("method") or "adapter" for r in usable))
    for method in methods:
        pts = [r for r in usable if (r.get("method") or "adapter") == method]
        fig.add_trace(
            go.Scatter(
                x=[r[measure] for r in pts],
                y=[r[target] for r in pts],
                mode="markers",
                name=method,
                text=[r["name"] for r in pts],
                marker={"size": 10, "color": color_for(method, methods)},
            )
        )
    return apply_layout(fig, correlation_title(measure, target, correlation), measure, target)
