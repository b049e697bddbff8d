"""How measuring scales with the model and the probe: peak memory and time against a training step.

For each model (the bundled SmolLM2-135M with a stock-peft adapter, and random-weight LLaMA models
of SmolLM2-360M's and SmolLM2-1.7B's published shapes; LoRA r = 8 on q_proj / v_proj, B drawn
N(0, 0.02)) and dtype of the base weights, fresh processes measure:

- **step**: one LoRA training step (AdamW) on a batch of 8 E2E pairs padded to 128 tokens;
- **gradient** and **product**: one gradient over the probe set and one Hessian-vector product
  (the memory plan of ``--max-memory auto``, as the report makes it) at each probe size; on the
  random shapes, one micro-batch of them (the time of the whole probe is that times the
  micro-batches: derived, and printed as such); and one streamed product (its graph built, used
  and freed) over one gradient of the same micro-batch, the best of two timings after a warm-up;
- **report**: ``flatlora report --quick`` on SmolLM2-135M (float32) at ``--report-sizes`` pairs.

Peak memory is the peak resident set (VmHWM) of each phase, reset between phases of a process.

    python benchmarks/llm_scale.py [--sizes 32,128,512] [--report-sizes 32,128] [--shapes 135m,360m,1.7b]
                                   [--dtypes float32,bfloat16] [--out DIR]

Last line ``ratio: X``: the report's peak over the training step's, at 128 pairs on SmolLM2-135M
(float32); where 128 is not among ``--report-sizes``, the product's peak stands in (said so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import peak_rss_bytes, reset_peak_rss

SHAPES = {  # published configs (hidden, intermediate, layers, heads, kv heads); vocab 49152, tied embeddings
    "360m": (960, 2560, 32, 15, 5),
    "1.7b": (2048, 8192, 24, 32, 32),
}
HERE = Path(__file__).resolve().parent


def _model(shape: str, dtype: str, adapter: Path):
    """The peft model of ``shape`` in ``dtype`` with the benchmark's LoRA adapter, and the tokenizer."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from flatlora.causal_lm import load_base_causal_lm, load_causal_tokenizer

    torch_dtype = getattr(torch, dtype)
    if shape == "135m":
        base, tokenizer = load_base_causal_lm(None, dtype=torch_dtype)
        return PeftModel.from_pretrained(base, adapter, is_trainable=True), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch_dtype)
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model, load_causal_tokenizer(None)


def _pairs(tokenizer, n: int, batch_size: int):
    from flatlora_analysis import ProbeSet

    return ProbeSet.from_data("e2e", tokenizer, task="causal-lm", n=n, batch_size=batch_size, max_length=128)


