"""Every measure of a report on one adapter, each cached by (adapter content hash, settings).

A cache entry is one JSON file written atomically, so a killed report resumes where it
stopped: finished measures are read back, the rest computed. The model and the probe set are
loaded only when some measure of the adapter is not cached yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.loading import Target
from flatlora_analysis.probe_data import ProbeData, build_target_probe
from flatlora_analysis.report.settings import ReportSettings, cache_key

CACHE_FORMAT = 1
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


class Cache:
    """One JSON file per key in a folder; writes are atomic."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        from flatlora.runs import atomic_write_json

        atomic_write_json(self.path(key), value)


class _Lazy:
    """The model and probe set of a target, loaded on first use."""

    def __init__(self, target: Target, settings: ReportSettings, base_model, data, device) -> None:
        self.target, self.settings, self.base_model, self.data, self.device = target, settings, base_model, data, device
        self._model = self._probe = self._tokenizer = None

    @property
    def model(self):
        if self._model is None:
            from flatlora_analysis.loading import load_model

            self._model, self._tokenizer = load_model(self.target, self.base_model, device=self.device)
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


def _landscape_1d(target, run, s: ReportSettings, data, lazy, cached, cb, device) -> dict[str, Any]:
    """The 1-D landscape of the report; for a run it is also saved in (and reused from) RUN/analysis/."""
    from flatlora_analysis.landscape import cached_landscape, landscape_1d
    from flatlora_analysis.landscape.store import landscape_key

    opts = s.landscape_settings(data)

    def compute():
        return landscape_1d(
            lazy.model,
            lazy.probe,
            steps=s.landscape_steps,
            span=s.landscape_span,
            space=s.space,
            seed=s.seed,
            device=device,
            progress=cb("1-D landscape"),
        )

    if run is None:
        return cached("landscape-1d", opts, compute)
    key = landscape_key(target.adapter, "1d", opts)
    return cached("landscape-1d", opts, lambda: cached_landscape(run.path / "analysis", key, compute)[0])


def _flatness(task: str, s: ReportSettings, lazy, cached, cb, device) -> dict[str, Any]:
    """The literature's flatness measures of ``s.flatness`` that apply to ``task`` (name -> result)."""
    from flatlora_analysis import flatness
    from flatlora_analysis.probe_data import CAUSAL_LM

    out: dict[str, Any] = {}
    for name in s.flatness:
        if name in ("adaptive-worst", "relative") and task == CAUSAL_LM:
            continue  # both are defined on a classifier's logits
        if name == "adaptive-worst":
            opts = {"rho": s.adaptive_rho, "norm": "linf", "space": s.space, "steps": s.worst_steps, "seed": s.seed}
            compute = lambda: flatness.adaptive_sharpness(  # noqa: E731
                lazy.model, lazy.probe, s.adaptive_rho, space=s.space, steps=s.worst_steps, seed=s.seed,
                device=device, progress=cb("adaptive sharpness"),
            )  # fmt: skip
        elif name == "pac-bayes":
            opts = {"target": s.pac_bayes_target, "samples": s.pac_bayes_samples, "space": s.space, "seed": s.seed}
            compute = lambda: flatness.pac_bayes_flatness(  # noqa: E731
                lazy.model, lazy.probe, s.pac_bayes_target, space=s.space, samples=s.pac_bayes_samples,
                seed=s.seed, device=device, progress=cb("PAC-Bayes flatness"),
            )  # fmt: skip
        else:
            opts = {}
            compute = lambda: flatness.relative_flatness(lazy.model, lazy.probe, device=device)  # noqa: E731
        out[name] = cached(f"flatness-{name}", opts, compute)
    return out


