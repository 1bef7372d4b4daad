"""The task-by-task reference kernel of the routed LoRA update, for the kernel benchmark and its equality test.

Not in the package: every routed forward uses ``peft_asr.tuner.layer.gathered_delta``. ``use_grouped()`` swaps this
one in for the length of a ``with`` block (``perf_inference.py`` measures both; ``tests/test_routed_path.py`` checks
that they agree).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["grouped_delta", "use_grouped"]


def grouped_delta(x: torch.Tensor, task_ids: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """The update of ``gathered_delta`` computed task by task: one pair of matmuls per task present in the batch.

    Reads ``task_ids`` on the host (one sync) to find the tasks present.
    """
    delta = x.new_zeros(*x.shape[:-1], b_all.shape[1], dtype=a_all.dtype)  # (B, L, out)
    for cls in torch.unique(task_ids).tolist():  # host sync
        if cls == 0:
            continue
        rows = (task_ids == cls).nonzero().flatten()  # (n,)
        xi = x.index_select(0, rows).to(a_all.dtype)  # (n, L, in)
        update = nn.functional.linear(nn.functional.linear(xi, a_all[cls - 1]), b_all[cls - 1]) * scaling
        delta.index_copy_(0, rows, update)  # (n, L, out) into the rows of task cls
    return delta


@contextlib.contextmanager
def use_grouped() -> Iterator[None]:
    """Routed forwards inside the block use `grouped_delta` instead of the package's kernel."""
    import peft_asr.tuner.layer as layer

    original = layer.gathered_delta
    layer.gathered_delta = grouped_delta
    try:
        yield
    finally:
        layer.gathered_delta = original
