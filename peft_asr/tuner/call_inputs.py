"""Reading one call's inputs the way the model and ``generate`` read them: named arguments of a module call, the
hidden state entering a block, the rows and the cache of a call, ``generate``'s settings and prompt, the cache a
forward returned."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch
from torch import nn

__all__ = ["bind_inputs", "hidden_from_call", "rows_of", "cache_of", "cache_length", "generation_setting",
           "returned_cache", "generate_prompt"]


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


def rows_of(inputs: Mapping[str, Any]) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None


def cache_of(inputs: Mapping[str, Any]) -> Any:
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


def generation_setting(model: nn.Module, kwargs: Mapping[str, Any], name: str, args: tuple = ()) -> Any:
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


def infer_attention(model: nn.Module, ids: Optional[torch.Tensor], rows: int, length: int, device, kwargs) -> torch.Tensor:
    """The attention mask ``generate`` infers when none is passed: padding where ``input_ids`` holds the pad token
    (unless pad == eos), otherwise every token is real."""
    ones = torch.ones(rows, length, dtype=torch.long, device=device)
    pad = generation_setting(model, kwargs, "pad_token_id")
    if ids is None or pad is None or ids.dtype not in (torch.int, torch.long):
        return ones
    eos = generation_setting(model, kwargs, "eos_token_id")
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
        attention = infer_attention(model, ids if embeds is None else None, rows, length, source.device, kwargs)
    elif not isinstance(attention, torch.Tensor) or tuple(attention.shape) != (rows, length):
        raise ValueError(
            f"a routed `generate` needs a 2-D `attention_mask` of shape {(rows, length)} (1 for real tokens, 0 for "
            f"padding), got {getattr(attention, 'shape', type(attention).__name__)}."
        )
    beams = generation_setting(model, kwargs, "num_beams", args) or 1
    returned = generation_setting(model, kwargs, "num_return_sequences", args) or 1
    batch = {"inputs_embeds" if embeds is not None else "input_ids": source, "attention_mask": attention}
    return {"batch": batch, "rows": rows, "length": length, "attention": attention, "expand": max(beams, returned)}
