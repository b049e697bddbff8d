"""Entry page of the dashboard: the runs folder in the sidebar, and the pages."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from flatlora_app import loaders

HERE = Path(__file__).parent

st.set_page_config(page_title="flatlora", page_icon=":material/landscape:", layout="wide")
if "runs_dir" not in st.session_state:
    st.session_state["runs_dir"] = loaders.default_runs_dir()
with st.sidebar:
    st.text_input("Runs folder", key="runs_dir", help="a folder of run directories (flatlora demo, sweep, train)")
    if st.button("Reload", help="forget cached runs and measures"):
        loaders.clear_caches()
pages = [
    st.Page(HERE / "views" / "runs.py", title="Runs", icon=":material/table:", default=True),
    st.Page(HERE / "views" / "landscapes.py", title="Landscapes", icon=":material/landscape:"),
    st.Page(HERE / "views" / "curvature.py", title="Curvature", icon=":material/function:"),
    st.Page(HERE / "views" / "correlation.py", title="Sharpness vs generalization", icon=":material/scatter_plot:"),
    st.Page(HERE / "views" / "report.py", title="Report", icon=":material/description:"),
]
st.navigation(pages).run()
