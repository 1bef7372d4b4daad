"""The model card of a bank (``README.md``): PEFT's metadata kept, the bank described, how to load it.

The card's ``base_model`` (and PEFT's ``base_model:adapter:<id>`` tag) is what links the bank to its base model in
the Hub's model tree, so it holds a Hub repo id or nothing: PEFT writes the base model's ``config._name_or_path``
there, which is a local folder for a model loaded from disk and ``''`` for one built from a config.
:func:`base_model_id` keeps a Hub id, maps a snapshot folder of the Hub cache back to its id, and drops the rest.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Optional

from ..tuner.config import ASRConfig
from .files import CARD_FILE, STATISTICS_FILE, adapter_folder

__all__ = ["write_model_card", "write_card", "base_model_id"]

ADAPTER_TAG = "base_model:adapter:"  # PEFT's model-tree tag, followed by the base model's Hub id


def base_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """The Hub repo id a base model's ``name_or_path`` names, or None when it names none.

    A repo id (``"org/name"``, or a bare ``"name"``, that is not a local folder) is kept; a snapshot folder of the
    Hub cache (``.../models--org--name/snapshots/<commit>``) gives ``"org/name"``; any other path, ``''`` and None
    give None.

    Example:
        >>> base_model_id("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> base_model_id("/cache/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12fd25f7")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> base_model_id("/home/me/models/llama") is None
        True
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name_or_path:
        return None
    parts = PurePath(name_or_path).parts
    for folder, below in zip(parts, parts[1:-1]):
        if folder.startswith("models--") and below == "snapshots":  # the cache folder of repo "org/name"
            name_or_path = folder[len("models--"):].replace("--", "/")  # a repo id never holds "--"
            break
    else:
        if os.path.isdir(name_or_path):
            return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def write_model_card(peft_model, save_directory: str) -> None:
    """Rewrite ``README.md`` (already created by PEFT) with the bank's description, keeping PEFT's metadata."""
    tuner = peft_model.base_model
    write_card(save_directory, tuner.bank_config, tuner.router.class_counts.tolist(),
               os.path.exists(os.path.join(adapter_folder(save_directory, tuner._adapter), STATISTICS_FILE)))


def _head_setting(config: ASRConfig) -> str:
    return f"shrinkage {config.router_shrinkage}" if config.router_head == "lda" else f"ridge {config.ridge}"


def write_card(save_directory: str, config: ASRConfig, counts: list[float], has_statistics: bool) -> None:
    """Write the model card of a bank from its config and its router's class counts (merged banks use this too)."""
    from huggingface_hub import ModelCard

    path = os.path.join(save_directory, CARD_FILE)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    data = card.data
    data.library_name = "peft"
    # the bank's own record first; PEFT's `base_model` (the model's `_name_or_path` at save time) when it has none
    base = base_model_id(config.base_model_name_or_path) or base_model_id(data.base_model)
    data.base_model = base  # None: left out of the metadata (a local path or '' would break the model tree)
    tags = {t for t in data.tags or [] if not t.startswith(ADAPTER_TAG)}
    tags |= {"peft", "peft-asr", "continual-learning", "lora", "analytic-subspace-routing"}
    data.tags = sorted(tags | ({ADAPTER_TAG + base} if base else set()))
    if base:
        described, load_name = f"`{base}`", base
    elif config.base_model_name_or_path:
        described, load_name = f"a local model (`{config.base_model_name_or_path}`)", config.base_model_name_or_path
    else:
        described, load_name = "not recorded", "<the base model>"
    rows = "\n".join(
        f"| {i + 1} | `{task}` | {int(counts[i + 1])} |" for i, task in enumerate(config.tasks)
    ) or "| - | (no task yet) | - |"
    stats = "included" if has_statistics else "not included (routing only)"
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    body = f"""
# Analytic Subspace Routing bank

This is a bank of per-task LoRA subspaces trained with **Analytic Subspace Routing** (Any-SSR, arXiv 2503.13575)
using [peft-asr](https://pypi.org/project/peft-asr/). A router, fitted in closed form on frozen features of the first
{config.router_layer} blocks of the base model, sends every input to the subspace of its task, so earlier tasks are
never forgotten.

- Base model: {described}
- Tasks: {len(config.tasks)}; LoRA rank {config.r}, alpha {config.lora_alpha}, targets {targets}
- Router: layer {config.router_layer}, pooling `{config.router_pooling}`, head `{config.router_head}` ({_head_setting(config)}), feature dim {config.router_dim}, activation `{config.activation}`
- Base route (general data) fitted: {"yes" if counts and counts[0] > 0 else "no"}; router statistics: {stats}

| # | task | router samples |
|---|---|---|
{rows}

## How to load

```python
import peft_asr  # registers the ASR method with PEFT; must come before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_name}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
print(model.route(**batch))  # the task chosen for each prompt
```
"""
    card.text = body
    card.save(path)
