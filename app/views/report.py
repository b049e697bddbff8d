"""Report: build (or rebuild) the report of the runs folder and download it as HTML, JSON or CSV."""

from __future__ import annotations

import json

import streamlit as st

from flatlora.errors import FlatLoraError
from flatlora_analysis.report import build_report, preset, summary_rows
from flatlora_app import loaders

st.title("Report")
root = loaders.runs_folder_or_stop()
out = loaders.report_path(root).parent
name = st.radio(
    "Preset",
    ["quick", "default", "full"],
    index=1,
    horizontal=True,
    key="rep_preset",
    help="quick: seconds per adapter; default: the demo's; full: + spectral density, per-layer",
)
if st.button(f"Build the report into {out}", key="rep_build"):
    bar = st.progress(0.0, text="measuring")

    def progress(label):
        return lambda done, total: bar.progress(min(done / max(total, 1), 1.0), text=f"{label}: {done}/{total}")

    defaults = loaders.measure_defaults(root)
    settings = preset(name, n=defaults["n"], batch_size=defaults["batch_size"]) if name == "default" else preset(name)
    try:
        build_report([root], out, settings, progress=progress)
    except FlatLoraError as err:
        st.error(str(err))
    bar.empty()
report = loaders.report(root, loaders.report_token(root))
if report is None:
    st.info("no report yet: build one with the button above")
    st.stop()
rows = summary_rows(report)
st.metric("adapters in the report", len(rows))
st.dataframe(rows, hide_index=True, width="stretch")
c1, c2, c3 = st.columns(3)
c1.download_button("report.html", (out / "report.html").read_bytes(), "report.html", "text/html", key="rep_html")
c2.download_button("report.json", json.dumps(report, indent=2), "report.json", "application/json", key="rep_json")
c3.download_button("report.csv", (out / "report.csv").read_bytes(), "report.csv", "text/csv", key="rep_csv")
