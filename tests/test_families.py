"""ASR across model families: injection, trainability, routing, one-pass mixed batches, generation, save/load.

Every model is tiny, built from its config with a fixed seed (no downloads). Families:

* decoder-only causal LMs: Llama, Qwen2, Mistral, GPT-2 (``Conv1D`` ``c_attn``), GPT-NeoX (``query_key_value``);
* encoder-decoder: T5 (``SEQ_2_SEQ_LM``, targets ``q``/``v``; the router reads the encoder);
* encoder classifier: BERT (``SEQ_CLS``, targets ``query``/``value``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
from conftest import TOY_POOLING
import torch
from torch import nn

import peft_asr  # noqa: F401  (registers the ASR method)
from peft import PeftModel, get_peft_model
from peft_asr import ASRConfig
from peft_asr.tuner.layer import ASRLayer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

torch.set_num_threads(2)

VOCAB = 100
HIDDEN = 32
LAYERS = 3
ROUTER_LAYER = 1
PAD = 0
TASKS = ("alpha", "beta")
# two clearly different prompt distributions: token ids from disjoint, narrow vocab ranges
TOKEN_RANGES = {"alpha": (10, 18), "beta": (60, 68)}
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]  # random-init model from config
    targets: tuple[str, ...]
    task_type: str
    kind: str  # "causal", "seq2seq" or "cls"

    @property
    def generative(self) -> bool:
        return self.kind in ("causal", "seq2seq")


def _causal_common() -> dict:
    return dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)


def _llama() -> nn.Module:
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **_causal_common())
    return LlamaForCausalLM(cfg)


def _qwen2() -> nn.Module:
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=False, **_causal_common())
    return Qwen2ForCausalLM(cfg)


def _mistral() -> nn.Module:
    cfg = MistralConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, **_causal_common())
    return MistralForCausalLM(cfg)


def _gpt2() -> nn.Module:
    common = _causal_common()
    common.pop("tie_word_embeddings")
    cfg = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, **common)
    return GPT2LMHeadModel(cfg)


def _gpt_neox() -> nn.Module:
    cfg = GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        max_position_embeddings=64, **_causal_common())
    return GPTNeoXForCausalLM(cfg)


def _t5() -> nn.Module:
    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                   num_heads=4, pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=None,
                   dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg)


def _bert() -> nn.Module:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=PAD)
    return BertForSequenceClassification(cfg)


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", _llama, ("q_proj", "v_proj"), "CAUSAL_LM", "causal"),
        Family("qwen2", _qwen2, ("q_proj", "v_proj"), "CAUSAL_LM", "causal"),
        Family("mistral", _mistral, ("q_proj", "v_proj"), "CAUSAL_LM", "causal"),
        Family("gpt2", _gpt2, ("c_attn",), "CAUSAL_LM", "causal"),
        Family("gpt_neox", _gpt_neox, ("query_key_value",), "CAUSAL_LM", "causal"),
        Family("t5", _t5, ("q", "v"), "SEQ_2_SEQ_LM", "seq2seq"),
        Family("bert", _bert, ("query", "value"), "SEQ_CLS", "cls"),
    )
}
GENERATIVE = [name for name, f in FAMILIES.items() if f.generative]

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|block|layer)\.(\d+)(?:\.|$)")


def block_index(module_name: str) -> int | None:
    """Index of the transformer block a module lives in (first ``<blocks>.<i>`` in its name)."""
    match = _BLOCK_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def build_base(family: Family, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = family.build()
    if family.generative:
        # no early stop: batched and per-row greedy outputs then have the same length
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = PAD
    return model.eval()


def asr_config(family: Family, **overrides) -> ASRConfig:
    kwargs = dict(task_type=family.task_type, r=4, lora_alpha=8, target_modules=list(family.targets),
                  router_layer=ROUTER_LAYER, **TOY_POOLING)
    kwargs.update(overrides)
    return ASRConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------- data
def make_rows(task: str, n: int, seed: int, min_len: int = 5, max_len: int = 10) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = TOKEN_RANGES[task]
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        rows.append(torch.randint(lo, hi, (length,), generator=gen).tolist())
    return rows


def collate(rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        t = torch.tensor(row, dtype=torch.long)
        if left:
            ids[i, width - len(row):] = t
            mask[i, width - len(row):] = 1
        else:
            ids[i, : len(row)] = t
            mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_left(family: Family) -> bool:
    return family.kind == "causal"


def mixed_rows() -> tuple[list[list[int]], list[str]]:
    """Held-out rows of both tasks, interleaved, of different lengths (different amounts of padding)."""
    a = make_rows("alpha", 3, seed=101, min_len=3, max_len=11)
    b = make_rows("beta", 3, seed=202, min_len=3, max_len=11)
    # force distinct lengths so the padding really differs between rows
    a[0], b[0] = a[0][:3], b[0] + b[0][:4]
    rows, tasks = [], []
    for ra, rb in zip(a, b):
        rows += [ra, rb]
        tasks += ["alpha", "beta"]
    return rows, tasks


def prepared_model(family: Family, seed: int = 0):
    """A wrapped model with two tasks (non-zero B), the router fitted on two disjoint prompt sets; eval mode."""
    model = get_peft_model(build_base(family, seed), asr_config(family))
    for task in TASKS:
        model.add_task(task)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            for t_i, task in enumerate(TASKS):
                if name.endswith(f"asr_B.default.{task}"):
                    # distinct, clearly non-zero update per task
                    param.copy_(torch.randn(param.shape, generator=gen) * (0.3 + 0.2 * t_i))
    for t_i, task in enumerate(TASKS):
        rows = make_rows(task, 24, seed=10 + t_i)
        batches = [collate(rows[i: i + 8], left=pad_left(family)) for i in range(0, len(rows), 8)]
        model.fit_router(batches, task=task, progress=False)
    model.eval()
    return model


def forward_logits(family: Family, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = dict(batch)
    if family.kind == "causal":
        # positions from the mask, so a left-padded row sees the same positions as when run alone
        kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    elif family.kind == "seq2seq":
        n = batch["input_ids"].shape[0]
        kwargs["decoder_input_ids"] = torch.tensor([[PAD, 23, 71, 5]]).expand(n, -1).contiguous()
    with torch.no_grad():
        return model(**kwargs).logits


def real_positions(family: Family, batch: dict[str, torch.Tensor], row: int) -> slice:
    """Positions of the output logits of ``row`` that correspond to real (non-padding) tokens."""
    if family.kind == "causal":
        pad = int((batch["attention_mask"][row] == 0).sum())
        return slice(pad, None)
    return slice(None)  # seq2seq: decoder positions (all real); cls: one vector per row


def families(names=None):
    return pytest.mark.parametrize("family", [FAMILIES[n] for n in (names or FAMILIES)], ids=lambda f: f.name)


# ---------------------------------------------------------------------------------------------------------- (a)
@families()
def test_injection_only_in_deep_blocks_and_newest_task_trainable(family, capsys):
    model = get_peft_model(build_base(family), asr_config(family))
    inner = model.base_model.model
    num_blocks = LAYERS

    target_named = {n for n, _ in inner.named_modules() if n.split(".")[-1] in family.targets}
    adapted = {n for n, m in inner.named_modules() if isinstance(m, ASRLayer)}
    assert target_named, "the test targets match no module"
    assert adapted, "no ASR layer was injected"
    expected = {n for n in target_named if block_index(n) is not None and block_index(n) >= ROUTER_LAYER}
    assert adapted == expected
    assert all(block_index(n) >= ROUTER_LAYER for n in adapted)
    # the shallow blocks keep their targets as plain layers
    shallow = {n for n in target_named if block_index(n) is not None and block_index(n) < ROUTER_LAYER}
    assert shallow, "expected un-adapted target modules below router_layer"
    for n in shallow:
        assert not isinstance(inner.get_submodule(n), ASRLayer)
    assert {block_index(n) for n in adapted} == set(range(ROUTER_LAYER, num_blocks))
    assert model.peft_config["default"].layers_to_transform == list(range(ROUTER_LAYER, num_blocks))

    model.add_task("first")
    model.add_task("second")
    assert model.tasks == ["first", "second"]
    assert model.training_task == "second"

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the newest task has no trainable parameter"
    for name in trainable:
        assert re.search(r"asr_[AB]\.default\.second$", name), f"unexpected trainable parameter {name}"
    # every layer's newest subspace is trainable, every older one frozen
    layers = [m for m in inner.modules() if isinstance(m, ASRLayer)]
    expected_count = 0
    for layer in layers:
        for kind in ("asr_A", "asr_B"):
            params = getattr(layer, kind)["default"]
            assert set(params.keys()) == {"first", "second"}
            assert params["second"].requires_grad
            assert not params["first"].requires_grad
            expected_count += params["second"].numel()
        assert layer.asr_A["default"]["second"].shape == (4, layer.in_features)
        assert layer.asr_B["default"]["second"].shape == (layer.out_features, 4)
    assert sum(p.numel() for p in trainable.values()) == expected_count

    capsys.readouterr()
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    match = re.search(r"trainable params:\s*([\d,]+)", printed)
    assert match, printed
    assert int(match.group(1).replace(",", "")) == expected_count
    trainable_count, _ = model.get_nb_trainable_parameters()
    assert trainable_count == expected_count


# ---------------------------------------------------------------------------------------------------------- (b)
@families()
def test_router_sends_held_out_rows_to_their_task(family):
    model = prepared_model(family)
    for t_i, task in enumerate(TASKS):
        held_out = make_rows(task, 10, seed=500 + t_i)
        batch = collate(held_out, left=pad_left(family))
        assert model.route(batch["input_ids"], batch["attention_mask"]) == [task] * len(held_out)
        scores = model.route_scores(batch["input_ids"], batch["attention_mask"])
        assert scores.shape == (len(held_out), len(TASKS))
        assert (scores.argmax(dim=1) == t_i).all()
    # a mixed, padded batch routes row by row
    rows, tasks = mixed_rows()
    batch = collate(rows, left=pad_left(family))
    assert model.route(**batch) == tasks


# ---------------------------------------------------------------------------------------------------------- (c)
@families()
def test_mixed_batch_matches_pinned_rows(family):
    model = prepared_model(family)
    rows, tasks = mixed_rows()
    batch = collate(rows, left=pad_left(family))
    assert len({len(r) for r in rows}) > 1
    assert model.route(**batch) == tasks

    mixed = forward_logits(family, model, batch)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        single = collate([row], left=pad_left(family))
        with model.use_task(task):
            ref = forward_logits(family, model, single)[0]
        got = mixed[i, real_positions(family, batch, i)] if family.kind != "cls" else mixed[i]
        assert got.shape == ref.shape
        assert torch.isfinite(got).all(), f"row {i} ({task}): non-finite logits at real positions"
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m: f"row {i} ({task}): {m}")
        # the comparison is meaningful only if the row's output depends on which subspace answers it
        other = TASKS[1 - TASKS.index(task)]
        for alternative in (other, None):  # the other task, and the plain base model
            with model.use_task(alternative):
                wrong = forward_logits(family, model, single)[0]
            assert (wrong - ref).abs().max() > 1e-3, f"row {i}: task {task!r} and {alternative!r} give the same logits"


# ---------------------------------------------------------------------------------------------------------- (d)
def _generate(family: Family, model, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=PAD, **kwargs)
    if family.kind == "causal":
        return out[:, batch["input_ids"].shape[1]:]
    return out


@families(GENERATIVE)
def test_generate_mixed_batch_matches_pinned_rows(family):
    model = prepared_model(family)
    rows, tasks = mixed_rows()
    batch = collate(rows, left=pad_left(family))
    out = _generate(family, model, batch)
    assert out.shape[0] == len(rows)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        with model.use_task(task):
            ref = _generate(family, model, collate([row], left=pad_left(family)))[0]
        assert out[i].tolist() == ref.tolist(), f"row {i} ({task})"

    beams = _generate(family, model, batch, num_beams=2)
    assert beams.shape[0] == len(rows)
    for i, (row, task) in enumerate(zip(rows, tasks)):  # beam search: each row as alone with its task pinned
        with model.use_task(task):
            ref = _generate(family, model, collate([row], left=pad_left(family)), num_beams=2)[0]
        assert beams[i].tolist() == ref.tolist(), f"beams, row {i} ({task})"
    # the routing hooks live only inside one call: none is left on the model afterwards, and routing still works
    for module in model.base_model.model.modules():
        assert not module._forward_pre_hooks, f"hook left on {type(module).__name__}"
    assert model.route(**batch) == tasks


# ---------------------------------------------------------------------------------------------------------- (e)
@families()
def test_save_and_reload_gives_same_logits_and_routing(family, tmp_path):
    model = prepared_model(family, seed=0)
    rows, tasks = mixed_rows()
    batch = collate(rows, left=pad_left(family))
    before_logits = forward_logits(family, model, batch)
    before_route = model.route(**batch)
    before_scores = model.route_scores(**batch)
    assert before_route == tasks

    model.save_pretrained(tmp_path)

    fresh = build_base(family, seed=0)
    # the fresh base is the same base: same seed gives the same weights
    reference = build_base(family, seed=0).state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, reference[key]), key
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    loaded.eval()
    assert loaded.tasks == list(TASKS)

    after_logits = forward_logits(family, loaded, batch)
    mask = torch.ones(before_logits.shape[:2], dtype=torch.bool)
    if family.kind == "causal":
        mask = batch["attention_mask"].bool()
    torch.testing.assert_close(after_logits[mask], before_logits[mask], atol=ATOL, rtol=0)
    assert loaded.route(**batch) == before_route
    torch.testing.assert_close(loaded.route_scores(**batch), before_scores, atol=1e-10, rtol=0)
    for task in TASKS:
        with model.use_task(task):
            a = forward_logits(family, model, batch)
        with loaded.use_task(task):
            b = forward_logits(family, loaded, batch)
        torch.testing.assert_close(b[mask], a[mask], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------- errors
class _NoBlocks(nn.Module):
    """A model with a config but no recognisable list of transformer blocks."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(hidden_size=16)
        self.embed = nn.Embedding(VOCAB, 16)
        self.stack = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.fc = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.stack(self.embed(input_ids)))


def test_missing_block_list_raises_with_layers_pattern_hint():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="layers_pattern"):
        get_peft_model(_NoBlocks(), ASRConfig(r=4, lora_alpha=8, target_modules=["fc"], router_layer=0))


@families(["llama", "gpt2", "bert"])
@pytest.mark.parametrize("router_layer", [LAYERS, LAYERS + 2])
def test_router_layer_out_of_range_raises(family, router_layer):
    with pytest.raises(ValueError, match="router_layer"):
        get_peft_model(build_base(family), asr_config(family, router_layer=router_layer))
