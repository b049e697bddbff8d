"""The ``flatlora`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from flatlora.errors import FlatLoraError

DEMO_METHODS = ("lora", "lora-sam", "flat-lora", "eflat-lora")


def _demo(args: argparse.Namespace) -> int:
    """Train a tiny BERT with each method on a synthetic task and print one table row each."""
    import warnings

    import torch

    from flatlora.methods import make_method
    from flatlora.models import tiny_batches, tiny_model
    from flatlora.trainer import evaluate, train_loop

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    train = tiny_batches("bert", args.train_batches, seed=args.seed)
    held_out = tiny_batches("bert", 8, seed=args.seed + 1000)
    print(
        f"# tiny BERT (2 layers, d=32), LoRA r=4 on query/value, {args.steps} steps, rho={args.rho}, seed={args.seed}"
    )
    print(f"| {'method':<11} | train loss | held-out loss | held-out acc | ms/step |")
    print(f"|{'-' * 13}|-----------:|--------------:|-------------:|--------:|")
    for name in args.methods:
        model = tiny_model("bert", seed=args.seed)
        kwargs = {"lr": args.lr, "total_steps": args.steps}
        if name != "lora":
            kwargs["rho"] = args.rho
        method = make_method(name, model, **kwargs)
        start = time.perf_counter()
        logs = train_loop(model, method, train, args.steps)
        ms = (time.perf_counter() - start) / max(args.steps, 1) * 1e3
        train_loss = sum(r["loss"] for r in logs[-len(train) :]) / len(train)
        ev = evaluate(model, held_out)
        print(f"| {name:<11} | {train_loss:10.4f} | {ev['loss']:13.4f} | {ev['accuracy']:12.3f} | {ms:7.1f} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short built-in comparison of the methods on a tiny model (offline)")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--train-batches", type=int, default=8)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--rho", type=float, default=0.05)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlatLoraError as err:
        print(f"flatlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
