"""Parameter spaces a measure perturbs, as named tensors and parameter overrides.

- ``lora``: every A and B of the active adapters;
- ``b``: the B matrices only (the space Flat-LoRA perturbs);
- ``merged``: the merged weights W = W0 + s B A of the adapted layers, through a zero offset
  D per base weight (W0 + D + s B A); derivatives in D at 0 are derivatives in W, and the
  space is invariant to the LoRA rescaling (cA, B/c);
- ``all``: every floating-point parameter of the model.

A point of a space is a flat vector (the entries concatenated in order). ``overrides(delta)``
turns a perturbation into the ``{parameter name: tensor}`` dict that
``torch.func.functional_call`` evaluates, so the model itself is never written.

Every space computes in float32 on a half-precision (bfloat16/float16) base: its vectors are
float32; ``lora`` and ``b`` hold the float32 LoRA factors (peft's LoRA branch runs in float32);
``merged`` overrides, instead of W0 + D in the base dtype (which would round away any D below
W0's resolution), a float32 offset D that the layer adds as its own float32 term, D x, to its
base output (:mod:`flatlora.base_dtype`): the base matmuls run in the base dtype, D enters the
layer's output exactly, and that output is then rounded to the base dtype like every activation
of a half-precision model (the LoRA branch's own term included). ``all`` would perturb the
half-precision weights themselves and is refused there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flatlora.base_dtype import HALF_DTYPES, OFFSET_ATTR, dtype_name, ensure_offset_hook
from flatlora.errors import FlatLoraError
from flatlora.lora import LoraPair, find_lora_pairs, require_plain_lora

SPACES = ("lora", "b", "merged", "all")


@dataclass(frozen=True)
class SpaceEntry:
    """One tensor of a space.

    Attributes:
        key: the parameter name the override replaces (``functional_call`` key).
        group: the layer it belongs to (module path), for per-layer results.
        role: ``"A"``, ``"B"``, ``"D"`` (merged offset) or ``"W"`` (any weight, ``all``).
        value: the point: the parameter, or for ``D`` the merged weight W0 + s B A (detached,
            in the base weight's storage layout; float32 on a half-precision base).
        base: for ``D``, W0 (the tensor the override adds D to; on a half-precision base a
            float32 zero, as the override is the layer's offset D itself); else the parameter.
        row_dim: the dimension that indexes output units (1 for transposed storage), for
            filter normalization.
    """

    key: str
    group: str
    role: str
    value: torch.Tensor
    base: torch.Tensor
    row_dim: int = 0

    @property
    def numel(self) -> int:
        return self.value.numel()


class Space:
    """A parameter space of a model: entries, flat vectors and overrides."""

    def __init__(self, name: str, entries: Sequence[SpaceEntry]) -> None:
        if not entries:
            raise FlatLoraError(f"the {name} space of this model is empty: check that the adapter is active")
        self.name = name
        self.entries = list(entries)
        self.sizes = [e.numel for e in self.entries]
        self.dim = sum(self.sizes)
        first = self.entries[0].value
        self.device = first.device
        # Flat vectors are at least float32: half-precision search directions lose too much.
        self.dtype = first.dtype if first.element_size() >= 4 else torch.float32

    def __repr__(self) -> str:
        return f"Space({self.name!r}, tensors={len(self.entries)}, dim={self.dim})"

    @property
    def groups(self) -> list[str]:
        """Layer names in order of first appearance."""
        return list(dict.fromkeys(e.group for e in self.entries))

    def restrict(self, groups: Sequence[str]) -> Space:
        """The sub-space of the entries of ``groups`` (a diagonal block of the Hessian)."""
        wanted = set(groups)
        return Space(self.name, [e for e in self.entries if e.group in wanted])

    def point(self) -> torch.Tensor:
        """The current point as a flat vector (merged weights for ``merged``)."""
        return self.flatten([e.value for e in self.entries])

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the entries into one flat vector of ``self.dtype``."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the entries."""
        if flat.shape != (self.dim,):
            raise FlatLoraError(
                f"a vector of the {self.name} space has {self.dim} entries, got shape {tuple(flat.shape)}"
            )
        return [part.view(e.value.shape) for part, e in zip(flat.split(self.sizes), self.entries)]

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def overrides(self, deltas: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``{parameter name: base + delta}`` for ``functional_call``; None overrides nothing.

        On a half-precision base a ``merged`` key names a layer's float32 offset attribute, not
        a parameter (``functional_call`` with ``strict=False`` sets it for the call).
        """
        if deltas is None:
            return {}
        return {e.key: e.base + d.to(e.base.dtype) for e, d in zip(self.entries, deltas)}


def _parameter_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _module_of(pair_name: str) -> str:
    return pair_name.rsplit("[", 1)[0]


def offset_override(pair: LoraPair, weight_name: str) -> tuple[str, torch.Tensor]:
    """Where an additive offset D of ``pair``'s base weight W0 goes: (override key, the tensor D is added to).

    A float32 (or float64) W0 is overridden by W0 + D under its own name. A half-precision W0
    is left as it is: the key names the base layer's float32 offset attribute, whose term its
    forward hook adds in float32 (installed here), and D is added to a float32 zero.

    Args:
        pair: A LoRA pair.
        weight_name: W0's parameter name in the model.

    Raises:
        FlatLoraError: a half-precision base layer of a kind that cannot carry an offset.
    """
    w0 = pair.base_weight()
    if w0.dtype not in HALF_DTYPES:
        return weight_name, w0.detach()
    ensure_offset_hook(pair.layer.get_base_layer())
    return f"{weight_name.rsplit('.', 1)[0]}.{OFFSET_ATTR}", torch.zeros((), dtype=torch.float32, device=w0.device)


def _row_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    from transformers.pytorch_utils import Conv1D

    return 1 if isinstance(module, Conv1D) and tensor.dim() == 2 else 0


def build_space(model: nn.Module, name: str = "lora", *, adapter: str | None = None) -> Space:
    """The space ``name`` of ``model`` (a peft LoRA model; ``all`` takes any model).

    Raises:
        FlatLoraError: an unknown space, a model without LoRA, a merged adapter, or DoRA or a
            quantized base in the merged space (there W is not W0 + s B A, or W0 is not a float tensor).
    """
    if name not in SPACES:
        raise FlatLoraError(f"unknown space {name!r}: use one of {', '.join(SPACES)}")
    names = _parameter_names(model)
    if name == "all":
        half = next(((k, dtype_name(p.dtype)) for k, p in model.named_parameters() if p.dtype in HALF_DTYPES), None)
        if half is not None:
            raise FlatLoraError(
                f"the all space perturbs every base weight, and {half[0]} is {half[1]}, which rounds small "
                "perturbations away: measure the all space with --dtype float32, or use the merged space"
            )
        owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        entries = []
        for key, p in model.named_parameters():
            if p.is_floating_point():
                group = key.rsplit(".", 1)[0]
                entries.append(SpaceEntry(key, group, "W", p.detach(), p.detach(), _row_dim(owners[id(p)], p)))
        return Space(name, entries)
    pairs = find_lora_pairs(model, adapter)
    entries = []
    if name in ("lora", "b"):
        for pair in pairs:
            group = _module_of(pair.name)
            tensors = [("A", pair.A), ("B", pair.B)] if name == "lora" else [("B", pair.B)]
            for role, t in tensors:
                entries.append(SpaceEntry(names[id(t)], group, role, t.detach(), t.detach()))
        return Space(name, entries)
    require_plain_lora(pairs, "the merged space")
    for pair in pairs:  # W0 + D needs float W0: a 4/8-bit base layer stores packed integers
        w0 = getattr(pair.layer.get_base_layer(), "weight", None)
        if not (isinstance(w0, torch.Tensor) and w0.is_floating_point()):
            raise FlatLoraError(
                f"the merged space needs float base weights but {pair.name} sits on a quantized layer "
                f"({type(pair.layer.get_base_layer()).__name__}, {getattr(w0, 'dtype', None)}): "
                "measure in the lora or b space (--space lora --eig-space lora)"
            )
    seen: dict[int, int] = {}
    with torch.no_grad():
        for pair in pairs:
            base_layer = pair.layer.get_base_layer()
            w0 = pair.base_weight()
            dtype = torch.float32 if w0.dtype in HALF_DTYPES else w0.dtype  # the point W0 + s B A, unrounded
            delta = pair.layer.get_delta_weight(pair.adapter).to(dtype)
            if id(w0) in seen:  # two active adapters on one layer: one offset D for their shared W0
                index = seen[id(w0)]
                e = entries[index]
                entries[index] = SpaceEntry(e.key, e.group, "D", e.value + delta, e.base, e.row_dim)
                continue
            seen[id(w0)] = len(entries)
            key, base = offset_override(pair, names[id(w0)])
            entries.append(
                SpaceEntry(
                    key, _module_of(pair.name), "D", w0.detach().to(dtype) + delta, base, _row_dim(base_layer, w0)
                )
            )
    return Space(name, entries)
