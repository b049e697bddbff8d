"""The few-shot protocol of LM-BFF (Gao et al. 2021): k per class for train and dev, a fixed test set."""

from __future__ import annotations

import random

from flatlora.data.dataset import TextDataset
from flatlora.errors import FlatLoraError

FEW_SHOT_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)
"""The five data seeds of LM-BFF; a result is reported as the mean (std) over them."""

TEST_SEED = 42
"""Seed that carves and caps test sets: fixed, so every few-shot seed sees the same test set."""

CARVED_TEST_FRACTION = 0.2
"""Share of a single-pool dataset (one file, the tweets) held out as its test set."""


def few_shot_split(train: TextDataset, k: int, seed: int, dev_k: int | None = None) -> tuple[TextDataset, TextDataset]:
    """Sample k training and `dev_k` (default k) development examples per class (LM-BFF).

    The pool's indices are shuffled with `random.Random(seed).shuffle`; walking that order,
    the first k examples of each class go to train and the next `dev_k` to dev. Both keep
    the shuffled order, never overlap, and hold the pool's own example objects.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlatLoraError(f"--shots {k!r} is invalid: pass a whole number k >= 1 of examples per class (or none)")
    dev_follows_k = dev_k is None
    dev_k = k if dev_k is None else dev_k
    if isinstance(dev_k, bool) or not isinstance(dev_k, int) or dev_k < 0:
        raise FlatLoraError(f"dev_k={dev_k!r} is invalid: pass an integer dev_k >= 0, or None for dev_k = k")
    if train.num_labels == 0:
        raise FlatLoraError(f"dataset {train.name!r} has no classes: load data with at least one label")
    needed = k + dev_k
    smallest_name, smallest = min(train.class_counts().items(), key=lambda item: item[1])
    if smallest < needed:
        largest_k = smallest // 2 if dev_follows_k else smallest - dev_k
        fix = (
            f"use k <= {largest_k}" if largest_k >= 1 else "add examples of that class, lower dev_k, or drop the class"
        )
        raise FlatLoraError(
            f"class {smallest_name!r} has {smallest} examples in {train.name!r}, fewer than"
            f" k={k} train + {dev_k} dev per class: {fix}"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    taken = [0] * train.num_labels
    train_indices: list[int] = []
    dev_indices: list[int] = []
    for index in order:
        label = train.examples[index].label
        if taken[label] < k:
            train_indices.append(index)
        elif taken[label] < needed:
            dev_indices.append(index)
        taken[label] += 1
    tag = f"{train.name}/k{k}-seed{seed}"
    return train.subset(train_indices, f"{tag}/train"), train.subset(dev_indices, f"{tag}/dev")


def cap_test(test: TextDataset, n: int | None, seed: int = TEST_SEED) -> TextDataset:
    """At most n test examples: a sample drawn with `random.Random(seed)`, in the original order.

    `n=None` or n >= len(test) returns `test` itself.
    """
    if n is None:
        return test
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FlatLoraError(f"test cap {n!r} is invalid: pass an integer >= 1, or None for no cap")
    if n >= len(test):
        return test
    kept = sorted(random.Random(seed).sample(range(len(test)), n))
    return test.subset(kept, f"{test.name}[cap={n}]")


def _carve_test(pool: TextDataset) -> tuple[TextDataset, TextDataset]:
    """Split a single pool into (rest, test) with `CARVED_TEST_FRACTION` held out by `TEST_SEED`."""
    test_size = round(len(pool) * CARVED_TEST_FRACTION)
    if test_size < 1 or test_size >= len(pool):
        raise FlatLoraError(
            f"dataset {pool.name!r} has only {len(pool)} examples, too few to hold out a test"
            f" set: add examples or give a separate test split (a GLUE folder with test.tsv)"
        )
    test_indices = set(random.Random(TEST_SEED).sample(range(len(pool)), test_size))
    rest = [i for i in range(len(pool)) if i not in test_indices]
    return pool.subset(rest, f"{pool.name}/pool"), pool.subset(sorted(test_indices), f"{pool.name}/test")


def make_few_shot(
    splits: dict[str, TextDataset],
    k: int,
    seed: int,
    test_cap: int | None = None,
    dev_k: int | None = None,
) -> dict[str, TextDataset]:
    """Build the LM-BFF few-shot splits {"train", "dev", "test"} from loaded splits.

    Train and dev are sampled per class from `splits["train"]` by `few_shot_split`; a
    loader's own "dev" split is not used. Test is `splits["test"]` when present; otherwise
    `CARVED_TEST_FRACTION` of the train pool is held out first (by `TEST_SEED`, so every
    few-shot seed sees the same test set and train/dev never touch it). `test_cap`
    then caps the test set with `cap_test`.
    """
    if "train" not in splits:
        raise FlatLoraError(
            f"no 'train' split among {', '.join(splits) or '(none)'}:"
            f" load data with load_data, or pass a dict with a 'train' TextDataset"
        )
    pool = splits["train"]
    test = splits.get("test")
    if test is None:
        pool, test = _carve_test(pool)
    elif test.label_names != pool.label_names:
        raise FlatLoraError(
            f"train labels {pool.label_names} differ from test labels {test.label_names}:"
            f" load both splits together (one folder or load_data) so they share label ids"
        )
    few_train, few_dev = few_shot_split(pool, k, seed, dev_k)
    return {"train": few_train, "dev": few_dev, "test": cap_test(test, test_cap)}
