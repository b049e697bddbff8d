"""The ``flatlora`` command line: train, sweep and the demo.

Errors a user can cause print one line and exit with status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from typing import Any

from flatlora.errors import FlatLoraError


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


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per TrainConfig field, read from the field's metadata (help, group, type, ...).

    Args:
        parser: The ``train`` or ``sweep`` parser.
        skip: Fields the command sets itself (the sweep's grid axes).
    """
    from flatlora.config import OPTION_GROUPS, TrainConfig

    groups = {key: parser.add_argument_group(title) for key, title in OPTION_GROUPS.items()}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        meta, default = f.metadata, getattr(defaults, f.name)
        group, help_text = groups[meta["group"]], meta["help"]
        if "negate" in meta:  # a switch that is on unless --no-...
            group.add_argument(meta["negate"], dest=f.name, action="store_false", help=help_text)
        elif isinstance(default, bool):
            group.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=help_text)
        else:
            kwargs: dict[str, Any] = {"default": default}
            if "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            elif "choices" in meta:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["type"] = meta.get("type") or (type(default) if default is not None else str)
            if meta.get("show_default", True):
                help_text = f"{help_text} (default: {default})"
            group.add_argument(f"--{f.name.replace('_', '-')}", help=help_text, **kwargs)


def _train(args: argparse.Namespace) -> int:
    from flatlora.config import TrainConfig
    from flatlora.experiment import train_run

    run = train_run(TrainConfig.from_namespace(args), args.out, resume=args.resume, overwrite=args.overwrite)
    if run is not None:
        final = run.final
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        print(f"{run.path}: {run.method} done: {shown}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from flatlora.sweep import run_sweep

    return run_sweep(args)


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
