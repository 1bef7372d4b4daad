"""Banks on disk and on the Hub: the router-statistics file, safe loading, and the model card.

A bank is an ordinary PEFT adapter folder:

* ``adapter_config.json``: the `ASRConfig`, including the task list (it fixes every tensor shape);
* ``adapter_model.safetensors``: every task's LoRA subspace, the solved router weight and its class counts;
* ``router_statistics.safetensors`` (optional, ``E*E*8`` bytes): the router's sufficient statistics, needed only to
  keep learning tasks after a reload;
* ``README.md``: the model card (``library_name: peft``, base model, tasks, how to load).

Only safetensors and JSON are read; a bank that has only a pickle file (``adapter_model.bin``) is refused.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ASRConfig

__all__ = ["STATISTICS_FILE", "is_asr_model", "save_bank", "load_bank", "write_model_card"]

STATISTICS_FILE = "router_statistics.safetensors"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"


def is_asr_model(peft_model) -> bool:
    from .model import ASRModel

    return isinstance(getattr(peft_model, "base_model", None), ASRModel)


def _bank_dir(save_directory: str, adapter_name: str) -> str:
    # PEFT saves the adapter called "default" at the top of the folder, others in a sub-folder
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def save_bank(peft_model, original_save, save_directory, *args, **kwargs):
    """``PeftModel.save_pretrained`` for ASR banks: PEFT's files, then the statistics and the model card."""
    safe = kwargs.get("safe_serialization", args[0] if args else True)
    if not safe:
        raise ValueError("ASR banks are saved as safetensors only; drop `safe_serialization=False`.")
    tuner = peft_model.base_model
    tuner.router.solve()  # the saved weight must match the statistics
    result = original_save(peft_model, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return result
    adapter = tuner._adapter
    config: ASRConfig = tuner.bank_config
    folder = _bank_dir(str(save_directory), adapter)
    stats_path = os.path.join(folder, STATISTICS_FILE)
    if config.save_router_statistics and tuner.router.has_statistics:
        tmp = stats_path + ".tmp"
        save_file(tuner.router.statistics_state_dict(), tmp, metadata={"format": "pt", "tasks": ",".join(config.tasks)})
        os.replace(tmp, stats_path)
    elif os.path.exists(stats_path):
        os.remove(stats_path)  # never leave statistics that belong to an older state of the bank
    write_model_card(peft_model, str(save_directory))
    return result


def _check_safetensors(path: str) -> None:
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None


def _find_statistics(model_id: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[str]:
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        path = os.path.join(local, STATISTICS_FILE)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    keys = ("revision", "cache_dir", "token", "local_files_only", "repo_type")
    try:
        return hf_hub_download(
            model_id, STATISTICS_FILE, subfolder=subfolder, **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def load_bank(peft_model, original_load, model_id, adapter_name, *args, **kwargs):
    """``PeftModel.load_adapter`` for ASR banks: check the files, load with PEFT, then restore the statistics."""
    model_id = str(model_id)
    subfolder = kwargs.get("subfolder")
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        weights = os.path.join(local, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            if os.path.isfile(os.path.join(local, PICKLE_WEIGHTS_FILE)):
                raise ValueError(
                    f"{local} holds only {PICKLE_WEIGHTS_FILE} (a pickle file, which can run code when read); ASR banks "
                    "load from safetensors only. Re-save the bank with `save_pretrained` (safetensors)."
                )
            raise ValueError(f"{local} has no {WEIGHTS_FILE}; it is not a saved bank.")
        _check_safetensors(weights)
    result = original_load(peft_model, model_id, adapter_name, *args, **kwargs)
    router = peft_model.base_model.router
    path = _find_statistics(model_id, subfolder, kwargs)
    if path is None:
        router.mark_loaded_without_statistics()
    else:
        _check_safetensors(path)
        router.load_statistics(load_file(path))
        loaded_weight = router.weight.clone()
        router.solve()
        if not torch.allclose(router.weight, loaded_weight, rtol=1e-6, atol=1e-8):
            raise ValueError(
                f"{path} does not match the router weight saved in the bank (they come from different saves); "
                "delete the statistics file to load the bank for routing only."
            )
        router.weight = loaded_weight  # keep the saved weight bit for bit: identical routing after reload
    return result


def write_model_card(peft_model, save_directory: str) -> None:
    """Rewrite ``README.md`` (already created by PEFT) with the bank's description, keeping PEFT's metadata."""
    tuner = peft_model.base_model
    write_card(save_directory, tuner.bank_config, tuner.router.class_counts.tolist(),
               os.path.exists(os.path.join(_bank_dir(save_directory, tuner._adapter), STATISTICS_FILE)))


def write_card(save_directory: str, config: ASRConfig, counts: list[float], has_statistics: bool) -> None:
    """Write the model card of a bank from its config and its router's class counts (merged banks use this too)."""
    from huggingface_hub import ModelCard

    path = os.path.join(save_directory, "README.md")
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



def _pct(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def write_results_to_card(bank_dir, results: dict) -> None:
    """Append a stream run's scores (per task after the last stage, OP/BWT/FWT, routing accuracy) to a bank's card."""
    from huggingface_hub import ModelCard

    path = os.path.join(str(bank_dir), "README.md")
    card = ModelCard.load(path)
    tasks = results["tasks"]
    last = results["matrix"][-1] if results.get("matrix") else [None] * len(tasks)
    steps = {t["task"]: t.get("steps") for t in results.get("timings", [])}
    rows = "\n".join(f"| `{t}` | {steps.get(t, '-')} | {_pct(s)} |" for t, s in zip(tasks, last))
    names = {"op": "OP (average score)", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting",
             "routing_accuracy": "routing accuracy"}
    summary = "\n".join(
        f"- {names.get(k, k)}: {_pct(v, signed=k in ('bwt', 'fwt', 'forgetting'))}"
        for k, v in results.get("summary", {}).items()
    )
    card.text += f"""
## Evaluation (after the last task, greedy decoding, scores in %)

| task | training steps | score |
|---|---|---|
{rows}

{summary}
"""
    card.save(path)
