"""The files of a bank and the rules that name them: one place for each (file names, "is this an ASR bank", the
adapter sub-folder, the Hub download keywords).

A bank is an ordinary PEFT adapter folder:

* ``adapter_config.json``: the `ASRConfig`, including the task list (it fixes every tensor shape);
* ``adapter_model.safetensors``: every task's LoRA subspace, the solved router weight and its class counts;
* ``router_statistics.safetensors`` (optional, ``E*E*8`` bytes): the router's sufficient statistics, needed only to
  keep learning tasks after a reload;
* ``README.md``: the model card (``library_name: peft``, base model, tasks, how to load).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..tuner.config import ASR_TYPE, read_config_json
from ..tuner.errors import BankError
from ..tuner.model import ASRModel
from ..tuner.paths import HUB_DOWNLOAD_KWARGS, adapter_folder, hub_download_kwargs  # noqa: F401  (re-exported)

__all__ = ["STATISTICS_FILE", "WEIGHTS_FILE", "PICKLE_WEIGHTS_FILE", "CONFIG_FILE", "CARD_FILE", "ROUTER_PREFIX",
           "ROUTER_WEIGHT_KEY", "ROUTER_COUNTS_KEY", "HUB_DOWNLOAD_KWARGS", "is_asr_model", "is_asr_config",
           "is_asr_folder", "read_bank_config", "adapter_folder", "hub_download_kwargs"]

STATISTICS_FILE = "router_statistics.safetensors"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
ROUTER_PREFIX = "base_model.asr_router."
ROUTER_WEIGHT_KEY = ROUTER_PREFIX + "weight"
ROUTER_COUNTS_KEY = ROUTER_PREFIX + "class_counts"


def is_asr_model(peft_model: Any) -> bool:
    """Whether a ``PeftModel`` holds an ASR bank."""
    return isinstance(getattr(peft_model, "base_model", None), ASRModel)


def is_asr_config(data: Any) -> bool:
    """Whether a loaded ``adapter_config.json`` is an ASR bank's (``peft_type: ASR``)."""
    return isinstance(data, dict) and data.get("peft_type") == ASR_TYPE


def is_asr_folder(folder: "str | os.PathLike") -> bool:
    """Whether ``folder`` holds an ASR bank's config; no config, an unreadable one or another method's: no."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        data = read_config_json(str(path))
    except (OSError, ValueError):  # unreadable, half-written or not JSON (ASRConfigError is a ValueError): not ours
        return False
    return is_asr_config(data)


def read_bank_config(folder: "str | os.PathLike") -> dict:
    """The ``adapter_config.json`` of the ASR bank in ``folder``, as read (not yet checked field by field).

    Raises:
        BankError: ``folder`` has no config, or it is another PEFT method's adapter.
        ASRConfigError: the config is not a JSON object.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise BankError(f"{folder} is not a saved bank (no {CONFIG_FILE}).")
    data = read_config_json(str(path))
    if not is_asr_config(data):
        kind = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise BankError(f"{folder} holds a {kind} adapter, not an ASR bank.")
    return data
