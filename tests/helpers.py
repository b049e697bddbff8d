"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import TrainingArguments

from flatlora.testing import tiny_batches

STEPS = 6  # Trainer tests: optimizer steps of a run


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter that requires grad, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes ({} when ``root`` does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_tree(source: Path, dest: Path) -> Path:
    """A writable copy of a session folder (session fixtures are read only: tests that write copy them)."""
    shutil.copytree(source, dest)
    return Path(dest)


def report_into_runs(runs: Path, examples: int) -> Path:
    """``flatlora report RUNS --quick`` into RUNS/report on ``examples`` probe examples in one batch (as the
    demo leaves its runs for the dashboard); returns ``runs``."""
    from flatlora import cli

    argv = ["report", str(runs), "--out", str(Path(runs) / "report"), "--quick", "--examples", str(examples),
            "--batch-size", str(examples), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    return Path(runs)


def examples(n_batches: int = 3, batch_size: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """The tiny BERT task as single examples (the Trainer batches them in order)."""
    out = []
    for batch in tiny_batches("bert", n_batches, batch_size, seed=seed):
        out += [{k: v[i] for k, v in batch.items()} for i in range(batch_size)]
    return out


def args_for(tmp_path: Path, **overrides) -> TrainingArguments:
    """TrainingArguments of the Trainer tests: CPU, sequential data, constant lr, a log per step."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def step_logs(trainer) -> list[dict]:
    """The per-step records of a Trainer's log history (without the run summary or evaluations)."""
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
