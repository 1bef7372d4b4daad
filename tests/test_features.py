"""Pooling: masked mean over real prompt tokens."""

from __future__ import annotations

import pytest
import torch

from peft_asr.tuner.features import masked_mean, prompt_mask


def test_masked_mean_ignores_padding_on_either_side():
    torch.manual_seed(0)
    h = torch.randn(1, 5, 3)
    alone = h.mean(dim=1, dtype=torch.float64)
    pad = torch.full((1, 3, 3), 1e3)  # huge pad states: any leak would show
    left = torch.cat([pad, h], dim=1)
    right = torch.cat([h, pad], dim=1)
    m_left = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    m_right = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    assert torch.allclose(masked_mean(left, prompt_mask(m_left)), alone, atol=1e-12)
    assert torch.allclose(masked_mean(right, prompt_mask(m_right)), alone, atol=1e-12)


def test_labels_restrict_pooling_to_the_prompt():
    h = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    attn = torch.ones(1, 4, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 7, 8]])  # two prompt tokens, two answer tokens
    pooled = masked_mean(h, prompt_mask(attn, labels))
    assert torch.allclose(pooled, h[:, :2].mean(dim=1).double())


def test_explicit_prompt_mask_overrides_labels():
    h = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    attn = torch.ones(1, 4, dtype=torch.long)
    labels = torch.tensor([[5, 6, 7, 8]])  # a collator that does not mask the prompt
    explicit = torch.tensor([[1, 1, 1, 0]])
    pooled = masked_mean(h, prompt_mask(attn, labels, explicit))
    assert torch.allclose(pooled, h[:, :3].mean(dim=1).double())


def test_rows_without_prompt_tokens_raise():
    h = torch.randn(2, 3, 4)
    mask = prompt_mask(torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"rows \[1\] have no prompt token"):
        masked_mean(h, mask)


def test_labels_that_mark_no_prompt_make_the_whole_row_the_prompt():
    """labels=input_ids (perplexity, an LM collator): no -100 among the real tokens, so the whole real row is pooled.
    Per row: a prompt-masked row next to it keeps its prompt; a -100 on the first real token alone (TRL sets it on
    every sequence start) marks nothing, and neither does -100 on padding (DataCollatorForLanguageModeling)."""
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]])
    labels = torch.tensor([[4, 5, 6, 7], [-100, -100, 6, 7], [-100, 5, 6, -100], [-100, -100, -100, 7],
                           [-100, -100, 6, 7]])
    mask = prompt_mask(attn, labels)
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False],
                             [False, True, True, False], [False, True, True, True]]


def test_explicit_empty_prompt_mask_raises_with_hint():
    h = torch.randn(1, 3, 4)
    mask = prompt_mask(torch.ones(1, 3), torch.tensor([[4, 5, 6]]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="prompt_mask"):
        masked_mean(h, mask)


def test_class_labels_are_not_token_labels():
    assert prompt_mask(torch.ones(2, 3), torch.tensor([1, 0])).all()


def test_positions_from_mask_match_generate():
    from peft_asr.tuner.features import positions_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]


def test_packed_rows_are_split_into_one_row_per_example():
    from peft_asr.tuner.features import is_packed, unpack_rows

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 3]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
             "labels": torch.tensor([[-100, -100, 7, -100, 9, -100]])}
    assert is_packed(batch) and not is_packed({"position_ids": torch.tensor([[0, 1, 2]])})
    # left padding with generate's positions (pads at 0) is not packing
    assert not is_packed({"position_ids": torch.tensor([[0, 0, 1]]), "attention_mask": torch.tensor([[0, 1, 1]])})
    out = unpack_rows(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [3, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7], [-100, 9, -100], [-100, -100, -100]]
    assert "position_ids" not in out


def test_labels_of_another_shape_are_refused_by_the_batch_check():
    from peft_asr.tuner.validation import check_batch

    # in a routed forward such labels are a target, not token labels; a `fit_router`/`route` batch is checked first
    assert prompt_mask(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long)).all()
    with pytest.raises(ValueError, match="`labels` has shape"):
        check_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)})


def test_pad_equal_to_eos_labels_do_not_shrink_the_prompt_to_the_eos():
    """DataCollatorForLanguageModeling with pad == eos (the GPT-2 recipe) sets -100 on every real EOS token too."""
    eos = 9
    ids = torch.tensor([[4, 5, 6, eos, eos], [4, eos, 6, 7, eos]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = ids.masked_fill(ids == eos, -100)
    assert prompt_mask(attn, labels).tolist() == [[True, True, True, True, False], [True] * 5]
    # a prompt-masked row that also ends in a masked EOS keeps its prompt only
    labels = torch.tensor([[-100, -100, 6, -100, -100]])
    assert prompt_mask(torch.ones(1, 5), labels).tolist() == [[True, True, False, False, False]]


def test_float_multi_label_targets_are_ignored():
    assert prompt_mask(torch.ones(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])).all()


def test_padding_free_pads_are_not_examples():
    from peft_asr.tuner.features import unpack_rows

    pad = 0
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, pad, pad, pad]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])}  # pad_to_multiple_of=8
    assert unpack_rows(batch, pad)["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    # a real one-token example of another id is kept
    batch["input_ids"][0, 5] = 3
    assert unpack_rows(batch, pad)["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [3, 0, 0]]


def test_sequence_boundaries_alone_unpack_too():
    from peft_asr.tuner.features import is_packed, unpack_rows

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "cu_seq_lens_q": torch.tensor([0, 3, 5], dtype=torch.int32)}
    assert is_packed(batch)
    assert unpack_rows(batch)["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]


@pytest.mark.parametrize("positions_per_slice", [1, 4, 49, 50, 1000])
def test_pooling_in_slices_equals_pooling_at_once(monkeypatch, positions_per_slice):
    """The pooling (and the final norm in it) runs over slices of positions, never a float64 copy of the whole
    hidden state; the result is the whole-state mean."""
    import torch

    from peft_asr.tuner import features

    g = torch.Generator().manual_seed(0)
    hidden, mask = torch.randn(3, 50, 7, generator=g), torch.rand(3, 50, generator=g) > 0.3
    norm = torch.nn.LayerNorm(7)
    with torch.no_grad():
        whole = (norm(hidden).double() * mask.double()[..., None]).sum(1) / mask.sum(1, keepdim=True).double()
    seen = []

    def recording_norm(part):
        seen.append(part.shape[1])
        return norm(part)

    monkeypatch.setattr(features, "POOL_CHUNK_ELEMENTS", 3 * 7 * positions_per_slice)
    with torch.no_grad():
        pooled = features.masked_mean(hidden, mask, transform=recording_norm)
    assert torch.allclose(pooled, whole, rtol=1e-12, atol=1e-12)
    assert max(seen) == min(positions_per_slice, 50) and sum(seen) == 50
