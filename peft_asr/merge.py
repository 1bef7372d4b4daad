"""Merge banks trained apart into one bank whose router equals joint training on all their tasks.

The router keeps sufficient statistics (``G = sum phi^T phi``, ``C = sum phi^T y``; see :mod:`peft_asr.rls`). Banks
trained separately on the same frozen base model and router settings saw disjoint samples, so the statistics of
their union are the sums: ``G = G_a + G_b``, the base-route column of ``C`` adds up, and the task columns are placed
side by side. Solving from the merged statistics gives exactly the router of one run over all the tasks. Every task's
LoRA subspace is copied unchanged. Merging works on the files alone: no model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from . import rls
from .config import ASRConfig
from .hub import STATISTICS_FILE, WEIGHTS_FILE, _check_safetensors, write_card

__all__ = ["merge_banks"]

ROUTER_PREFIX = "base_model.asr_router."
# settings that must be equal for statistics (and subspaces) to be combinable
MUST_MATCH = ("base_model_name_or_path", "base_hidden_size", "base_num_layers", "task_type", "router_layer",
              "feature_dim", "activation", "ridge", "router_seed", "r", "lora_alpha", "target_modules",
              "layers_pattern", "layers_to_transform")


def _read_bank(path: Path) -> tuple[ASRConfig, dict, dict]:
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not a saved bank (no adapter_config.json).")
    data = json.loads((path / "adapter_config.json").read_text())
    if data.get("peft_type") != "ASR":
        raise ValueError(f"{path} holds a {data.get('peft_type')} adapter, not an ASR bank.")
    config = ASRConfig.from_pretrained(str(path))
    for name in (WEIGHTS_FILE, STATISTICS_FILE):
        if not (path / name).is_file():
            hint = " Re-save it with `save_router_statistics=True`." if name == STATISTICS_FILE else ""
            raise ValueError(f"{path} has no {name}; banks can be merged exactly only with their router statistics.{hint}")
        _check_safetensors(str(path / name))
    return config, load_file(str(path / WEIGHTS_FILE)), load_file(str(path / STATISTICS_FILE))


def _comparable(config: ASRConfig, field: str):
    value = getattr(config, field)
    return sorted(value) if isinstance(value, (set, list)) else value


def merge_banks(banks: Sequence[Union[str, os.PathLike]], output: Union[str, os.PathLike]) -> Path:
    """Combine banks trained apart (same base model and router settings, disjoint tasks) into ``output``.

    The merged router equals the router trained jointly on all the banks' tasks (statistics add up exactly), every
    task keeps its subspace, and the output keeps the statistics, so it can go on learning. Task order: the tasks of
    the first bank, then those of the second, and so on. ``output`` is written atomically (a temporary folder renamed
    into place) and must not exist yet.
    """
    paths = [Path(b) for b in banks]
    if len(paths) < 2:
        raise ValueError(f"`merge_banks` needs at least two banks, got {len(paths)}.")
    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} already exists; choose a new folder for the merged bank.")
    read = [_read_bank(p) for p in paths]
    first = read[0][0]
    for path, (config, _, _) in zip(paths[1:], read[1:]):
        diffs = [f"{f}: {_comparable(first, f)!r} vs {_comparable(config, f)!r}" for f in MUST_MATCH
                 if _comparable(first, f) != _comparable(config, f)]
        if diffs:
            raise ValueError(f"{path} cannot be merged with {paths[0]}: their settings differ ({'; '.join(diffs)}). "
                             "Banks must share the base model, the LoRA shape and every router setting.")
    tasks: list[str] = []
    for path, (config, _, _) in zip(paths, read):
        clash = sorted(set(tasks) & set(config.tasks))
        if clash:
            raise ValueError(f"task(s) {clash} of {path} are already in another bank; task names must be disjoint.")
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
    weights[ROUTER_PREFIX + "weight"] = rls.ridge_solve(class_gram.sum(0), cross, first.ridge)
    weights[ROUTER_PREFIX + "class_counts"] = counts

    merged = ASRConfig.from_pretrained(str(paths[0]))
    merged.tasks = tasks
    merged.per_task_statistics = per_task
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent if str(output.parent) else "."))
    try:
        merged.save_pretrained(str(tmp))
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({"class_gram": class_gram, "cross": cross, "class_counts": counts}, str(tmp / STATISTICS_FILE),
                  metadata={"format": "pt", "tasks": ",".join(tasks)})
        write_card(str(tmp), merged, counts.tolist(), has_statistics=True)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
