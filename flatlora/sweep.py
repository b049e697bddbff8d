"""``flatlora sweep``: train a grid of methods x rhos x lrs x seeds, then print its summary table.

Finished runs are skipped and unfinished ones resumed, so a killed sweep is restarted with the
same command.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from flatlora.config import TrainConfig
from flatlora.errors import FlatLoraError


def sweep_runs(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """Every point of the sweep's grid; lora ignores the rho axis.

    Args:
        args: The parsed ``flatlora sweep`` options (``methods``, ``rhos``, ``lrs``, ``seeds``
            and the TrainConfig options shared by every run).

    Returns:
        ``(folder name, config)`` per run, e.g. ``("eflat-lora-rho0.05-lr0.001-seed13", ...)``.
    """
    points = []
    for method, lr, seed in itertools.product(args.methods, args.lrs, args.seeds):
        rhos = [None] if method == "lora" else args.rhos
        for rho in rhos:
            name = f"{method}" + (f"-rho{rho:g}" if rho is not None else "") + f"-lr{lr:g}-seed{seed}"
            override = {"method": method, "lr": lr, "seed": seed}
            if rho is not None:
                override["rho"] = rho
            points.append((name, TrainConfig.from_namespace(args, **override)))
    return points


def run_sweep(args: argparse.Namespace) -> int:
    """Train every run of the grid into ``args.out`` (one run directory each) and print the summary.

    Args:
        args: The parsed ``flatlora sweep`` options.

    Returns:
        0 (the exit status).

    Raises:
        FlatLoraError: no method, an unwritable ``--out``, or a refused config (checked for every
            point before the first run trains).
    """
    from tqdm.auto import tqdm

    from flatlora import distributed
    from flatlora.atomic import check_writable
    from flatlora.experiment import train_run, validate
    from flatlora.runs import load_run

    if not args.methods:
        raise FlatLoraError("--methods is empty: name at least one method, e.g. --methods lora,eflat-lora")
    check_writable(args.out)
    points = sweep_runs(args)
    with distributed.agreed():
        for _, config in points:
            validate(config)
    out = Path(args.out)
    done = skipped = 0
    plain = args.progress and not sys.stderr.isatty()
    bar = tqdm(points, desc="sweep", unit="run", disable=not args.progress or plain or not distributed.is_main())
    for i, (name, config) in enumerate(bar, start=1):
        folder = out / name
        if (folder / "run.json").exists() and load_run(folder).status == "done":
            skipped += 1
            continue
        if plain and distributed.is_main():
            print(f"sweep: run {i}/{len(points)}: {name}", file=sys.stderr, flush=True)
        train_run(config, folder, resume=(folder / "run.json").exists())
        done += 1
    if distributed.is_main():
        print(f"sweep: {done} run(s) trained, {skipped} already finished, in {out}")
        print_summary(out)
    return 0


def sweep_summary_rows(root: str | Path) -> list[dict[str, Any]]:
    """Finished runs under ``root`` grouped by method, rho and lr, with mean/std over their seeds.

    Args:
        root: The sweep's folder.

    Returns:
        One row per group: ``method``, ``rho``, ``lr``, ``seeds``, ``task``, test accuracy and
        loss (``test_acc_mean``, ``test_acc_std``, ``test_loss_mean``), ``wall_s_mean`` and,
        for causal LMs, ``test_perplexity``/``test_bleu``/``test_rouge_l`` ``_mean`` and ``_std``
        (NaN where a run lacks them).
    """
    from flatlora.runs import list_runs

    groups: dict[tuple, list] = {}
    for run in list_runs(root, status="done"):
        key = (run.method, run.hparams.get("rho"), run.hparams.get("lr"))
        groups.setdefault(key, []).append(run)
    rows = []
    for (method, rho, lr), runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        acc = [r.final.get("test_accuracy", float("nan")) for r in runs]
        row = {
            "method": method,
            "rho": rho,
            "lr": lr,
            "seeds": len(runs),
            "task": runs[0].info.get("task", "classification"),
            "test_acc_mean": statistics.fmean(acc),
            "test_acc_std": statistics.stdev(acc) if len(acc) > 1 and not any(math.isnan(x) for x in acc) else 0.0,
            "test_loss_mean": statistics.fmean(r.final.get("test_loss", float("nan")) for r in runs),
            "wall_s_mean": statistics.fmean(r.info.get("wall_time_s") or float("nan") for r in runs),
        }
        for key in ("test_perplexity", "test_bleu", "test_rouge_l"):  # causal-LM runs
            values = [r.final.get(key) for r in runs]
            if any(v is None for v in values):  # classifiers, or a metric that could not be computed
                row[f"{key}_mean"] = row[f"{key}_std"] = float("nan")
                continue
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def print_summary(root: str | Path) -> None:
    """Print the sweep's summary as a Markdown table (causal-LM columns when every run is a causal LM).

    Args:
        root: The sweep's folder; nothing is printed when it holds no finished run.
    """
    rows = sweep_summary_rows(root)
    if not rows:
        return
    if all(r["task"] == "causal-lm" for r in rows):
        print(
            "| method | rho | lr | seeds | test perplexity (mean ± std) | BLEU (mean ± std) | ROUGE_L | wall time (s) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            print(
                f"| {r['method']} | {rho} | {r['lr']:g} | {r['seeds']} | {r['test_perplexity_mean']:.3f} ± "
                f"{r['test_perplexity_std']:.3f} | {r['test_bleu_mean']:.4f} ± {r['test_bleu_std']:.4f} | "
                f"{r['test_rouge_l_mean']:.4f} | {r['wall_s_mean']:.0f} |"
            )
        return
    print("| method | rho | lr | seeds | test accuracy (mean ± std) | test loss | wall time per run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rho = "" if r["rho"] is None else f"{r['rho']:g}"
        print(
            f"| {r['method']} | {rho} | {r['lr']:g} | {r['seeds']} | {100 * r['test_acc_mean']:.1f} ± "
            f"{100 * r['test_acc_std']:.1f} | {r['test_loss_mean']:.4f} | {r['wall_s_mean']:.0f} |"
        )
