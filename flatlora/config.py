"""What defines a training run: :class:`TrainConfig`, its options' help and groups, and :func:`validate`.

Each field carries its command-line help text and option group in its metadata, so that
``flatlora train`` and ``flatlora sweep`` build their options from the fields (see
``flatlora.cli``). Metadata keys: ``help``, ``group`` (a key of :data:`OPTION_GROUPS`),
``identity`` (False: not part of the run's identity) and, for the command line only,
``type``, ``choices``, ``nargs``, ``negate`` (the ``--no-...`` flag of a default-on switch)
and ``show_default`` (False: the help does not end with ``(default: ...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flatlora.errors import FlatLoraError
from flatlora.runs import absolute_data_spec

BASE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a frozen base loads in: ``--dtype`` of train, report, landscape and app."""

if TYPE_CHECKING:
    from flatlora.models import LoraOptions

OPTION_GROUPS = {
    "data": "data",
    "method": "method",
    "model": "model and LoRA",
    "optim": "optimisation",
    "io": "logging and saving",
    "generation": "generation (causal-lm)",
}
"""Option group of a field (metadata ``group``) -> its title in ``--help``, in the order shown."""
CAUSAL_ONLY = ("prompt_column", "target_column", "gguf_file", "chat_template")
"""TrainConfig fields that mean something for causal LMs only (absent from a classifier's identity)."""


def optional_int(text: str) -> int | None:
    """Read a whole number, or ``none``, from the command line.

    Args:
        text: The option's value as typed.

    Returns:
        The number, or None for ``none``.

    Raises:
        argparse.ArgumentTypeError: ``text`` is neither.
    """
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number or none, got {text!r}") from None


def test_cap_value(text: str) -> int | str | None:
    """Read ``--test-cap``: ``auto``, ``none`` or a whole number (as :func:`optional_int`)."""
    return "auto" if text.lower() == "auto" else optional_int(text)


def option(default: Any, help: str, group: str, *, identity: bool = True, **cli: Any) -> Any:
    """A TrainConfig field with its help text, option group and command-line extras in its metadata.

    Args:
        default: The field's default.
        help: The option's help text (``(default: ...)`` is appended unless ``show_default=False``).
        group: A key of :data:`OPTION_GROUPS`.
        identity: False for a field that does not change the result (logging, saving, generation).
        **cli: ``type``, ``choices``, ``nargs``, ``negate`` or ``show_default`` of the option.

    Returns:
        A :func:`dataclasses.field`.
    """
    metadata = {"help": help, "group": group, **cli}
    if not identity:
        metadata["identity"] = False
    return field(default=default, metadata=metadata)


def _io(default: Any, help: str, **cli: Any) -> Any:
    return option(default, help, "io", identity=False, **cli)


def _generation(default: Any, help: str, **cli: Any) -> Any:
    return option(default, help, "generation", identity=False, **cli)


