"""Merging one task's subspace into the weight of the layer it adapts: float bases and bitsandbytes 4-bit / 8-bit.

``W' = W + scaling * B_t @ A_t`` for the task ``t`` pinned by ``use_task``. How the sum is written depends on how
``W`` is stored:

* **float** (float32, bfloat16, float16): the sum is taken in float32 (the adapters' dtype) and rounded once to
  the weight's dtype, in place. Unmerging subtracts the same way (in half precision both steps round, by at most
  one unit in the last place, as PEFT's LoRA does).
* **bitsandbytes 4-bit / 8-bit** (QLoRA): packed codes cannot be added to, so the weight is dequantized with PEFT's
  ``dequantize_bnb_weight``, ``ΔW`` is added in float32 and the sum is quantized again with the weight's own settings
  (quant type, block size, double quantization, storage dtype): what ``peft.tuners.lora.bnb`` does. Rounding onto
  the 4-bit / 8-bit grid changes the merged model's outputs against the unmerged task (a warning says so;
  tests/test_quantized.py measures it). Unmerging puts back the quantized weight kept at merge time instead of
  subtracting and rounding again, so the base is bit-identical after ``unmerge_adapter()``.

Any other weight (another quantizer's tensor subclass, 8-bit layers holding fp16 weights) is refused with a
``TypeError`` before any layer changes: :func:`check_mergeable` runs over every adapted layer first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

from .config import BASE_ROUTE

__all__ = ["KeptWeight", "check_mergeable", "merge_delta", "unmerge_delta", "weight_kind"]

NOT_PINNED = (
    "an ASR bank routes each input to its own task, so it cannot be merged as a whole; pin one task: "
    "`model.merge_and_unload(task='name')` or `with model.use_task('name'): model.merge_adapter()`."
)
FLOAT, INT4, INT8 = "float", "4bit", "8bit"


@dataclass
class KeptWeight:
    """The quantized weight as it was before a merge (a plain object, so the module does not register it)."""

    kind: str  # "4bit" or "8bit"
    weight: nn.Parameter
    scb: Optional[torch.Tensor] = None  # 8-bit: the row scales, which bitsandbytes moves from the weight to the state


def weight_kind(base: nn.Module, name: str = "") -> str:
    """How ``base.weight`` is stored: ``"4bit"`` / ``"8bit"`` (bitsandbytes) or ``"float"``; a ``TypeError`` when a
    task cannot be merged into it."""
    weight = base.weight
    kind = get_bnb_param_type(weight)
    where = f"`{name}`" if name else "the base layer"
    if kind == INT8 and getattr(weight, "has_fp16_weights", False):
        raise TypeError(
            f"{where} is a bitsandbytes 8-bit layer holding float16 weights (`has_fp16_weights=True`), which ASR "
            "cannot merge into; keep the bank unmerged and pin the task with `model.use_task(name)`."
        )
    if kind:
        return kind
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
        raise TypeError(
            f"{where} stores its weight as {type(weight.data).__name__} ({weight.dtype}), which ASR cannot merge a "
            "task into (it merges into float weights and bitsandbytes 4-bit / 8-bit ones); keep the bank unmerged and "
            "pin the task with `model.use_task(name)`, or merge into a float copy of the base model."
        )
    return FLOAT


def check_mergeable(layers: Iterable[tuple[str, nn.Module]], task: Optional[str]) -> None:
    """Everything that can refuse a merge of ``task``, checked over every adapted layer before any layer changes."""
    if task is None or task == BASE_ROUTE:
        raise ValueError(NOT_PINNED)
    kinds = set()
    for name, layer in layers:
        if layer.merged and layer._merged_task != task:
            raise RuntimeError(
                f"task {layer._merged_task!r} is already merged into the base weights; call "
                f"`model.unmerge_adapter()` before merging task {task!r}."
            )
        kinds.add(weight_kind(layer.get_base_layer(), name))
        adapter = layer.active_adapters[0]
        for param in (layer.asr_A[adapter][task], layer.asr_B[adapter][task]):
            if not torch.isfinite(param).all():
                raise ValueError(f"task {task!r} has NaN or inf weights in `{name}`; its subspace is broken.")
    quantized = sorted(kinds - {FLOAT})
    if quantized:
        warnings.warn(
            f"merging task {task!r} into a bitsandbytes {' and '.join(quantized)} base quantizes the merged weights "
            "again: the merged model's outputs (and so its generations) differ from the unmerged task's by the "
            "rounding. For exact outputs keep the bank unmerged and pin the task with `model.use_task(name)`.",
            UserWarning,
            stacklevel=2,
        )


def _finite(merged: torch.Tensor, task: str) -> torch.Tensor:
    if not torch.isfinite(merged).all():
        raise ValueError(f"merging task {task!r} produced NaN or inf weights; the task's subspace is broken.")
    return merged


def _dense_4bit(weight: nn.Parameter) -> torch.Tensor:
    """(out, in) float weight of a 4-bit parameter. bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel on
    the first eval forward; ``dequantize_4bit`` reads the standard layout only, so undo that repacking first."""
    import bitsandbytes as bnb

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        inverse = bnb.functional._convert_weight_packed_for_cpu_inverse  # bitsandbytes' own inverse (it saves so too)
        weight.data, weight.quant_state = inverse(weight.data, weight.quant_state)
    return dequantize_bnb_weight(weight, state=weight.quant_state)


@torch.no_grad()
def merge_delta(base: nn.Module, delta: torch.Tensor, *, safe_merge: bool, task: str) -> Optional[KeptWeight]:
    """Add ``delta`` (the base weight's layout) to ``base.weight``; returns what :func:`unmerge_delta` restores."""
    kind = weight_kind(base)
    weight = base.weight
    if kind == FLOAT:
        merged = (weight.data + delta.to(weight.device)).to(weight.dtype)  # float32 sum, one rounding
        weight.data.copy_(_finite(merged, task) if safe_merge else merged)
        return None
    import bitsandbytes as bnb

    if kind == INT4:
        dense = _dense_4bit(weight)  # (out, in), in the dtype the weight was quantized from
        merged = (dense.float() + delta.to(dense.device).float()).to(dense.dtype)
        merged = _finite(merged, task) if safe_merge else merged
        base.weight = bnb.nn.Params4bit(
            merged, requires_grad=False, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type, quant_storage=weight.quant_storage, module=base,
        ).to(weight.device)  # `.to` of an unquantized Params4bit quantizes it (and sets `base.quant_state`)
        return KeptWeight(INT4, weight)
    state = base.state
    dense = dequantize_bnb_weight(weight, state=state)  # (out, in) float32; sets `state.SCB` from the weight if unset
    scb = state.SCB
    merged = dense.float() + delta.to(dense.device).float()
    merged = _finite(merged, task) if safe_merge else merged
    # Int8Params quantizes in `.to(device)` only when its data is on the CPU, hence the CPU copy (as PEFT does)
    base.weight = bnb.nn.Int8Params(merged.cpu(), requires_grad=False, has_fp16_weights=False).to(weight.device)
    state.reset_grads()  # the next forward reads the new codes and scales from the weight
    return KeptWeight(INT8, weight, scb)


@torch.no_grad()
def unmerge_delta(base: nn.Module, delta: torch.Tensor, kept: Optional[KeptWeight]) -> None:
    """Undo :func:`merge_delta`: subtract ``delta`` from a float weight, put a kept quantized weight back."""
    if kept is None:
        weight = base.weight
        weight.data.copy_((weight.data - delta.to(weight.device)).to(weight.dtype))
        return
    device = base.weight.device
    weight = kept.weight if kept.weight.device == device else kept.weight.to(device)
    if kept.kind == INT4:
        weight.module = base
        base.weight = weight
        base.quant_state = weight.quant_state
        return
    # 8-bit: hand the codes and scales back through the weight, where bitsandbytes' next forward picks them up
    weight.CB, weight.SCB = weight.data, kept.scb.to(device)
    base.weight = weight
    base.state.reset_grads()
