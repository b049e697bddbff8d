"""Gradient checkpointing on a real LLM: memory and time of a training step and of a Hessian-vector product.

SmolLM2-135M-Instruct (the bundled default LLM, Q4_1 GGUF dequantized to float32), LoRA r = 8 on
q_proj / v_proj, CPU, with and without activation checkpointing of its 30 decoder layers:

- **training**: a plain LoRA step (forward, backward, AdamW) on a causal-LM batch of 8 x 128
  tokens of E2E text, with transformers' non-reentrant checkpointing (``flatlora train
  --gradient-checkpointing``, :func:`flatlora.checkpointing.enable_gradient_checkpointing`);
- **HVP**: one Hessian-vector product by double backward in the LoRA space over 8 E2E (prompt,
  target) pairs in one batch (``ProbeSet.from_data("e2e", task="causal-lm", n=8, batch_size=8)``),
  its graph built for the product and freed (``retain_graph=False``, no memory plan), with
  :func:`flatlora_analysis.checkpointing.enable_checkpointing` (``flatlora report
  --gradient-checkpointing``);
- **HVP by finite differences** (``method="fd"``): the same product from two gradients, the
  measures' other route (sharpness takes gradients alone).

Memory: each (task, route) runs alone in a fresh process and its resident set is sampled every
millisecond (``_timing.PeakRss``): the peak RSS (weights included) and the increment over the RSS
just before the first step; beside it, a torch-level count: the bytes autograd saves for the
backward (the forward's saved tensors; for the HVP also those of the ``create_graph`` backward),
read with saved-tensor hooks (a checkpoint keeps only each layer's input). Time: one process,
two copies of the model, steps (or products) timed round-robin after warm-up; the median.

    python benchmarks/checkpointing.py [--steps 3] [--warmup 1] [--memory-steps 2]

It ends with the ratios (checkpointed / plain) of each task: increment, saved bytes, ``time ratio``
and peak RSS, as ``hvp fd ... ratio: Z``, ``hvp ... ratio: Y`` (the double-backward product), and
last the training step's ``time ratio: T`` and ``ratio: X``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

from _timing import PeakRss, interleaved, run_child
from llm_step_time import BATCH, SEQ, load_model, make_batch

ROUTES = ("plain", "checkpointed")
TASKS = ("train", "hvp", "hvp-fd")


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (weights included)."""
    from flatlora_analysis.micro_batch import saved_storage_bytes

    return saved_storage_bytes(fn)


def train_step(model, batch):
    """One plain LoRA step on ``batch``, as a call (the method built once)."""
    from flatlora.methods import make_method

    method = make_method("lora", model, lr=1e-4)
    model.train()
    return lambda: method.train_step(lambda: model(**batch).loss)


def hvp_product(model, probe, checkpointed: bool, method: str = "autograd"):
    """One Hessian-vector product in the LoRA space (a fixed random v), as a call."""
    import torch

    from flatlora_analysis.checkpointing import checkpointing
    from flatlora_analysis.guard import measuring
    from flatlora_analysis.hessian.operator import HessianOperator
    from flatlora_analysis.objective import ModelObjective
    from flatlora_analysis.spaces import build_space

    def product():
        with measuring(model) as device, checkpointing(model, checkpointed):
            space = build_space(model, "lora")
            v = torch.randn(space.dim, generator=torch.Generator().manual_seed(0))
            with HessianOperator(ModelObjective(model, probe, space, device), method, retain_graph=False) as op:
                return op.matvec(v)

    return product


def hvp_saved(model, probe, checkpointed: bool, create_graph: bool = True) -> int:
    """Saved bytes of an HVP's graph: the probe batch's forward and create_graph backward (or a gradient's)."""
    import torch

    from flatlora_analysis.checkpointing import checkpointing
    from flatlora_analysis.guard import measuring
    from flatlora_analysis.objective import double_backward_attention
    from flatlora_analysis.spaces import build_space

    with measuring(model), checkpointing(model, checkpointed), double_backward_attention(model):
        space = build_space(model, "lora")
        leaves = [d.detach().requires_grad_(True) for d in space.split(space.zeros())]

        def graph():
            loss = probe.batch_loss(model, probe.batches[0], space.overrides(leaves))
            torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)

        return saved_bytes(graph)


