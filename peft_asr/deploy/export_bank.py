"""A whole bank for a multi-LoRA serving engine: every task as a plain PEFT LoRA adapter, the router apart, and the
map from the router's answer to the adapter (``peft-asr export``).

The layout of ``OUT``:

* ``OUT/<task>/``: task ``<task>`` as a plain LoRA adapter (``model.export_task``, :mod:`peft_asr.tuner.export`):
  ``PeftModel.from_pretrained(base, "OUT/<task>")`` without this package, or any engine's LoRA loader;
* ``OUT/router/``: a router-only folder (:mod:`peft_asr.deploy.shallow_router`): the bank's ``adapter_config.json``
  and ``router.safetensors`` (the router's tensors, no task weights), for
  ``ShallowRouter.from_pretrained("OUT/router", base)``;
* ``OUT/routes.json``: ``{"format": "peft-asr-export", "format_version": 1, "base_model": ..., "router": "router",
  "routes": {"__base__": null, "<task>": "<task>", ...}, "not_exported": [...]}``: every route the router can
  answer with, mapped to its adapter folder (relative to ``OUT``), ``"__base__"`` to ``null`` (serve the plain base
  model); the tasks left out by ``tasks=[...]`` are listed in ``not_exported`` (the router still knows them: a
  service decides what to do with their rows).

Atomic: everything is written into a hidden sibling ``.<name>.export-tmp-<random>``, fsynced, then renamed into
place; a failure leaves no ``OUT`` and no sibling. An existing ``OUT`` is replaced only with ``overwrite=True`` and
only when it is an earlier export (it has a ``routes.json`` of this format): any other non-empty folder is never
deleted. The previous export is renamed aside, the new one renamed in, the old one deleted (a crash between the two
renames leaves both, complete, as hidden siblings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..bank.files import is_asr_model
from ..tuner.config import BASE_ROUTE
from ..tuner.export import output_folder, write_folder_atomically
from .shallow_router import save_router

__all__ = ["export_bank", "check_target", "check_tasks", "ROUTES_FILE", "ROUTER_FOLDER", "EXPORT_FORMAT"]

ROUTES_FILE = "routes.json"
ROUTER_FOLDER = "router"
EXPORT_FORMAT = "peft-asr-export"
FORMAT_VERSION = 1


def _is_export(folder: Path) -> bool:
    try:
        data = json.loads((folder / ROUTES_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == EXPORT_FORMAT


def check_target(out: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """The folder an export goes to, checked before any work: new or empty, or an earlier export with ``overwrite``."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
    target = output_folder(out, "out")
    if target.is_dir() and any(target.iterdir()):
        if not _is_export(target):
            raise FileExistsError(f"{target} is not empty and is not an earlier export (no {ROUTES_FILE}); it is "
                                  "never replaced: choose a new or empty folder.")
        if not overwrite:
            raise FileExistsError(f"{target} holds an earlier export; pass `overwrite=True` (`--overwrite`) to "
                                  "replace it, or choose another folder.")
    return target


def check_tasks(bank: Sequence[str], tasks: Optional[Sequence[str]]) -> list[str]:
    """The tasks to export (``tasks`` of the bank's tasks ``bank``; all for None), checked before any work."""
    bank = list(bank)
    if tasks is None:
        chosen = bank
    elif isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"`tasks` must be a list of task names, got {tasks!r}.")
    else:
        chosen = list(tasks)
    if BASE_ROUTE in chosen:
        raise ValueError(f"{BASE_ROUTE!r} is the base route: it is served by the plain base model and has no adapter; "
                         f"routes.json maps it to null. Export tasks of the bank: {bank}.")
    unknown = [t for t in chosen if t not in bank]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the bank (tasks: {bank}).")
    doubles = sorted({t for t in chosen if chosen.count(t) > 1})
    if doubles:
        raise ValueError(f"tasks {doubles} are listed more than once.")
    if not chosen:
        raise ValueError(f"no task to export; the bank's tasks: {bank}.")
    if ROUTER_FOLDER in chosen:
        raise ValueError(f"task {ROUTER_FOLDER!r} would be written where the router goes (OUT/{ROUTER_FOLDER}/); "
                         "leave it out with `tasks=[...]`, or rename the task in the bank.")
    return chosen


def export_bank(model: Any, out: Union[str, os.PathLike], *, tasks: Optional[Sequence[str]] = None,
                overwrite: bool = False, base_model: Optional[str] = None) -> Path:
    """Write the bank held by ``model`` (a ``PeftModel`` of an ASR bank) for a serving engine; returns ``OUT``.

    Args:
        model: the bank, loaded: ``PeftModel.from_pretrained(base, bank)``.
        out: the folder to write (the layout is in the module docstring).
        tasks: the tasks to export as adapters (default: all); the router keeps every task.
        overwrite: replace an earlier export at ``out``.
        base_model: the base model id routes.json records when the bank records none (``base_model_name_or_path``).
    """
    if not is_asr_model(model):
        raise TypeError(f"`model` must be a PeftModel holding an ASR bank, got {type(model).__name__}; load it with "
                        "`PeftModel.from_pretrained(base, bank)`.")
    target = check_target(out, overwrite)
    chosen = check_tasks(model.tasks, tasks)
    tuner = model.base_model
    config = tuner.bank_config
    routes = {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION,
              "base_model": config.base_model_name_or_path or base_model, "router": ROUTER_FOLDER,
              "routes": {BASE_ROUTE: None, **{t: t for t in chosen}},
              "not_exported": [t for t in model.tasks if t not in chosen]}

    def write(tmp: Path) -> None:
        for task in chosen:
            model.export_task(task, tmp / task)
        save_router(tmp / ROUTER_FOLDER, config, tuner.router)
        (tmp / ROUTES_FILE).write_text(json.dumps(routes, indent=2) + "\n")

    write_folder_atomically(target, write)  # an earlier export is renamed aside, put back if the swap fails
    return target
