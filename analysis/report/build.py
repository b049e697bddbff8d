"""``flatlora report``: measure many adapters into report.json/.csv/.md/.html, sharded and resumable.

Targets are validated before anything is written (each adapter readable, fitting its base
model, with a probe set), then measured one by one with every measure cached in
``OUT/cache/``. With ``shard=(i, n)`` a process measures every n-th target (from the i-th) and
writes ``report.shard-i-of-n.json``; :func:`merge_shards` joins the n shards into the report.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.loading import Target, resolve_targets
from flatlora_analysis.probe_data import ProbeData
from flatlora_analysis.report.measure import Cache, ProgressFactory, build_probe, measure_target
from flatlora_analysis.report.settings import ReportSettings

REPORT_FORMAT = 1
SHARD_GLOB = "report.shard-*-of-*.json"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n) as (i, n); None stays None."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FlatLoraError(f"--shard takes i/n with whole numbers, got {text!r}: for example --shard 1/2") from None
    if n < 1:
        raise FlatLoraError(f"--shard {text}: n (the number of shards) must be >= 1, for example --shard 1/2")
    if not 1 <= i <= n:
        raise FlatLoraError(f"--shard {text}: i must lie in 1..{n}, for example --shard 1/{n}")
    return i, n


def _shard_of(targets: list[Target], shard: tuple[int, int] | None) -> list[Target]:
    if shard is None:
        return targets
    i, n = shard
    ordered = sorted(targets, key=lambda t: str(t.path))
    return ordered[i - 1 :: n]


def validate_targets(targets: list[Target], settings: ReportSettings, base_model, data, device, dtype=None) -> None:
    """Load each adapter on its base model and build its probe set once, so bad input fails before any write.

    Checked per target: the adapter loads and fits its base model, the data suits its task, the
    probe's token ids fit the base model's vocabulary, both spaces exist (the merged space needs
    plain LoRA on a float base), and ``eig_k`` is at most the Hessian space's dimension.
    """
    from flatlora.lora import find_lora_pairs, require_plain_lora
    from flatlora_analysis.loading import load_model
    from flatlora_analysis.probe_data import check_probe_fits
    from flatlora_analysis.spaces import build_space

    data = ProbeData.of(data)
    for target in targets:
        model, tokenizer = load_model(target, base_model, device="cpu", dtype=dtype)
        build_space(model, settings.space)
        dim = build_space(model, settings.eig_space).dim
        if "flat-lora" in settings.kinds:
            require_plain_lora(find_lora_pairs(model), "the flat-lora sharpness kind")
        if settings.eig_k > dim:
            raise FlatLoraError(
                f"eig_k={settings.eig_k} is larger than the {settings.eig_space} space of "
                f"{target.path} ({dim} dimensions): ask for at most {dim}"
            )
        probe = build_probe(target, settings, data, tokenizer)
        check_probe_fits(target, model, probe)
        if settings.n is not None and probe.n_examples < settings.n:  # said, not silently recorded as asked
            print(
                f"flatlora: note: {target.name}: --examples {settings.n} but the {settings.split} split has "
                f"{probe.n_examples}: measuring all {probe.n_examples}",
                file=sys.stderr,
            )
        del model


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_report(
    paths: list[str | Path],
    out: str | Path,
    settings: ReportSettings,
    *,
    base_model: str | None = None,
    data: str | ProbeData | None = None,
    shard: tuple[int, int] | None = None,
    device=None,
    progress: ProgressFactory | None = None,
    targets_progress=None,
    data_parallel: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Measure the adapters in ``paths`` and write the report (or this shard's part) into ``out``.

    Args:
        paths: run directories, adapter folders, or folders of runs.
        out: the report folder (report.json, .csv, .md, .html, cache/).
        settings: what to measure (:data:`flatlora_analysis.report.PRESETS`).
        base_model, data: for bare adapters (and to override a run's data): ``data`` a ``--data``
            spec or a :class:`flatlora_analysis.probe_data.ProbeData` (task and column options).
        shard: (i, n) to measure every n-th target only; join with :func:`merge_shards`.
        progress: factory of ``(done, total)`` callbacks per measure, by label.
        targets_progress: wraps the list of targets (tqdm).
        data_parallel: under torchrun, every rank measures every adapter and the Hessian
            products are split over the ranks' shares of the probe set and all-reduced (one
            large probe or model on several processes); False (default) gives each rank its
            share of the adapters instead.
        dtype: the base weights' dtype (``float32``, ``bfloat16``, ``float16``); None: each
            run's own (run.json), float32 for bare adapters. The measured spaces stay float32.

    Returns:
        The report dict (or the shard's).

    Raises:
        FlatLoraError: bad paths, adapters, base model, data or settings; nothing is written then.
    """
    if data_parallel and shard is not None:
        raise FlatLoraError("--data-parallel splits products, --shard adapters: use one of them")
    if data_parallel and settings.hessian_engine != "shared":
        raise FlatLoraError("--data-parallel runs on the shared Hessian engine: drop --hessian-engine reference")
    targets = resolve_targets(paths)
    data = ProbeData.of(data)
    rank, world = _world()
    # under torchrun: every rank takes its share of the adapters, rank 0 writes (or, data-parallel,
    # every rank takes every adapter and a share of each product)
    gather = shard is None and world > 1 and not data_parallel
    mine = _shard_of(targets, (rank + 1, world) if gather else shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlatLoraError(f"--out {out} is a file: choose a folder for the report")
    cache = Cache(out / "cache")
    error = None
    try:
        validate_targets(mine, settings, base_model, data, device, dtype)
    except FlatLoraError as err:
        error = str(err)
    if gather:  # a refusal on any rank ends every rank with the same line, before any write
        errors: list[str | None] = [None] * world
        _dist().all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise FlatLoraError(error)
    entries = []
    for target in targets_progress(mine) if targets_progress is not None else mine:
        entries.append(
            measure_target(
                target,
                settings,
                cache,
                base_model=base_model,
                data=data,
                device=device,
                progress=progress,
                data_parallel=data_parallel and world > 1,
                dtype=dtype,
            )
        )
    if gather:
        parts: list[list | None] = [None] * world
        _dist().all_gather_object(parts, entries)
        by_path = {e["path"]: e for part in parts for e in part}
        entries = [by_path[str(t.path)] for t in targets]
    report = {
        "format": REPORT_FORMAT,
        "created": _now(),
        "settings": settings.to_dict(),
        "base_model": base_model,
        "dtype": dtype,
        "data": data.spec,
        **({"data_options": data.options()} if data.options() else {}),
        "targets": [str(t.path) for t in targets],
        "entries": entries,
    }
    if shard is not None:
        from flatlora.runs import atomic_write_json

        report["shard"] = list(shard)
        atomic_write_json(out / f"report.shard-{shard[0]}-of-{shard[1]}.json", report)
        return report
    if rank == 0:
        _finish(report, out)
    return report


def _dist():
    import torch.distributed as dist

    return dist


def _world() -> tuple[int, int]:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_shards(out: str | Path) -> dict[str, Any]:
    """Join ``report.shard-i-of-n.json`` files in ``out`` into the report (all n shards needed)."""
    out = Path(out)
    files = sorted(out.glob(SHARD_GLOB))
    if not files:
        raise FlatLoraError(f"{out} holds no report shards: run flatlora report --shard i/n --out {out} first")
    shards = []
    for f in files:
        try:
            shard = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(shard, dict) or not {"shard", "settings", "targets", "entries"} <= set(shard):
                raise ValueError("not a report shard")
        except (OSError, UnicodeDecodeError, ValueError):
            raise FlatLoraError(f"{f} is truncated or damaged: rerun that shard (--shard i/n) or delete it") from None
        shards.append(shard)
    counts = {tuple(s["shard"])[1] for s in shards}
    if len(counts) != 1:
        raise FlatLoraError(f"{out} mixes shards of different splits ({sorted(counts)}): remove the stale ones")
    n = counts.pop()
    have = sorted(s["shard"][0] for s in shards)
    if have != list(range(1, n + 1)):
        missing = sorted(set(range(1, n + 1)) - set(have))
        raise FlatLoraError(f"shards {missing} of {n} are missing in {out}: run them with --shard i/{n}")
    first = shards[0]
    for s in shards[1:]:
        if s["settings"] != first["settings"] or s["targets"] != first["targets"]:
            raise FlatLoraError("the shards were made with different settings or targets: rerun them alike")
    by_path = {e["path"]: e for s in shards for e in s["entries"]}
    report = {k: v for k, v in first.items() if k != "shard"}
    report["entries"] = [by_path[p] for p in first["targets"] if p in by_path]
    report["created"] = _now()
    _finish(report, out)
    return report


def _finish(report: dict[str, Any], out: Path) -> None:
    """Add the cross-run sections and write report.json, .csv, .md and .html atomically."""
    from flatlora_analysis.report.render import write_report_files

    write_report_files(report, out)
