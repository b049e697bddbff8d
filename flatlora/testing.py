"""Tiny random models for tests and notebooks: built in code or saved to a folder, no download.

:func:`tiny_model` builds a tiny ``bert``, ``gpt2``, ``vit`` or ``llama`` wrapped in peft LoRA
on the modules the LoRA paper adapts, and :func:`tiny_batches` a learnable synthetic task for
it. :func:`save_tiny_text_model` and :func:`save_tiny_causal_lm` write tiny checkpoints with
real tokenizers, to test the real loading paths (``load_classifier(folder)``,
``load_causal_lm(folder)``) without a real model's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flatlora.causal_lm import load_causal_tokenizer
from flatlora.errors import FlatLoraError
from flatlora.models import default_lora_targets, resolve_model_path

TINY_ARCHS = ("bert", "gpt2", "vit", "llama")
TINY_VOCAB = 64
TINY_SEQ = 16
TINY_IMAGE = 16


def _tiny_base(arch: str, num_labels: int) -> tuple[torch.nn.Module, str]:
    """A tiny random transformers model of ``arch`` and its peft task (``"VIT"``: no peft task, a trained head)."""
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
    **lora_kwargs: Any,
) -> torch.nn.Module:
    """A tiny randomly initialised model of ``arch`` wrapped in peft LoRA (deterministic per seed).

    Classification models (bert, vit) also train their classifier head (peft modules_to_save).
    Attention is eager, so double backward (Hessian products) works.

    Args:
        arch: One of :data:`TINY_ARCHS` (hidden size 32, 2 layers, 2 heads).
        r: The LoRA rank.
        alpha: The LoRA scaling numerator.
        seed: The weights and LoRA factors are drawn after ``torch.manual_seed(seed)``.
        num_labels: The classes of bert and vit.
        lora_dropout: The LoRA branch's dropout.
        dtype: The model's dtype.
        **lora_kwargs: Further ``peft.LoraConfig`` arguments (``use_rslora``, ``use_dora``,
            ``target_modules``, ...).

    Returns:
        The peft model.

    Raises:
        FlatLoraError: an unknown ``arch``.
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

    Args:
        arch: One of :data:`TINY_ARCHS`.
        n_batches: How many batches.
        batch_size: Examples per batch (B).
        seed: The draws' generator seed.

    Returns:
        The batches: ``input_ids`` and ``attention_mask`` of shape ``(B, TINY_SEQ)`` with
        ``labels`` of shape ``(B,)`` (bert) or ``(B, TINY_SEQ)`` (gpt2, llama); for vit
        ``pixel_values`` of shape ``(B, 3, TINY_IMAGE, TINY_IMAGE)`` and ``labels`` ``(B,)``.

    Raises:
        FlatLoraError: an unknown ``arch``.
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


def save_tiny_text_model(
    folder: str | Path, *, num_labels: int = 2, seed: int = 0, dropout: float | None = None
) -> str:
    """Write a tiny random BERT classifier with the default model's tokenizer to ``folder``.

    For tests and quick trials of the real loading path (``load_classifier(folder)``) without
    a 22M-parameter model.

    Args:
        folder: Where to save it (created by ``save_pretrained``).
        num_labels: The classes of its head.
        seed: The weights are drawn after ``torch.manual_seed(seed)``.
        dropout: Its hidden and attention dropout (None: BERT's 0.1; 0 makes runs on several
            processes comparable with one).

    Returns:
        The folder, as a string.
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


def save_tiny_causal_lm(folder: str | Path, *, arch: str = "llama", seed: int = 0, tokenizer: Any = None) -> str:
    """Write a tiny random causal LM (``llama`` or ``gpt2``) with a real tokenizer to ``folder``.

    For tests of the real loading path (``load_causal_lm(folder)``) without a 135M model.

    Args:
        folder: Where to save it (created by ``save_pretrained``).
        arch: ``"llama"`` or ``"gpt2"`` (hidden size 32, 2 layers, 2 heads).
        seed: The weights are drawn after ``torch.manual_seed(seed)``.
        tokenizer: Its tokenizer (None: the default LLM's, which has a chat template).

    Returns:
        The folder, as a string.

    Raises:
        FlatLoraError: an unknown ``arch``.
    """
    import transformers as tf

    if tokenizer is None:
        tokenizer = load_causal_tokenizer(None)
    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "llama":
        config = tf.LlamaConfig(
            **ids, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
        )  # fmt: skip
        cls = tf.LlamaForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(
            **ids, vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        cls = tf.GPT2LMHeadModel
    else:
        raise FlatLoraError(f"unknown tiny causal LM {arch!r}: use llama or gpt2")
    torch.manual_seed(seed)
    cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
