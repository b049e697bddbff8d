"""The report's --full Hessian measures: the shared engine against the reference engine, same settings.

all-MiniLM-L6-v2 (the bundled default) with LoRA r = 8 on query/value (12 layers), B drawn
away from zero as in a trained adapter, one probe batch (``--quick``: 8 tweets x 32 tokens;
else the --full preset's 64 x 64), CPU, the ``lora`` space. Both engines compute the
--full preset's Hessian measures (top-5 eigenvalues at tol 1e-3, the trace with 60 Hutch++
products, the SLQ density of 2 x 40 steps, per-layer top eigenvalue and trace) with the same
seed, interleaved (shared, reference, shared, reference: the best time of each), and the
answers are compared: top and per-layer eigenvalues within 1e-3 relative, traces within two
standard errors of each other (sqrt(se_a^2 + se_b^2)).

    python benchmarks/report_cost.py [--quick]

Prints a table; the last line is ``ratio: X`` with X = shared time / reference time.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from _timing import interleaved
from hessian import build

from flatlora_analysis.hessian.suite import curvature
from flatlora_analysis.report import PRESETS

FULL = PRESETS["full"]
SETTINGS = {
    "k": FULL.eig_k,
    "tol": FULL.eig_tol,
    "trace_samples": FULL.trace_samples,
    "density_steps": FULL.density_steps,
    "density_runs": FULL.density_runs,
    "layers": True,
    "layer_trace_samples": FULL.layer_trace_samples,
    "seed": 0,
}


def within(a: float, sa: float, b: float, sb: float, z: float = 2.0) -> bool:
    return abs(a - b) <= z * math.sqrt(sa**2 + sb**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 32 tokens instead of 64 x 64")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine, interleaved")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, probe = build(args.quick, n_length=None if args.quick else (64, 64))

    def run(engine: str):
        return lambda: curvature(model, probe, "lora", engine=engine, **SETTINGS)

    def show(engine: str, seconds: float) -> None:
        print(f"{engine}: {seconds:.1f} s", flush=True)

    timings = interleaved({engine: run(engine) for engine in ("shared", "reference")}, args.repeats, on_time=show)
    results = timings.results
    new, ref = results["shared"].parts(), results["reference"].parts()
    top_rel = np.abs(new["top_eigenvalues"].eigenvalues - ref["top_eigenvalues"].eigenvalues) / np.abs(
        ref["top_eigenvalues"].eigenvalues
    )
    layer_rel = np.abs(new["layers"].eigenvalues - ref["layers"].eigenvalues) / np.abs(ref["layers"].eigenvalues)
    t_new, t_ref = new["trace"], ref["trace"]
    trace_ok = within(t_new.trace, t_new.stderr, t_ref.trace, t_ref.stderr)
    layer_ok = [
        within(a, sa, b, sb)
        for a, sa, b, sb in zip(new["layers"].traces, new["layers"].trace_stderr, ref["layers"].traces,
                                ref["layers"].trace_stderr)
    ]  # fmt: skip
    products = {e: {n: p.hvps for n, p in r.parts().items()} for e, r in results.items()}
    best = timings.best()
    print()
    print("| engine | best time (s) | products: top-5 | trace | density | layers | all |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for engine in ("reference", "shared"):
        p = products[engine]
        cells = " | ".join(str(p.get(n, 0)) for n in ("top_eigenvalues", "trace", "density", "layers"))
        print(f"| {engine} | {best[engine]:.1f} | {cells} | {results[engine].hvps} |")
    print()
    print(f"top-5 eigenvalues: largest relative difference {top_rel.max():.1e} (<= 1e-3: {top_rel.max() <= 1e-3})")
    print(f"per-layer top eigenvalues: largest relative difference {layer_rel.max():.1e} "
          f"(<= 1e-3: {layer_rel.max() <= 1e-3})")  # fmt: skip
    print(f"trace: shared {t_new.trace:.4g} +- {t_new.stderr:.2g}, reference {t_ref.trace:.4g} +- {t_ref.stderr:.2g} "
          f"(within 2 SE: {trace_ok})")  # fmt: skip
    print(f"per-layer traces within 2 SE of each other: {sum(layer_ok)} of {len(layer_ok)} "
          f"(by chance alone about 95% are)")  # fmt: skip
    se_ratio = np.median(new["layers"].trace_stderr / ref["layers"].trace_stderr)
    probes = new["trace"].hvps
    print(f"per-layer trace standard errors, shared / reference: median {se_ratio:.2f} "
          f"(shared: {probes} probes, off-diagonal blocks included; reference: Hutch++ per layer)")  # fmt: skip
    print(f"shares: {', '.join(results['shared'].shares)}")
    print(f"ratio: {best['shared'] / best['reference']:.3f}")


if __name__ == "__main__":
    main()
