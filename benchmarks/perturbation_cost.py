"""Cost of Flat-LoRA's B perturbation: flatlora's r x r route against the m x n route.

The reference is the route of the public re-implementation, written out here: form the full
gradient estimate G_hat (m x n) of each layer with pseudo-inverses of A^T and B^T, then
eps_W = rho G_hat / N (N the global norm over layers), then eps_B = eps_W pinv(A) / s.
Both routes run on the same layers (default 8 of 4096 x 4096, r = 16, float32, CPU); the
script checks they agree, then reports median time and extra peak memory of each.

Extra peak memory is the growth of the process's peak resident set during one call (inputs
excluded, outputs included for both), measured in a fresh subprocess per route after a
warm-up, with the peak reset through /proc/self/clear_refs and glibc told to map every
allocation (MALLOC_MMAP_THRESHOLD_=0) so that freed memory really leaves and reused heap
pages do not hide an allocation. Linux only.

    python benchmarks/perturbation_cost.py [--layers 8] [--dim 4096] [--rank 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os

import torch
from _timing import interleaved, peak_rss_bytes, reset_peak_rss, run_child, status_bytes

from flatlora.perturbation import flat_lora_eps_b


def reference_eps_b(As, Bs, gAs, gBs, scalings, rho):
    """The m x n route: G_hat formed per layer, kept for the global norm, then carried into B."""
    g_hats = []
    for A, B, gA, gB, s in zip(As, Bs, gAs, gBs, scalings):
        g_hats.append(0.5 * (gB @ torch.linalg.pinv(A.T) / s + torch.linalg.pinv(B.T) @ gA / s))
    norm = torch.sqrt(sum((g * g).sum() for g in g_hats))
    return [(rho * g / norm) @ torch.linalg.pinv(A) / s for g, A, s in zip(g_hats, As, scalings)]


def ours(As, Bs, gAs, gBs, scalings, rho):
    return flat_lora_eps_b(As, Bs, gAs, gBs, scalings, rho)


def make_layers(layers: int, dim: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(rank, dim, generator=g) / dim**0.5 for _ in range(layers)]
    Bs = [torch.randn(dim, rank, generator=g) * 0.01 for _ in range(layers)]
    gAs = [torch.randn(rank, dim, generator=g) * 1e-3 for _ in range(layers)]
    gBs = [torch.randn(dim, rank, generator=g) * 1e-3 for _ in range(layers)]
    return As, Bs, gAs, gBs, [2.0] * layers


ROUTES = {"reference": reference_eps_b, "ours": ours}


def _measure_here(route: str, args) -> int:
    """In this process: extra peak resident bytes of one call of ``route`` after a warm-up."""
    call = (*make_layers(args.layers, args.dim, args.rank), 0.05)
    out = ROUTES[route](*call)  # warm-up: load the linear algebra code, size the thread pools
    del out
    reset_peak_rss()
    before = status_bytes("VmRSS")
    outputs = ROUTES[route](*call)
    peak = peak_rss_bytes() - before  # the outputs, still held here, count too
    del outputs
    return peak


def extra_peak_bytes(route: str, args) -> int:
    """Run :func:`_measure_here` in a fresh subprocess, so the routes do not share a heap."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="0")
    argv = [__file__, "--measure-memory", route, "--layers", str(args.layers), "--dim", str(args.dim),
            "--rank", str(args.rank)]  # fmt: skip
    return int(run_child(argv, env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure-memory", choices=list(ROUTES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        print(_measure_here(args.measure_memory, args))
        return
    torch.manual_seed(0)
    rho = 0.05
    inputs = make_layers(args.layers, args.dim, args.rank)
    call = (*inputs, rho)

    # Agreement first: the reference is float32 with m x n pseudo-inverses, ours float64 r x r.
    ref, mine = reference_eps_b(*call), ours(*call)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(mine, ref))
    assert rel < 1e-3, f"routes disagree: max relative difference {rel:.2e}"

    calls = {"ours": lambda: ours(*call), "reference": lambda: reference_eps_b(*call)}
    median = interleaved(calls, args.repeats, warmup=1).median()  # interleaved: machine noise hits both alike
    t_ours, t_ref = median["ours"], median["reference"]
    m_ours, m_ref = extra_peak_bytes("ours", args), extra_peak_bytes("reference", args)

    mib = 2**20
    print(
        f"# {args.layers} layers of {args.dim} x {args.dim}, r = {args.rank}, float32, CPU, "
        f"{torch.get_num_threads()} threads; max relative difference of eps_B {rel:.1e}"
    )
    print("| route                    | median time (ms) | extra peak memory (MiB) |")
    print("|--------------------------|-----------------:|------------------------:|")
    print(f"| reference (m x n, pinv)  | {t_ref * 1e3:16.1f} | {m_ref / mib:23.1f} |")
    print(f"| flatlora (r x r)         | {t_ours * 1e3:16.2f} | {m_ours / mib:23.2f} |")
    print(f"| ratio reference / ours   | {t_ref / t_ours:16.0f} | {m_ref / m_ours:23.0f} |")
    print(f"memory ratio: {m_ref / m_ours:.0f}")
    print(f"ratio: {t_ref / t_ours:.0f}")


if __name__ == "__main__":
    main()
