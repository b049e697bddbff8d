"""Half-precision base weights (--dtype): the base in bfloat16/float16, the factors, heads and spaces in float32."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from flatlora import cli
from flatlora.base_dtype import OFFSET_ATTR, cpu_supports
from flatlora.errors import FlatLoraError
from flatlora.runs import load_run

BF16 = torch.bfloat16


def causal_args(pairs_csv, model_dir, out, *extra):
    return ["--data", str(pairs_csv), "--model", str(model_dir), "--shots", "3", "--steps", "2", "--batch-size", "3",
            "--test-cap", "none", "--save-every", "50", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def classifier_args(csv_file, model_dir, out, *extra):
    return ["--data", str(csv_file), "--model", str(model_dir), "--shots", "4", "--steps", "2", "--batch-size", "4",
            "--save-every", "50", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


def half_copy(model, dtype=BF16):
    """``model`` with every base weight in ``dtype`` and the LoRA factors left float32."""
    half = copy.deepcopy(model)
    for name, p in half.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)
    return half


def upcast_copy(model):
    """``model`` with every weight in float32, holding the same (rounded) values."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.float()
    return ref


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["lora", "eflat-lora"])
def test_a_tiny_causal_lm_and_a_classifier_train_on_a_bfloat16_base(
    tmp_path, method, pairs_csv, tiny_llama_dir, csv_file, tiny_model_dir
):
    from flatlora.adapters import read_adapter_weights

    runs = {
        "causal": causal_args(pairs_csv, tiny_llama_dir, tmp_path / "causal"),
        "classifier": classifier_args(csv_file, tiny_model_dir, tmp_path / "classifier"),
    }
    for name, args in runs.items():
        assert cli.main(["train", "--method", method, "--dtype", "bfloat16", *args]) == 0
        run = load_run(tmp_path / name)
        assert run.status == "done" and run.hparams["dtype"] == "bfloat16"
        assert all(math.isfinite(v) for k, v in run.final.items() if k.endswith("_loss"))
        saved = read_adapter_weights(run.adapter_path)
        assert {t.dtype for t in saved.values()} == {torch.float32}  # factors (and the classifier's head)
        assert name == "causal" or any("classifier" in k for k in saved)


def test_the_dtype_is_part_of_a_runs_identity_and_float32_keeps_older_identities():
    from flatlora.config import TrainConfig

    assert "dtype" not in TrainConfig().hparams()
    assert TrainConfig(dtype="bfloat16").hparams()["dtype"] == "bfloat16"


