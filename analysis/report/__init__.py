"""Batch reports on saved adapters: ``flatlora report`` (JSON, CSV, Markdown, self-contained HTML)."""

from analysis.report.build import build_report, merge_shards, parse_shard
from analysis.report.measure import Cache, measure_target
from analysis.report.render import summary_rows
from analysis.report.settings import PRESETS, ReportSettings, preset

__all__ = [
    "PRESETS",
    "Cache",
    "ReportSettings",
    "build_report",
    "measure_target",
    "merge_shards",
    "parse_shard",
    "preset",
    "summary_rows",
]
