"""Frozen result objects shared by every measure: numbers, settings and metadata, JSON round trip.

Results hold Python numbers and numpy arrays, never tensors or models (as ``scipy.stats``
results do), so they serialize to JSON, cache by settings and pass through
``st.cache_data`` unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar

import numpy as np

RESULT_TYPES: dict[str, type[Result]] = {}


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy arrays and scalars as lists and numbers, NaN/inf as None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of every measure's result: ``settings`` (what was asked) and ``meta`` (how it went).

    Subclasses are frozen dataclasses; fields listed in ``_arrays`` are numpy arrays.
    """

    _arrays: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RESULT_TYPES[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values, with its type name under ``"type"``."""
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Rebuild a result from :meth:`to_dict` output (of this class or, on ``Result``, any)."""
        data = dict(data)
        name = data.pop("type", cls.__name__)
        target = RESULT_TYPES.get(name, cls) if cls is Result else cls
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in target._arrays:
            if key in kwargs:
                kwargs[key] = _nan_array(kwargs[key])
        for key, value in kwargs.items():
            if value is None and key not in target._arrays:
                kwargs[key] = math.nan if _is_float_field(target, key) else None
        return target(**kwargs)


def _nan_array(value: Any) -> np.ndarray:
    """A float array from nested lists in which None stands for NaN."""
    if value is None:
        return np.empty(0)

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return np.nan if v is None else v

    return np.asarray(fix(value), dtype=float)


def _is_float_field(cls: type, name: str) -> bool:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.type in ("float", float)
    return False


def cache_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (adapter hash, measure name, settings, probe), for caches."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
