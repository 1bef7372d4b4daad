"""Tokenisation of tasks into prompt/answer training rows, their collator, and prompt batches for routing.

Tokenisation follows one rule that the router depends on (``tuner.features.prompt_mask``): a training row is

    input_ids = prompt_ids + answer_ids + [eos]
    labels    = [-100] * len(prompt_ids) + answer_ids + [eos]

so ``labels == -100`` marks exactly the prompt, the tokens the router pools over. The prompt is encoded the same way
for training (``tokenize_examples``) and for generation/routing (``prompt_batches``), so the router sees identical
features in both. A prompt longer than ``max_length`` loses the start of its user text (``truncation="left"``) or
the middle of it (``"middle"``: the instruction at its start and the ``Answer:`` cue at its end are kept).

``PromptAnswerCollator`` pads with ``torch.nn.utils.rnn.pad_sequence`` instead of wrapping
``transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)``: that collator needs a tokenizer (this one
takes a pad id) and pads on ``tokenizer.padding_side``, which is ``"left"`` for the stories260K Llama tokenizer, while
training rows are padded on the right (with ``padding_side="right"`` the batches are identical: ``tests/test_data.py``). ``DataCollatorWithPadding`` does not pad ``labels``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from ..tuner.features import IGNORE_INDEX  # label of positions without loss; it also marks the prompt for the router
from .tasks import Row, check_rows

__all__ = ["IGNORE_INDEX", "TRUNCATIONS", "format_prompt", "tokenize_examples", "PromptAnswerCollator", "prompt_batches"]

TRUNCATIONS = ("left", "middle")  # which part of a too-long user prompt is dropped


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: Optional[bool] = None) -> str:
    """The text the model reads before the answer.

    With a chat template (``use_chat_template`` ``None`` and the tokenizer has one, or ``True``) the prompt becomes one
    user turn followed by the generation prompt:
    ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
    add_generation_prompt=True)``. Otherwise the prompt is returned unchanged.
    """
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if not use_chat_template:
        return prompt
    if not _has_chat_template(tokenizer):
        raise ValueError(
            "`use_chat_template=True` but the tokenizer has no chat template; set `tokenizer.chat_template` or pass "
            "`use_chat_template=None`/`False`."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _encode_prompt(tokenizer: Any, prompt: str, use_chat_template: Optional[bool]) -> list[int]:
    """Token ids of the formatted prompt, with BOS exactly once.

    A chat template already writes BOS into the text, so it is encoded without special tokens (as
    ``apply_chat_template(tokenize=True)`` does); plain prompts get the tokenizer's special tokens (BOS for Llama).
    A prompt that itself starts with the BOS text (TRACE Py150 starts with ``<s>``) would give BOS twice: one is
    dropped.
    """
    chat = _has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    text = format_prompt(tokenizer, prompt, use_chat_template)
    ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _cut(ids: list[int], drop: int, truncation: str) -> list[int]:
    """``ids`` without ``drop`` tokens: the first ones (``"left"``) or the middle ones (``"middle"``: the kept tokens
    are split evenly between the start and the end, the start getting the odd one)."""
    keep = len(ids) - drop
    if truncation == "left":
        return ids[drop:]
    head = (keep + 1) // 2
    return ids[:head] + ids[len(ids) - (keep - head):]


def _encode_prompt_truncated(
    tokenizer: Any, prompt: str, budget: int, use_chat_template: Optional[bool], truncation: str = "left"
) -> list[int]:
    """``_encode_prompt`` with at most ``budget`` tokens, cutting the *user prompt* only.

    ``truncation="left"`` drops the start of the user prompt; ``"middle"`` drops its middle (the kept tokens split
    evenly between its start and its end), so an instruction at the start and the cue at the end (``Answer:``) both
    survive while a long input between them is cut. The user text is cut at token level and formatted again, so BOS
    and the chat-template header and generation prompt (which tell the model where a turn starts and ends) survive.
    Only if the template alone is longer than ``budget`` are the formatted ids themselves cut the same way (a left
    cut keeps a leading BOS).
    """
    ids = _encode_prompt(tokenizer, prompt, use_chat_template)
    if len(ids) <= budget:
        return ids
    raw = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    drop = len(ids) - budget
    for _ in range(8):  # decode/encode may merge tokens differently: a few rounds converge
        if drop >= len(raw):
            break
        text = tokenizer.decode(_cut(raw, drop, truncation), skip_special_tokens=False)
        ids = _encode_prompt(tokenizer, text, use_chat_template)
        if len(ids) <= budget:
            return ids
        drop += len(ids) - budget
    if truncation == "middle":
        return _cut(ids, len(ids) - budget, "middle")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos and budget >= 2:
        return [bos] + ids[len(ids) - budget + 1:]
    return ids[len(ids) - budget:]


def _check_truncation(truncation: Any) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")


def tokenize_examples(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    *,
    max_length: int = 256,
    use_chat_template: Optional[bool] = None,
    truncation: str = "left",
) -> list[dict[str, list[int]]]:
    """Training rows ``{"input_ids", "labels"}`` (lists of ints) from ``{"prompt", "answer"}`` rows.

    ``input_ids = prompt_ids + answer_ids + [eos]`` and ``labels = [-100] * len(prompt_ids) + answer_ids + [eos]``:
    the loss is on the answer and the end of sequence only, and ``labels == -100`` marks exactly the prompt, which the
    router pools over. ``prompt_ids`` encodes ``format_prompt(tokenizer, prompt, use_chat_template)`` with BOS once;
    ``answer_ids`` encodes the answer without special tokens.

    Truncation to ``max_length``: the prompt is cut, never the answer: from the left (``truncation="left"``, its
    start is dropped) or in the middle (``"middle"``: its start and its end are kept, e.g. the instruction and the
    final ``Answer:``); BOS and the chat template's header and generation prompt are kept either way. Only an answer (+ eos) longer than ``max_length // 2`` that does
    not fit is itself cut on the right (then without eos), leaving ``max_length // 2`` tokens to the prompt.

    Raises:
        ValueError: ``max_length`` < 2, an unknown ``truncation``, the tokenizer has no ``eos_token_id``, or a row
            lacks a prompt/answer.
    """
    _check_truncation(truncation)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2 (one prompt and one answer token), got {max_length!r}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no `eos_token_id`; set `tokenizer.eos_token` so answers can end.")
    rows = check_rows(list(rows), "rows")
    out = []
    for row in rows:
        prompt_ids = _encode_prompt(tokenizer, row["prompt"], use_chat_template)
        answer_ids = list(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + [eos]
        if len(prompt_ids) + len(answer_ids) > max_length:
            keep_prompt = max(max_length - len(answer_ids), min(len(prompt_ids), max_length // 2))
            answer_ids = answer_ids[: max_length - keep_prompt]
            prompt_ids = _encode_prompt_truncated(tokenizer, row["prompt"], keep_prompt, use_chat_template,
                                                  truncation)
        if not prompt_ids:
            raise ValueError(f"prompt {row['prompt'][:50]!r} encodes to no token; the router needs a prompt token.")
        out.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids})
    return out


class PromptAnswerCollator:
    """Pads ``tokenize_examples`` rows into a training batch (right padding).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding) and ``labels`` (padded
    with -100), all ``(B, L)`` long tensors. Other keys of the rows are ignored.

    Args:
        pad_token_id (`int`): id written on padding positions (they are masked out of attention and loss).
    """

    def __init__(self, pad_token_id: int) -> None:
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(
                f"`pad_token_id` must be an int >= 0, got {pad_token_id!r}; use `tokenizer.pad_token_id` "
                "(or `tokenizer.eos_token_id` when the tokenizer has no pad token)."
            )
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch.")
        seqs = []
        for i, row in enumerate(rows):
            if "input_ids" not in row or "labels" not in row:
                raise ValueError(
                    f"row {i} needs 'input_ids' and 'labels' (from `tokenize_examples`), got {sorted(row)}."
                )
            ids, labels = list(row["input_ids"]), list(row["labels"])
            if len(ids) != len(labels) or not ids:
                raise ValueError(
                    f"row {i}: 'input_ids' ({len(ids)}) and 'labels' ({len(labels)}) must have the same non-zero "
                    "length."
                )
            seqs.append((ids, labels))
        ids = [torch.tensor(i, dtype=torch.long) for i, _ in seqs]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)  # (B, L), right padding
        attention_mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)  # (B, L)
        labels = pad_sequence(
            [torch.tensor(lab, dtype=torch.long) for _, lab in seqs], batch_first=True, padding_value=IGNORE_INDEX
        )  # (B, L)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id})"


def prompt_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    use_chat_template: Optional[bool] = None,
    truncation: str = "left",
) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded prompt batches for ``generate`` and routing, in the order of ``prompts``.

    Each prompt is encoded exactly as in `tokenize_examples` (same formatting, BOS once, the same ``truncation`` to
    ``max_length``), so the router sees the features it was fitted on. Yields ``{"input_ids", "attention_mask"}``
    ``(B, L)`` long tensors. Left padding puts every prompt's last token at the end, where generation continues.
    The tokenizer's ``padding_side`` is restored after each batch.

    Raises:
        ValueError: the tokenizer has no ``pad_token_id``, ``batch_size``/``max_length`` < 1, an unknown
            ``truncation``, or a non-text prompt.
    """
    _check_truncation(truncation)
    for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{arg}` must be an int >= 1, got {value!r}.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first.")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty str, got {p!r}.")
    for start in range(0, len(prompts), batch_size):
        encoded = [
            {"input_ids": _encode_prompt_truncated(tokenizer, p, max_length, use_chat_template, truncation)}
            for p in prompts[start: start + batch_size]
        ]
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer.pad(encoded, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = old_side
        yield {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}
