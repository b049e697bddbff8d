"""The HF Trainer integration: same results as the plain loop, accumulation, resume, logs, refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import STEPS, args_for, examples, trainable
from transformers import TrainerCallback, default_data_collator

from flatlora import METHODS, FlatLoraError, make_method
from flatlora.testing import tiny_model
from flatlora.trainer import FlatLoraTrainer, train_loop

OPTIONS = {
    "lora": {},
    "lora-sam": {"rho": 0.05},
    "flat-lora": {"rho": 0.05},
    "eflat-lora": {"rho": 0.05, "beta": 0.8},
    "rwp-lora": {"rho": 0.05, "seed": 3},
    "bar": {"rho": 0.05},
}


class StopAt(TrainerCallback):
    """Stops training after a given step, as a killed run would (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run_trainer(tmp_path, name, data, model=None, resume=None, stop_at=None, **arg_overrides):
    model = model or tiny_model("bert")
    trainer = FlatLoraTrainer(
        model=model,
        args=args_for(tmp_path, **arg_overrides),
        train_dataset=data,
        data_collator=default_data_collator,
        method=name,
        method_kwargs=OPTIONS[name],
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_reproduces_the_plain_loop(tmp_path, name):
    # lr 1e-3: Adam's first steps are nearly sign(g), so float32 rounding differences between
    # the Trainer's loss normalisation and the model's mean grow in proportion to lr.
    data = examples()
    model, trainer = run_trainer(tmp_path, name, data, learning_rate=1e-3)

    ref_model = tiny_model("bert")
    kwargs = {"total_steps": STEPS, **OPTIONS[name]} if name != "lora" else {}
    ref = make_method(name, ref_model, lr=1e-3, optimizer_kwargs={"weight_decay": 0.0}, **kwargs)
    batches = [default_data_collator(data[i : i + 8]) for i in range(0, len(data), 8)]
    ref_logs = train_loop(ref_model, ref, batches, STEPS)

    got, want = trainable(model), trainable(ref_model)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(history) == STEPS
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in ref_logs], abs=1e-5)
    if name != "lora":
        assert [h["rho"] for h in history] == pytest.approx([r["rho"] for r in ref_logs])
    assert all("balancedness" in h for h in history)
    if METHODS[name].two_pass:
        want_perturbed = [r["perturbed_loss"] for r in ref_logs]
        assert [h["perturbed_loss"] for h in history] == pytest.approx(want_perturbed, abs=1e-5)


