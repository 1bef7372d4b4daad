"""Which tokens are the prompt, their positions, and the pooling of hidden states into one router feature per prompt.

The router of Analytic Subspace Routing reads the hidden state entering the router layer, normalised by the model's
final norm, and averages it over the *prompt's real tokens*. One rule decides which tokens those are, everywhere
(``route``, ``route_scores``, ``fit_router``, ``ASRCallback`` and a routed ``forward``/``generate``):

* the attention mask: padding is never averaged (with pads in the mean, a prompt's feature would depend on its batch
  neighbours' lengths, which limits the paper's code to batch size 1);
* ``prompt_mask`` (an explicit (B, L) mask) when a batch carries one;
* otherwise token-level ``labels`` (B, L): the real tokens whose label is -100 are the prompt (the answer must not
  leak into the feature: at inference the router only sees the prompt). A row whose labels mark no token as prompt,
  besides its first one, is a language-modelling row (``labels=input_ids``, TRL's plain ``"text"`` rows, whose first
  label is always -100): its whole real sequence is the prompt. Labels that are not (B, L) (class labels, a seq2seq
  target) say nothing about the prompt and are ignored.

Positions: the router's features are computed with the position ids ``generate`` derives from the attention mask
(``cumsum - 1``), unless the batch carries its own, so an absolute-position model (GPT-2) scores a row the same
padded, alone, in ``route`` and in ``generate``.

Packed rows (TRL ``packing=True`` / ``padding_free=True``: several examples in one row, ``position_ids`` restarting
at 0 for each) are split back into one row per example before the router sees them, so every example is one prompt.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

__all__ = ["prompt_mask", "masked_mean", "positions_from_mask", "is_packed", "unpack_rows", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def prompt_mask(
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    explicit_mask: Optional[torch.Tensor] = None,
    *,
    shape: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Boolean (B, L) mask of the prompt tokens the router pools over (the rule of the module docstring).

    Args:
        attention_mask: (B, L) 1 for real tokens, 0 for padding; ``None`` means no padding.
        labels: (B, L) token labels; the real tokens labelled -100 are the prompt, and a row that marks none but its
            first real token is prompt as a whole. Labels of another shape (class labels) are ignored.
        explicit_mask: (B, L) a prompt mask given by the user; it replaces ``labels``.
        shape: (B, L), needed only when ``attention_mask`` is ``None``.

    No host synchronisation: this runs inside every routed forward.
    """
    if labels is not None and labels.dim() != 2:
        labels = None  # sequence-classification labels (B,): not token labels
    if attention_mask is None:
        ref = explicit_mask if explicit_mask is not None else labels
        if ref is None and shape is None:
            raise ValueError("`prompt_mask` needs `attention_mask`, `labels`, `explicit_mask` or `shape`.")
        size = tuple(ref.shape) if ref is not None else shape
        device = ref.device if ref is not None else None
        real = torch.ones(size, dtype=torch.bool, device=device)
    else:
        real = attention_mask.bool()
    if explicit_mask is not None:
        if explicit_mask.shape != real.shape:
            raise ValueError(
                f"`prompt_mask` has shape {tuple(explicit_mask.shape)} but the batch has shape {tuple(real.shape)}."
            )
        return real & explicit_mask.to(real.device).bool()
    if labels is None:
        return real
    if labels.shape != real.shape:
        raise ValueError(f"`labels` has shape {tuple(labels.shape)} but the batch has shape {tuple(real.shape)}.")
    marked = real & (labels.to(real.device) == IGNORE_INDEX)  # (B, L)
    first = real & (real.long().cumsum(dim=1) == 1)  # (B, L): each row's first real token
    # the first token's label is never a target of a causal LM, so -100 there says nothing about a prompt
    has_prompt = (marked & ~first).any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(has_prompt, marked, real)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) as ``generate`` derives them: ``cumsum(mask) - 1`` on real tokens, 0 on padding."""
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether a batch packs several examples into one row (``position_ids`` restart at 0 inside a row's real
    tokens, or flash-attention sequence boundaries ``cu_seq_lens_q`` are given). Reads the host once."""
    if batch.get("cu_seq_lens_q") is not None or batch.get("cu_seq_lens_k") is not None:
        return True
    positions = batch.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        return False
    mask = batch.get("attention_mask")
    real = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(positions, dtype=torch.bool)
    starts = (positions == 0) & real  # (B, L)
    return bool((starts.sum(dim=1) > 1).any())


def unpack_rows(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Split packed rows into one right-padded row per example: (B, L) with k examples -> (sum k, max length).

    An example starts where ``position_ids`` is 0 (TRL's packed and padding-free collators). ``input_ids`` (or
    ``inputs_embeds``), ``labels`` and ``prompt_mask`` are split along; the result has an ``attention_mask`` and no
    ``position_ids`` (positions restart at 0 per example, which is what the mask gives back).
    """
    positions = batch["position_ids"]
    mask = batch.get("attention_mask")
    real = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(positions, dtype=torch.bool)
    source = "input_ids" if batch.get("input_ids") is not None else "inputs_embeds"
    keys = [k for k in (source, "labels", "prompt_mask") if isinstance(batch.get(k), torch.Tensor)]
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for row in range(positions.shape[0]):
        index = real[row].nonzero().flatten()  # (n,) real token positions of this row
        starts = (positions[row, index] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts  # a row that begins mid-example still starts a piece at its first real token
        bounds = starts + [len(index)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                for k in keys:
                    pieces[k].append(batch[k][row, index[lo:hi]])
    lengths = [len(p) for p in pieces[source]]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        fill = IGNORE_INDEX if k == "labels" else 0
        ref = pieces[k][0]
        padded = ref.new_full((len(lengths), width, *ref.shape[1:]), fill)  # (examples, width[, d])
        for i, piece in enumerate(pieces[k]):
            padded[i, : len(piece)] = piece
        out[k] = padded
    attention = torch.zeros(len(lengths), width, dtype=torch.long, device=positions.device)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    out["attention_mask"] = attention
    return out


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
    """Average ``hidden`` over the positions where ``mask`` is true: (B, L, d) -> (B, d), computed in float64.

    With ``strict`` (fitting and explicit routing), raises ``ValueError`` naming the rows that have no token to pool
    over (an all-padding row). Without it (the routed forward path, which must not wait on the device) such rows come
    out as NaN, which the router sends to the base route.
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
                f"rows {rows} have no prompt token to route on (all padding, or an empty `prompt_mask`). Pass "
                "prompt-only batches, a `prompt_mask` key, or labels with the prompt set to -100."
            )
    weights = mask.to(torch.float64).unsqueeze(-1)  # (B, L, 1)
    summed = (hidden.to(torch.float64) * weights).sum(dim=1)  # (B, L, d) -> (B, d)
    return summed / counts.to(torch.float64).unsqueeze(-1)  # (B, d); 0 / 0 = NaN for an empty row (strict=False)
