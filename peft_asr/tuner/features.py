"""Which tokens are the prompt, their positions, and the pooling of hidden states into one router feature per prompt.

The router of Analytic Subspace Routing reads the hidden state entering the router layer, normalised by the model's
final norm, and averages it over the *prompt's real tokens*. One rule decides which tokens those are, everywhere
(``route``, ``route_scores``, ``fit_router``, ``ASRCallback`` and a routed ``forward``/``generate``):

* the attention mask: padding is never averaged (with pads in the mean, a prompt's feature would depend on its batch
  neighbours' lengths, which limits the paper's code to batch size 1);
* ``prompt_mask`` (an explicit (B, L) mask) when a batch carries one;
* otherwise token-level ``labels`` (B, L): the prompt is the leading run of real tokens labelled -100, from a
  row's first real token up to its first token with a real label (the answer must not leak into the feature: at
  inference the router only sees the prompt). A row whose leading run is shorter than two tokens is a
  language-modelling row (``labels=input_ids``; TRL's plain ``"text"`` rows, whose first label is always -100;
  ``DataCollatorForLanguageModeling`` with pad == eos, which also sets -100 on real EOS tokens later in the row):
  its whole real sequence is the prompt. A one-token prompt therefore needs an explicit ``prompt_mask``. Labels that
  are not integer (B, L) token labels (class or multi-label targets, a seq2seq target) say nothing about the prompt
  and are ignored.

Positions: the router's features are computed with the position ids ``generate`` derives from the attention mask
(``cumsum - 1``), unless the batch carries its own, so an absolute-position model (GPT-2) scores a row the same
padded, alone, in ``route`` and in ``generate``.

Packed rows (TRL ``packing=True`` / ``padding_free=True``: several examples in one row, ``position_ids`` restarting
at 0 for each) are split back into one row per example before the router sees them, so every example is one prompt.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

__all__ = ["prompt_mask", "masked_mean", "masked_last", "pool", "POOLINGS", "positions_from_mask", "is_packed",
           "unpack_rows", "IGNORE_INDEX"]

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
        labels: (B, L) token labels; the leading run of real tokens labelled -100 is the prompt, and a row whose run
            is shorter than two tokens is prompt as a whole. Labels that are not integer (B, L) (class or
            multi-label targets) are ignored.
        explicit_mask: (B, L) a prompt mask given by the user; it replaces ``labels``.
        shape: (B, L), needed only when ``attention_mask`` is ``None``.

    No host synchronisation: this runs inside every routed forward.
    """
    if labels is not None and (labels.dim() != 2 or labels.dtype.is_floating_point):
        labels = None  # classification (B,) or multi-label (B, C) float targets: not token labels
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
    if labels is None or labels.shape != real.shape:
        return real  # labels of another shape are a target (checked by `check_batch` where a batch is validated)
    answer = real & (labels.to(real.device) != IGNORE_INDEX)  # (B, L) real tokens with a real label
    leading = real & (answer.long().cumsum(dim=1) == 0)  # (B, L) real tokens before the first labelled one
    # a run of one is no prompt: the first token's label is never a causal-LM target, so TRL sets -100 there
    has_prompt = leading.sum(dim=1, keepdim=True) >= 2  # (B, 1)
    return torch.where(has_prompt, leading, real)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) as ``generate`` derives them: ``cumsum(mask) - 1`` on real tokens, 0 on padding."""
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)


def _positions_of(batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """``position_ids``, or (1, N) positions rebuilt from the sequence boundaries ``cu_seq_lens_q`` of a flattened row."""
    positions = batch.get("position_ids")
    bounds = batch.get("cu_seq_lens_q")
    if positions is None and isinstance(bounds, torch.Tensor) and bounds.numel() > 1:
        starts = bounds[:-1].long()
        lengths = bounds.diff().long()
        total = int(bounds[-1])
        offsets = torch.repeat_interleave(starts, lengths, output_size=total)  # (N,) start of each token's example
        positions = (torch.arange(total, device=bounds.device) - offsets).unsqueeze(0)  # (1, N)
    return positions


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


def unpack_rows(batch: Mapping[str, Any], pad_token_id: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Split packed rows into one right-padded row per example: (B, L) with k examples -> (sum k, max length).

    An example starts where ``position_ids`` is 0 (TRL's packed and padding-free collators; rebuilt from
    ``cu_seq_lens_q`` when only those are given). ``input_ids`` (or ``inputs_embeds``), ``labels`` and
    ``prompt_mask`` are split along; the result has an ``attention_mask`` and no ``position_ids`` (positions restart
    at 0 per example, which is what the mask gives back). A padding-free row padded to a multiple
    (``pad_to_multiple_of``) ends in pad tokens at position 0, which look like one-token examples: trailing
    one-token pieces holding ``pad_token_id`` are padding and are dropped.
    """
    positions = _positions_of(batch)
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
        spans = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        ids = batch.get("input_ids")
        while (pad_token_id is not None and isinstance(ids, torch.Tensor) and len(spans) > 1
               and spans[-1][1] - spans[-1][0] == 1 and int(ids[row, index[spans[-1][0]]]) == pad_token_id):
            spans.pop()  # a pad token of `pad_to_multiple_of`, not an example
        for lo, hi in spans:
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


