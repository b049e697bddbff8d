"""Top Hessian eigenvalues: flatlora's Lanczos against PyHessian's power iteration, same model and batch.

all-MiniLM-L6-v2 (the bundled default) with LoRA r = 8 on query/value, B drawn away from zero
as in a trained adapter, eval mode, one probe batch of 32 tweets x 64 tokens, CPU, the
``lora`` space (every A and B: what PyHessian sees on a peft model). The reference is
Lanczos run to tol 1e-10. Compared, in one process:

- top-1: products used by our Lanczos (tol 1e-3) and by PyHessian's power iteration (tol
  1e-3), and each one's relative error against the reference;
- top-5: products used by each, and whether each returned the five largest eigenvalues
  (PyHessian's deflated power iteration returns the largest in magnitude);
- time per Hessian-vector product, ours / PyHessian's (interleaved, median of repeats).

    python benchmarks/hessian.py [--quick]

Prints a table; the last line is ``ratio: X`` with X = our top-5 products / PyHessian's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
from _timing import interleaved

from flatlora_analysis import ProbeSet, top_eigenvalues
from flatlora_analysis.hessian import hessian_operator
from flatlora_analysis.hessian.pyhessian_backend import _session


def build(quick: bool, n_length: tuple[int, int] | None = None):
    from flatlora.data import load_tweets
    from flatlora.models import LoraOptions, load_classifier

    model, tokenizer = load_classifier(None, num_labels=3, lora=LoraOptions(r=8, alpha=16, lora_dropout=0.0), seed=0)
    model.base_model.model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as in a trained adapter: B away from zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    tweets = load_tweets()
    n, length = n_length or ((8, 32) if quick else (32, 64))
    examples = [tweets[i] for i in range(n)]
    enc = tokenizer(
        [e.text for e in examples], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    batch = {**dict(enc), "labels": torch.tensor([e.label for e in examples])}
    return model, ProbeSet.from_batches([batch], description={"n": n, "tokens": length})


def time_per_hvp(model, probe, repeats: int) -> tuple[float, float]:
    """Median seconds per product: our operator's and PyHessian's, on the same batch, interleaved."""
    module = sys.modules["pyhessian.hessian"]
    with hessian_operator(model, probe, "lora") as op, _session(model, probe, "lora", None, 0) as (engine, _, _):
        g = torch.Generator().manual_seed(1)
        v = torch.randn(op.dim, generator=g)
        op.matvec(v)  # builds and keeps the gradient graph, as PyHessian's constructor does
        parts = [p.view_as(q) for p, q in zip(v.split([q.numel() for q in engine.params]), engine.params)]
        calls = {
            "ours": lambda: op.matvec(v),
            "theirs": lambda: module.hessian_vector_product(engine.gradsH, engine.params, parts),
        }
        median = interleaved(calls, repeats).median()
    return median["ours"], median["theirs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 32 tokens and fewer repeats (a smoke run)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, probe = build(args.quick)

    t0 = time.perf_counter()
    reference = top_eigenvalues(model, probe, k=5, tol=1e-10, max_iter=400)
    ref = reference.eigenvalues
    print(
        f"# reference: Lanczos tol 1e-10, {reference.hvps} products, converged {reference.converged}, "
        f"{time.perf_counter() - t0:.0f} s; top-5 = {np.array2string(ref, precision=6)}"
    )
    ours1 = top_eigenvalues(model, probe, k=1, tol=1e-3)
    theirs1 = top_eigenvalues(model, probe, k=1, tol=1e-3, backend="pyhessian")
    ours5 = top_eigenvalues(model, probe, k=5, tol=1e-3)
    theirs5 = top_eigenvalues(model, probe, k=5, tol=1e-3, backend="pyhessian")
    t_ours, t_theirs = time_per_hvp(model, probe, 3 if args.quick else 7)

    def err(result) -> float:
        return float(abs(result.eigenvalues[0] - ref[0]) / abs(ref[0]))

    def five_largest(result) -> bool:
        return bool(np.allclose(np.sort(result.eigenvalues)[::-1], ref, rtol=1e-2, atol=1e-3 * abs(ref[0])))

    print()
    print("| measure | flatlora (Lanczos) | PyHessian (power iteration) | ratio ours / PyHessian | goal |")
    print("|---|---:|---:|---:|---|")
    print(f"| top-1 products (tol 1e-3) | {ours1.hvps} | {theirs1.hvps} | {ours1.hvps / theirs1.hvps:.3f} | <= 1 |")
    print(f"| top-1 relative error vs reference | {err(ours1):.1e} | {err(theirs1):.1e} | | both <= 1e-3 |")
    print(f"| top-5 products (tol 1e-3) | {ours5.hvps} | {theirs5.hvps} | {ours5.hvps / theirs5.hvps:.3f} | <= 1/3 |")
    print(f"| top-5 are the five largest | {five_largest(ours5)} | {five_largest(theirs5)} | | |")
    print(f"| time per product (ms) | {1e3 * t_ours:.1f} | {1e3 * t_theirs:.1f} | {t_ours / t_theirs:.3f} | <= 1.05 |")
    print()
    print(f"top-5, ours:      {np.array2string(ours5.eigenvalues, precision=6)}")
    print(f"top-5, PyHessian: {np.array2string(theirs5.eigenvalues, precision=6)}")
    print(f"ratio: {ours5.hvps / theirs5.hvps:.3f}")


if __name__ == "__main__":
    main()
