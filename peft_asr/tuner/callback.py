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
* During training (``harvest=True``, the default): the router features of the rows the model trains on are pooled
  from the training forwards themselves (:mod:`peft_asr.tuner.harvest`), so the pass at the end has little or
  nothing left to run. The pending statistics are saved in each checkpoint (``asr_router_harvest.safetensors``, one per
  process) and restored when ``train(resume_from_checkpoint=...)`` resumes from a checkpoint in ``output_dir``.
* ``on_train_end``: fold the task's training prompts into the router (the train dataset, read in order and sharded
  by process rank, each prompt exactly once whatever the number of epochs or what a distributed sampler repeats;
  packed rows are split into their examples): the harvested rows from their pending statistics, the others by one
  no-grad pass of the blocks below ``router_layer``. In distributed runs the statistics are summed across processes,
  so every rank holds the same router.

Custom training loops call the same methods: ``model.add_task(name)``, train, ``model.fit_router(batches, task=name)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from accelerate.utils import extract_model_from_parallel, reduce
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback

from .harvest import HarvestMismatch


__all__ = ["ASRCallback", "HARVEST_FILE"]

logger = logging.getLogger(__name__)
HARVEST_FILE = "asr_router_harvest.safetensors"  # in a checkpoint folder: this process's pending router statistics


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
        harvest (`bool`, *optional*, defaults to `True`):
            Pool the router features of the trained rows from the training forwards (:mod:`peft_asr.tuner.harvest`),
            so that only the rows training did not see run the router pass at the end. It turns itself off, with
            the reason in ``harvest_report``, where a training forward's features are not the router's.
    """

    def __init__(self, task: Optional[str] = None, progress: bool = True, pin_during_training: bool = False,
                 harvest: bool = True) -> None:
        self.task = task
        self.progress = progress
        self.pin_during_training = bool(pin_during_training)
        self.harvest = bool(harvest)
        self.fit_seconds = 0.0  # wall time of the last router fit
        self.harvest_report: dict = {}  # rows harvested / passed at the end of the last fit, and why not more
        self._harvest = None

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
            if self.harvest and not self._harvest_unsupported(args, model):
                batches = self._router_batches(args, train_dataloader, rank, world)
                # the dataset read in order gives the rows the fit will read; an iterable one is not read twice here
                self._start_harvest(args, state, model, None if batches is train_dataloader else batches)
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

    # ------------------------------------------------------------------ the harvest
    def _harvest_unsupported(self, args, model) -> bool:
        if self.task is not None and self.task != model.training_task:
            self.harvest_report = {"blocker": f"the callback fits {self.task!r}, the model trains {model.training_task!r}"}
            return True
        return False

    def _start_harvest(self, args, state, model, batches) -> None:
        start = time.perf_counter()
        self._harvest = model.start_router_harvest(batches)
        self._harvest.seconds = time.perf_counter() - start  # reading the rows' keys counts as harvest time
        if self._harvest.blocker is not None:
            logger.info("ASRCallback: router features are not harvested from training (%s); the router pass runs "
                        "at the end.", self._harvest.blocker)
            return
        if state.global_step > 0:  # resumed: the pending statistics of the checkpoint, if it is in output_dir
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", _harvest_file(args))
            if os.path.isfile(path):
                try:
                    self._harvest.load_state_dict(_read_harvest(path))
                except (HarvestMismatch, KeyError) as error:
                    logger.warning("ASRCallback: %s is not used (%s); those rows run the router pass.", path, error)

    def on_save(self, args, state, control, **kwargs):
        if self._harvest is not None and self._harvest.blocker is None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                path = os.path.join(folder, _harvest_file(args))
                _write_harvest(self._harvest.state_dict(), path)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = _unwrap(model)
        model.release_task()
        harvest, self._harvest = self._harvest, None
        model.stop_router_harvest()
        rank, world = _processes(args)
        batches = self._router_batches(args, train_dataloader, rank, world)
        start = time.perf_counter()
        fit = dict(task=self._task(model), progress=self.progress and state.is_local_process_zero,
                   reduce_sum=_reduce_sum(world))
        usable = harvest if harvest is not None and harvest.blocker is None and harvest.rows else None
        try:
            model.fit_router(batches, harvest=usable, **fit)
        except HarvestMismatch as error:  # the router is unchanged: every row runs the pass
            logger.warning("ASRCallback: the harvested router features are not used (%s).", error)
            usable = None
            model.fit_router(batches, **fit)
        self.fit_seconds = time.perf_counter() - start
        self.harvest_report = {"harvested_rows": usable.rows if usable is not None else 0,
                               "blocker": harvest.blocker if harvest is not None else self.harvest_report.get("blocker"),
                               "skipped_calls": dict(harvest.skipped) if harvest is not None else {},
                               "seconds": harvest.seconds if harvest is not None else 0.0}


def _harvest_file(args) -> str:
    index = getattr(args, "process_index", 0)
    return HARVEST_FILE if not index else HARVEST_FILE.replace(".pt", f"-{index}.pt")


def _write_harvest(state: dict, path: str) -> None:
    """The harvest's tensors as safetensors, its keys and settings as JSON metadata (no pickle)."""
    meta = {k: json.dumps(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def _read_harvest(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        state = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state.update({k: f.get_tensor(k) for k in f.keys()})
    return state