POOL_CHUNK_ELEMENTS = 1 << 22  # elements of one float64 slice of the pooling (32 MB), whatever the batch and length


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, *, strict: bool = True,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Average ``hidden`` over the positions where ``mask`` is true: (B, L, d) -> (B, d), summed in float64.

    ``transform`` (the final norm) is applied to ``hidden`` first, position-wise. Both run over slices of positions
    of at most ``POOL_CHUNK_ELEMENTS`` float64 numbers, so the pooling never holds a float64 (or transformed) copy of
    the whole hidden state: 2 x B x L x d x 8 bytes at once (2.4 GB at B=8, L=8192, d=2304) became 64 MB.

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
    batch, length, dim = hidden.shape
    weights = mask.to(torch.float64).unsqueeze(-1)  # (B, L, 1)
    step = max(1, POOL_CHUNK_ELEMENTS // max(1, batch * dim))  # positions per slice
    summed = torch.zeros(batch, dim, dtype=torch.float64, device=hidden.device)
    for start in range(0, length, step):  # shapes only: no host read
        part = hidden[:, start:start + step]  # (B, l, d)
        if transform is not None:
            part = transform(part)
        summed += (part.to(torch.float64) * weights[:, start:start + step]).sum(dim=1)  # (B, l, d) -> (B, d)
    return summed / counts.to(torch.float64).unsqueeze(-1)  # (B, d); 0 / 0 = NaN for an empty row (strict=False)


def masked_last(hidden: torch.Tensor, mask: torch.Tensor, *,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The hidden state at each row's last masked position: (B, L, d) -> (B, d) float64, ``transform`` applied to
    those B vectors only. A row with no masked position gives NaN (the router sends it to the base route); callers
    that must refuse such rows check them with :func:`masked_mean` (``strict``), which runs first. No host read."""
    batch, length, _ = hidden.shape
    positions = torch.arange(1, length + 1, device=mask.device)  # (L,) 1-based, so an empty row gives index 0
    index = (mask.long() * positions).argmax(dim=1)  # (B,) last masked position (0 for an empty row)
    last = hidden[torch.arange(batch, device=hidden.device), index.to(hidden.device)].unsqueeze(1)  # (B, 1, d)
    if transform is not None:
        last = transform(last)
    last = last.squeeze(1).to(torch.float64)
    empty = ~mask.bool().any(dim=1).to(hidden.device)  # (B,)
    return last.masked_fill(empty.unsqueeze(-1), float("nan"))


# the router's poolings of the prompt: the masked mean (the paper's), or that mean next to the last prompt token,
# whose state has read the whole prompt (measured in docs/router_defaults.md); the feature is (B, d) or (B, 2d)
POOLINGS = {"mean": 1, "mean_last": 2}


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean", *, strict: bool = True,
         transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The router feature of every row: (B, L, d) -> (B, POOLINGS[pooling] * d) float64 (see :func:`masked_mean`
    for ``strict`` and ``transform``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {sorted(POOLINGS)}, got {pooling!r}.")
    mean = masked_mean(hidden, mask, strict=strict, transform=transform)
    if pooling == "mean":
        return mean
    return torch.cat([mean, masked_last(hidden, mask, transform=transform)], dim=1)  # (B, 2d)
