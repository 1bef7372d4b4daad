"""The TRACE task scorers: each grades a task's answers in [0, 1].

Pure Python: no model, no ``peft`` or ``transformers`` import. ``rouge_l`` imports the ``rouge_score`` package on first
use.

Task scorers. Each is ``fn(predictions, references, sources=None) -> float`` in [0, 1], the mean over pairs:

    exact_match      1[pred.strip() == ref.strip()]                        (C-STANCE, FOMC, NumGLUE-cm/ds)
    first_letter     1[first non-space char of pred == that of ref]         (ScienceQA: the option letter)
    rouge_l          F_LCS = 2 P R / (P + R), P = LCS/|pred|, R = LCS/|ref|  (MeetingBank; Lin 2004)
    sari             (F_keep + P_del + F_add) / 3, each averaged over n = 1..4  (20Minuten; Xu et al. 2016)
    edit_similarity  round(100 * 2 M / (|pred| + |ref|)) / 100             (Py150; fuzzywuzzy ``fuzz.ratio``)

where ``M`` is the number of characters in the matching blocks that ``difflib.SequenceMatcher`` finds. As TRACE's
``metrics.py`` does for every metric it computes itself, a pair whose prediction or reference is empty (after the
scorer's own preprocessing) scores 0 and still counts in the mean. SARI follows HF ``evaluate``'s ``sari`` (which TRACE
calls) and has no such rule. TRACE reports 0-100 for ROUGE-L, SARI and edit similarity; these functions return 0-1.

Each scorer is also an HF ``evaluate`` metric that calls it, loadable offline: ``peft_asr.cl.evaluate_metrics``
(``evaluate.load(metric_path(name))``, ``trainer_compute_metrics``). ``evaluate``'s own ``exact_match``/``rouge``/
``sari`` are not used: they are fetched from the Hub at load time (offline: ``FileNotFoundError``), ``exact_match``
neither strips nor scores an empty pair 0, and ``sari`` is 0-100 and needs ``sacrebleu``. The runner calls these
functions directly: ``evaluate``'s ``compute`` adds 25-110 ms per call on 1000 pairs (``exact_match`` itself: 0.5 ms).
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .metrics import check_same_length

__all__ = [
    "exact_match",
    "first_letter_accuracy",
    "rouge_l",
    "sari",
    "edit_similarity",
    "SCORERS",
    "get_scorer",
]

Scorer = Callable[..., float]




def _check_texts(predictions: Sequence[str], references: Sequence[Any]) -> None:
    check_same_length("predictions", predictions, "references", references)
    for k, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"`predictions[{k}]` must be a str, got {type(p).__name__}: {p!r}.")


def _check_str_refs(references: Sequence[Any]) -> None:
    for k, r in enumerate(references):
        if not isinstance(r, str):
            raise TypeError(
                f"`references[{k}]` must be a str, got {type(r).__name__}: {r!r}. Only `sari` takes several "
                "references per row."
            )


def exact_match(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None) -> float:
    """Accuracy of exact string matches after stripping surrounding whitespace (TRACE's ``caculate_accuracy``).

    Used for C-STANCE, FOMC (answer letter) and NumGLUE-cm/ds (number string). An empty prediction or reference
    scores 0, as in TRACE.

    Args:
        predictions (`Sequence[str]`): Generated answers.
        references (`Sequence[str]`): Gold answers, aligned with ``predictions``.
        sources (`Sequence[str]`, *optional*): Ignored (scorer signature).

    Returns:
        `float`: in [0, 1].
    """
    _check_texts(predictions, references)
    _check_str_refs(references)
    hits = 0
    for p, r in zip(predictions, references):
        p, r = p.strip(), r.strip()
        hits += bool(p) and bool(r) and p == r
    return hits / len(predictions)


def first_letter_accuracy(
    predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None
) -> float:
    """Accuracy on the first non-space character (ScienceQA: the option letter before the explanation).

    Args:
        predictions (`Sequence[str]`): Generated answers.
        references (`Sequence[str]`): Gold answers (``"<letter>\\n<explanation>"``), aligned with ``predictions``.
        sources (`Sequence[str]`, *optional*): Ignored (scorer signature).

    Returns:
        `float`: in [0, 1]; a pair with no non-space character on either side scores 0.
    """
    _check_texts(predictions, references)
    _check_str_refs(references)
    hits = 0
    for p, r in zip(predictions, references):
        p, r = p.lstrip(), r.lstrip()
        hits += bool(p) and bool(r) and p[0] == r[0]
    return hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None) -> float:
    """Mean ROUGE-L F-measure (Lin 2004) from the ``rouge_score`` package, no stemming (MeetingBank).

    ``rouge_score``'s tokenizer lowercases and keeps only ``[a-z0-9]`` runs, so text in other scripts (Chinese,
    German umlauts) loses those characters: use this scorer for English. TRACE itself calls the ``rouge`` package,
    whose F differs slightly (see ``docs/metrics.md``).

    Args:
        predictions (`Sequence[str]`): Generated summaries.
        references (`Sequence[str]`): Gold summaries, aligned with ``predictions``.
        sources (`Sequence[str]`, *optional*): Ignored (scorer signature).

    Returns:
        `float`: in [0, 1]; an empty prediction or reference scores 0.
    """
    _check_texts(predictions, references)
    _check_str_refs(references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # optional dependency: only this scorer needs it
        raise ImportError("`rouge_l` needs the `rouge_score` package: `pip install rouge-score`.") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for p, r in zip(predictions, references):
        if not p.strip() or not r.strip():
            continue  # TRACE skips empty pairs but divides by the full count
        total += scorer.score(r, p)["rougeL"].fmeasure  # score(target, prediction)
    return total / len(predictions)


# --- SARI (Xu et al. 2016), the tensor2tensor / HF `evaluate` variant ---------------------------------------------

# sacreBLEU's "13a" tokenizer (mteval-v13a), which HF's `sari` applies after lowercasing. Rules in order: split off
# punctuation except . and ,; then . and , unless between digits; then a dash after a digit.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def _sari_normalize(text: str) -> str:
    """Lowercase + sacreBLEU 13a tokenization, as HF ``evaluate``'s ``sari.normalize`` (defaults)."""
    line = text.lower()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _sari_ngram(src: list[str], pred: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(F_keep, P_del, F_add) for one n-gram order. Empty denominators give 1 (0/0 = 1, tensor2tensor's choice)."""
    num_refs = len(refs)
    ref_counts = Counter(g for ref in refs for g in ref)
    # source and prediction counts are scaled by the number of references so that they compare with ref_counts,
    # which sums over all references
    src_counts = Counter({g: c * num_refs for g, c in Counter(src).items()})
    pred_counts = Counter({g: c * num_refs for g, c in Counter(pred).items()})

    # KEEP: n-grams of the source that the prediction kept; good if the references keep them too
    kept = src_counts & pred_counts
    kept_good = kept & ref_counts
    kept_all = src_counts & ref_counts  # what the references keep
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    # recall with tensor2tensor's fix of cocoxu/simplification#6: counts, not per-n-gram ratios
    keep_r = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0

    # DELETE: n-grams of the source that the prediction dropped; good if the references drop them too (precision only)
    deleted = src_counts - pred_counts
    deleted_good = deleted - ref_counts
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    # ADD: new n-grams (sets, not counts); good if some reference has them
    added = set(pred_counts) - set(src_counts)
    added_good = added & set(ref_counts)
    added_all = set(ref_counts) - set(src_counts)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def _sari_sentence(source: str, prediction: str, references: list[str]) -> float:
    # split(" ") (not split()) as tensor2tensor: an empty text is one empty token
    src, pred = source.split(" "), prediction.split(" ")
    refs = [r.split(" ") for r in references]
    keep = dele = add = 0.0
    for n in (1, 2, 3, 4):
        k, d, a = _sari_ngram(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs])
        keep, dele, add = keep + k, dele + d, add + a
    return (keep / 4 + dele / 4 + add / 4) / 3


def sari(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    sources: Sequence[str] | None = None,
) -> float:
    """Mean sentence SARI (Xu et al. 2016) as HF ``evaluate``'s ``sari`` and tensor2tensor compute it (20Minuten).

    SARI = (F_keep + P_del + F_add) / 3, each averaged over n-grams n = 1..4; the delete term uses precision only.
    Texts are lowercased and tokenized with sacreBLEU's 13a rules first. Returns HF's number divided by 100.

    Args:
        predictions (`Sequence[str]`): Simplified texts from the model.
        references (`Sequence[str]` or `Sequence[Sequence[str]]`):
            Gold simplification(s) per source: one string, or a non-empty list of strings.
        sources (`Sequence[str]`): The texts that were simplified. Required.

    Returns:
        `float`: in [0, 1].
    """
    if sources is None:
        raise ValueError("`sari` needs `sources` (the texts that were simplified): SARI compares against the input.")
    _check_texts(predictions, references)
    check_same_length("sources", sources, "predictions", predictions)
    total = 0.0
    for k, (src, pred, refs) in enumerate(zip(sources, predictions, references)):
        if not isinstance(src, str):
            raise TypeError(f"`sources[{k}]` must be a str, got {type(src).__name__}: {src!r}.")
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"`references[{k}]` must be a str or a non-empty list of str, got {refs!r}.")
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"`references[{k}]` must hold only str, got {refs!r}.")
        total += _sari_sentence(_sari_normalize(src), _sari_normalize(pred), [_sari_normalize(r) for r in refs])
    return total / len(predictions)


