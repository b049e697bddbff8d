"""The report's tables: one summary row per adapter, and the correlation section built on those rows.

The statistics themselves are :mod:`flatlora_analysis.correlation` (pure functions of rows);
this module only knows where a report keeps each figure.
"""

from __future__ import annotations

import math
from typing import Any

from flatlora_analysis.correlation import correlation_table

# A causal-LM run's final test metrics shown beside its measures (perplexity, then the E2E metrics).
CAUSAL_METRICS = ("test_perplexity", "test_bleu", "test_nist", "test_meteor", "test_rouge_l", "test_cider")


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per entry: identity, hyperparameters, metrics, and one column per measure."""
    rows = []
    for e in report["entries"]:
        h, m = e.get("hparams") or {}, e.get("metrics") or {}
        row: dict[str, Any] = {
            "name": e["name"],
            "method": e.get("method") or "",
            "rho_train": h.get("rho") if e.get("method") not in (None, "lora") else None,
            "lr": h.get("lr"),
            "seed": h.get("seed"),
            "train_loss": m.get("train_loss"),
            "test_loss": m.get("test_loss"),
            "test_accuracy": m.get("test_accuracy"),
            "gap": _gap(m),
        }
        if e.get("task") == "causal-lm":
            row["task"] = "causal-lm"
            row.pop("test_accuracy")
            row.update({k: m.get(k) for k in CAUSAL_METRICS if m.get(k) is not None})
            clean = next((s["clean_loss"] for s in e.get("sharpness", []) if s.get("clean_loss") is not None), None)
            if clean is not None:  # the probe's token-mean loss: a bare adapter's only measured fit
                row["probe_perplexity"] = math.exp(clean) if clean < 700 else math.inf
        for s in e.get("sharpness", []):
            row[f"sharpness_{s['kind']}_rho{s['rho']:g}"] = s["value"]
        flat = e.get("flatness") or {}
        if flat.get("adaptive-worst"):
            row[f"adaptive_sharpness_rho{flat['adaptive-worst']['rho']:g}"] = flat["adaptive-worst"]["value"]
        for name, column in (("pac-bayes", "pac_bayes_flatness"), ("relative", "relative_flatness")):
            if flat.get(name):
                row[column] = flat[name]["value"]
        hess = e.get("hessian", {})
        if hess.get("top_eigenvalues"):
            row["lambda_max"] = hess["top_eigenvalues"]["eigenvalues"][0]
        if hess.get("trace"):
            row["trace"] = hess["trace"]["trace"]
            row["trace_stderr"] = hess["trace"]["stderr"]
        row["balancedness"] = e.get("balancedness", {}).get("total")
        ema = e.get("ema_error") or {}
        if ema.get("checkpoint"):
            row["ema_rel_error_checkpoint"] = ema["checkpoint"]["rel_error"][0]
        if ema.get("log"):
            finite = [v for v in ema["log"]["rel_error"] if v is not None]
            row["ema_rel_error_log_last"] = finite[-1] if finite else None
        rows.append(row)
    return rows


def _gap(metrics: dict[str, Any]) -> float | None:
    """Generalization gap: test loss minus train loss (positive when the model does worse on test)."""
    if metrics.get("train_loss") is None or metrics.get("test_loss") is None:
        return None
    return metrics["test_loss"] - metrics["train_loss"]


def report_correlation(report: dict[str, Any], n_resamples: int = 1000) -> dict[str, Any] | None:
    """The correlation section of a report (None with fewer than three runs with metrics)."""
    rows = summary_rows(report)
    table = correlation_table(rows, n_resamples=n_resamples)
    if not table:
        return None
    return {
        "n_runs": max(c.n_runs for c in table),
        "axes": table[0].settings["axes"],
        "bootstrap": n_resamples,
        "rows": [c.to_dict() for c in table],  # whole results: the dashboard shows them as computed here
    }


def correlation_for(report: dict[str, Any], measure: str, target: str):
    """The report's :class:`~flatlora_analysis.correlation.CorrelationResult` of ``measure`` against ``target``.

    None where the report has none for the pair, or predates whole results in its section.
    """
    from flatlora_analysis.results import Result

    for row in (report.get("correlation") or {}).get("rows", []):
        if row.get("measure") == measure and row.get("target") == target and "type" in row:
            return Result.from_dict(row)
    return None
