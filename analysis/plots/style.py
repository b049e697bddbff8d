"""What every figure shares: the palette and colour of a label, the layout, axis and correlation titles.

Used by the plotly builders (:mod:`.figures`, :mod:`.training`, :mod:`.study`) and their
matplotlib twins (:mod:`.png`), so a label has one colour and a plot one title everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from flatlora_analysis.results import Result

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def result_object(value: Any) -> Any:
    """A result object from its ``to_dict()`` form (anything else as it is)."""
    return Result.from_dict(value) if isinstance(value, dict) and "type" in value else value


def color_for(label: str, labels: Sequence[str]) -> str:
    """The colour of ``label`` among ``labels``: by sorted position, so every figure of one set agrees."""
    return PALETTE[sorted(set(labels)).index(label) % len(PALETTE)]


def apply_layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    """``fig`` with its title, axis titles and the white template every figure shares."""
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", legend_title_text="")
    return fig


def axis_labels(r: Any) -> tuple[str, str]:
    """The axis titles of a 2-D landscape: its principal components with their variance, or the two directions."""
    ratio = getattr(r, "explained_variance", None)
    if ratio is not None and len(ratio) >= 2:
        return f"PC1 ({100 * ratio[0]:.1f}% of variance)", f"PC2 ({100 * ratio[1]:.1f}% of variance)"
    return "direction 1 (alpha)", "direction 2 (beta)"


def correlation_title(measure: str, target: str, correlation: Any = None) -> str:
    """``target vs measure``, with the Kendall tau and granulated Psi of an already computed ``correlation``."""
    title = f"{target} vs {measure}"
    if correlation is None:
        return title
    c = correlation.to_dict() if hasattr(correlation, "to_dict") else correlation
    tau, psi = (c.get(k) or {} for k in ("kendall", "granulated"))
    if tau.get("value") is not None:
        title += f" (Kendall tau = {tau['value']:.2f}"
        title += f", granulated Psi = {psi['value']:.2f})" if psi.get("value") is not None else ")"
    return title
