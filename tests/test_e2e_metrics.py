"""E2E NLG metrics: the official script's numbers on the shared examples, BLEU/NIST by hand, failure modes."""

import importlib.util
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from flatlora.generation import e2e_metrics
from flatlora.generation.e2e_metrics import score_generations
from flatlora.generation.mteval import corpus_bleu_nist, mteval_tokenize

DATA = Path(__file__).resolve().parent / "data" / "e2e_metrics_example"  # copies of the shared example files
JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")
HAS_JAVA = shutil.which("java") is not None
HAS_COCO = importlib.util.find_spec("pycocoevalcap") is not None

# measure_scores.py (e2e-metrics, default path: mteval Perl + Java) on the shared files, as the data README gives them
OFFICIAL = {
    "baseline": ("devel-conc.txt", "baseline-output.txt", (0.7203, 7.8212, 0.4801, 0.7910, 2.3039)),
    "case2": ("case2-refs.txt", "case2-output.txt", (0.4294, 1.7670, 0.2918, 0.5509, 0.8207)),
}
TOLERANCE = 5e-5 + 1e-9  # the README rounds to 4 decimals


def read_references(path: Path) -> list[list[str]]:
    """References as the official script reads a multi-reference text file: one per line, blank line between MRs."""
    groups = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        else:
            groups.append([])
    return [group for group in groups if group]


def read_outputs(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def official_case(request):
    ref_name, out_name, expected = OFFICIAL[request.param]
    if not (DATA / ref_name).exists():
        pytest.skip(f"shared E2E example data not found at {DATA}")
    predictions, references = read_outputs(DATA / out_name), read_references(DATA / ref_name)
    assert len(predictions) == len(references)
    return score_generations(predictions, references), dict(zip(e2e_metrics.METRICS, expected))


def test_official_bleu_nist(official_case):
    scores, expected = official_case
    for metric in ("BLEU", "NIST"):
        assert abs(scores[metric] - expected[metric]) <= TOLERANCE, (metric, scores[metric], expected[metric])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH: METEOR and the PTB tokenizer need it")
@pytest.mark.skipif(not HAS_COCO, reason="pycocoevalcap not installed")
def test_official_java_metrics(official_case):
    scores, expected = official_case
    assert scores["unavailable"] == {}
    for metric in JAVA_METRICS:
        assert abs(scores[metric] - expected[metric]) <= TOLERANCE, (metric, scores[metric], expected[metric])


def test_mteval_tokenization():
    text = "Café, 20-25 £ e.g. 5.5 and 1,000 &amp; 'x'"
    expected = ["café", ",", "20", "-", "25", "£", "e", ".", "g", ".", "5.5", "and", "1,000", "&", "'x'"]
    assert mteval_tokenize(text) == expected
    assert mteval_tokenize("  A\u00a0B\tC  ") == ["a", "b", "c"]  # Perl's \s includes no-break space
    assert mteval_tokenize("") == []


def test_bleu_nist_hand_computed():
    """Two segments, the second with two references of different lengths.

    Reference words: "a b c e" + "x y z" + "x y z w v u" = 13; counts a=b=c=1, x=y=2. Matches: unigrams a b c (info
    log2 13 each) and x y (log2 13/2 each), bigrams a-b, b-c, x-y and trigram a-b-c (info 0: each n-gram as frequent
    as its prefix), no 4-gram. Output n-grams: 6, 4, 2, 1. BLEU reference length 4 + 3 (closest to 2 words) = 7.
    NIST expected reference words: 13 / (3 references / 2 segments).
    """
    bleu, nist = corpus_bleu_nist(["a b c d", "x y"], [["a b c e"], ["x y z", "x y z w v u"]])
    smoothed_4gram = 1 / (2 * 1)  # no 4-gram match: mteval counts 1/2^k with k = 1
    expected_bleu = math.exp(1 - 7 / 6) * (5 / 6 * 3 / 4 * 1 / 2 * smoothed_4gram) ** 0.25
    beta = -math.log(0.5) / math.log(1.5) ** 2
    ratio = 6 / (13 / (3 / 2))
    expected_nist = (3 * math.log2(13) + 2 * math.log2(13 / 2)) / 6 * math.exp(-beta * math.log(ratio) ** 2)
    assert bleu == pytest.approx(expected_bleu, rel=1e-12)
    assert nist == pytest.approx(expected_nist, rel=1e-12)
    assert round(expected_bleu, 4) == 0.5322 and round(expected_nist, 4) == 1.5552


def test_bleu_closest_length_tie_and_missing_order():
    # reference lengths 2 and 4 are equally close to 3: mteval takes the shorter, so no brevity penalty; the
    # output has no 4-gram, which mteval scores as log 1, so the perfect 1..3-gram precisions give exactly 1
    bleu, _ = corpus_bleu_nist(["a b c"], [["a b", "a b c d"]])
    assert bleu == pytest.approx(1.0, abs=1e-12)


def test_nist_zero_word_prefix_quirk():
    # mteval tests an n-gram's prefix string for Perl truth; "0" is false, so the bigram "0 x" is weighed against all
    # reference words (log2 2/1 = 1 bit) instead of against its prefix "0" (log2 1/1 = 0 bits); unigrams 1 bit each
    _, nist = corpus_bleu_nist(["0 x"], [["0 x"]])
    assert nist == pytest.approx((1 + 1) / 2 + 1 / 1)
    _, nist = corpus_bleu_nist(["1 x"], [["1 x"]])
    assert nist == pytest.approx((1 + 1) / 2 + 0 / 1)


def _tiny():
    return ["The Eagle is a pub.", "Nice place."], [["The Eagle is a pub in the city."], ["A nice place.", "Nice."]]


def test_without_java_gives_none_with_reason(monkeypatch, caplog):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda *args, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger=e2e_metrics.__name__):
        scores = score_generations(*_tiny())
    assert isinstance(scores["BLEU"], float) and isinstance(scores["NIST"], float)
    for metric in JAVA_METRICS:
        assert scores[metric] is None
        assert metric in scores["unavailable"]
        if HAS_COCO:
            assert "java" in scores["unavailable"][metric]
    assert "METEOR" in caplog.text


