"""Redraw the README's 1-D figure from the demo's runs: ``python docs/figures.py [runs/demo]``.

Reads the 1-D landscapes the demo's report saved in each run's ``analysis/`` (the demo's
report settings name them) and draws LoRA against EFlat-LoRA with the matplotlib builder
the report uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flatlora.runs import load_run
from flatlora_analysis import ProbeSet, plots
from flatlora_analysis.landscape import landscape_call
from flatlora_analysis.loading import adapter_hash
from flatlora_analysis.report import preset
from flatlora_analysis.store import find, result_key


def main(runs_dir: str = "runs/demo") -> Path:
    s = preset("demo")
    name, _, key = landscape_call("1d", steps=s.landscape_steps, span=s.landscape_span, space=s.space, seed=s.seed)
    curves = {}
    for method in ("lora", "eflat-lora"):
        run = load_run(Path(runs_dir) / method)
        probe = ProbeSet.from_run(run, s.split, n=s.n, batch_size=s.batch_size)
        found = find(
            [run.path / "analysis"], result_key(adapter_hash(run.path / "adapter"), probe.fingerprint(), name, key)
        )
        if found is None:
            raise SystemExit(f"no saved 1-D landscape of the demo's settings for {method}: run `flatlora demo` first")
        curves[method] = found
    fig = plots.landscape_1d_png(curves, title="Demo: train loss along a filter-normalized direction")
    out = Path(__file__).parent / "landscape_1d.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
