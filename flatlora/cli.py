"""The ``flatlora`` command line: train, sweep and the demo.

Errors a user can cause print one line and exit with status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError

HELP = {
    "method": "training method: lora, lora-sam, flat-lora, eflat-lora, rwp-lora, bar",
    "task": "classification or causal-lm (default: inferred from the data; an E2E folder or prompt/target "
    "columns mean causal-lm)",
    "data": "classification: tweets (bundled, the default), a GLUE task name or hub dataset id (needs flatlora[hub]), "
    "a GLUE-format folder, a folder datasets reads, or a CSV/TSV/JSONL file; causal-lm: e2e (bundled, the default), "
    "an E2E folder (trainset/devset.csv, testset_w_refs.csv) or a CSV/TSV/JSONL file with prompt/target columns",
    "model": "HF hub id or local folder (default: the bundled all-MiniLM-L6-v2; causal-lm: SmolLM2-135M-Instruct)",
    "shots": "k examples per class (causal-lm: k prompts, each with all its references; LM-BFF few-shot); "
    "'none' trains on the whole train split",
    "seed": "seed of the few-shot sample, the head's init, data order and dropout",
    "test_cap": "evaluate on at most this many test examples (causal-lm: prompts with all their references), "
    "drawn with seed 42; 'none' for all; default auto: 1000 examples, or 50 prompts for causal-lm",
    "text_column": "text column of a CSV/TSV/JSONL file (default: detected); causal-lm: alone, plain LM",
    "label_column": "label column of a CSV/TSV/JSONL file (default: label)",
    "prompt_column": "causal-lm: prompt column of a CSV/TSV/JSONL file (default: detected, e.g. prompt, mr)",
    "target_column": "causal-lm: target column (default: detected, e.g. target, ref); loss on its tokens only",
    "gguf_file": "causal-lm: a GGUF checkpoint (a .gguf path, or a file name inside --model's folder)",
    "chat_template": "causal-lm: do not wrap prompts in the tokenizer's chat template",
    "generate": "causal-lm: at the end, generate for N test prompts and score them (BLEU, NIST, METEOR, ROUGE_L, "
    "CIDEr); 0: off",
    "decoding": "causal-lm generation: greedy, or e2e (beam 10, length penalty 0.9, no repeated 4-grams, 64 tokens)",
    "num_beams": "causal-lm generation: beams (overrides --decoding's)",
    "max_new_tokens": "causal-lm generation: new tokens at most (overrides --decoding's 64)",
    "rho": "perturbation radius (full weight space for flat-lora / eflat-lora)",
    "rho_schedule": "constant, linear or cosine from --rho to --rho-min",
    "rho_min": "final radius of a rho schedule",
    "beta": "eflat-lora: EMA weight of the previous average, in [0, 1)",
    "ema_radius": "eflat-lora: ema applies the EMA itself (the paper's rule), rho applies it rescaled to radius rho",
    "norm": "flat-lora / eflat-lora: global (SAM's ball over all layers) or layer",
    "adaptive": "lora-sam: adaptive SAM (ASAM)",
    "diagnostics_every": "eflat-lora: run the Theorem-2 check every k steps (0: off)",
    "perturbation_sync": "multi-process: local (per-rank perturbation) or global (all-reduced first pass)",
    "r": "LoRA rank",
    "alpha": "LoRA alpha (scaling alpha / r)",
    "lora_dropout": "dropout on the LoRA branch",
    "target_modules": "module names to adapt (default: query/value; c_attn for GPT-2)",
    "rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "steps": "optimizer steps",
    "lr": "learning rate",
    "optim": "base optimizer, as TrainingArguments.optim (adamw_torch, sgd, ...)",
    "weight_decay": "weight decay of the base optimizer",
    "lr_schedule": "learning-rate schedule (linear, constant, cosine, ...)",
    "warmup_ratio": "fraction of steps of linear warm-up",
    "max_grad_norm": "gradient clipping (0: off)",
    "batch_size": "examples per device per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_length": "tokens per example (longer ones are truncated)",
    "precision": "fp32, bf16 or fp16 (mixed precision)",
    "log_every": "log (metrics.jsonl) every k steps",
    "eval_every": "evaluate on the dev split every k steps (0: only at the end)",
    "eval_batch_size": "examples per evaluation (and generation) batch (default: 64; causal-lm: 8)",
    "save_every": "checkpoint (for --resume) every k steps",
    "trajectory_every": "save the adapter every k steps to trajectory/ (0: off)",
    "progress": "progress bars",
}


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line refusals: ``flatlora <command>: error: ...`` and exit 2, no usage block."""

    def error(self, message: str):
        command = self.prog.removeprefix("flatlora").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"flatlora: error: {where}{message} (see {self.prog} --help)\n")


