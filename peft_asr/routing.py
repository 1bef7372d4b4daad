"""The routing contract of Analytic Subspace Routing (Any-SSR): how one ``forward`` or ``generate`` call gets a task per row.

A routed call does exactly one of three things, chosen before any layer runs:

1. **It follows an explicit choice.** ``task_names=[...]`` (one entry per row: a task name, or ``None`` /
   ``"__base__"`` for the plain base model, like PEFT's ``adapter_names``) on ``forward`` and ``generate``; or a
   task pinned with ``use_task``; or, for a training-mode ``forward``, the task being trained.
2. **It routes on the whole prompt, once per sequence.** ``generate`` decides from the prompt it was given (its
   ``input_ids``/``inputs_embeds`` and attention mask, with the positions it derives from that mask) before any
   draft, chunk or decode token, and keeps the decision for every later step, candidate verification, beam and
   returned sequence. A prompt ``forward`` decides on its own prompt tokens; a ``forward`` that continues a cache
   produced by a routed call reuses that call's decision (it never re-routes on the new tokens).
3. **It refuses** with an error that says what to do, before any work: a cache no routed call produced, a merged
   task asked to answer for others, packed rows in a routed forward, a row count it cannot map to the decisions.

How the decision reaches the deep layers: forward pre-hooks installed for the duration of one call
(:func:`routing_hooks`) and removed in ``finally``. In the common case (an eval-mode ``generate`` or prompt
``forward``) the decision is taken *in the pass*: a pre-hook on the router block pools the hidden state entering it
over the prompt positions and predicts, so the shallow blocks run once. Where the first forward of a ``generate``
cannot see the whole prompt as the router must see it (chunked prefill, training mode with its dropout), the
decision is taken up front by one separate pass of the shallow blocks over the prompt (the same function as
``route``), and then kept. A call that continues a cache (a manual decode loop, ``generate`` on a cache passed in)
keeps the decision of the routed call that made the cache, whose deep-layer states were computed with it; a cache
no routed call made is refused.

Per-call state lives in a :class:`RoutingCall` created for the call; the only state kept between calls is the map
from a cache object a routed ``forward`` returned to that call's decision (weakly keyed: it goes with the cache).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import BASE_ROUTE
from .features import is_packed

__all__ = ["RoutingCall", "plan_call", "routing_hooks", "task_ids_from_names", "generate_prompt"]


@dataclass
class RoutingCall:
    """State of one routed call; lives only inside one ``_enable_peft_forward_hooks`` context."""

    generating: bool
    task_ids: Optional[torch.Tensor] = None  # (rows,) class per row: 0 base route, t + 1 the t-th task
    explicit: bool = False  # task_ids came from `task_names`
    continued: bool = False  # task_ids came from the routed call whose cache this forward continues
    prompt_rows: Optional[int] = None  # generate: rows of the prompt as given (before beam expansion)
    prompt_length: Optional[int] = None  # generate: tokens of the prompt; the first forward pools positions [:L]
    prompt_attention: Optional[torch.Tensor] = None  # generate: (B, L) attention mask of the prompt
    expand: int = 1  # generate: rows per prompt after the expansion for beams / returned sequences
    inputs: Optional[dict] = None  # named inputs of the feature module's first call
    seen: bool = False
    busy: bool = False  # a separate shallow pass runs inside the call: the hooks stand aside
    expanded: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------------ small helpers
def bind_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The named inputs of a forward call, whether passed by position or keyword."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    inputs = dict(bound.arguments)
    inputs.update(inputs.pop("kwargs", {}) or {})
    return inputs


def hidden_from_call(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _rows(inputs: Mapping[str, Any]) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None


def _cache_of(inputs: Mapping[str, Any]) -> Any:
    for key in ("cache", "past_key_values"):
        value = inputs.get(key)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens already held by a cache (0 for a fresh one)."""
    if hasattr(cache, "get_seq_length"):
        length = cache.get_seq_length()
        return int(length)  # a tensor for static caches: one host read, only when a cache is passed in
    if isinstance(cache, (tuple, list)):
        return len(cache) and int(cache[0][0].shape[-2])
    return 0


def task_ids_from_names(task_names: Any, tasks: Sequence[str], device: torch.device) -> torch.Tensor:
    """``task_names`` (one entry per row) -> class ids (B,): 0 for ``None`` / ``"__base__"``, t + 1 for ``tasks[t]``."""
    if isinstance(task_names, (str, bytes)) or not isinstance(task_names, Sequence):
        raise TypeError(
            f"`task_names` must be a list with one entry per row (a task name, or None for the base model), got "
            f"{type(task_names).__name__}; for one task on every row use `with model.use_task(name):`."
        )
    if len(task_names) == 0:
        raise ValueError("`task_names` is empty; pass one entry per row of the batch.")
    classes = []
    for i, name in enumerate(task_names):
        if name is None or name == BASE_ROUTE:
            classes.append(0)
        elif isinstance(name, str) and name in tasks:
            classes.append(list(tasks).index(name) + 1)
        else:
            raise ValueError(
                f"`task_names[{i}]` is {name!r}, which is not a task of the bank (tasks: {list(tasks)}); use a task "
                "name, or None for the plain base model."
            )
    return torch.tensor(classes, dtype=torch.long, device=device)


