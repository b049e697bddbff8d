"""Causal-LM data: (prompt, target) pairs grouped by prompt, the E2E NLG folder, few-shot by prompt.

A :class:`CausalLMDataset` holds supervised fine-tuning pairs. Pairs that share a prompt form
a *group* (E2E: one meaning representation, MR, with its several human references), so a
test set gives each prompt all its references for multi-reference scoring. A dataset with
no prompt (plain language modelling, ``--text-column`` alone) has one group per text.

Sources: an E2E folder (``trainset.csv`` and/or ``devset.csv``, ``testset_w_refs.csv``; columns
``mr``, ``ref``), the copy of E2E bundled with the package (``e2e``), and any CSV/TSV/JSONL file
with prompt/target columns (or a text column).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flatlora.data.few_shot import CARVED_TEST_FRACTION, TEST_SEED
from flatlora.data.tables import TABLE_SUFFIXES, _read_table
from flatlora.errors import FlatLoraError

E2E_TRAIN, E2E_DEV, E2E_TEST = "trainset.csv", "devset.csv", "testset_w_refs.csv"
E2E_FILES = (E2E_TRAIN, E2E_DEV, E2E_TEST)
BUNDLED_E2E = Path(__file__).resolve().parent / "e2e"
"""The E2E NLG copy shipped with flatlora (devset.csv, testset_w_refs.csv; CC BY-SA 4.0, see its README)."""

PROMPT_TARGET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("prompt", "target"),
    ("prompt", "completion"),
    ("mr", "ref"),
    ("source", "target"),
    ("input", "output"),
    ("instruction", "response"),
)
"""Header pairs read as (prompt, target), tried in this order when no column is named."""

CAUSAL_LM, CLASSIFICATION = "causal-lm", "classification"
TASKS = (CLASSIFICATION, CAUSAL_LM)


@dataclass(frozen=True, slots=True)
class PromptTarget:
    """One supervised pair: the model reads ``prompt`` and learns ``target`` ("" prompt: plain LM)."""

    prompt: str
    target: str


@dataclass
class CausalLMDataset:
    """(prompt, target) pairs; pairs with an identical prompt are one group (its references)."""

    examples: list[PromptTarget]
    name: str = "data"

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptTarget:
        return self.examples[index]

    def __iter__(self) -> Iterator[PromptTarget]:
        return iter(self.examples)

    def groups(self) -> list[tuple[str, list[str]]]:
        """(prompt, references) per distinct prompt, in order of first appearance; plain LM: one per text."""
        if all(not example.prompt for example in self.examples):
            return [("", [example.target]) for example in self.examples]
        grouped: dict[str, list[str]] = {}
        for example in self.examples:
            grouped.setdefault(example.prompt, []).append(example.target)
        return list(grouped.items())

    def subset_groups(self, indices: Iterable[int], name: str | None = None) -> CausalLMDataset:
        """The pairs of the groups at ``indices`` (positions in :meth:`groups`), in that order."""
        groups = self.groups()
        examples = [PromptTarget(groups[i][0], ref) for i in indices for ref in groups[i][1]]
        return CausalLMDataset(examples, name or self.name)


# ----------------------------------------------------------------------------- loading


def is_e2e_folder(path: str | Path) -> bool:
    """A folder holding at least one of the official E2E files."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in E2E_FILES)


def load_e2e_folder(path: str | Path) -> dict[str, CausalLMDataset]:
    """The official E2E files of ``path`` as {"train", "dev"?, "test"?} (MR -> reference pairs).

    The training pool is ``trainset.csv`` where present, else ``devset.csv``; ``devset.csv``
    is the dev split only beside a ``trainset.csv``; the test split is ``testset_w_refs.csv``.
    """
    folder = Path(path)
    present = {name for name in E2E_FILES if (folder / name).is_file()}
    pool = E2E_TRAIN if E2E_TRAIN in present else E2E_DEV if E2E_DEV in present else None
    if pool is None:
        raise FlatLoraError(
            f"E2E folder {folder} has no {E2E_TRAIN} or {E2E_DEV}: put the official training or development set in it"
        )
    splits = {"train": _load_pairs(folder / pool, "mr", "ref", None, f"e2e/{Path(pool).stem}")}
    if pool == E2E_TRAIN and E2E_DEV in present:
        splits["dev"] = _load_pairs(folder / E2E_DEV, "mr", "ref", None, "e2e/devset")
    if E2E_TEST in present:
        splits["test"] = _load_pairs(folder / E2E_TEST, "mr", "ref", None, "e2e/testset")
    return splits