def _comma_list(cast, what: str, low: float | None = None, strict: bool = False):
    """An argparse type: comma-separated values of ``cast``, each >= low (> low when ``strict``)."""

    def parse(text: str):
        try:
            values = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = None
        bad = values is None or not values
        if not bad and low is not None:
            bad = any(not math.isfinite(v) or (v <= low if strict else v < low) for v in values)
        if bad:
            bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"takes comma-separated {what}{bound}, got {text!r}")
        return values

    parse.__name__ = what  # what argparse names in its own messages
    return parse


def _optional_int(text: str) -> int | None:
    """A whole number, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number or none, got {text!r}") from None


def _test_cap(text: str) -> int | str | None:
    return "auto" if text.lower() == "auto" else _optional_int(text)


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from flatlora.experiment import TrainConfig

    groups = {
        "data": parser.add_argument_group("data"),
        "method": parser.add_argument_group("method"),
        "model": parser.add_argument_group("model and LoRA"),
        "optim": parser.add_argument_group("optimisation"),
        "io": parser.add_argument_group("logging and saving"),
        "generation": parser.add_argument_group("generation (causal-lm)"),
    }
    where = {
        **dict.fromkeys(
            ["task", "data", "shots", "seed", "test_cap", "text_column", "label_column", "prompt_column"], "data"
        ),
        **dict.fromkeys(["target_column"], "data"),
        **dict.fromkeys(["gguf_file", "chat_template"], "model"),
        **dict.fromkeys(["generate", "decoding", "num_beams", "max_new_tokens"], "generation"),
        **dict.fromkeys(
            [
                "method",
                "rho",
                "rho_schedule",
                "rho_min",
                "beta",
                "ema_radius",
                "norm",
                "adaptive",
                "diagnostics_every",
                "perturbation_sync",
            ],
            "method",
        ),
        **dict.fromkeys(["model", "r", "alpha", "lora_dropout", "target_modules", "rslora"], "model"),
    }
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        group = groups[where.get(f.name, "io" if f.metadata.get("identity") is False else "optim")]
        help_text = HELP.get(f.name, "")
        if f.name == "progress":
            group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        elif f.name == "chat_template":
            group.add_argument("--no-chat-template", dest="chat_template", action="store_false", help=help_text)
        elif f.name == "task":
            group.add_argument(flag, choices=("classification", "causal-lm"), default=None, help=help_text)
        elif f.name == "ema_radius":
            group.add_argument(flag, choices=("ema", "rho"), default=default, help=f"{help_text} (default: ema)")
        elif f.name == "decoding":
            group.add_argument(flag, choices=("greedy", "e2e"), default=default, help=f"{help_text} (default: greedy)")
        elif f.name in ("num_beams", "max_new_tokens", "eval_batch_size"):
            group.add_argument(flag, type=int, default=None, help=help_text)
        elif f.name == "test_cap":
            group.add_argument(flag, type=_test_cap, default=default, help=help_text)
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "target_modules":
            group.add_argument(flag, nargs="+", default=None, help=help_text)
        elif f.name == "shots":
            group.add_argument(flag, type=_optional_int, default=default, help=f"{help_text} (default: {default})")
        else:
            kind = type(default) if default is not None else str
            group.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def _config_from(args: argparse.Namespace, **override: Any):
    from flatlora.experiment import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values.update(override)
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    from flatlora.experiment import train_run

    run = train_run(_config_from(args), args.out, resume=args.resume, overwrite=args.overwrite)
    if run is not None:
        final = run.final
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        print(f"{run.path}: {run.method} done: {shown}")
    return 0


def _sweep_runs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(folder name, config) for every point of the grid; lora ignores the rho axis."""
    points = []
    for method, lr, seed in itertools.product(args.methods, args.lrs, args.seeds):
        rhos = [None] if method == "lora" else args.rhos
        for rho in rhos:
            name = f"{method}" + (f"-rho{rho:g}" if rho is not None else "") + f"-lr{lr:g}-seed{seed}"
            override = {"method": method, "lr": lr, "seed": seed}
            if rho is not None:
                override["rho"] = rho
            points.append((name, _config_from(args, **override)))
    return points


