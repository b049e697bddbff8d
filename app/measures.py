"""The dashboard's measures: a run's model and probe set, and its stored landscapes and curvature.

Every result is looked up by the store's key (adapter content, probe fingerprint, measure,
complete settings) in RUN/analysis and ROOT/report/cache, and computed on request into
RUN/analysis: the same requests ``flatlora landscape`` and ``flatlora report`` make.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st


@st.cache_resource(show_spinner="loading the adapter ...")
def run_model(path: str, dtype: str | None = None):
    """The run's peft model, in eval mode, its base weights in ``dtype`` (None: the run's own; loaded once)."""
    from flatlora_analysis import load_model

    return load_model(path, dtype=dtype)[0]


def _identity(path: str) -> tuple[str, str | None]:
    """(the key a run's results are stored by, the dtype the dashboard measures in: ``flatlora app --dtype``)."""
    from flatlora.base_dtype import dtype_name
    from flatlora.runs import load_run
    from flatlora_analysis.loading import adapter_hash, measure_identity
    from flatlora_app.loaders import base_dtype

    dtype = base_dtype()
    resolved = dtype_name(dtype or load_run(path).hparams.get("dtype"))
    return measure_identity(adapter_hash(_adapter(path)), None, resolved), dtype


@st.cache_resource(show_spinner="building the probe set ...")
def probe_set(path: str, split: str, n: int | None, batch_size: int):
    """The run's probe set (the first n examples of the split): what keys its results, with the adapter."""
    from flatlora_analysis import ProbeSet

    return ProbeSet.from_run(path, split, n=n, batch_size=batch_size)


def _adapter(path: str) -> Path:
    return Path(path) / "adapter"


def _stores(path: str, root: str | None) -> list[Path]:
    """Where a run's results are found: RUN/analysis (written here and by flatlora landscape), ROOT/report/cache."""
    return [Path(path) / "analysis", *([Path(root) / "report" / "cache"] if root is not None else [])]


def landscape(
    path: str,
    kind: str,
    settings: dict[str, Any],
    *,
    other: str | None = None,
    root: str | None = None,
    compute: bool = False,
    progress: Callable[[int, int], None] | None = None,
):
    """A run's stored landscape of ``kind`` (``1d``, ``2d``, ``pca``, ``interpolation``), or None.

    The same request as ``flatlora landscape`` makes (:func:`flatlora_analysis.landscape.landscape_call`):
    found in RUN/analysis or ROOT/report/cache; with ``compute``, a missing one is computed and
    saved in RUN/analysis.
    """
    from flatlora_analysis.landscape import landscape_call, stored_landscape
    from flatlora_analysis.store import find, result_key

    probe = probe_set(path, settings["split"], settings["n"], settings["batch_size"])
    options = {"steps": settings["steps"], "span": None if kind == "pca" else settings["span"],
               "space": settings["space"], "seed": settings["seed"], "run": path if kind == "pca" else None,
               "other": None if other is None else _adapter(other)}  # fmt: skip
    identity, dtype = _identity(path)
    if not compute:
        name, _, key = landscape_call(kind, **options)
        return find(_stores(path, root), result_key(identity, probe.fingerprint(), name, key))
    return stored_landscape(
        _stores(path, root), identity, probe, kind, lambda: run_model(path, dtype), progress=progress, **options
    )[0]


CURVATURE = ("top_eigenvalues", "trace", "density", "layers")


def curvature(
    path: str,
    measure: str,
    settings,
    *,
    root: str | None = None,
    compute: bool = False,
    progress: Callable[[int, int], None] | None = None,
):
    """A run's Hessian measure (``top_eigenvalues``, ``trace``, ``density``, ``layers``) if stored, else None.

    ``settings`` is a :class:`~flatlora_analysis.report.ReportSettings`; the measure is asked
    with the complete settings the report would use (``report_measures``), so a result is found
    in RUN/analysis or ROOT/report/cache only where every setting (space, k, tol, seed, ...)
    matches. With ``compute``, a missing one is computed and saved in RUN/analysis.
    """
    import dataclasses

    from flatlora_analysis.registry import measure as registry_measure
    from flatlora_analysis.report.measure import report_measures
    from flatlora_analysis.results import Result
    from flatlora_analysis.store import cached, find, result_key

    probe = probe_set(path, settings.split, settings.n, settings.batch_size)
    (identity, dtype), fingerprint = _identity(path), probe.fingerprint()
    # a report of the shared engine stored its Hessian measures as one result: its part, if it has one
    shared = {label: (n, g) for label, n, g in report_measures("classification", settings)}.get("hessian.curvature")
    if shared is not None:
        complete = registry_measure(shared[0]).complete(**shared[1])
        found = find(_stores(path, root), result_key(identity, fingerprint, shared[0], complete))
        if found is not None and getattr(found, measure) is not None:
            return Result.from_dict(getattr(found, measure))
    # else each measure alone, with the report's own settings where it ran one (the defaults elsewhere)
    wanted = dataclasses.replace(
        settings,
        hessian_engine="reference",
        layers=True,
        density_steps=settings.density_steps or 40,
        trace_samples=settings.trace_samples or 30,
    )
    calls = {label: (n, g) for label, n, g in report_measures("classification", wanted)}
    name, given = calls[f"hessian.{measure}"]
    m = registry_measure(name)
    complete = m.complete(**given)
    if not compute:
        return find(_stores(path, root), result_key(identity, fingerprint, name, complete))

    def run():
        from flatlora_analysis.loading import default_device
        from flatlora_analysis.memory import max_memory
        from flatlora_app.loaders import max_memory_setting

        with max_memory(max_memory_setting(), default_device()):  # flatlora app --max-memory
            return m.compute(run_model(path, dtype), probe, complete, progress=progress)

    return cached(_stores(path, root), identity, fingerprint, name, complete, run)[0]
