"""Evaluation metrics for continual learning: the accuracy matrix and routing.

Pure Python / numpy: no model, no ``peft`` or ``transformers`` import, so every number here can be checked by hand
(``tests/test_metrics.py`` does).

Continual-learning metrics. After training tasks ``0..t`` in order, the model is evaluated on every task; ``R[t][i]``
is its score on task ``i`` (in [0, 1]). ``R`` is ``T x T``; the diagonal and the last row must be measured (OP and
BWT need them); every other entry may be NaN / None when it was not evaluated, and only the metrics that need it
are then unavailable: FWT needs ``R[i-1][i]``, forgetting every ``R[l][i]`` with ``i <= l <= T-2``.
``cl_summary`` gives None for a metric whose entries are missing. With ``b[i]`` the base model's score on task ``i``:

    OP          = 1/T     * sum_{i=0}^{T-1} R[T-1][i]                                                  (1)
    BWT         = 1/(T-1) * sum_{i=0}^{T-2} (R[T-1][i] - R[i][i])                                      (2)
    FWT         = 1/(T-1) * sum_{i=1}^{T-1} (R[i-1][i] - b[i])                                         (3)
    Forgetting  = 1/(T-1) * sum_{i=0}^{T-2} (max_{l in [i, T-2]} R[l][i] - R[T-1][i])                  (4)

(1) is TRACE's "overall performance" (OP; Wang et al. 2023) and the "average accuracy" of Lopez-Paz & Ranzato 2017
(GEM) and O-LoRA; (2) and (3) are GEM's BWT and FWT (TRACE reports BWT the same way); (4) is the average forgetting of
Chaudhry et al. 2018 (RWalk). BWT < 0 means forgetting, FWT > 0 means earlier tasks helped a task before it was
trained. With ``T = 1`` there is no earlier task: BWT and forgetting are 0.0 and FWT is None.

Intervals. ``bootstrap_intervals`` resamples each task's evaluation prompts with replacement (the same draw for
that task at every stage, so a task's score just after training and at the end move together) and reports the
percentile interval of OP and BWT over the resamples: the uncertainty that comes from the finite test sets, not from
the training seed; with ``versus`` (another method's scores of the same prompts) it also gives the paired interval of
the difference of the two OPs. ``token_agreement`` compares two generated token sequences position by position (the drift of an
answer from the base model's).

Routing metrics. ``routing_confusion`` counts (true route, predicted route) pairs; rows are true routes, columns
predicted ones, in the order of ``labels`` (which may include the base route ``"__base__"``).
``routing_accuracy`` is its trace over its sum.

The task scorers are in ``peft_asr.cl.scorers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .intervals import bootstrap_intervals

__all__ = [
    "average_performance",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "cl_summary",
    "routing_confusion",
    "routing_accuracy",
    "check_same_length",
    "percent",
    "bootstrap_intervals",
    "token_agreement",
]


def _as_matrix(scores: Any) -> np.ndarray:
    """Validate an accuracy matrix and return it as a (T, T) float64 array (None -> NaN)."""
    if hasattr(scores, "detach"):  # torch.Tensor: (T, T) -> numpy, without importing torch here
        scores = scores.detach().cpu().double().numpy()
    if isinstance(scores, np.ndarray):
        if scores.ndim != 2:
            raise ValueError(f"`R` must be a square T x T matrix, got an array of shape {scores.shape}.")
        rows = scores.tolist()
    elif isinstance(scores, Sequence) and not isinstance(scores, str):
        rows = list(scores)
    else:
        raise ValueError(f"`R` must be a square T x T matrix (list of rows or array), got {type(scores).__name__}.")
    t = len(rows)
    if t == 0:
        raise ValueError("`R` must hold at least one task, got an empty matrix.")
    for k, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, (Sequence, np.ndarray)) or len(row) != t:
            got = len(row) if isinstance(row, (Sequence, np.ndarray)) else type(row).__name__
            raise ValueError(
                f"`R` must be a square T x T matrix (T = {t} rows), but row {k} has {got} entries. Fill the tasks "
                "not trained yet (above the diagonal) with NaN or None instead of leaving the row short."
            )
    out = np.full((t, t), np.nan, dtype=np.float64)
    for k, row in enumerate(rows):
        for i, value in enumerate(row):
            if value is None:
                continue
            try:
                out[k, i] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"`R[{k}][{i}]` must be a number in [0, 1] or None, got {value!r}.") from None
    for k in range(t):
        for i in range(t):
            v = float(out[k, i])
            if (i == k or (k == t - 1 and i <= k)) and not math.isfinite(v):
                raise ValueError(
                    f"`R[{k}][{i}]` must be a score in [0, 1] (task {i} was trained by row {k}), got {v!r}. The "
                    "diagonal and the last row must be measured; only other entries may be NaN or None."
                )
            if not math.isnan(v) and not 0.0 <= v <= 1.0:
                hint = " Scores must be fractions: divide 0-100 scores by 100." if 1.0 < v <= 100.0 else ""
                raise ValueError(f"`R[{k}][{i}]` must be in [0, 1], got {v!r}.{hint}")
    return out


def average_performance(R: Any) -> float:
    """Overall performance (OP), eq. (1): the mean score over all ``T`` tasks after training the last one.

    Args:
        R (`Sequence[Sequence[float | None]]` or `np.ndarray` or `torch.Tensor`):
            The ``T x T`` accuracy matrix, ``R[t][i]`` = score on task ``i`` after training tasks ``0..t``.

    Returns:
        `float`: ``mean_i R[T-1][i]``, in [0, 1].
    """
    r = _as_matrix(R)
    return float(r[-1].mean())


def backward_transfer(R: Any) -> float:
    """Backward transfer (BWT), eq. (2): how training later tasks changed the score on earlier ones.

    Negative values mean forgetting. Lopez-Paz & Ranzato 2017 (GEM); TRACE reports the same quantity.

    Args:
        R (`Sequence[Sequence[float | None]]` or `np.ndarray` or `torch.Tensor`):
            The ``T x T`` accuracy matrix (see :func:`average_performance`).

    Returns:
        `float`: in [-1, 1]; 0.0 when ``T = 1`` (no earlier task).
    """
    r = _as_matrix(R)
    t = r.shape[0]
    if t == 1:
        return 0.0
    # last row minus the diagonal, over the T-1 tasks that had a later task trained after them
    return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def forward_transfer(R: Any, baseline: Sequence[float | None]) -> float | None:
    """Forward transfer (FWT), eq. (3): the score on task ``i`` just before training it, minus the base model's.

    Lopez-Paz & Ranzato 2017 (GEM). Needs the entries just above the diagonal, ``R[i-1][i]``: evaluate each task once
    before training on it.

    Args:
        R (`Sequence[Sequence[float | None]]` or `np.ndarray` or `torch.Tensor`):
            The ``T x T`` accuracy matrix (see :func:`average_performance`).
        baseline (`Sequence[float | None]`):
            The base model's score on each of the ``T`` tasks (GEM's ``b_i``: a model that has trained on nothing).
            ``baseline[0]`` is not used and may be None.

    Returns:
        `float | None`: in [-1, 1]; None when ``T = 1`` (no task was seen after an earlier one).
    """
    r = _as_matrix(R)
    t = r.shape[0]
    _check_baseline(baseline, t)
    if t == 1:
        return None
    diffs = []
    for i in range(1, t):
        if math.isnan(r[i - 1, i]):
            raise ValueError(
                f"FWT needs `R[{i - 1}][{i}]` (the score on task {i} before training it), got NaN/None. Evaluate "
                f"task {i} after training task {i - 1}, or call `cl_summary(R)` without a baseline."
            )
        diffs.append(r[i - 1, i] - float(baseline[i]))
    return float(np.mean(diffs))


def _check_baseline(baseline: Any, t: int) -> None:
    if isinstance(baseline, str) or not isinstance(baseline, (Sequence, np.ndarray)) or len(baseline) != t:
        got = len(baseline) if isinstance(baseline, (Sequence, np.ndarray)) else type(baseline).__name__
        raise ValueError(f"`baseline` must hold one base-model score per task ({t}), got {got}.")
    for i in range(1, t):
        b = baseline[i]
        if b is None or isinstance(b, bool) or not isinstance(b, (int, float, np.number)) or not 0.0 <= b <= 1.0:
            raise ValueError(f"`baseline[{i}]` must be a score in [0, 1], got {b!r}.")


def forgetting(R: Any) -> float:
    """Average forgetting, eq. (4) (Chaudhry et al. 2018): best score a task ever had minus its final score.

    Args:
        R (`Sequence[Sequence[float | None]]` or `np.ndarray` or `torch.Tensor`):
            The ``T x T`` accuracy matrix (see :func:`average_performance`).

    Returns:
        `float`: in [-1, 1]; positive means forgetting, negative means final scores above every earlier one (the max
        runs over ``l <= T-2`` only); 0.0 when ``T = 1``.
    """
    r = _as_matrix(R)
    t = r.shape[0]
    if t == 1:
        return 0.0
    for i in range(t - 1):
        for l in range(i, t - 1):
            if math.isnan(r[l, i]):
                raise ValueError(
                    f"forgetting needs `R[{l}][{i}]` (task {i}'s score after stage {l}), got NaN/None. Evaluate every "
                    "trained task after every stage, or use BWT, which needs only the diagonal and the last row."
                )
    # for task i, the max runs over the rows l = i..T-2 (after it was trained, before the last task)
    per_task = [r[i : t - 1, i].max() - r[t - 1, i] for i in range(t - 1)]
    return float(np.mean(per_task))


def cl_summary(R: Any, baseline: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """All continual-learning metrics of eq. (1)-(4) in one dict.

    Args:
        R (`Sequence[Sequence[float | None]]` or `np.ndarray` or `torch.Tensor`):
            The ``T x T`` accuracy matrix (see :func:`average_performance`).
        baseline (`Sequence[float | None]`, *optional*, defaults to `None`):
            The base model's score per task; without it ``fwt`` is None.

    Returns:
        `dict[str, float | None]`: keys ``op``, ``bwt``, ``fwt``, ``forgetting``; ``fwt`` is None without a baseline
        or when an entry ``R[i-1][i]`` was not measured, ``forgetting`` None when an entry below the diagonal of the
        rows ``0..T-2`` was not (e.g. only the diagonal and the last row were evaluated).
    """
    r = _as_matrix(R)
    t = r.shape[0]
    fwt = None
    if baseline is not None:
        _check_baseline(baseline, t)
        if not any(math.isnan(r[i - 1, i]) for i in range(1, t)):
            fwt = forward_transfer(r, baseline)
    measured = all(math.isfinite(r[l, i]) for i in range(t - 1) for l in range(i, t - 1))
    return {
        "op": average_performance(r),
        "bwt": backward_transfer(r),
        "fwt": fwt,
        "forgetting": forgetting(r) if measured else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Routing metrics
# ---------------------------------------------------------------------------------------------------------------


def check_same_length(a_name: str, a: Sequence, b_name: str, b: Sequence) -> None:
    for name, seq in ((a_name, a), (b_name, b)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise ValueError(f"`{name}` must be a list, got {type(seq).__name__}.")
    if len(a) != len(b):
        raise ValueError(f"`{a_name}` has {len(a)} items but `{b_name}` has {len(b)}; they must be aligned.")
    if len(a) == 0:
        raise ValueError(f"`{a_name}` and `{b_name}` are empty; a metric needs at least one item.")


def routing_confusion(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Confusion matrix of routes: ``C[a][b]`` = number of rows of task ``labels[a]`` routed to ``labels[b]``.

    Args:
        true (`Sequence[str]`): The task each row belongs to.
        pred (`Sequence[str]`): The route the router chose for each row.
        labels (`Sequence[str]`):
            Row / column order; every value of ``true`` and ``pred`` must be in it. May include the base route
            ``"__base__"``.

    Returns:
        `list[list[int]]`: ``len(labels) x len(labels)``, rows true, columns predicted.
    """
    check_same_length("true", true, "pred", pred)
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) == 0:
        raise ValueError(f"`labels` must be a non-empty list of route names, got {labels!r}.")
    index = {}
    for k, label in enumerate(labels):
        if label in index:
            raise ValueError(f"`labels` must be unique, but {label!r} appears twice: {list(labels)!r}.")
        index[label] = k
    matrix = [[0] * len(labels) for _ in labels]
    for name, seq in (("true", true), ("pred", pred)):
        unknown = sorted({str(x) for x in seq if x not in index})
        if unknown:
            raise ValueError(
                f"`{name}` holds routes that are not in `labels`: {unknown}. Add them to `labels` "
                f"(labels: {list(labels)!r})."
            )
    for a, b in zip(true, pred):
        matrix[index[a]][index[b]] += 1
    return matrix