@dataclass
class TrainConfig:
    """What defines a run (the run directory's ``hparams``, ``data`` and ``model``)."""

    method: str = option(
        "eflat-lora", "training method: lora, lora-sam, flat-lora, eflat-lora, rwp-lora, bar", "method"
    )
    task: str | None = option(  # None: inferred from the data (classification otherwise)
        None,
        "classification or causal-lm (default: inferred from the data; an E2E folder or prompt/target columns mean "
        "causal-lm)",
        "data",
        choices=("classification", "causal-lm"),
        show_default=False,
    )
    data: str | None = option(  # None: tweets (classification) or the bundled E2E (causal-lm)
        None,
        "classification: tweets (bundled, the default), a GLUE task name or hub dataset id (needs flatlora[hub]), "
        "a GLUE-format folder, a folder datasets reads, or a CSV/TSV/JSONL file; causal-lm: e2e (bundled, the "
        "default), an E2E folder (trainset/devset.csv, testset_w_refs.csv) or a CSV/TSV/JSONL file with "
        "prompt/target columns",
        "data",
    )
    model: str | None = option(  # None: the bundled all-MiniLM-L6-v2 or SmolLM2-135M-Instruct
        None,
        "HF hub id or local folder (default: the bundled all-MiniLM-L6-v2; causal-lm: SmolLM2-135M-Instruct)",
        "model",
    )
    shots: int | None = option(  # None trains on the whole train split
        16,
        "k examples per class (causal-lm: k prompts, each with all its references; LM-BFF few-shot); "
        "'none' trains on the whole train split",
        "data",
        type=optional_int,
    )
    seed: int = option(13, "seed of the few-shot sample, the head's init, data order and dropout", "data")
    test_cap: int | str | None = option(  # "auto": 1000 examples (classification), 50 prompts (causal LM)
        "auto",
        "evaluate on at most this many test examples (causal-lm: prompts with all their references), drawn with "
        "seed 42; 'none' for all; default auto: 1000 examples, or 50 prompts for causal-lm",
        "data",
        type=test_cap_value,
        show_default=False,
    )
    text_column: str | None = option(
        None, "text column of a CSV/TSV/JSONL file (default: detected); causal-lm: alone, plain LM", "data"
    )
    label_column: str | None = option(None, "label column of a CSV/TSV/JSONL file (default: label)", "data")
    prompt_column: str | None = option(
        None, "causal-lm: prompt column of a CSV/TSV/JSONL file (default: detected, e.g. prompt, mr)", "data"
    )
    target_column: str | None = option(
        None, "causal-lm: target column (default: detected, e.g. target, ref); loss on its tokens only", "data"
    )
    gguf_file: str | None = option(
        None, "causal-lm: a GGUF checkpoint (a .gguf path, or a file name inside --model's folder)", "model"
    )
    chat_template: bool = option(
        True, "causal-lm: do not wrap prompts in the tokenizer's chat template", "model", negate="--no-chat-template"
    )
    # method
    rho: float = option(0.05, "perturbation radius (full weight space for flat-lora / eflat-lora)", "method")
    rho_schedule: str = option("constant", "constant, linear or cosine from --rho to --rho-min", "method")
    rho_min: float = option(0.0, "final radius of a rho schedule", "method")
    beta: float = option(0.9, "eflat-lora: EMA weight of the previous average, in [0, 1)", "method")
    ema_radius: str = option(  # ema (the paper's rule) or rho (e_bar applied rescaled to radius rho)
        "ema",
        "eflat-lora: ema applies the EMA itself (the paper's rule), rho applies it rescaled to radius rho",
        "method",
        choices=("ema", "rho"),
    )
    norm: str = option("global", "flat-lora / eflat-lora: global (SAM's ball over all layers) or layer", "method")
    adaptive: bool = option(False, "lora-sam: adaptive SAM (ASAM)", "method")
    diagnostics_every: int = option(0, "eflat-lora: run the Theorem-2 check every k steps (0: off)", "method")
    perturbation_sync: str = option(
        "local", "multi-process: local (per-rank perturbation) or global (all-reduced first pass)", "method"
    )
    # LoRA
    r: int = option(8, "LoRA rank", "model")
    alpha: float = option(16, "LoRA alpha (scaling alpha / r)", "model")
    lora_dropout: float = option(0.1, "dropout on the LoRA branch", "model")
    target_modules: list[str] | None = option(  # noqa: RUF009 (option() is a dataclasses.field)
        None, "module names to adapt (default: query/value; c_attn for GPT-2)", "model", nargs="+", show_default=False
    )
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)", "model")
    dtype: str = option(  # absent from hparams when float32: identities from before the option still match
        "float32",
        "dtype the frozen base weights are loaded in (bfloat16/float16 halve their memory); the LoRA factors, a "
        "trained head and the optimizer state stay float32. Unlike --precision (autocast: the matmuls of any "
        "weights in half precision), it changes what the base weights hold",
        "model",
        choices=BASE_DTYPES,
    )
    # optimisation
    steps: int = option(200, "optimizer steps", "optim")
    lr: float = option(1e-3, "learning rate", "optim")
    optim: str = option("adamw_torch", "base optimizer, as TrainingArguments.optim (adamw_torch, sgd, ...)", "optim")
    weight_decay: float = option(0.0, "weight decay of the base optimizer", "optim")
    lr_schedule: str = option("linear", "learning-rate schedule (linear, constant, cosine, ...)", "optim")
    warmup_ratio: float = option(0.0, "fraction of steps of linear warm-up", "optim")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", "optim")
    batch_size: int = option(8, "examples per device per micro-batch", "optim")
    grad_accum: int = option(1, "micro-batches per optimizer step", "optim")
    max_length: int = option(128, "tokens per example (longer ones are truncated)", "optim")
    precision: str = option(
        "fp32", "fp32, bf16 or fp16 (mixed precision: autocast; the weights keep the dtype --dtype gives them)", "optim"
    )
    gradient_checkpointing: bool = option(  # the same losses and adapter to round-off: not part of the identity
        False,
        "recompute each transformer layer in the backward (non-reentrant activation checkpointing): far less "
        "activation memory for about one more forward a pass; results unchanged",
        "optim",
        identity=False,
    )
    # logging and saving (not part of the run's identity)
    log_every: int = _io(10, "log (metrics.jsonl) every k steps")
    eval_every: int = _io(0, "evaluate on the dev split every k steps (0: only at the end)")
    eval_batch_size: int | None = _io(  # None: 64, causal LM 8
        None, "examples per evaluation (and generation) batch (default: 64; causal-lm: 8)", type=int, show_default=False
    )
    save_every: int = _io(50, "checkpoint (for --resume) every k steps")
    trajectory_every: int = _io(0, "save the adapter every k steps to trajectory/ (0: off)")
    progress: bool = _io(True, "no progress bars", negate="--no-progress")
    # generation at the final evaluation (causal LM; not part of the run's identity)
    generate: int = _generation(
        0,
        "causal-lm: at the end, generate for N test prompts and score them (BLEU, NIST, METEOR, ROUGE_L, CIDEr); "
        "0: off",
    )
    decoding: str = _generation(
        "greedy",
        "causal-lm generation: greedy, or e2e (beam 10, length penalty 0.9, no repeated 4-grams, 64 tokens)",
        choices=("greedy", "e2e"),
    )
    num_beams: int | None = _generation(
        None, "causal-lm generation: beams (overrides --decoding's)", type=int, show_default=False
    )
    max_new_tokens: int | None = _generation(
        None, "causal-lm generation: new tokens at most (overrides --decoding's 64)", type=int, show_default=False
    )

    @classmethod
    def from_namespace(cls, values: Any, **override: Any) -> TrainConfig:
        """A config of every field ``values`` has an attribute for (an argparse namespace), then ``override``.

        Args:
            values: Any object; its attributes named as fields are taken, the others ignored.
            **override: Field values that replace those of ``values``.

        Returns:
            The config; fields named by neither keep their defaults.
        """
        taken = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls) if hasattr(values, f.name)}
        return cls(**{**taken, **override})

    def method_kwargs(self) -> dict[str, Any]:
        """The options of this config that apply to its method."""
        from flatlora.methods import method_options

        options = method_options(self.method)
        candidates = ("rho", "rho_schedule", "rho_min", "beta", "ema_radius", "norm", "adaptive", "diagnostics_every")
        return {k: getattr(self, k) for k in (*candidates, "seed") if k in options}

    def lora_options(self) -> LoraOptions:
        """The adapter's shape, as the model loaders take it (``lora=``)."""
        from flatlora.models import LoraOptions

        return LoraOptions(
            r=self.r,
            alpha=self.alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            use_rslora=self.rslora,
        )

    def hparams(self) -> dict[str, Any]:
        """The run's identity: every field that changes the result, minus data and model."""
        skip = {"method", "task", "data", "model", "shots", "test_cap", "text_column", "label_column"}
        skip |= {"prompt_column", "target_column"}
        if self.task != "causal-lm":  # a classifier's identity is what it was before causal LMs existed
            skip |= set(CAUSAL_ONLY)
        out = {}
        for f in dataclasses.fields(self):
            if f.name in skip or f.metadata.get("identity") is False:
                continue
            out[f.name] = getattr(self, f.name)
        if self.method == "lora":  # rho and friends do not touch plain LoRA
            for key in ("rho", "rho_schedule", "rho_min", "beta", "norm", "adaptive", "diagnostics_every"):
                out.pop(key)
        if out.get("ema_radius") == "ema":  # the default: identities from before the option existed still match
            out.pop("ema_radius")
        if out.get("dtype") == "float32":  # the default, as above
            out.pop("dtype")
        return out

    def data_spec(self) -> dict[str, Any]:
        """What run.json records of the data; a local path is made absolute, so the run is re-read from anywhere."""
        spec = {
            "spec": absolute_data_spec(self.data),
            "shots": self.shots,
            "seed": self.seed,
            "test_cap": self.test_cap,
            "text_column": self.text_column,
            "label_column": self.label_column,
        }
        if self.task == "causal-lm":
            spec.pop("label_column")
            spec.update(task=self.task, prompt_column=self.prompt_column, target_column=self.target_column)
        return spec


