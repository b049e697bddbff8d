"""E2E NLG Challenge metrics (BLEU, NIST, METEOR, ROUGE_L, CIDEr) as the official script computes them.

The official script is ``measure_scores.py`` of github tuetschek/e2e-metrics (Novikova, Dusek and Rieser, "The E2E
Dataset: New Challenges for End-to-End Generation", SIGDIAL 2017), default path:

- BLEU and NIST from NIST MT-Eval ``mteval-v13a`` (Perl): re-implemented in Python in :mod:`.mteval`, no Java.
- METEOR 1.5 (Denkowski and Lavie, 2014; Java, ``-l en -norm``), ROUGE_L (LCS F-measure, beta 1.2) and CIDEr
  (Vedantam et al., 2015; the MS-COCO caption-evaluation variant with clipped tf-idf, a Gaussian length penalty
  with sigma 6, document frequencies over the reference sets and 10x scaling, i.e. "CIDEr-D") from the MS-COCO
  caption evaluation code, on texts lower-cased and tokenised by the Stanford PTB tokenizer (Java), with
  punctuation tokens removed. These come from the PyPI package ``pycocoevalcap`` (1.2), whose scorer code and jars
  (METEOR 1.5, its paraphrase table, Stanford CoreNLP 3.4.1) are the ones the e2e-metrics repository bundles.

So METEOR, ROUGE_L and CIDEr need Java (and ``pycocoevalcap``); BLEU and NIST need neither. A metric that cannot be
computed is ``None`` and named, with the reason, in ``scores["unavailable"]``.

Inputs are cleaned the way the official script reads its text files: line breaks inside a text become spaces (a
text file cannot hold them) and each text is stripped of surrounding whitespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence

from .mteval import corpus_bleu_nist

__all__ = ["METRICS", "score_generations"]

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
_JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")  # all three score PTB-tokenised text, and the tokenizer is Java
_JAVA_TIMEOUT_S = 900  # a guard against a stuck JVM; 630 outputs take well under a minute
_INSTALL_HINT = "pip install pycocoevalcap (it ships the METEOR 1.5 and Stanford PTB tokenizer jars)"


def _clean(text: str) -> str:
    """One text as the official script sees it after reading it as a line of a file."""
    return " ".join(text.splitlines()).strip()


def _kind(value) -> str:
    return type(value).__name__


def _validate(predictions, references) -> tuple[list[str], list[list[str]]]:
    """Check the shapes and types of the inputs, and return them cleaned; raise ValueError naming the problem."""
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list, got {_kind(value)}; pass one entry per meaning representation")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions has {len(predictions)} items but references has {len(references)}; "
            "give exactly one list of references per prediction"
        )
    if not predictions:
        raise ValueError("predictions is empty; pass at least one prediction with its references")
    hyps, refs = [], []
    for i, (prediction, group) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] is {_kind(prediction)}, not str; decode model outputs to text first")
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise ValueError(f"references[{i}] is {_kind(group)}, not a list of str; wrap one reference as [text]")
        if not group:
            raise ValueError(f"references[{i}] is an empty list; give each prediction at least one reference")
        cleaned = []
        for j, reference in enumerate(group):
            if not isinstance(reference, str):
                raise ValueError(f"references[{i}][{j}] is {_kind(reference)}, not str; pass reference texts")
            if not _clean(reference):
                raise ValueError(
                    f"references[{i}][{j}] is blank; drop empty references (the official script cannot read them)"
                )
            cleaned.append(_clean(reference))
        hyps.append(_clean(prediction))
        refs.append(cleaned)
    return hyps, refs


def _coco_pieces():
    """Import pycocoevalcap lazily: (jar folders, PTB punctuation list, Rouge class, Cider class)."""
    import pycocoevalcap.meteor.meteor as meteor_module
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_module
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    folders = {
        "meteor": os.path.dirname(os.path.abspath(meteor_module.__file__)),
        "tokenizer": os.path.dirname(os.path.abspath(ptb_module.__file__)),
    }
    return folders, list(ptb_module.PUNCTUATIONS), Rouge, Cider


def _ptb_tokenize(java: str, folder: str, punctuation: list[str], texts: list[str]) -> list[str]:
    """Lower-case and PTB-tokenise ``texts`` (N strings) in one Java run, dropping punctuation tokens, as
    pycocoevalcap's PTBTokenizer does (one file, one line per text, ``-preserveLines -lowerCase``), but with the
    temporary file outside the package folder and with a timeout. Returns N tokenised strings."""
    with tempfile.TemporaryDirectory(prefix="flatlora-ptb-") as tmp:
        path = os.path.join(tmp, "texts.txt")
        with open(path, "wb") as handle:
            handle.write("\n".join(texts).encode("utf-8"))
        command = [java, "-cp", "stanford-corenlp-3.4.1.jar", "edu.stanford.nlp.process.PTBTokenizer"]
        done = subprocess.run(
            [*command, "-preserveLines", "-lowerCase", path],
            cwd=folder,
            capture_output=True,
            timeout=_JAVA_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"PTB tokenizer exited with {done.returncode}: {_tail(done.stderr)}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    drop = set(punctuation)
    return [" ".join(word for word in line.rstrip().split(" ") if word not in drop) for line in lines[: len(texts)]]


def _tail(data: bytes, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " | ")
    return text[-limit:] or "(no stderr)"


@contextlib.contextmanager
def _meteor_process(java: str, folder: str):
    """Start the METEOR 1.5 jar in stdio mode (pycocoevalcap's command) and kill it on exit.

    Started before the other metrics run, because loading its paraphrase table takes most of METEOR's time.
    Yields ``(process, stderr file)``.
    """
    command = [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        watchdog = threading.Timer(_JAVA_TIMEOUT_S, process.kill)  # a stuck JVM ends in a read error, not a hang
        watchdog.start()
        try:
            yield process, errors
        finally:
            watchdog.cancel()
            try:
                process.stdin.close()
            except OSError:
                pass
            process.kill()
            process.wait()


def _meteor(meteor, hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus METEOR 1.5 of tokenised ``hyps`` (N) against ``refs`` (N lists) through the jar's stdio protocol.

    Same lines as pycocoevalcap's Meteor wrapper: one ``SCORE ||| ref ||| ... ||| hyp`` line per segment (``|||``
    removed from the hypothesis, double spaces halved), then one ``EVAL`` line with all segment statistics, whose
    last answer is the corpus score. The SCORE lines are written from a thread so that neither pipe can fill.
    """
    process, errors = meteor
    score_lines = []
    for hyp, group in zip(hyps, refs):
        hyp = hyp.replace("|||", "").replace("  ", " ")
        score_lines.append(" ||| ".join(("SCORE", " ||| ".join(group), hyp)) + "\n")
    writer = threading.Thread(target=_write_lines, args=(process.stdin, score_lines), daemon=True)
    writer.start()
    stats = [_read_line(process, errors) for _ in score_lines]
    writer.join()
    process.stdin.write(("EVAL" + "".join(f" ||| {stat}" for stat in stats) + "\n").encode("utf-8"))
    process.stdin.flush()
    for _ in score_lines:  # per-segment scores, not needed
        _read_line(process, errors)
    return float(_read_line(process, errors))


def _write_lines(stream, lines: list[str]) -> None:
    try:
        for line in lines:
            stream.write(line.encode("utf-8"))
        stream.flush()
    except OSError:  # the process died; the reader reports it
        pass


def _read_line(process: subprocess.Popen, errors) -> str:
    line = process.stdout.readline()
    if not line:
        process.kill()
        process.wait()
        errors.seek(0)
        raise RuntimeError(f"METEOR jar stopped (exit {process.returncode}): {_tail(errors.read())}")
    return line.decode("utf-8").strip()


def _java_setup():
    """``(java path, jar folders, PTB punctuation, Rouge, Cider)``, or the reason why the Java metrics cannot run."""
    try:
        folders, punctuation, Rouge, Cider = _coco_pieces()
    except ImportError as error:
        return f"pycocoevalcap is not installed ({error}); {_INSTALL_HINT}"
    java = shutil.which("java")
    if java is None:
        return (
            "java not found on PATH: the official script runs METEOR 1.5 and the Stanford PTB tokenizer (which "
            "ROUGE_L and CIDEr score on) in Java; install a Java runtime (e.g. apt-get install default-jre-headless)"
        )
    return java, folders, punctuation, Rouge, Cider


def _java_scores(setup, meteor, meteor_error: str | None, hyps: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    """METEOR, ROUGE_L and CIDEr of cleaned texts: ``(metric -> value or None, metric -> reason)``."""
    scores = dict.fromkeys(_JAVA_METRICS)
    if isinstance(setup, str):
        return scores, dict.fromkeys(_JAVA_METRICS, setup)
    java, folders, punctuation, Rouge, Cider = setup
    try:
        # the official script tokenises all references in one run and then all outputs in another
        flat = [reference for group in refs for reference in group]
        tokens = iter(_ptb_tokenize(java, folders["tokenizer"], punctuation, flat))
        tok_refs = [[next(tokens) for _ in group] for group in refs]
        tok_hyps = _ptb_tokenize(java, folders["tokenizer"], punctuation, hyps)
    except (OSError, subprocess.SubprocessError, RuntimeError, UnicodeDecodeError) as error:
        return scores, dict.fromkeys(_JAVA_METRICS, f"the Java PTB tokenizer failed: {error}")
    gts = dict(enumerate(tok_refs))
    res = {i: [hyp] for i, hyp in enumerate(tok_hyps)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    unavailable = {}
    if meteor is None:
        unavailable["METEOR"] = f"the METEOR 1.5 jar failed: {meteor_error}"
    else:
        try:
            scores["METEOR"] = _meteor(meteor, tok_hyps, tok_refs)
        except (OSError, RuntimeError, ValueError) as error:
            unavailable["METEOR"] = f"the METEOR 1.5 jar failed: {error}"
    return scores, unavailable


def score_generations(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus-level E2E metrics of ``predictions`` against multiple references, as the official script gives them.

    Args:
        predictions: N output texts, one per meaning representation.
        references: N lists of reference texts; ``references[i]`` (length >= 1, lengths may differ) belongs to
            ``predictions[i]``.
    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` -> float on the official scales (BLEU and METEOR in [0, 1],
        CIDEr x10 as in MS-COCO), at full precision (the script prints 4 decimals), plus ``"unavailable"``: metric ->
        reason for every metric that is ``None`` (no Java, no pycocoevalcap, a jar that failed); ``{}`` when all ran.
    Raises:
        ValueError: on a length mismatch, an empty reference list or a blank reference, or a non-string text.
    """
    hyps, refs = _validate(predictions, references)
    setup = _java_setup()
    with contextlib.ExitStack() as stack:
        meteor, meteor_error = None, None
        if not isinstance(setup, str):
            try:
                meteor = stack.enter_context(_meteor_process(setup[0], setup[1]["meteor"]))
            except OSError as error:
                meteor_error = str(error)
        bleu, nist = corpus_bleu_nist(hyps, refs)  # while the METEOR jar loads
        java_scores, unavailable = _java_scores(setup, meteor, meteor_error, hyps, refs)
    for metric, reason in unavailable.items():
        logger.warning("E2E metric %s not computed: %s", metric, reason)
    return {"BLEU": bleu, "NIST": nist, **java_scores, "unavailable": unavailable}