def _sweep(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from flatlora import distributed
    from flatlora.atomic import check_writable
    from flatlora.experiment import train_run, validate
    from flatlora.runs import load_run

    if not args.methods:
        raise FlatLoraError("--methods is empty: name at least one method, e.g. --methods lora,eflat-lora")
    check_writable(args.out)
    points = _sweep_runs(args)
    with distributed.agreed():
        for _, config in points:
            validate(config)
    out = Path(args.out)
    done = skipped = 0
    plain = args.progress and not sys.stderr.isatty()
    bar = tqdm(points, desc="sweep", unit="run", disable=not args.progress or plain or not distributed.is_main())
    for i, (name, config) in enumerate(bar, start=1):
        folder = out / name
        if (folder / "run.json").exists() and load_run(folder).status == "done":
            skipped += 1
            continue
        if plain and distributed.is_main():
            print(f"sweep: run {i}/{len(points)}: {name}", file=sys.stderr, flush=True)
        train_run(config, folder, resume=(folder / "run.json").exists())
        done += 1
    if distributed.is_main():
        print(f"sweep: {done} run(s) trained, {skipped} already finished, in {out}")
        _print_summary(out)
    return 0


def sweep_summary_rows(root: str | Path) -> list[dict[str, Any]]:
    """Finished runs under ``root`` grouped by method, rho and lr: mean/std of test accuracy over seeds."""
    from flatlora.runs import list_runs

    groups: dict[tuple, list] = {}
    for run in list_runs(root, status="done"):
        key = (run.method, run.hparams.get("rho"), run.hparams.get("lr"))
        groups.setdefault(key, []).append(run)
    rows = []
    for (method, rho, lr), runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        acc = [r.final.get("test_accuracy", float("nan")) for r in runs]
        row = {
            "method": method,
            "rho": rho,
            "lr": lr,
            "seeds": len(runs),
            "task": runs[0].info.get("task", "classification"),
            "test_acc_mean": statistics.fmean(acc),
            "test_acc_std": statistics.stdev(acc) if len(acc) > 1 and not any(math.isnan(x) for x in acc) else 0.0,
            "test_loss_mean": statistics.fmean(r.final.get("test_loss", float("nan")) for r in runs),
            "wall_s_mean": statistics.fmean(r.info.get("wall_time_s") or float("nan") for r in runs),
        }
        for key in ("test_perplexity", "test_bleu", "test_rouge_l"):  # causal-LM runs
            values = [r.final.get(key) for r in runs]
            if any(v is None for v in values):  # classifiers, or a metric that could not be computed
                row[f"{key}_mean"] = row[f"{key}_std"] = float("nan")
                continue
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _print_summary(root: Path) -> None:
    rows = sweep_summary_rows(root)
    if not rows:
        return
    if all(r["task"] == "causal-lm" for r in rows):
        print(
            "| method | rho | lr | seeds | test perplexity (mean ± std) | BLEU (mean ± std) | ROUGE_L | wall time (s) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            print(
                f"| {r['method']} | {rho} | {r['lr']:g} | {r['seeds']} | {r['test_perplexity_mean']:.3f} ± "
                f"{r['test_perplexity_std']:.3f} | {r['test_bleu_mean']:.4f} ± {r['test_bleu_std']:.4f} | "
                f"{r['test_rouge_l_mean']:.4f} | {r['wall_s_mean']:.0f} |"
            )
        return
    print("| method | rho | lr | seeds | test accuracy (mean ± std) | test loss | wall time per run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rho = "" if r["rho"] is None else f"{r['rho']:g}"
        print(
            f"| {r['method']} | {rho} | {r['lr']:g} | {r['seeds']} | {100 * r['test_acc_mean']:.1f} ± "
            f"{100 * r['test_acc_std']:.1f} | {r['test_loss_mean']:.4f} | {r['wall_s_mean']:.0f} |"
        )


def _demo(args: argparse.Namespace) -> int:
    from flatlora.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from flatlora import __version__

    parser = Parser(
        prog="flatlora",
        description="Sharpness-aware LoRA fine-tuning (LoRA-SAM, Flat-LoRA, EFlat-LoRA, ...) on peft models.",
    )
    parser.add_argument("--version", action="version", version=f"flatlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train one adapter into a run directory",
        description="Train one LoRA adapter with a method and write a run directory (run.json, metrics.jsonl, "
        "adapter/, checkpoint/).",
    )
    train.add_argument("--out", required=True, help="run directory to write")
    train.add_argument("--resume", action="store_true", help="continue an unfinished run in --out from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace whatever run --out holds")
    _add_config_options(train)
    train.set_defaults(func=_train)

    sweep = sub.add_parser(
        "sweep",
        help="train a grid of methods x rhos x lrs x seeds",
        description="Train every point of methods x rhos x lrs x seeds into one folder (one run directory each). "
        "Finished runs are skipped and unfinished ones resumed, so a killed sweep is restarted with the same command.",
    )
    sweep.add_argument("--out", required=True, help="folder of the sweep's run directories")
    sweep.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=["lora", "eflat-lora"],
        help="comma-separated methods (default: lora,eflat-lora)",
    )
    sweep.add_argument(
        "--rhos",
        type=_comma_list(float, "radii", 0.0),
        default=[0.05],
        help="comma-separated radii (ignored by lora; default: 0.05)",
    )
    sweep.add_argument(
        "--lrs",
        type=_comma_list(float, "learning rates", 0.0, strict=True),
        default=[1e-3],
        help="comma-separated learning rates (default: 0.001)",
    )
    sweep.add_argument(
        "--seeds",
        type=_comma_list(int, "whole-number seeds"),
        default=[13, 21, 42, 87, 100],
        help="comma-separated seeds (default: 13,21,42,87,100 as in LM-BFF)",
    )
    _add_config_options(sweep, skip=("method", "rho", "lr", "seed"))
    sweep.set_defaults(func=_sweep)

    demo = sub.add_parser(
        "demo",
        help="the main job: train lora, flat-lora, eflat-lora on the offline default, measure them, report",
        description="Train lora, flat-lora and eflat-lora on the bundled MiniLM and tweets (k=16 per class) with a "
        "saved trajectory and the Theorem-2 diagnostics, measure them (sharpness, Hessian, balancedness, Theorem 2, "
        "1-D landscapes, correlation) into --out/report, and print the tables and the dashboard command. Finished "
        "runs and measures in --out are reused; --fresh retrains.",
    )
    from flatlora.demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)
    # the measuring and showing commands live beside their packages; the root CLI lists them
    from flatlora_analysis.cli import add_commands as add_measuring_commands
    from flatlora_app.cli import add_commands as add_showing_commands

    add_measuring_commands(sub)
    add_showing_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    args = build_parser().parse_args(argv)
    from flatlora import distributed

    try:
        code = args.func(args)
    except FlatLoraError as err:
        print(f"flatlora: error: {err}", file=sys.stderr)
        if isinstance(err, distributed.AgreedError):  # every rank stops here with the same line
            return distributed.exit_together(2)
        return 2
    except KeyboardInterrupt:
        print("flatlora: interrupted", file=sys.stderr)
        return 130
    return distributed.exit_together(code)  # under torchrun: every rank ends here, after rank 0's writes


if __name__ == "__main__":
    sys.exit(main())
