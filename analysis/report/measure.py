"""Every measure of a report on one adapter, each through the registry and the result store.

A result is one JSON file written atomically in ``OUT/cache`` (a run's 1-D landscape in
``RUN/analysis``, where the dashboard and ``flatlora landscape`` find it too), keyed by the
adapter's content, the probe set's fingerprint, the measure and its complete settings
(:mod:`flatlora_analysis.store`), so a killed report resumes where it stopped. The probe set is
built for its fingerprint (a run's own data needs only its tokenizer); the model is loaded
only when some measure of the adapter is not stored yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.loading import Target
from flatlora_analysis.probe_data import ProbeData, build_target_probe
from flatlora_analysis.registry import measure
from flatlora_analysis.report.cost import cost_of, gradient_seconds
from flatlora_analysis.report.settings import ReportSettings
from flatlora_analysis.store import ResultStore, cached

HISTORY_KEYS = (
    "step",
    "loss",
    "perturbed_loss",
    "grad_norm",
    "learning_rate",
    "rho",
    "eps_b_norm",
    "realized_norm",
    "target_eps_b_norm",
    "realized_ratio",
    "eps_rotation_cosine",
    "ema_cosine",
    "balancedness",
    "t2_rel_error",
    "t2_cosine",
    "t2_loss_gap",
    "train_loss",
    "eval_loss",
)
ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


Cache = ResultStore  # the report's store (OUT/cache); the name the report modules know it by


class _Lazy:
    """The model and probe set of a target, loaded on first use."""

    def __init__(self, target: Target, settings: ReportSettings, base_model, data, device, dtype=None) -> None:
        self.target, self.settings, self.base_model, self.data, self.device = target, settings, base_model, data, device
        self.dtype = dtype  # the base weights' dtype (None: the run's own, else float32)
        self._model = self._probe = self._tokenizer = None
        self._gradient_seconds: float | None = None

    @property
    def gradient_seconds(self) -> float:
        """Seconds of one gradient over the probe with this model: the unit of every measure's cost."""
        if self._gradient_seconds is None:
            self._gradient_seconds = gradient_seconds(self.model, self.probe, self.device)
        return self._gradient_seconds

    @property
    def model(self):
        if self._model is None:
            from flatlora_analysis.loading import load_model

            self._model, self._tokenizer = load_model(
                self.target, self.base_model, device=self.device, dtype=self.dtype
            )
        return self._model

    @property
    def probe(self):
        if self._probe is None:
            if self.data.spec is not None:
                self.model  # noqa: B018  (the tokenizer comes with the model)
            self._probe = build_probe(self.target, self.settings, self.data, self._tokenizer)
        return self._probe


def probe_spec(target: Target, settings: ReportSettings, data: ProbeData) -> dict[str, Any]:
    """What identifies the probe set of a target, without building it (for cache keys)."""
    run = target.run()
    source = data.spec if data.spec is not None else (run.info.get("data") if run is not None else None)
    return {"data": source, **data.options(), **settings.probe_key()}


def build_probe(target: Target, settings: ReportSettings, data: ProbeData, tokenizer):
    """The probe set: ``data`` if it names one, else the run's own split."""
    return build_target_probe(
        target, data, tokenizer, split=settings.split, n=settings.n, batch_size=settings.batch_size
    )


def _history(run) -> list[dict[str, Any]]:
    return [{k: r[k] for k in HISTORY_KEYS if k in r} for r in run.metrics]


