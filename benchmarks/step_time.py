"""Step time of the sharpness-aware methods over plain LoRA, on CPU.

A GPT-2-small-shaped model (12 layers, d = 768, 12 heads, GPT-2's vocabulary), randomly
initialised, LoRA r = 8 on the attention projection c_attn, a causal-LM batch of 4 x 128
tokens. Each method gets its own copy of the same model; after warm-up, steps are timed
round-robin (lora, eflat-lora, flat-lora, lora-sam, lora, ...) in one process, so machine
noise falls on all methods alike. Reported: the median step time of each method and its
ratio to lora's.

    python benchmarks/step_time.py [--steps 7] [--quick] [--profile]

``--profile`` then times the parts of eflat-lora's step (README: where the extra time goes).

``--quick`` uses 2 layers, d = 128, a 1,000-token vocabulary and 4 x 32 tokens (seconds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from _timing import interleaved
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from flatlora.methods import make_method

METHODS = ("lora", "eflat-lora", "flat-lora", "lora-sam")
GOALS = {"eflat-lora": 1.03, "flat-lora": 2.05, "lora-sam": 2.05}


def build_model(quick: bool) -> torch.nn.Module:
    if quick:
        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64)
    else:
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    config.attn_pdrop = config.embd_pdrop = config.resid_pdrop = 0.0
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    return get_peft_model(base, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="then time the parts of an eflat-lora step")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    model = build_model(args.quick)
    seq = 32 if args.quick else 128
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    runs = {}
    for name in METHODS:
        copy_ = copy.deepcopy(model)
        kwargs = {"lr": 1e-4} if name == "lora" else {"lr": 1e-4, "rho": 0.05}
        runs[name] = (copy_, make_method(name, copy_, **kwargs))
    del model

    def step_of(name: str):
        """One training step of method ``name`` on its copy of the model, as a call."""
        m, method = runs[name]
        return lambda: method.train_step(lambda: m(**batch).loss)

    median = interleaved({name: step_of(name) for name in METHODS}, args.steps, args.warmup).median()

    shape = "2 layers, d=128, 4 x 32 tokens" if args.quick else "12 layers, d=768, 4 x 128 tokens"
    print(
        f"# GPT-2-shaped ({shape}), LoRA r=8 on c_attn, CPU, {torch.get_num_threads()} threads,"
        f" median of {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    print("| method     | median step (ms) | ratio to lora | goal   |")
    print("|------------|-----------------:|--------------:|--------|")
    for name in METHODS:
        goal = f"<= {GOALS[name]}" if name in GOALS else ""
        print(f"| {name:<10} | {median[name] * 1e3:16.1f} | {median[name] / median['lora']:13.3f} | {goal:<6} |")
    if args.profile:
        profile(*runs["eflat-lora"], batch, median, args.steps)
    print(f"ratio: {median['eflat-lora'] / median['lora']:.3f}")


# the parts of an eflat-lora step beyond lora's forward, backward and AdamW update
PARTS = {
    "perturb": "apply e_bar to B (clean B kept)",
    "restore": "copy the clean B back",
    "_eps_b": "exact eps_B (Flat-LoRA's, from the step's gradients)",
    "_log_rotation": "rotation cosine, eps_B kept for the next step",
    "_log_b_perturbation": "eps_B and realized norms (log)",
    "pop_log": "the step's log as floats",
}


def profile(model, method, batch, median, steps: int) -> None:
    """Median ms per step of each extra part of an eflat-lora step, by timing wrappers on the method."""
    spent: dict[str, list[float]] = {name: [] for name in PARTS}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name][-1] += time.perf_counter() - start

        return wrapper

    for name in PARTS:
        setattr(method, name, timed(name, getattr(method, name)))
    for _ in range(steps):
        for name in PARTS:
            spent[name].append(0.0)
        method.train_step(lambda: model(**batch).loss)
    extra = median["eflat-lora"] - median["lora"]
    print()
    print("| part of an eflat-lora step | ms per step (median) | share of lora's step |")
    print("|---|---:|---:|")
    for name, what in PARTS.items():
        ms = statistics.median(spent[name]) * 1e3
        print(f"| {what} | {ms:.1f} | {ms / (median['lora'] * 1e3):.2%} |")
    print(f"| measured step difference eflat - lora | {extra * 1e3:.1f} | {extra / median['lora']:.2%} |")


if __name__ == "__main__":
    main()