def load_prompt_table(
    path: str | Path,
    prompt_column: str | None = None,
    target_column: str | None = None,
    text_column: str | None = None,
) -> CausalLMDataset:
    """One CSV/TSV/JSONL file of (prompt, target) pairs, or of texts for plain language modelling.

    Columns: the given ones, else the first pair of :data:`PROMPT_TARGET_COLUMNS` found;
    ``text_column`` alone means plain language modelling (no prompt, the whole text is the target).
    """
    path = Path(path)
    return _load_pairs(path, prompt_column, target_column, text_column, path.stem)


def table_columns(path: str | Path) -> list[str]:
    """The header of a CSV/TSV/JSONL file (the keys of a JSONL file), for task inference."""
    return _read_table(Path(path), "utf-8-sig").columns


def detect_prompt_target(columns: list[str]) -> tuple[str, str] | None:
    """The first known (prompt, target) header pair among ``columns``, or None."""
    for prompt, target in PROMPT_TARGET_COLUMNS:
        if prompt in columns and target in columns:
            return prompt, target
    return None


def _load_pairs(
    path: Path, prompt_column: str | None, target_column: str | None, text_column: str | None, name: str
) -> CausalLMDataset:
    table = _read_table(path, "utf-8-sig")
    found = ", ".join(table.columns) or "(none)"
    for flag, given in (
        ("--prompt-column", prompt_column),
        ("--target-column", target_column),
        ("--text-column", text_column),
    ):
        if given is not None and given not in table.columns:
            raise FlatLoraError(f"no column {given!r} in {path} (columns found: {found}): pass {flag} from those")
    if text_column is not None and (prompt_column or target_column):
        raise FlatLoraError(
            "--text-column means plain language modelling: drop it, or drop --prompt-column/--target-column"
        )
    if text_column is None and (prompt_column is None or target_column is None):
        detected = detect_prompt_target(table.columns)
        if detected is None:
            pairs = ", ".join(f"{p}/{t}" for p, t in PROMPT_TARGET_COLUMNS)
            raise FlatLoraError(
                f"no prompt/target columns in {path} (columns found: {found}; looked for {pairs}): "
                "pass --prompt-column and --target-column, or --text-column for plain language modelling"
            )
        prompt_column = prompt_column or detected[0]
        target_column = target_column or detected[1]
    examples = []
    for index, row in enumerate(table.rows):
        target = (row.get(target_column or text_column) or "").strip()
        if not target:
            what = "target" if text_column is None else "text"
            raise FlatLoraError(
                f"row at line {table.row_lines[index]} of {path} has an empty {what} in column "
                f"{target_column or text_column!r}: fill it in or delete the row"
            )
        prompt = ""
        if text_column is None:
            prompt = (row.get(prompt_column) or "").strip()
            if not prompt:
                raise FlatLoraError(
                    f"row at line {table.row_lines[index]} of {path} has an empty prompt in column "
                    f"{prompt_column!r}: fill it in or delete the row"
                )
        examples.append(PromptTarget(prompt, target))
    return CausalLMDataset(examples, name)