def report_measures(task: str, s: ReportSettings) -> list[tuple[str, str, dict[str, Any]]]:
    """(entry label, registry measure, given settings) of every model measure ``s`` asks of an adapter of ``task``.

    The labels place each result in the report entry: ``sharpness-KIND``, ``hessian.NAME``,
    ``landscape_1d``, ``flatness.NAME``. Settings left out take the measure's defaults.
    """
    from flatlora_analysis.probe_data import CAUSAL_LM

    out: list[tuple[str, str, dict[str, Any]]] = []
    for kind in s.kinds:
        given = {"rho": list(s.rhos), "kind": kind, "space": None if kind == "flat-lora" else s.space, "seed": s.seed}
        given.update({"steps": s.worst_steps, "samples": s.average_samples})
        out.append((f"sharpness-{kind}", "sharpness", given))
    for name in s.flatness:
        if name in ("adaptive-worst", "relative") and task == CAUSAL_LM:
            continue  # both are defined on a classifier's logits
        if name == "adaptive-worst":
            given = {"rho": s.adaptive_rho, "space": s.space, "steps": s.worst_steps, "seed": s.seed}
            out.append(("flatness.adaptive-worst", "adaptive_sharpness", given))
        elif name == "pac-bayes":
            given = {"target": s.pac_bayes_target, "space": s.space, "samples": s.pac_bayes_samples, "seed": s.seed}
            given["rtol"] = s.pac_bayes_rtol
            out.append(("flatness.pac-bayes", "pac_bayes_flatness", given))
        else:
            out.append(("flatness.relative", "relative_flatness", {}))
    hess = {"space": s.eig_space, "seed": s.seed}
    if s.hessian_engine == "shared":
        given = {**hess, "k": s.eig_k, "tol": s.eig_tol, "start": s.eig_start, "trace_samples": s.trace_samples}
        given.update(density_steps=s.density_steps, density_runs=s.density_runs, layers=s.layers)
        out.append(("hessian.curvature", "curvature", {**given, "layer_trace_samples": s.layer_trace_samples}))
    else:
        given = {**hess, "k": s.eig_k, "tol": s.eig_tol, "start": s.eig_start}
        out.append(("hessian.top_eigenvalues", "top_eigenvalues", given))
        if s.trace_samples:
            out.append(("hessian.trace", "trace", {**hess, "samples": s.trace_samples, "batched": False}))
        if s.density_steps:
            given = {**hess, "steps": s.density_steps, "runs": s.density_runs, "batched": False}
            out.append(("hessian.density", "density", given))
        if s.layers:
            given = {**hess, "tol": s.eig_tol, "trace_samples": s.layer_trace_samples}
            out.append(("hessian.layers", "layers", given))
    if s.landscape_steps:
        given = {"steps": s.landscape_steps, "span": s.landscape_span, "space": s.space, "seed": s.seed}
        out.append(("landscape_1d", "landscape_1d", given))
    return out


PROGRESS_LABELS = {
    "curvature": "Hessian (shared)",
    "top_eigenvalues": "top eigenvalues",
    "density": "spectral density",
    "layers": "per-layer curvature",
}


