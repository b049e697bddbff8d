"""Causal-LM fine-tuning: E2E data, (prompt, target) encoding, the token-mean loss, training, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import snapshot

from flatlora import cli
from flatlora.data.causal import (
    BUNDLED_E2E,
    CausalLMDataset,
    PromptTarget,
    cap_groups,
    few_shot_groups,
    load_causal_data,
    load_prompt_table,
)
from flatlora.data.lm_encode import IGNORE_INDEX, CausalLMCollator, encode_dataset, encode_prompt
from flatlora.errors import FlatLoraError

pytest.importorskip("gguf", reason="causal-LM tests use the default LLM's tokenizer (pip install gguf)")


@pytest.fixture
def pairs_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    rows = ["prompt,target"] + [f"say {i},number {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(20)]
    rows += ["say 0,zero"]  # a second reference of the first prompt
    path.write_text("\n".join(rows) + "\n")
    return path


# ----------------------------------------------------------------------------- data


def test_the_bundled_e2e_copy_is_the_official_files_grouped_by_mr():
    splits = load_causal_data("e2e")
    assert set(splits) == {"train", "test"}  # no trainset.csv: devset.csv is the training pool
    assert len(splits["train"]) == 4672 and len(splits["train"].groups()) == 547
    assert len(splits["test"]) == 4693 and len(splits["test"].groups()) == 630
    assert (BUNDLED_E2E / "README.md").read_text().count("CC BY-SA 4.0") >= 1
    prompt, refs = splits["test"].groups()[0]
    assert prompt.startswith("name[") and len(refs) > 1 and all(refs)


def test_few_shot_takes_k_prompts_with_all_their_references_by_seed():
    pool = load_causal_data("e2e")["train"]
    train, dev = few_shot_groups(pool, 3, seed=13)
    again, _ = few_shot_groups(pool, 3, seed=13)
    other, _ = few_shot_groups(pool, 3, seed=21)
    assert len(train.groups()) == 3 and len(dev.groups()) == 3
    assert train.examples == again.examples and train.examples != other.examples
    assert not {p for p, _ in train.groups()} & {p for p, _ in dev.groups()}
    full = dict(pool.groups())
    for prompt, refs in train.groups():
        assert refs == full[prompt]  # every reference of a sampled MR is a training pair
    capped = cap_groups(load_causal_data("e2e")["test"], 7)
    assert len(capped.groups()) == 7 and cap_groups(capped, 7) is capped
    with pytest.raises(FlatLoraError, match="--shots"):
        few_shot_groups(pool, 300, seed=13)


def test_tables_give_pairs_or_plain_texts_and_refuse_what_is_missing(tmp_path, pairs_csv):
    data = load_prompt_table(pairs_csv)
    assert len(data) == 21 and dict(data.groups())["say 0"] == ["number 0 is even", "zero"]
    plain = load_prompt_table(pairs_csv, text_column="target")
    assert all(e.prompt == "" for e in plain) and len(plain.groups()) == 21
    with pytest.raises(FlatLoraError, match=r"no column 'nope'.*--prompt-column"):
        load_prompt_table(pairs_csv, prompt_column="nope")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": "  "}\n')
    with pytest.raises(FlatLoraError, match=r"line 2 .* empty target"):
        load_prompt_table(empty)


# ----------------------------------------------------------------------------- encoding


def test_labels_are_the_target_and_eos_only_prompts_use_the_chat_template(llm_tokenizer):
    tok = llm_tokenizer
    data = CausalLMDataset([PromptTarget("name[Aromi]", "Aromi is a pub."), PromptTarget("name[X]", "X.")])
    encoded = encode_dataset(data, tok, 128)
    row = encoded[0]
    prompt_ids = encode_prompt(tok, "name[Aromi]")
    target_ids = tok("Aromi is a pub.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == prompt_ids + target_ids
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert "<|im_start|>user\nname[Aromi]<|im_end|>" in tok.decode(prompt_ids)
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    plain = encode_prompt(tok, "name[Aromi]", chat_template=False)
    assert tok.decode(plain) == "name[Aromi]\n"
    batch = CausalLMCollator(tok.pad_token_id)([encoded[0], encoded[1]])
    short = len(encoded[1]["input_ids"])
    assert batch["attention_mask"][1, short:].sum() == 0 and (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert encoded.scored_tokens() == int((batch["labels"] != IGNORE_INDEX).sum())


def test_a_long_prompt_is_cut_a_target_that_cannot_fit_is_refused(llm_tokenizer):
    tok = llm_tokenizer
    target = "The Eagle is a coffee shop."
    target_len = len(tok(target, add_special_tokens=False)["input_ids"]) + 1
    data = CausalLMDataset([PromptTarget("word " * 200, target)])
    encoded = encode_dataset(data, tok, 64)
    assert encoded.truncated_prompts == 1 and len(encoded[0]["input_ids"]) == 64
    assert sum(t != IGNORE_INDEX for t in encoded[0]["labels"]) == target_len  # the target is whole
    with pytest.raises(FlatLoraError, match=rf"cannot fit --max-length {target_len}.*--max-length {target_len + 1}"):
        encode_dataset(data, tok, target_len)


def test_split_loss_is_the_mean_over_target_tokens_of_uneven_batches(tmp_path, tiny_llama_dir, pairs_csv):
    from flatlora.experiment import TrainConfig, train_run

    out = tmp_path / "run"
    config = TrainConfig(
        method="lora", data=str(pairs_csv), model=tiny_llama_dir, shots=3, steps=2, batch_size=2,
        eval_batch_size=3, test_cap=None, progress=False, lora_dropout=0.0,
    )  # fmt: skip
    run = train_run(config, out)
    assert run.info["task"] == "causal-lm"
    from flatlora.adapters import load_adapter
    from flatlora.causal_lm import load_base_causal_lm
    from flatlora.tasks.causal import encode_splits, prepare_causal_data

    model, tok = load_adapter(out / "adapter", base_model=tiny_llama_dir)
    resolved = __import__("dataclasses").replace(config, task="causal-lm")
    encoded = encode_splits(resolved, prepare_causal_data(resolved), load_base_causal_lm(tiny_llama_dir)[1])
    total = count = 0.0
    with torch.no_grad():
        for row in encoded["test"]:  # one example at a time, float64 sums
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            keep = labels != IGNORE_INDEX
            total += -logp[keep.nonzero()[:, 0], labels[keep]].sum().item()
            count += keep.sum().item()
    assert run.final["test_loss"] == pytest.approx(total / count, rel=1e-5)
    assert run.final["test_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert tok is not None


@pytest.mark.parametrize("method", ["lora", "lora-sam", "flat-lora", "eflat-lora", "rwp-lora", "bar"])
def test_every_method_trains_a_llama_style_causal_lm(tmp_path, tiny_llama_dir, pairs_csv, method):
    out = tmp_path / "run"
    code = cli.main(
        ["train", "--method", method, "--data", str(pairs_csv), "--model", tiny_llama_dir, "--shots", "3",
         "--steps", "3", "--batch-size", "2", "--log-every", "1", "--no-progress", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["task"] == "causal-lm" and info["data"]["task"] == "causal-lm"
    assert math.isfinite(info["metrics"]["test_loss"]) and info["metrics"]["test_perplexity"] > 1
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "train"] == [1, 2, 3]


def test_gpt2_conv1d_trains_with_eflat_lora_and_resumes(tmp_path, tiny_gpt2_dir, pairs_csv):
    out = tmp_path / "run"
    args = ["train", "--method", "eflat-lora", "--data", str(pairs_csv), "--model", tiny_gpt2_dir, "--shots", "3",
            "--batch-size", "2", "--save-every", "2", "--no-progress", "--no-chat-template",
            "--out", str(out)]  # fmt: skip
    assert cli.main([*args, "--steps", "4"]) == 0
    info = json.loads((out / "run.json").read_text())
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is True and adapter["target_modules"] == ["c_attn"]
    assert info["hparams"]["chat_template"] is False and info["chat_template_used"] is False
    assert info["metrics"]["test_loss"] > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prompt-column", "nope"], "no column 'nope'"),
        (["--task", "classification"], "causal-LM data set.*--task causal-lm"),
        (["--generate", "2", "--num-beams", "0"], "--num-beams must be a whole number >= 1"),
        (["--generate", "2", "--max-new-tokens", "0"], "--max-new-tokens must be"),
        (["--generate", "-1"], "--generate must be"),
        (["--max-length", "4"], "cannot fit --max-length 4"),
        (["--gguf-file", "missing.gguf"], "GGUF file missing.gguf not found"),
        (["--target-modules", "nosuchmodule"], "no module named nosuchmodule.*--target-modules"),
        (["--label-column", "target"], "no text column"),  # a label column means classification
    ],
)
def test_causal_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, tiny_llama_dir, pairs_csv, capsys, extra, match
):
    import re

    out = tmp_path / "run"
    args = ["train", "--data", str(pairs_csv), "--model", tiny_llama_dir, "--shots", "3", "--steps", "1",
            "--no-progress", "--out", str(out), *extra]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert snapshot(out) == {}


def test_classification_data_and_options_are_refused_for_the_other_task(tmp_path, csv_file, tiny_model_dir, capsys):
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--steps", "1", "--no-progress", "--out", str(out)]
    assert cli.main(["train", "--task", "causal-lm", "--data", str(csv_file), *common]) == 2
    assert "classification data set" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(csv_file), "--generate", "3", *common]) == 2
    assert "--generate apply to causal-LM runs only" in capsys.readouterr().err
    assert cli.main(["train", "--task", "causal-lm", "--data", "tweets", *common]) == 2
    assert "classification data set" in capsys.readouterr().err
    assert (
        cli.main(["train", "--data", str(csv_file), "--shots", "4", "--target-modules", "nosuchmodule", *common]) == 2
    )
    assert "no module named nosuchmodule" in capsys.readouterr().err
    assert snapshot(out) == {}
