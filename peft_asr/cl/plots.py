"""Pictures of a stream run: accuracy-matrix heat maps side by side, and the routing confusion matrix.

Needs matplotlib (``pip install "peft-asr[cl]"``); it is drawn off-screen (Agg backend), so it works on servers.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Union

__all__ = ["plot_accuracy_matrices", "plot_routing_confusion"]


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
