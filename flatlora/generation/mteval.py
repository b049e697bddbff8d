"""Corpus BLEU and NIST as NIST MT-Eval ``mteval-v13a`` computes them, the way the E2E NLG Challenge runs it.

The official E2E metrics script (github tuetschek/e2e-metrics, ``measure_scores.py``) writes references and outputs
into SGML files and calls the Perl scorer ``mteval-v13a-sig.pl`` (v13a with a patch for a varying number of references
per segment). This module re-implements that pipeline in Python from the description of the algorithm:

- Text normalisation (mteval v13a default, "11b" tokenisation): runs of whitespace collapse to one space (the SGML
  reader does this before anything else), ``<skipped>`` is dropped, the four entities ``&quot; &amp; &lt; &gt;`` are
  decoded, ASCII letters are lower-cased, ASCII punctuation and symbols other than ``' - . ,`` become separate tokens,
  ``.`` and ``,`` become tokens unless they sit between digits, and ``-`` after a digit is split off.
- BLEU (Papineni et al., 2002) with clipped n-gram matches against the per-n-gram maximum count over the references,
  n = 1..4, geometric mean, mteval's smoothing (a zero match count for n counts as ``1 / 2**k`` matches, ``k`` the
  number of zero-match orders so far; an order with no test n-grams at all contributes ``log 1 = 0``) and the brevity
  penalty ``exp(min(0, 1 - r / c))`` with ``r`` the sum over segments of the reference length closest to the
  output length (ties to the shorter one).
- NIST (Doddington, 2002): information weight ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` from the
  n-gram counts over every reference segment of the corpus (for unigrams the denominator is the total number of
  reference words), summed over clipped matches and divided by the number of output n-grams, n = 1..5, times the
  length penalty ``exp(-beta * log(ratio)**2)`` (``beta`` puts 0.5 at ratio 2/3), ``ratio`` = output words over the
  expected reference words of the corpus: all reference words divided by the mean number of references per segment.

How the E2E script feeds multi-reference data: it transposes the references into as many reference "systems" as the
largest reference list has, and pads the shorter lists with empty segments. The ``-sig`` patch of mteval then counts
only non-empty references per segment (so the mean number of references per segment, and hence the NIST length
penalty, uses the true counts), and skips zero-length references when choosing the BLEU reference length. Empty
padding segments add no n-grams to the information weights. So the padding is neutral, and this module scores every
segment against its own (unpadded) reference list, with those two rules. (The script's ``-p`` Python port averages
reference lengths per segment instead, which is why its NIST differs when reference counts vary.)

mteval prints both scores rounded to 4 decimals, and the E2E script reads those; this module returns full precision.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["corpus_bleu_nist", "mteval_tokenize"]

# Orders that affect the reported scores: BLEU is the cumulative 4-gram score and NIST the cumulative 5-gram one
# (mteval computes up to 9-grams, but an n-gram's information weight depends only on its own and its prefix's counts).
BLEU_ORDER = 4
NIST_ORDER = 5
_MAX_ORDER = max(BLEU_ORDER, NIST_ORDER)

# Perl's \s on character strings (the scorer reads its files with the :utf8 layer), not Python's str.isspace, which
# also counts the separators U+001C..U+001F.
_PERL_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACES = re.compile(f"[{_PERL_SPACE}]+")
# ASCII punctuation and symbols that always become tokens: space to &, ( to +, / , : to @, [ to `, { to ~.
_PUNCT = re.compile(r"([\x20-\x26\x28-\x2b\x2f\x3a-\x40\x5b-\x60\x7b-\x7e])")
_PERIOD_AFTER_NONDIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_BEFORE_NONDIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# NIST length penalty: beta such that a ratio of 1.5 below the reference length (2/3) scores 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def mteval_tokenize(text: str) -> list[str]:
    """Split one segment into words the way mteval-v13a's default tokenisation does.

    Args:
        text: one segment as the E2E script writes it into the SGML file (raw, no XML escaping).
    Returns:
        the list of tokens (lower-cased ASCII letters; other characters unchanged).
    """
    text = _SPACES.sub(" ", text)  # the SGML reader joins records before tokenising
    text = text.replace("<skipped>", "")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _PUNCT.sub(r" \1 ", text)
    text = _PERIOD_AFTER_NONDIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_BEFORE_NONDIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    text = _SPACES.sub(" ", text).strip(" ")  # every Perl space is a plain space by now
    return text.split(" ") if text else []


def _ngrams(words: Sequence[str], max_order: int = _MAX_ORDER) -> Counter:
    """Count every n-gram (as a tuple of words) of ``words`` with 1 <= n <= max_order."""
    counts: Counter = Counter()
    for start in range(len(words)):
        for end in range(start + 1, min(start + max_order, len(words)) + 1):
            counts[tuple(words[start:end])] += 1
    return counts


def nist_information(reference_segments: Iterable[Sequence[str]]) -> dict[tuple[str, ...], float]:
    """NIST information weight of every n-gram (n <= 5) seen in the reference segments.

    Args:
        reference_segments: every tokenised reference segment of the corpus (all references of all segments).
    Returns:
        ``{ngram: log2(count(prefix) / count(ngram))}``, the prefix count of a unigram being the total word count.
    """
    counts: Counter = Counter()
    total_words = 0
    for words in reference_segments:
        total_words += len(words)
        counts.update(_ngrams(words))
    info = {}
    for ngram, count in counts.items():
        # mteval keys n-grams by their space-joined words and tests the prefix for Perl truth: a prefix that is the
        # single word "0" is false, so such bigrams are weighed against the total word count like unigrams.
        prefix = ngram[:-1]
        if prefix and prefix != ("0",):
            info[ngram] = -math.log(count / counts[prefix]) / math.log(2)
        else:
            info[ngram] = -math.log(count / total_words) / math.log(2)
    return info


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length mteval's 'closest' brevity penalty uses for one segment.

    The first reference's length is the start; every later non-zero length replaces it when closer to the output
    length, or equally close and shorter (empty padding references are skipped by the ``-sig`` patch).
    """
    best = ref_lens[0]
    for length in ref_lens[1:]:
        if length and (abs(hyp_len - length), length) < (abs(hyp_len - best), best):
            best = length
    return best


