"""Curvature: top Hessian eigenvalues, trace, spectral density and per-layer bars of the selected runs."""

from __future__ import annotations

import dataclasses

import streamlit as st

from flatlora_analysis import plots
from flatlora_app import loaders, measures

st.title("Curvature (Hessian)")
root = loaders.runs_folder_or_stop()
runs = loaders.finished_runs_or_stop(root, "no finished run yet")
paths = {r["run"]: r["path"] for r in runs}
defaults = loaders.report_settings_of(root)  # the report's (or the demo's) settings: its results are found
c1, c2, c3 = st.columns(3)
spaces = ["lora", "b", "merged"]
space = c1.selectbox("Hessian space", spaces, index=spaces.index(defaults.eig_space), key="cv_space")
k = c2.number_input("top eigenvalues k", 1, 20, defaults.eig_k, key="cv_k")
chosen = c3.multiselect("Runs", list(paths), default=list(paths), key="cv_runs")
settings = dataclasses.replace(defaults, eig_space=space, eig_k=int(k))
st.caption(
    f"probe: {settings.split} split, n = {settings.n}, batch {settings.batch_size}; "
    f"eigenvalue tol {settings.eig_tol:g}, "
    f"trace {settings.trace_samples or 30} products, seed {settings.seed}: a stored result is shown only where "
    "every one of its settings matches these"
)
found = {
    m: {name: measures.curvature(paths[name], m, settings, root=root) for name in chosen} for m in measures.CURVATURE
}
missing = [(m, name) for m, by_run in found.items() for name, r in by_run.items() if r is None]
if missing and st.button(f"Compute the {len(missing)} missing measure(s)", key="cv_compute"):
    bar = st.progress(0.0)
    for i, (m, name) in enumerate(missing):
        bar.progress(i / len(missing), text=f"{name}: {m}")
        found[m][name] = measures.curvature(paths[name], m, settings, root=root, compute=True)
    bar.empty()
eig = {n: r for n, r in found["top_eigenvalues"].items() if r is not None}
trace = {n: r for n, r in found["trace"].items() if r is not None}
if eig or trace:
    rows = [
        {
            "run": n,
            "lambda_max": eig[n].lambda_max if n in eig else None,
            "top-k": ", ".join(f"{v:.4g}" for v in eig[n].eigenvalues) if n in eig else "",
            "trace": trace[n].trace if n in trace else None,
            "trace stderr": trace[n].stderr if n in trace else None,
            "HVPs": (eig[n].hvps if n in eig else 0) + (trace[n].hvps if n in trace else 0),
        }
        for n in chosen
    ]
    st.dataframe(rows, hide_index=True, width="stretch")
    entries = [
        {
            "name": n,
            "hessian": {
                "top_eigenvalues": eig[n].to_dict() if n in eig else None,
                "trace": trace[n].to_dict() if n in trace else None,
            },
        }
        for n in chosen
    ]
    st.plotly_chart(plots.curvature_bars_figure(entries), width="stretch", key="cv_bars")
else:
    st.info("nothing measured yet in this space: use the button above")
density = {n: r for n, r in found["density"].items() if r is not None}
if density:
    st.plotly_chart(plots.density_figure(density), width="stretch", key="cv_density")
layers = {n: r for n, r in found["layers"].items() if r is not None}
if layers:
    st.plotly_chart(plots.layer_bars_figure(layers), width="stretch", key="cv_layers")
