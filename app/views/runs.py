"""Runs: the table of runs with filters, and their training curves (refreshing while a run is written)."""

from __future__ import annotations

import streamlit as st

from flatlora_analysis import plots
from flatlora_app import loaders

st.title("Runs")
root = loaders.runs_folder_or_stop()
METRICS = ("test_accuracy", "test_perplexity", "test_bleu", "test_rouge_l")


def generations_view(rows: list[dict]) -> None:
    """A few saved generations of a causal-LM run: its source, prediction and references."""
    causal = [r for r in rows if r["task"] == "causal-lm"]
    if not causal:
        return
    st.subheader("Generations")
    name = st.selectbox("Run", [r["run"] for r in causal], key="runs_generations")
    path = next(r["path"] for r in causal if r["run"] == name)
    records = loaders.generations(path, loaders.generations_token(path))
    if not records:
        st.info(f"{name} saved no generations (train with --generate N to decode N test prompts)")
        return
    st.dataframe(
        [
            {
                "source": g.get("source"),
                "prediction": g.get("prediction"),
                "references": " | ".join(g.get("references") or []),
            }
            for g in records
        ],
        width="stretch",
        hide_index=True,
    )


@st.fragment(run_every=5.0)
def runs_view() -> None:
    rows = loaders.runs_table(root, loaders.folder_token(root))
    methods = sorted({r["method"] for r in rows})
    statuses = sorted({r["status"] for r in rows})
    left, right = st.columns(2)
    chosen_methods = left.multiselect("Methods", methods, default=methods, key="runs_methods")
    chosen_status = right.multiselect("Status", statuses, default=statuses, key="runs_status")
    shown = [r for r in rows if r["method"] in chosen_methods and r["status"] in chosen_status]
    running = [r["run"] for r in shown if r["status"] == "running"]
    if running:
        st.warning(f"still being written: {', '.join(running)} (this page refreshes every 5 s)")
    st.metric("runs shown", len(shown))
    columns = ["run", "method", "task", "status", "rho", "lr", "seed", "steps", *METRICS, "test_loss", "gap", "wall_s"]
    # Classifiers have accuracy, causal LMs perplexity and generation metrics: show the columns some run has.
    columns = [c for c in columns if c not in METRICS or any(r[c] is not None for r in shown)]
    st.dataframe([{c: r[c] for c in columns} for r in shown], width="stretch", hide_index=True)
    selected = st.multiselect(
        "Runs to plot", [r["run"] for r in shown], default=[r["run"] for r in shown], key="runs_selected"
    )
    paths = {r["run"]: r["path"] for r in shown if r["run"] in selected}
    histories = {name: loaders.history(path, loaders.history_token(path)) for name, path in paths.items()}
    generations_view(shown)
    if not histories:
        return
    tabs = st.tabs(["loss", "rho and realized norm", "balancedness", "Theorem 2"])
    with tabs[0]:
        st.plotly_chart(plots.history_figure(histories, "loss"), width="stretch")
    with tabs[1]:
        per = st.radio("Show", ["per run", "per method"], horizontal=True, key="runs_realized_per")
        if per == "per run":
            st.plotly_chart(plots.realized_norm_figure(histories), width="stretch")
        else:  # seeds pooled: the median ratio realized / rho of each method (eflat-lora per beta and ema_radius)
            groups: dict[str, list] = {}
            for r in shown:
                if r["run"] in histories:
                    groups.setdefault(r["group"], []).append(histories[r["run"]])
            st.plotly_chart(plots.realized_ratio_figure(groups), width="stretch")
    with tabs[2]:
        st.plotly_chart(plots.history_figure(histories, "balancedness", y_title="||A||^2 - ||B||^2"), width="stretch")
    with tabs[3]:
        t2 = {k: v for k, v in histories.items() if any(r.get("t2_rel_error") is not None for r in v)}
        if t2:
            st.plotly_chart(
                plots.history_figure(t2, "t2_rel_error", "Theorem 2: ||e_bar - eps_B|| / ||eps_B||"), width="stretch"
            )
        else:
            st.info("no eflat-lora run logged the Theorem-2 check (train with --diagnostics-every k)")


runs_view()
