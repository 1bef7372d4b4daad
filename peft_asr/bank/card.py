"""The model card of a bank (``README.md``): PEFT's metadata kept, the bank described, how to load it."""

from __future__ import annotations

import os

from ..tuner.config import ASRConfig
from .files import CARD_FILE, STATISTICS_FILE, adapter_folder

__all__ = ["write_model_card", "write_card"]


def write_model_card(peft_model, save_directory: str) -> None:
    """Rewrite ``README.md`` (already created by PEFT) with the bank's description, keeping PEFT's metadata."""
    tuner = peft_model.base_model
    write_card(save_directory, tuner.bank_config, tuner.router.class_counts.tolist(),
               os.path.exists(os.path.join(adapter_folder(save_directory, tuner._adapter), STATISTICS_FILE)))


def write_card(save_directory: str, config: ASRConfig, counts: list[float], has_statistics: bool) -> None:
    """Write the model card of a bank from its config and its router's class counts (merged banks use this too)."""
    from huggingface_hub import ModelCard

    path = os.path.join(save_directory, CARD_FILE)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    data = card.data
    data.library_name = "peft"
    tags = set(data.tags or []) | {"peft", "peft-asr", "continual-learning", "lora", "analytic-subspace-routing"}
    data.tags = sorted(tags)
    if config.base_model_name_or_path and not data.base_model:
        data.base_model = config.base_model_name_or_path
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

- Base model: `{config.base_model_name_or_path}`
- Tasks: {len(config.tasks)}; LoRA rank {config.r}, alpha {config.lora_alpha}, targets {targets}
- Router: layer {config.router_layer}, feature dim {config.feature_dim or config.base_hidden_size}, activation `{config.activation}`, ridge {config.ridge}
- Base route (general data) fitted: {"yes" if counts and counts[0] > 0 else "no"}; router statistics: {stats}

| # | task | router samples |
|---|---|---|
{rows}

## How to load

```python
import peft_asr  # registers the ASR method with PEFT; must come before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{config.base_model_name_or_path}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
print(model.route(**batch))  # the task chosen for each prompt
```
"""
    card.text = body
    card.save(path)
