"""Sharpness vs generalization across runs: a scatter by method with Kendall, Spearman and the granulated tau."""

from __future__ import annotations

import math

import streamlit as st

from analysis import plots
from analysis.correlation import TARGETS, correlate, measure_columns
from analysis.report import summary_rows
from app import loaders
from flatlora.errors import FlatLoraError


def _axis(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


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
st.plotly_chart(plots.correlation_scatter_figure(rows, measure, target), width="stretch", key="corr_scatter")
try:
    result = correlate(rows, measure, target, n_resamples=1000)
except FlatLoraError as err:
    st.info(str(err))
    st.stop()
cols = st.columns(3)
for col, (label, stat) in zip(
    cols,
    (("Kendall tau", result.kendall), ("Spearman", result.spearman), ("granulated Kendall (Psi)", result.granulated)),
):
    col.metric(label, f"{stat['value']:.3f}")
    col.caption(f"95% bootstrap interval [{stat['low']:.3f}, {stat['high']:.3f}]")
st.caption(
    f"{result.n_runs} runs; granulated over the axes that vary: {', '.join(result.settings['axes']) or 'none'}"
    f"; per axis: {', '.join(f'{k} {_axis(v)}' for k, v in result.granulated['per_axis'].items())}"
    " (n/a: no two runs differ in that axis alone)"
)
