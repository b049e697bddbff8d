"""Landscapes: 1-D curves of several runs, a 2-D plane with the trajectory, interpolation between two runs."""

from __future__ import annotations

import functools

import streamlit as st

from flatlora_analysis import plots
from flatlora_analysis.balance import trajectory_steps
from flatlora_app import loaders, measures

st.title("Loss landscapes")
root = loaders.runs_folder_or_stop()
runs = loaders.finished_runs_or_stop(root, "no finished run yet: landscapes need a saved adapter")
paths = {r["run"]: r["path"] for r in runs}
settings = loaders.measure_defaults(root)
landscape_of = functools.partial(measures.landscape, root=root)  # RUN/analysis, then ROOT/report/cache
with st.expander("Settings (the demo's by default, so its saved landscapes are reused)"):
    c1, c2, c3, c4 = st.columns(4)
    settings["steps"] = c1.number_input("grid points", 3, 101, settings["steps"], step=2, key="ls_steps")
    settings["span"] = c2.number_input("span", 0.01, 10.0, float(settings["span"]), key="ls_span")
    settings["space"] = c3.selectbox("space", ["merged", "lora", "b"], key="ls_space")
    settings["seed"] = c4.number_input("direction seed", 0, 10_000, settings["seed"], key="ls_seed")


def compute_with_bar(label: str, fn):
    bar = st.progress(0.0, text=label)
    result = fn(lambda done, total: bar.progress(min(done / max(total, 1), 1.0), text=f"{label}: {done}/{total}"))
    bar.empty()
    return result


st.header("1-D: loss along a random direction")
chosen = st.multiselect("Runs", list(paths), default=list(paths), key="ls_runs")
curves = {name: landscape_of(paths[name], "1d", settings) for name in chosen}
missing = [name for name, found in curves.items() if found is None]
if missing and st.button(f"Compute the {len(missing)} missing 1-D landscape(s)", key="ls_compute_1d"):
    for name in missing:
        curves[name] = compute_with_bar(
            name, lambda p, name=name: landscape_of(paths[name], "1d", settings, compute=True, progress=p)
        )
shown = {k: v for k, v in curves.items() if v is not None}
if shown:
    st.plotly_chart(plots.landscape_1d_figure(shown), width="stretch", key="ls_fig_1d")
elif chosen:
    st.info("none of these runs has this 1-D landscape yet: compute it with the button above")

st.header("2-D: a plane around one run")
name = st.selectbox("Run", list(paths), key="ls_2d_run")
has_trajectory = bool(trajectory_steps(paths[name]))
plane = st.radio(
    "Plane",
    ["trajectory PCA", "random directions"] if has_trajectory else ["random directions"],
    horizontal=True,
    key="ls_plane",
)
kind = "pca" if plane == "trajectory PCA" else "2d"
plane_settings = {**settings, "steps": min(settings["steps"], 11)}
result = landscape_of(paths[name], kind, plane_settings)
if result is None and st.button(
    f"Compute the {plane_settings['steps']}x{plane_settings['steps']} plane", key="ls_compute_2d"
):
    result = compute_with_bar(name, lambda p: landscape_of(paths[name], kind, plane_settings, compute=True, progress=p))
if result is not None:
    st.plotly_chart(plots.landscape_2d_figure(result, title=f"{name}: {plane}"), width="stretch", key="ls_fig_2d")

st.header("Interpolation between two runs")
if len(paths) < 2:
    st.info("interpolation needs two runs of one base model")
else:
    c1, c2 = st.columns(2)
    first = c1.selectbox("from (t = 0)", list(paths), index=0, key="ls_from")
    second = c2.selectbox("to (t = 1)", list(paths), index=1, key="ls_to")
    line = landscape_of(paths[first], "interpolation", settings, other=paths[second])
    if line is None and st.button("Compute the interpolation", key="ls_compute_line"):
        line = compute_with_bar(
            f"{first} -> {second}",
            lambda p: landscape_of(
                paths[first], "interpolation", settings, other=paths[second], compute=True, progress=p
            ),
        )
    if line is not None:
        st.plotly_chart(
            plots.landscape_1d_figure({f"{first} -> {second}": line}, title="Loss from t = 0 to t = 1"),
            width="stretch",
            key="ls_fig_line",
        )
