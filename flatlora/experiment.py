"""One training run end to end: the task's setup, FlatLoraTrainer, the run directory. Used by the CLI.

Everything a user can get wrong (method, data, model, k, output folder) is checked before
anything is written, so a refused run leaves no trace. What differs between tasks comes from
:func:`flatlora.tasks.setup_task`; this module only orchestrates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flatlora.config import TrainConfig, validate
from flatlora.errors import FlatLoraError
from flatlora.log_keys import FINAL_SPLITS, final_key

__all__ = ["TRAINING_ARGUMENTS", "TrainConfig", "train_run", "training_arguments", "validate"]

TRAINING_ARGUMENTS = {
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_steps": "steps",
    "learning_rate": "lr",
    "optim": "optim",
    "weight_decay": "weight_decay",
    "lr_scheduler_type": "lr_schedule",
    "warmup_steps": "warmup_ratio",  # transformers 5: a float < 1 is a fraction of the steps
    "max_grad_norm": "max_grad_norm",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "seed": "seed",
    "data_seed": "seed",
}
"""TrainingArguments taken as they are from a TrainConfig: argument name -> field name."""


def train_run(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False):
    """Train one run into the run directory ``out``.

    The task (classification or causal-lm) comes from ``config.task`` or the data. Under several
    processes (torchrun, accelerate launch) every rank checks everything a user can get wrong
    before any rank writes, and they agree: all go on, or all stop with the same one-line error.

    Args:
        config: The run's settings.
        out: The run directory.
        resume: Continue the unfinished run in ``out`` from its latest checkpoint.
        overwrite: Replace whatever ``out`` holds.

    Returns:
        On rank 0 the finished run (a :class:`flatlora.runs.Run`); None on other ranks.

    Raises:
        FlatLoraError: a refused config, data, model or output folder (nothing written), or
            transformers refusing a training option.
    """
    from transformers.utils import logging as hf_logging

    from flatlora import distributed
    from flatlora.atomic import check_writable
    from flatlora.checkpointing import enable_gradient_checkpointing
    from flatlora.methods import make_method
    from flatlora.run_callbacks import RunDirCallback, read_books, show_progress
    from flatlora.runs import RunDir, RunIdentity, latest_checkpoint, load_run
    from flatlora.tasks import resolve_task, setup_task
    from flatlora.trainer import FlatLoraTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; training keeps its own
    distributed.init()
    with distributed.agreed():
        validate(config)
        config = resolve_task(config)
        setup = setup_task(config)
        model = setup.model
        if config.gradient_checkpointing:  # transformers' own, non-reentrant: exact for every method
            enable_gradient_checkpointing(model)
        # Build the method once on the model now, so that its options are checked before anything is written.
        make_method(config.method, model, lr=config.lr, total_steps=config.steps, **config.method_kwargs())
        identity = RunIdentity(method=config.method, hparams=config.hparams(), data=setup.data, model=setup.model_id)
        RunDir.check(out, identity, resume=resume, overwrite=overwrite)
        # Every rank resumes from the same checkpoint (read before rank 0 writes anything).
        checkpoint = latest_checkpoint(Path(out) / "checkpoint") if resume else None
        args = training_arguments(config, out, has_dev="dev" in setup.datasets)
        check_writable(out, folder=False)  # a file at --out itself gets RunDir's own refusal
    run = RunDir.create(out, identity, resume=resume, overwrite=overwrite) if distributed.is_main() else None
    if run is not None:
        # gradient checkpointing: how it ran, not what it is (the identity leaves it out)
        ran = {"gradient_checkpointing": True} if config.gradient_checkpointing else {}
        run.update(task=config.task, **setup.run_info, **ran)
    distributed.barrier()
    try:
        trainer = FlatLoraTrainer(
            model=model,
            args=args,
            train_dataset=setup.datasets["train"],
            eval_dataset=setup.datasets.get("dev") if config.eval_every else None,
            data_collator=setup.collator,
            processing_class=setup.tokenizer,
            compute_metrics=setup.compute_metrics,
            preprocess_logits_for_metrics=setup.preprocess_logits,
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
        metrics: dict[str, Any] = {}
        for split in FINAL_SPLITS:
            if split in setup.datasets and len(setup.datasets[split]):
                result = trainer.evaluate(setup.datasets[split], metric_key_prefix=split)
                for what in setup.final_metrics:
                    metrics[final_key(split, what)] = float(result[final_key(split, what)])
        if setup.after_training is not None and distributed.is_main():
            metrics.update(setup.after_training(run, trainer.state.global_step))
        if run is not None:
            run.save_adapter(model)
            run.finish(metrics, wall_time_s=books.wall_time())
    except BaseException as err:
        if run is not None:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            run.fail(message if not isinstance(err, KeyboardInterrupt) else "interrupted")
        raise
    return load_run(out) if run is not None else None


def training_arguments(config: TrainConfig, out: str | Path, *, has_dev: bool):
    """The run's TrainingArguments.

    Args:
        config: A resolved config (its ``eval_batch_size`` set).
        out: The run directory; checkpoints go to its ``checkpoint/``.
        has_dev: Whether the task has a dev split to evaluate every ``eval_every`` steps.

    Returns:
        The ``transformers.TrainingArguments``.

    Raises:
        FlatLoraError: transformers refuses an option (--optim, --lr-schedule), in one line.
    """
    import torch
    from transformers import TrainingArguments

    copied = {argument: getattr(config, name) for argument, name in TRAINING_ARGUMENTS.items()}
    try:
        return TrainingArguments(
            output_dir=str(Path(out) / "checkpoint"),
            **copied,
            bf16=config.precision == "bf16",
            fp16=config.precision == "fp16",
            eval_strategy="steps" if config.eval_every and has_dev else "no",
            eval_steps=config.eval_every or None,
            save_strategy="steps",
            save_total_limit=1,
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
