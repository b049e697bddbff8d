"""Directions of a loss landscape: random (filter-normalized), between adapters, and trajectory PCA.

A landscape evaluates the model at ``origin + a d1 + b d2`` on a grid of (a, b). Here that is
a list of :class:`Axis` (one per overridden parameter: its ``functional_call`` key, the
tensor at (0, 0), and its share of d1 and d2), built from

- a space (``merged``, ``lora``, ``b``, ``all``) and a seed: Gaussian directions, each row of
  each matrix rescaled to the norm of the matching weight row (Li et al. 2018, "filter
  normalization"), 1-D tensors zeroed;
- two adapters of one base model (``merged`` line from one to the other, heads included), or
  the base model and an adapter;
- a run's saved trajectory: the first two principal components of the saved points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flatlora.errors import FlatLoraError
from flatlora.lora import LoraPair, find_lora_pairs
from flatlora_analysis.spaces import Space, offset_override


@dataclass(frozen=True)
class Axis:
    """One overridden parameter: ``key`` takes ``origin + a * d1 + b * d2``."""

    key: str
    origin: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor | None = None

    def at(self, a: float, b: float = 0.0) -> torch.Tensor:
        out = self.origin + a * self.d1 if a != 0 else self.origin + 0 * self.d1
        if self.d2 is not None and b != 0:
            out = out + b * self.d2
        return out


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def cosine(axes: list[Axis]) -> float | None:
    """The cosine between d1 and d2 over every axis (None for one direction)."""
    if any(a.d2 is None for a in axes):
        return None
    d1, d2 = _flat([a.d1 for a in axes]), _flat([a.d2 for a in axes])
    return float(d1 @ d2 / (d1.norm() * d2.norm()))


def filter_normalize(direction: torch.Tensor, weight: torch.Tensor, row_dim: int = 0) -> torch.Tensor:
    """Rescale each row of ``direction`` to the norm of the matching row of ``weight``; 1-D tensors give 0.

    Rows index output units: dimension ``row_dim`` (1 for GPT-2's transposed Conv1D weights).
    """
    if direction.dim() <= 1:
        return torch.zeros_like(direction)
    d = direction.movedim(row_dim, 0)
    w = weight.movedim(row_dim, 0)
    d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
    w_norm = w.reshape(w.shape[0], -1).norm(dim=1).to(d.dtype)
    scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d_norm))
    return (d * scale.view(-1, *([1] * (d.dim() - 1)))).movedim(0, row_dim)


def random_directions(
    space: Space, *, seed: int = 0, count: int = 2, normalize: bool = True
) -> list[list[torch.Tensor]]:
    """``count`` Gaussian directions in ``space`` (one tensor per entry), deterministic from ``seed``."""
    out = []
    for i in range(count):
        g = torch.Generator(device="cpu").manual_seed(seed + 1000 * i)
        direction = []
        for e in space.entries:
            d = torch.randn(e.value.shape, generator=g, dtype=torch.float64).to(
                device=e.value.device, dtype=space.dtype
            )
            direction.append(filter_normalize(d, e.value.to(space.dtype), e.row_dim) if normalize else d)
        out.append(direction)
    return out


def space_axes(space: Space, d1: list[torch.Tensor], d2: list[torch.Tensor] | None = None) -> list[Axis]:
    """Axes over a space's entries (the override adds the direction to each entry's base)."""
    return [
        Axis(e.key, e.base, a.to(e.base.dtype), None if d2 is None else b.to(e.base.dtype))
        for e, a, b in zip(space.entries, d1, d2 if d2 is not None else [None] * len(d1))
    ]


# ----------------------------------------------------------------------------- saved adapters


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p.data_ptr(), name)
    return names


def saved_key_map(model: nn.Module, adapter: str = "default") -> dict[str, str]:
    """peft's saved (adapter-file) key of each adapter tensor -> the model's parameter name."""
    from peft import get_peft_model_state_dict

    names = _param_names(model)
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {key: names[t.data_ptr()] for key, t in state.items() if t.data_ptr() in names}


def delta_weight(pair: LoraPair, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B A in the base weight's stored layout (as peft's get_delta_weight), for other factors A, B.

    In the base weight's dtype, at least float32 (on a half-precision base, as the LoRA branch computes).
    """
    w0 = pair.base_weight()
    dtype = torch.promote_types(w0.dtype, torch.float32)
    product = B.flatten(1).to(dtype) @ A.flatten(1).to(dtype)
    if pair.kind == "embedding" or (pair.kind == "linear" and pair.base_transposed):
        product = product.T
    return (scaling * product).reshape(w0.shape)


def _adapter_config(folder: Path) -> dict:
    import json

    return json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))


