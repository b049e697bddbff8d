"""The measuring commands of the root CLI, beside the package they run: ``flatlora landscape`` and ``flatlora report``.

The measures themselves are imported inside the commands (the package's ``__init__`` still
brings torch and scipy when the root CLI lists these commands).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from flatlora.config import BASE_DTYPES
from flatlora.console import ProgressBars, check_device, group_rank, init_distributed, quiet_transformers
from flatlora.errors import FlatLoraError
from flatlora_analysis.checkpointing import checkpointed_command
from flatlora_analysis.cli_output import memory_budget, print_costs, print_table


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers, got {text!r}") from None


ALL = "all"  # --examples all: the whole split (None in the settings)


def _examples(text: str) -> int | str:
    """--examples: a whole number >= 1, or ``all``."""
    if text.strip().lower() in ("all", "none"):
        return ALL
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1 or all, got {text!r}")
    return value


def _flatness_list(text: str) -> tuple[str, ...]:
    names = tuple(k.strip() for k in text.split(",") if k.strip())
    return () if names == ("none",) else names


def settings_from_args(args: argparse.Namespace):
    """The report's settings: the chosen preset with what the command line set explicitly."""
    from flatlora_analysis.report import preset

    name = "quick" if args.quick else "full" if args.full else "default"
    settings = preset(
        name,
        split=args.split,
        batch_size=args.batch_size,
        rhos=tuple(args.rho) if args.rho else None,
        kinds=None if args.kinds is None else tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        flatness=None if args.flatness is None else _flatness_list(args.flatness),
        space=args.space,
        eig_k=args.eig_k,
        eig_space=args.eig_space,
        eig_start=args.eig_start,
        trace_samples=args.trace_samples,
        density_steps=args.density_steps,
        layers=True if args.layers else None,
        hessian_engine=args.hessian_engine,
        seed=args.seed,
    )
    if args.n is not None:  # an explicit count, or all (None in the settings: the preset call reads None as unset)
        settings = dataclasses.replace(settings, n=None if args.n == ALL else args.n)
    return settings


@checkpointed_command
def _report(args: argparse.Namespace) -> int:
    from flatlora_analysis.report import build_report, merge_shards, parse_shard, summary_rows

    quiet_transformers()

    if args.merge:
        report = merge_shards(args.out)
    else:
        if not args.paths:
            raise FlatLoraError("name at least one run directory, adapter folder or folder of runs (or pass --merge)")
        from flatlora.atomic import check_writable

        settings = settings_from_args(args)
        shard = parse_shard(args.shard)
        check_device(args.device)
        check_writable(args.out)
        memory_budget(args)
        if shard is None:
            init_distributed()  # under torchrun, the ranks split the adapters and rank 0 writes
        rank = group_rank()
        bars = ProgressBars(args.progress and rank == 0)
        report = build_report(
            args.paths,
            args.out,
            settings,
            base_model=args.base_model,
            data=probe_data(args),
            shard=shard,
            device=args.device,
            progress=bars,
            targets_progress=lambda items: bars.iterate(items, "adapters"),
            data_parallel=args.data_parallel,
            dtype=args.dtype,
        )
        if shard is not None:
            print(
                f"shard {shard[0]}/{shard[1]}: {len(report['entries'])} adapter(s) measured; "
                f"join the shards with: flatlora report --merge --out {args.out}"
            )
            return 0
    print_table(summary_rows(report))
    print_costs(report)
    print(f"report: {Path(args.out) / 'report.html'} (also report.json, report.csv, report.md)")
    return 0


def probe_data(args: argparse.Namespace):
    """The ``--data`` options of report/landscape as an :class:`flatlora_analysis.probe_data.ProbeData`."""
    from flatlora_analysis.probe_data import ProbeData

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeData) if f.name != "spec"}
    return ProbeData(spec=args.data, **options)


