"""Pooling of hidden states into one router feature per sequence.

The router of Analytic Subspace Routing reads the hidden state entering the router layer, normalised by the model's
final norm, and averages it over the *prompt's real tokens*. Two masks decide which tokens count:

* the attention mask (padding is never averaged: with pads in the mean, a prompt's feature would depend on its
  batch neighbours' lengths, which limits the paper's code to batch size 1);
* in training batches, ``labels == -100`` marks the prompt (the answer tokens must not leak into the feature, since at
  inference the router only sees the prompt).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["prompt_mask", "masked_mean"]

IGNORE_INDEX = -100


def prompt_mask(
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    explicit_mask: Optional[torch.Tensor] = None,
    *,
    shape: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Boolean (B, L) mask of the prompt tokens the router pools over.

    Args:
        attention_mask: (B, L) 1 for real tokens, 0 for padding; ``None`` means no padding.
        labels: (B, L) training labels; where given, only positions with ``labels == -100`` count (the prompt).
        explicit_mask: (B, L) a prompt mask given by the user; it replaces ``labels`` when the collator does not mask
            the prompt in the labels.
        shape: (B, L), needed only when ``attention_mask`` is ``None``.
    """
    if attention_mask is None:
        ref = explicit_mask if explicit_mask is not None else labels
        if ref is None and shape is None:
            raise ValueError("`prompt_mask` needs `attention_mask`, `labels`, `explicit_mask` or `shape`.")
        size = tuple(ref.shape) if ref is not None else shape
        device = ref.device if ref is not None else None
        mask = torch.ones(size, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.bool()
    if explicit_mask is not None:
        if explicit_mask.shape != mask.shape:
            raise ValueError(
                f"`prompt_mask` has shape {tuple(explicit_mask.shape)} but the batch has shape {tuple(mask.shape)}."
            )
        mask = mask & explicit_mask.bool()
    elif labels is not None:
        if labels.shape != mask.shape:
            raise ValueError(f"`labels` has shape {tuple(labels.shape)} but the batch has shape {tuple(mask.shape)}.")
        mask = mask & (labels == IGNORE_INDEX)
    return mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
    """Average ``hidden`` over the positions where ``mask`` is true: (B, L, d) -> (B, d), computed in float64.

    With ``strict`` (fitting and explicit routing), raises ``ValueError`` naming the rows that have no token to pool
    over (an all-padding row, or a training row whose labels mask nothing as prompt). Without it (the routed forward
    path, which must not wait on the device) such rows come out as NaN, which the router sends to the base route.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (batch, length, dim), got shape {tuple(hidden.shape)}.")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}.")
    counts = mask.sum(dim=1)  # (B,)
    if strict:
        empty = counts == 0
        if bool(empty.any()):  # host sync: only when fitting or routing explicitly
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"rows {rows} have no prompt token to route on (all padding, or `labels` mark no position as prompt "
                "with -100). Pass prompt-only batches, a `prompt_mask` key, or labels with the prompt set to -100."
            )
    weights = mask.to(torch.float64).unsqueeze(-1)  # (B, L, 1)
    summed = (hidden.to(torch.float64) * weights).sum(dim=1)  # (B, L, d) -> (B, d)
    return summed / counts.to(torch.float64).unsqueeze(-1)  # (B, d); 0 / 0 = NaN for an empty row (strict=False)
