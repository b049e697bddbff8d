"""LoRA discovery: the factors, their orientation and scaling match what peft computes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flatlora import FlatLoraError, find_lora_pairs, make_method
from flatlora.lora import balancedness
from flatlora.testing import TINY_ARCHS, tiny_batches, tiny_model


def randomize_b(model, seed=0):
    """LoRA starts with B = 0; give B generic values so the identities are not trivially 0 = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in find_lora_pairs(model):
            pair.B.copy_(torch.randn(pair.B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pairs_found_with_linear_shapes(arch):
    model = tiny_model(arch, r=4)
    pairs = find_lora_pairs(model)
    assert len(pairs) == (2 if arch == "gpt2" else 4)  # 2 layers x (q, v) or c_attn
    for pair in pairs:
        assert pair.a_matrix.shape[0] == 4 and pair.b_matrix.shape[1] == 4
        assert pair.scaling == pytest.approx(8 / 4)
        assert pair.base_transposed == (arch == "gpt2")
        assert pair.variant is None


def assert_factor_gradients_match_full_gradient(model, arch, expected_scaling):
    """gB = s G A^T and gA = s B^T G, with G = dL/dW0 brought to the B @ A layout."""
    model = model.double()
    randomize_b(model)
    pairs = find_lora_pairs(model)
    bases = [p.base_weight() for p in pairs]
    for w in bases:
        w.requires_grad_(True)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batches(arch, 1)[0].items()}
    grads = torch.autograd.grad(model(**batch).loss, [t for p in pairs for t in (p.A, p.B)] + bases)
    n = len(pairs)
    for i, pair in enumerate(pairs):
        gA, gB, gW = grads[2 * i], grads[2 * i + 1], grads[2 * n + i]
        G = gW.T if pair.base_transposed else gW
        assert pair.scaling == pytest.approx(expected_scaling)
        assert torch.allclose(gB, pair.scaling * G @ pair.A.T, atol=1e-12)
        assert torch.allclose(gA, pair.scaling * pair.B.T @ G, atol=1e-12)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_factor_gradients_are_s_g_at_and_s_bt_g(arch, rslora):
    model = tiny_model(arch, r=4, use_rslora=rslora)
    assert_factor_gradients_match_full_gradient(model, arch, 8 / 2 if rslora else 8 / 4)


def test_embedding_lora_is_found_transposed_and_trains():
    model = tiny_model("bert", target_modules=["word_embeddings", "query"])
    pairs = find_lora_pairs(model)
    emb = [p for p in pairs if p.kind == "embedding"]
    assert len(emb) == 1 and emb[0].base_transposed
    assert emb[0].b_matrix.shape == (32, 4) and emb[0].a_matrix.shape == (4, 64)
    assert_factor_gradients_match_full_gradient(model, "bert", 2.0)
    method = make_method("flat-lora", model, rho=0.05, lr=1e-2)
    method.train_step(lambda: model(**tiny_batches("bert", 1)[0]).loss)


def test_conv_lora_pairs_are_flattened_matrices():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    pairs = find_lora_pairs(model)
    conv = next(p for p in pairs if p.kind == "conv")
    assert conv.a_matrix.shape == (2, 27) and conv.b_matrix.shape == (8, 2)
    x = torch.randn(4, 3, 8, 8)
    method = make_method("eflat-lora", model, rho=0.1, lr=1e-2)
    for _ in range(3):
        method.train_step(lambda: model(x).square().mean())
    assert method.ema(conv).shape == conv.B.shape


def test_dora_is_refused_by_methods_that_need_plain_lora_only():
    model = tiny_model("bert", use_dora=True)
    assert {p.variant for p in find_lora_pairs(model)} == {"DoRA"}
    for name in ("flat-lora", "eflat-lora", "rwp-lora"):
        with pytest.raises(FlatLoraError, match="DoRA"):
            make_method(name, model, total_steps=10)
    for name in ("lora", "lora-sam", "bar"):
        make_method(name, model)


def test_model_without_lora_is_a_clear_error():
    with pytest.raises(FlatLoraError, match="no LoRA layers"):
        find_lora_pairs(torch.nn.Linear(3, 3))
    with pytest.raises(FlatLoraError, match="get_peft_model"):
        make_method("eflat-lora", torch.nn.Linear(3, 3))


def test_merged_adapter_is_refused():
    model = tiny_model("bert")
    model.merge_adapter()
    with pytest.raises(FlatLoraError, match="unmerge"):
        find_lora_pairs(model)


def test_balancedness_matches_norms():
    model = tiny_model("llama")
    randomize_b(model)
    pairs = find_lora_pairs(model)
    expected = torch.tensor([p.A.detach().double().norm() ** 2 - p.B.detach().double().norm() ** 2 for p in pairs])
    assert torch.allclose(balancedness(pairs).double(), expected, rtol=0, atol=1e-6)
