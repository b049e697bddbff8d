"""The paper's Table 6 on a real LLM: step time and peak memory of flat-lora and eflat-lora over LoRA.

SmolLM2-135M-Instruct (the bundled default LLM, Q4_1 GGUF dequantized to float32), LoRA r = 8 on
q_proj / v_proj, a causal-LM batch of 8 x 128 tokens of E2E text, CPU.

Time: each method gets its own copy of the same model; after warm-up, steps are timed
round-robin (lora, eflat-lora, flat-lora, lora, ...) in one process, so machine noise falls on
all methods alike; the median step of each method over lora's.

Memory: neither torch's allocator statistics nor tracemalloc see CPU tensors (torch allocates
them outside Python's allocator, and ``torch.cuda.max_memory_allocated`` is CUDA only), so each
method runs alone in a fresh process and the process's resident set (``/proc/self/statm``) is
sampled every millisecond during its steps: the peak RSS (weights included, as the paper's
memory column) and the training increment over the RSS just before the first step.

    python benchmarks/llm_step_time.py [--steps 5] [--warmup 2] [--memory-steps 3]

The last two lines are ``ratio: X`` (eflat-lora / lora step time) and ``memory ratio: Y``
(eflat-lora / lora peak RSS).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

from _timing import PeakRss, interleaved, run_child

METHODS = ("lora", "eflat-lora", "flat-lora")
GOALS = {"eflat-lora": (1.05, 1.02), "flat-lora": (2.05, None)}
PAPER = {"eflat-lora": "1.1-1.2", "flat-lora": "2.1"}
BATCH, SEQ = 8, 128


def make_batch(tokenizer):
    """8 rows of 128 tokens of E2E references (the bundled copy), labels = input_ids."""
    import torch

    from flatlora.data.causal import load_causal_data

    text = " ".join(e.target for e in load_causal_data("e2e")["test"].examples[:400])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: BATCH * SEQ]
    ids = torch.tensor(ids).view(BATCH, SEQ)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(method: str, model):
    from flatlora.methods import make_method

    kwargs = {"lr": 1e-4} if method == "lora" else {"lr": 1e-4, "rho": 0.05}
    return make_method(method, model, **kwargs)


def load_model():
    from flatlora.causal_lm import load_causal_lm
    from flatlora.models import LoraOptions

    return load_causal_lm(None, lora=LoraOptions(r=8, alpha=16, lora_dropout=0.0))


def memory_child(method: str, steps: int) -> None:
    """Run ``steps`` steps of one method alone; print its RSS before the steps and the peak during them."""
    import torch

    model, tokenizer = load_model()
    batch = make_batch(tokenizer)
    opt = build(method, model)
    model.train()
    with PeakRss() as rss:
        for _ in range(steps):
            opt.train_step(lambda: model(**batch).loss)
    print(json.dumps({"before": rss.before, "peak": rss.peak, "threads": torch.get_num_threads()}))


def measure_memory(steps: int) -> dict[str, dict[str, int]]:
    out = {}
    for method in METHODS:
        out[method] = json.loads(run_child([__file__, "--memory-child", method, "--memory-steps", str(steps)]))
    return out


def measure_time(steps: int, warmup: int) -> dict[str, float]:
    model, tokenizer = load_model()
    batch = make_batch(tokenizer)
    runs = {}
    for name in METHODS:
        copy_ = copy.deepcopy(model)
        copy_.train()
        runs[name] = (copy_, build(name, copy_))
    del model

    def step_of(name: str):
        """One training step of method ``name`` on its copy of the model, as a call."""
        m, method = runs[name]
        return lambda: method.train_step(lambda: m(**batch).loss)

    return interleaved({name: step_of(name) for name in METHODS}, steps, warmup).median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each method alone for its peak RSS")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps)
        return
    import torch

    memory = measure_memory(args.memory_steps)
    median = measure_time(args.steps, args.warmup)
    mib = 2**20
    print(
        f"# SmolLM2-135M-Instruct (float32), LoRA r=8 on q_proj/v_proj, {BATCH} x {SEQ} tokens, CPU, "
        f"{torch.get_num_threads()} threads; time: median of {args.steps} interleaved steps after {args.warmup} "
        f"warm-up; memory: peak RSS of {args.memory_steps} steps, each method alone in a fresh process"
    )
    print(
        "| method | median step (s) | time ratio | goal | paper | peak RSS (MiB) | memory ratio | goal "
        "| training increment (MiB) |"
    )
    print("|---|---:|---:|---|---|---:|---:|---|---:|")
    for name in METHODS:
        time_goal, mem_goal = GOALS.get(name, (None, None))
        peak, inc = memory[name]["peak"], memory[name]["peak"] - memory[name]["before"]
        print(
            f"| {name} | {median[name]:.3f} | {median[name] / median['lora']:.3f} | "
            f"{'' if time_goal is None else f'<= {time_goal}'} | {PAPER.get(name, '')} | {peak / mib:.0f} | "
            f"{peak / memory['lora']['peak']:.3f} | {'' if mem_goal is None else f'<= {mem_goal}'} | {inc / mib:.0f} |"
        )
    print(f"ratio: {median['eflat-lora'] / median['lora']:.3f}")
    print(f"memory ratio: {memory['eflat-lora']['peak'] / memory['lora']['peak']:.3f}")


if __name__ == "__main__":
    main()
