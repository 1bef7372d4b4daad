"""`ASRCallback`: the Trainer callback of Analytic Subspace Routing. Thin: it only calls `ASRModel` methods.

* ``on_train_begin``: pin the model to the task being trained, so evaluation during training measures that task
  (the router does not know it yet).
* ``on_train_end``: unpin, then run one no-grad pass of the blocks below ``router_layer`` over the task's training
  prompts (the train dataset, read in order and sharded by process rank, each prompt exactly once whatever the number
  of epochs or what a distributed sampler repeats) and fold them into the router; in distributed runs the statistics
  of this pass are summed across processes, so every rank holds the same router.

Custom training loops call the same methods: ``model.add_task(name)``, train, ``model.fit_router(batches, task=name)``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
from transformers import TrainerCallback

from .data import shard_batches

__all__ = ["ASRCallback"]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (float64 kept: gloo and NCCL both reduce float64)."""
    out = tensor.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def _unwrap(model):
    """The PEFT model behind DDP / accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "base_model"):
        model = model.module
    return model


class ASRCallback(TrainerCallback):
    """Fit the router on the trained task's prompts at the end of ``Trainer.train()``.

    Args:
        task (`str`, *optional*):
            The task being trained; defaults to the model's ``training_task`` (the last one added).
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the router pass.
    """

    def __init__(self, task: Optional[str] = None, progress: bool = True) -> None:
        self.task = task
        self.progress = progress
        self.fit_seconds = 0.0  # wall time of the last router fit
        self._pin = contextlib.ExitStack()

    def _task(self, model) -> str:
        task = self.task or model.training_task
        if task is None:
            raise RuntimeError("ASRCallback: no task is being trained; call `model.add_task(name)` before training.")
        return task

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        self._pin.close()
        self._pin.enter_context(model.use_task(self._task(model)))

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = _unwrap(model)
        self._pin.close()
        if train_dataloader is None:
            raise RuntimeError("ASRCallback needs the Trainer's train dataloader to fit the router.")
        rank, world = _rank_and_world()
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and train_dataloader.collate_fn is not None:
            # read the dataset itself, sharded by rank: each prompt once, whatever the sampler repeats or shuffles
            batches = shard_batches(dataset, train_dataloader.collate_fn, batch_size=args.per_device_train_batch_size,
                                    rank=rank, world_size=world)
        elif world == 1:
            batches = train_dataloader  # an iterable dataset: one pass over the loader
        else:
            raise RuntimeError("ASRCallback needs a map-style train dataset in distributed runs (to count each prompt once).")
        start = time.perf_counter()
        model.fit_router(batches, task=self._task(model), progress=self.progress and state.is_local_process_zero,
                         reduce_sum=_all_reduce_sum if world > 1 else None)
        self.fit_seconds = time.perf_counter() - start
