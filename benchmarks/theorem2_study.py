"""Does EFlat-LoRA's averaged perturbation shrink, and does keeping its radius close the gap to Flat-LoRA?

Trains lora, flat-lora and eflat-lora for every beta x ema_radius (``ema``: the paper's rule,
``rho``: the EMA rescaled to radius rho) over seeds, then prints per cell the test accuracy
and loss (mean +- std over seeds), the realized perturbation norm over rho, the consecutive-step
cosine of the exact perturbation, the EMA-norm share that cosine predicts for a stationary
rotation (``analysis.ema_norm_ratio``), and cos(e_bar, eps_B) (the cheap part of Theorem 2).
Then every run is measured by ``flatlora report`` (OUT/report: SAM and Flat-LoRA sharpness,
lambda_max, the literature's flatness measures, the Theorem-2 error at the last checkpoint;
its correlation table ranks them against test loss and accuracy over all runs), and a second
table gives those measures per cell. Finished runs and measures in --out are reused, so an
interrupted study resumes.

    python benchmarks/theorem2_study.py --data ../shared/data/sst2 [--seeds 13,21,42,87,100]
        [--betas 0,0.5,0.9,0.99] [--radii ema,rho] [--steps 200] [--out runs/theorem2] [--no-measure]

Writes OUT/study.json (one row per run), OUT/realized_ratio.png (realized norm / rho over
training per cell) and OUT/beta_sweep.png (test accuracy and loss against beta per
ema_radius), and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any


def cells(betas: list[float], radii: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, method options) of every cell: lora, flat-lora, then eflat-lora per beta x radius."""
    out = [("lora", {"method": "lora"}), ("flat-lora", {"method": "flat-lora"})]
    for beta in betas:
        for radius in radii:
            out.append((f"eflat-b{beta:g}-{radius}", {"method": "eflat-lora", "beta": beta, "ema_radius": radius}))
    return out


def median_of(records: list[dict[str, Any]], key: str, after: int = 0) -> float | None:
    values = [r[key] for r in records if r.get("phase") == "train" and r.get(key) is not None and r["step"] > after]
    return statistics.median(values) if values else None


def run_row(run, options: dict[str, Any]) -> dict[str, Any]:
    from flatlora_analysis import ema_norm_ratio

    records, steps = run.metrics, run.hparams.get("steps", 0)
    half = steps // 2  # the second half of training: past the EMA's warm-up
    rotation = median_of(records, "eps_rotation_cosine", half)
    beta = options.get("beta")
    return {
        "run": run.path.name,
        "method": run.method,
        "beta": beta,
        "ema_radius": options.get("ema_radius"),
        "seed": run.hparams.get("seed"),
        "test_accuracy": run.final.get("test_accuracy"),
        "test_loss": run.final.get("test_loss"),
        "realized_ratio": median_of(records, "realized_ratio", half),
        "rotation_cosine": rotation,
        "predicted_ratio": ema_norm_ratio(beta, max(-1.0, min(1.0, rotation)))
        if beta is not None and rotation is not None
        else None,
        "ema_cosine": median_of(records, "ema_cosine", half),
    }


MEASURES = (  # (report row column, table header)
    ("sharpness_sam_rho0.05", "SAM sharpness"),
    ("sharpness_flat-lora_rho0.05", "Flat-LoRA sharpness"),
    ("lambda_max", "lambda_max"),
    ("adaptive_sharpness_rho0.001", "adaptive sharpness"),
    ("pac_bayes_flatness", "PAC-Bayes 1/sigma^2"),
    ("relative_flatness", "relative flatness"),
    ("ema_rel_error_checkpoint", "Theorem-2 error"),
)


def study_report_settings():
    """The report every study run gets: cheap sharpness, lambda_max, the literature's measures, Theorem 2."""
    import dataclasses

    from flatlora_analysis.report import preset

    settings = preset("quick", kinds=("sam", "flat-lora"), trace_samples=0, landscape_steps=0, pac_bayes_samples=4)
    return dataclasses.replace(settings, n=None)  # the whole few-shot training split (preset() reads None as unset)