def setup(task: str):
    """The model, and the training batch or the HVP probe set."""
    model, tokenizer = load_model()
    if task == "train":
        return model, make_batch(tokenizer)
    from flatlora_analysis.probe import ProbeSet

    return model, ProbeSet.from_data("e2e", tokenizer, task="causal-lm", n=8, batch_size=8)


def memory_child(task: str, route: str, steps: int) -> None:
    """Run ``steps`` steps (or products) of one route alone; print the RSS before, the peak, and the saved bytes."""
    import torch

    from flatlora.checkpointing import enable_gradient_checkpointing

    model, data = setup(task)
    checkpointed = route == "checkpointed"
    if task == "train":
        if checkpointed:
            enable_gradient_checkpointing(model)
        call = train_step(model, data)
    else:
        call = hvp_product(model, data, checkpointed, "fd" if task == "hvp-fd" else "autograd")
    with PeakRss() as rss:
        for _ in range(steps):
            call()
    if task == "train":
        model.train()
        saved = saved_bytes(lambda: model(**data).loss)
    else:
        saved = hvp_saved(model, data, checkpointed, create_graph=task == "hvp")
    print(json.dumps({"before": rss.before, "peak": rss.peak, "saved": saved, "threads": torch.get_num_threads()}))


def measure_time(task: str, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each route's step (or product), interleaved in one process on two copies of the model."""
    from flatlora.checkpointing import enable_gradient_checkpointing

    model, data = setup(task)
    other = copy.deepcopy(model)
    if task == "train":
        enable_gradient_checkpointing(other)
        calls = {"plain": train_step(model, data), "checkpointed": train_step(other, data)}
    else:
        method = "fd" if task == "hvp-fd" else "autograd"
        calls = {
            "plain": hvp_product(model, data, False, method),
            "checkpointed": hvp_product(other, data, True, method),
        }
    return interleaved(calls, steps, warmup).median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (products) per route")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each route alone for its peak RSS")
    parser.add_argument("--memory-child", nargs=2, metavar=("TASK", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.memory_child:
        memory_child(*args.memory_child, args.memory_steps)
        return
    import torch

    memory = {
        (task, route): json.loads(
            run_child([__file__, "--memory-child", task, route, "--memory-steps", str(args.memory_steps)])
        )
        for task in TASKS
        for route in ROUTES
    }
    median = {task: measure_time(task, args.steps, args.warmup) for task in TASKS}
    mib = 2**20
    print(
        f"# SmolLM2-135M-Instruct (float32), LoRA r=8 on q_proj/v_proj, CPU, {torch.get_num_threads()} threads; "
        f"train: a lora step on {BATCH} x {SEQ} tokens; hvp: one double-backward product over 8 E2E pairs; "
        f"memory: {args.memory_steps} steps alone in a fresh process; time: median of {args.steps} interleaved "
        f"after {args.warmup} warm-up"
    )
    print("| task | route | median (s) | peak RSS (MiB) | increment (MiB) | autograd saved (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for task in TASKS:
        for route in ROUTES:
            m = memory[(task, route)]
            print(
                f"| {task} | {route} | {median[task][route]:.3f} | {m['peak'] / mib:.0f} | "
                f"{(m['peak'] - m['before']) / mib:.0f} | {m['saved'] / mib:.1f} |"
            )
    for task, prefix in (("hvp-fd", "hvp fd "), ("hvp", "hvp "), ("train", "")):  # the training step's ratio last
        plain, ckpt = memory[(task, "plain")], memory[(task, "checkpointed")]
        increment = (ckpt["peak"] - ckpt["before"]) / max(plain["peak"] - plain["before"], 1)
        print(f"{prefix}increment ratio: {increment:.3f}")
        print(f"{prefix}saved ratio: {ckpt['saved'] / plain['saved']:.3f}")
        print(f"{prefix}time ratio: {median[task]['checkpointed'] / median[task]['plain']:.3f}")
        print(f"{prefix}ratio: {ckpt['peak'] / plain['peak']:.3f}")


if __name__ == "__main__":
    main()
