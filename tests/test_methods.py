"""The training methods: exact reduction to LoRA, clean weights, resume, skips, learning, errors."""

from __future__ import annotations

import io
import math
import statistics

import pytest
import torch
from helpers import assert_bit_equal, trainable
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from flatlora import METHODS, FlatLoraError, RhoSchedule, flat_lora_eps_b, make_method
from flatlora.testing import TINY_ARCHS, tiny_batches, tiny_model
from flatlora.trainer import evaluate, train_loop

ALL = list(METHODS)
STEPS = 8


def build(name, arch="bert", seed=0, **kwargs):
    model = tiny_model(arch, seed=seed, **kwargs.pop("model_kwargs", {}))
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("total_steps", STEPS)
    return model, make_method(name, model, **kwargs)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("name", ALL)
def test_rho_zero_reduces_to_lora_bit_for_bit(name, arch):
    data = tiny_batches(arch, 3, seed=1)
    ref_model, ref = build("lora", arch)
    ref_logs = train_loop(ref_model, ref, data, STEPS)
    model, method = build(name, arch, rho=0.0)
    logs = train_loop(model, method, data, STEPS)
    assert [r["loss"] for r in logs] == [r["loss"] for r in ref_logs]
    assert_bit_equal(trainable(model), trainable(ref_model))


