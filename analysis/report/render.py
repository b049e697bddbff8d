"""The report's files: report.json (every figure with its settings), report.csv, report.md, report.html.

The table is one row per adapter; the HTML page is self-contained (plotly.js inlined), so it
opens offline and can be mailed.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from flatlora.runs import atomic_write_json, atomic_write_text
from flatlora_analysis.report.cost import cost_markdown
from flatlora_analysis.report.tables import report_correlation, summary_rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def to_markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    s = report["settings"]
    lines = [
        "# flatlora report",
        "",
        f"{len(rows)} adapter(s); preset `{s['preset']}`; probe: {s['split']} split, n = {s['n']}, "
        f"batch {s['batch_size']}; sharpness space `{s['space']}` at rho {', '.join(f'{r:g}' for r in s['rhos'])}; "
        f"Hessian space `{s['eig_space']}` (k = {s['eig_k']}, tol {s['eig_tol']:g}, trace {s['trace_samples']} "
        "Hutch++ products)" + (f"; literature measures: {', '.join(s['flatness'])}." if s.get("flatness") else "."),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c in ("name", "method") else "---:" for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    corr = report.get("correlation")
    if corr and corr.get("rows"):
        lines += [
            "",
            "## Sharpness vs generalization",
            "",
            f"{corr['n_runs']} runs; 95% bootstrap intervals ({corr['bootstrap']} resamples).",
            "",
            "| measure | vs | Kendall tau | Spearman | granulated Kendall (Psi) |",
            "|---|---|---:|---:|---:|",
        ]
        for c in corr["rows"]:
            lines.append(
                f"| {c['measure']} | {c['target']} | {_ci(c['kendall'])} | {_ci(c['spearman'])} | "
                f"{_ci(c['granulated'])} |"
            )
    lines += cost_markdown(report)
    return "\n".join(lines) + "\n"


def _ci(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("value") is None:
        return ""
    lo, hi = stat.get("low"), stat.get("high")
    interval = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{stat['value']:.3f}{interval}"


def _figures(report: dict[str, Any]) -> list[tuple[str, Any]]:
    from flatlora_analysis import plots

    entries = report["entries"]
    figs = [("Sharpness", plots.sharpness_bars_figure(entries)), ("Curvature", plots.curvature_bars_figure(entries))]
    curves = {e["name"]: e["landscape_1d"] for e in entries if e.get("landscape_1d")}
    if curves:
        figs.append(("Loss landscapes (1-D)", plots.landscape_1d_figure(curves)))
    densities = {e["name"]: e["hessian"]["density"] for e in entries if e.get("hessian", {}).get("density")}
    if densities:
        figs.append(("Spectral density", plots.density_figure(densities)))
    layers = {e["name"]: e["hessian"]["layers"] for e in entries if e.get("hessian", {}).get("layers")}
    if layers:
        figs.append(("Per-layer curvature", plots.layer_bars_figure(layers)))
    histories = {e["name"]: e["history"] for e in entries if e.get("history")}
    if histories:
        figs.append(("Training loss", plots.history_figure(histories, "loss")))
        if any(r.get("realized_norm") is not None for h in histories.values() for r in h):
            figs.append(("Realized perturbation", plots.realized_norm_figure(histories)))
        figs.append(("Balancedness during training", plots.history_figure(histories, "balancedness")))
    series = {e["name"]: e["ema_error"]["log"] for e in entries if (e.get("ema_error") or {}).get("log")}
    if series:
        figs.append(("Theorem 2", plots.ema_error_figure(series)))
    for name, fig in (report.get("extra_figures") or {}).items():
        figs.append((name, fig))
    corr = report.get("correlation")
    if corr and corr.get("rows"):
        first = corr["rows"][0]
        figs.append(
            (
                "Sharpness vs generalization",
                plots.correlation_scatter_figure(summary_rows(report), first["measure"], first["target"], first),
            )
        )
    return figs


def to_html(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A self-contained page: the summary table and every figure (plotly.js inlined once)."""
    import plotly.io as pio

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>flatlora report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>",
        "<h1>flatlora report</h1>",
    ]
    markdown = to_markdown(report, rows).splitlines()
    parts.append(f"<p>{html.escape(markdown[2])}</p>")
    cols = _columns(rows)
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>")
    parts.append("</table>")
    include = True
    for title, fig in _figures(report):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(pio.to_html(fig, include_plotlyjs=include, full_html=False))
        include = False
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_files(report: dict[str, Any], out: Path) -> None:
    """report.json, report.csv, report.md and report.html into ``out``, each atomically."""
    report["correlation"] = report_correlation(report)
    rows = summary_rows(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.csv", to_csv(rows))
    atomic_write_text(out / "report.md", to_markdown(report, rows))
    atomic_write_text(out / "report.html", to_html(report, rows))