def child(args: argparse.Namespace) -> dict:
    """One model in a fresh process: its training step, then gradient and product per probe size."""
    import torch

    out: dict = {"shape": args.shape, "dtype": args.dtype}
    model, tokenizer = _model(args.shape, args.dtype, Path(args.adapter))
    out["weights_rss"] = peak_rss_bytes()
    # the training step: 8 pairs padded to 128 tokens, AdamW on the LoRA factors
    batch = _pairs(tokenizer, 8, 8).batches[0]
    width = batch["input_ids"].shape[1]
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    batch = {k: torch.nn.functional.pad(v, (0, 128 - width), value=pad[k]) for k, v in batch.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak_rss()
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["step_seconds"], out["step_peak"] = time.perf_counter() - start, peak_rss_bytes()
    del optimizer
    model.eval()
    from flatlora_analysis.guard import measuring
    from flatlora_analysis.hessian.operator import HessianOperator
    from flatlora_analysis.micro_batch import planned_probe
    from flatlora_analysis.objective import ModelObjective
    from flatlora_analysis.spaces import build_space

    out["sizes"] = {}
    for n in args.sizes:
        probe = _pairs(tokenizer, n, 32)
        with measuring(model, "cpu") as dev:
            space = build_space(model, "lora")
            objective = ModelObjective(model, probe, space, dev)
            row: dict = {}
            reset_peak_rss()
            plan_probe = objective.gradient_probe()
            one = args.shape != "135m"  # big random shapes: one micro-batch stands for all of them
            if one:
                objective._gradient_probe = type(plan_probe)(plan_probe.batches[:1], None, {}, "tokens",
                                                             (probe.n_examples, probe.n_tokens))  # fmt: skip
            start = time.perf_counter()
            objective.loss_and_grad()
            row["gradient_seconds"], row["gradient_peak"] = time.perf_counter() - start, peak_rss_bytes()
            row["gradient_plan"] = objective.plan.meta()
            row["gradient_parts"] = len(plan_probe.batches)
            reset_peak_rss()
            with HessianOperator(ModelObjective(model, probe, space, dev), "autograd") as op:
                product_probe = planned_probe(op.objective.probe, op.plan)
                row["product_parts"] = len(product_probe.batches)
                if one:
                    op.batches = op.batches[:1]
                start = time.perf_counter()
                op.matvec(torch.ones(op.dim) / op.dim**0.5)
                row["product_seconds"], row["product_peak"] = time.perf_counter() - start, peak_rss_bytes()
                row["product_plan"] = op.plan.meta()
                row["same_batch"] = _same_batch(model, space, dev, product_probe.batches[0])
            row["one_micro_batch"] = one
            row["n_tokens"] = probe.n_tokens
        out["sizes"][str(n)] = row
        print(json.dumps({"progress": f"{args.shape} {args.dtype} {n} pairs done", **row}), file=sys.stderr, flush=True)
    return out


def _same_batch(model, space, dev, batch) -> dict:
    """One streamed Hessian product (graph built, used, freed) against one gradient, both of ``batch``:
    the best of two timings each, after a warm-up of both."""
    import torch

    from flatlora_analysis import ProbeSet
    from flatlora_analysis.hessian.operator import HessianOperator
    from flatlora_analysis.memory import MemoryBudget
    from flatlora_analysis.objective import ModelObjective

    probe = ProbeSet.from_batches([batch])
    whole = MemoryBudget(2**60, "the whole batch")  # one graph: the micro-batch itself
    objective = ModelObjective(model, probe, space, dev, budget=whole)
    zero, v = space.zeros(), torch.ones(space.dim) / space.dim**0.5
    times = {"gradient": [], "product": []}
    with HessianOperator(ModelObjective(model, probe, space, dev, budget=whole), "autograd", retain_graph=False) as op:
        for _ in range(3):
            start = time.perf_counter()
            objective.loss_and_grad(zero)  # a delta: never the shared clean value
            times["gradient"].append(time.perf_counter() - start)
            start = time.perf_counter()
            op.matvec(v)
            times["product"].append(time.perf_counter() - start)
    gradient, product = min(times["gradient"][1:]), min(times["product"][1:])
    return {"rows": len(batch["input_ids"]), "gradient_seconds": gradient, "product_seconds": product,
            "product_over_gradient": product / gradient}  # fmt: skip


def _run(cmd: list[str]) -> tuple[int, int, str]:
    """Run ``cmd``; (exit status, its own peak RSS in bytes from wait4, stdout)."""
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=None if "--child" in cmd else subprocess.DEVNULL, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        stdout.seek(0)
        return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, stdout.read()


def _report(adapter: Path, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "flatlora.cli", "report", str(adapter), "--data", "e2e", "--quick",
           "--examples", str(n), "--max-length", "128", "--out", str(out / f"report-{n}"), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    code, peak, stdout = _run(cmd)
    if code != 0:
        raise SystemExit(f"flatlora report failed ({code}): {stdout[-2000:]}")
    entry = json.loads((out / f"report-{n}" / "report.json").read_text())["entries"][0]
    cost = entry.get("cost") or {}
    total = sum(c.get("gradients") or 0 for c in cost.get("measures", {}).values())
    return {"seconds": time.perf_counter() - start, "peak": peak, "gradients": total,
            "gradient_seconds": cost.get("gradient_seconds")}  # fmt: skip


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,128,512")
    parser.add_argument("--report-sizes", default="32,128")
    parser.add_argument("--shapes", default="135m,360m,1.7b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", help="keep the adapter and reports here (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sizes = [int(x) for x in str(args.sizes).split(",") if x]
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llm-scale-"))
    adapter = root / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        sys.path.insert(0, str(HERE))
        from llm_report_cost import make_adapter

        make_adapter(adapter)
    results = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            sizes = args.sizes if shape == "135m" and dtype == "float32" else args.sizes[:1]
            cmd = [sys.executable, str(HERE / "llm_scale.py"), "--child", "--shape", shape, "--dtype", dtype,
                   "--adapter", str(adapter), "--sizes", ",".join(map(str, sizes))]  # fmt: skip
            code, _, stdout = _run(cmd)
            if code != 0:
                print(f"{shape} {dtype}: failed ({code})", flush=True)
                continue
            result = json.loads(stdout.strip().splitlines()[-1])
            results.append(result)
            step = result["step_peak"]
            print(f"\n{shape} {dtype}: weights {_gib(result['weights_rss'])} GiB, training step peak {_gib(step)} GiB "
                  f"({result['step_seconds']:.1f} s)", flush=True)  # fmt: skip
            print("| pairs | tokens | gradient s | gradient GiB | product s | product GiB | product/gradient | "
                  "product / step peak | plan | product / gradient, same micro-batch |")  # fmt: skip
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
            for n, row in result["sizes"].items():
                plan = row["product_plan"]
                how = plan["mode"] + (f" of {plan['micro_batch_rows']} rows" if "micro_batch_rows" in plan else "")
                how += " (one micro-batch timed)" if row["one_micro_batch"] else ""
                print(f"| {n} | {row['n_tokens']} | {row['gradient_seconds']:.1f} | {_gib(row['gradient_peak'])} | "
                      f"{row['product_seconds']:.1f} | {_gib(row['product_peak'])} | "
                      f"{row['product_seconds'] / row['gradient_seconds']:.2f} | {row['product_peak'] / step:.2f} | "
                      f"{how} | {row['same_batch']['product_over_gradient']:.2f} "
                      f"({row['same_batch']['rows']} rows) |", flush=True)  # fmt: skip
    base = next((r for r in results if r["shape"] == "135m" and r["dtype"] == "float32"), None)
    if base is None:
        print("(no SmolLM2-135M float32 run: no report and no ratio)")
        return 0
    reports = {}
    for n in [int(x) for x in args.report_sizes.split(",") if x]:
        reports[n] = _report(adapter, n, root)
        rep = reports[n]
        print(f"report --quick, {n} pairs: {rep['seconds']:.0f} s, peak {_gib(rep['peak'])} GiB = "
              f"{rep['peak'] / base['step_peak']:.2f} x the training step; {rep['gradients']:.1f} gradients "
              f"(a gradient {rep['gradient_seconds']:.2f} s)", flush=True)  # fmt: skip
    peaks = [r["product_peak"] for r in base["sizes"].values()]
    print(
        f"product peak from {min(map(int, base['sizes']))} to {max(map(int, base['sizes']))} pairs: "
        f"max/min {max(peaks) / min(peaks):.3f}"
    )
    if len(reports) > 1:
        report_peaks = [r["peak"] for r in reports.values()]
        print(f"report peak from {min(reports)} to {max(reports)} pairs: max/min "
              f"{max(report_peaks) / min(report_peaks):.3f}")  # fmt: skip
    if 128 in reports:
        print(f"ratio: {reports[128]['peak'] / base['step_peak']:.3f}")
    elif "128" in base["sizes"]:
        print("(no report at 128 pairs: the product's peak at 128 pairs stands in)")
        print(f"ratio: {base['sizes']['128']['product_peak'] / base['step_peak']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
