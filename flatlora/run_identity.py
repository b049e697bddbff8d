"""What identifies a run (method, hparams, data, model): the key a run directory is checked against."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlora.atomic import _jsonable

IDENTITY_KEYS = ("method", "hparams", "data", "model")


@dataclass(frozen=True)
class RunIdentity:
    """What identifies a run: a run directory holds one run of one identity.

    Starting a run in a folder that holds a run of another identity is refused, and resuming
    needs the same identity (compared as JSON values, so dict order and tuples vs lists do
    not matter).

    Attributes:
        method: the method's name (``lora``, ``eflat-lora``, ...).
        hparams: the hyperparameters that shape the run.
        data: the data spec (source, split sizes, ...).
        model: the base model's id or path.
    """

    method: str
    hparams: dict[str, Any]
    data: dict[str, Any]
    model: str

    def to_json(self) -> dict[str, Any]:
        """The identity as run.json records it: :data:`IDENTITY_KEYS` in order, as JSON values."""
        return config_of({key: getattr(self, key) for key in IDENTITY_KEYS})

    @classmethod
    def resolve(cls, identity: RunIdentity | None, keywords: dict[str, Any]) -> RunIdentity:
        """``identity``, or one built from the keyword form ``method=, hparams=, data=, model=``.

        Raises:
            TypeError: both or neither are given, or the keywords are not exactly the four fields.
        """
        if identity is None:
            return cls(**keywords)
        if keywords:
            raise TypeError(f"give a RunIdentity or its fields as keywords ({', '.join(sorted(keywords))}), not both")
        if not isinstance(identity, cls):
            raise TypeError(f"identity must be a RunIdentity, got {type(identity).__name__}")
        return identity


def config_of(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run: method, hparams, data and model of ``info`` (run.json), as JSON values."""
    return {key: _jsonable(info.get(key)) for key in IDENTITY_KEYS}


def absolute_data_spec(spec: Any) -> Any:
    """A data spec naming an existing file or folder by path (a separator or a file suffix), made absolute.

    Names (tweets, sst2, glue/<task>, hub ids with no such local folder) stay as they are.
    """
    if not isinstance(spec, str) or not ("/" in spec or os.sep in spec or Path(spec).suffix):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def recorded_identity(info: dict[str, Any]) -> dict[str, Any]:
    """The identity a run.json records, as :func:`config_of`, its data path made absolute.

    Runs from before data paths were recorded absolute compare equal to the same run today.
    """
    found = config_of(info)
    if isinstance(found.get("data"), dict):
        found["data"] = {**found["data"], "spec": absolute_data_spec(found["data"].get("spec"))}
    return found


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between ``a`` and ``b``, sorted, nested dicts walked."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys
