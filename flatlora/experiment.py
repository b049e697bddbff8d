"""One training run end to end: data, model, FlatLoraTrainer, run directory. Used by the CLI.

Everything a user can get wrong (method, data, model, k, output folder) is checked before
anything is written, so a refused run leaves no trace.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora.log_keys import FINAL_SPLITS, final_key
from flatlora.runs import absolute_data_spec


@dataclass
class TrainConfig:
    """What defines a run (the run directory's ``hparams``, ``data`` and ``model``)."""

    method: str = "eflat-lora"
    task: str | None = None  # classification | causal-lm; None: inferred from the data (classification otherwise)
    data: str | None = None  # None: tweets (classification) or the bundled E2E (causal-lm)
    model: str | None = None  # None: the bundled all-MiniLM-L6-v2 or SmolLM2-135M-Instruct
    shots: int | None = 16  # k per class (LM-BFF), k prompts for causal LM; None trains on the whole train split
    seed: int = 13
    test_cap: int | str | None = "auto"  # "auto": 1000 examples (classification), 50 prompts (causal LM)
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    target_column: str | None = None
    gguf_file: str | None = None
    chat_template: bool = True
    # method
    rho: float = 0.05
    rho_schedule: str = "constant"
    rho_min: float = 0.0
    beta: float = 0.9
    ema_radius: str = "ema"  # eflat-lora: ema (the paper's rule) or rho (e_bar applied rescaled to radius rho)
    norm: str = "global"
    adaptive: bool = False
    diagnostics_every: int = 0
    perturbation_sync: str = "local"
    # LoRA
    r: int = 8
    alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    rslora: bool = False
    # optimisation
    steps: int = 200
    lr: float = 1e-3
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # logging and saving (not part of the run's identity)
    log_every: int = field(default=10, metadata={"identity": False})
    eval_every: int = field(default=0, metadata={"identity": False})
    eval_batch_size: int | None = field(default=None, metadata={"identity": False})  # None: 64, causal LM 8
    save_every: int = field(default=50, metadata={"identity": False})
    trajectory_every: int = field(default=0, metadata={"identity": False})
    progress: bool = field(default=True, metadata={"identity": False})
    # generation at the final evaluation (causal LM; not part of the run's identity)
    generate: int = field(default=0, metadata={"identity": False})
    decoding: str = field(default="greedy", metadata={"identity": False})
    num_beams: int | None = field(default=None, metadata={"identity": False})
    max_new_tokens: int | None = field(default=None, metadata={"identity": False})

    def method_kwargs(self) -> dict[str, Any]:
        """The options of this config that apply to its method."""
        from flatlora.methods import method_options

        options = method_options(self.method)
        candidates = {
            "rho": self.rho,
            "rho_schedule": self.rho_schedule,
            "rho_min": self.rho_min,
            "beta": self.beta,
            "ema_radius": self.ema_radius,
            "norm": self.norm,
            "adaptive": self.adaptive,
            "diagnostics_every": self.diagnostics_every,
            "seed": self.seed,
        }
        return {k: v for k, v in candidates.items() if k in options}

    def lora_options(self) -> dict[str, Any]:
        """The keyword arguments of the model loaders that shape the adapter."""
        return dict(
            r=self.r,
            alpha=self.alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            use_rslora=self.rslora,
            seed=self.seed,
        )

    def hparams(self) -> dict[str, Any]:
        """The run's identity: every field that changes the result, minus data and model."""
        from flatlora.experiment_lm import CAUSAL_ONLY

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
    """Check the numbers of a config and the precision the device can train in, each with the fix."""
    import torch

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


def prepare_data(config: TrainConfig):
    """{"train", "dev"?, "test"} TextDatasets for the config (few-shot when ``shots`` is set)."""
    from flatlora.data import cap_test, load_data, make_few_shot

    kwargs = {}
    if config.text_column is not None:
        kwargs["text_column"] = config.text_column
    if config.label_column is not None:
        kwargs["label_column"] = config.label_column
    splits = load_data(config.data, **kwargs)
    if config.task == "causal-lm":
        raise FlatLoraError("prepare_data builds classification splits: use experiment_lm.prepare_causal_data")
    if config.shots is not None:
        return make_few_shot(splits, config.shots, config.seed, test_cap=config.test_cap)
    if "test" not in splits:
        raise FlatLoraError(
            f"data {config.data!r} has no test split: pass --shots K (a test set is then held out), "
            "or a GLUE folder with test.tsv"
        )
    return {**splits, "test": cap_test(splits["test"], config.test_cap)}


def _accuracy(eval_pred) -> dict[str, float]:
    """Accuracy and the mean cross-entropy per example, from the gathered logits and labels.

    The returned ``loss`` replaces the Trainer's own, which averages per-batch means and, over
    several processes, weighs the duplicates that even out an uneven last batch.
    """
    import numpy as np

    logits, labels = eval_pred
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    labels = np.asarray(labels)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return {"loss": float(loss), "accuracy": float((logits.argmax(-1) == labels).mean())}


def train_run(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False):
    """Train one run into the run directory ``out`` and return it as a :class:`flatlora.runs.Run`.

    The task (classification or causal-lm) comes from ``config.task`` or the data. Under several
    processes (torchrun, accelerate launch) every rank checks everything a user can get wrong
    before any rank writes, and they agree: all go on, or all stop with the same one-line error.
    Rank 0 alone writes the run directory and returns the run; other ranks return None.
    """
    from transformers.utils import logging as hf_logging

    from flatlora import distributed
    from flatlora.atomic import check_writable
    from flatlora.experiment_lm import resolve_task
    from flatlora.methods import make_method
    from flatlora.run_callbacks import RunDirCallback, read_books, show_progress
    from flatlora.runs import RunDir, latest_checkpoint, load_run
    from flatlora.trainer import FlatLoraTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; training keeps its own
    distributed.init()
    with distributed.agreed():
        validate(config)
        config = resolve_task(config)
        setup = _causal_setup(config) if config.task == "causal-lm" else _classification_setup(config)
        model = setup["model"]
        # Build the method once on the model now, so that its options are checked before anything is written.
        make_method(config.method, model, lr=config.lr, total_steps=config.steps, **config.method_kwargs())
        identity = dict(method=config.method, hparams=config.hparams(), data=setup["data"], model=setup["model_id"])
        RunDir.check(out, **identity, resume=resume, overwrite=overwrite)
        # Every rank resumes from the same checkpoint (read before rank 0 writes anything).
        checkpoint = latest_checkpoint(Path(out) / "checkpoint") if resume else None
        args = training_arguments(config, out, has_dev="dev" in setup["eval"])
        check_writable(out, folder=False)  # a file at --out itself gets RunDir's own refusal
    run = RunDir.create(out, **identity, resume=resume, overwrite=overwrite) if distributed.is_main() else None
    if run is not None:
        run.update(task=config.task, **setup["extra"])
    distributed.barrier()
    try:
        trainer = FlatLoraTrainer(
            model=model,
            args=args,
            train_dataset=setup["eval"]["train"],
            eval_dataset=setup["eval"].get("dev") if config.eval_every else None,
            data_collator=setup["collator"],
            processing_class=setup["tokenizer"],
            compute_metrics=setup["compute_metrics"],
            preprocess_logits_for_metrics=setup.get("preprocess_logits"),
            method=config.method,
            method_kwargs=config.method_kwargs(),
            perturbation_sync=config.perturbation_sync,
        )
        show_progress(trainer, config.method, plain=config.progress and not sys.stderr.isatty())
        books = None
        if run is not None:
            books = RunDirCallback(run, model, config.trajectory_every, read_books(checkpoint))
            trainer.add_callback(books)
            # The steps after the checkpoint are trained (and logged) again, the final records written anew.
            run.truncate_metrics(int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if books is not None:
            books.final = True
        metrics: dict[str, float] = {}
        for split in FINAL_SPLITS:
            if split in setup["eval"] and len(setup["eval"][split]):
                result = trainer.evaluate(setup["eval"][split], metric_key_prefix=split)
                for what in setup["final_metrics"]:
                    metrics[final_key(split, what)] = float(result[final_key(split, what)])
        if config.task == "causal-lm" and config.generate and distributed.is_main():
            from flatlora.experiment_lm import generate_and_score
            from flatlora.log_keys import PHASE, PHASE_FINAL

            scored = generate_and_score(config, model, setup["tokenizer"], setup["splits"]["test"], run)
            metrics.update(scored["metrics"])
            if run is not None:
                run.append_metrics({PHASE: PHASE_FINAL, "step": trainer.state.global_step, **scored["metrics"]})
                run.update(generation=scored["generation"])
        if run is not None:
            run.save_adapter(model)
            run.finish(metrics, wall_time_s=books.wall_time())
    except BaseException as err:
        if run is not None:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            run.fail(message if not isinstance(err, KeyboardInterrupt) else "interrupted")
        raise
    return load_run(out) if run is not None else None


def _classification_setup(config: TrainConfig) -> dict[str, Any]:
    from flatlora.data import TextClassificationCollator
    from flatlora.models import canonical_model_id, load_classifier

    splits = prepare_data(config)
    train = splits["train"]
    model, tokenizer = load_classifier(config.model, num_labels=train.num_labels, **config.lora_options())
    data = {**config.data_spec(), "label_names": train.label_names, "sizes": {k: len(v) for k, v in splits.items()}}
    return {
        "model": model,
        "tokenizer": tokenizer,
        "model_id": canonical_model_id(config.model),
        "data": data,
        "splits": splits,
        "eval": splits,
        "collator": TextClassificationCollator(tokenizer, config.max_length),
        "compute_metrics": _accuracy,
        "final_metrics": ("loss", "accuracy"),
        "extra": {},
    }


def _causal_setup(config: TrainConfig) -> dict[str, Any]:
    from flatlora.causal_lm import DEFAULT_LLM_WEIGHTS, canonical_llm_id, is_default_llm, load_causal_lm
    from flatlora.data.lm_encode import CausalLMCollator, uses_chat_template
    from flatlora.experiment_lm import causal_metrics, data_sizes, encode_splits, prepare_causal_data, token_nll

    splits = prepare_causal_data(config)
    model, tokenizer = load_causal_lm(config.model, gguf_file=config.gguf_file, **config.lora_options())
    encoded = encode_splits(config, splits, tokenizer)
    data = {**config.data_spec(), "sizes": data_sizes(splits, encoded)}
    default = is_default_llm(config.model) and config.gguf_file is None
    extra = {
        "base_weights": DEFAULT_LLM_WEIGHTS if default else ("GGUF dequantized to float" if config.gguf_file else None),
        "chat_template_used": uses_chat_template(tokenizer, config.chat_template),
    }
    return {
        "model": model,
        "tokenizer": tokenizer,
        "model_id": canonical_llm_id(config.model) if config.gguf_file is None else (config.model or config.gguf_file),
        "data": data,
        "splits": splits,
        "eval": encoded,
        "collator": CausalLMCollator(tokenizer.pad_token_id),
        "compute_metrics": causal_metrics,
        "preprocess_logits": token_nll,
        "final_metrics": ("loss", "perplexity"),
        "extra": extra,
    }


def training_arguments(config: TrainConfig, out: str | Path, *, has_dev: bool):
    """The run's TrainingArguments; an option transformers refuses (--optim, --lr-schedule) is a one-line error."""
    import torch
    from transformers import TrainingArguments

    try:
        return TrainingArguments(
            output_dir=str(Path(out) / "checkpoint"),
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.eval_batch_size,
            gradient_accumulation_steps=config.grad_accum,
            max_steps=config.steps,
            learning_rate=config.lr,
            optim=config.optim,
            weight_decay=config.weight_decay,
            lr_scheduler_type=config.lr_schedule,
            warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
            max_grad_norm=config.max_grad_norm,
            bf16=config.precision == "bf16",
            fp16=config.precision == "fp16",
            logging_steps=config.log_every,
            eval_strategy="steps" if config.eval_every and has_dev else "no",
            eval_steps=config.eval_every or None,
            save_strategy="steps",
            save_steps=config.save_every,
            save_total_limit=1,
            seed=config.seed,
            data_seed=config.seed,
            remove_unused_columns=False,
            report_to=[],
            disable_tqdm=not config.progress,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,  # every LoRA factor and the head take part in each forward
        )
    except ValueError as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0].split(", please")[0][:200]
        raise FlatLoraError(
            f"transformers refuses these training options ({first_line}): "
            "check --optim and --lr-schedule (flatlora train --help)"
        ) from None