@pytest.mark.skipif(not HAS_COCO, reason="pycocoevalcap not installed")
def test_failing_java_gives_none_with_reason(monkeypatch):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda *args, **kwargs: "/bin/false")
    scores = score_generations(*_tiny())
    assert isinstance(scores["BLEU"], float)
    for metric in JAVA_METRICS:
        assert scores[metric] is None
        assert "PTB tokenizer failed" in scores["unavailable"][metric]


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_JAVA and HAS_COCO), reason="needs java and pycocoevalcap")
def test_failing_meteor_jar_keeps_other_metrics(monkeypatch, tmp_path):
    fake = tmp_path / "java"  # fails when asked to run a jar (METEOR), runs the real java for the PTB tokenizer
    fake.write_text(
        f'#!/bin/sh\n[ "$1" = "-jar" ] && {{ echo "no METEOR here" >&2; exit 3; }}\nexec {shutil.which("java")} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda *args, **kwargs: os.fspath(fake))
    scores = score_generations(*_tiny())
    assert scores["METEOR"] is None
    assert "no METEOR here" in scores["unavailable"]["METEOR"]
    assert isinstance(scores["ROUGE_L"], float) and isinstance(scores["CIDEr"], float)
    assert set(scores["unavailable"]) == {"METEOR"}


def test_without_pycocoevalcap_names_the_install(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "pycocoevalcap"] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes every pycocoevalcap import fail
    scores = score_generations(*_tiny())
    for metric in JAVA_METRICS:
        assert scores[metric] is None
        assert "pip install pycocoevalcap" in scores["unavailable"][metric]
    assert isinstance(scores["NIST"], float)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a", "b"], [["a"]], "predictions has 2 items but references has 1"),
        (["a"], [[]], r"references\[0\] is an empty list"),
        (["a"], [["a", "  "]], r"references\[0\]\[1\] is blank"),
        ([3], [["a"]], r"predictions\[0\] is int, not str"),
        (["a"], [["a", None]], r"references\[0\]\[1\] is NoneType, not str"),
        (["a"], ["a"], r"references\[0\] is str, not a list of str"),
        ("a", [["a"]], "predictions must be a list, got str"),
        ([], [], "predictions is empty"),
    ],
)
def test_bad_input_raises(predictions, references, message):
    with pytest.raises(ValueError, match=message) as info:
        score_generations(predictions, references)
    assert "\n" not in str(info.value) and ";" in str(info.value)  # one line: the problem; the fix