# --- edit similarity (TRACE Py150) -------------------------------------------------------------------------------

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def _py150_postprocess(code: str) -> str:
    """TRACE ``eval_Py150.postprocess``: bare literal placeholders -> ``0`` / empty, ``<STR_LIT:x>`` -> ``x``."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_similarity(
    predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None
) -> float:
    """Mean fuzzywuzzy ``fuzz.ratio`` / 100 after TRACE's Py150 literal post-processing, implemented with difflib.

    Per pair: ``round(100 * SequenceMatcher(None, pred, ref).ratio())`` (Python's round, half to even, as
    fuzzywuzzy's ``intr``); ``ratio() = 2 M / (len(pred) + len(ref))``. This is fuzzywuzzy's pure-Python path;
    with ``python-Levenshtein`` installed fuzzywuzzy uses a Levenshtein ratio instead, which can differ by a few points.

    Args:
        predictions (`Sequence[str]`): Generated code lines.
        references (`Sequence[str]`): Gold next lines, aligned with ``predictions``.
        sources (`Sequence[str]`, *optional*): Ignored (scorer signature).

    Returns:
        `float`: in [0, 1]; a pair that is empty on either side after post-processing scores 0, as in TRACE.
    """
    _check_texts(predictions, references)
    _check_str_refs(references)
    total = 0
    for p, r in zip(predictions, references):
        p, r = _py150_postprocess(p), _py150_postprocess(r)
        if not p or not r:
            continue  # TRACE skips empty pairs but divides by the full count
        total += int(round(100 * difflib.SequenceMatcher(None, p, r).ratio()))
    return total / len(predictions) / 100


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "first_letter": first_letter_accuracy,
    "rouge_l": rouge_l,
    "sari": sari,
    "edit_similarity": edit_similarity,
}


def get_scorer(name: str) -> Scorer:
    """Look up a task scorer by name.

    Args:
        name (`str`): One of ``SCORERS``: ``exact_match``, ``first_letter``, ``rouge_l``, ``sari``,
            ``edit_similarity``.

    Returns:
        `Callable`: ``fn(predictions, references, sources=None) -> float``.
    """
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; choose one of {sorted(SCORERS)}.")
    return SCORERS[name]