def _generation_setting(model: nn.Module, kwargs: Mapping[str, Any], name: str, args: tuple = ()) -> Any:
    """A ``generate`` setting as ``generate`` resolves it: the keyword, else the ``generation_config`` passed (by
    keyword or position), else the model's."""
    if name in kwargs:
        return kwargs[name]
    from transformers import GenerationConfig

    config = kwargs.get("generation_config")
    if config is None:
        config = next((a for a in args if isinstance(a, GenerationConfig)), None)
    if config is None:
        config = getattr(model, "generation_config", None)
    return getattr(config, name, None)


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache``; the first ``Cache`` of a tuple output), or ``None``."""
    from transformers.cache_utils import Cache

    if isinstance(output, Mapping):
        for key in ("cache", "past_key_values"):
            if output.get(key) is not None:
                return output.get(key)
        return None
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Cache)), None)
    return None


def _infer_attention(model: nn.Module, ids: Optional[torch.Tensor], rows: int, length: int, device, kwargs) -> torch.Tensor:
    """The attention mask ``generate`` infers when none is passed: padding where ``input_ids`` holds the pad token
    (unless pad == eos), otherwise every token is real."""
    ones = torch.ones(rows, length, dtype=torch.long, device=device)
    pad = _generation_setting(model, kwargs, "pad_token_id")
    if ids is None or pad is None or ids.dtype not in (torch.int, torch.long):
        return ones
    eos = _generation_setting(model, kwargs, "eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if pad in eos or not bool((ids == pad).any()):
        return ones
    return (ids != pad).long()


def generate_prompt(tuner, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """The prompt a ``generate`` call was given: ``batch`` (what ``route`` would get), ``rows``, ``length``,
    ``attention`` (B, L) and ``expand`` (rows per prompt after the expansion for beams / returned sequences)."""
    model = tuner.model
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    source = embeds if embeds is not None else ids
    if not isinstance(source, torch.Tensor) or source.dim() < 2:
        what = "`encoder_outputs` without `input_ids`" if kwargs.get("encoder_outputs") is not None else "no prompt"
        raise ValueError(
            f"a routed `generate` got {what}: the router must read the prompt (`input_ids` or `inputs_embeds`). Pass "
            "it, or choose the tasks yourself with `task_names=[...]` or `with model.use_task(name):`."
        )
    rows, length = int(source.shape[0]), int(source.shape[1])
    attention = kwargs.get("attention_mask")
    if attention is None:
        attention = _infer_attention(model, ids if embeds is None else None, rows, length, source.device, kwargs)
    elif not isinstance(attention, torch.Tensor) or tuple(attention.shape) != (rows, length):
        raise ValueError(
            f"a routed `generate` needs a 2-D `attention_mask` of shape {(rows, length)} (1 for real tokens, 0 for "
            f"padding), got {getattr(attention, 'shape', type(attention).__name__)}."
        )
    beams = _generation_setting(model, kwargs, "num_beams", args) or 1
    returned = _generation_setting(model, kwargs, "num_return_sequences", args) or 1
    batch = {"inputs_embeds" if embeds is not None else "input_ids": source, "attention_mask": attention}
    return {"batch": batch, "rows": rows, "length": length, "attention": attention, "expand": max(beams, returned)}


def _upfront_reason(tuner, args: tuple, kwargs: Mapping[str, Any]) -> Optional[str]:
    """Why the first forward of a ``generate`` cannot route on the whole prompt in the pass (None: it can)."""
    if tuner.model.training:
        return "training mode"  # dropout would make in-pass features differ from `route`'s
    if _generation_setting(tuner.model, kwargs, "prefill_chunk_size", args) is not None:
        return "chunked prefill"
    if kwargs.get("encoder_outputs") is not None:
        return "encoder outputs passed in"
    return None


# ------------------------------------------------------------------------------------------------ the plan
def plan_call(tuner, args: tuple, kwargs: Mapping[str, Any], generating: bool) -> Optional[RoutingCall]:
    """Decide how this call chooses its tasks; raise before any work when it cannot. ``None``: the layers' own
    configuration applies (a pinned task, or the task being trained in a training forward)."""
    pinned = tuner._pinned[-1] if tuner._pinned else None
    task_names = kwargs.get("task_names")
    training_forward = tuner.model.training and not generating
    merged = tuner.merged_task
    if merged is not None:
        effective = pinned if pinned is not None else (tuner.training_task if training_forward else None)
        if task_names is not None or effective != merged:
            raise RuntimeError(
                f"task {merged!r} is merged into the base weights, so this model can only answer as {merged!r}: "
                f"call it inside `with model.use_task({merged!r}):`, or `model.unmerge_adapter()` to route again "
                "(`model.merge_and_unload(task=...)` gives a plain model of one task)."
            )
        return None
    if task_names is not None:
        if training_forward:
            raise ValueError(
                "`task_names` is for inference; a training-mode forward uses the task being trained "
                f"({tuner.training_task!r}). Call `model.eval()` first."
            )
        call = RoutingCall(generating, explicit=True)
        call.task_ids = task_ids_from_names(task_names, tuner.tasks, tuner._device())
        if generating:
            prompt = generate_prompt(tuner, args, kwargs)
            _check_rows(call.task_ids.shape[0], prompt["rows"])
            call.prompt_rows, call.expand = prompt["rows"], prompt["expand"]
        return call
    if pinned is not None:
        return None
    if training_forward:
        if tuner.training_task is None:
            raise RuntimeError(
                "the model is in training mode but no task is being trained: call `add_task(name)` before "
                "training, `model.eval()` to route, or pin a task with `use_task(name)`."
            )
        return None
    router = tuner.router
    if generating and tuner.model.training and tuner.training_task is not None:
        index = tuner.tasks.index(tuner.training_task) + 1
        if float(router.class_counts[index]) == 0:  # one host read, in training mode only
            task = tuner.training_task
            raise RuntimeError(
                f"`generate` in training mode routes on the prompt, but the task being trained ({task!r}) is not in "
                f"the router yet, so no row could go to it. Pin it (`with model.use_task({task!r}):`) or pass "
                "`task_names`; trainers that generate during training (TRL GRPO/RLOO rollouts) need "
                "`ASRCallback(pin_during_training=True)`."
            )
    if not router.is_fitted:
        raise RuntimeError(
            "the router has not been fitted on any task yet: call `fit_router(batches, task=...)` (ASRCallback does "
            "it at the end of training), or pin a task with `use_task(name)`."
        )
    router.solve()
    cache = _cache_of(kwargs)
    if cache is not None and cache_length(cache) > 0:
        # the cache's deep-layer states were computed with some task: continue with that one, or refuse
        known = _known_decision(tuner, cache, "generate" if generating else "forward")
        call = RoutingCall(generating, task_ids=known, continued=True)
        if generating:
            prompt = generate_prompt(tuner, args, kwargs)
            call.prompt_rows, call.expand = known.shape[0], prompt["expand"]
        return call
    if not generating:
        if kwargs.get("encoder_outputs") is not None:
            raise ValueError(
                "a routed forward got `encoder_outputs`: the encoder does not run, so the router cannot read the "
                "prompt. Pass `task_names=[...]` (e.g. `model.route(**prompt_batch)`), or continue a cache that a "
                "routed call of this model returned."
            )
    call = RoutingCall(generating)
    if generating:
        prompt = generate_prompt(tuner, args, kwargs)
        call.prompt_rows, call.prompt_length = prompt["rows"], prompt["length"]
        call.prompt_attention, call.expand = prompt["attention"], prompt["expand"]
        if _upfront_reason(tuner, args, kwargs) is not None:
            # one separate pass of the shallow blocks over the whole prompt, in eval mode: exactly `route`'s decision
            call.task_ids = router.predict(tuner.router_features(prompt["batch"]))
    return call


def _known_decision(tuner, cache: Any, what: str) -> torch.Tensor:
    try:
        known = tuner._cache_routes.get(cache)
    except TypeError:
        known = None
    if known is None:
        raise RuntimeError(
            f"this {what} continues a cache of {cache_length(cache)} tokens that no routed call of this model "
            "produced (a cache made by the plain base model, inside `use_task` or elsewhere), so its prompt and the "
            "task of its deep layers are unknown, and the new tokens alone must not be routed. Pass "
            "`task_names=[...]` (e.g. `model.route(**prompt_batch)`), pin a task with `use_task`, or run the prompt "
            "through this model first and pass the cache it returns."
        )
    return known


def _check_rows(decisions: int, rows: Optional[int], what: str = "`task_names`") -> None:
    if rows is not None and rows != decisions:
        entries = "entries" if what == "`task_names`" else "rows"
        raise ValueError(f"{what} has {decisions} {entries} but the batch has {rows} rows; pass one per row.")


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


# ------------------------------------------------------------------------------------------------ the hooks
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
        rows = _rows(inputs)
        if call.generating:
            _check_first_generate_call(call, inputs, rows)
            return
        if call.explicit or call.continued:
            _check_rows(call.task_ids.shape[0], rows, "`task_names`" if call.explicit else "the routed cache")
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

    def hand_over(_module, args, kwargs):
        ids = call.task_ids
        if ids is None:
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
