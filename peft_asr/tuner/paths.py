"""Where PEFT keeps an adapter's files: the sub-folder rule and the Hub download keywords, one rule each (the config
loader and the bank's save, load and push all use them)."""

from __future__ import annotations

import inspect
import os
from typing import Optional

from huggingface_hub import hf_hub_download, snapshot_download

__all__ = ["HUB_DOWNLOAD_KWARGS", "adapter_folder", "hub_download_kwargs"]

# the keywords of `from_pretrained` / `load_adapter` that choose what is downloaded, and how: those both of
# huggingface_hub's download functions take (the bank downloads with `snapshot_download`, the config with
# `hf_hub_download`), less what names the files themselves
HUB_DOWNLOAD_KWARGS = tuple(sorted(
    (set(inspect.signature(hf_hub_download).parameters) & set(inspect.signature(snapshot_download).parameters))
    - {"repo_id", "filename", "subfolder", "allow_patterns", "ignore_patterns", "local_dir", "dry_run", "tqdm_class"}
))


def adapter_folder(root: "str | os.PathLike", adapter_name: str = "default", subfolder: Optional[str] = None) -> str:
    """Where an adapter's files are: PEFT saves the adapter called "default" at the top of ``root`` and any other in a
    sub-folder named after it; loading reads ``root/subfolder`` when ``subfolder`` is given."""
    root = os.fspath(root)
    if subfolder:
        root = os.path.join(root, subfolder)
    return root if adapter_name == "default" else os.path.join(root, adapter_name)


def hub_download_kwargs(kwargs: dict) -> dict:
    """The Hub download keywords among a ``from_pretrained`` / ``load_adapter`` call's keywords."""
    return {k: kwargs[k] for k in HUB_DOWNLOAD_KWARGS if k in kwargs}
