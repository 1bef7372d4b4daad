"""`ASRCallback`: the Trainer callback of Analytic Subspace Routing. Thin: it only calls `ASRModel` methods.

* ``on_train_begin``: pin the model to the task being trained, so evaluation during training measures that task
  (the router does not know it yet).
* ``on_train_end``: unpin, then run one no-grad pass of the blocks below ``router_layer`` over the task's training
  prompts (the train dataloader, each prompt once whatever the number of epochs) and fold them into the router.

Custom training loops call the same methods: ``model.add_task(name)``, train, ``model.fit_router(batches, task=name)``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

from transformers import TrainerCallback

__all__ = ["ASRCallback"]


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
        start = time.perf_counter()
        model.fit_router(train_dataloader, task=self._task(model), progress=self.progress and state.is_local_process_zero)
        self.fit_seconds = time.perf_counter() - start
