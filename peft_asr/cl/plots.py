"""Pictures of a stream run: accuracy-matrix heat maps side by side, the routing confusion matrix, a score-vs-steps
curve (how many steps a task needs) and OP per method with its interval.

Needs matplotlib (``pip install "peft-asr[cl]"``); it is drawn off-screen (Agg backend), so it works on servers.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

__all__ = ["plot_accuracy_matrices", "plot_routing_confusion", "plot_score_curves", "plot_op_by_method"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "peft-asr[cl]"') from None
    return plt


def _as_dict(results) -> dict:
    return results.to_dict() if hasattr(results, "to_dict") else dict(results)


def plot_accuracy_matrices(results: Mapping[str, object], path: Union[str, os.PathLike]) -> str:
    """Heat maps of ``R[t][i]`` (rows: after training task t; columns: task i), one panel per method.

    ``results`` maps a method name to a :class:`~peft_asr.cl.runner.StreamResults` (or its dict). Returns ``path``.
    """
    plt = _pyplot()
    items = [(name, _as_dict(r)) for name, r in results.items()]
    if not items:
        raise ValueError("`results` is empty: nothing to plot.")
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items) + 0.8, 4.2), squeeze=False)
    for column, (ax, (name, data)) in enumerate(zip(axes[0], items)):
        tasks = data["tasks"]
        # entries that were not evaluated (None, e.g. eval_scope="seen+next") are drawn blank
        matrix = [[float("nan") if v is None else 100 * v for v in row] for row in data["matrix"]]
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for t, row in enumerate(matrix):
            for i, value in enumerate(row):
                if value != value:  # NaN
                    continue
                ax.text(i, t, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black",
                        fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        # the rows are the same stages in every panel: label them once, on the left
        ax.set_yticks(range(len(matrix)), [f"after {tasks[t]}" for t in range(len(matrix))] if column == 0 else [])
        op = data.get("summary", {}).get("op")
        bwt = data.get("summary", {}).get("bwt")
        subtitle = f"OP {100 * op:.1f}  BWT {100 * bwt:+.1f}" if op is not None and bwt is not None else ""
        ax.set_title(f"{name}\n{subtitle}")
        ax.set_xlabel("evaluated task")
    fig.colorbar(image, ax=axes[0].tolist(), label="score (%)", shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_routing_confusion(labels: Sequence[str], confusion: Sequence[Sequence[int]],
                           path: Union[str, os.PathLike], title: str = "routing confusion") -> str:
    """Row-normalised confusion of the router (rows: true task; columns: chosen route). Returns ``path``."""
    plt = _pyplot()
    if len(confusion) != len(labels) or any(len(row) != len(labels) for row in confusion):
        raise ValueError(f"`confusion` must be {len(labels)} x {len(labels)} (one row and column per label).")
    # the base route has no prompts of its own unless general data was scored: drop its empty row
    kept = [(label, row) for label, row in zip(labels, confusion) if sum(row) > 0 or label != "__base__"]
    true_labels = [label for label, _ in kept]
    confusion = [row for _, row in kept]
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2.5, 0.8 * len(true_labels) + 2))
    shares = []
    for row in confusion:
        total = sum(row) or 1
        shares.append([100 * c / total for c in row])
    ax.imshow(shares, vmin=0, vmax=100, cmap="Blues")
    for r, row in enumerate(confusion):
        for c, count in enumerate(row):
            ax.text(c, r, str(count), ha="center", va="center", color="white" if shares[r][c] > 60 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(true_labels)), true_labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_score_curves(curves: Mapping[str, Mapping[str, Sequence]], path: Union[str, os.PathLike], *,
                      chosen: Optional[int] = None, title: str = "score against training steps") -> str:
    """Score (%) against optimizer steps, one line per task; ``chosen`` draws the step count picked from them.

    ``curves`` maps a task name to ``{"steps": [...], "scores": [...]}`` (scores in [0, 1]), optionally with
    ``"low"`` / ``"high"`` (an interval per point, drawn as a band). Returns ``path``.
    """
    plt = _pyplot()
    if not curves:
        raise ValueError("`curves` is empty: nothing to plot.")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve in curves.items():
        steps, scores = list(curve["steps"]), [100 * v for v in curve["scores"]]
        if len(steps) != len(scores) or not steps:
            raise ValueError(f"curve {name!r}: `steps` and `scores` must be non-empty and of the same length.")
        (line,) = ax.plot(steps, scores, marker="o", label=name)
        if curve.get("low") is not None and curve.get("high") is not None:
            ax.fill_between(steps, [100 * v for v in curve["low"]], [100 * v for v in curve["high"]],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if chosen is not None:
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"chosen: {chosen} steps", (chosen, ax.get_ylim()[1]), textcoords="offset points",
                    xytext=(4, -12), fontsize=9)
    ax.set_xlabel("optimizer steps (one task)")
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_op_by_method(groups: Mapping[str, Mapping[str, Sequence]], path: Union[str, os.PathLike], *,
                      title: str = "OP per method") -> str:
    """Grouped bars of OP (%), one group per stream, one bar per method, with error bars from their interval.

    ``groups`` maps a stream to ``{method: (op, low, high)}`` (in [0, 1]; ``low``/``high`` None: no error bar).
    Returns ``path``.
    """
    plt = _pyplot()
    if not groups or not any(groups.values()):
        raise ValueError("`groups` is empty: nothing to plot.")
    methods = list(dict.fromkeys(m for bars in groups.values() for m in bars))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * len(methods) ** 0.5 + 3), 4.2))
    colors = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        xs, ops, err = [], [], [[], []]
        for g, bars in enumerate(groups.values()):
            if method not in bars:
                continue
            op, low, high = bars[method]
            xs.append(g + (k - (len(methods) - 1) / 2) * width)
            ops.append(100 * op)
            err[0].append(0.0 if low is None else 100 * (op - low))
            err[1].append(0.0 if high is None else 100 * (high - op))
        ax.bar(xs, ops, width=width, yerr=err, capsize=2, label=method, color=colors(k % 10))
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("OP (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(methods), 4))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