def measure_target(
    target: Target,
    settings: ReportSettings,
    cache: ResultStore,
    *,
    base_model: str | None = None,
    data: str | ProbeData | None = None,
    device=None,
    progress: ProgressFactory | None = None,
    data_parallel: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The report entry of one adapter: identity, task, run metrics, and every measure of ``settings``.

    ``data_parallel`` (every rank of a process group calls this with the same arguments): rank
    0 decides whether each result is stored, every rank computes what is not (the Hessian
    measures with data-parallel products, the rest alike on each), and rank 0 alone writes.
    ``dtype`` is the base weights' (None: a run's own, else float32); it is part of the
    results' identity, so a bfloat16 measure is never served from a float32 one's store.
    """
    from flatlora_analysis import balance, ema_error
    from flatlora_analysis.loading import measure_identity, target_dtype
    from flatlora_analysis.probe_data import target_task

    data = ProbeData.of(data)
    run = target.run()
    adapter_hash = target.content_hash()
    entry: dict[str, Any] = {
        "name": target.name,
        "kind": target.kind,
        "path": str(target.path),
        "adapter_hash": adapter_hash,
        "method": run.method if run is not None else None,
        "task": target_task(target, data),
        "status": run.status if run is not None else None,
        "hparams": run.hparams if run is not None else {},
        "model": (run.info.get("model") if run is not None else None) or base_model,
        "metrics": run.final if run is not None else {},
        "probe": probe_spec(target, settings, data),
        "dtype": target_dtype(target, dtype),
        "timing": {},
        "cost": {"gradient_seconds": None, "measures": {}},
    }
    lazy = _Lazy(target, settings, base_model, data, device, entry["dtype"])
    # the same adapter on another base model, or in another dtype, is another model: part of its identity
    identity = measure_identity(adapter_hash, base_model, entry["dtype"])
    fingerprint = lazy.probe.fingerprint()
    run_store = [ResultStore(run.path / "analysis")] if run is not None else []

    def stored(label: str, name: str, complete: dict[str, Any], compute: Callable[[], Any], stores=None) -> Any:
        stores = stores or [cache, *run_store]
        if data_parallel:
            value, seconds = _agreed(stores, identity, fingerprint, name, complete, compute)
        else:
            value, _, seconds = cached(stores, identity, fingerprint, name, complete, compute)
        entry["timing"][label] = seconds
        return [v.to_dict() for v in value] if isinstance(value, list) else value.to_dict()

    s = settings
    entry["sharpness"], flatness, hess = [], {}, {}
    for label, name, given in report_measures(entry["task"], s):
        m = measure(name)
        complete = m.complete(**given)
        short = label.split(".")[-1].replace("sharpness-", "sharpness ").replace("_", " ")
        bar = f"{target.name}: {PROGRESS_LABELS.get(label.split('.')[-1], short)}"

        def compute(m=m, complete=complete, bar=bar):  # a progress bar only for what is computed
            unit = lazy.gradient_seconds  # the unit of cost, timed once before the first measure
            bars = progress and progress(bar)
            where = {"device": device, "progress": bars, "data_parallel": data_parallel}
            start = time.perf_counter()
            value = m.compute(lazy.model, lazy.probe, complete, **where)
            cost = cost_of(value, time.perf_counter() - start, unit)
            for part in value if isinstance(value, list) else [value]:
                part.meta["cost"] = cost
            return value

        # a run's 1-D landscape is stored with the run, where the dashboard and flatlora landscape find it
        stores = [*run_store, cache] if name == "landscape_1d" else None
        value = stored(label, name, complete, compute, stores)
        cost = (value[0] if isinstance(value, list) else value).get("meta", {}).get("cost")
        if cost is not None:
            entry["cost"]["measures"][label] = cost
            entry["cost"]["gradient_seconds"] = entry["cost"]["gradient_seconds"] or cost.get("gradient_seconds")
        if label.startswith("sharpness-"):
            entry["sharpness"] += value
        elif label.startswith("flatness."):
            flatness[label.split(".", 1)[1]] = value
        elif label == "hessian.curvature":  # one shared computation: its parts, and what they share
            hess.update(
                {part: value[part] for part in ("top_eigenvalues", "trace", "density", "layers") if value[part]}
            )
            hess["shares"] = value["shares"]
            hess["engine"] = {"name": "shared", "hvps": value["hvps"], **{k: value["meta"].get(k) for k in
                              ("block_products", "batched", "layer_products")}}  # fmt: skip
        elif label.startswith("hessian."):
            hess[label.split(".", 1)[1]] = value
        else:
            entry[label] = value
    if flatness:
        entry["flatness"] = flatness
    entry["hessian"] = hess
    entry["balancedness"] = balance.balancedness(target.adapter).to_dict()
    if run is not None:
        entry["history"] = _history(run)
        if balance.trajectory_steps(run.path):
            entry["balance_trajectory"] = balance.balance_trajectory(run).to_dict()
        if run.method == "eflat-lora":
            entry["ema_error"] = {}
            try:
                entry["ema_error"]["log"] = ema_error.ema_error_series(run).to_dict()
            except FlatLoraError:
                pass
            from flatlora.runs import latest_checkpoint

            checkpoint = latest_checkpoint(run.path / "checkpoint")
            if s.ema_checkpoint and checkpoint is not None:
                from flatlora_analysis.loading import adapter_hash as folder_hash

                complete = {"checkpoint": folder_hash(checkpoint), "seed": s.seed}
                entry["ema_error"]["checkpoint"] = stored(
                    "ema_error",
                    "ema_error_at_checkpoint",
                    complete,
                    lambda: ema_error.ema_error_at_checkpoint(
                        run, lazy.probe, checkpoint=checkpoint, device=device, dtype=entry["dtype"]
                    ),
                )
    return entry


def _agreed(stores, identity, fingerprint, name, complete, compute):
    """``cached`` over a process group: rank 0's lookup decides for all, rank 0 alone writes."""
    import torch.distributed as dist

    from flatlora_analysis.store import result_key

    rank = dist.get_rank()
    key = result_key(identity, fingerprint, name, complete)
    found = [any(s.get_record(key) is not None for s in stores) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    if found[0] or rank == 0:  # stored (every rank reads it), or rank 0 computes and writes
        value, _, seconds = cached(stores, identity, fingerprint, name, complete, compute, write=rank == 0)
        return value, seconds
    value = compute()  # not stored: computed here too, never looked up (rank 0 may have written it meanwhile)
    return value, 0.0