def test_factors_head_and_optimizer_state_are_float32_on_a_bfloat16_base(tiny_model_dir):
    from flatlora.methods import make_method
    from flatlora.models import load_classifier

    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, r=4, dtype=BF16)
    assert dtypes(model, trainable=True) == {torch.float32} and dtypes(model, trainable=False) == {BF16}
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = dict(tokenizer(["good film", "bad film", "fine", "awful"], return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    method = make_method("eflat-lora", model, lr=1e-2, total_steps=3, rho=0.5)
    model.train()
    logs = [method.train_step(lambda: model(**batch).loss) for _ in range(3)]
    assert all(math.isfinite(log["loss"]) for log in logs)
    state = [*method.base_optimizer.state.values(), *method.state.values()]
    tensors = [v for s in state for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    assert tensors and {t.dtype for t in tensors} == {torch.float32}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama_dir):
    from flatlora.causal_lm import load_causal_lm

    model, _ = load_causal_lm(tiny_llama_dir, r=4, lora_dropout=0.0, dtype=BF16)
    return model


@pytest.mark.parametrize("method", ["lora", "lora-sam", "flat-lora", "eflat-lora", "rwp-lora", "bar"])
def test_every_method_trains_on_a_bfloat16_base_and_leaves_the_base_untouched(bf16_llama, method):
    from flatlora.lora import find_lora_pairs
    from flatlora.methods import make_method
    from flatlora.testing import tiny_batches

    model = copy.deepcopy(bf16_llama).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = make_method(method, model, lr=1e-2, total_steps=2, **({} if method == "lora" else {"rho": 0.05}))
    batch = tiny_batches("llama", 1, 4)[0]
    logs = [opt.train_step(lambda: model(**batch).loss) for _ in range(2)]
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert dtypes(model, trainable=True) == {torch.float32} and dtypes(model, trainable=False) == {BF16}
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, factors[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(OFFSET_ATTR not in pair.layer.get_base_layer().__dict__ for pair in find_lora_pairs(model))


def test_rwp_noise_on_a_bfloat16_weight_is_carried_in_float32_not_rounded_away(bf16_llama):
    from flatlora.methods import make_method

    model = copy.deepcopy(bf16_llama).eval()
    opt = make_method("rwp-lora", model, lr=1e-2, total_steps=2, rho=0.01)
    opt.steps_done = 1  # f_t = 1/2: noise of a tenth of the weight rows' rms, mostly below bfloat16's resolution
    layer = opt.pairs[0].layer.get_base_layer()
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(BF16)
    clean = layer(x)
    opt.perturb()
    noise = layer.__dict__[OFFSET_ATTR]
    assert noise.dtype == torch.float32
    rounded_away = ((layer.weight.float() + noise).to(BF16) == layer.weight).float().mean()
    assert rounded_away > 0.3  # what adding it to the bfloat16 weight would lose
    expected = (x.float() @ (layer.weight.float() + noise).T).to(BF16)
    assert torch.allclose(layer(x).float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert not torch.equal(layer(x), clean)
    opt.restore()
    assert OFFSET_ATTR not in layer.__dict__ and torch.equal(layer(x), clean)


# ----------------------------------------------------------------------------- refusals and float16


def test_an_unknown_dtype_is_refused_in_one_line_naming_the_flag_and_the_choices(
    tmp_path, csv_file, tiny_model_dir, capsys
):
    from flatlora.base_dtype import torch_dtype
    from flatlora.config import TrainConfig, validate

    out = tmp_path / "run"
    for argv in (
        ["train", "--dtype", "bf8", *classifier_args(csv_file, tiny_model_dir, out)],
        ["report", str(tmp_path), "--out", str(tmp_path / "report"), "--dtype", "half"],
    ):
        with pytest.raises(SystemExit) as stop:  # argparse's refusal
            cli.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--dtype" in err and all(n in err for n in ("float32", "bfloat16", "float16"))
    assert not out.exists()
    with pytest.raises(FlatLoraError, match=r"unknown --dtype 'bf8': use one of float32, bfloat16, float16"):
        validate(TrainConfig(dtype="bf8"))
    with pytest.raises(FlatLoraError, match="unknown --dtype 'half'"):
        torch_dtype("half")  # what load_model(..., dtype=) takes


def test_float16_computes_on_this_cpu_or_is_refused_in_one_line(bf16_llama, monkeypatch):
    import flatlora.base_dtype
    from flatlora.config import TrainConfig, validate
    from flatlora.methods import make_method
    from flatlora.testing import tiny_batches
    from flatlora_analysis.objective import evaluate_loss
    from flatlora_analysis.probe import ProbeSet

    if cpu_supports(torch.float16):  # torch 2.13's CPU runs float16 matmuls, forward and backward
        model = half_copy(upcast_copy(bf16_llama), torch.float16).train()
        opt = make_method("rwp-lora", model, lr=1e-2, total_steps=2, rho=0.05)
        batch = tiny_batches("llama", 1, 4)[0]
        assert all(math.isfinite(opt.train_step(lambda: model(**batch).loss)["loss"]) for _ in range(2))
        assert math.isfinite(evaluate_loss(model, ProbeSet.from_batches([batch]), space="merged"))
    monkeypatch.setattr(flatlora.base_dtype, "cpu_supports", lambda dtype: False)
    with pytest.raises(FlatLoraError, match=r"^--dtype float16: this torch build .* on the CPU: use --dtype float32"):
        validate(TrainConfig(dtype="float16"))


# ----------------------------------------------------------------------------- measuring


def wide_model(arch: str):
    """A LoRA model with 256-wide layers (a gradient-aligned offset below W0's resolution then moves the loss)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        base, targets = tf.LlamaForCausalLM(config), ["q_proj", "v_proj"]
    else:
        config = tf.GPT2Config(vocab_size=64, n_embd=256, n_layer=1, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        base, targets = tf.GPT2LMHeadModel(config), ["c_attn"]
    base.config._attn_implementation = "eager"
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_merged_space_carries_a_delta_below_bfloat16_resolution_exactly(arch):
    from flatlora.testing import tiny_batches
    from flatlora_analysis.objective import ModelObjective, evaluate_loss
    from flatlora_analysis.probe import ProbeSet
    from flatlora_analysis.sharpness import sharpness
    from flatlora_analysis.spaces import build_space

    half = half_copy(wide_model(arch))
    ref = upcast_copy(half)  # the same bfloat16-rounded values, computed in float32
    probe = ProbeSet.from_batches(tiny_batches("llama", 1, 8))
    space = build_space(ref, "merged")
    clean, grad = ModelObjective(ref, probe, space, torch.device("cpu")).loss_and_grad(None)
    weights = dict(half.named_parameters())
    base = [weights[e.key] for e in space.entries]
    # 0.45 of W0's bfloat16 spacing on every entry (below a power of two it halves), along the gradient's
    # signs: W0 + delta rounds back to W0 everywhere
    scale = [2.0 ** torch.floor(torch.log2(w.float().abs())) for w in base]
    ulp = [torch.finfo(BF16).eps * s / torch.where(w.float().abs() == s, 2.0, 1.0) for w, s in zip(base, scale)]
    parts = [0.45 * u * g.sign() for u, g in zip(ulp, space.split(grad))]
    assert all(torch.equal((w.float() + p).to(BF16), w) for w, p in zip(base, parts))  # the naive sum: no move
    delta = space.flatten(parts)
    expected = evaluate_loss(ref, probe, space="merged", delta=delta) - clean
    moved = evaluate_loss(half, probe, space="merged", delta=delta) - evaluate_loss(half, probe, space="merged")
    assert expected > 1e-3 and moved == pytest.approx(expected, rel=0.25)  # a rounded-away delta gives 0
    sam = [sharpness(m, probe, rho=0.05, kind="sam", space="merged") for m in (half, ref)]
    assert sam[0].value == pytest.approx(sam[1].value, rel=0.05)
    assert build_space(half, "merged").dtype == torch.float32 and dtypes(half, trainable=False) == {BF16}


def test_landscapes_on_a_bfloat16_base_and_the_all_space_refused(bf16_llama):
    from flatlora.testing import tiny_batches
    from flatlora_analysis.landscape import interpolate, landscape_1d
    from flatlora_analysis.objective import evaluate_loss
    from flatlora_analysis.probe import ProbeSet
    from flatlora_analysis.spaces import build_space

    model = copy.deepcopy(bf16_llama)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    probe = ProbeSet.from_batches(tiny_batches("llama", 1, 4))
    clean = evaluate_loss(model, probe, space="merged")
    assert landscape_1d(model, probe, steps=3, span=0.1).clean_loss == clean
    with model.disable_adapter():
        base_loss = evaluate_loss(model, probe, space="merged")
    line = interpolate(model, probe, None, steps=2, extend=0.0)  # t = 0: the base model, through a float32 -sBA
    assert line.z[0] == pytest.approx(base_loss, rel=1e-3) and line.z[-1] == pytest.approx(clean, rel=1e-3)
    with pytest.raises(FlatLoraError, match=r"the all space .* bfloat16.*--dtype float32"):
        build_space(model, "all")


def test_measures_load_a_runs_own_dtype_and_store_each_dtype_apart(tmp_path, csv_file, tiny_model_dir, monkeypatch):
    from flatlora.adapters import read_adapter_weights
    from flatlora_analysis.loading import load_model, measure_identity
    from flatlora_app import measures as app
    from flatlora_app.loaders import DTYPE_ENV, measure_defaults

    run = tmp_path / "run"
    train = ["train", "--method", "lora", "--dtype", "bfloat16", *classifier_args(csv_file, tiny_model_dir, run)]
    assert cli.main(train) == 0
    model, _ = load_model(run, device="cpu")  # the run's own dtype
    params = dict(model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n and "modules_to_save" not in n} == {BF16}
    saved = read_adapter_weights(run / "adapter")
    head = [k for k in saved if ".classifier." in k]
    for key in head:  # the trained head comes back exactly, in float32 (not through a bfloat16 copy)
        assert torch.equal(params[key.replace(".classifier.", ".classifier.modules_to_save.default.")], saved[key])
    assert head and dtypes(load_model(run, device="cpu", dtype="float32")[0], trainable=False) == {torch.float32}
    assert dtypes(load_model(run, device="cpu", dtype="float32")[0], trainable=False) == {torch.float32}

    assert measure_identity("abc") == "abc" and measure_identity("abc", None, "bfloat16") == "abc#bfloat16"
    out = tmp_path / "report"
    argv = ["report", str(run), "--out", str(out), "--quick", "--kinds", "sam", "--flatness", "none",
            "--trace-samples", "0", "--examples", "8", "--batch-size", "8", "--no-progress"]  # fmt: skip

    def stored() -> set[str]:
        return {p.name for folder in (out / "cache", run / "analysis") for p in folder.glob("result-*.json")}

    assert cli.main(argv) == 0
    first = stored()
    entry = json.loads((out / "report.json").read_text())["entries"][0]
    assert first and entry["dtype"] == "bfloat16"
    defaults = measure_defaults(str(tmp_path))  # the dashboard asks for the report's 1-D landscape
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert app.landscape(str(run), "1d", defaults, root=str(tmp_path)) is not None  # the run's own dtype
    monkeypatch.setenv(DTYPE_ENV, "float32")  # flatlora app --dtype float32: not served the bfloat16 one
    assert app.landscape(str(run), "1d", defaults, root=str(tmp_path)) is None
    assert cli.main([*argv, "--dtype", "float32"]) == 0  # measured anew, stored beside
    second = stored()
    assert len(second) == 2 * len(first) and first < second
    assert cli.main([*argv, "--dtype", "bfloat16"]) == 0  # the run's own: found
    assert stored() == second


def test_the_dashboard_measures_in_the_dtype_flatlora_app_is_given(monkeypatch):
    from flatlora_app.cli import app_command
    from flatlora_app.loaders import DTYPE_ENV, base_dtype

    assert app_command("runs", 8501, "127.0.0.1", "bfloat16")[-2:] == ["--dtype", "bfloat16"]
    assert "--dtype" not in app_command("runs", 8501, "127.0.0.1")
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert base_dtype() is None  # each run's own
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert base_dtype() == "bfloat16"
    monkeypatch.setattr("sys.argv", ["main.py", "--runs", "x", "--dtype", "float16"])
    assert base_dtype() == "float16"