def routing_accuracy(true: Sequence[str], pred: Sequence[str]) -> float:
    """Fraction of rows routed to their own task.

    Args:
        true (`Sequence[str]`): The task each row belongs to.
        pred (`Sequence[str]`): The route the router chose for each row.

    Returns:
        `float`: in [0, 1].
    """
    check_same_length("true", true, "pred", pred)
    return sum(a == b for a, b in zip(true, pred)) / len(true)


def percent(value: float | None, signed: bool = False, width: int = 0) -> str:
    """A score in [0, 1] as a percentage with one decimal (signed for differences: BWT, FWT), ``-`` for None,
    right-aligned to ``width``: the one format of the terminal report and of the bank card."""
    text = "-" if value is None else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")
    return text.rjust(width)


# ---------------------------------------------------------------------------------------------------------------
# Intervals and answer drift
# ---------------------------------------------------------------------------------------------------------------


def token_agreement(tokens: Sequence[Any], reference: Sequence[Any]) -> float:
    """Share of positions where two generated sequences agree: ``sum_k 1[a_k == b_k] / max(|a|, |b|)``.

    Compares, e.g., a fine-tuned model's greedy answer with the base model's (token ids or strings, up to the end of
    sequence): 1.0 means the same answer, a position beyond the shorter sequence counts as a disagreement. Two empty
    sequences agree (1.0).
    """
    for name, seq in (("tokens", tokens), ("reference", reference)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise ValueError(f"`{name}` must be a sequence of tokens, got {type(seq).__name__}.")
    longest = max(len(tokens), len(reference))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(tokens, reference)) / longest
