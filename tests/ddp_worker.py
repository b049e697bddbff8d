"""Trains the tiny BERT with lora, eflat-lora and flat-lora (global sync) under FlatLoraTrainer.

Run by tests/test_ddp.py, once as a plain process (batch 8) and once under
``torchrun --nproc_per_node=2`` (4 per rank): the same global batch. Rank 0 saves the final
trainable weights of each method to ``<out>/<method>.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import TrainingArguments, default_data_collator

from flatlora.testing import tiny_batches, tiny_model
from flatlora.trainer import FlatLoraTrainer

RUNS = {
    "lora": ({}, "local"),
    "eflat-lora": ({"rho": 0.05}, "local"),
    "flat-lora": ({"rho": 0.05}, "global"),
    "flat-lora-local": ({"rho": 0.05}, "local"),  # per-rank perturbation: must NOT match
}


def main(out: Path, per_device: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = []
    for batch in tiny_batches("bert", 4, 8, seed=1):
        data += [{k: v[i] for k, v in batch.items()} for i in range(8)]
    for name, (options, sync) in RUNS.items():
        model = tiny_model("bert", dtype=torch.float64)  # float64: rounding far below the tolerance
        args = TrainingArguments(
            output_dir=str(out / f"trainer-{name}"),
            per_device_train_batch_size=per_device,
            max_steps=4,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            weight_decay=0.0,
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            disable_tqdm=True,
            log_level="error",
            seed=0,
        )
        trainer = FlatLoraTrainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=default_data_collator,
            method=name.removesuffix("-local"),
            method_kwargs=options,
            perturbation_sync=sync,
        )
        trainer.train()
        if trainer.is_world_process_zero():
            weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            torch.save(weights, out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    if torch.distributed.is_initialized():  # leave the group (gloo can abort in finalization otherwise)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