def _scaling(config: dict) -> float:
    import math

    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_tensors(model: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    """Another adapter's tensors keyed by this model's parameter names; refuses another base or shape."""
    from flatlora.adapters import read_adapter_weights

    tensors = read_adapter_weights(folder)
    mapping = saved_key_map(model)
    params = dict(model.named_parameters())
    out = {}
    for key, value in tensors.items():
        name = mapping.get(key)
        if name is None or params[name].shape != value.shape:
            raise FlatLoraError(
                f"adapter {folder} does not match this model ({key}): the two adapters must share one base "
                "model and LoRA configuration (targets, r)"
            )
        out[name] = value.to(device=params[name].device, dtype=params[name].dtype)
    return out


def _pair_keys(model: nn.Module, pair: LoraPair) -> tuple[str, str]:
    names = _param_names(model)
    return names[pair.A.data_ptr()], names[pair.B.data_ptr()]


def line_axes(model: nn.Module, other: str | Path | None) -> list[Axis]:
    """The merged-space line from this adapter (t = 0) to ``other`` (t = 1), heads included.

    ``other=None`` gives the line from the base model (t = 0, adapter off) to this adapter (t = 1).
    """
    pairs = find_lora_pairs(model)
    params = dict(model.named_parameters())
    names = _param_names(model)
    axes: list[Axis] = []
    lora_keys = set()
    if other is not None:
        theirs = adapter_tensors(model, other)
        scaling = _scaling(_adapter_config(Path(other)))
    with torch.no_grad():
        for pair in pairs:
            a_key, b_key = _pair_keys(model, pair)
            lora_keys |= {a_key, b_key}
            w0 = pair.base_weight()
            mine = pair.layer.get_delta_weight(pair.adapter).to(torch.promote_types(w0.dtype, torch.float32))
            key, origin = offset_override(pair, names[w0.data_ptr()])  # a half W0: a float32 offset of it
            if other is None:  # the LoRA branch still adds s B A: start from W0 - s B A
                axes.append(Axis(key, origin - mine, mine))
            else:
                theirs_delta = delta_weight(pair, theirs[a_key], theirs[b_key], scaling)
                axes.append(Axis(key, origin, theirs_delta - mine))
        extra = [k for k in (saved_key_map(model).values()) if k not in lora_keys]
        for key in extra:  # trained heads (peft modules_to_save) and other saved tensors
            mine = params[key].detach()
            if other is not None:
                axes.append(Axis(key, mine, theirs[key] - mine))
            elif "modules_to_save" in key:
                head, _, tail = key.partition("modules_to_save.")
                original = params.get(head + "original_module." + tail.split(".", 1)[1])
                if original is not None:
                    axes.append(Axis(key, original.detach(), mine - original.detach()))
    return axes


# ----------------------------------------------------------------------------- trajectory PCA


def trajectory_points(model: nn.Module, space: Space, folders: list[Path]) -> torch.Tensor:
    """Each saved adapter as a point of ``space`` (rows: steps), merged weights for ``merged``."""
    pairs = {p.name.rsplit("[", 1)[0]: p for p in find_lora_pairs(model)}
    rows = []
    for folder in folders:
        theirs = adapter_tensors(model, folder)
        scaling = _scaling(_adapter_config(folder))
        values = []
        for e in space.entries:
            if e.role == "D":
                pair = pairs[e.group]
                a_key, b_key = _pair_keys(model, pair)
                w0 = pair.base_weight().to(space.dtype)  # e.base is a zero on a half-precision base
                values.append(w0 + delta_weight(pair, theirs[a_key], theirs[b_key], scaling).to(space.dtype))
            else:
                values.append(theirs.get(e.key, e.value))
        rows.append(space.flatten(values).double())
    return torch.stack(rows)


def pca_axes(model: nn.Module, space: Space, folders: list[Path], steps: list[int]):
    """(axes, trajectory coordinates (T x 2), explained variance ratios (2,)) of a saved trajectory.

    Points are taken relative to the final adapter (the model's, the origin of the plane);
    the directions are the top two principal components of the centered points (as Li et al.
    2018), unit vectors in the space; the trajectory is projected onto them.
    """
    if len(folders) < 2:
        raise FlatLoraError("a PCA plane needs at least two saved trajectory steps: train with --trajectory-every N")
    origin = space.point().double()
    points = trajectory_points(model, space, folders) - origin
    centered = points - points.mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    if len(s) < 2 or s[1] <= 0:
        raise FlatLoraError("the saved trajectory spans less than two dimensions: save more steps")
    ratio = (s**2 / (s**2).sum())[:2]
    d1, d2 = vh[0], vh[1]
    coords = torch.stack([points @ d1, points @ d2], 1)
    parts1 = space.split(d1.to(space.dtype))
    parts2 = space.split(d2.to(space.dtype))
    return space_axes(space, parts1, parts2), coords.numpy(), ratio.numpy()


def trajectory_folders(run_path: str | Path) -> tuple[list[Path], list[int]]:
    from flatlora_analysis.balance import trajectory_steps

    found = trajectory_steps(run_path)
    if not found:
        raise FlatLoraError(f"{run_path} has no saved trajectory: train with --trajectory-every N for --pca")
    return [f for _, f in found], [s for s, _ in found]
