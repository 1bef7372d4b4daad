"""`ASRCallback`: the Trainer callback of Analytic Subspace Routing. Thin: it only calls `ASRModel` methods.

* ``on_train_begin``: check, before any training step, that the model has a task being trained and that the train
  data gives batches the router pass can read (one batch goes through the router's checks and shallow blocks), so
  a problem shows now, not after the whole run.
* Evaluation during training (``eval_strategy``, ``eval_on_start``): the model is pinned to the task being trained
  for the evaluation only (the router does not know that task yet), and unpinned when the next step begins (or the
  run ends). Training steps need no pin: a training-mode forward uses the task being trained. So a run that dies
  leaves no pin behind, unless it dies inside an evaluation; then the next ``on_train_begin`` of any ``ASRCallback``
  on that model releases it (the pin is held by the model: ``ASRModel.hold_task`` / ``release_task``).
  ``pin_during_training=True`` keeps the pin for the whole run, for trainers that generate with the task being
  trained (RL rollouts).
* ``on_train_end``: run one no-grad pass of the blocks below ``router_layer`` over the task's training prompts (the
  train dataset, read in order and sharded by process rank, each prompt exactly once whatever the number of epochs
  or what a distributed sampler repeats; packed rows are split into their examples) and fold them into the router;
  in distributed runs the statistics of this pass are summed across processes, so every rank holds the same router.

Custom training loops call the same methods: ``model.add_task(name)``, train, ``model.fit_router(batches, task=name)``.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, reduce
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback


__all__ = ["ASRCallback"]


def _router_loader(dataset, collate_fn, batch_size: int, rank: int, world: int) -> DataLoader:
    """Rows ``rank, rank + world, ...`` of ``dataset`` in order: each prompt once across ranks (a distributed
    sampler would repeat rows to even out the last batch, and count those prompts twice in the router)."""
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size,
                      collate_fn=collate_fn, shuffle=False)


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (float64 kept: gloo and NCCL both reduce float64)."""
    return reduce(tensor, reduction="sum")


def _processes(args) -> tuple[int, int]:
    """This process's rank and the number of processes. ``TrainingArguments`` says (it reads accelerate's state);
    for other callers' arguments, accelerate's state itself."""
    if hasattr(args, "process_index") and hasattr(args, "world_size"):
        return args.process_index, args.world_size
    state = PartialState()
    return state.process_index, state.num_processes


def _reduce_sum(world: int):
    """The sum over processes of the router fit, or None in a single process. Refuses when accelerate's state does
    not know the processes the arguments name: its sum would then return this rank's statistics alone."""
    if world == 1:
        return None
    known = PartialState().num_processes
    if known != world:
        raise RuntimeError(
            f"ASRCallback: the training arguments say {world} processes but accelerate knows {known}, so the router "
            "statistics could not be summed across them. Launch with `torchrun` / `accelerate launch` and a "
            "`Trainer`, or fit the router yourself: `model.fit_router(batches, task=name, reduce_sum=...)`."
        )
    return _sum_over_processes


def _unwrap(model):
    """The PEFT model behind DDP / DeepSpeed / compile wrappers (the Trainer passes it unwrapped: no walk then)."""
    return model if hasattr(model, "fit_router") else extract_model_from_parallel(model)


class ASRCallback(TrainerCallback):
    """Fit the router on the trained task's prompts at the end of ``Trainer.train()``.

    Args:
        task (`str`, *optional*):
            The task being trained; defaults to the model's ``training_task`` (the last one added).
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the router pass.
        pin_during_training (`bool`, *optional*, defaults to `False`):
            Pin the task being trained for the whole ``train()``, not just its evaluations. For trainers that call
            ``generate`` during training and must generate with the task being trained (TRL GRPO/RLOO rollouts):
            without the pin a training-mode ``generate`` routes, and refuses while the router does not know the
            task. The cost: a run that dies keeps the pin until the next ``on_train_begin`` (or
            ``model.release_task()``).
    """

    def __init__(self, task: Optional[str] = None, progress: bool = True, pin_during_training: bool = False) -> None:
        self.task = task
        self.progress = progress
        self.pin_during_training = bool(pin_during_training)
        self.fit_seconds = 0.0  # wall time of the last router fit

    def _task(self, model) -> str:
        task = self.task or model.training_task
        if task is None:
            raise RuntimeError("ASRCallback: no task is being trained; call `model.add_task(name)` before training.")
        return task

    def _router_batches(self, args, train_dataloader, rank: int, world: int):
        if train_dataloader is None:
            raise RuntimeError("ASRCallback needs the Trainer's train dataloader to fit the router.")
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and train_dataloader.collate_fn is not None:
            # read the dataset itself, sharded by rank: each prompt once, whatever the sampler repeats or shuffles
            return _router_loader(dataset, train_dataloader.collate_fn, args.per_device_train_batch_size, rank, world)
        if world == 1:
            return train_dataloader  # an iterable dataset: one pass over the loader
        raise RuntimeError("ASRCallback needs a map-style train dataset in distributed runs (to count each prompt once).")

    def _pin_for_evaluation(self, model) -> None:
        model.hold_task(self._task(model))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = _unwrap(model)
        if not hasattr(model, "fit_router"):
            raise TypeError(
                f"ASRCallback needs an ASR model (`get_peft_model(model, ASRConfig(...))`), got {type(model).__name__}."
            )
        if model.training_task is None and self.task is None:
            raise RuntimeError(
                "ASRCallback: no task is being trained. Call `model.add_task(name)` before training; with TRL, wrap "
                "the model yourself (`model = get_peft_model(base, ASRConfig(...)); model.add_task(name)`) and pass "
                "it as `SFTTrainer(model=model, ...)` instead of `peft_config=ASRConfig(...)`, which leaves no task."
            )
        if train_dataloader is not None:
            rank, world = _processes(args)
            first = next(iter(self._router_batches(args, train_dataloader, rank, world)), None)
            if first is None:
                raise ValueError("ASRCallback: the train dataset gives no batch, so the router would learn nothing.")
            model.router_features(first)  # the router pass's checks, on one batch, before any training step
        model.release_task()  # a pin left by an evaluation of an earlier run that died
        if self.pin_during_training or getattr(args, "eval_on_start", False):
            self._pin_for_evaluation(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._pin_for_evaluation(_unwrap(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._pin_for_evaluation(_unwrap(model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # not at `on_evaluate`: with several eval datasets `Trainer.evaluate` fires it after each one
        if not self.pin_during_training:
            _unwrap(model).release_task()

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = _unwrap(model)
        model.release_task()
        rank, world = _processes(args)
        batches = self._router_batches(args, train_dataloader, rank, world)
        start = time.perf_counter()
        model.fit_router(batches, task=self._task(model), progress=self.progress and state.is_local_process_zero,
                         reduce_sum=_reduce_sum(world))
        self.fit_seconds = time.perf_counter() - start
