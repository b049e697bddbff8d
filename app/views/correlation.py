"""Sharpness vs generalization across runs: a scatter by method with Kendall, Spearman and the granulated tau."""

from __future__ import annotations

import math

import streamlit as st

from flatlora_analysis import plots
from flatlora_analysis.correlation import TARGETS, measure_columns
from flatlora_analysis.report import correlation_for, summary_rows
from flatlora_app import loaders


def _axis(value: float | None, digits: int = 2) -> str:
    """A statistic as text: n/a where undefined (NaN here, None once read back from report.json)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


st.title("Sharpness vs generalization")
root = loaders.runs_folder_or_stop()
report = loaders.report(root, loaders.report_token(root))
if report is None:
    st.info(f"no report in {loaders.report_path(root)}: build it on the Report page (or run flatlora demo)")
    st.stop()
rows = summary_rows(report)
measures = measure_columns(rows)
c1, c2 = st.columns(2)
measure = c1.selectbox("Measure", measures, key="corr_measure")
# the targets some run has: accuracy for classifiers, perplexity and BLEU for causal LMs, loss and gap for both
targets = [t for t in TARGETS if any(isinstance(r.get(t), (int, float)) for r in rows)] or list(TARGETS)
target = c2.selectbox("Generalization", targets, key="corr_target")
# The report's own correlation (its bootstrap done once, when it was written); a report from before
# whole results were kept there is correlated once per report file, not on every rerun.
result = correlation_for(report, measure, target)
if result is None:
    result, problem = loaders.correlation(root, loaders.report_token(root), measure, target)
    if result is None:
        st.plotly_chart(plots.correlation_scatter_figure(rows, measure, target), width="stretch", key="corr_scatter")
        st.info(problem)
        st.stop()
st.plotly_chart(plots.correlation_scatter_figure(rows, measure, target, result), width="stretch", key="corr_scatter")
cols = st.columns(3)
for col, (label, stat) in zip(
    cols,
    (("Kendall tau", result.kendall), ("Spearman", result.spearman), ("granulated Kendall (Psi)", result.granulated)),
):
    col.metric(label, _axis(stat["value"], 3))
    col.caption(f"95% bootstrap interval [{_axis(stat['low'], 3)}, {_axis(stat['high'], 3)}]")
st.caption(
    f"{result.n_runs} runs; granulated over the axes that vary: {', '.join(result.settings['axes']) or 'none'}"
    f"; per axis: {', '.join(f'{k} {_axis(v)}' for k, v in result.granulated['per_axis'].items())}"
    " (n/a: no two runs differ in that axis alone)"
)
