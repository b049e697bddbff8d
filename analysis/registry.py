"""One table of the measures: name -> function, result type and settings (from the function's signature).

The report, the command line, the dashboard and the notebooks name a measure and its
settings here; :meth:`Measure.complete` fills every setting the caller left out with the
function's default, so a stored result is keyed by *all* its settings and a reader never
matches on a subset (the way ``flatlora.methods`` reads a method's options from its
signature). The measures record their settings in their results through the same table
(:meth:`Measure.record`), so what keys a result and what it says it was computed with come
from one signature. Functions are imported on first use, so the table itself is light.

    >>> from flatlora_analysis.registry import MEASURES
    >>> MEASURES["trace"].complete(samples=30)["method"]
    'hutch++'
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flatlora.errors import FlatLoraError
from flatlora_analysis.results import jsonable

# Parameters that say what is measured on, where it runs or how products are batched (results equal to
# round-off): never part of a result's key.
NOT_SETTINGS = ("model", "probe", "device", "progress", "data_parallel", "block_size")


@dataclass(frozen=True)
class Measure:
    """A measure: ``where`` names its function (``module:function``) and its result type (``module:Class``).

    Attributes:
        name: the measure's name in the table and in a stored result's key.
        where: ``module:function`` of the function.
        result_where: ``module:Class`` of its result type.
        description: one line for listings.
        unrecorded: settings that key a stored result but that the result does not record
            (how the numbers were computed, equal to round-off: ``hvp``, ``batched``).
    """

    name: str
    where: str
    result_where: str
    description: str
    unrecorded: tuple[str, ...] = ()

    @cached_property
    def function(self) -> Callable[..., Any]:
        module, name = self.where.split(":")
        return getattr(importlib.import_module(module), name)

    @cached_property
    def result_type(self) -> type:
        module, name = self.result_where.split(":")
        return getattr(importlib.import_module(module), name)

    @cached_property
    def defaults(self) -> dict[str, Any]:
        """Every setting of the function and its default (``inspect.Parameter.empty`` for required ones)."""
        params = inspect.signature(self.function).parameters
        return {n: p.default for n, p in params.items() if n not in NOT_SETTINGS}

    def complete(self, **given: Any) -> dict[str, Any]:
        """All the settings, as JSON values: ``given`` over the defaults; unknown or missing ones refused."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise FlatLoraError(f"{self.name} has no setting {unknown[0]!r}: use {', '.join(self.defaults) or 'none'}")
        out = {}
        for name, default in self.defaults.items():
            value = given.get(name, default)
            if value is inspect.Parameter.empty:
                raise FlatLoraError(f"{self.name} needs the setting {name!r}: pass it")
            out[name] = jsonable(list(value) if isinstance(value, tuple) else value)
        return out

    def record(
        self,
        probe: Any,
        *,
        leave_out: Collection[str] = (),
        extra: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> dict[str, Any]:
        """The settings a result of this measure records: each setting with the value it was computed with.

        Every setting of the function's signature is named in ``values`` (a default resolved at run
        time with its resolved value), in ``leave_out`` or in :attr:`unrecorded`, so a setting added
        to the function cannot be left out of its results unnoticed.

        Args:
            probe: the probe set measured on: its example count (and token weighting) are recorded after the settings.
            leave_out: settings this result does not record (besides :attr:`unrecorded`).
            extra: what the result records beyond its settings (derived values), last.
            **values: the value of each setting, as :meth:`complete` takes them.

        Returns:
            The settings in the signature's order, then ``n_examples``, the weighting, ``extra``.

        Raises:
            FlatLoraError: an unknown setting, or one neither given nor left out.
        """
        dropped = {*self.unrecorded, *leave_out}
        missing = [n for n in self.defaults if n not in values and n not in dropped]
        if missing:
            raise FlatLoraError(f"{self.name} records every setting: give {missing[0]!r} or leave it out")
        complete = self.complete(**values)
        settings = {n: v for n, v in complete.items() if n not in dropped}
        return {**settings, "n_examples": probe.n_examples, **probe.weighting_settings(), **(extra or {})}

    def compute(self, model: Any, probe: Any, settings: dict[str, Any], **where: Any) -> Any:
        """Run the measure with ``settings`` (as :meth:`complete` gives them) and ``device``/``progress``."""
        accepted = inspect.signature(self.function).parameters
        return self.function(model, probe, **settings, **{k: v for k, v in where.items() if k in accepted})


def _m(name: str, where: str, result: str, description: str, unrecorded: tuple[str, ...] = ()) -> tuple[str, Measure]:
    return name, Measure(name, f"flatlora_analysis.{where}", f"flatlora_analysis.{result}", description, unrecorded)


HVP = ("hvp",)  # how the Hessian products are taken: not recorded in a Hessian result (it keys a stored one)
BATCHED = ("hvp", "batched")  # and whether they are taken in blocks (the same estimate to round-off)

MEASURES: dict[str, Measure] = dict(
    [
        _m("sharpness", "sharpness:sharpness", "sharpness:SharpnessResult", "perturbed minus clean loss at radius rho"),
        _m("top_eigenvalues", "hessian:top_eigenvalues", "hessian:EigenResult", "top Hessian eigenvalues", HVP),
        _m("trace", "hessian:hessian_trace", "hessian:TraceResult", "Hessian trace (Hutch++/Hutchinson)", BATCHED),
        _m("density", "hessian:spectral_density", "hessian:DensityResult", "Hessian spectral density (SLQ)", BATCHED),
        _m("layers", "hessian:layer_curvature", "hessian:LayerCurvatureResult", "per-layer top eigenvalue, trace", HVP),
        _m("curvature", "hessian.suite:curvature", "hessian.suite:CurvatureResult", "every Hessian measure, shared"),
        _m("landscape_1d", "landscape:landscape_1d", "landscape:LandscapeResult", "loss along a direction"),
        _m("landscape_2d", "landscape:landscape_2d", "landscape:LandscapeResult", "loss on a plane"),
        _m("interpolation", "landscape:interpolate", "landscape:LandscapeResult", "loss between two adapters"),
        _m(
            "adaptive_sharpness",
            "flatness:adaptive_sharpness",
            "sharpness:SharpnessResult",
            "adaptive worst-case sharpness with logit normalization",
        ),
        _m(
            "pac_bayes_flatness",
            "flatness:pac_bayes_flatness",
            "flatness:PacBayesResult",
            "magnitude-aware PAC-Bayes flatness 1/sigma^2",
        ),
        _m(
            "relative_flatness",
            "flatness:relative_flatness",
            "flatness:RelativeFlatnessResult",
            "relative flatness of the logit layer",
        ),
    ]
)


def measure(name: str) -> Measure:
    """The measure called ``name`` (one line naming the known ones otherwise)."""
    if name not in MEASURES:
        raise FlatLoraError(f"unknown measure {name!r}: use one of {', '.join(MEASURES)}")
    return MEASURES[name]