@checkpointed_command
def _landscape(args: argparse.Namespace) -> int:
    from flatlora.atomic import check_writable
    from flatlora_analysis.landscape import symmetric_grid
    from flatlora_analysis.loading import load_model, measure_identity, target_dtype
    from flatlora_analysis.probe_data import build_target_probe, check_probe_fits

    quiet_transformers()
    check_device(args.device)
    memory_budget(args)
    if args.steps % 2 == 0:  # the grid is symmetric around the adapter, which is its middle point
        raise FlatLoraError(
            f"--steps must be odd (the adapter is the middle point), got {args.steps}: use {args.steps + 1}"
        )
    data = probe_data(args)
    [target] = _one_target(args.run, "landscape")
    symmetric_grid(args.steps, args.span if args.span is not None else 1.0)
    other = None
    if args.between is not None:
        other = _one_target(args.between, "--between")[0].adapter
    kind = "interpolation" if (args.between or args.from_base) else "pca" if args.pca else "2d" if args.two_d else "1d"
    if args.pca:
        from flatlora_analysis.landscape.directions import trajectory_folders

        if target.kind != "run":
            raise FlatLoraError(f"--pca needs a run's saved trajectory, and {target.path} is a bare adapter")
        trajectory_folders(target.path)
    folder = Path(args.out) if args.out else target.path / "analysis"
    check_writable(folder)
    model, tokenizer = load_model(target, args.base_model, device=args.device, dtype=args.dtype)
    if other is not None:
        from flatlora_analysis.landscape.directions import adapter_tensors

        adapter_tensors(model, other)  # refuses an adapter of another base model before any work
    probe = build_target_probe(target, data, tokenizer, split=args.split, n=args.n, batch_size=args.batch_size)
    check_probe_fits(target, model, probe)
    init_distributed()
    rank = int(os.environ.get("RANK", "0"))
    bars = ProgressBars(args.progress and rank == 0)
    from flatlora_analysis.landscape import stored_landscape

    identity = measure_identity(target.content_hash(), args.base_model, target_dtype(target, args.dtype))
    result, reused = stored_landscape(
        [folder], identity, probe, kind, lambda: model, device=args.device, write=rank == 0,
        progress=bars(f"{target.name}: {kind} landscape"), steps=args.steps, span=args.span, space=args.space,
        seed=args.seed, run=target.path if args.pca else None, other=other,
    )  # fmt: skip
    if rank == 0:
        z = result.z
        print(
            f"{target.path}: {kind} landscape {'reused' if reused else 'computed'} ({z.size} points): clean loss "
            f"{result.clean_loss:.4f}, min {z.min():.4f}, max {z.max():.4f}; saved in {folder}"
        )
    return 0


