"""Checks of user batches at the public entry points (``fit_router``, ``route``, ``route_scores``, ``router_features``).

They run before any model layer, so a bad batch fails here, with a message that says what to change, instead of deep
inside torch. Nothing here runs in the routed forward pass (``forward``/``generate``), which must stay free of host
syncs; those calls rely on the checks of :mod:`peft_asr.tuner.features`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch

from .errors import RouterNumericalError

__all__ = ["check_batch", "check_batches", "check_features"]


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got {type(value).__name__}; tokenize with `return_tensors='pt'`."
        )
    return value


def check_batch(batch: Mapping[str, Any], vocab_size: Optional[int] = None) -> None:
    """Types, shapes and values of one batch: ``input_ids`` (B, L) integer ids in ``[0, vocab_size)`` (or
    ``inputs_embeds`` (B, L, d)), ``attention_mask`` / ``labels`` / ``prompt_mask`` of the same (B, L), no row that is
    all padding."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a mapping with `input_ids` and `attention_mask`, got {type(batch).__name__}.")
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    if ids is None and embeds is None:
        raise ValueError(f"a batch needs `input_ids` (or `inputs_embeds`); got keys {sorted(map(str, batch))}.")
    if ids is not None:
        ids = _tensor("input_ids", ids)
        if ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must be 2-D (batch, length), got shape {tuple(ids.shape)}; for one prompt use "
                "`input_ids.unsqueeze(0)`."
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must hold integer token ids (torch.long), got dtype {ids.dtype}.")
        shape = tuple(ids.shape)
    else:
        embeds = _tensor("inputs_embeds", embeds)
        if embeds.dim() != 3 or not embeds.dtype.is_floating_point:
            raise ValueError(f"`inputs_embeds` must be a float (batch, length, dim) tensor, got {tuple(embeds.shape)} "
                             f"{embeds.dtype}.")
        shape = tuple(embeds.shape[:2])
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"the batch is empty (shape {shape}); pass at least one prompt with at least one token.")
    if ids is not None and vocab_size is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}) for this model, got ids in [{low}, {high}]: the tokenizer "
                "does not belong to the model (or padding used a negative id such as -100 in `input_ids`)."
            )
    for name in ("attention_mask", "labels", "prompt_mask", "position_ids", "token_type_ids"):
        value = batch.get(name)
        if value is None:
            continue
        value = _tensor(name, value)
        if name == "labels" and (value.dim() != 2 or value.dtype.is_floating_point):
            continue  # class or multi-label targets: not token labels, ignored by the prompt rule
        if tuple(value.shape) != shape:
            raise ValueError(f"`{name}` has shape {tuple(value.shape)} but `input_ids` has shape {shape}.")
    mask = batch.get("attention_mask")
    if mask is not None:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real token).")
        empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"rows {empty} have no prompt token to route on: they are all padding (`attention_mask` is 0 "
                "everywhere). Drop those rows from the batch."
            )


def check_batches(batches: Any) -> None:
    """``fit_router``'s ``batches`` must be an iterable of batches, not one batch or a string."""
    if isinstance(batches, Mapping):
        raise TypeError(
            "`batches` must be an iterable of batches (a list or a DataLoader), got a single batch (a mapping); "
            "wrap it in a list: `fit_router([batch], task=...)`."
        )
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"`batches` must be an iterable of batches (a list or a DataLoader), got {type(batches).__name__}.")


def check_features(pooled: torch.Tensor) -> None:
    """Pooled router features must be finite; NaN/inf comes from hidden states that overflowed (fp16)."""
    bad = (~torch.isfinite(pooled).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise RouterNumericalError(
            f"the router features of rows {bad} contain NaN or inf: the model's hidden states overflowed before the "
            "router layer (typical of fp16). Run the model in bfloat16 or float32 for routing and `fit_router`."
        )
