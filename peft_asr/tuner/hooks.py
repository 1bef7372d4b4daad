"""The hooks of one routed call: they take the decision into the pass (or reuse the one taken up front), hand it to
every adapted layer, and record the decision on the cache the call returns. Installed by :func:`routing_hooks` for
one ``forward`` / ``generate`` and removed in ``finally``; the plan they follow is
:func:`peft_asr.tuner.routing.plan_call`'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch

from .call_inputs import bind_inputs, hidden_from_call, returned_cache, rows_of
from .features import is_packed
from .routing import RoutingCall, check_rows

__all__ = ["routing_hooks"]


def _pads_before_tokens(mask: torch.Tensor) -> bool:
    """Whether a real token comes after padding in some row (left padding): positions counted from the start of
    the row then differ from those counted over real tokens. One host read."""
    pads_so_far = (mask == 0).long().cumsum(dim=1) > 0  # (B, L)
    return bool((pads_so_far & mask.bool()).any())


def _check_first_generate_call(call: RoutingCall, inputs: Mapping[str, Any], rows: Optional[int]) -> None:
    """Before the first forward of a ``generate`` runs: it must hold the whole prompt, in rows the decisions map to."""
    source = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs.get("input_ids")
    allowed = {call.prompt_rows, call.prompt_rows * call.expand} if call.prompt_rows else set()
    if rows is not None and allowed and rows not in allowed:
        raise RuntimeError(
            f"the first forward of this `generate` has {rows} rows for {call.prompt_rows} prompts; pass "
            "`task_names=[...]` or pin a task with `use_task`."
        )
    if call.task_ids is None and isinstance(source, torch.Tensor) and source.shape[1] < call.prompt_length:
        raise RuntimeError(
            f"the first forward of this `generate` sees {source.shape[1]} of the prompt's {call.prompt_length} "
            "tokens, so it cannot route on the whole prompt; pass `task_names=[...]` or pin a task with `use_task`."
        )


@contextlib.contextmanager
def routing_hooks(tuner, call: RoutingCall) -> Iterator[None]:
    """Install the hooks that take (or reuse) the decision and hand it to every adapted layer; remove them after."""
    router = tuner.router
    feature_module = tuner._feature_module()

    def capture(module, args, kwargs):
        if call.seen or call.busy:
            return  # later forwards of a `generate` (decode steps, candidate checks): the decision is kept
        call.seen = True
        inputs = bind_inputs(module, args, kwargs)
        call.inputs = inputs
        rows = rows_of(inputs)
        if call.generating:
            _check_first_generate_call(call, inputs, rows)
            return
        if call.explicit or call.continued:
            check_rows(call.task_ids.shape[0], rows, "`task_names`" if call.explicit else "the routed cache")
            return
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ValueError(
                f"a routed forward needs a 2-D `attention_mask` (batch, length) to find each prompt's tokens, got "
                f"shape {tuple(mask.shape)}; pass the padding mask, or `task_names=[...]`."
            )
        if inputs.get("position_ids") is not None or inputs.get("cu_seq_lens_q") is not None:
            if is_packed(inputs):
                raise ValueError(
                    "a routed forward got packed rows (`position_ids` restart inside a row): one row holds several "
                    "prompts, but a row takes one task. Route unpacked rows, or pass `task_names` per row."
                )
        elif (isinstance(mask, torch.Tensor) and tuner._absolute_positions() and tuner._positions_from_mask()
              and _pads_before_tokens(mask)):
            # an absolute-position model runs this call with positions counted from the pads, `route` and
            # `generate` from the mask: decide on the prompt as they see it, by one separate shallow pass
            batch = {k: inputs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "labels", "token_type_ids")
                     if isinstance(inputs.get(k), torch.Tensor)}
            call.busy = True
            try:
                call.task_ids = router.predict(tuner.router_features(batch))
            finally:
                call.busy = False

    def decide(_module, args, kwargs):
        if call.task_ids is not None or call.busy:
            return
        hidden = hidden_from_call(args, kwargs)  # (B', n, d)
        if call.generating:  # the first forward holds the whole prompt, in rows that map (checked by `capture`)
            length, rows = call.prompt_length, hidden.shape[0]
            mask = (call.inputs or {}).get("attention_mask")
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == rows
                    and mask.shape[1] >= length):
                mask = _expand_rows(call.prompt_attention, rows)  # e.g. the 4-D mask of a static cache
            inputs = {"attention_mask": mask[:, :length]}  # the prompt positions: drafts come after them
            pooled = tuner._pool(hidden[:, :length], inputs, strict=False)  # (B', L, d) -> (B', d)
        else:
            pooled = tuner._pool(hidden, call.inputs or {}, strict=False)  # (B, L, d) -> (B, d), no host sync
        call.task_ids = router.predict(pooled).to(hidden.device)  # (B',)

    # one `generate`: each layer keeps its rows' gathered subspaces here on the first forward, for every later step
    gathered: Optional[dict] = {} if call.generating else None

    def hand_over(_module, args, kwargs):
        if call.task_ids is None:
            raise RuntimeError(
                "an adapted layer ran before the router decided: the router block did not run in this call (e.g. "
                "`encoder_outputs` were passed); pass `input_ids` so routing can run, or `task_names=[...]`."
            )
        x = args[0] if args else next(iter(kwargs.values()))
        ids = _ids_for_rows(call, x.shape[0])
        if ids is None:
            raise RuntimeError(
                f"the routed call has {call.task_ids.shape[0]} routing decisions but an adapted layer received "
                f"{x.shape[0]} rows; pass one `task_names` entry per row, or call the model on the batch that was "
                "routed."
            )
        kwargs["asr_task_ids"] = ids
        if gathered is not None:
            kwargs["asr_gathered"] = gathered
        return args, kwargs

    def record(_module, _args, _kwargs, output):
        cache = returned_cache(output)
        if cache is None or call.task_ids is None or call.busy:
            return
        logits = output.get("logits") if isinstance(output, Mapping) else None
        ids = _ids_for_rows(call, logits.shape[0]) if isinstance(logits, torch.Tensor) else call.task_ids
        if ids is None:
            return
        try:
            tuner._cache_routes[cache] = ids  # a later call continuing this cache keeps this decision
        except TypeError:
            pass  # a cache that cannot be weakly referenced: a continuing call will ask for `task_names`

    handles = [feature_module.register_forward_pre_hook(capture, with_kwargs=True)]
    try:
        if call.task_ids is None:
            handles.append(tuner._router_block().register_forward_pre_hook(decide, with_kwargs=True))
        # the whole model's output holds the cache (the encoder's does not, for seq2seq); `generate`'s too
        handles.append(tuner.model.register_forward_hook(record, with_kwargs=True))
        handles.extend(layer.register_forward_pre_hook(hand_over, with_kwargs=True) for layer in tuner._asr_layers())
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ids_for_rows(call: RoutingCall, rows: int) -> Optional[torch.Tensor]:
    """The decisions for a module that receives ``rows`` rows: as taken, or expanded as ``generate`` expands its
    inputs for beams / returned sequences; ``None`` when they cannot be mapped."""
    ids = call.task_ids
    if rows == ids.shape[0]:
        return ids
    if call.generating and call.expand > 1 and rows == ids.shape[0] * call.expand:
        if call.expanded is None:
            call.expanded = ids.repeat_interleave(call.expand)
        return call.expanded
    return None


def _expand_rows(attention: torch.Tensor, rows: int) -> torch.Tensor:
    """The prompt's (B, L) mask for the first forward's rows (a multiple of B, checked by `capture`)."""
    return attention if rows == attention.shape[0] else attention.repeat_interleave(rows // attention.shape[0], 0)