def validate(config: TrainConfig) -> None:
    """Check the numbers of a config and the precision the device can train in, each with the fix.

    Args:
        config: The run's settings, before :func:`flatlora.tasks.resolve_task`.

    Raises:
        FlatLoraError: the first option out of range (naming its flag), an unknown method,
            or a precision the device cannot train in.
    """
    import torch

    from flatlora.base_dtype import check_dtype
    from flatlora.methods import get_method_class
    from flatlora.precision import check_precision
    from flatlora.trainer.two_pass import PERTURBATION_SYNC

    get_method_class(config.method)
    positive = ("steps", "batch_size", "grad_accum", "r", "max_length", "eval_batch_size", "log_every", "save_every")
    for name in positive:
        value = getattr(config, name)
        if value is None and name == "eval_batch_size":  # the task's default, set by resolve_task
            continue
        if not (isinstance(value, int) and value >= 1):
            raise FlatLoraError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
    for name in ("eval_every", "trajectory_every", "diagnostics_every"):
        value = getattr(config, name)
        if not (isinstance(value, int) and value >= 0):
            raise FlatLoraError(f"--{name.replace('_', '-')} must be a whole number >= 0 (0: off), got {value!r}")
    if config.ema_radius not in ("ema", "rho"):
        raise FlatLoraError(f"unknown --ema-radius {config.ema_radius!r}: use ema (the paper's rule) or rho")
    if config.ema_radius != "ema" and config.method != "eflat-lora":
        raise FlatLoraError(f"--ema-radius applies to eflat-lora, not {config.method}: drop it")
    if config.perturbation_sync not in PERTURBATION_SYNC:
        raise FlatLoraError(f"unknown --perturbation-sync {config.perturbation_sync!r}: use local or global")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise FlatLoraError(f"--lr must be a positive number, got {config.lr}")
    check_precision(config.precision, "cuda" if torch.cuda.is_available() else "cpu")
    check_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu")
