"""The log keys live in one module: every key a method or the Trainer logs is named there."""

from __future__ import annotations

from flatlora import METHODS, log_keys, make_method
from flatlora.testing import tiny_batches, tiny_model
from flatlora.trainer import train_loop


def test_every_key_a_method_logs_is_a_documented_constant():
    logged: set[str] = set()
    for name in METHODS:
        model = tiny_model("bert")
        options = {"diagnostics_every": 1} if name == "eflat-lora" else {}
        method = make_method(name, model, total_steps=4, **options)
        for record in train_loop(model, method, tiny_batches("bert", 2), 2):
            logged |= set(record)
    assert logged - {log_keys.STEP, log_keys.LR} <= log_keys.METHOD_KEYS
    assert log_keys.METHOD_KEYS - logged == set()  # nothing documented that no method writes


def test_each_key_constant_is_unique():
    constants = {k: v for k, v in vars(log_keys).items() if k.isupper() and isinstance(v, str)}
    assert len(set(constants.values())) == len(constants)
    assert log_keys.final_key("test", "accuracy") == "test_accuracy"
