"""Redraw the README's 1-D figure from the demo's runs: ``python docs/figures.py [runs/demo]``.

Reads the 1-D landscapes the demo's report saved in each run's ``analysis/`` (the demo's
report settings name them) and draws LoRA against EFlat-LoRA with the matplotlib builder
the report uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flatlora.runs import load_run
from flatlora_analysis import plots
from flatlora_analysis.landscape import load_landscape
from flatlora_analysis.landscape.store import landscape_key
from flatlora_analysis.report import preset
from flatlora_analysis.results import cache_key


def main(runs_dir: str = "runs/demo") -> Path:
    settings = preset("demo").landscape_settings()
    curves = {}
    for method in ("lora", "eflat-lora"):
        run = load_run(Path(runs_dir) / method)
        found = load_landscape(run.path / "analysis", cache_key(landscape_key(run.path / "adapter", "1d", settings)))
        if found is None:
            raise SystemExit(f"no saved 1-D landscape of the demo's settings for {method}: run `flatlora demo` first")
        curves[method] = found
    fig = plots.landscape_1d_png(curves, title="Demo: train loss along a filter-normalized direction")
    out = Path(__file__).parent / "landscape_1d.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
