"""What a target is measured on: its task, and the probe data a report or landscape builds for it.

A run knows its task and data (run.json). A bare peft adapter folder knows its task from
``adapter_config.json`` (``task_type`` CAUSAL_LM means ``causal-lm``, anything else
``classification``; ``--task`` overrides) and is measured on ``--data`` read with the same
column options ``flatlora train`` takes. Contradictions (an LM adapter on labelled data, the
reverse, an adapter that is not LoRA) are refused in one line before any measure runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from flatlora.data.causal import CAUSAL_LM, CLASSIFICATION, TASKS
from flatlora.errors import FlatLoraError

_NAMES = {CAUSAL_LM: "causal-LM", CLASSIFICATION: "classification"}


@dataclass(frozen=True)
class ProbeData:
    """The data options of ``report``/``landscape`` (None: the run's own, or the loader's default).

    Attributes:
        spec: ``--data`` (as ``flatlora train --data`` takes it); None measures a run on its own data.
        task: ``--task`` (overrides what the adapter or run says).
        text_column, label_column, prompt_column, target_column: column options, as ``train``'s.
        chat_template: wrap causal-LM prompts in the tokenizer's chat template (``--no-chat-template``).
        max_length: tokens per example (default: the run's, else 128).
    """

    spec: str | None = None
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    target_column: str | None = None
    chat_template: bool = True
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise FlatLoraError(f"unknown --task {self.task!r}: use classification or causal-lm")
        if self.max_length is not None and (isinstance(self.max_length, bool) or self.max_length < 8):
            raise FlatLoraError(f"--max-length must be a whole number >= 8, got {self.max_length!r}")
        if self.spec is None and self.options():
            flags = ", ".join("--" + k.replace("_", "-") for k in self.options())
            raise FlatLoraError(f"{flags} describe --data: pass --data too, or drop them")

    @classmethod
    def of(cls, data: str | ProbeData | None) -> ProbeData:
        """A ProbeData from what the callers pass: None, a data spec string, or a ProbeData."""
        return data if isinstance(data, ProbeData) else cls(spec=None if data is None else str(data))

    def options(self) -> dict[str, Any]:
        """The options set away from their defaults (part of the cache key only when set)."""
        out = {
            k: getattr(self, k)
            for k in ("task", "text_column", "label_column", "prompt_column", "target_column", "max_length")
            if getattr(self, k) is not None
        }
        if not self.chat_template:
            out["chat_template"] = False
        return out


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter folder, refused in one line when unreadable or not LoRA."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = type(err).__name__ if not str(err) else str(err).splitlines()[0][:120]
        raise FlatLoraError(f"cannot read {path} ({reason}): the adapter is damaged; save it again") from None
    if not isinstance(config, dict):
        raise FlatLoraError(f"{path} is not a JSON object: the adapter is damaged; save it again")
    kind = str(config.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise FlatLoraError(
            f"{folder} is not a LoRA adapter (peft_type {kind}): flatlora measures LoRA adapters only, "
            "whose weights are W0 + s*B@A"
        )
    return config


def adapter_task(folder: str | Path) -> str:
    """``causal-lm`` for a CAUSAL_LM adapter, else ``classification`` (SEQ_CLS, or no task_type)."""
    task_type = str(read_adapter_config(folder).get("task_type") or "").upper()
    return CAUSAL_LM if task_type == "CAUSAL_LM" else CLASSIFICATION


def target_task(target, data: ProbeData) -> str:
    """The task of a target: ``--task``, else the run's (run.json) or the adapter config's."""
    if data.task is not None:
        return data.task
    run = target.run()
    if run is not None:
        return run.info.get("task") or CLASSIFICATION
    return adapter_task(target.adapter)


def check_data_task(target, task: str, data: ProbeData) -> None:
    """Refuse ``--data`` whose kind contradicts the target's task (in one line, naming the fix)."""
    if data.spec is None:
        return
    from flatlora.tasks.resolve import data_task

    wrong = (
        {"--label-column": data.label_column is not None}
        if task == CAUSAL_LM
        else {
            "--prompt-column": data.prompt_column is not None,
            "--target-column": data.target_column is not None,
            "--no-chat-template": not data.chat_template,
        }
    )
    flags = ", ".join(flag for flag, given in wrong.items() if given)
    if flags:
        other = CLASSIFICATION if task == CAUSAL_LM else CAUSAL_LM
        raise FlatLoraError(f"{target.path} is measured as {task}: drop {flags} (options of {other} data)")

    implied = data_task(
        SimpleNamespace(
            data=data.spec,
            prompt_column=data.prompt_column,
            target_column=data.target_column,
            label_column=data.label_column,
            text_column=data.text_column,
        )
    )
    if implied is None or implied == task:
        return
    what = f"measured as {task} (--task {task})" if data.task else f"a {_NAMES[task]} adapter"
    if task == CAUSAL_LM:
        raise FlatLoraError(
            f"{target.path} is {what} but --data {data.spec} is classification data: pass prompt/target "
            "(or text) data, an E2E folder or e2e, or --task classification for a classifier"
        )
    raise FlatLoraError(
        f"{target.path} is {what} but --data {data.spec} is causal-LM data (prompt/target "
        "pairs): pass labelled data, or --task causal-lm for a causal-LM adapter"
    )


def build_target_probe(target, data: ProbeData, tokenizer, *, split: str, n: int | None, batch_size: int):
    """The probe set of a target: ``data`` if it names one, else the run's own split.

    Raises:
        FlatLoraError: a bare adapter without ``--data``, data of the wrong kind, a base model
            without a tokenizer, or a probe set the loaders refuse (no split, no scored token).
    """
    from flatlora_analysis.probe import ProbeSet

    run = target.run()
    task = target_task(target, data)
    if data.spec is None:
        if run is None:
            raise FlatLoraError(
                f"{target.path} is a bare adapter: pass --data (and --base-model if its config "
                "names none) to say what to measure it on"
            )
        return ProbeSet.from_run(run, split, n=n, batch_size=batch_size)
    check_data_task(target, task, data)
    if tokenizer is None:
        raise FlatLoraError(f"the base model of {target.path} has no tokenizer: pass batches through the Python API")
    max_length = data.max_length or (int(run.hparams.get("max_length", 128)) if run is not None else 128)
    columns = {k: getattr(data, k) for k in ("text_column", "label_column", "prompt_column", "target_column")}
    if task == CLASSIFICATION:
        columns = {k: v for k, v in columns.items() if k in ("text_column", "label_column")}
        extra = {}
    else:
        columns.pop("label_column")
        extra = {"chat_template": data.chat_template}
    return ProbeSet.from_data(
        data.spec,
        tokenizer,
        split=split,
        n=n,
        batch_size=batch_size,
        max_length=max_length,
        shots=None,
        task=task,
        **columns,
        **extra,
    )


def check_vocabulary(target, model, probe) -> None:
    """Refuse a probe whose token ids lie beyond the base model's embedding (a tokenizer of another model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    top = max(
        (int(b["input_ids"].max()) for b in probe.batches if "input_ids" in b and b["input_ids"].numel()), default=-1
    )
    if top >= rows:
        raise FlatLoraError(
            f"the probe of {target.path} holds token id {top} but the base model's vocabulary has {rows} entries: "
            "the tokenizer belongs to another model; pass the base model the adapter was trained on"
        )


def check_labels(target, model, probe) -> None:
    """Refuse classification labels beyond the adapter's head (data with more classes than it was trained on)."""
    if probe.weighting != "examples":
        return
    heads = getattr(getattr(model, "config", None), "num_labels", None)
    labels = [b["labels"] for b in probe.batches if torch.is_tensor(b.get("labels")) and b["labels"].dim() == 1]
    if not heads or not labels:
        return
    top = max(int(t.max()) for t in labels if t.numel())
    if top >= heads:
        raise FlatLoraError(
            f"the probe data of {target.path} has labels up to {top} ({top + 1} classes) but the adapter's head "
            f"has {heads} classes: measure it on data with its own {heads} classes"
        )


def check_probe_fits(target, model, probe) -> None:
    """Both checks of a probe against the model it measures: token ids in its vocabulary, labels in its head."""
    check_vocabulary(target, model, probe)
    check_labels(target, model, probe)
