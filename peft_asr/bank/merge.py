"""Merge banks trained apart into one bank whose router equals joint training on all their tasks.

The router keeps sufficient statistics (``G = sum phi^T phi``, ``C = sum phi^T y``; see :mod:`peft_asr.tuner.rls`). Banks
trained separately on the same frozen base model and router settings saw disjoint samples, so the statistics of
their union are the sums: ``G = G_a + G_b``, the base-route column of ``C`` adds up, and the task columns are placed
side by side. Solving from the merged statistics gives exactly the router of one run over all the tasks. Every task's
LoRA subspace is copied unchanged. Merging works on the files alone: no model is loaded. A bank named by a Hub repo
id is read from the Hub cache after :func:`~peft_asr.bank.io.resolve_bank` fetched and checked its files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from ..tuner.config import ASRConfig
from ..tuner.errors import BankError
from ..tuner.router import AnalyticRouter
from .atomic import atomic_save
from .card import write_card
from .check import check_bank
from .files import ROUTER_PREFIX, STATISTICS_FILE, WEIGHTS_FILE
from .io import resolve_bank

__all__ = ["merge_banks"]

# settings that must be equal for statistics (and subspaces) to be combinable
MUST_MATCH = ("base_model_name_or_path", "base_hidden_size", "base_num_layers", "task_type", "router_layer",
              "feature_dim", "activation", "ridge", "router_pooling", "router_head", "router_shrinkage",
              "router_seed", "r", "lora_alpha", "target_modules",
              "layers_pattern", "layers_to_transform")


def _read_bank(name: str, folder: str) -> tuple[ASRConfig, dict, dict]:
    config, stats = check_bank(folder)  # strict config, safetensors only, statistics that match the weight
    if stats is None:
        raise BankError(
            f"{name} has no {STATISTICS_FILE}; banks can be merged exactly only with their router statistics. "
            "Re-save it with `save_router_statistics=True`."
        )
    return config, load_file(os.path.join(folder, WEIGHTS_FILE)), stats


def _per_bank(name: str, value, count: int) -> list:
    """``revision`` / ``subfolder`` of `merge_banks`: one value for every bank, or a list with one per bank."""
    if value is None or isinstance(value, str):
        return [value] * count
    if isinstance(value, Sequence) and len(value) == count and all(v is None or isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"`{name}` must be a string (for every bank) or a list of {count} strings or None (one per "
                     f"bank), got {value!r}.")


def _router_state(config: ASRConfig, statistics: dict) -> dict[str, torch.Tensor]:
    """The merged bank's router tensors, solved by the router itself from the merged statistics: every tensor it
    saves (the weight, the class counts, and whatever else its solve produces) comes out as a fit would save it."""
    router = AnalyticRouter.from_config(config)
    router.load_statistics(statistics, copy=False)
    return {ROUTER_PREFIX + name: tensor for name, tensor in router.state_dict().items()}  # solved on the way out


def _comparable(config: ASRConfig, field: str):
    value = getattr(config, field)
    return sorted(value) if isinstance(value, (set, list)) else value


def merge_banks(banks: Sequence[Union[str, os.PathLike]], output: Union[str, os.PathLike], *,
                revision: Union[str, Sequence[Optional[str]], None] = None,
                subfolder: Union[str, Sequence[Optional[str]], None] = None, **hub_kwargs) -> Path:
    """Combine banks trained apart (same base model and router settings, disjoint tasks) into ``output``.

    Each bank is a folder or a Hub repo id (``"org/bank"``): a Hub bank's files are downloaded from one revision into
    the Hub cache first (offline, with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``, its cached snapshot is
    used). ``revision`` and ``subfolder`` take one value for every bank or a list with one per bank (``None`` for a
    local folder, which has no revision); the other keywords (``token``, ``cache_dir``, ``local_files_only``,
    ``endpoint``, ...) go to every download.

    The merged router equals the router trained jointly on all the banks' tasks (statistics add up exactly), every
    task keeps its subspace, and the output keeps the statistics, so it can go on learning. Task order: the tasks of
    the first bank, then those of the second, and so on. ``output`` is written atomically (a temporary folder, fsynced,
    renamed into place) and must not exist yet. Bad banks raise :class:`~peft_asr.BankError` (or
    :class:`~peft_asr.ASRConfigError` for a bad ``adapter_config.json``) before anything is written.
    """
    if isinstance(banks, (str, bytes, os.PathLike)) or not isinstance(banks, Sequence):
        raise TypeError(f"`banks` must be a list of bank folders or Hub repo ids, got {type(banks).__name__}; e.g. "
                        "`merge_banks(['bank-a', 'org/bank-b'], 'merged')`.")
    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"`output` must be a folder path, got {type(output).__name__}.")
    if not all(isinstance(b, (str, os.PathLike)) for b in banks):
        raise TypeError(f"every entry of `banks` must be a folder or a Hub repo id (str or os.PathLike), got "
                        f"{[type(b).__name__ for b in banks]}.")
    if len(banks) < 2:
        raise BankError(f"`merge_banks` needs at least two banks, got {len(banks)}.")
    revisions, subfolders = _per_bank("revision", revision, len(banks)), _per_bank("subfolder", subfolder, len(banks))
    output = Path(output)
    if output.exists():
        raise BankError(f"{output} already exists; choose a new folder for the merged bank.")
    names = [os.fspath(b) for b in banks]  # as given: the messages name them so
    folders = [resolve_bank(b, subfolder=sub, check=False, **({"revision": rev} if rev is not None else {}),
                            **hub_kwargs) for b, rev, sub in zip(names, revisions, subfolders)]  # Hub ids: the cache
    read = [_read_bank(name, folder) for name, folder in zip(names, folders)]  # every file checked here
    first = read[0][0]
    for name, (config, _, _) in zip(names[1:], read[1:]):
        diffs = [f"{f}: {_comparable(first, f)!r} vs {_comparable(config, f)!r}" for f in MUST_MATCH
                 if _comparable(first, f) != _comparable(config, f)]
        if diffs:
            raise BankError(f"{name} cannot be merged with {names[0]}: their settings differ ({'; '.join(diffs)}). "
                             "Banks must share the base model, the LoRA shape and every router setting.")
    tasks: list[str] = []
    for name, (config, _, _) in zip(names, read):
        clash = sorted(set(tasks) & set(config.tasks))
        if clash:
            raise BankError(f"task(s) {clash} of {name} are already in another bank; task names must be disjoint.")
        tasks.extend(config.tasks)

    per_task = all(config.per_task_statistics for config, _, _ in read)
    weights: dict[str, torch.Tensor] = {}
    base_gram, task_grams, base_cross, task_cross, base_count, task_counts = None, [], None, [], None, []
    for config, tensors, stats in read:
        weights.update({k: v for k, v in tensors.items() if not k.startswith(ROUTER_PREFIX)})
        grams = stats["class_gram"]  # (1 + T_b, E, E) per class, or (1, E, E) summed
        if per_task:  # the base class adds up; task classes sit side by side
            base_gram = grams[0].clone() if base_gram is None else base_gram + grams[0]
            task_grams.append(grams[1:])
        else:  # only the sum can be kept
            base_gram = grams.sum(0) if base_gram is None else base_gram + grams.sum(0)
        base_cross = stats["cross"][:, :1].clone() if base_cross is None else base_cross + stats["cross"][:, :1]
        base_count = stats["class_counts"][:1].clone() if base_count is None else base_count + stats["class_counts"][:1]
        task_cross.append(stats["cross"][:, 1:])
        task_counts.append(stats["class_counts"][1:])
    class_gram = torch.cat([base_gram.unsqueeze(0), *task_grams]).contiguous()  # (1 + T, E, E) or (1, E, E)
    cross = torch.cat([base_cross, *task_cross], dim=1).contiguous()  # (E, 1 + T)
    counts = torch.cat([base_count, *task_counts]).contiguous()  # (1 + T,)

    merged = ASRConfig.from_pretrained(folders[0])
    merged.tasks = tasks
    merged.per_task_statistics = per_task
    weights.update(_router_state(merged, {"class_gram": class_gram, "cross": cross, "class_counts": counts}))

    def write(folder: str) -> None:
        merged.save_pretrained(folder)
        save_file(weights, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({"class_gram": class_gram, "cross": cross, "class_counts": counts},
                  os.path.join(folder, STATISTICS_FILE), metadata={"format": "pt"})
        write_card(folder, merged, counts.tolist(), has_statistics=True)

    atomic_save(output, write)  # written in a hidden sibling, fsynced, renamed into place
    return output
