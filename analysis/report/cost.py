"""What each measure of a report cost: seconds, Hessian products, passes, and gradient units.

The unit is one gradient: a forward and a backward over the whole probe set in the LoRA space,
timed in the same process on the same model (:func:`gradient_seconds`). A measure's cost in
gradients is its seconds over that time, so costs compare across machines, models and probe
sizes where seconds do not.
"""

from __future__ import annotations

from typing import Any

from flatlora_analysis.guard import measuring
from flatlora_analysis.objective import ModelObjective
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.spaces import build_space


def gradient_seconds(model: Any, probe: ProbeSet, device: Any = None) -> float:
    """Seconds of one forward + backward over ``probe`` (LoRA space, in the memory plan's micro-batches).

    The plan (and its small estimating passes) is made before the clock starts. The gradient
    timed is the clean one of the LoRA space, kept for the measures that start from it.
    """
    with measuring(model, device) as dev:
        return ModelObjective(model, probe, build_space(model, "lora"), dev).timed_clean_gradient()


def _passes(result: dict[str, Any]) -> dict[str, int]:
    """Products and passes a result's dict states (its ``hvps`` and its meta's counts)."""
    meta = result.get("meta") or {}
    out = {}
    products = result.get("hvps", meta.get("hvps"))
    if products is not None:
        out["products"] = int(products)
    for key in ("forward_passes", "backward_passes", "graph_builds"):
        if key in meta:
            out[key] = int(meta[key])
    return out


def cost_of(value: Any, seconds: float, unit: float) -> dict[str, Any]:
    """The cost record of a computed measure: seconds, gradients (seconds / ``unit``) and its passes.

    Args:
        value: the measure's result, its ``to_dict()``, or a list of them (sharpness at several radii).
        seconds: the time it took.
        unit: :func:`gradient_seconds` of the same model and probe.
    """
    parts = value if isinstance(value, list) else [value]
    counts: dict[str, int] = {}
    for part in parts:
        for key, n in _passes(part if isinstance(part, dict) else part.to_dict()).items():
            counts[key] = counts.get(key, 0) + n
    out = {"seconds": seconds, "gradients": seconds / unit if unit > 0 else None, "gradient_seconds": unit, **counts}
    if len(parts) > 1:
        out["results"] = len(parts)  # one call made them all: the cost is theirs together
    return out


def cost_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per adapter and measure: seconds, gradients, products and passes (computed now or when stored)."""
    rows = []
    for entry in report.get("entries", []):
        unit = (entry.get("cost") or {}).get("gradient_seconds")
        for label, cost in ((entry.get("cost") or {}).get("measures") or {}).items():
            rows.append({"name": entry["name"], "measure": label, **cost})
        if unit:
            total = sum(c.get("gradients") or 0.0 for c in entry["cost"]["measures"].values())
            seconds = sum(c.get("seconds") or 0.0 for c in entry["cost"]["measures"].values())
            rows.append({"name": entry["name"], "measure": "all", "seconds": seconds, "gradients": total})
    return rows


def cost_markdown(report: dict[str, Any]) -> list[str]:
    """The report's cost section (markdown lines; empty when no measure has a cost)."""
    rows = cost_rows(report)
    if not rows:
        return []
    units = {e["name"]: (e.get("cost") or {}).get("gradient_seconds") for e in report.get("entries", [])}
    lines = [
        "",
        "## Cost",
        "",
        "Gradients: seconds over the time of one forward + backward over the whole probe set, timed in the "
        "same process (" + ", ".join(f"{n}: {u:.3g} s" for n, u in units.items() if u) + ").",
        "",
        "| adapter | measure | seconds | gradients | products | forward passes | backward passes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.get(k) for k in ("seconds", "gradients", "products", "forward_passes", "backward_passes")]
        text = ["" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"| {r['name']} | {r['measure']} | " + " | ".join(text) + " |")
    return lines
