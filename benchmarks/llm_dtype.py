"""What bfloat16 base weights change on a real LLM adapter: the measures, and the peak memory.

A stock-peft CAUSAL_LM adapter on SmolLM2-135M-Instruct (built as ``llm_report_cost.make_adapter``:
LoRA r = 8 on q_proj / v_proj, B drawn N(0, 0.02)), measured on the same 8 E2E train pairs (one
batch) with its base in float32, then in bfloat16 (the GGUF dequantized straight to it), each in
a fresh process: lambda_max (Lanczos, k = 1, tol 1e-3, LoRA space), the trace (Hutch++, fixed
seed, LoRA space) and the SAM sharpness (rho 0.05, merged space). The LoRA factors and the spaces
stay float32 in both. Peak memory is each child's own peak resident set (``ru_maxrss``): the
weights, the activations and the Hessian products' graphs.

    python benchmarks/llm_dtype.py [--examples 8] [--trace-samples 12] [--out DIR]

Prints each measure in both dtypes with the relative difference |bf16 - fp32| / |fp32|, each
child's peak RSS and time, and last the line ``ratio: X`` (bf16 peak RSS / fp32 peak RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import run_child

DTYPES = ("float32", "bfloat16")


def measure(adapter: str, dtype: str, examples: int, trace_samples: int) -> dict:
    """The three measures of ``adapter`` with its base in ``dtype``, and this process's peak RSS (a child's work)."""
    import resource

    import torch

    from flatlora_analysis import ProbeSet, hessian_trace, load_model, sharpness, top_eigenvalues

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_model(adapter, device="cpu", dtype=dtype)
    probe = ProbeSet.from_data("e2e", tokenizer, task="causal-lm", n=examples, batch_size=examples)
    loaded = time.perf_counter() - start
    eig = top_eigenvalues(model, probe, k=1, tol=1e-3, seed=0)
    trace = hessian_trace(model, probe, method="hutch++", samples=trace_samples, seed=0)
    sam = sharpness(model, probe, rho=0.05, kind="sam", space="merged")
    return {
        "dtype": dtype,
        "base_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n}),
        "lambda_max": eig.lambda_max,
        "lambda_hvps": eig.hvps,
        "trace": trace.trace,
        "trace_stderr": trace.stderr,
        "sam": sam.value,
        "clean_loss": sam.clean_loss,
        "load_seconds": loaded,
        "seconds": time.perf_counter() - start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8, help="E2E train pairs of the probe (one batch)")
    parser.add_argument("--trace-samples", type=int, default=12, help="Hutch++ products of the trace")
    parser.add_argument("--out", help="keep the adapter here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("ADAPTER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--make-adapter", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_adapter:
        from llm_report_cost import make_adapter

        make_adapter(Path(args.make_adapter))
        print("made")
        return 0
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.examples, args.trace_samples)))
        return 0
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llm-dtype-"))
    adapter = root / "adapter"
    script = str(Path(__file__).resolve())
    common = ["--examples", str(args.examples), "--trace-samples", str(args.trace_samples)]
    try:
        if not (adapter / "adapter_config.json").is_file():
            run_child([script, "--make-adapter", str(adapter)])  # its own process: the parent stays small
        found = {dtype: json.loads(run_child([script, *common, "--child", str(adapter), dtype])) for dtype in DTYPES}
    except subprocess.CalledProcessError as err:
        print(err.stderr[-3000:], file=sys.stderr)
        return 1
    fp32, bf16 = found["float32"], found["bfloat16"]
    print(f"probe: {args.examples} E2E train pairs; trace: Hutch++ with {args.trace_samples} products, seed 0")
    print(f"{'measure':<12} {'float32':>14} {'bfloat16':>14} {'rel. diff':>10}")
    for key in ("clean_loss", "lambda_max", "trace", "sam"):
        rel = abs(bf16[key] - fp32[key]) / abs(fp32[key]) if fp32[key] else float("nan")
        print(f"{key:<12} {fp32[key]:>14.6g} {bf16[key]:>14.6g} {rel:>10.2e}")
    print(f"trace stderr: float32 {fp32['trace_stderr']:.4g}, bfloat16 {bf16['trace_stderr']:.4g}")
    for r in (fp32, bf16):
        print(
            f"{r['dtype']}: base weights {', '.join(r['base_dtypes'])}, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
            f"{r['seconds']:.0f} s (load {r['load_seconds']:.0f} s), Lanczos {r['lambda_hvps']} HVPs"
        )
    print(f"ratio: {bf16['peak_rss'] / fp32['peak_rss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
