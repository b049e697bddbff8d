"""Batch reports on saved adapters: ``flatlora report`` (JSON, CSV, Markdown, self-contained HTML)."""

from flatlora_analysis.report.build import build_report, merge_shards, parse_shard
from flatlora_analysis.report.measure import Cache, measure_target
from flatlora_analysis.report.settings import PRESETS, ReportSettings, preset
from flatlora_analysis.report.tables import correlation_for, report_correlation, summary_rows

__all__ = [
    "PRESETS",
    "Cache",
    "ReportSettings",
    "build_report",
    "correlation_for",
    "measure_target",
    "merge_shards",
    "parse_shard",
    "preset",
    "report_correlation",
    "summary_rows",
]