@pytest.mark.parametrize("name", ["lora", "eflat-lora", "rwp-lora"])
def test_gradient_accumulation_2x8_matches_batch_16(tmp_path, name):
    # rwp-lora: its noise is drawn once per optimizer step and held across micro-batches
    data = examples(4)
    common = dict(optim="sgd", max_steps=2)
    big, _ = run_trainer(tmp_path / "a", name, data, per_device_train_batch_size=16, **common)
    acc, _ = run_trainer(
        tmp_path / "b", name, data, per_device_train_batch_size=8, gradient_accumulation_steps=2, **common
    )
    for key, value in trainable(big).items():
        torch.testing.assert_close(trainable(acc)[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["eflat-lora", "rwp-lora", "flat-lora"])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(tmp_path, name):
    data = examples()
    full, _ = run_trainer(tmp_path / "full", name, data)
    run_trainer(tmp_path / "half", name, data, save_strategy="steps", save_steps=STEPS // 2, stop_at=STEPS // 2)
    checkpoint = tmp_path / "half" / "out" / f"checkpoint-{STEPS // 2}"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, trainer = run_trainer(tmp_path / "half", name, data, resume=str(checkpoint))
    assert trainer.method.steps_done == STEPS
    for key, value in trainable(full).items():
        assert torch.equal(trainable(resumed)[key], value), key


def test_eflat_theorem2_diagnostics_reach_the_log_history(tmp_path):
    data = examples()
    model = tiny_model("bert")
    trainer = FlatLoraTrainer(
        model=model,
        args=args_for(tmp_path),
        train_dataset=data,
        data_collator=default_data_collator,
        method="eflat-lora",
        method_kwargs={"rho": 0.05, "diagnostics_every": 2},
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert ["t2_rel_error" in h for h in history] == [True, False] * (STEPS // 2)
    assert all(h["t2_rel_error"] >= 0 for h in history if "t2_rel_error" in h)


def test_trainer_refuses_what_it_cannot_honour(tmp_path):
    model = tiny_model("bert")
    data = examples(1)
    with pytest.raises(FlatLoraError, match="TrainingArguments"):
        FlatLoraTrainer(
            model=model, args=args_for(tmp_path), train_dataset=data, method="flat-lora", method_kwargs={"lr": 0.1}
        )
    with pytest.raises(FlatLoraError, match="not optimizers="):
        FlatLoraTrainer(
            model=model,
            args=args_for(tmp_path),
            train_dataset=data,
            method="lora",
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    with pytest.raises(FlatLoraError, match="perturbation_sync"):
        FlatLoraTrainer(model=model, args=args_for(tmp_path), train_dataset=data, perturbation_sync="ring")
    with pytest.raises(FlatLoraError, match="unknown method"):
        FlatLoraTrainer(model=model, args=args_for(tmp_path), train_dataset=data, method="adam-sam")


@pytest.mark.parametrize("name", ["flat-lora", "eflat-lora"])
def test_bf16_autocast_trains_with_clean_fp32_weights(tmp_path, name):
    data = examples()
    model = tiny_model("bert")
    before = trainable(model)
    _, trainer = run_trainer(tmp_path, name, data, model=model, bf16=True, max_steps=4)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = trainable(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert trainer.method.steps_skipped == 0 and not trainer.method.perturbed


def _summed_cross_entropy(outputs, labels, num_items_in_batch=None):
    loss = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


@pytest.mark.parametrize("how", ["label_smoothing", "compute_loss_func"])
@pytest.mark.parametrize("name", ["lora", "flat-lora", "eflat-lora"])
def test_label_smoothing_and_a_custom_loss_train_as_under_the_stock_trainer(tmp_path, name, how):
    from transformers import Trainer

    data = examples()
    arg_overrides = {"label_smoothing_factor": 0.1} if how == "label_smoothing" else {}
    trainer_kwargs = {"compute_loss_func": _summed_cross_entropy} if how == "compute_loss_func" else {}
    options = {**OPTIONS[name], "diagnostics_every": 1} if name == "eflat-lora" else OPTIONS[name]
    model = tiny_model("bert")
    trainer = FlatLoraTrainer(
        model=model,
        args=args_for(tmp_path / "ours", learning_rate=1e-3, **arg_overrides),
        train_dataset=data,
        data_collator=default_data_collator,
        method=name,
        method_kwargs=options,
        **trainer_kwargs,
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(history) == STEPS and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    if name == "eflat-lora":
        assert all("t2_rel_error" in h for h in history)
    if name == "lora":  # the same arguments under the stock Trainer give the same adapter
        stock_model = tiny_model("bert")
        Trainer(
            model=stock_model,
            args=args_for(tmp_path / "stock", learning_rate=1e-3, **arg_overrides),
            train_dataset=data,
            data_collator=default_data_collator,
            **trainer_kwargs,
        ).train()
        for key, value in trainable(stock_model).items():
            torch.testing.assert_close(trainable(model)[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("name", "options"),
    [("rwp-lora", OPTIONS["rwp-lora"]), ("eflat-lora", {"rho": 0.05, "rho_schedule": "cosine", "rho_min": 0.01})],
)
def test_epoch_based_training_knows_its_step_count(tmp_path, name, options):
    # 24 examples in batches of 8: two epochs are the same 6 steps as max_steps=6
    data = examples()

    def run(folder, **overrides):
        model = tiny_model("bert")
        trainer = FlatLoraTrainer(
            model=model,
            args=args_for(tmp_path / folder, **overrides),
            train_dataset=data,
            data_collator=default_data_collator,
            method=name,
            method_kwargs=options,
        )
        trainer.train()
        return model, trainer

    by_epochs, trainer = run("epochs", max_steps=-1, num_train_epochs=2)
    by_steps, _ = run("steps")
    assert trainer.method.schedule.total_steps == STEPS and trainer.method.steps_done == STEPS
    for key, value in trainable(by_steps).items():
        assert torch.equal(trainable(by_epochs)[key], value), key


@pytest.mark.parametrize("name", ["lora", "eflat-lora"])
def test_train_called_twice_continues_with_the_same_method(tmp_path, name):
    from transformers import Trainer

    data = examples()
    model, trainer = run_trainer(tmp_path / "ours", name, data, learning_rate=1e-3)
    method = trainer.method
    trainer.train()
    assert trainer.method is method and method.steps_done == 2 * STEPS
    if name == "lora":  # as the stock Trainer does: the second call goes on with the same optimizer
        stock_model = tiny_model("bert")
        stock = Trainer(
            model=stock_model,
            args=args_for(tmp_path / "stock", learning_rate=1e-3),
            train_dataset=data,
            data_collator=default_data_collator,
        )
        stock.train()
        stock.train()
        for key, value in trainable(stock_model).items():
            torch.testing.assert_close(trainable(model)[key], value, rtol=0, atol=1e-6, msg=key)


def test_theorem2_check_runs_in_train_mode_on_the_first_step_and_after_evaluations(tmp_path):
    # with dropout, the check's EMA-point loss replays the step's own masks only in train mode
    data = examples()
    model = tiny_model("bert", lora_dropout=0.3)
    model.eval()  # as from_pretrained leaves a model
    trainer = FlatLoraTrainer(
        model=model,
        args=args_for(tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=data,
        eval_dataset=examples(1),
        data_collator=default_data_collator,
        method="eflat-lora",
        method_kwargs={"rho": 0.05, "diagnostics_every": 1},
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(history) == STEPS
    assert [h["t2_ema_loss"] for h in history] == pytest.approx([h["loss"] for h in history], abs=1e-6)


def test_optimizer_kwargs_are_refused_where_a_base_optimizer_is_given(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(FlatLoraError, match=r"optimizer_kwargs.*TrainingArguments") as info:
        FlatLoraTrainer(
            model=model,
            args=args_for(tmp_path),
            train_dataset=examples(1),
            method="eflat-lora",
            method_kwargs={"optimizer_kwargs": {"weight_decay": 0.1}},
        )
    assert "\n" not in str(info.value)
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(FlatLoraError, match="optimizer_kwargs"):
        make_method("lora", model, base_optimizer=base, optimizer_kwargs={"momentum": 0.9})
    with pytest.raises(FlatLoraError, match="optimizer_cls"):
        make_method("lora", model, base_optimizer=base, optimizer_cls=torch.optim.Adam)


def test_fp16_on_cpu_trains_under_autocast_with_a_loss_scaler(tmp_path):
    model = tiny_model("bert")
    before = trainable(model)
    dtypes = set()
    hook = model.base_model.model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype)
    )
    _, trainer = run_trainer(tmp_path, "eflat-lora", examples(), model=model, fp16=True, max_steps=3)
    hook.remove()
    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler)
    assert dtypes == {torch.float16}
    after = trainable(model)
    assert all(v.dtype == torch.float32 for v in after.values()) and any(
        not torch.equal(after[k], before[k]) for k in before
    )
    assert trainer.method.steps_done == 3 and not trainer.method.perturbed


def test_fp16_refused_in_one_line_where_cpu_autocast_lacks_it(tmp_path, monkeypatch):
    import flatlora.precision

    monkeypatch.setattr(flatlora.precision, "cpu_fp16_autocast_available", lambda: False)
    with pytest.raises(FlatLoraError, match=r"fp16 needs float16 autocast.*bf16 or fp32"):
        run_trainer(tmp_path, "lora", examples(1), fp16=True)


def _tiny_loss(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs.logits.float(), labels) * 1e-5


def test_fp16_first_pass_goes_through_the_loss_scaler(tmp_path):
    # a small loss: unscaled, its fp16 activation gradients underflow and the perturbation vanishes
    trainer = FlatLoraTrainer(
        model=tiny_model("bert"),
        args=args_for(tmp_path, fp16=True, max_steps=3, learning_rate=1e-3),
        train_dataset=examples(),
        data_collator=default_data_collator,
        method="flat-lora",
        method_kwargs={"rho": 0.05},
        compute_loss_func=_tiny_loss,
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert history[0]["realized_norm"] == pytest.approx(0.05, rel=1e-3)  # B = 0: the whole radius
    assert all(h["realized_norm"] > 0.01 for h in history)


@pytest.mark.parametrize("name", ["lora", "flat-lora", "eflat-lora"])
def test_fp16_steps_the_scaler_skips_are_counted_and_logged_as_in_the_plain_loop(tmp_path, name):
    model = tiny_model("bert")
    trainer = FlatLoraTrainer(
        model=model,
        args=args_for(tmp_path, fp16=True),
        train_dataset=examples(),
        data_collator=default_data_collator,
        method=name,
        method_kwargs=OPTIONS[name],
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**21)  # overflows at first
    trainer.train()
    method = trainer.method
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    skipped = [h["skipped"] for h in history]
    assert method.steps_done == STEPS and 1 <= method.steps_skipped < STEPS
    assert sum(skipped) == method.steps_skipped and skipped[0] == 1.0
    # every record carries what the plain loop logs for a step, skipped or not
    ref_model = tiny_model("bert")
    ref = make_method(name, ref_model, total_steps=STEPS, **OPTIONS[name])
    batch = default_data_collator(examples(1))
    plain = ref.train_step(lambda: ref_model(**batch).loss * float("inf"))
    assert plain["skipped"] == 1.0
    expected = {k for k, v in plain.items() if not isinstance(v, list)}
    for record in history:
        assert expected <= set(record), expected - set(record)