def measure_runs(folders: list[Path], out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(run name -> report row, the report's correlation section) for the study's runs."""
    from flatlora_analysis.report import build_report, summary_rows

    report = build_report([str(f) for f in folders], out, study_report_settings())
    return {row["name"]: row for row in summary_rows(report)}, report.get("correlation")


def measures_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    lines = ["| cell | " + " | ".join(h for _, h in MEASURES) + " |", "|---|" + "---:|" * len(MEASURES)]
    for name in names:
        mine = [r for r in rows if r["cell"] == name]
        if mine:
            cols = [_mean_std_sig([r.get(k) for r in mine]) for k, _ in MEASURES]
            lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def correlation_lines(correlation: dict[str, Any] | None) -> str:
    """Kendall tau of each measure against test loss and accuracy over every run of the study."""
    if not correlation:
        return ""
    lines = ["| measure | vs | Kendall tau [95% CI] | granulated Kendall |", "|---|---|---:|---:|"]
    for c in correlation["rows"]:
        if c["target"] in ("test_loss", "test_accuracy") and c["measure"] in dict(MEASURES):
            k, g = c["kendall"], c["granulated"] or {}
            interval = f" [{k['low']:.2f}, {k['high']:.2f}]" if k.get("low") is not None else ""
            tau = "n/a" if k.get("value") is None else f"{k['value']:.3f}"  # undefined (NaN, None in JSON)
            psi = "" if g.get("value") is None else f"{g['value']:.3f}"
            lines.append(f"| {c['measure']} | {c['target']} | {tau}{interval} | {psi} |")
    return "\n".join(lines)


def save_figures(out: Path, rows: list[dict[str, Any]], histories: dict[str, list], names: list[str]) -> None:
    from flatlora_analysis import plots

    groups = {name: [histories[r["run"]] for r in rows if r["cell"] == name] for name in names if name != "lora"}
    for fig, file in (
        (plots.realized_ratio_png(groups), "realized_ratio.png"),
        (plots.beta_sweep_png(rows), "beta_sweep.png"),
    ):
        tmp = out / f".{file}.tmp.png"
        fig.savefig(tmp, dpi=130)
        tmp.replace(out / file)


def _mean_std_sig(values: list[float | None]) -> str:
    """mean +- std in three significant digits (the measures span 1e-5 to 1)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {std:.2g}"


def _mean_std(values: list[float | None], scale: float = 1.0, digits: int = 4) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows: list[dict[str, Any]], names: list[str]) -> str:
    lines = [
        "| cell | seeds | test accuracy (%) | test loss | realized / rho | rotation cos | predicted EMA share | "
        "cos(e_bar, eps_B) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        mine = [r for r in rows if r["cell"] == name]
        if not mine:
            continue
        cols = [_mean_std([r["test_accuracy"] for r in mine], 100, 1), _mean_std([r["test_loss"] for r in mine])]
        cols += [_mean_std([r[k] for r in mine], 1, 3) for k in ("realized_ratio", "rotation_cosine")]
        cols += [_mean_std([r[k] for r in mine], 1, 3) for k in ("predicted_ratio", "ema_cosine")]
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tweets", help="as flatlora train --data (default: tweets)")
    parser.add_argument("--model", default=None, help="as flatlora train --model (default: the bundled MiniLM)")
    parser.add_argument("--seeds", default="13,21,42,87,100")
    parser.add_argument("--betas", default="0,0.5,0.9,0.99")
    parser.add_argument("--radii", default="ema,rho")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-cap", default="auto")
    parser.add_argument("--out", default="runs/theorem2")
    parser.add_argument("--no-measure", dest="measure", action="store_false", help="skip the report's measures")
    args = parser.parse_args(argv)

    from flatlora.atomic import atomic_write_json
    from flatlora.experiment import TrainConfig, train_run
    from flatlora.runs import load_run

    seeds = [int(s) for s in args.seeds.split(",")]
    betas = [float(b) for b in args.betas.split(",")]
    radii = [r.strip() for r in args.radii.split(",")]
    test_cap = None if args.test_cap == "none" else args.test_cap if args.test_cap == "auto" else int(args.test_cap)
    out = Path(args.out)
    grid = cells(betas, radii)
    rows, folders, histories = [], [], {}
    for name, options in grid:
        for seed in seeds:
            folder = out / f"{name}-seed{seed}"
            config = TrainConfig(data=args.data, model=args.model, shots=args.shots, steps=args.steps, seed=seed,
                                 rho=args.rho, batch_size=args.batch_size, test_cap=test_cap, log_every=1,
                                 save_every=args.steps, progress=False, **options)  # fmt: skip
            if (folder / "run.json").exists() and load_run(folder).status == "done":
                run = load_run(folder)
            else:
                print(f"theorem2 study: {folder.name}", file=sys.stderr, flush=True)
                run = train_run(config, folder, overwrite=True)
            rows.append({"cell": name, **run_row(run, options)})
            folders.append(folder)
            histories[run.path.name] = run.metrics
    names = [name for name, _ in grid]
    correlation = None
    if args.measure:
        measured, correlation = measure_runs(folders, out / "report")
        for row in rows:
            row.update({k: measured.get(row["run"], {}).get(k) for k, _ in MEASURES})
    atomic_write_json(out / "study.json", {"settings": vars(args), "rows": rows, "correlation": correlation})
    save_figures(out, rows, histories, names)
    print(table(rows, names))
    if args.measure:
        print()
        print(measures_table(rows, names))
        print()
        print(correlation_lines(correlation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