@dataclass
class _Totals:
    """Corpus sums of mteval's per-segment statistics; lists are indexed by n - 1."""

    ref_length: int = 0  # sum of the closest reference lengths (BLEU)
    n_refs: int = 0  # non-empty references
    n_segments: int = 0
    ref_words: int = 0  # all reference words (NIST)
    match: list[int] = field(default_factory=lambda: [0] * _MAX_ORDER)  # clipped n-gram matches
    test: list[int] = field(default_factory=lambda: [0] * _MAX_ORDER)  # output n-grams
    info: list[float] = field(default_factory=lambda: [0.0] * _MAX_ORDER)  # information of the matches


def _accumulate(totals: _Totals, hyp: Sequence[str], refs: Sequence[Sequence[str]], info: dict) -> None:
    """Add one segment's statistics (output words ``hyp``, tokenised references ``refs``) to ``totals``."""
    hyp_counts = _ngrams(hyp)
    ref_max: Counter = Counter()
    for words in refs:
        ref_max |= _ngrams(words)  # per-n-gram maximum over the references
    for ngram, count in hyp_counts.items():
        clipped = min(count, ref_max.get(ngram, 0))
        if clipped:
            totals.match[len(ngram) - 1] += clipped
            totals.info[len(ngram) - 1] += info[ngram] * clipped
    for n in range(1, _MAX_ORDER + 1):
        totals.test[n - 1] += max(len(hyp) - n + 1, 0)
    totals.ref_length += _closest_length(len(hyp), [len(words) for words in refs])
    totals.n_refs += sum(1 for words in refs if words)
    totals.n_segments += 1
    totals.ref_words += sum(len(words) for words in refs)


def _bleu(totals: _Totals) -> float:
    """mteval's smoothed cumulative 4-gram BLEU from corpus totals."""
    hyp_words = totals.test[0]
    brevity = math.exp(min(0.0, 1.0 - totals.ref_length / hyp_words)) if hyp_words > 0 else 0.0
    log_sum, smooth = 0.0, 1
    for n in range(BLEU_ORDER):
        if totals.test[n] == 0:
            continue  # no output n-grams of this order: mteval adds log 1
        if totals.match[n] == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * totals.test[n]))
        else:
            log_sum += math.log(totals.match[n] / totals.test[n])
    return math.exp(log_sum / BLEU_ORDER) * brevity


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _nist(totals: _Totals) -> float:
    """mteval's cumulative 5-gram NIST from corpus totals."""
    score = sum(totals.info[n] / max(totals.test[n], 1) for n in range(NIST_ORDER))
    refs_per_segment = totals.n_refs / totals.n_segments
    return score * _nist_length_penalty(totals.test[0] / (totals.ref_words / refs_per_segment))


def corpus_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Corpus BLEU (in [0, 1]) and NIST of ``predictions`` as the E2E script's mteval-v13a run gives them.

    Args:
        predictions: N output texts, one per segment (meaning representation).
        references: N lists of reference texts; list i holds the references of prediction i (any length >= 1).
    Returns:
        ``(bleu, nist)`` at full precision (the official script reports both rounded to 4 decimals).
    Raises:
        ValueError: when a segment has no reference with a token, where mteval would divide by zero.
    """
    hyps = [mteval_tokenize(text) for text in predictions]
    refs = [[mteval_tokenize(text) for text in group] for group in references]
    for index, group in enumerate(refs):
        if not any(group):
            raise ValueError(
                f"references[{index}] has no token after mteval normalisation (mteval would divide by zero); "
                "give that prediction at least one reference with words"
            )
    info = nist_information(words for group in refs for words in group)
    totals = _Totals()
    for hyp, group in zip(hyps, refs):
        _accumulate(totals, hyp, group, info)
    return _bleu(totals), _nist(totals)
