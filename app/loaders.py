"""The dashboard's data: cached readers of runs and measures, and the compute-on-request entry points.

Pages hold no math and no figure code: they call these loaders (which call ``flatlora.runs``
and ``analysis``) and hand the results to ``flatlora_analysis.plots``. Readers are cached with
``st.cache_data`` keyed by the files' modification times, so a run being written shows its
new records on the next refresh; models and probe sets are ``st.cache_resource``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import streamlit as st

RUNS_ENV = "FLATLORA_RUNS_DIR"
DEFAULT_RUNS = "runs/demo"
DTYPE_ENV = "FLATLORA_DTYPE"
MAX_MEMORY_ENV = "FLATLORA_MAX_MEMORY"


def default_runs_dir() -> str:
    """``--runs DIR`` after ``streamlit run app/main.py --``, else $FLATLORA_RUNS_DIR, else runs/demo."""
    argv = sys.argv[1:]
    if "--runs" in argv and argv.index("--runs") + 1 < len(argv):
        return argv[argv.index("--runs") + 1]
    return os.environ.get(RUNS_ENV, DEFAULT_RUNS)


def base_dtype() -> str | None:
    """``--dtype NAME`` after ``streamlit run app/main.py --``, else $FLATLORA_DTYPE, else None (each run's own).

    Raises:
        FlatLoraError: an unknown dtype name.
    """
    from flatlora.base_dtype import dtype_name

    argv = sys.argv[1:]
    given = argv[argv.index("--dtype") + 1] if "--dtype" in argv[:-1] else os.environ.get(DTYPE_ENV) or None
    return None if given is None else dtype_name(given)


def max_memory_setting() -> str:
    """``--max-memory SIZE`` after ``streamlit run app/main.py --``, else $FLATLORA_MAX_MEMORY, else ``auto``.

    Raises:
        FlatLoraError: a value that is not a size.
    """
    from flatlora_analysis.memory import parse_memory

    argv = sys.argv[1:]
    given = argv[argv.index("--max-memory") + 1] if "--max-memory" in argv[:-1] else os.environ.get(MAX_MEMORY_ENV)
    given = given or "auto"
    parse_memory(given)  # refused here, in one line, rather than at the first measure
    return given


def runs_dir() -> str:
    return st.session_state.get("runs_dir") or default_runs_dir()


def clear_caches() -> None:
    """Forget every cached reader and resource (tests; the sidebar's reload button)."""
    st.cache_data.clear()
    st.cache_resource.clear()


def report_settings_of(root: str | None = None):
    """The settings of ROOT/report (so what it measured is found again), else the demo's preset."""
    from flatlora_analysis.report import ReportSettings, preset

    found = report(root, report_token(root)) if root is not None else None
    return ReportSettings.from_dict(found["settings"]) if found else preset("demo")


def measure_defaults(root: str | None = None) -> dict[str, Any]:
    """Probe and landscape settings of :func:`report_settings_of`, as the Landscapes page edits them."""
    s = report_settings_of(root)
    return {
        "split": s.split,
        "n": s.n,
        "batch_size": s.batch_size,
        "steps": s.landscape_steps or 21,
        "span": s.landscape_span,
        "space": s.space,
        "seed": s.seed,
    }


# ----------------------------------------------------------------------------- runs


def folder_problem(root: str) -> str | None:
    """Why ``root`` cannot be shown (missing, a file, empty, no runs), or None."""
    path = Path(root)
    if not path.exists():
        return f"{root} does not exist: train runs into it (flatlora demo, or flatlora train --out {root}/NAME)."
    if not path.is_dir():
        return f"{root} is a file, not a folder of runs: choose the folder that holds the run directories."
    if not any(path.rglob("run.json")):
        return f"{root} holds no runs (no run.json below it): train some with flatlora demo or flatlora sweep."
    return None


def runs_folder_or_stop() -> str:
    """The sidebar's runs folder; a page that cannot show it says why and stops there."""
    root = runs_dir()
    problem = folder_problem(root)
    if problem:
        st.info(problem)
        st.stop()
    return root


def finished_runs_or_stop(root: str, message: str = "no finished run yet") -> list[dict[str, Any]]:
    """The rows of the finished runs under ``root``; with none, the page says ``message`` and stops."""
    runs = [r for r in runs_table(root, folder_token(root)) if r["status"] == "done"]
    if not runs:
        st.info(message)
        st.stop()
    return runs


def folder_token(root: str) -> tuple:
    """Modification times of every run.json and metrics.jsonl below ``root`` (a cache key that moves)."""
    out = []
    for run_json in sorted(Path(root).rglob("run.json")):
        metrics = run_json.with_name("metrics.jsonl")
        out.append((str(run_json), run_json.stat().st_mtime_ns, metrics.stat().st_mtime_ns if metrics.exists() else 0))
    return tuple(out)


@st.cache_data(show_spinner=False)
def runs_table(root: str, token: tuple) -> list[dict[str, Any]]:
    """One row per run: name, method, hyperparameters, status, final metrics, gap, wall time."""
    from flatlora.runs import list_runs

    rows = []
    for run in list_runs(root):
        h, m = run.hparams, run.final
        gap = m["test_loss"] - m["train_loss"] if "test_loss" in m and "train_loss" in m else None
        rows.append(
            {
                "run": str(run.path.relative_to(root)) if run.path != Path(root) else run.path.name,
                "path": str(run.path),
                "method": run.method,
                "group": run.group,
                "task": run.info.get("task") or "classification",
                "status": run.status,
                "rho": h.get("rho") if run.method != "lora" else None,
                "lr": h.get("lr"),
                "seed": h.get("seed"),
                "steps": h.get("steps"),
                "test_accuracy": m.get("test_accuracy"),
                "test_perplexity": m.get("test_perplexity"),
                "test_bleu": m.get("test_bleu"),
                "test_rouge_l": m.get("test_rouge_l"),
                "test_loss": m.get("test_loss"),
                "train_loss": m.get("train_loss"),
                "gap": gap,
                "wall_s": run.info.get("wall_time_s"),
            }
        )
    return rows


@st.cache_data(show_spinner=False)
def history(path: str, token: int) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (``token``: its modification time)."""
    from flatlora.runs import read_metrics_file

    return read_metrics_file(Path(path) / "metrics.jsonl")


@st.cache_data(show_spinner=False)
def generations(path: str, token: int, limit: int = 20) -> list[dict[str, Any]]:
    """The first ``limit`` saved generations of a causal-LM run (source, prediction, references)."""
    import json

    from flatlora.tasks.causal import GENERATIONS_FILE

    out = []
    file = Path(path) / GENERATIONS_FILE
    if not file.is_file():
        return out
    with file.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written, or damaged: skip it
            if isinstance(record, dict):
                out.append(record)
            if len(out) >= limit:
                break
    return out


def generations_token(path: str) -> int:
    from flatlora.tasks.causal import GENERATIONS_FILE

    file = Path(path) / GENERATIONS_FILE
    return file.stat().st_mtime_ns if file.exists() else 0


def history_token(path: str) -> int:
    metrics = Path(path) / "metrics.jsonl"
    return metrics.stat().st_mtime_ns if metrics.exists() else 0


def report_path(root: str) -> Path:
    return Path(root) / "report" / "report.json"


@st.cache_data(show_spinner=False)
def report(root: str, token: int) -> dict[str, Any] | None:
    """The report in ROOT/report/report.json (as ``flatlora demo`` writes it), or None."""
    import json

    path = report_path(root)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@st.cache_data(show_spinner="correlating ...")
def correlation(root: str, token: int, measure: str, target: str):
    """(CorrelationResult, None) of a pair over ROOT/report's rows, or (None, why): for reports without one."""
    from flatlora.errors import FlatLoraError
    from flatlora_analysis.correlation import correlate
    from flatlora_analysis.report import summary_rows

    try:
        return correlate(summary_rows(report(root, token)), measure, target, n_resamples=1000), None
    except FlatLoraError as err:
        return None, str(err)


def report_token(root: str) -> int:
    path = report_path(root)
    return path.stat().st_mtime_ns if path.exists() else 0