@pytest.mark.parametrize("name", ALL)
def test_update_sees_clean_weights_and_model_rests_clean(name):
    model, method = build(name, rho=0.5, rho_schedule="cosine", rho_min=0.1)
    watched = {f"p{i}": t for i, t in enumerate(method.factor_params + [p.base_weight() for p in method.pairs])}
    seen = []
    original_step = method.base_optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({k: t.detach().clone() for k, t in watched.items()})
        return original_step(*args, **kwargs)

    method.base_optimizer.step = recording_step
    for i, batch in enumerate(tiny_batches("bert", STEPS, seed=2)):
        before = {k: t.detach().clone() for k, t in watched.items()}
        method.train_step(lambda batch=batch: model(**batch).loss)
        assert not method.perturbed
        assert_bit_equal(seen[i], before)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_resume_continues_bit_identically(name):
    kwargs = dict(rho=0.05, rho_schedule="linear", rho_min=0.01)
    data = tiny_batches("bert", 3, seed=3)
    full_model, full = build(name, **kwargs)
    full_logs = train_loop(full_model, full, data, STEPS)

    first_model, first = build(name, **kwargs)
    train_loop(first_model, first, data, STEPS // 2)
    buffer = io.BytesIO()
    torch.save({"model": trainable(first_model), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, resumed = build(name, **kwargs)
    with torch.no_grad():  # scramble the adapter: everything trainable must come from the file
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    missing = resumed_model.load_state_dict(saved["model"], strict=False)
    assert not missing.unexpected_keys
    resumed.load_state_dict(saved["optimizer"])
    rest = data[STEPS // 2 % len(data) :] + data[: STEPS // 2 % len(data)]
    resumed_logs = train_loop(resumed_model, resumed, rest, STEPS - STEPS // 2)
    assert [r["loss"] for r in resumed_logs] == [r["loss"] for r in full_logs[STEPS // 2 :]]
    assert_bit_equal(trainable(resumed_model), trainable(full_model))


def test_eflat_ema_is_saved_in_optimizer_state_and_keeps_fp32_on_bf16():
    model, method = build("eflat-lora", model_kwargs={"dtype": torch.bfloat16})
    train_loop(model, method, tiny_batches("bert", 2), 3)
    state = method.state_dict()
    emas = [s["ema_perturbation"] for s in state["flatlora"]["state"].values()]
    assert len(emas) == len(method.pairs) and all(e.dtype == torch.float32 for e in emas)
    assert any(e.abs().sum() > 0 for e in emas)
    _other_model, other = build("eflat-lora", model_kwargs={"dtype": torch.bfloat16})
    other.load_state_dict(state)
    for pair in other.pairs:
        assert other.ema(pair).dtype == torch.float32
    with pytest.raises(FlatLoraError, match="eflat-lora"):
        build("flat-lora")[1].load_state_dict(state)


@pytest.mark.parametrize("name", ALL)
def test_non_finite_gradient_skips_the_step_and_keeps_state(name):
    model, method = build(name, rho=0.05)
    data = tiny_batches("bert", 1)[0]
    train_loop(model, method, [data], 2)
    weights = trainable(model)
    state = {k: v.clone() for p, s in method.state.items() for k, v in s.items() for _ in [0]}
    emas = [method.ema(p).clone() for p in method.pairs] if name == "eflat-lora" else []
    log = method.train_step(lambda: model(**data).loss * float("nan"))
    assert log["skipped"] == 1.0 and method.steps_skipped == 1
    assert_bit_equal(trainable(model), weights)
    for pair, ema in zip(method.pairs, emas):
        assert torch.equal(method.ema(pair), ema)
    assert state.keys() == {k for s in method.state.values() for k in s}
    assert method.train_step(lambda: model(**data).loss)["skipped"] == 0.0


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", ALL)
def test_each_method_lowers_training_loss(name, arch):
    data = tiny_batches(arch, 2, seed=1)
    model, method = build(name, arch, lr=3e-2, rho=0.05, total_steps=30)
    before = evaluate(model, data)["loss"]
    logs = train_loop(model, method, data, 30)
    after = evaluate(model, data)["loss"]
    assert after < 0.98 * before, (before, after)
    if name == "flat-lora":
        # The perturbation is an ascent direction: the perturbed loss exceeds the clean one on average.
        assert statistics.mean(r["perturbed_loss"] - r["loss"] for r in logs) > 0


def test_flat_lora_moves_only_b_by_the_pure_function_result():
    model, method = build("flat-lora", rho=0.1, model_kwargs={"dtype": torch.float64})
    batch = {k: v for k, v in tiny_batches("bert", 1)[0].items()}
    train_loop(model, method, [batch], 2)  # B != 0
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, method.factor_params)
    pairs = method.pairs
    expected = flat_lora_eps_b(
        [p.A for p in pairs],
        [p.B for p in pairs],
        list(grads[0::2]),
        list(grads[1::2]),
        [p.scaling for p in pairs],
        0.1,
    )
    clean = [t.detach().clone() for t in method.factor_params]
    method.perturb(grads)
    for pair, eps, A0, B0 in zip(pairs, expected, clean[0::2], clean[1::2]):
        assert torch.equal(pair.A, A0)
        assert torch.allclose(pair.B - B0, eps, atol=1e-15)
    log = method.pop_log()
    assert log["realized_norm"] <= 0.1 * (1 + 1e-9)
    method.restore()
    assert all(torch.equal(t, c) for t, c in zip(method.factor_params, clean))


def test_lora_sam_moves_all_factors_by_rho_along_the_gradient():
    model, method = build("lora-sam", rho=0.2, model_kwargs={"dtype": torch.float64})
    batch = tiny_batches("bert", 1)[0]
    train_loop(model, method, [batch], 1)
    grads = torch.autograd.grad(model(**batch).loss, method.factor_params)
    clean = [t.detach().clone() for t in method.factor_params]
    method.perturb(grads)
    delta = torch.cat([(t - c).flatten() for t, c in zip(method.factor_params, clean)])
    g = torch.cat([x.flatten() for x in grads])
    assert torch.allclose(delta, 0.2 * g / g.norm(), atol=1e-14)
    method.restore()


def test_bar_adds_the_first_order_sam_drift():
    model = tiny_model("llama", dtype=torch.float64)
    method = make_method(
        "bar",
        model,
        base_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        rho=0.3,
    )
    batch = tiny_batches("llama", 1)[0]
    train_loop(model, method, [batch], 1)  # B != 0
    grads = torch.autograd.grad(model(**batch).loss, method.factor_params)
    before = [t.detach().clone() for t in method.factor_params]
    method.train_step(lambda: model(**batch).loss)
    g_norm = torch.cat([g.flatten() for g in grads]).norm()
    for A, B, gA, gB, A1, B1 in zip(
        before[0::2], before[1::2], grads[0::2], grads[1::2], method.factor_params[0::2], method.factor_params[1::2]
    ):
        c = 0.3 * (gB.square().sum() - gA.square().sum()) / g_norm / (A.square().sum() + B.square().sum())
        assert torch.allclose(A1, A - (gA + c * A), atol=1e-6)
        assert torch.allclose(B1, B - (gB - c * B), atol=1e-6)


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_rwp_noise_has_row_std_from_merged_weight(layer):
    torch.manual_seed(0)
    n, m = 512, 48
    base = torch.nn.Linear(n, m, bias=False) if layer == "linear" else Conv1D(m, n)
    with torch.no_grad():
        rows = torch.arange(1, m + 1, dtype=torch.float32)[:, None]
        if layer == "linear":
            base.weight.mul_(rows)
        else:
            base.weight.mul_(rows.T)  # Conv1D stores (in, out): scale output columns
    model = get_peft_model(
        torch.nn.Sequential(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], fan_in_fan_out=layer == "conv1d")
    )
    method = make_method("rwp-lora", model, rho=0.5, total_steps=2, seed=7)
    method.steps_done = 1  # f_t = (1 - cos(pi / 2)) / 2 = 1/2
    (pair,) = method.pairs
    W0 = pair.base_weight()
    clean = W0.detach().clone()
    merged = (clean.T if layer == "conv1d" else clean) + pair.scaling * pair.B @ pair.A
    method.perturb()
    delta = W0.detach() - clean
    delta = delta.T if layer == "conv1d" else delta
    ratio = delta.std(dim=1) / (0.5 * 0.5 * merged.detach().norm(dim=1) / math.sqrt(n))
    assert ratio.min() > 0.85 and ratio.max() < 1.15
    method.restore()
    assert torch.equal(W0, clean)


def test_eflat_theorem2_check_leaves_training_unchanged_even_with_dropout():
    data = tiny_batches("bert", 2, seed=4)
    kwargs = dict(rho=0.05, model_kwargs={"lora_dropout": 0.2})
    torch.manual_seed(123)
    plain_model, plain = build("eflat-lora", **kwargs)
    torch.manual_seed(123)
    plain_logs = train_loop(plain_model, plain, data, 6)
    torch.manual_seed(123)
    diag_model, diag = build("eflat-lora", diagnostics_every=2, **kwargs)
    torch.manual_seed(123)
    diag_logs = train_loop(diag_model, diag, data, 6)
    assert_bit_equal(trainable(diag_model), trainable(plain_model))
    assert [r["loss"] for r in diag_logs] == [r["loss"] for r in plain_logs]
    assert [("t2_rel_error" in r) for r in diag_logs] == [True, False] * 3
    # The EMA point's loss in the check replays the step's own dropout masks.
    assert all(r["t2_ema_loss"] == pytest.approx(r["loss"], abs=1e-6) for r in diag_logs if "t2_ema_loss" in r)


def test_eflat_theorem2_check_with_beta_zero_and_a_frozen_point_matches_sam():
    model = tiny_model("bert", dtype=torch.float64)
    method = make_method(
        "eflat-lora",
        model,
        base_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9),
        rho=1e-6,
        beta=0.0,
        diagnostics_every=1,
    )
    batch = tiny_batches("bert", 1)[0]
    with torch.no_grad():
        for pair in method.pairs:
            pair.B.normal_(0, 0.1)
    logs = train_loop(model, method, [batch], 3)
    assert logs[0]["t2_rel_error"] == pytest.approx(1.0)  # e_bar_0 = 0
    for r in logs[1:]:
        assert r["t2_rel_error"] < 1e-3 and r["t2_cosine"] > 1 - 1e-6
        assert abs(r["t2_loss_gap"]) < 1e-9


def test_rho_schedules():
    T = 10
    assert RhoSchedule(0.05)(7) == 0.05
    linear = RhoSchedule(0.05, "linear", 0.01, T)
    assert linear(0) == 0.05 and linear(5) == pytest.approx(0.03) and linear(T) == pytest.approx(0.01)
    assert linear(3 * T) == pytest.approx(0.01)
    cosine = RhoSchedule(0.05, "cosine", 0.02, T)
    assert cosine(0) == pytest.approx(0.05) and cosine(5) == pytest.approx(0.035) and cosine(T) == pytest.approx(0.02)
    model, method = build("eflat-lora", rho=0.05, rho_schedule="linear", rho_min=0.01, total_steps=4)
    logs = train_loop(model, method, tiny_batches("bert", 1), 4)
    assert [r["rho"] for r in logs] == pytest.approx([0.05, 0.04, 0.03, 0.02])


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("flat-lora", {"rho": -0.1}, "rho must be >= 0"),
        ("lora-sam", {"rho": -1.0}, "rho must be >= 0"),
        ("eflat-lora", {"beta": 1.0}, r"beta must lie in \[0, 1\)"),
        ("eflat-lora", {"beta": -0.1}, r"beta must lie in \[0, 1\)"),
        ("eflat-lora", {"rho_schedule": "step"}, "unknown rho schedule"),
        ("eflat-lora", {"rho_schedule": "cosine", "total_steps": None}, "needs total_steps"),
        ("rwp-lora", {"total_steps": None}, "total_steps"),
        ("lora-sam", {"adaptive": True, "eta": -1.0}, "eta must be >= 0"),
        ("lora", {"lr": 0.0}, "lr must be > 0"),
        ("lora", {"beta": 0.9}, "do not apply to method lora"),
        ("flat-lora", {"norm": "spectral"}, "unknown norm"),
        ("adam-sam", {}, "unknown method"),
    ],
)
def test_bad_hyperparameters_name_the_fix(name, kwargs, match):
    model = tiny_model("bert")
    kwargs = {"total_steps": 10, **kwargs}
    with pytest.raises(FlatLoraError, match=match):
        make_method(name, model, **kwargs)


def test_misuse_of_the_phases_is_refused():
    # a closure is a user's choice (closure-style SAM loops): a one-line FlatLoraError;
    # breaking the perturb / restore / step protocol only a bug can do: a RuntimeError
    model, method = build("flat-lora")
    batch = tiny_batches("bert", 1)[0]
    with pytest.raises(FlatLoraError, match="train_step"):
        method.step(lambda: model(**batch).loss)
    with pytest.raises(RuntimeError, match="first-pass gradients"):
        method.perturb()
    grads = torch.autograd.grad(model(**batch).loss, method.factor_params)
    method.perturb(grads)
    with pytest.raises(RuntimeError, match="twice"):
        method.perturb(grads)
    with pytest.raises(RuntimeError, match="restore"):
        method.step()
    method.restore()
    method.step()


def test_rwp_noise_is_held_across_micro_batches_and_redrawn_each_step():
    _model, method = build("rwp-lora", rho=0.5, total_steps=4, seed=5)
    method.steps_done = 2  # f_t = 1/2: noise on
    W0 = method.pairs[0].base_weight()
    clean = W0.detach().clone()

    def noise():
        method.perturb()
        delta = W0.detach() - clean
        method.restore()
        return delta

    first, second = noise(), noise()  # two micro-batches of one step
    assert first.abs().sum() > 0 and torch.equal(first, second)
    method.step()
    assert not torch.equal(noise(), first)  # the next step draws afresh


def test_a_method_class_without_a_name_or_with_a_taken_one_is_refused_when_defined():
    from flatlora.methods import LoRAMethod

    with pytest.raises(TypeError, match="name"):

        class Nameless(LoRAMethod):
            pass

    with pytest.raises(TypeError, match="'flat-lora' is taken"):

        class Copycat(LoRAMethod):
            name = "flat-lora"

    assert METHODS["flat-lora"].__name__ == "FlatLoRA"

    class Mine(LoRAMethod):
        name = "my-lora"

    try:
        assert METHODS["my-lora"] is Mine
        assert isinstance(make_method("my-lora", tiny_model("bert")), Mine)
    finally:
        del METHODS["my-lora"]


def two_adapter_model():
    """A tiny LLaMA with two active LoRA adapters on every adapted layer (both trainable)."""
    from peft.tuners.lora import LoraLayer

    model = tiny_model("llama")
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return model


def test_rwp_with_two_adapters_on_a_layer_leaves_the_base_weights_clean():
    model = two_adapter_model()
    method = make_method("rwp-lora", model, rho=0.5, total_steps=4, seed=1)
    assert len(method.pairs) == 8  # 2 layers x (q_proj, v_proj) x 2 adapters
    with torch.no_grad():
        for pair in method.pairs:
            pair.B.normal_()
    bases = {id(p.base_weight()): p.base_weight() for p in method.pairs}
    clean = {k: w.detach().clone() for k, w in bases.items()}
    train_loop(model, method, tiny_batches("llama", 2), 3)
    for key, weight in bases.items():
        assert torch.equal(weight, clean[key])
    # one noise per base weight, its sigma from the whole merged weight W0 + sum_k s_k B_k A_k
    method.steps_done = 2  # f_t = 1/2
    first = method.pairs[0]
    W0 = first.base_weight()
    merged = W0.detach().clone()
    for pair in method.pairs:
        if pair.base_weight() is W0:
            merged += pair.scaling * pair.B.detach() @ pair.A.detach()
    before = W0.detach().clone()
    method.perturb()
    delta = W0.detach() - before
    method.restore()
    expected = 0.5 * 0.5 * merged.norm(dim=1) / math.sqrt(merged.shape[1])
    variance_ratio = (delta.square().mean(dim=1) / expected.square()).mean()
    assert 0.85 < variance_ratio < 1.15, variance_ratio  # with one adapter's sigma it is about 1/2
    assert torch.equal(W0, before)


def test_rwp_resumes_its_noise_stream_on_a_rank_whose_device_is_named_otherwise():
    # Under DDP only rank 0 saves the optimizer state: on GPUs its generator is on cuda:0 while
    # rank 1's is on cuda:1. Faked here on CPU by renaming the saved stream: every rank must
    # still resume the stream (all ranks draw the same noise, as one process would).
    kwargs = dict(rho=0.5, total_steps=6, seed=4)
    data = tiny_batches("bert", 3, seed=3)
    full_model, full = build("rwp-lora", **kwargs)
    train_loop(full_model, full, data, 6)

    first_model, first = build("rwp-lora", **kwargs)
    train_loop(first_model, first, data, 3)
    state = first.state_dict()
    extra = state["flatlora"]["extra"]
    (stream,) = extra["generators"].values()
    extra["generators"] = {"cuda:0": stream}

    resumed_model, resumed = build("rwp-lora", **kwargs)
    resumed_model.load_state_dict(first_model.state_dict())
    resumed.load_state_dict(state)
    train_loop(resumed_model, resumed, data, 3)
    assert_bit_equal(trainable(resumed_model), trainable(full_model))
