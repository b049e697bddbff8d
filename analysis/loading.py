"""What a measure runs on: run directories and bare adapter folders, and their models.

``resolve_targets`` expands paths (a run, an adapter folder, or a folder of runs) into
:class:`Target`s; ``load_model`` builds the peft model of a target (base model + adapter)
the way ``flatlora train`` built it, offline where the base model is the bundled default.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatlora.errors import FlatLoraError


@dataclass(frozen=True)
class Target:
    """One adapter to measure: a run directory's final adapter, or a bare adapter folder."""

    kind: str  # "run" | "adapter"
    path: Path
    adapter: Path
    loaded: Any = field(default=None, compare=False, repr=False)  # the Run, read once (run.json, metrics.jsonl)

    @property
    def name(self) -> str:
        return self.path.name

    def run(self):
        """The run (None for a bare adapter), read on first use and kept: measures ask for it often."""
        if self.kind != "run":
            return None
        if self.loaded is None:
            from flatlora.runs import load_run

            object.__setattr__(self, "loaded", load_run(self.path))
        return self.loaded

    def content_hash(self) -> str:
        """sha256 of the adapter's config and weight files: a cache key that changes with the adapter."""
        return adapter_hash(self.adapter)


def adapter_hash(folder: str | Path) -> str:
    folder = Path(folder)
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md"):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def resolve_targets(paths: list[str | Path]) -> list[Target]:
    """Runs and adapters named by ``paths``; a folder holding neither is searched for runs.

    Raises:
        FlatLoraError: a path that does not exist, or holds no run and no adapter.
    """
    from flatlora.runs import RUN_JSON, list_runs

    targets: list[Target] = []
    for raw in paths:
        path = Path(raw).absolute()
        if not path.exists():
            raise FlatLoraError(f"{path} does not exist: pass a run directory, an adapter folder or a folder of runs")
        if (path / RUN_JSON).is_file():
            targets.append(_run_target(path))
        elif (path / "adapter_config.json").is_file():
            from flatlora_analysis.probe_data import read_adapter_config

            read_adapter_config(path)  # a damaged or non-LoRA adapter is refused here, in one line
            targets.append(Target("adapter", path, path))
        elif path.is_dir():
            runs = list_runs(path)
            if not runs:
                raise FlatLoraError(
                    f"{path} holds no run (run.json) and no adapter (adapter_config.json): "
                    "pass a run directory, a peft adapter folder, or a folder of runs"
                )
            unfinished = [r.path.name for r in runs if r.status != "done"]
            if unfinished:  # a sweep in progress: its finished runs are measured, the others named
                print(
                    f"flatlora: note: {path}: skipping {len(unfinished)} unfinished run(s): {', '.join(unfinished[:5])}"
                    + (" ..." if len(unfinished) > 5 else ""),
                    file=sys.stderr,
                )
            finished = [r for r in runs if r.status == "done"]
            if not finished:
                raise FlatLoraError(f"{path} holds no finished run yet ({len(runs)} unfinished): let them finish first")
            targets += [_run_target(r.path) for r in finished]
        else:
            raise FlatLoraError(f"{path} is a file: pass a run directory, an adapter folder or a folder of runs")
    seen, unique = set(), []
    for t in targets:
        if t.path.resolve() not in seen:
            seen.add(t.path.resolve())
            unique.append(t)
    return unique


def _run_target(path: Path) -> Target:
    """A finished run of a known method, its metrics.jsonl and adapter config readable (else one line)."""
    from flatlora.methods import METHODS
    from flatlora.runs import load_run
    from flatlora_analysis.probe_data import read_adapter_config

    run = load_run(path)
    if run.method not in METHODS:
        raise FlatLoraError(
            f"run {path} names an unknown method {run.method!r} in run.json: use one of {', '.join(METHODS)}, "
            "or measure its adapter/ folder as a bare adapter with --base-model and --data"
        )
    if run.status != "done" or run.adapter_path is None:
        raise FlatLoraError(
            f"run {path} is not finished (status {run.status!r}): let it finish (or resume it), "
            "or pass one of its trajectory/step-N folders as an adapter with --base-model and --data"
        )
    run.metrics  # noqa: B018  (a damaged metrics.jsonl is refused here, before any measure)
    read_adapter_config(run.adapter_path)
    return Target("run", path, run.adapter_path, run)


def target_dtype(target: Target, dtype: str | torch.dtype | None = None) -> str:
    """The dtype a target's base weights are measured in: ``dtype``, else a run's own (run.json), else float32.

    Raises:
        FlatLoraError: an unknown dtype (named in the run's hparams or given).
    """
    from flatlora.base_dtype import dtype_name

    if dtype is not None:
        return dtype_name(dtype)
    run = target.run()
    return dtype_name(run.hparams.get("dtype") if run is not None else None, "dtype in run.json")


def measure_identity(adapter_content: str, base_model: str | None = None, dtype: str = "float32") -> str:
    """The model a stored result belongs to (the store keys it with the probe, measure and settings).

    Args:
        adapter_content: The adapter's content hash (:func:`adapter_hash`).
        base_model: A base model named instead of the adapter's own (another model), or None.
        dtype: The base weights' dtype; float32 adds nothing, so results stored before
            ``--dtype`` existed keep their keys, and a bfloat16 result is never served for float32.

    Returns:
        ``HASH``, ``HASH@BASE``, ``HASH#bfloat16`` or ``HASH@BASE#bfloat16``.
    """
    identity = adapter_content if base_model is None else f"{adapter_content}@{base_model}"
    return identity if dtype == "float32" else f"{identity}#{dtype}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    target: Target | str | Path,
    base_model: str | None = None,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """The peft model of a run or adapter folder, in eval mode, and its tokenizer (None if it has none).

    Its layers are checkpointed where :func:`flatlora_analysis.checkpointing.checkpoint_loaded_models` says so.

    Args:
        target: a :class:`Target`, a run directory or an adapter folder.
        base_model: HF id or folder of the base model; by default the run's model, or the
            adapter's ``base_model_name_or_path``.
        adapter: load this adapter folder instead of the target's (a checkpoint, a trajectory step).
        device: default CUDA when present, else CPU.
        dtype: the base weights' dtype (a name or torch dtype); None: a run's own (run.json), else
            float32. The LoRA factors, a trained head and every measured space stay float32.

    Raises:
        FlatLoraError: a missing or damaged adapter, or an adapter that does not fit the base
            model (shape mismatch, missing target modules).
    """
    from flatlora.adapters import load_adapter
    from flatlora.base_dtype import check_dtype, torch_dtype

    if not isinstance(target, Target):
        target = resolve_targets([target])[0]
    dtype = target_dtype(target, dtype)  # None: the run's own, else float32
    check_dtype(dtype, torch.device(device if device is not None else default_device()).type)
    dtype = torch_dtype(dtype)
    run = target.run()
    num_labels = None
    if run is not None:
        base_model = base_model or run.info.get("model")
        num_labels = len(run.info.get("data", {}).get("label_names") or []) or None
    model, tokenizer = load_adapter(
        Path(adapter) if adapter is not None else target.adapter,
        base_model=base_model,
        num_labels=num_labels,
        dtype=dtype,
    )
    model.to(device if device is not None else default_device()).eval()
    from flatlora_analysis.checkpointing import apply_default

    apply_default(model)  # --gradient-checkpointing (checkpoint_loaded_models): layers recomputed in backward
    return model, tokenizer
