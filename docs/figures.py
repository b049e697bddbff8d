"""Redraw the README's 1-D figure from the demo's runs: ``python docs/figures.py [runs/demo]``.

Reads the 1-D landscapes the demo's report saved in each run's ``analysis/`` (21 points,
merged space, seed 0, 32 training examples) and draws LoRA against EFlat-LoRA with the
matplotlib builder the report uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis import plots
from analysis.landscape.store import cached_landscape, landscape_key, landscape_settings
from flatlora.runs import load_run


def main(runs_dir: str = "runs/demo") -> Path:
    settings = landscape_settings(steps=21, span=1.0, n=32, batch_size=32)
    curves = {}
    for method in ("lora", "eflat-lora"):
        run = load_run(Path(runs_dir) / method)
        parts = landscape_key(run.path / "adapter", "1d", settings)

        def missing(method=method):
            raise SystemExit(f"no saved 21-point landscape for {method}: run `flatlora demo` first")

        curves[method], _ = cached_landscape(run.path / "analysis", parts, missing, write=False)
    fig = plots.landscape_1d_png(curves, title="Demo: train loss along a filter-normalized direction")
    out = Path(__file__).parent / "landscape_1d.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