def load_causal_data(
    spec: str | Path,
    prompt_column: str | None = None,
    target_column: str | None = None,
    text_column: str | None = None,
) -> dict[str, CausalLMDataset]:
    """Causal-LM splits from ``e2e`` (the bundled copy), an E2E folder, or one prompt/target table file."""
    text = str(spec).strip()
    if text.lower() == "e2e":
        if not is_e2e_folder(BUNDLED_E2E):
            raise FlatLoraError("the bundled E2E copy is missing from this install: reinstall flatlora")
        path = BUNDLED_E2E
    else:
        path = Path(text).expanduser()
    if path.is_dir() and is_e2e_folder(path):
        if prompt_column or target_column or text_column:
            raise FlatLoraError(f"{text} is an E2E folder (columns mr, ref): drop the column options")
        return load_e2e_folder(path)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return {"train": load_prompt_table(path, prompt_column, target_column, text_column)}
    if path.is_dir():
        raise FlatLoraError(
            f"folder {path} holds no E2E files ({', '.join(E2E_FILES)}): pass an E2E folder or one CSV/TSV/JSONL "
            "file with prompt/target columns"
        )
    raise FlatLoraError(
        f"causal-LM data {text!r} not found: pass e2e (bundled), an E2E folder or a CSV/TSV/JSONL file "
        "with prompt/target (or text) columns"
    )


# ----------------------------------------------------------------------------- few-shot by prompt


def few_shot_groups(
    pool: CausalLMDataset, k: int, seed: int, dev_k: int | None = None
) -> tuple[CausalLMDataset, CausalLMDataset]:
    """k training and ``dev_k`` (default k) development prompts, each with ALL its references.

    The LM-BFF protocol over groups instead of classes: the pool's groups are shuffled with
    ``random.Random(seed)``; the first k go to train, the next ``dev_k`` to dev.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlatLoraError(f"--shots {k!r} is invalid: pass an integer k >= 1 (prompts to train on)")
    dev_k = k if dev_k is None else dev_k
    order = list(range(len(pool.groups())))
    if len(order) < k + dev_k:
        raise FlatLoraError(
            f"{pool.name!r} has {len(order)} distinct prompts, fewer than k={k} train + {dev_k} dev: "
            f"use --shots {max(len(order) // 2, 1)} or less"
        )
    random.Random(seed).shuffle(order)
    tag = f"{pool.name}/k{k}-seed{seed}"
    return pool.subset_groups(order[:k], f"{tag}/train"), pool.subset_groups(order[k : k + dev_k], f"{tag}/dev")


def cap_groups(test: CausalLMDataset, n: int | None, seed: int = TEST_SEED) -> CausalLMDataset:
    """At most n prompts (with all their references), drawn by ``random.Random(seed)``, in the original order."""
    groups = len(test.groups())
    if n is None or n >= groups:
        return test
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FlatLoraError(f"--test-cap {n!r} is invalid: pass an integer >= 1, or none for no cap")
    kept = sorted(random.Random(seed).sample(range(groups), n))
    return test.subset_groups(kept, f"{test.name}[cap={n}]")


def make_causal_splits(
    splits: dict[str, CausalLMDataset], shots: int | None, seed: int, test_cap: int | None
) -> dict[str, CausalLMDataset]:
    """{"train", "dev"?, "test"}: few-shot by prompt when ``shots`` is set; a test set carved when none is given."""
    pool = splits["train"]
    test = splits.get("test")
    if test is None:
        order = list(range(len(pool.groups())))
        size = round(len(order) * CARVED_TEST_FRACTION)
        if size < 1 or size >= len(order):
            raise FlatLoraError(
                f"{pool.name!r} has only {len(order)} distinct prompts, too few to hold out a test set: add rows"
            )
        held = set(random.Random(TEST_SEED).sample(order, size))
        test = pool.subset_groups(sorted(held), f"{pool.name}/test")
        pool = pool.subset_groups([i for i in order if i not in held], f"{pool.name}/pool")
    out = {}
    if shots is not None:
        out["train"], out["dev"] = few_shot_groups(pool, shots, seed)
    else:
        out["train"] = pool
        if "dev" in splits:
            out["dev"] = splits["dev"]
    out["test"] = cap_groups(test, test_cap)
    return out
