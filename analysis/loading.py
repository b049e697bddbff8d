"""What a measure runs on: run directories and bare adapter folders, and their models.

``resolve_targets`` expands paths (a run, an adapter folder, or a folder of runs) into
:class:`Target`s; ``load_model`` builds the peft model of a target (base model + adapter)
the way ``flatlora train`` built it, offline where the base model is the bundled default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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

    @property
    def name(self) -> str:
        return self.path.name

    def run(self):
        from flatlora.runs import load_run

        return load_run(self.path) if self.kind == "run" else None

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
            targets.append(Target("adapter", path, path))
        elif path.is_dir():
            runs = list_runs(path)
            if not runs:
                raise FlatLoraError(
                    f"{path} holds no run (run.json) and no adapter (adapter_config.json): "
                    "pass a run directory, a peft adapter folder, or a folder of runs"
                )
            targets += [_run_target(r.path) for r in runs]
        else:
            raise FlatLoraError(f"{path} is a file: pass a run directory, an adapter folder or a folder of runs")
    seen, unique = set(), []
    for t in targets:
        if t.path.resolve() not in seen:
            seen.add(t.path.resolve())
            unique.append(t)
    return unique


def _run_target(path: Path) -> Target:
    from flatlora.runs import load_run

    run = load_run(path)
    if run.adapter_path is None:
        raise FlatLoraError(
            f"run {path} has no saved adapter (status {run.status!r}): let it finish, "
            "or pass one of its trajectory/step-N folders as an adapter with --base-model"
        )
    return Target("run", path, run.adapter_path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FlatLoraError(f"cannot read {folder}/adapter_config.json ({err}): save the adapter again") from None


def _num_labels(tensors: dict[str, torch.Tensor]) -> int | None:
    """Classes of a saved classification head (peft modules_to_save of classifier/score)."""
    for key in sorted(tensors):
        if any(tag in key for tag in ("classifier", "score")) and key.endswith("weight") and tensors[key].dim() == 2:
            return int(tensors[key].shape[0])
    return None


def load_model(
    target: Target | str | Path,
    base_model: str | None = None,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """The peft model of a run or adapter folder, in eval mode, and its tokenizer (None if it has none).

    Args:
        target: a :class:`Target`, a run directory or an adapter folder.
        base_model: HF id or folder of the base model; by default the run's model, or the
            adapter's ``base_model_name_or_path``.
        adapter: load this adapter folder instead of the target's (a checkpoint, a trajectory step).
        device: default CUDA when present, else CPU.

    Raises:
        FlatLoraError: a missing or damaged adapter, or an adapter that does not fit the base
            model (shape mismatch, missing target modules).
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from analysis.balance import read_adapter_tensors
    from flatlora.models import resolve_model_path

    if not isinstance(target, Target):
        found = resolve_targets([target])
        target = found[0]
    folder = Path(adapter) if adapter is not None else target.adapter
    tensors = read_adapter_tensors(folder)
    config = _adapter_config(folder)
    run = target.run()
    if base_model is None:
        base_model = run.info.get("model") if run is not None else config.get("base_model_name_or_path")
    if not base_model:
        raise FlatLoraError(f"{folder} names no base model: pass --base-model (an HF id or a local folder)")
    path = resolve_model_path(base_model)
    num_labels = len(run.info.get("data", {}).get("label_names") or []) if run is not None else None
    num_labels = num_labels or _num_labels(tensors)
    try:
        torch_dtype = {"dtype": dtype} if dtype is not None else {}
        if config.get("task_type") == "SEQ_CLS" or run is not None:
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2, **torch_dtype)
        else:
            import transformers

            arch = (AutoConfig.from_pretrained(path).architectures or ["AutoModel"])[0]
            cls = getattr(transformers, arch, transformers.AutoModel)
            base = cls.from_pretrained(path, **torch_dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot load base model {base_model!r} ({first}): pass --base-model with an HF id "
            "(with a network) or a local folder"
        ) from None
    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        hint = "size mismatch" if "size mismatch" in text else text[:160]
        raise FlatLoraError(
            f"adapter {folder} does not fit base model {base_model!r} ({hint}): pass the base model it was "
            "trained on with --base-model"
        ) from None
    model.to(device if device is not None else default_device()).eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer
