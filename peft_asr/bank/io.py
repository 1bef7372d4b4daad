"""Saving and loading banks through PEFT: ``save_pretrained`` / ``load_adapter`` / ``from_pretrained`` of ASR banks
(``peft_asr._registry`` routes those calls here), and fetching a bank from the Hub.

A save writes PEFT's files, the router statistics and the model card into one atomic swap
(:mod:`peft_asr.bank.atomic`). A load checks every file first (:mod:`peft_asr.bank.check`), lets PEFT load the
weights, then restores the router statistics.
"""

from __future__ import annotations

import os
from typing import Optional

from safetensors.torch import save_file

from ..tuner.config import ASRConfig, read_config_json
from ..tuner.errors import BankError
from .atomic import atomic_save, recover_bank
from .card import write_model_card
from .check import check_bank
from .files import (CONFIG_FILE, HUB_DOWNLOAD_KWARGS, STATISTICS_FILE, WEIGHTS_FILE, adapter_folder,
                    hub_download_kwargs, is_asr_config, read_bank_config)

__all__ = ["save_bank", "load_bank", "preflight", "resolve_bank", "local_load_kwargs"]


def save_bank(peft_model, original_save, save_directory, *args, **kwargs):
    """``PeftModel.save_pretrained`` for ASR banks: PEFT's files, the statistics and the model card, saved atomically."""
    safe = kwargs.get("safe_serialization", args[0] if args else True)
    if not safe:
        raise BankError("ASR banks are saved as safetensors only (pickle files can run code when read); drop "
                        "`safe_serialization=False`.")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise BankError(f"`save_directory` must be a path (str or os.PathLike), got {type(save_directory).__name__}.")
    tuner = peft_model.base_model
    tuner.router.solve()  # the saved weight must match the statistics
    if not kwargs.get("is_main_process", True):
        return original_save(peft_model, save_directory, *args, **kwargs)
    adapter = tuner._adapter
    config: ASRConfig = tuner.bank_config
    keep_statistics = config.save_router_statistics and tuner.router.has_statistics

    def write(folder: str):
        result = original_save(peft_model, folder, *args, **kwargs)
        if keep_statistics:
            save_file(tuner.router.statistics_state_dict(), os.path.join(adapter_folder(folder, adapter), STATISTICS_FILE),
                      metadata={"format": "pt"})  # one key: safetensors writes metadata in hash order
        write_model_card(peft_model, folder)
        return result

    # statistics that belong to an older state of the bank must not survive a save without them
    dropped = set() if keep_statistics else {STATISTICS_FILE if adapter == "default" else adapter}
    return atomic_save(save_directory, write, dropped)


def _hub_bank(model_id: str, subfolder: Optional[str], kwargs: dict) -> str:
    """Download a bank's three files from one Hub revision (``snapshot_download`` pins it) into the cache; returns
    the cache folder holding them. Nothing else of the repository is fetched: no pickle file is ever downloaded.

    Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) the same call returns the cached snapshot of the revision.
    """
    import re

    from huggingface_hub import snapshot_download

    folder = (subfolder or "").replace(os.sep, "/").strip("/")
    # `allow_patterns` are fnmatch patterns: `*`, `?` and `[` of a folder name are escaped to match themselves
    prefix = re.sub(r"([*?[])", r"[\1]", folder) + "/" if folder else ""
    try:
        snapshot = snapshot_download(model_id, allow_patterns=[prefix + f for f in (CONFIG_FILE, WEIGHTS_FILE,
                                                                                     STATISTICS_FILE)],
                                     **hub_download_kwargs(kwargs))
    except Exception as err:  # the Hub client raises many types (bad id, offline, no access): one clear error
        raise BankError(f"cannot load {model_id!r}: no such folder, and the Hub download failed ({err}).") from err
    local = adapter_folder(snapshot, subfolder=folder or None)
    if not os.path.isfile(os.path.join(local, CONFIG_FILE)):
        raise BankError(f"{model_id!r} is neither a local folder nor a Hub repo with {CONFIG_FILE}"
                        + (f" in {folder!r}." if folder else "."))
    if not os.path.isfile(os.path.join(local, WEIGHTS_FILE)):
        raise BankError(
            f"{model_id} has no {WEIGHTS_FILE}; ASR banks load from safetensors only (a pickle file is never read)."
        )
    return local


def _looks_local(model_id: str) -> bool:
    return os.path.isabs(model_id) or model_id.startswith(".") or os.sep + os.sep in model_id


def _local_bank(model_id: str, subfolder: Optional[str], kwargs: dict) -> str:
    """The local folder holding the bank: the folder itself, or the Hub cache folder its files were downloaded to."""
    local = adapter_folder(model_id, subfolder=subfolder)
    recover_bank(local)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise BankError(f"{local} is a file; a bank is a folder.")
    if _looks_local(model_id):
        raise BankError(f"{local} does not exist; it is not a saved bank.")
    return _hub_bank(model_id, subfolder, kwargs)


def resolve_bank(bank: "str | os.PathLike", *, subfolder: Optional[str] = None, check: bool = True,
                 **hub_kwargs) -> str:
    """The local folder of a bank, its files checked: a folder (an interrupted save is finished first), or a Hub id with
    its bank files downloaded from one revision into the Hub cache (only the bank's files, as
    ``PeftModel.from_pretrained`` does). Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) a Hub id resolves
    to the cached snapshot of its revision.

    Args:
        bank (`str` or `os.PathLike`):
            A bank folder or a Hub repo id (``"org/name"``).
        subfolder (`str`, *optional*):
            The bank's sub-folder inside the folder or repository.
        check (`bool`, *optional*, defaults to `True`):
            Check every file (:func:`~peft_asr.bank.check_bank`). ``False`` only makes sure the folder holds an ASR
            bank's config, for a caller that checks the files itself or only describes the bank.
        hub_kwargs:
            The Hub download keywords of ``snapshot_download``: ``revision`` (a branch, tag, commit or
            ``"refs/pr/N"``), ``cache_dir``, ``local_files_only``, ``token``, ``endpoint``, ...

    Returns:
        `str`: the folder holding the bank's files (for a Hub id, its snapshot in the Hub cache).

    Raises:
        TypeError: a keyword that is not a Hub download keyword.
        BankError: ``revision`` for a local folder; a folder or repository without a bank, another method's adapter,
            a failed download, or bad files.
    """
    if not isinstance(bank, (str, os.PathLike)):
        raise TypeError(f"`bank` must be a folder or a Hub repo id (str), got {type(bank).__name__}.")
    unknown = sorted(set(hub_kwargs) - set(HUB_DOWNLOAD_KWARGS))
    if unknown:
        raise TypeError(f"`resolve_bank` got unknown keywords {unknown}; it takes `subfolder` and the Hub download "
                        f"keywords {list(HUB_DOWNLOAD_KWARGS)}.")
    bank = os.fspath(bank)
    if hub_kwargs.get("revision") is not None and (os.path.exists(bank) or _looks_local(bank)):
        raise BankError(f"{bank} is a local path; `revision` ({hub_kwargs['revision']!r}) chooses a revision of a "
                        "Hub repo. Drop it, or pass the repo id.")
    local = _local_bank(bank, subfolder, hub_kwargs)
    read_bank_config(local)  # "not a bank" and "another method's adapter" say so, before the strict checks
    if check:
        check_bank(local)
    return local


def _is_asr_on_hub(model_id: str, subfolder: Optional[str], kwargs: dict) -> bool:
    """Whether a Hub repo holds an ASR bank (its config says so); any failure: no, and PEFT reports it its way."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(model_id, CONFIG_FILE, subfolder=subfolder, **hub_download_kwargs(kwargs))
        return is_asr_config(read_config_json(path))
    except Exception:  # the Hub client raises many types (bad id, offline, no access); a corrupt config
        return False


def local_load_kwargs(kwargs: dict) -> dict:
    """The keywords of a load from the checked local folder: without ``subfolder`` and the Hub download keywords."""
    return {k: v for k, v in kwargs.items() if k != "subfolder" and k not in HUB_DOWNLOAD_KWARGS}


def preflight(model_id, kwargs: Optional[dict] = None) -> Optional[str]:
    """Before ``PeftModel.from_pretrained`` changes the base model: finish an interrupted save, fetch a Hub bank's
    files (one revision), and check the bank. Returns the checked folder, which PEFT then loads from (with
    :func:`local_load_kwargs`), or None for adapters of other PEFT methods.
    """
    kwargs = kwargs or {}
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    model_id, subfolder = os.fspath(model_id), kwargs.get("subfolder")
    local = adapter_folder(model_id, subfolder=subfolder)
    recover_bank(local)
    if os.path.exists(local) or _looks_local(model_id):
        config = os.path.join(local, CONFIG_FILE)
        if not (os.path.isfile(config) and is_asr_config(read_config_json(config))):  # unreadable: our error
            return None
    elif _is_asr_on_hub(model_id, subfolder, kwargs):
        local = _hub_bank(model_id, subfolder, kwargs)
    else:
        return None
    check_bank(local)
    return local


def load_bank(peft_model, original_load, model_id, adapter_name, *args, **kwargs):
    """``PeftModel.load_adapter`` for ASR banks: check every file first, load with PEFT, then restore the statistics.

    PEFT loads from the folder that was checked (for a Hub id, the snapshot of the pinned revision), so the weights it
    reads are those files: a branch that moves between the check and the load, or a pickle file next to the bank,
    is never read.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise BankError(f"`model_id` must be a folder or a Hub repo id (str), got {type(model_id).__name__}.")
    model_id = os.fspath(model_id)
    local = _local_bank(model_id, kwargs.get("subfolder"), kwargs)
    _, stats = check_bank(local)
    result = original_load(peft_model, local, adapter_name, *args, **local_load_kwargs(kwargs))
    router = peft_model.base_model.router
    if stats is None:
        router.mark_loaded_without_statistics()
    else:
        # read for this load only, so taken without a copy; `check_bank` showed the saved weight solves them
        router.load_statistics(stats, solved=True, copy=False)
    return result