def measure_target(
    target: Target,
    settings: ReportSettings,
    cache: Cache,
    *,
    base_model: str | None = None,
    data: str | ProbeData | None = None,
    device=None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """The report entry of one adapter: identity, task, run metrics, and every measure of ``settings``."""
    from flatlora_analysis import balance, ema_error, hessian
    from flatlora_analysis.probe_data import target_task
    from flatlora_analysis.sharpness import sharpness

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
        "timing": {},
    }
    lazy = _Lazy(target, settings, base_model, data, device)
    base = (CACHE_FORMAT, adapter_hash, base_model, entry["probe"])

    def cached(name: str, measure_settings: dict[str, Any], compute: Callable[[], Any]) -> dict[str, Any]:
        key = cache_key(*base, name, measure_settings)
        hit = cache.get(key)
        if hit is not None:
            entry["timing"][name] = hit.get("seconds", 0.0)
            return hit["result"]
        start = time.perf_counter()
        result = compute()
        value = result if isinstance(result, (dict, list)) else result.to_dict()
        if isinstance(value, list):
            value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        seconds = time.perf_counter() - start
        cache.put(key, {"measure": name, "settings": measure_settings, "seconds": seconds, "result": value})
        entry["timing"][name] = seconds
        return value

    def cb(label: str):
        return progress(f"{target.name}: {label}") if progress is not None else None

    s = settings
    entry["sharpness"] = []
    for kind in s.kinds:
        opts = {
            "kind": kind,
            "rhos": list(s.rhos),
            "space": None if kind == "flat-lora" else s.space,
            "steps": s.worst_steps,
            "samples": s.average_samples,
            "seed": s.seed,
        }
        entry["sharpness"] += cached(
            f"sharpness-{kind}",
            opts,
            lambda opts=opts, kind=kind: sharpness(
                lazy.model,
                lazy.probe,
                list(s.rhos),
                kind=kind,
                space=opts["space"],
                steps=s.worst_steps,
                samples=s.average_samples,
                seed=s.seed,
                device=device,
                progress=cb(f"sharpness {kind}"),
            ),
        )
    flatness = _flatness(entry["task"], s, lazy, cached, cb, device)
    if flatness:
        entry["flatness"] = flatness
    hess: dict[str, Any] = {}
    opts = {"k": s.eig_k, "tol": s.eig_tol, "space": s.eig_space, "seed": s.seed}
    hess["top_eigenvalues"] = cached(
        "top_eigenvalues",
        opts,
        lambda: hessian.top_eigenvalues(
            lazy.model,
            lazy.probe,
            k=s.eig_k,
            space=s.eig_space,
            tol=s.eig_tol,
            seed=s.seed,
            device=device,
            progress=cb("top eigenvalues"),
        ),
    )
    if s.trace_samples:
        opts = {"samples": s.trace_samples, "space": s.eig_space, "seed": s.seed}
        hess["trace"] = cached(
            "trace",
            opts,
            lambda: hessian.hessian_trace(
                lazy.model,
                lazy.probe,
                s.eig_space,
                samples=s.trace_samples,
                seed=s.seed,
                device=device,
                progress=cb("trace"),
            ),
        )
    if s.density_steps:
        opts = {"steps": s.density_steps, "runs": s.density_runs, "space": s.eig_space, "seed": s.seed}
        hess["density"] = cached(
            "density",
            opts,
            lambda: hessian.spectral_density(
                lazy.model,
                lazy.probe,
                s.eig_space,
                steps=s.density_steps,
                runs=s.density_runs,
                seed=s.seed,
                device=device,
                progress=cb("spectral density"),
            ),
        )
    if s.layers:
        opts = {"space": s.eig_space, "tol": s.eig_tol, "trace_samples": s.layer_trace_samples, "seed": s.seed}
        hess["layers"] = cached(
            "layers",
            opts,
            lambda: hessian.layer_curvature(
                lazy.model,
                lazy.probe,
                s.eig_space,
                tol=s.eig_tol,
                trace_samples=s.layer_trace_samples,
                seed=s.seed,
                device=device,
                progress=cb("per-layer curvature"),
            ),
        )
    entry["hessian"] = hess
    if s.landscape_steps:
        entry["landscape_1d"] = _landscape_1d(target, run, s, data, lazy, cached, cb, device)
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

                opts = {"checkpoint": folder_hash(checkpoint), "seed": s.seed}
                entry["ema_error"]["checkpoint"] = cached(
                    "ema_error",
                    opts,
                    lambda: ema_error.ema_error_at_checkpoint(run, lazy.probe, checkpoint=checkpoint, device=device),
                )
    return entry
