"""One training run end to end: data, model, FlatLoraTrainer, run directory. Used by the CLI.

Everything a user can get wrong (method, data, model, k, output folder) is checked before
anything is written, so a refused run leaves no trace.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from flatlora.errors import FlatLoraError


@dataclass
class TrainConfig:
    """What defines a run (the run directory's ``hparams``, ``data`` and ``model``)."""

    method: str = "eflat-lora"
    data: str = "tweets"
    model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    shots: int | None = 16  # k per class (LM-BFF); None trains on the whole train split
    seed: int = 13
    test_cap: int | None = 1000
    text_column: str | None = None
    label_column: str | None = None
    # method
    rho: float = 0.05
    rho_schedule: str = "constant"
    rho_min: float = 0.0
    beta: float = 0.9
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
    eval_batch_size: int = field(default=64, metadata={"identity": False})
    save_every: int = field(default=50, metadata={"identity": False})
    trajectory_every: int = field(default=0, metadata={"identity": False})
    progress: bool = field(default=True, metadata={"identity": False})

    def method_kwargs(self) -> dict[str, Any]:
        """The options of this config that apply to its method."""
        from flatlora.methods import method_options

        options = method_options(self.method)
        candidates = {
            "rho": self.rho,
            "rho_schedule": self.rho_schedule,
            "rho_min": self.rho_min,
            "beta": self.beta,
            "norm": self.norm,
            "adaptive": self.adaptive,
            "diagnostics_every": self.diagnostics_every,
            "seed": self.seed,
        }
        return {k: v for k, v in candidates.items() if k in options}

    def hparams(self) -> dict[str, Any]:
        """The run's identity: every field that changes the result, minus data and model."""
        skip = {"method", "data", "model", "shots", "test_cap", "text_column", "label_column"}
        out = {}
        for f in dataclasses.fields(self):
            if f.name in skip or f.metadata.get("identity") is False:
                continue
            out[f.name] = getattr(self, f.name)
        if self.method == "lora":  # rho and friends do not touch plain LoRA
            for key in ("rho", "rho_schedule", "rho_min", "beta", "norm", "adaptive", "diagnostics_every"):
                out.pop(key)
        return out

    def data_spec(self) -> dict[str, Any]:
        return {
            "spec": self.data,
            "shots": self.shots,
            "seed": self.seed,
            "test_cap": self.test_cap,
            "text_column": self.text_column,
            "label_column": self.label_column,
        }


def validate(config: TrainConfig) -> None:
    """Check the numbers of a config and the precision the device can train in, each with the fix."""
    import torch

    from flatlora.methods import get_method_class
    from flatlora.precision import check_precision

    get_method_class(config.method)
    positive = {"steps": config.steps, "batch_size": config.batch_size, "grad_accum": config.grad_accum, "r": config.r}
    for name, value in positive.items():
        if not (isinstance(value, int) and value >= 1):
            raise FlatLoraError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
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
    if config.shots is not None:
        return make_few_shot(splits, config.shots, config.seed, test_cap=config.test_cap)
    if "test" not in splits:
        raise FlatLoraError(
            f"data {config.data!r} has no test split: pass --shots K (a test set is then held out), "
            "or a GLUE folder with test.tsv"
        )
    return {**splits, "test": cap_test(splits["test"], config.test_cap)}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _accuracy(eval_pred) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def train_run(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False):
    """Train one run into the run directory ``out`` and return it as a :class:`flatlora.runs.Run`."""
    import torch
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from flatlora.data import TextClassificationCollator
    from flatlora.methods import make_method
    from flatlora.models import canonical_model_id, load_classifier
    from flatlora.runs import RunDir, latest_checkpoint, load_run
    from flatlora.trainer import FlatLoraTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; training keeps its own
    validate(config)
    splits = prepare_data(config)
    train = splits["train"]
    model, tokenizer = load_classifier(
        config.model,
        num_labels=train.num_labels,
        r=config.r,
        alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.rslora,
        seed=config.seed,
    )
    # Build the method once on the model now, so that its options are checked before anything is written.
    make_method(config.method, model, lr=config.lr, total_steps=config.steps, **config.method_kwargs())
    model_id = canonical_model_id(config.model)
    data = {**config.data_spec(), "label_names": train.label_names, "sizes": {k: len(v) for k, v in splits.items()}}
    hparams = config.hparams()
    is_main = _rank() == 0
    run = (
        RunDir.create(
            out, method=config.method, hparams=hparams, data=data, model=model_id, resume=resume, overwrite=overwrite
        )
        if is_main
        else None
    )
    # Every rank resumes from the same checkpoint; only rank 0 writes the run directory.
    checkpoint = latest_checkpoint(Path(out) / "checkpoint") if resume else None
    start = time.perf_counter()
    try:
        args = TrainingArguments(
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
            eval_strategy="steps" if config.eval_every and "dev" in splits else "no",
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
        )
        trainer = FlatLoraTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=splits.get("dev") if config.eval_every else None,
            data_collator=TextClassificationCollator(tokenizer, config.max_length),
            processing_class=tokenizer,
            compute_metrics=_accuracy,
            method=config.method,
            method_kwargs=config.method_kwargs(),
            perturbation_sync=config.perturbation_sync,
        )
        _quiet_progress(trainer)
        if run is not None:
            trainer.add_callback(_RunDirCallback(run, model, config.trajectory_every))
            # The steps after the checkpoint are trained (and logged) again.
            run.truncate_metrics(int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        metrics: dict[str, float] = {}
        for split in ("train", "dev", "test"):
            if split in splits and len(splits[split]):
                result = trainer.evaluate(splits[split], metric_key_prefix=split)
                metrics[f"{split}_loss"] = float(result[f"{split}_loss"])
                metrics[f"{split}_accuracy"] = float(result[f"{split}_accuracy"])
        if run is not None:
            run.save_adapter(model)
            run.finish(metrics, wall_time_s=time.perf_counter() - start)
    except BaseException as err:
        if run is not None:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            run.fail(message if not isinstance(err, KeyboardInterrupt) else "interrupted")
        raise
    return load_run(out) if is_main else None


def _quiet_progress(trainer) -> None:
    """Keep tqdm's bar but stop it (or its stand-in) printing every log dict: metrics.jsonl holds them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.pop_callback(PrinterCallback)

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())


class _RunDirCallback(TrainerCallback):
    """Appends each log to metrics.jsonl and saves trajectory adapters every k steps."""

    def __init__(self, run, model, trajectory_every: int) -> None:
        self.run, self.model, self.every = run, model, trajectory_every

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.run.append_metrics({"step": state.global_step, **logs})

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.run.save_adapter(self.model, step=state.global_step)
