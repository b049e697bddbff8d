"""The base weights' dtype (``--dtype``): its names and checks, and float32 wherever precision matters.

``--dtype bfloat16`` (or ``float16``) loads the frozen base model in half precision, which
halves its memory; the LoRA factors stay float32 (peft's ``autocast_adapter_dtype``), and so do
a fully trained head (:func:`upcast_trained_heads`) and the optimizer state. ``--precision``
is another thing: autocast, which runs the matmuls in half precision whatever dtype the
weights are stored in; the two combine.

Where the arithmetic happens on a half-precision base:

- each base layer's matmul runs in the base dtype, its output rounded to it;
- the LoRA branch runs in float32 (peft casts its input up) and is added to the base output,
  which is then cast back to the base dtype;
- a trained head (peft ``modules_to_save``) runs in float32 with its input cast up, so the
  logits and the loss are float32;
- an offset D of a base weight (rwp-lora's noise, the merged space's perturbation) is never
  added to W0 in the base dtype, where anything below W0's resolution (bfloat16 keeps 8
  significant bits) would vanish: it rides as a float32 attribute of the layer
  (:data:`OFFSET_ATTR`), whose forward hook adds the term ``D x`` computed in float32 (autocast
  off) to the base output, and casts the sum back to the base dtype once, as peft does with the
  LoRA term. ``torch.func.functional_call`` can set the attribute for one call, so a measure
  passes D as an ordinary override.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from flatlora.errors import FlatLoraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` names -> the torch dtypes the base weights are loaded in."""
DEFAULT_DTYPE = "float32"
HALF_DTYPES = (torch.bfloat16, torch.float16)
OFFSET_ATTR = "flatlora_weight_offset"
"""The attribute of a base layer holding a float32 offset of its weight (see the module docstring)."""
_HOOKED = "_flatlora_offset_hooked"


def dtype_name(dtype: str | torch.dtype | None, flag: str = "--dtype") -> str:
    """The ``--dtype`` name of ``dtype`` (None: float32).

    Args:
        dtype: A name of :data:`DTYPES`, a torch dtype, or None.
        flag: What the message calls the setting.

    Returns:
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        FlatLoraError: any other name or dtype.
    """
    if dtype is None:
        return DEFAULT_DTYPE
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    elif dtype in DTYPES:
        return dtype
    raise FlatLoraError(f"unknown {flag} {dtype!r}: use one of {', '.join(DTYPES)}")


def torch_dtype(dtype: str | torch.dtype | None, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (None: float32); refuses others as :func:`dtype_name`."""
    return DTYPES[dtype_name(dtype, flag)]


@functools.cache
def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this torch build runs a linear layer's forward and backward in ``dtype`` on the CPU."""
    try:
        weight = torch.ones(2, 2, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(torch.ones(2, 2, dtype=dtype), weight).sum().backward()
    except (RuntimeError, TypeError):
        return False
    return weight.grad is not None and weight.grad.dtype == dtype


def check_dtype(dtype: str | torch.dtype | None, device_type: str, flag: str = "--dtype") -> str:
    """Refuse a base dtype that is unknown or that the device cannot compute in; return its name.

    Raises:
        FlatLoraError: an unknown dtype, or half precision this torch build lacks on the CPU.
    """
    name = dtype_name(dtype, flag)
    if device_type == "cpu" and not cpu_supports(DTYPES[name]):
        raise FlatLoraError(
            f"{flag} {name}: this torch build ({torch.__version__}) cannot compute in {name} on the CPU: "
            "use --dtype float32 or bfloat16, or a GPU"
        )
    return name


def _cast_up(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def up(value: Any) -> Any:
        return value.float() if torch.is_tensor(value) and value.dtype in HALF_DTYPES else value

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def upcast_trained_heads(model: nn.Module) -> list[str]:
    """Hold peft's fully trained modules (``modules_to_save`` copies) in float32, their inputs cast up.

    peft's ``autocast_adapter_dtype`` upcasts the LoRA factors of a half-precision base but
    leaves these copies (a classifier's head) in the base dtype, where an optimizer step
    rounds. Call it before loading saved weights into them, so that those load exactly.

    Args:
        model: A peft model, changed in place.

    Returns:
        The names of the modules upcast (none on a float32 base).
    """
    from peft.utils import ModulesToSaveWrapper

    done = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for adapter, copy in wrapper.modules_to_save.items():
            if any(p.dtype in HALF_DTYPES for p in copy.parameters()):
                copy.float()
                copy.register_forward_pre_hook(_cast_up, with_kwargs=True)
                done.append(f"{name}.modules_to_save.{adapter}")
    return done


# ----------------------------------------------------------------------------- float32 weight offsets


def _offset_term(module: nn.Module, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The output that ``offset`` (in the layout of ``module.weight``) adds to ``module``'s, in float32."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # GPT-2: weight stored (in, out), forward x @ W + b
        return x.to(offset.dtype) @ offset
    if isinstance(module, nn.Embedding):
        return nn.functional.embedding(x, offset, module.padding_idx, None, 2.0, False, module.sparse)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module._conv_forward(x.to(offset.dtype), offset, None)
    return nn.functional.linear(x.to(offset.dtype), offset)


def _add_offset(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    offset = module.__dict__.get(OFFSET_ATTR)
    if offset is None or not args:
        return None
    with torch.autocast(output.device.type, enabled=False):  # autocast would round the term to half
        term = _offset_term(module, args[0], offset)
        return (output.to(term.dtype) + term).to(output.dtype)


def supports_offset(layer: nn.Module) -> bool:
    """Whether :func:`add_weight_offset` can carry an offset of ``layer``'s weight (linear, Conv1D, embedding, conv)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, (nn.Linear, Conv1D, nn.Embedding, nn.modules.conv._ConvNd))


def ensure_offset_hook(layer: nn.Module) -> None:
    """Give ``layer`` the forward hook that adds its :data:`OFFSET_ATTR` term (once; a no-op without an offset).

    Raises:
        FlatLoraError: a layer type whose weight offset has no known forward.
    """
    if layer.__dict__.get(_HOOKED):
        return
    if not supports_offset(layer):
        raise FlatLoraError(
            f"cannot carry a float32 offset of a {type(layer).__name__} weight on a half-precision base: "
            "load the base model with --dtype float32"
        )
    layer.register_forward_hook(_add_offset)
    layer.__dict__[_HOOKED] = True


def add_weight_offset(layer: nn.Module, offset: torch.Tensor) -> None:
    """Move ``layer``'s weight by ``offset`` (its layout) as a float32 term of its forward; W0 is not written.

    Raises:
        FlatLoraError: a layer type :func:`supports_offset` does not know.
    """
    ensure_offset_hook(layer)
    offset = offset.to(torch.promote_types(offset.dtype, torch.float32))
    current = layer.__dict__.get(OFFSET_ATTR)
    layer.__dict__[OFFSET_ATTR] = offset if current is None else current + offset


def clear_weight_offset(layer: nn.Module) -> None:
    """Remove the offset :func:`add_weight_offset` gave ``layer`` (its forward is W0's again)."""
    layer.__dict__.pop(OFFSET_ATTR, None)
