"""Gradient checkpointing: training and measures give the numbers they give without it, on less memory."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import args_for, examples, trainable
from test_hf_trainer import OPTIONS  # each method's options, as the trainer tests give them
from transformers import default_data_collator

from flatlora import METHODS, FlatLoraError, make_method
from flatlora.checkpointing import enable_gradient_checkpointing, is_gradient_checkpointing
from flatlora.config import TrainConfig
from flatlora.testing import tiny_batches, tiny_model
from flatlora.trainer import FlatLoraTrainer, train_loop
from flatlora_analysis.checkpointing import (
    checkpoint_layers,
    checkpoint_loaded_models,
    checkpointing,
    checkpointing_meta,
    enable_checkpointing,
    is_checkpointing,
    suspended,
)
from flatlora_analysis.guard import measuring
from flatlora_analysis.hessian.operator import HessianOperator
from flatlora_analysis.micro_batch import saved_storage_bytes
from flatlora_analysis.objective import ModelObjective
from flatlora_analysis.probe import ProbeSet
from flatlora_analysis.spaces import build_space

STEPS = 3


class Counter:
    """Counts the forward calls of the model's first LoRA dropout (a recomputed layer runs it again)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        module = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (a checkpoint keeps its own)."""
    return saved_storage_bytes(fn)


# -- training --------------------------------------------------------------------------------


