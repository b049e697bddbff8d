"""The CUDA path, checked in one run: every method trained at two shapes, Table 6, the measures against the CPU.

On one GPU, with random weights (nothing is downloaded) and random token batches (no tokenizer):

1. **train small**: 20 steps of each method (lora, lora-sam, flat-lora, eflat-lora, rwp-lora,
   bar), driven as the benchmarks drive them (``make_method(...).train_step``), on a LLaMA of
   SmolLM2-135M's published shape (30 layers, d = 576, 9 heads, 3 KV heads, intermediate 1,536,
   vocabulary 49,152, tied embeddings) in bfloat16, LoRA r = 8, alpha = 16, no dropout, on
   q_proj / v_proj (peft keeps the factors in float32), batches of 4 x 512 random tokens
   (labels = inputs), AdamW lr 1e-4, rho = 0.05. Every method starts from the same adapter,
   sees the same batches and must end with finite losses; the adapted base weights must come
   back bit-identical (rwp-lora perturbs them in place). lora runs once more at the end, to
   show how far the machine drifted while the methods ran one after another.
2. **train large**: the same on a LLaMA of Llama-2-7B's shape (32 layers, d = 4096, 32 heads,
   32 KV heads, intermediate 11,008, vocabulary 32,000, untied head) in bfloat16, built
   directly on the GPU (13.5 GB of weights, never in CPU memory or float32). If the time left
   (``--budget-s`` less 150 s kept for sections 3 and 4) cannot hold 20 steps of every method,
   fewer are run and the table says so.
3. **measure**: eflat-lora's trained adapter (small shape) on one probe batch of 2 x 64 random
   tokens: lambda_max (``top_eigenvalues``, k = 1, Lanczos, 20 products at most) and tr(H)
   (``hessian_trace``, Hutch++, 12 products) in the LoRA space, and SAM sharpness
   (``sharpness``, rho = 0.05, merged space), all with seed 0 (random probe vectors are drawn
   on the CPU, so every device gets the same ones), three times: on the CPU in float32 (the
   reference), on the GPU in float32 (the same weights upcast; TF32 off, so it must agree to
   round-off: see TOLERANCE) and on the GPU in bfloat16 (the trained model as it is: the
   precision's own error, shown, not judged).
4. **trainer**: the product's own path, ``flatlora.experiment.train_run`` (FlatLoraTrainer,
   bf16 mixed precision, run directory, saved adapter), for every method on the small shape
   saved in float32 with a word-level tokenizer built from the bundled E2E data (data ``e2e``,
   8 prompts, 20 steps of batch 4); each run must finish with a finite test loss.

After sections 1 and 2 comes the paper's Table 6 at both shapes: the median step time
(the steps after the first 3, each synchronized) and the peak
``torch.cuda.max_memory_allocated`` of flat-lora and eflat-lora over lora's, every method in
one process on one model (the adapter reset between methods, the allocator's peak reset
before each; weights included, as in the paper's memory column). Every table is markdown,
for the README. The last line is ``gpu_check: OK`` (exit 0) or ``gpu_check: FAILED (what
failed)`` (exit 1); a failing part prints its traceback and the others still run; a section
left out for lack of time counts as failed. Planned to take 3 to 4 minutes on one H100;
``--budget-s 420`` (the default) keeps it under 8.

Usage, from the repository root of a machine with a GPU (no network; torch, transformers,
peft, accelerate, numpy, scipy, safetensors and tokenizers as found there)::

    python benchmarks/gpu_check.py 2>&1 | tee gpu_check.txt

It imports ``flatlora`` from this source tree, and ``flatlora_analysis`` from the installed
package if that is this tree's, else straight from ``analysis/`` under that name, so nothing
needs installing. To install the project there anyway:
``pip install --no-deps --no-build-isolation -e .`` (no build isolation: no index to fetch
setuptools from).

    python benchmarks/gpu_check.py --cpu

runs the same code on the CPU with tiny shapes (2 layers, d = 64 and 96, vocabularies of 256
and 320, batches of 2 x 32) in float32 on one thread, in about half a minute (what
tests/test_gpu_check.py runs): the "device" and the reference are then both the CPU, so their
differences are 0, and the memory columns are the process's peak resident set (``/proc``),
a rough figure. ``--cpu --dtype bfloat16`` rehearses the GPU's precision path on the CPU.
Without a GPU and without ``--cpu`` the script says so in one line and exits 2.
``--skip large measure trainer`` leaves sections out; ``--steps``, ``--warmup`` and
``--trainer-steps`` change the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "lora-sam", "flat-lora", "eflat-lora", "rwp-lora", "bar")
TABLE6 = ("lora", "flat-lora", "eflat-lora")
PAPER_TIME = {"flat-lora": "2.1", "eflat-lora": "1.1-1.2"}  # the paper's Table 6 (as benchmarks/llm_step_time.py)
MEASURED = "eflat-lora"  # whose trained adapter the measure section measures
REPEAT = "lora (again, last)"  # lora timed once more after every method: the drift of sequential timing
SECTIONS = ("measure", "large", "trainer")  # what --skip can leave out (the small shape's training always runs)
SEED = 0
LR = 1e-4
RHO = 0.05
LORA = {"r": 8, "alpha": 16, "lora_dropout": 0.0}
RELATIVE_COST = {"lora": 1.0, "lora-sam": 2.0, "flat-lora": 2.0, "eflat-lora": 1.1, "rwp-lora": 1.2, "bar": 1.05}
"""A method's step over lora's, roughly: how many lora steps the large shape's budget must hold."""
TOLERANCE = {"clean loss": 1e-4, "lambda_max": 1e-2, "trace": 1e-2, "SAM sharpness": 1e-2}
"""The largest relative difference of a float32 device figure from the float32 CPU reference."""

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M's config.json
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf's config.json
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
TINY_SMALL = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_SMALL.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
TINY_LARGE = {**LLAMA2_7B, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2}
TINY_LARGE.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=320, max_position_embeddings=128)

