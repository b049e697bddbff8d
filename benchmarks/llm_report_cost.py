"""What ``flatlora report --quick`` costs on a real LLM adapter: wall time and peak memory.

A stock-peft CAUSAL_LM adapter (LoRA r = 8 on q_proj / v_proj, B drawn N(0, 0.02) so it is not
the base model) on SmolLM2-135M-Instruct (the bundled default LLM), measured by the quick preset
on 32 probe pairs of the bundled E2E data (one batch of 32, at most 128 tokens each), in a fresh
``flatlora report`` process. Peak memory is the process's peak resident set (``ru_maxrss`` of the
child: weights, activations and the Hessian products' graph).

    python benchmarks/llm_report_cost.py [--examples 32] [--out DIR]

Prints the report's table, the time of each measure (report.json's timing) and last two lines
``seconds: X`` and ``peak RSS MiB: Y``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import children_peak_rss_bytes, time_call


def make_adapter(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from flatlora.causal_lm import DEFAULT_LLM_ID, load_base_causal_lm

    base, _ = load_base_causal_lm(DEFAULT_LLM_ID)
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--out", help="keep the adapter and report here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llm-report-"))
    adapter, report = root / "adapter", root / "report"
    if not (adapter / "adapter_config.json").is_file():
        make_adapter(adapter)
    cmd = [sys.executable, "-m", "flatlora.cli", "report", str(adapter), "--data", "e2e", "--quick",
           "--examples", str(args.examples), "--batch-size", str(args.examples), "--max-length", "128",
           "--out", str(report), "--no-progress"]  # fmt: skip
    seconds, done = time_call(subprocess.run, cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    print(done.stdout)
    [entry] = json.loads((report / "report.json").read_text())["entries"]
    for name, value in entry["timing"].items():
        print(f"  {name:<22} {value:7.1f} s")
    probe = entry["hessian"]["top_eigenvalues"]["settings"]
    print(f"probe: {args.examples} E2E pairs, {probe.get('n_tokens')} scored tokens")
    peak = children_peak_rss_bytes() / 2**20
    print(f"seconds: {seconds:.1f}")
    print(f"peak RSS MiB: {peak:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
