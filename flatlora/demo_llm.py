"""The main job's LLM half, ``flatlora demo --llm``: few-shot E2E NLG on SmolLM2-135M-Instruct.

Trains lora, flat-lora and eflat-lora on the bundled SmolLM2-135M-Instruct (GGUF, dequantized)
with k E2E meaning representations (each with all its references), evaluates the test loss and
perplexity, generates for the first test MRs and scores them with the official E2E metrics,
then prints one table. Finished runs of the same settings are reused on a rerun.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

LLM_DEMO = {"shots": 8, "steps": 60, "batch_size": 8, "lr": 1e-3, "test_cap": 50, "generate": 50}
"""The full LLM demo's settings (about 20 minutes on 2 CPU cores; see the README)."""
LLM_DEMO_QUICK = {"shots": 2, "steps": 3, "batch_size": 2, "lr": 1e-3, "test_cap": 4, "generate": 4}


def llm_demo_config(args: argparse.Namespace, method: str):
    """The TrainConfig of one LLM demo run: the demo's options named as fields, then its own settings.

    ``--seed``, ``--rho`` and ``--no-progress`` apply; :data:`LLM_DEMO` (or :data:`LLM_DEMO_QUICK`)
    replaces ``--shots``, ``--steps``, ``--lr`` and ``--test-cap``.
    """
    from flatlora.config import TrainConfig

    settings = LLM_DEMO_QUICK if args.quick else LLM_DEMO
    return TrainConfig.from_namespace(
        args,
        method=method,
        task="causal-lm",
        data="e2e",
        save_every=max(1, settings["steps"] // 4),
        diagnostics_every=max(1, settings["steps"] // 10) if method == "eflat-lora" else 0,
        decoding="greedy",
        **settings,
    )


def run_llm_demo(args: argparse.Namespace) -> int:
    """Train the LLM demo's runs (or reuse finished ones) and print their E2E table."""
    from flatlora.demo_common import reusable
    from flatlora.experiment import train_run
    from flatlora.runs import load_run
    from flatlora.tasks import resolve_task

    start = time.perf_counter()
    out = Path(args.out)
    settings = LLM_DEMO_QUICK if args.quick else LLM_DEMO
    print(
        f"# demo --llm: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized) + LoRA r=8 on q_proj/v_proj, E2E NLG, "
        f"k={settings['shots']} MRs (all their references), seed {args.seed}, {settings['steps']} steps, "
        f"test: {settings['test_cap']} MRs, greedy generation for {settings['generate']}; runs in {out}",
        flush=True,
    )
    runs = []
    for method in args.methods:
        config = llm_demo_config(args, method)
        folder = out / method
        previous = load_run(folder) if (folder / "run.json").exists() else None
        if not args.fresh and reusable(previous, resolve_task(config)):
            runs.append(previous)
        else:
            runs.append(train_run(config, folder, overwrite=True))
    print_llm_table(runs)
    print(f"# whole LLM demo: {time.perf_counter() - start:.0f} s")
    print("# measures of LLM adapters (sharpness, Hessian, landscapes) are not part of the demo yet")
    return 0


def print_llm_table(runs: list) -> None:
    """BLEU, NIST, METEOR, ROUGE_L, CIDEr, test loss / perplexity and wall time per run."""

    def cell(value, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    print("| method | BLEU | NIST | METEOR | ROUGE_L | CIDEr | test loss | test perplexity | wall time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        m = run.final
        print(
            f"| {run.method} | {cell(m.get('test_bleu'))} | {cell(m.get('test_nist'))} | "
            f"{cell(m.get('test_meteor'))} | {cell(m.get('test_rouge_l'))} | {cell(m.get('test_cider'))} | "
            f"{cell(m.get('test_loss'))} | {cell(m.get('test_perplexity'), 3)} | {run.info['wall_time_s']:.0f} |"
        )
    missing = {k: v for run in runs for k, v in (run.info.get("generation") or {}).get("unavailable", {}).items()}
    for metric, reason in missing.items():
        print(f"# {metric}: n/a ({reason})")