def _one_target(path: str, what: str):
    """The single run or adapter ``path`` names (a folder of several runs is refused)."""
    from flatlora_analysis.loading import resolve_targets

    targets = resolve_targets([path])
    if len(targets) != 1:
        raise FlatLoraError(
            f"{what} takes one run directory or adapter folder, and {path} holds {len(targets)} runs: name one of them"
        )
    return targets


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """--base-model, --data, --task and the column options, as ``train`` has them."""
    group = parser.add_argument_group("what bare adapters are measured on")
    group.add_argument("--base-model", help="base model of bare adapters (HF id or folder; default: the adapter's)")
    group.add_argument(
        "--data", help="data to measure on (as train --data: a name, folder or CSV/TSV/JSONL); default: the run's own"
    )
    group.add_argument(
        "--task",
        choices=("classification", "causal-lm"),
        default=None,
        help="override the task of bare adapters (default: adapter_config.json's task_type; a run's own)",
    )
    group.add_argument("--text-column", help="column of the text (classification; plain-text causal LM)")
    group.add_argument("--label-column", help="column of the label (classification)")
    group.add_argument("--prompt-column", help="column of the prompt (causal-lm)")
    group.add_argument("--target-column", help="column of the target (causal-lm)")
    group.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="causal-lm: do not wrap prompts in the tokenizer's chat template",
    )
    group.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the run's, else 128)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """How the model is held while measuring: the memory budget (and the base weights' dtype, checkpointing)."""
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory",
        default="auto",
        help="memory for the probe's autograd graphs, e.g. 6GB or 512MiB (default auto: a share of the memory "
        "free when the command starts); the probe is evaluated in micro-batches that fit it",
    )
    group.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each transformer layer in the backward (eval mode, same numbers to round-off): gradients "
        "(sharpness, finite-difference products) hold far less memory for about one more forward each; "
        "double-backward Hessian products and loss-only grids gain nothing",
    )
    group.add_argument(
        "--dtype",
        choices=BASE_DTYPES,
        default=None,
        help="dtype the frozen base weights are loaded in (default: a run's own, float32 for bare adapters); the "
        "LoRA factors and every measured space stay float32, and results are stored apart per dtype",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the measuring commands, ``landscape`` and ``report``, on the root CLI's subcommands."""
    land = sub.add_parser(
        "landscape",
        help="loss landscape of a run: 1-D, 2-D, trajectory PCA, or between two adapters",
        description="Evaluate the loss of a run's adapter on a grid (one forward pass over the probe set per point) "
        "and store it (result-KEY.json) in RUN/analysis/, where a later call with the same settings reuses it. Under "
        "torchrun each rank evaluates its share of the grid and rank 0 writes.",
    )
    land.add_argument("run", help="run directory, or a peft LoRA adapter folder (with --data)")
    shape = land.add_mutually_exclusive_group()
    shape.add_argument("--2d", dest="two_d", action="store_true", help="a plane of two random directions")
    shape.add_argument("--pca", action="store_true", help="the plane of the first two PCs of the saved trajectory")
    shape.add_argument("--between", help="the line from this run's adapter to another run's (or an adapter folder)")
    shape.add_argument("--from-base", action="store_true", help="the line from the base model to this adapter")
    land.add_argument("--steps", type=int, default=21, help="grid points per axis (odd; default 21)")
    land.add_argument("--span", type=float, default=None, help="half-width of the grid (default 1; PCA: auto)")
    land.add_argument("--space", default="merged", help="merged (default), lora, b or all")
    land.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    land.add_argument("--split", default="train", choices=["train", "dev", "test"], help="probe split")
    land.add_argument("--examples", dest="n", type=_examples, default=64, help="probe examples (default 64; 'all')")
    land.add_argument("--batch-size", type=int, default=32, help="probe batch size")
    land.add_argument("--out", help="folder of the saved landscapes (default: RUN/analysis or ADAPTER/analysis)")
    _add_data_options(land)
    _add_model_options(land)
    land.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    land.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    land.set_defaults(func=_landscape)

    report = sub.add_parser(
        "report",
        help="measure saved adapters: sharpness, Hessian, balancedness, Theorem-2 error -> JSON/CSV/MD/HTML",
        description="Measure run directories or bare peft adapter folders (folders of runs are expanded) and "
        "write report.json, report.csv, report.md and a self-contained report.html into --out. Every measure is "
        "stored by (adapter content, probe content, measure, every setting), so an interrupted report resumes; "
        "--shard i/n splits the "
        "adapters across processes and --merge joins the shards.",
    )
    report.add_argument("paths", nargs="*", help="run directories, adapter folders, or folders of runs")
    report.add_argument("--out", required=True, help="report folder")
    _add_data_options(report)
    _add_model_options(report)
    size = report.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick preset (README: costs)")
    size.add_argument("--full", action="store_true", help="the full preset: + spectral density and per-layer curvature")
    report.add_argument(
        "--split", default="train", choices=["train", "dev", "test"], help="probe split (default train)"
    )
    report.add_argument(
        "--examples", dest="n", type=_examples, default=None, help="probe examples, or 'all' (default: the preset's)"
    )
    report.add_argument("--batch-size", type=int, default=None, help="probe batch size (default: the preset's)")
    report.add_argument("--rho", type=_floats, help="sharpness radii, comma-separated (default 0.05)")
    report.add_argument("--kinds", help="sharpness kinds, comma-separated (default sam,worst,average,flat-lora)")
    report.add_argument(
        "--flatness",
        help="the literature's measures, comma-separated, or none (default adaptive-worst,pac-bayes,relative)",
    )
    report.add_argument("--space", default=None, help="sharpness space: merged (default), lora, b, all")
    report.add_argument("--eig-k", type=int, default=None, help="top Hessian eigenvalues (default: the preset's)")
    report.add_argument("--eig-space", default=None, help="Hessian space: lora (default), b, merged, all")
    report.add_argument(
        "--eig-start",
        choices=["random", "gradient"],
        default=None,
        help="Lanczos start: random, or toward the clean gradient (fewer products; default: the preset's)",
    )
    report.add_argument("--trace-samples", type=int, default=None, help="Hutch++ products for the trace (0: skip)")
    report.add_argument("--density-steps", type=int, default=None, help="SLQ Lanczos steps for the density (0: skip)")
    report.add_argument("--layers", action="store_true", help="per-layer top eigenvalue and trace")
    report.add_argument(
        "--hessian-engine",
        choices=["shared", "reference"],
        default=None,
        help="shared (default: block products, shared estimators) or reference (each measure alone)",
    )
    report.add_argument("--seed", type=int, default=None, help="seed of every random draw (default 0)")
    report.add_argument("--shard", help="i/n: measure every n-th adapter, starting at the i-th")
    report.add_argument(
        "--data-parallel",
        action="store_true",
        help="under torchrun: split each Hessian product's probe set over the ranks (default: split the adapters)",
    )
    report.add_argument("--merge", action="store_true", help="join the shards in --out into the report")
    report.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    report.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    report.set_defaults(func=_report)
