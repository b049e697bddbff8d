"""What a report measures and on what: one frozen settings object, with the quick/default/full presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.flatness import FLATNESS
from flatlora_analysis.hessian.measures import STARTS
from flatlora_analysis.sharpness import KINDS
from flatlora_analysis.spaces import SPACES


@dataclass(frozen=True)
class ReportSettings:
    """Every setting of a report; validated on creation (one clear line per mistake).

    Attributes:
        split, n, batch_size: the probe set (the first n examples of the run's split).
        rhos, kinds, space, worst_steps, average_samples: sharpness (every kind at every rho).
        eig_k, eig_tol, eig_space, eig_start: top Hessian eigenvalues (Lanczos), started from a
            random vector or toward the clean gradient (``gradient``: fewer products).
        trace_samples: Hutch++ products for tr(H) (0: skip).
        density_steps, density_runs: SLQ spectral density (0 steps: skip).
        layers, layer_trace_samples: per-layer top eigenvalue and trace (Hutch++ products per layer).
        landscape_steps, landscape_span: a 1-D landscape along a filter-normalized Gaussian
            direction of the sharpness space (0 steps: skip); saved in a run's analysis/ too.
        flatness: the literature's measures (``flatlora_analysis.flatness``): ``adaptive-worst``
            (adaptive l-inf worst-case sharpness with logit normalization at radius
            ``adaptive_rho``, ``worst_steps`` ascent steps; classifiers), ``pac-bayes``
            (1 / sigma^2 for a mean loss increase of ``pac_bayes_target``, ``pac_bayes_samples``
            antithetic pairs, sigma found to ``pac_bayes_rtol``) and ``relative`` (kappa_Tr of the
            logit layer; classifiers). A
            measure that does not apply to an adapter's task is left out of its entry.
        hessian_engine: ``shared`` (one call, block products and shared estimators:
            ``flatlora_analysis.hessian.suite``) or ``reference`` (each Hessian measure on its
            own, one product at a time, one run per layer).
        ema_checkpoint: recompute the Theorem-2 error at the latest checkpoint of eflat-lora runs.
        seed: of every random draw.
    """

    preset: str = "default"
    split: str = "train"
    n: int | None = 64
    batch_size: int = 32
    rhos: tuple[float, ...] = (0.05,)
    kinds: tuple[str, ...] = ("sam", "worst", "average", "flat-lora")
    space: str = "merged"
    worst_steps: int = 10
    average_samples: int = 10
    eig_k: int = 3
    eig_tol: float = 1e-3
    eig_space: str = "lora"
    eig_start: str = "random"
    trace_samples: int = 30
    density_steps: int = 0
    density_runs: int = 1
    layers: bool = False
    layer_trace_samples: int = 12
    landscape_steps: int = 21
    landscape_span: float = 1.0
    flatness: tuple[str, ...] = FLATNESS
    adaptive_rho: float = 0.001
    pac_bayes_target: float = 0.1
    pac_bayes_samples: int = 4
    pac_bayes_rtol: float = 0.01
    hessian_engine: str = "shared"
    ema_checkpoint: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Each mistake refused in one line naming the command-line flag (and the field, for Python callers)."""
        if self.split not in ("train", "dev", "test"):
            raise FlatLoraError(f"unknown --split {self.split!r}: use train, dev or test")
        if self.n is not None and not _whole(self.n, 1):
            raise FlatLoraError(
                f"--examples (n) must be a whole number >= 1, or all for the whole split; got {self.n!r}"
            )
        if not self.rhos:
            raise FlatLoraError("--rho (rhos) is empty: pass at least one radius, e.g. --rho 0.05")
        for rho in self.rhos:
            if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
                raise FlatLoraError(f"--rho (rhos): rho must be a finite number > 0, got {rho!r}")
        if not self.kinds:
            raise FlatLoraError(f"--kinds is empty: name at least one of {', '.join(KINDS)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise FlatLoraError(f"--kinds: unknown sharpness kind {unknown[0]!r}: use one of {', '.join(KINDS)}")
        for field_name, name in (("space", self.space), ("eig_space", self.eig_space)):
            if name not in SPACES:
                raise FlatLoraError(f"{_flag(field_name)}: unknown space {name!r}: use one of {', '.join(SPACES)}")
        for name in ("batch_size", "worst_steps", "average_samples", "eig_k", "density_runs"):
            value = getattr(self, name)
            if not _whole(value, 1):
                raise FlatLoraError(f"{_flag(name)} must be a whole number >= 1, got {value!r}")
        if self.average_samples < 2:
            raise FlatLoraError("average_samples must be >= 2 (a standard error needs two draws)")
        if not (_whole(self.landscape_steps, 0) and self.landscape_steps != 1):
            raise FlatLoraError(f"landscape_steps must be 0 (skip) or >= 2, got {self.landscape_steps!r}")
        if not (_whole(self.trace_samples, 0) and (self.trace_samples == 0 or self.trace_samples >= 6)):
            raise FlatLoraError(f"--trace-samples must be 0 (skip) or a whole number >= 6, got {self.trace_samples!r}")
        if not (_whole(self.density_steps, 0) and self.density_steps != 1):
            raise FlatLoraError(f"--density-steps must be 0 (skip) or a whole number >= 2, got {self.density_steps!r}")
        if self.layers and not _whole(self.layer_trace_samples, 6):
            raise FlatLoraError(f"layer_trace_samples must be >= 6 (Hutch++), got {self.layer_trace_samples!r}")
        unknown = [m for m in self.flatness if m not in FLATNESS]
        if unknown:
            raise FlatLoraError(f"--flatness: unknown measure {unknown[0]!r}: use {', '.join(FLATNESS)} or none")
        for name in ("adaptive_rho", "pac_bayes_target"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise FlatLoraError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.pac_bayes_rtol, (int, float)) and 0 < self.pac_bayes_rtol < 1):
            raise FlatLoraError(f"pac_bayes_rtol must lie in (0, 1), got {self.pac_bayes_rtol!r}")
        if not _whole(self.pac_bayes_samples, 2):
            raise FlatLoraError(f"pac_bayes_samples must be a whole number >= 2, got {self.pac_bayes_samples!r}")
        if self.hessian_engine not in ("shared", "reference"):
            raise FlatLoraError(f"unknown --hessian-engine {self.hessian_engine!r}: use shared or reference")
        if self.hessian_engine == "shared" and self.layers and not self.trace_samples:
            raise FlatLoraError(
                "--layers with the shared Hessian engine reads per-layer traces off the trace's products: "
                "set --trace-samples >= 6, or --hessian-engine reference"
            )
        if self.eig_start not in STARTS:
            raise FlatLoraError(f"unknown --eig-start {self.eig_start!r}: use {' or '.join(STARTS)}")
        if not (isinstance(self.eig_tol, (int, float)) and 0 < self.eig_tol < 1):
            raise FlatLoraError(f"eig_tol must lie in (0, 1), got {self.eig_tol!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rhos"], out["kinds"], out["flatness"] = list(self.rhos), list(self.kinds), list(self.flatness)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportSettings:
        data = dict(data)
        data["rhos"], data["kinds"] = tuple(data.get("rhos", ())), tuple(data.get("kinds", ()))
        data["flatness"] = tuple(data.get("flatness", ()))  # a report from before the measures: none
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def probe_key(self) -> dict[str, Any]:
        return {"split": self.split, "n": self.n, "batch_size": self.batch_size}


_FLAGS = {"n": "--examples", "eig_k": "--eig-k", "eig_space": "--eig-space", "batch_size": "--batch-size"}
_FLAGS |= {"space": "--space", "seed": "--seed", "eig_start": "--eig-start"}


def _flag(name: str) -> str:
    """The command-line flag of a settings field (``--eig-k (eig_k)``), or the field for Python-only ones."""
    return f"{_FLAGS[name]} ({name})" if name in _FLAGS else name


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# The quick preset is sized for an LLM adapter on a CPU, where one Hessian-vector product costs
# 2.4-2.9 gradients: every measure, at settings that cost the least for what they still tell
# (README, "what a report costs"): lambda_max by Lanczos started toward the clean gradient, to 1%;
# tr(H) from that Krylov basis and 2 residual probes; worst-case sharpness a lower bound after 3
# ascent steps; sigma of PAC-Bayes to 5%.
PRESETS: dict[str, ReportSettings] = {
    "quick": ReportSettings(
        preset="quick",
        n=32,
        kinds=("sam", "worst", "average", "flat-lora"),
        worst_steps=3,
        average_samples=5,
        eig_k=1,
        eig_tol=1e-2,
        eig_start="gradient",
        trace_samples=6,
        density_steps=0,
        layers=False,
        landscape_steps=11,
        pac_bayes_samples=2,
        pac_bayes_rtol=0.05,
    ),
    "default": ReportSettings(),
    "full": ReportSettings(
        preset="full",
        n=64,
        batch_size=64,  # one batch: its gradient graph is kept across the many Hessian products
        worst_steps=20,
        average_samples=20,
        eig_k=5,
        eig_tol=1e-3,
        trace_samples=60,
        density_steps=40,
        density_runs=2,
        layers=True,
        landscape_steps=41,
        pac_bayes_samples=8,
    ),
}


# The demo's measures (``flatlora demo``, its dashboard and docs/figures.py): one probe batch, so its
# gradient graph is kept across the Hessian products.
PRESETS["demo"] = dataclasses.replace(
    PRESETS["default"], preset="demo", n=32, batch_size=32, eig_k=3, trace_samples=30, landscape_steps=21
)
PRESETS["demo-quick"] = dataclasses.replace(
    PRESETS["quick"], preset="demo-quick", n=16, batch_size=16, landscape_steps=7
)


def preset(name: str, **overrides: Any) -> ReportSettings:
    """A preset (``quick``, ``default``, ``full``) with some settings replaced."""
    if name not in PRESETS:
        raise FlatLoraError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **overrides)