_START = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the seconds since the start."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Shape:
    """A model shape to train: its name in the tables, LlamaConfig fields and training batch."""

    name: str
    config: dict[str, Any]
    batch: int
    seq: int

    def describe(self) -> str:
        c = self.config
        return (
            f"{c['num_hidden_layers']} layers, d={c['hidden_size']}, {c['num_attention_heads']} heads "
            f"({c['num_key_value_heads']} KV), vocab {c['vocab_size']}, {self.batch} x {self.seq} tokens"
        )


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU check and its tiny CPU rehearsal."""

    device: str
    dtype: str  # the training dtype of the model weights
    small: Shape
    large: Shape
    steps: int
    warmup: int
    probe: tuple[int, int]  # rows x tokens of the one probe batch
    lanczos_iter: int
    trace_samples: int
    trainer_steps: int
    trainer_precision: str
    budget_s: float
    reserve_s: float  # kept for the measure and trainer sections when the large shape's steps are budgeted


def make_plan(args: argparse.Namespace) -> Plan:
    """The GPU plan, or with ``--cpu`` the same sections on tiny shapes in float32."""
    if args.cpu:
        return Plan(
            device="cpu",
            dtype=args.dtype or "float32",
            small=Shape("tiny (SmolLM2-like)", TINY_SMALL, 2, 32),
            large=Shape("tiny (Llama-2-like)", TINY_LARGE, 2, 32),
            steps=args.steps or 6,
            warmup=min(args.warmup, 2),
            probe=(2, 16),
            lanczos_iter=20,
            trace_samples=12,
            trainer_steps=args.trainer_steps or 4,
            trainer_precision="bf16" if args.dtype == "bfloat16" else "fp32",
            budget_s=args.budget_s,
            reserve_s=0.0,
        )
    return Plan(
        device="cuda",
        dtype=args.dtype or "bfloat16",
        small=Shape("SmolLM2-135M shape", SMOLLM2_135M, 4, 512),
        large=Shape("Llama-2-7B shape", LLAMA2_7B, 4, 512),
        steps=args.steps or 20,
        warmup=args.warmup,
        probe=(2, 64),
        lanczos_iter=20,
        trace_samples=12,
        trainer_steps=args.trainer_steps or 20,
        trainer_precision="fp32" if args.dtype == "float32" else "bf16",
        budget_s=args.budget_s,
        reserve_s=150.0,
    )


# ----------------------------------------------------------------------------- environment


def import_project() -> str:
    """Make ``flatlora`` (this tree) and ``flatlora_analysis`` importable; say where they come from.

    ``flatlora_analysis`` is this tree's ``analysis/`` under its installed name: the installed
    package when that is this tree (``pip install -e .``), else the folder itself, loaded under
    that name, so the check runs where nothing could be installed.
    """
    sys.path.insert(0, str(ROOT))
    import flatlora

    where = f"flatlora {flatlora.__version__} from {Path(flatlora.__file__).parent}"
    spec = importlib.util.find_spec("flatlora_analysis")
    here = ROOT / "analysis"
    try:
        if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != here:
            spec = importlib.util.spec_from_file_location(
                "flatlora_analysis", here / "__init__.py", submodule_search_locations=[str(here)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules["flatlora_analysis"] = module
            spec.loader.exec_module(module)
            return f"{where}; flatlora_analysis loaded from analysis/ (not installed from this tree)"
        import flatlora_analysis  # noqa: F401
    except ImportError as err:  # scipy missing, say: the measure section fails, the others run
        for name in [n for n in sys.modules if n == "flatlora_analysis" or n.startswith("flatlora_analysis.")]:
            del sys.modules[name]
        return f"{where}; flatlora_analysis NOT importable ({type(err).__name__}: {err})"
    return f"{where}; flatlora_analysis installed from this tree"


def environment(device: Any) -> list[str]:
    """Python, the packages this check runs on, and the device."""
    from importlib import metadata

    import torch

    lines = [f"python {platform.python_version()}"]
    versions = []
    for package in ("torch", "transformers", "peft", "accelerate", "numpy", "scipy", "safetensors", "tokenizers"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} MISSING")
    lines.append(", ".join(versions))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, float32 matmul precision {torch.get_float32_matmul_precision()}"
        )
    else:
        lines.append(f"device: CPU, {torch.get_num_threads()} threads")
    return lines


def seed_everything(seed: int = SEED) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: Any) -> Iterator[dict[str, int]]:
    """Bytes before the body and at its peak: CUDA's allocator statistics, or the CPU process's resident set."""
    import torch

    gc.collect()
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["before"] = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        from _timing import PeakRss

        with PeakRss() as rss:
            yield out
        out["before"], out["peak"] = rss.before, rss.peak


def free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- models and data


def build_model(shape: Shape, device: Any, dtype: Any, seed: int = SEED) -> Any:
    """A randomly initialised LLaMA of ``shape`` built on ``device`` in ``dtype``, in peft LoRA (q_proj, v_proj).

    The weights are allocated where they live and in their dtype (torch's default dtype and
    device while the model is built), so a 7B model never passes through CPU memory or float32.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flatlora.models import LoraOptions, wrap_lora

    config = LlamaConfig(**shape.config, attention_dropout=0.0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    torch.manual_seed(seed + 1)  # the LoRA A factors
    return wrap_lora(base, "CAUSAL_LM", name=shape.name, lora=LoraOptions(**LORA))


def token_batches(n: int, rows: int, seq: int, vocab: int, device: Any, seed: int) -> list[dict[str, Any]]:
    """``n`` batches of random token ids (drawn on the CPU, then moved), labels = input_ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def adapter_state(model: Any) -> dict[str, Any]:
    """A copy of every trainable tensor (the LoRA factors)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def base_checksum(model: Any) -> Any:
    """Sum and sum of squares (float64) of every adapted base weight: rwp-lora must restore them exactly."""
    import torch

    from flatlora.lora import find_lora_pairs

    rows = []
    with torch.no_grad():
        for pair in find_lora_pairs(model):  # one float64 copy at a time (a 7B model has 64 of 128 MB)
            w = pair.base_weight().double()
            rows.append(torch.stack([w.sum(), w.square().sum()]).cpu())
            del w
    return torch.stack(rows)


# ----------------------------------------------------------------------------- training (sections 1 and 3)


@dataclass
class MethodRun:
    """What one method's steps gave."""

    method: str
    steps: int = 0
    warmup: int = 0
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    before: int = 0
    peak: int = 0
    error: str | None = None

    @property
    def median(self) -> float:
        timed = self.seconds[self.warmup :] or self.seconds
        return statistics.median(timed) if timed else math.nan

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.losses) == self.steps and all(math.isfinite(x) for x in self.losses)


