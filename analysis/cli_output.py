"""What the measuring commands print beside their files: the summary table, the costs, the memory plans."""

from __future__ import annotations

import argparse
from typing import Any


def memory_budget(args: argparse.Namespace) -> None:
    """Resolve --max-memory now (auto: a share of what is free at the start) and tell each memory plan once."""
    import sys

    from flatlora_analysis.loading import default_device
    from flatlora_analysis.memory import announce_to, set_max_memory

    set_max_memory(args.max_memory, args.device or default_device())
    announce_to(lambda line: print(f"flatlora: {line}", file=sys.stderr, flush=True))


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keep = (
        ["name", "method", "test_accuracy", "test_perplexity", "test_bleu", "probe_perplexity", "gap"]
        + [k for k in rows[0] if k.startswith("sharpness_")]
        + ["lambda_max", "trace", "balancedness"]
    )
    cols = [c for c in keep if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def print_costs(report: dict[str, Any]) -> None:
    """Each adapter's measures in seconds and in gradients (one forward + backward over its probe set)."""
    from flatlora_analysis.report.cost import cost_rows

    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in cost_rows(report):
        if row.get("gradients") is not None:
            by_name.setdefault(row["name"], []).append(row)
    for name, rows in by_name.items():
        total = next(r for r in rows if r["measure"] == "all")
        parts = ", ".join(f"{r['measure']} {r['gradients']:.1f}" for r in rows if r["measure"] != "all")
        print(f"cost of {name}: {total['gradients']:.1f} gradients ({total['seconds']:.1f} s): {parts}")
