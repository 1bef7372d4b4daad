"""Checking a bank's files before anything is loaded into a model.

**Loading reads safetensors and JSON only.** No pickle is ever opened: a bank whose weights exist only as
``adapter_model.bin`` is refused (PEFT would otherwise fall back to it), and files such as ``*.pt``/``*.pkl`` are
never looked at. Every file is checked (JSON keys and values, safetensors headers, statistics shapes and their
agreement with the saved router weight) *before* anything is loaded into the model, so a bad bank leaves the model as
it was.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..tuner import rls
from ..tuner.config import ASRConfig
from ..tuner.errors import BankError
from ..tuner.router import statistics_problem
from .files import CONFIG_FILE, PICKLE_WEIGHTS_FILE, ROUTER_COUNTS_KEY, ROUTER_WEIGHT_KEY, STATISTICS_FILE, WEIGHTS_FILE

__all__ = ["check_bank", "read_safetensors"]


def _check_safetensors(path: str) -> None:
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    _check_safetensors(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None


def check_bank(folder: str) -> tuple[ASRConfig, Optional[dict[str, torch.Tensor]]]:
    """Check a bank folder without loading it into a model; returns its config and router statistics (or None).

    Reads only ``adapter_config.json`` and safetensors files. Raises :class:`~peft_asr.ASRConfigError` for a bad config
    and :class:`~peft_asr.BankError` for missing, pickle-only, truncated or mismatched files.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise BankError(f"{folder} has no {CONFIG_FILE}; it is not a saved bank.")
    config = ASRConfig.from_pretrained(folder)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_FILE)):
            raise BankError(
                f"{folder} holds only {PICKLE_WEIGHTS_FILE} (a pickle file, which can run code when read); ASR banks "
                "load from safetensors only. Re-save the bank with `save_pretrained` (safetensors)."
            )
        raise BankError(f"{folder} has no {WEIGHTS_FILE}; it is not a saved bank.")
    _check_safetensors(weights)
    with safe_open(weights, framework="pt") as handle:
        keys = set(handle.keys())
        if ROUTER_WEIGHT_KEY not in keys or ROUTER_COUNTS_KEY not in keys:
            raise BankError(f"{weights} has no router weight ({ROUTER_WEIGHT_KEY}); it is not an ASR bank's weights file.")
        weight = handle.get_tensor(ROUTER_WEIGHT_KEY)
        counts = handle.get_tensor(ROUTER_COUNTS_KEY)
    dim = config.router_dim
    classes = config.num_tasks + 1
    if dim is not None and (tuple(weight.shape) != (dim, classes) or weight.dtype != torch.float64):
        raise BankError(
            f"{weights}: the router weight has shape {tuple(weight.shape)} ({weight.dtype}), but the config's "
            f"{config.num_tasks} tasks and feature size {dim} need ({dim}, {classes}) float64: the files come from "
            "different banks."
        )
    path = os.path.join(folder, STATISTICS_FILE)
    if not os.path.isfile(path):
        return config, None
    stats = read_safetensors(path)
    _check_statistics(path, stats, config, weight, counts)
    return config, stats


def _check_statistics(path: str, stats: dict, config: ASRConfig, weight: torch.Tensor, counts: torch.Tensor) -> None:
    """The statistics file must have the bank's shapes and be the one the saved router weight was solved from."""
    dim, classes = weight.shape
    problem = statistics_problem(stats, dim, classes, config.per_task_statistics)
    if problem is not None:
        raise BankError(f"{path}: {problem}: the statistics file does not belong to this bank. Delete it to load the "
                        "bank for routing only.")
    for name, tensor in stats.items():
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"{path}: `{name}` holds NaN or inf values; the file is corrupt. Delete it to route only.")
    if not torch.equal(stats["class_counts"], counts):
        raise BankError(
            f"{path} does not match the router saved in the bank (class counts {stats['class_counts'].tolist()} vs "
            f"{counts.tolist()}): they come from different saves. Delete the statistics file to load the bank for "
            "routing only."
        )
    # the saved weight solves (G + ridge I) W = C, or S W = means for the discriminant (rls.lda_system): check the
    # residual instead of re-solving (O(E^2 K), not O(E^3))
    gram = stats["class_gram"].sum(0)
    if not bool((stats["class_counts"] > 0).any()):  # nothing fitted: the saved solution of no data is zero
        system, rhs = torch.eye(gram.shape[0], dtype=gram.dtype), torch.zeros_like(stats["cross"])
    elif config.router_head == "lda":
        system, rhs = rls.lda_system(gram, stats["cross"], stats["class_counts"], config.router_shrinkage)
    else:
        system = gram + config.ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
        rhs = stats["cross"]
    residual = system @ weight - rhs  # (E, K)
    scale = system.norm() * weight.norm() + rhs.norm()
    if not float(residual.norm()) <= 1e-8 * float(scale):
        raise BankError(
            f"{path} does not match the router weight saved in the bank (they come from different saves); "
            "delete the statistics file to load the bank for routing only."
        )
