"""One task of a bank as a plain PEFT LoRA adapter: the folder that ``PeftModel.from_pretrained(base, path)`` loads
without this package, and that multi-LoRA serving engines (vLLM, SGLang) load as any other LoRA adapter.

Why it is exact: an ASR layer with one task pinned computes ``base(x) + (alpha / r) * B_t (A_t x)``, which is what
PEFT's LoRA layer computes with ``lora_A = A_t`` (r, in), ``lora_B = B_t`` (out, r) and the same ``lora_alpha`` and
``r``; for GPT-2's ``Conv1D`` the two matrices are the same and only the base weight is stored transposed
(``fan_in_fan_out``). The deep blocks (``router_layer`` and above) hold the task; the shallow ones carry no update.

What is written (``export_task``):

* ``adapter_config.json``: a ``LoraConfig`` (``peft_type: "LORA"``, the bank's ``r``, ``lora_alpha``,
  ``lora_dropout``, ``task_type``, ``base_model_name_or_path``, ``revision``; ``bias: "none"``). ``target_modules`` is
  the sorted list of the adapted modules' last names (``["q_proj", "v_proj"]``) with ``layers_to_transform`` (the deep
  block indices) and ``layers_pattern`` (the block list's name), checked to select exactly the bank's layers in the
  model; when they would select more (a bank whose ``target_modules`` was a regex or a dotted suffix such as
  ``"attn.c_proj"``), the full module names instead. A plain list, never a regex: SGLang reads ``target_modules`` as
  module names.
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for every adapted
  module, nothing else. The names are PEFT's own: a skeleton of meta-device layers at the module names (no memory) is
  wrapped by PEFT's LoRA, filled with the task's matrices, and ``get_peft_model_state_dict`` names them as
  ``save_pretrained`` does. Safetensors only: every engine prefers it and it cannot run code when read.
* ``README.md``: a short model card.

``all_layers=True`` also writes a zero pair (``lora_A`` and ``lora_B`` both zero) for the same module of every block
that has none (the shallow ones), and ``target_modules`` without layer restriction. ``x A^T B^T`` is then exactly 0
(every product has a zero factor), so those layers output what the base layer outputs, bit for bit. It is for engines that keep stale
weights in the slots of modules an adapter does not cover: SGLang before PR #8103 (merged July 2025) did; vLLM resets
such modules (``reset_lora``) and SGLang now zeroes them, so the default (deep blocks only) is what they load.

The folder is written atomically: into a hidden sibling ``.<name>.export-tmp-<random>``, fsynced, then renamed into
place (an existing folder, when ``overwrite=True``, is renamed aside first and deleted after). A failure leaves no
folder and no sibling, and an overwritten folder as it was. ``tuner`` cannot use ``bank``'s folder exchange (the
import direction), and an export is one small folder that a repeated call rewrites, so two renames are enough.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ASR_TYPE, BASE_ROUTE
from .layer import ASRLayer

__all__ = ["ExportMixin", "output_folder", "write_folder_atomically"]

ADAPTER = "default"  # PEFT keeps the adapter called "default" at the top of the folder
Pair = tuple[torch.Tensor, torch.Tensor, bool]  # lora_A (r, in), lora_B (out, r), whether the base is a Conv1D


class ExportMixin:
    """:meth:`export_task` of ``ASRModel``: one task of the bank as a plain PEFT LoRA adapter."""

    def export_task(self, name: str, path: Union[str, os.PathLike], *, all_layers: bool = False,
                    overwrite: bool = False) -> str:
        """Write task ``name`` as a plain PEFT LoRA adapter folder at ``path``; returns the folder's path.

        ``PeftModel.from_pretrained(base, path)`` loads it without ``import peft_asr`` and gives the logits of
        ``with model.use_task(name): model(...)``; vLLM and SGLang load it as any LoRA adapter. The deep blocks
        (``router_layer`` and above) carry the task; see :mod:`peft_asr.tuner.export` for the files.

        Args:
            name (`str`): a task of the bank (not the base route, which needs no adapter: serve the base model).
            path (`str` or `os.PathLike`): the folder to write; an existing non-empty folder needs ``overwrite=True``.
                Written atomically: a failure leaves nothing behind.
            all_layers (`bool`, *optional*, defaults to `False`): also write a zero pair (``lora_A`` and ``lora_B``
                both zero: no change to any output) for the targeted modules of the shallow blocks, for engines that
                need a weight for every targeted module of every block. vLLM and current SGLang do not.
            overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder (never a bank).
        """
        target = self._check_export(name, path, all_layers, overwrite)
        pairs = self._task_pairs(name, all_layers)
        lora_config = self._export_config(pairs, all_layers)
        state = _peft_state_dict(lora_config, pairs)
        card = _card(name, lora_config, self.bank_config.router_layer, all_layers)

        def write(folder: Path) -> None:
            # the config as PEFT's `save_pretrained` writes it, with the sets sorted (PEFT writes them in hash
            # order, so two exports of one task would differ)
            config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(state, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})  # as PEFT does
            card.save(str(folder / "README.md"))

        write_folder_atomically(target, write)
        return str(target)

    # ------------------------------------------------------------------ checks, before any work
    def _check_export(self, name, path, all_layers, overwrite) -> Path:
        if not isinstance(name, str):
            raise TypeError(
                f"`name` must be a task name (str), got {type(name).__name__} ({name!r}); the base route has no "
                f"adapter to export (serve the base model itself). Tasks: {self.tasks}."
            )
        if name == BASE_ROUTE:
            raise ValueError(
                f"{BASE_ROUTE!r} is the base route: its rows are answered by the plain base model, which needs no "
                f"adapter (serve the base model itself). Export one of the tasks: {self.tasks}."
            )
        self._check_task(name)
        for flag, value in (("all_layers", all_layers), ("overwrite", overwrite)):
            if not isinstance(value, bool):
                raise TypeError(f"`{flag}` must be True or False, got {value!r}.")
        target = output_folder(path, "path")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{target} exists and is not empty; pass `overwrite=True` to replace it, or choose another `path`."
            )
        return target

    # ------------------------------------------------------------------ the matrices
    def _task_pairs(self, name: str, all_layers: bool) -> dict[str, Pair]:
        """Module name -> (lora_A, lora_B, is Conv1D): the task's pair in every ASR layer, and with ``all_layers``
        a zero pair for the same module of every other block. Copies on the CPU (the file holds a snapshot)."""
        adapter = self._adapter
        pairs: dict[str, Pair] = {}
        for module_name, layer in self.model.named_modules():
            if isinstance(layer, ASRLayer):
                a, b = layer.asr_A[adapter][name], layer.asr_B[adapter][name]
                if a.is_meta or b.is_meta:
                    raise RuntimeError(
                        f"the weights of task {name!r} in `{module_name}` are on the meta device (offloaded); load "
                        "the bank onto a real device before exporting."
                    )
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ValueError(
                        f"task {name!r} has NaN or inf weights in `{module_name}`; its subspace is broken."
                    )
                pairs[module_name] = (_snapshot(a), _snapshot(b), layer.fan_in_fan_out)
        if all_layers:
            pairs.update(self._zero_pairs(pairs))
        return pairs

    def _zero_pairs(self, deep: dict[str, Pair]) -> dict[str, Pair]:
        """Zero pairs for the adapted modules' counterparts (same name, another block index) that have none."""
        # "<...>layers.4.self_attn.q_proj" -> ("<...>layers.", ".self_attn.q_proj"), as PEFT's layers_pattern reads it
        block = re.compile(rf"^((?:.*?\.)?{re.escape(self.bank_config.layers_pattern)}\.)\d+(\..+)$")
        slots = {block.match(n).groups() for n in deep}  # (block list, module within the block)
        any_a = next(iter(deep.values()))[0]
        r, dtype = any_a.shape[0], any_a.dtype
        zeros: dict[str, Pair] = {}
        for key, module in self.model.named_modules():
            match = block.match(key)
            if key in deep or match is None or match.groups() not in slots:
                continue
            if not isinstance(module, (nn.Linear, Conv1D)):
                continue
            conv = isinstance(module, Conv1D)
            fan_in, fan_out = module.weight.shape if conv else (module.in_features, module.out_features)
            zeros[key] = (torch.zeros(r, fan_in, dtype=dtype), torch.zeros(fan_out, r, dtype=dtype), conv)
        return zeros

    # ------------------------------------------------------------------ the config
    def _export_config(self, pairs: dict[str, Pair], all_layers: bool) -> LoraConfig:
        """The ``LoraConfig`` whose target rule selects exactly ``pairs`` in this model: last names (+ the deep
        blocks), else the full module names."""
        bank = self.bank_config
        common = dict(
            r=bank.r, lora_alpha=bank.lora_alpha, lora_dropout=bank.lora_dropout, bias="none",
            fan_in_fan_out=any(conv for _, _, conv in pairs.values()), task_type=bank.task_type,
            base_model_name_or_path=bank.base_model_name_or_path or None, revision=bank.revision,
            inference_mode=True,
        )
        wanted = set(pairs)
        leaves = sorted({n.rsplit(".", 1)[-1] for n in wanted})
        layers = {} if all_layers else dict(layers_to_transform=list(bank.layers_to_transform),
                                            layers_pattern=bank.layers_pattern)
        for rule in (dict(target_modules=leaves, **layers), dict(target_modules=sorted(wanted))):
            config = LoraConfig(**rule, **common)
            if self._selected_by(config) == wanted:
                return config
        raise RuntimeError(  # full names select themselves; reaching this is a bug, not bad input
            f"no LoraConfig target rule selects exactly the {len(wanted)} adapted modules of this model."
        )

    def _selected_by(self, config: LoraConfig) -> set[str]:
        """The modules PEFT's LoRA would adapt with ``config`` in the plain base model (whose module names are this
        model's, without the modules inside our layers)."""
        ours = {n for n, m in self.model.named_modules() if isinstance(m, ASRLayer)}
        selected = set()
        for key, _ in self.model.named_modules():
            parts = key.split(".")
            if not key or any(".".join(parts[:i]) in ours for i in range(1, len(parts))):
                continue  # the root, or inside one of our layers (`base_layer`, `asr_A`, ...): not in the plain model
            if check_target_module_exists(config, key):
                selected.add(key)
        return selected


