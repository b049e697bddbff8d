"""Does sharpness explain generalization across runs? Kendall, Spearman and the granulated Kendall coefficient.

Across a population of runs (methods x rho x lr x seed), each measure (a sharpness figure,
lambda_max, the trace, ...) against test accuracy, test loss and the gap test - train loss, and
for causal LMs against test perplexity and BLEU:

- Kendall's tau-b (``scipy.stats.kendalltau``) and Spearman's rho (``scipy.stats.spearmanr``);
- the granulated Kendall coefficient Psi of Jiang et al. 2020 ("Fantastic generalization
  measures"): for each hyperparameter axis, tau within every group of runs that differ in
  that axis alone, averaged over the groups (psi_i), then averaged over the axes (Psi). It
  asks whether the measure tracks generalization when one knob turns, not merely across
  methods;
- each with a percentile bootstrap 95% interval over runs (``scipy.stats.bootstrap``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from flatlora.errors import FlatLoraError
from flatlora_analysis.results import Result

AXES = ("method", "rho_train", "lr", "seed")
TARGETS = ("test_accuracy", "test_loss", "gap", "test_perplexity", "test_bleu")
MEASURE_PREFIXES = (
    "sharpness_",
    "adaptive_sharpness",
    "pac_bayes_flatness",
    "relative_flatness",
    "lambda_max",
    "trace",
    "balancedness",
)


@dataclass(frozen=True)
class CorrelationResult(Result):
    """One measure against one generalization figure across runs."""

    measure: str
    target: str
    n_runs: int
    kendall: dict[str, Any]
    spearman: dict[str, Any]
    granulated: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _tau(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.kendalltau(x, y).statistic)


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def granulated_kendall(
    measure: Sequence[float], target: Sequence[float], hparams: Sequence[dict[str, Any]], axes: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Psi and psi_i per axis (Jiang et al. 2020); NaN where no group varies along an axis.

    For axis i, runs are grouped by their values on every other axis; psi_i is the mean of
    Kendall's tau between ``measure`` and ``target`` over the groups with two or more runs
    that differ in axis i (and show any variation). Psi is the mean of the defined psi_i.
    """
    x, y = np.asarray(measure, float), np.asarray(target, float)
    per_axis: dict[str, float] = {}
    for axis in axes:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, h in enumerate(hparams):
            groups[tuple(repr(h.get(a)) for a in axes if a != axis)].append(i)
        taus = []
        for members in groups.values():
            if len({repr(hparams[i].get(axis)) for i in members}) < 2:
                continue
            t = _tau(x[members], y[members])
            if not math.isnan(t):
                taus.append(t)
        per_axis[axis] = float(np.mean(taus)) if taus else math.nan
    defined = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), per_axis


def varying_axes(hparams: Sequence[dict[str, Any]], axes: Sequence[str] = AXES) -> list[str]:
    """The axes along which the runs take more than one value."""
    return [a for a in axes if len({repr(h.get(a)) for h in hparams}) > 1]


def _bootstrap(n: int, statistic, n_resamples: int, seed: int) -> tuple[float, float]:
    if n < 3 or n_resamples < 1:
        return math.nan, math.nan

    def stat(idx):
        value = statistic(np.asarray(idx, dtype=int))
        return value if not math.isnan(value) else 0.0

    res = stats.bootstrap(
        (np.arange(n),),
        stat,
        vectorized=False,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def correlate(
    rows: Sequence[dict[str, Any]],
    measure: str,
    target: str,
    *,
    axes: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> CorrelationResult:
    """``measure`` against ``target`` across ``rows`` (one dict per run, as ``summary_rows`` makes).

    Args:
        rows: per run: the measure and target values and the hyperparameters (``method``,
            ``rho_train``, ``lr``, ``seed``).
        measure, target: column names (``sharpness_worst_rho0.05`` vs ``test_accuracy``, ...).
        axes: the hyperparameter axes of the granulated coefficient; by default those that vary.
        n_resamples: bootstrap resamples (0: no intervals).

    Raises:
        FlatLoraError: fewer than three runs with both values.
    """
    usable = [r for r in rows if _finite(r.get(measure)) and _finite(r.get(target))]
    if len(usable) < 3:
        raise FlatLoraError(
            f"correlating {measure} with {target} needs at least 3 runs holding both, "
            f"got {len(usable)}: measure more runs (a sweep)"
        )
    x = np.array([r[measure] for r in usable], float)
    y = np.array([r[target] for r in usable], float)
    hp = [{a: r.get(a) for a in AXES} for r in usable]
    axes = list(axes) if axes is not None else varying_axes(hp)
    psi, per_axis = granulated_kendall(x, y, hp, axes)

    def boot(fn):
        return _bootstrap(len(usable), fn, n_resamples, seed)

    k_lo, k_hi = boot(lambda i: _tau(x[i], y[i]))
    s_lo, s_hi = boot(lambda i: _rho(x[i], y[i]))
    g_lo, g_hi = boot(lambda i: granulated_kendall(x[i], y[i], [hp[j] for j in i], axes)[0])
    kt = stats.kendalltau(x, y)
    return CorrelationResult(
        measure=measure,
        target=target,
        n_runs=len(usable),
        kendall={"value": _tau(x, y), "pvalue": float(kt.pvalue), "low": k_lo, "high": k_hi},
        spearman={"value": _rho(x, y), "low": s_lo, "high": s_hi},
        granulated={"value": psi, "per_axis": per_axis, "low": g_lo, "high": g_hi},
        settings={"axes": axes, "n_resamples": n_resamples, "seed": seed, "interval": "percentile 95%"},
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measure_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The measure columns of report rows (sharpness_*, lambda_max, trace, balancedness)."""
    cols = dict.fromkeys(k for r in rows for k in r)
    return [c for c in cols if c.startswith(MEASURE_PREFIXES) and c != "trace_stderr"]


def correlation_table(
    rows: Sequence[dict[str, Any]],
    measures: Sequence[str] | None = None,
    targets: Sequence[str] = TARGETS,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[CorrelationResult]:
    """Every measure against every target where at least three runs hold both."""
    out = []
    for m in measures or measure_columns(rows):
        for t in targets:
            try:
                out.append(correlate(rows, m, t, n_resamples=n_resamples, seed=seed))
            except FlatLoraError:
                continue
    return out