def train(arch: str, name: str, checkpointed: bool):
    model = tiny_model(arch, lora_dropout=0.1)
    if checkpointed:
        enable_gradient_checkpointing(model)
    counter = Counter(model)
    torch.manual_seed(5)  # the dropout masks
    kwargs = {"total_steps": STEPS, **OPTIONS[name]} if name != "lora" else {}
    method = make_method(name, model, lr=1e-2, **kwargs)
    logs = train_loop(model, method, tiny_batches(arch, 2), STEPS)
    return logs, trainable(model), counter.calls


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_the_same_adapter_under_checkpointing(arch, name):
    plain_logs, plain, plain_calls = train(arch, name, False)
    logs, adapter, calls = train(arch, name, True)
    assert calls > plain_calls  # the layers were recomputed in the backward passes
    for key in ("loss", "perturbed_loss"):
        want = [r[key] for r in plain_logs if key in r]
        assert [r[key] for r in logs if key in r] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert adapter.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(adapter[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", ["flat-lora", "eflat-lora", "rwp-lora"])
def test_the_hf_trainer_trains_the_same_adapter_under_checkpointing(tmp_path, name):
    data = examples()
    out = {}
    for checkpointed in (False, True):
        model = tiny_model("bert", lora_dropout=0.1)
        if checkpointed:
            enable_gradient_checkpointing(model)
        trainer = FlatLoraTrainer(
            model=model,
            args=args_for(tmp_path / str(checkpointed), learning_rate=1e-3),
            train_dataset=data,
            data_collator=default_data_collator,
            method=name,
            method_kwargs=OPTIONS[name],
        )
        trainer.train()
        assert is_gradient_checkpointing(model) is checkpointed
        out[checkpointed] = (trainable(model), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    (plain, plain_losses), (adapter, losses) = out[False], out[True]
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for key in plain:
        torch.testing.assert_close(adapter[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_checkpointed_training_saves_less_for_backward():
    model = tiny_model("llama", lora_dropout=0.1).train()
    batch = tiny_batches("llama", 1)[0]
    plain = saved_bytes(lambda: model(**batch).loss)
    enable_gradient_checkpointing(model)
    assert saved_bytes(lambda: model(**batch).loss) < plain / 2


def test_gradient_checkpointing_is_not_part_of_a_runs_identity():
    from flatlora.cli import build_parser

    assert TrainConfig(gradient_checkpointing=True).hparams() == TrainConfig().hparams()
    args = build_parser().parse_args(["train", "--out", "x", "--gradient-checkpointing"])
    assert TrainConfig.from_namespace(args).gradient_checkpointing is True
    assert build_parser().parse_args(["train", "--out", "x"]).gradient_checkpointing is False


def test_train_cli_checkpoints_and_matches_the_run_without(tmp_path, tiny_runs_source, csv_file, tiny_model_dir):
    from analysis_fixtures import train_tiny_runs
    from safetensors.torch import load_file

    from flatlora.runs import load_run

    # the session's flat-lora run, trained again with the same options and --gradient-checkpointing
    train_tiny_runs(tmp_path, csv_file, tiny_model_dir, methods=("flat-lora",), extra=("--gradient-checkpointing",))
    plain, run = load_run(tiny_runs_source / "flat-lora-seed1"), load_run(tmp_path / "flat-lora-seed1")
    assert run.info["gradient_checkpointing"] is True and "gradient_checkpointing" not in plain.info
    assert run.info["hparams"] == plain.info["hparams"]
    want = load_file(plain.adapter_path / "adapter_model.safetensors")
    got = load_file(run.adapter_path / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    losses = [[json.loads(line)["loss"] for line in (r.path / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for r in (plain, run)]  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(FlatLoraError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# -- measures ---------------------------------------------------------------------------------


def measured(model: torch.nn.Module, probe: ProbeSet, space_name: str, checkpointed: bool) -> dict:
    """Hessian products (double backward, one and a block; finite differences) and a gradient off the clean point."""
    out = {}
    with measuring(model) as device, checkpointing(model, checkpointed):
        space = build_space(model, space_name)
        objective = ModelObjective(model, probe, space, device)
        g = torch.Generator().manual_seed(0)
        V = torch.randn(space.dim, 2, generator=g, dtype=torch.float64)
        delta = 0.05 * torch.randn(space.dim, generator=g, dtype=torch.float64)
        with HessianOperator(objective, "autograd", retain_graph=True) as op:
            out["hv"] = op.matvec(V[:, 0])
            out["meta"] = {**op.meta, **checkpointing_meta(model)}  # where HessianOperator.meta would record it
        with HessianOperator(objective, "autograd", retain_graph=False, block_size=2) as op:
            out["block"] = op.matmat(V)
        with HessianOperator(objective, "fd") as op:
            out["fd"] = op.matvec(V[:, 0])
        out["loss"], out["grad"] = objective.loss_and_grad(delta)
        assert all(not m.training for m in model.modules())  # eval mode: dropout stays off
    return out


@pytest.mark.parametrize(("arch", "space_name"), [("llama", "lora"), ("llama", "merged"), ("gpt2", "lora")])
def test_hessian_products_through_checkpoints_equal_the_plain_ones(arch, space_name):
    # gpt2 passes its KV cache to each block by position: dropped too, or the recompute would append to it
    model = tiny_model(arch, lora_dropout=0.5).double()
    with torch.no_grad():  # B away from zero, so that the LoRA space has curvature in every direction
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    probe = ProbeSet.from_batches(tiny_batches(arch, 2, 4))
    counter = Counter(model)
    plain = measured(model, probe, space_name, False)
    plain_calls, counter.calls = counter.calls, 0
    got = measured(model, probe, space_name, True)
    assert counter.calls > plain_calls  # the layers were recomputed
    assert not is_checkpointing(model)  # the context put the layers back
    assert got["meta"]["checkpointing"]["layers"] == 2 and "checkpointing" not in plain["meta"]
    for key in ("hv", "block", "fd", "grad"):
        torch.testing.assert_close(got[key], plain[key], rtol=1e-10, atol=1e-12, msg=key)
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-12)


def test_measures_checkpoint_in_eval_mode_and_save_less():
    model = tiny_model("llama").double().eval()
    probe = ProbeSet.from_batches(tiny_batches("llama", 1, 4))
    space = build_space(model, "lora")
    leaves = [d.requires_grad_(True) for d in space.split(space.zeros())]

    def loss():
        return probe.batch_loss(model, probe.batches[0], space.overrides(leaves))

    plain = saved_bytes(loss)
    assert enable_checkpointing(model) == 2 and enable_checkpointing(model) == 2  # twice changes nothing
    assert saved_bytes(loss) < plain / 2
    with suspended():  # for double backward, where checkpoints save nothing: the layers run plain
        assert saved_bytes(loss) == plain
    with torch.no_grad():  # no backward, no checkpoint: the forward runs as it is
        assert saved_bytes(loss) == 0


def test_an_instance_level_forward_is_wrapped_and_put_back():
    # accelerate's dispatch hooks set a layer's forward on the instance: it must still run, and return after
    model = tiny_model("llama").double()
    layer = checkpoint_layers(model)[0]
    calls = []

    def hooked(*args, **kwargs):
        calls.append(1)
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = hooked
    batch = tiny_batches("llama", 1, 2)[0]
    with checkpointing(model):
        model(**batch).loss.backward()
    assert len(calls) == 2  # the forward, and its recompute in the backward
    assert layer.forward is hooked


def test_a_model_without_transformer_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert checkpoint_layers(model) == []
    with pytest.raises(FlatLoraError, match="no transformer layers to checkpoint: drop --gradient-checkpointing"):
        enable_checkpointing(model)


def test_report_and_landscape_checkpoint_the_models_they_load(monkeypatch, tmp_path, tiny_model_dir):
    import flatlora_analysis.loading as loading
    from flatlora import cli
    from flatlora.models import load_classifier

    adapter = tmp_path / "adapter"
    load_classifier(tiny_model_dir, num_labels=2)[0].save_pretrained(adapter)
    with checkpoint_loaded_models():
        assert is_checkpointing(loading.load_model(adapter, tiny_model_dir, device="cpu")[0])
    assert not is_checkpointing(loading.load_model(adapter, tiny_model_dir, device="cpu")[0])

    class LoadedError(Exception):
        """The spy's stop, carrying whether the model the command loaded is checkpointed."""

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)[0]
        raise LoadedError(is_checkpointing(model))

    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", load_model)
    for command in (["landscape", str(adapter)], ["report", str(adapter), "--out", str(tmp_path / "r")]):
        for flag in ([], ["--gradient-checkpointing"]):
            with pytest.raises(LoadedError) as loaded:
                cli.main([*command, "--base-model", tiny_model_dir, "--data", "tweets", "--no-progress", *flag])
            assert loaded.value.args[0] is bool(flag), command