# ---------------------------------------------------------------------- helpers
def _snapshot(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to("cpu", copy=True).contiguous()


def output_folder(path: object, what: str) -> Path:
    """The absolute folder an export writes to, refused before any work when ``path`` is not a path, is a file, or
    holds an ASR bank (an export never replaces a bank); the caller rules on other non-empty folders."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{what}` must be a folder path (str or os.PathLike), got {type(path).__name__}.")
    target = Path(os.path.abspath(os.fspath(path)))
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; the export is a folder: choose another `{what}`.")
    if target.is_dir() and any(target.iterdir()) and _is_bank(target):
        raise ValueError(f"{target} holds an ASR bank; an export never replaces a bank (it would lose every other "
                         f"task and the router): choose another `{what}`.")
    return target


def _is_bank(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("peft_type") == ASR_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _peft_state_dict(config: LoraConfig, pairs: dict[str, Pair]) -> dict[str, torch.Tensor]:
    """The pairs under PEFT's own key names: a skeleton with a meta-device layer of each module's shape at its name,
    wrapped by PEFT's LoRA (no memory), filled, and read back by ``get_peft_model_state_dict``."""
    root = nn.Module()
    for name, (a, b, conv) in pairs.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        with torch.device("meta"):  # (out, r) @ (r, in): the base layer is in -> out
            base = Conv1D(b.shape[0], a.shape[1]) if conv else nn.Linear(a.shape[1], b.shape[0], bias=False)
        node.add_module(leaf, base)
    skeleton = PeftModel(root, copy.deepcopy(config), ADAPTER, low_cpu_mem_usage=True)  # PEFT may adjust its copy
    filled = set()
    for name, module in skeleton.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            a, b, _ = pairs[name]
            module.lora_A[ADAPTER].weight = nn.Parameter(a, requires_grad=False)
            module.lora_B[ADAPTER].weight = nn.Parameter(b, requires_grad=False)
            filled.add(name)
    if filled != set(pairs):
        raise RuntimeError(f"PEFT's LoRA did not adapt {sorted(set(pairs) - filled)} of the skeleton.")
    return get_peft_model_state_dict(skeleton, adapter_name=ADAPTER, save_embedding_layers=False)


def _card(task: str, config: LoraConfig, router_layer: int, all_layers: bool) -> ModelCard:
    data = ModelCardData(library_name="peft", base_model=config.base_model_name_or_path, tags=["lora", "peft-asr"])
    zeros = " (zero pairs in the blocks below it, for engines that need every block)" if all_layers else ""
    text = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# `{task}`: one task of an Analytic Subspace Routing bank, as a LoRA adapter\n\n"
        f"A plain PEFT LoRA adapter (rank {config.r}, alpha {config.lora_alpha}) exported by peft-asr from task "
        f"`{task}` of a bank: the blocks from {router_layer} up{zeros}. It answers as the bank does when the bank's "
        "router chooses this task; choosing the task per prompt is the router's job, not the adapter's.\n\n"
        "```python\nfrom peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, path)\n```\n"
    )
    return ModelCard(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a hidden sibling folder, fsync it, rename it to ``target`` (an existing ``target`` is renamed
    aside first, put back if the second rename fails, deleted after). A failure leaves no sibling behind, nor the
    missing parent folders it created."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp = target.parent / f".{target.name}.export-tmp-{token}"
    old: Optional[Path] = None
    try:
        tmp.mkdir()  # mode from the umask, like any folder (mkdtemp would make it private)
        write(tmp)
        for folder, _dirs, files in os.walk(tmp, topdown=False):  # every file, then every folder, deepest first
            for file in files:
                _fsync(Path(folder) / file)
            _fsync(Path(folder))
        if target.exists():
            old = target.parent / f".{target.name}.export-old-{token}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                old = None
                raise
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):  # only if still empty
                parent.rmdir()
        raise
    _fsync(target.parent)  # the renames themselves
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
