"""Percentile bootstrap intervals of OP and BWT (and of the OP difference of two methods) over test prompts.

Apart from ``metrics`` (the point values), which re-exports ``bootstrap_intervals``: one job per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_intervals"]


def _item_scores(name: str, rows: Any, count: int) -> list[np.ndarray]:
    if isinstance(rows, str) or not isinstance(rows, Sequence) or len(rows) != count:
        got = len(rows) if isinstance(rows, Sequence) and not isinstance(rows, str) else type(rows).__name__
        raise ValueError(f"`{name}` must hold one list of per-prompt scores per task ({count}), got {got}.")
    out = []
    for i, row in enumerate(rows):
        values = np.asarray(row, dtype=np.float64) if isinstance(row, (Sequence, np.ndarray)) else None
        if values is None or values.ndim != 1 or values.size == 0:
            raise ValueError(f"`{name}[{i}]` must be a non-empty list of per-prompt scores, got {row!r:.60}.")
        if not (np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()):
            raise ValueError(f"`{name}[{i}]` must hold scores in [0, 1], got {values.min()!r}..{values.max()!r}.")
        out.append(values)
    return out


def bootstrap_intervals(
    final: Sequence[Sequence[float]],
    diagonal: Sequence[Sequence[float]] | None = None,
    *,
    versus: Sequence[Sequence[float]] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of OP and BWT, resampling each task's evaluation prompts.

    Args:
        final (`Sequence[Sequence[float]]`): per task ``i``, the score of each of its evaluation prompts after the
            last stage (the items behind ``R[T-1][i]``).
        diagonal (`Sequence[Sequence[float]]`, *optional*): per task ``i``, the scores of the *same prompts in the
            same order* just after training task ``i`` (behind ``R[i][i]``); needed for BWT.
        versus (`Sequence[Sequence[float]]`, *optional*): per task ``i``, another method's final scores of the *same
            prompts in the same order*; adds ``op_diff``, the interval of ``OP(final) - OP(versus)`` with the two
            methods' prompts drawn together (a paired comparison: far narrower than two separate intervals).
        n_resamples (`int`): bootstrap resamples.
        confidence (`float`): coverage of the interval, in (0, 1).
        seed (`int`): seed of the resampling (``numpy.random.default_rng``).

    Each resample draws, for every task, as many prompts as it has, with replacement; a task's draw is shared by its
    final and diagonal scores (the two are paired). OP and BWT of eq. (1) and (2) are computed on every resample and
    the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles reported. ``scipy.stats.bootstrap`` is not
    used: it pairs samples only when all have the same length, and task test sets differ in size.

    Returns:
        `dict`: ``op`` and ``bwt`` as ``(low, high)``; ``bwt`` is None without ``diagonal`` or when ``T = 1``; with
        ``versus``, ``op_diff`` as well.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"`n_resamples` must be an int >= 1, got {n_resamples!r}.")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {confidence!r}.")
    count = len(final) if isinstance(final, Sequence) and not isinstance(final, str) else -1
    if count < 1:
        raise ValueError(f"`final` must hold one list of per-prompt scores per task, got {final!r:.60}.")
    last = _item_scores("final", final, count)
    paired = {}
    for name, rows in (("diagonal", diagonal), ("versus", versus)):
        if rows is None:
            continue
        paired[name] = _item_scores(name, rows, count)
        for i, (a, b) in enumerate(zip(last, paired[name])):
            if a.size != b.size:
                raise ValueError(f"task {i} has {a.size} final scores but {b.size} {name} ones; both must score the "
                                 "same prompts in the same order.")
    diag, other = paired.get("diagonal"), paired.get("versus")
    rng = np.random.default_rng(seed)
    op = np.zeros(n_resamples)
    bwt = np.zeros(n_resamples)
    diff = np.zeros(n_resamples)
    for i, scores in enumerate(last):
        idx = rng.integers(0, scores.size, size=(n_resamples, scores.size))  # (B, n_i) prompts drawn
        final_i = scores[idx].mean(axis=1)  # (B,)
        op += final_i / count
        if diag is not None and i < count - 1:
            bwt += (final_i - diag[i][idx].mean(axis=1)) / (count - 1)
        if other is not None:
            diff += (final_i - other[i][idx].mean(axis=1)) / count
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.quantile(values, tails)
        return float(low), float(high)

    out = {"op": interval(op), "bwt": interval(bwt) if diag is not None and count > 1 else None}
    if other is not None:
        out["op_diff"] = interval(diff)
    return out
