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
(:func:`peft_asr.tuner.hooks.routing_hooks`) and removed in ``finally``. In the common case (an eval-mode ``generate`` or prompt
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

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .config import BASE_ROUTE
from .call_inputs import cache_length, cache_of, generate_prompt, generation_setting

__all__ = ["RoutingCall", "plan_call", "task_ids_from_names", "check_rows"]


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


def _upfront_reason(tuner, args: tuple, kwargs: Mapping[str, Any]) -> Optional[str]:
    """Why the first forward of a ``generate`` cannot route on the whole prompt in the pass (None: it can)."""
    if tuner.model.training:
        return "training mode"  # dropout would make in-pass features differ from `route`'s
    if generation_setting(tuner.model, kwargs, "prefill_chunk_size", args) is not None:
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
            check_rows(call.task_ids.shape[0], prompt["rows"])
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
    cache = cache_of(kwargs)
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


def check_rows(decisions: int, rows: Optional[int], what: str = "`task_names`") -> None:
    if rows is not None and rows != decisions:
        entries = "entries" if what == "`task_names`" else "rows"
        raise ValueError(f"{what} has {decisions} {entries} but the batch has {rows} rows; pass one per row.")