def train_one(model: Any, name: str, batches: list[dict[str, Any]], steps: int, warmup: int, device: Any) -> MethodRun:
    """``steps`` steps of method ``name`` from the model's current adapter, each timed (synchronized)."""
    from flatlora import log_keys as keys
    from flatlora.methods import make_method

    seed_everything()
    method = make_method(name, model, lr=LR, rho=RHO, total_steps=steps)
    model.train()
    run = MethodRun(name, steps=steps, warmup=warmup)
    with peak_memory(device) as memory:
        for i in range(steps):
            batch = batches[i % len(batches)]
            sync(device)
            start = time.perf_counter()
            log = method.train_step(lambda batch=batch: model(**batch).loss)
            sync(device)
            run.seconds.append(time.perf_counter() - start)
            run.losses.append(float(log[keys.LOSS]))
    run.before, run.peak = memory["before"], memory["peak"]
    if method.steps_done != steps:
        run.error = f"{method.steps_done} steps done of {steps}"
    del method
    model.zero_grad(set_to_none=True)
    return run


def train_methods(
    model: Any, batches: list[dict[str, Any]], steps: int, warmup: int, device: Any, keep: Callable[[str], None]
) -> tuple[dict[str, MethodRun], list[str]]:
    """Every method from the same adapter on the same batches; ``keep(name)`` after each. Returns (runs, failures)."""
    import torch

    initial = adapter_state(model)
    checksum = base_checksum(model)
    runs, failures = {}, []
    for name in METHODS:
        load_adapter_state(model, initial)
        try:
            run = train_one(model, name, batches, steps, warmup, device)
        except Exception as err:  # report it and go on with the other methods
            traceback.print_exc(limit=-6)
            run = MethodRun(name, steps=steps, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            model.zero_grad(set_to_none=True)
        runs[name] = run
        free(device)
        if run.ok:
            keep(name)
            say(f"  {name}: {steps} steps, median {run.median * 1e3:.1f} ms, loss {run.losses[0]:.4f} -> "
                f"{run.losses[-1]:.4f}, peak {run.peak / 2**20:.0f} MiB")  # fmt: skip
        else:
            failures.append(f"{name}: {run.error or 'non-finite loss'}")
            say(f"  {name}: FAILED ({failures[-1]})")
    load_adapter_state(model, initial)
    if runs["lora"].ok:  # lora once more, last: how far the machine drifted while the methods ran one after another
        again = train_one(model, "lora", batches, steps, warmup, device)
        again.method = REPEAT
        runs[REPEAT] = again
        load_adapter_state(model, initial)
        free(device)
    if not torch.equal(base_checksum(model), checksum):
        failures.append("base weights changed by training (rwp-lora's in-place noise not restored?)")
    return runs, failures


def training_table(shape: Shape, runs: dict[str, MethodRun], device: Any, note: str = "") -> list[str]:
    memory = "peak allocated" if device.type == "cuda" else "peak RSS"
    lora = runs.get("lora")
    lines = [
        f"### {shape.name} ({shape.describe()}){note}",
        "",
        f"| method | steps | median step (ms) | time / lora | {memory} (MiB) | memory / lora "
        "| training increment (MiB) | loss first -> last | ok |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, run in runs.items():
        if run.error is not None:
            lines.append(f"| {name} | - | - | - | - | - | - | - | FAILED: {run.error} |")
            continue
        time_ratio = run.median / lora.median if lora and lora.ok else math.nan
        memory_ratio = run.peak / lora.peak if lora and lora.ok and lora.peak else math.nan
        lines.append(
            f"| {name} | {run.steps} | {run.median * 1e3:.1f} | {time_ratio:.3f} | {run.peak / 2**20:.0f} | "
            f"{memory_ratio:.3f} | {(run.peak - run.before) / 2**20:.0f} | "
            f"{run.losses[0]:.4f} -> {run.losses[-1]:.4f} | {'ok' if run.ok else 'FAILED'} |"
        )
    return lines


def train_section(
    plan: Plan, shape: Shape, device: Any, dtype: Any, steps: int | None = None, keep_adapter: bool = False
) -> tuple[Any, dict[str, MethodRun], dict[str, Any] | None, list[str], str]:
    """Build ``shape`` and train every method on it; with ``steps`` None, as many as the budget allows.

    Returns:
        (the model, the runs, MEASURED's trained adapter or None, failures, a note on the steps).
    """
    say(f"building {shape.name} ({shape.describe()}) on {device} in {plan.dtype}")
    model = build_model(shape, device, dtype)
    say(f"  built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    note = ""
    if steps is None:
        steps, note = budget_steps(plan, shape, model, device)
    batches = token_batches(steps, shape.batch, shape.seq, shape.config["vocab_size"], device, SEED)
    trained: dict[str, Any] = {}

    def keep(name: str) -> None:
        if keep_adapter and name == MEASURED:
            trained.update(adapter_state(model))

    runs, failures = train_methods(model, batches, steps, plan.warmup, device, keep)
    return model, runs, trained or None, failures, note


def budget_steps(plan: Plan, shape: Shape, model: Any, device: Any) -> tuple[int, str]:
    """The steps of each method that the time left can hold (``plan.steps`` at most), from two lora steps."""
    left = plan.budget_s - (time.perf_counter() - _START) - plan.reserve_s
    initial = adapter_state(model)
    probe = train_one(model, "lora", token_batches(2, shape.batch, shape.seq, 8, device, SEED + 7), 2, 1, device)
    load_adapter_state(model, initial)
    per_round = probe.seconds[-1] * (sum(RELATIVE_COST.values()) + 1) * 1.2 + 1.0  # each method and lora again
    fits = int(left / per_round) if per_round > 0 else plan.steps
    steps = max(min(plan.steps, fits), plan.warmup + 2)
    say(f"  one lora step {probe.seconds[-1] * 1e3:.0f} ms, {left:.0f} s left: {steps} steps per method")
    note = "" if steps == plan.steps else f" (timed on {steps} steps, not {plan.steps}: the time budget)"
    return steps, note


def table6(shapes: list[tuple[Shape, dict[str, MethodRun]]], device: Any) -> list[str]:
    """The paper's Table 6: time per step and peak memory of flat-lora and eflat-lora over lora's."""
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (rough)"
    lines = [
        f"## Table 6: cost over LoRA (median step time; {memory})",
        "",
        "| shape | method | time / lora | paper | memory / lora | median step (ms) | peak (GiB) | steps |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for shape, runs in shapes:
        lora = runs.get("lora")
        for name in TABLE6:
            run = runs.get(name)
            if run is None or not run.ok or lora is None or not lora.ok:
                lines.append(f"| {shape.name} | {name} | - | {PAPER_TIME.get(name, '')} | - | - | - | - |")
                continue
            lines.append(
                f"| {shape.name} | {name} | {run.median / lora.median:.3f} | {PAPER_TIME.get(name, '')} | "
                f"{run.peak / lora.peak:.3f} | {run.median * 1e3:.1f} | {run.peak / 2**30:.2f} | {run.steps} |"
            )
    return lines


# ----------------------------------------------------------------------------- measures (section 2)


def measure(model: Any, probe: Any, device: Any, plan: Plan) -> dict[str, Any]:
    """lambda_max, tr(H) and SAM sharpness of ``model`` on ``probe`` on ``device``, all with seed 0."""
    from flatlora_analysis.hessian import hessian_trace, top_eigenvalues
    from flatlora_analysis.sharpness import sharpness

    start = time.perf_counter()
    eig = top_eigenvalues(model, probe, k=1, max_iter=plan.lanczos_iter, seed=0, device=device)
    trace = hessian_trace(model, probe, samples=plan.trace_samples, seed=0, device=device)
    sam = sharpness(model, probe, rho=RHO, kind="sam", seed=0, device=device)
    sync(device)
    return {
        "values": {
            "clean loss": sam.clean_loss,
            "lambda_max": eig.lambda_max,
            "trace": trace.trace,
            "SAM sharpness": sam.value,
        },
        "trace_stderr": trace.stderr,
        "seconds": time.perf_counter() - start,
        "products": eig.hvps + trace.hvps,
        "converged": eig.converged,
    }


def relative(value: float, reference: float, scale: float | None = None) -> float:
    scale = abs(reference) if scale is None else scale
    if value == reference:
        return 0.0
    return abs(value - reference) / scale if scale > 0 else math.inf


def measure_section(
    model: Any, adapter: dict[str, Any], plan: Plan, device: Any, dtype: Any
) -> tuple[list[str], list[str]]:
    """The trained adapter measured on the CPU in float32 (reference), on the device in float32 and in its dtype."""
    import torch

    from flatlora_analysis.probe import ProbeSet

    load_adapter_state(model, adapter)
    rows, seq = plan.probe
    probe_batch = token_batches(1, rows, seq, model.config.vocab_size, "cpu", SEED + 1)[0]
    probe = ProbeSet.from_batches([probe_batch], description={"data": f"random tokens, {rows} x {seq}"})
    cpu = torch.device("cpu")
    # (label, a float32 copy or the model itself, where): the copies hold the very same numbers, upcast
    variants = [("CPU float32 (reference)", True, cpu), (f"{device.type} float32", True, device)]
    if dtype != torch.float32:
        variants.append((f"{device.type} {plan.dtype}", False, device))
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for label, upcast, where in variants:
        subject = copy.deepcopy(model).to(device=where, dtype=torch.float32) if upcast else model.to(where)
        say(f"  measuring on {label}")
        try:
            results[label] = measure(subject, probe, where, plan)
        except Exception as err:
            traceback.print_exc(limit=-6)
            failures.append(f"measure on {label}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        del subject
        free(device)
    reference = results.get(variants[0][0])
    lines = [
        f"### The trained {MEASURED} adapter ({plan.small.name}): {device.type} against the CPU in float32",
        "",
        f"One probe batch of {rows} x {seq} random tokens; LoRA space for the Hessian (lambda_max: Lanczos, "
        f"{plan.lanczos_iter} products at most; trace: Hutch++, {plan.trace_samples} products), merged space for "
        f"SAM sharpness (rho {RHO}); seed 0 everywhere. rel. diff = |x - ref| / |ref| (trace: / max(|ref|, its "
        "stderr)); a float32 device figure must be within "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
        + " of the reference"
        + (f"; the {plan.dtype} column is shown, not judged." if dtype != torch.float32 else "."),
        "",
    ]
    labels = [label for label, _, _ in variants if label in results]
    header = (
        "| measure | "
        + " | ".join(label if i == 0 else f"{label} | rel. diff" for i, label in enumerate(labels))
        + " |"
    )
    lines += [header, "|---|" + "---:|" * (1 + 2 * (len(labels) - 1))]
    if reference is None:
        failures.append("no CPU reference: nothing compared")
        return [*lines, "| (the CPU reference failed) |"], failures
    for name, ref in reference["values"].items():
        cells = [f"{ref:.6g}"]
        for i, label in enumerate(labels[1:]):
            value = results[label]["values"][name]
            scale = max(abs(ref), reference["trace_stderr"]) if name == "trace" else None
            diff = relative(value, ref, scale)
            cells += [f"{value:.6g}", f"{diff:.2e}"]
            if i == 0 and not diff <= TOLERANCE[name]:
                failures.append(f"{name} on {label}: relative difference {diff:.2e} > {TOLERANCE[name]:g}")
            if not math.isfinite(value):
                failures.append(f"{name} on {label}: not finite ({value})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for i, label in enumerate(labels):
        cells += [f"{results[label]['seconds']:.1f} s ({results[label]['products']})"] + ([""] if i else [])
    lines.append("| seconds (Hessian products) | " + " | ".join(cells) + " |")
    converged = {label: results[label]["converged"] for label in labels}
    lines += ["", "Lanczos converged: " + ", ".join(f"{k} {v}" for k, v in converged.items())]
    return lines, failures


# ----------------------------------------------------------------------------- train_run (section 4)


def e2e_tokenizer() -> Any:
    """A word-level tokenizer of every word and punctuation mark of the bundled E2E data (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flatlora.data.causal import load_causal_data

    splitter = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for split in load_causal_data("e2e").values():
        for example in split.examples:
            for text in (example.prompt, example.target):
                words.update(w for w, _ in splitter.pre_tokenize_str(text))
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(special + sorted(words - set(special)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def trainer_section(plan: Plan, device: Any, workdir: Path) -> tuple[list[str], list[str]]:
    """train_run (FlatLoraTrainer, run directory, saved adapter) of every method on the small shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flatlora import log_keys as keys
    from flatlora.experiment import TrainConfig, train_run
    from flatlora.log_keys import final_key

    tokenizer = e2e_tokenizer()
    folder = workdir / "model"
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    shape = {**plan.small.config, "vocab_size": max(plan.small.config["vocab_size"], len(tokenizer))}
    config = LlamaConfig(**shape, **ids, pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(folder)  # float32 weights; bf16 is the Trainer's autocast
    tokenizer.save_pretrained(folder)
    say(f"  saved the small shape in float32 with a {len(tokenizer)}-word E2E tokenizer")
    lines = [
        f"### train_run on {device.type}: {plan.small.name}, float32 weights, precision {plan.trainer_precision}, "
        f"data e2e (8 prompts), {plan.trainer_steps} steps of batch 4",
        "",
        "| method | status | steps logged | loss first -> last | test loss | wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    failures = []
    for name in METHODS:
        config = TrainConfig(
            method=name, task="causal-lm", data="e2e", model=str(folder), steps=plan.trainer_steps, shots=8,
            batch_size=4, max_length=128, chat_template=False, lora_dropout=0.0, lr=1e-3, rho=RHO, seed=SEED,
            test_cap=8, log_every=1, save_every=plan.trainer_steps, precision=plan.trainer_precision, progress=False,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            run = train_run(config, workdir / name)
        except Exception as err:
            traceback.print_exc(limit=-6)
            failures.append(f"train_run {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            lines.append(f"| {name} | FAILED: {failures[-1]} | - | - | - | - |")
            continue
        seconds = time.perf_counter() - start
        train = [r for r in run.metrics if r.get(keys.PHASE, keys.PHASE_TRAIN) == keys.PHASE_TRAIN]
        steps = max((r.get(keys.STEP, 0) for r in train), default=0)
        losses = [r[keys.LOSS] for r in train if isinstance(r.get(keys.LOSS), (int, float))]
        test_loss = run.final.get(final_key("test", "loss"), math.nan)
        good = run.status == "done" and steps == plan.trainer_steps and math.isfinite(test_loss)
        good = good and bool(losses) and all(math.isfinite(x) for x in losses)
        if not good:
            failures.append(f"train_run {name}: status {run.status}, {steps} steps, test loss {test_loss}")
        trend = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
        lines.append(f"| {name} | {run.status} | {steps} | {trend} | {test_loss:.4f} | {seconds:.1f} |")
        say(f"  train_run {name}: {run.status}, test loss {test_loss:.4f}, {seconds:.1f} s")
        free(device)
    return lines, failures


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with tiny shapes in float32 (the test)")
    parser.add_argument("--steps", type=int, default=None, help="steps per method and shape (default 20; --cpu 6)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median (default 3)")
    parser.add_argument("--trainer-steps", type=int, default=None, help="train_run steps (default 20; --cpu 4)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole check may take (default 420)")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections to leave out")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="the weights' dtype (default: bfloat16 on the GPU, float32 with --cpu; --cpu --dtype bfloat16 "
        "rehearses the GPU's precision path)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer too (it would take a GPU that is there)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device found (torch.cuda.is_available() is False): run it on a GPU machine, "
            "or pass --cpu to run the same code on the CPU with tiny shapes",
            file=sys.stderr,
        )
        return 2
    plan = make_plan(args)
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.dtype)
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 on the GPU is float32
    if args.cpu:
        torch.set_num_threads(1)  # tiny shapes: threads only wait on each other (100x slower on a busy machine)
    print("# gpu_check: the CUDA path of flatlora" if device.type == "cuda" else "# gpu_check --cpu: tiny rehearsal")
    print()
    print(import_project())
    for line in environment(device):
        print(line)
    print(
        f"plan: {plan.steps} steps per method (median of the steps after the first {plan.warmup}), lr {LR}, "
        f"rho {RHO}, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout 0 on q_proj/v_proj, weights in {plan.dtype}, "
        f"random token batches (labels = inputs), seed {SEED}; budget {plan.budget_s:.0f} s",
        flush=True,
    )
    failures: dict[str, list[str]] = {}
    tables: list[tuple[Shape, dict[str, MethodRun]]] = []

    def section(name: str, body: Callable[[], list[str]]) -> None:
        say(f"section {name}")
        try:
            lines = body()
        except Exception as err:
            traceback.print_exc(limit=-6)
            failures.setdefault(name, []).append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return
        print()
        print("\n".join(lines))
        print(flush=True)

    small: dict[str, Any] = {}

    def small_section() -> list[str]:
        model, runs, trained, fails, _ = train_section(plan, plan.small, device, dtype, plan.steps, keep_adapter=True)
        small.update(model=model, trained=trained)
        tables.append((plan.small, runs))
        if fails:
            failures["train small"] = fails
        return training_table(plan.small, runs, device)

    def measure_body() -> list[str]:
        if small.get("trained") is None:
            raise RuntimeError(f"no trained {MEASURED} adapter to measure (its training failed)")
        left = plan.budget_s - (time.perf_counter() - _START)
        if left < 60:
            raise RuntimeError(f"skipped: {left:.0f} s of the budget left (--budget-s)")
        lines, fails = measure_section(small["model"], small["trained"], plan, device, dtype)
        if fails:
            failures["measure"] = fails
        return lines

    def large_section() -> list[str]:
        model, runs, _, fails, note = train_section(plan, plan.large, device, dtype)
        del model
        free(device)
        tables.append((plan.large, runs))
        if fails:
            failures["train large"] = fails
        return training_table(plan.large, runs, device, note)

    def trainer_body() -> list[str]:
        left = plan.budget_s - (time.perf_counter() - _START)
        if left < 30:
            raise RuntimeError(f"skipped: {left:.0f} s of the budget left (--budget-s)")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            lines, fails = trainer_section(plan, device, Path(tmp))
        if fails:
            failures["trainer"] = fails
        return lines

    # Table 6 first (what the GPU is lent for), then the measures and the Trainer within the time left
    seed_everything()
    section("train small", small_section)
    if "large" not in args.skip:
        if "model" in small:
            small["model"].to("cpu")  # the large shape's memory figures count nothing else
        free(device)
        section("train large", large_section)
    print("\n".join(table6(tables, device)))
    print(flush=True)
    if "measure" not in args.skip:
        section("measure", measure_body)
    small.clear()
    free(device)
    if "trainer" not in args.skip:
        section("trainer", trainer_body)
    say("done")
    if failures:
        listed = "; ".join(f"{k}: {' / '.join(v)}" for k, v in failures.items())
        print(f"gpu_check: FAILED ({listed})", flush=True)
        return 1
    print("gpu_check: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
