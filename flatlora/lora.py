"""Find the LoRA factor pairs of a peft model: one small record per adapted layer.

Every formula of the project is written for ``W = W0 + s * B @ A`` with ``A`` of shape
(r, n) and ``B`` of shape (m, r). peft stores GPT-2 ``Conv1D`` bases and embedding bases
transposed, and convolution factors as 4-D kernels; :class:`LoraPair` hides those layouts so
the math sees plain matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flatlora.errors import FlatLoraError


@dataclass(frozen=True)
class LoraPair:
    """One adapter's factors on one layer.

    Attributes:
        name: module path in the model plus the adapter name, e.g. ``...query[default]``.
        layer: the peft ``LoraLayer`` holding the factors.
        adapter: the adapter name.
        A: the ``lora_A`` parameter (r x n, or a conv kernel of r output channels).
        B: the ``lora_B`` parameter (m x r, or a conv kernel of shape (m, r, 1, ...)).
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        base_transposed: the base weight is stored as (n, m) (``fan_in_fan_out`` or embedding).
        variant: the name of a LoRA variant on this adapter (``"DoRA"``, ...) or ``None``.
    """

    name: str
    layer: nn.Module
    adapter: str
    A: torch.Tensor
    B: torch.Tensor
    kind: str
    base_transposed: bool
    variant: str | None

    @property
    def scaling(self) -> float:
        """s in W = W0 + s B A, read live from the layer (alpha/r, or alpha/sqrt(r) with rslora)."""
        return float(self.layer.scaling[self.adapter])

    @property
    def a_matrix(self) -> torch.Tensor:
        """A as an (r, n) view."""
        return self.A.flatten(1)

    @property
    def b_matrix(self) -> torch.Tensor:
        """B as an (m, r) view."""
        return self.B.flatten(1)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W0 as stored by the base layer (not transposed)."""
        weight = getattr(self.layer.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise FlatLoraError(
                f"layer {self.name} has no floating-point base weight (quantized?): "
                "use a method that perturbs only the LoRA factors (lora-sam, flat-lora, eflat-lora)"
            )
        return weight


def _variant_name(layer: nn.Module, adapter: str) -> str | None:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        name = type(variant).__name__
        return "DoRA" if "Dora" in name else name.removesuffix("Variant")
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    return None


def find_lora_pairs(model: nn.Module, adapter: str | None = None) -> list[LoraPair]:
    """Every LoRA factor pair of the active adapter(s) of ``model``, in module order.

    Args:
        model: a peft model (or any module holding peft ``LoraLayer`` modules).
        adapter: restrict to this adapter name; by default each layer's active adapters.

    Raises:
        FlatLoraError: no LoRA layer found, a merged layer, or a factor of unknown shape.
    """
    from peft.tuners.lora import LoraLayer

    pairs: list[LoraPair] = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        names = [adapter] if adapter is not None else list(layer.active_adapters)
        for name in names:
            if name in layer.lora_A:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                if A.dim() == 2:
                    kind, transposed = "linear", bool(getattr(layer, "fan_in_fan_out", False))
                else:
                    kind, transposed = "conv", False
                    if any(k != 1 for k in B.shape[2:]):
                        raise FlatLoraError(
                            f"layer {module_name}: lora_B kernel {tuple(B.shape)} is not 1x1, so the "
                            "update is not s*B@A; target a different module with LoRA"
                        )
            elif name in getattr(layer, "lora_embedding_A", {}):
                A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
                kind, transposed = "embedding", True
            else:
                continue
            if layer.merged:
                raise FlatLoraError(
                    f"layer {module_name} has its adapter merged into the base weight: "
                    "call model.unmerge_adapter() before training or measuring it"
                )
            pairs.append(
                LoraPair(
                    name=f"{module_name}[{name}]",
                    layer=layer,
                    adapter=name,
                    A=A,
                    B=B,
                    kind=kind,
                    base_transposed=transposed,
                    variant=_variant_name(layer, name),
                )
            )
    if not pairs:
        hint = f" for adapter {adapter!r}" if adapter is not None else ""
        raise FlatLoraError(
            f"the model has no LoRA layers{hint}: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "or load an adapter with PeftModel.from_pretrained"
        )
    return pairs


def require_plain_lora(pairs: list[LoraPair], method: str) -> None:
    """Refuse LoRA variants (DoRA, ...) for methods that rely on the identity W = W0 + s B A.

    Under DoRA the weight is divided by a column norm of W0 + s B A, so a perturbation of B
    no longer moves W by s * eps_B @ A, and the transfer of a full-space perturbation fails.
    """
    for pair in pairs:
        if pair.variant is not None:
            raise FlatLoraError(
                f"{method} needs plain LoRA (W = W0 + s*B@A) but {pair.name} uses {pair.variant}: "
                f"train it with lora or lora-sam, or set use_dora=False in the LoraConfig"
            )


def balancedness(pairs: list[LoraPair]) -> torch.Tensor:
    """Per-layer ||A_l||_F^2 - ||B_l||_F^2 (the paper's Theorem 1), shape (L,), float32."""
    with torch.no_grad():
        return torch.stack(
            [
                (pair.A.detach().float().square().sum() - pair.B.detach().float().square().sum()).to(pairs[0].A.device)
                for pair in pairs
            ]
        )
