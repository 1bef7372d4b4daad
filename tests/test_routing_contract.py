"""The routing contract: every HF path routes on the whole prompt, follows an explicit choice, or refuses.

Each test is one path a user takes with a PEFT model (the table of the "Routing you can trust" issue), checked
against the same rows run one at a time with the task pinned by ``use_task``, and, where a decision is taken, against
``router_features`` of the prompt alone (1e-6).

The routing fixtures use *ambiguous* prompts too: tokens from both tasks' ranges, chosen so that the two router
scores are close. On the disjoint prompts of the other test files a padding or position bug cannot flip a route;
here it does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, randomize_tasks, right_pad, tiny_llama, two_task_model
from peft import get_peft_model

import peft_asr  # noqa: F401
from peft_asr import ASRConfig
from peft_asr.tuner.features import positions_from_mask

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
ALPHA = prompts(*ALPHA_IDS, 4, seed=11)
BETA = prompts(*BETA_IDS, 4, seed=12)


def ambiguous_prompts(model, n: int = 4, seed: int = 7, margin: float = 0.5) -> list[list[int]]:
    """Prompts mixing both tasks' tokens whose two router scores differ by less than ``margin``, of both winners."""
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, list] = {"alpha": [], "beta": []}
    for _ in range(400):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        share = float(torch.rand(1, generator=gen))
        row = [int(torch.randint(*ALPHA_IDS, (1,), generator=gen)) if float(torch.rand(1, generator=gen)) < share
               else int(torch.randint(*BETA_IDS, (1,), generator=gen)) for _ in range(length)]
        scores = model.route_scores(**left_pad([row]))[0]
        if abs(float(scores[0] - scores[1])) < margin:
            winner = model.tasks[int(scores.argmax())]
            if len(found[winner]) < n // 2:
                found[winner].append(row)
        if all(len(v) == n // 2 for v in found.values()):
            break
    rows = [r for pair in zip(found["alpha"], found["beta"]) for r in pair]
    assert len(rows) == n, "could not find ambiguous prompts of both tasks"
    return rows


@pytest.fixture(scope="module")
def model():
    return two_task_model()


@pytest.fixture(scope="module")
def rows(model):
    """Held-out prompts of both tasks plus ambiguous ones, of different lengths (different padding)."""
    return [ALPHA[0], BETA[0]] + ambiguous_prompts(model) + [ALPHA[1] + ALPHA[2], BETA[1][:3]]


class Decisions:
    """Records the pooled features every `router.predict` call was given (the decisions a call took)."""

    def __init__(self, model):
        self.router = model.base_model.router
        self.pooled: list[torch.Tensor] = []

    def __enter__(self):
        original = self.router.predict

        def predict(pooled):
            self.pooled.append(pooled.detach().clone())
            return original(pooled)

        self.router.predict = predict
        return self

    def __exit__(self, *exc):
        del self.router.predict


def _alone_features(model, rows):
    return torch.cat([model.base_model.router_features(left_pad([r])) for r in rows])


def _pinned_generate(model, rows, tasks, **kwargs):
    """Each row generated alone with its task pinned: the reference of every batched, routed generate."""
    out = []
    for row, task in zip(rows, tasks):
        single = left_pad([row])
        with model.use_task(task):
            ref = model.generate(**single, **GEN, **kwargs)
        out.append(ref[:, single["input_ids"].shape[1]:])
    return out


def _new_tokens(out, batch):
    return out[:, batch["input_ids"].shape[1]:]


# ---------------------------------------------------------------- one decision per sequence, on the whole prompt
@pytest.mark.parametrize("mode", [
    {},
    {"num_beams": 3},
    {"num_beams": 2, "num_return_sequences": 2},
    {"cache_implementation": "static"},
    {"prefill_chunk_size": 4},
    {"use_cache": False},
])
def test_generate_mixed_batch_equals_each_row_alone_pinned(model, rows, mode):
    batch = left_pad(rows)
    tasks = model.route(**batch)
    assert set(tasks) == {"alpha", "beta"}
    with Decisions(model) as seen:
        out = model.generate(**batch, max_new_tokens=5, **GEN, **mode)
    assert len(seen.pooled) == 1  # one decision for the whole call
    # the features the decision was taken on are the prompts' own, row by row
    expand = max(mode.get("num_beams", 1), mode.get("num_return_sequences", 1))
    alone = _alone_features(model, rows)
    assert torch.allclose(seen.pooled[0], alone.repeat_interleave(seen.pooled[0].shape[0] // len(rows), 0), atol=1e-6)
    new = _new_tokens(out, batch)
    returned = mode.get("num_return_sequences", 1)
    for i, ref in enumerate(_pinned_generate(model, rows, tasks, max_new_tokens=5, **mode)):
        assert new[i * returned:(i + 1) * returned].tolist() == ref.tolist(), (i, tasks[i], mode, expand)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_routes_on_the_prompt_not_on_the_drafts(model, mode):
    # assisted decoding runs one row at a time; repeated n-grams give prompt lookup something to draft
    assistant = tiny_llama(seed=3)
    for row in [ALPHA[0] * 3, BETA[0] + BETA[0][:4] + BETA[0], ambiguous_prompts(model, 2, seed=9)[0] * 2]:
        batch = left_pad([row])
        kwargs = {"prompt_lookup_num_tokens": 3} if mode == "prompt_lookup" else {"assistant_model": assistant}
        with Decisions(model) as seen:
            out = model.generate(**batch, max_new_tokens=8, **GEN, **kwargs)
        assert len(seen.pooled) == 1
        assert torch.allclose(seen.pooled[0], _alone_features(model, [row]), atol=1e-6)
        task = model.route(**batch)[0]
        # HF's guarantee: assisted greedy == greedy; and both equal the row with its task pinned
        plain = model.generate(**batch, max_new_tokens=8, **GEN)
        with model.use_task(task):
            pinned = model.generate(**batch, max_new_tokens=8, **GEN)
        assert out.tolist() == plain.tolist() == pinned.tolist()


def test_generate_without_attention_mask_infers_it_like_generate(model, rows):
    batch = left_pad(rows)
    with Decisions(model) as seen:
        a = model.generate(input_ids=batch["input_ids"], max_new_tokens=4, **GEN)
    b = model.generate(**batch, max_new_tokens=4, **GEN)
    assert torch.equal(a, b)
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)


def test_generate_in_training_mode_routes(model, rows):
    """`generate` right after `Trainer.train()` (the model left in training mode) still routes every row."""
    batch = left_pad(rows)
    tasks = model.route(**batch)
    model.base_model._training_task = "beta"  # what add_task leaves: the last task is the one being trained
    model.train()
    try:
        with Decisions(model) as seen:
            out = model.generate(**batch, max_new_tokens=5, **GEN)
    finally:
        model.eval()
        model.base_model._training_task = None
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)
    new = _new_tokens(out, batch)
    for i, ref in enumerate(_pinned_generate(model, rows, tasks, max_new_tokens=5)):
        assert new[i].tolist() == ref[0].tolist(), (i, tasks[i])


def test_generate_after_trainer_train_routes(tmp_path):
    from conftest import TOY_POOLING, PromptAnswerData, collate
    from transformers import Trainer, TrainingArguments

    from peft_asr import ASRCallback

    model = two_task_model(**TOY_POOLING)  # gamma has 8 prompts
    model.add_task("gamma")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", use_cpu=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=PromptAnswerData(2, 10, 8, seed=4), data_collator=collate,
            callbacks=[ASRCallback(progress=False)]).train()
    assert model.training  # Trainer leaves the model in training mode
    batch = left_pad([ALPHA[0], BETA[0], prompts(2, 10, 1, seed=40, min_len=6)[0]])
    out = model.generate(**batch, max_new_tokens=4, **GEN)
    model.eval()
    tasks = model.route(**batch)
    assert tasks == ["alpha", "beta", "gamma"]
    new = _new_tokens(out, batch)
    rows = [batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() for i in range(3)]
    for i, ref in enumerate(_pinned_generate(model, rows, tasks, max_new_tokens=4)):
        assert new[i].tolist() == ref[0].tolist(), i


# ---------------------------------------------------------------- a forward: labels, manual decode loops
def test_eval_loss_with_labels_equal_to_input_ids_routes_on_the_whole_row(model, rows):
    """`model(**batch, labels=batch["input_ids"])` (perplexity, Trainer.evaluate with an LM collator)."""
    batch = right_pad(rows)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    tasks = model.route(**batch)
    with torch.no_grad(), Decisions(model) as seen:
        routed = model(**batch, labels=labels)
        explicit = model(**batch, labels=labels, task_names=tasks)
        with model.disable_adapter():
            base = model(**batch, labels=labels)
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)
    assert routed.loss.item() == pytest.approx(explicit.loss.item(), rel=1e-6)
    assert abs(routed.loss.item() - base.loss.item()) > 1e-3  # not silently the base model
    for i, (row, task) in enumerate(zip(rows, tasks)):  # each row's logits as the row alone, task pinned
        single = right_pad([row])
        with torch.no_grad(), model.use_task(task):
            ref = model(**single, labels=single["input_ids"]).logits[0]
        assert torch.allclose(routed.logits[i, : len(row)], ref, atol=1e-5), (i, task)


def test_prompt_masked_labels_route_on_the_prompt_only(model):
    batch = right_pad([ALPHA[0] + BETA[0] + BETA[1], BETA[0] + ALPHA[0] + ALPHA[1]])
    prompt_len = [len(ALPHA[0]), len(BETA[0])]
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_len):
        labels[i, :n] = -100
    with torch.no_grad(), Decisions(model) as seen:
        model(**batch, labels=labels)
    assert torch.allclose(seen.pooled[0], _alone_features(model, [ALPHA[0], BETA[0]]), atol=1e-6)


def test_manual_decode_loop_reuses_the_prompt_decision(model, rows):
    batch = left_pad(rows)
    tasks = model.route(**batch)

    def loop(task_names=None, steps=4):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        extra = {} if task_names is None else {"task_names": task_names}
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
            tokens = []
            for _ in range(steps):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                tokens.append(nxt)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                            **extra)
        return torch.cat(tokens, dim=1)

    with Decisions(model) as seen:
        routed = loop()
    assert len(seen.pooled) == 1  # decode steps never re-route on their one token
    assert torch.equal(routed, loop(task_names=tasks))
    for i, ref in enumerate(_pinned_generate(model, rows, tasks, max_new_tokens=4)):  # each row alone, pinned
        assert routed[i].tolist() == ref[0].tolist(), (i, tasks[i])


def test_a_cache_no_routed_call_produced_is_refused(model):
    from transformers import DynamicCache

    batch = left_pad([ALPHA[0], BETA[0]])
    with torch.no_grad(), model.disable_adapter():
        out = model(**batch, use_cache=True)  # the plain base model: not a routed call
    nxt = torch.tensor([[12], [61]])
    mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
    with pytest.raises(RuntimeError, match="continues a cache of .* tokens that no routed call"):
        with torch.no_grad():
            model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values)
    with torch.no_grad():  # a fresh, empty cache is a prompt call: it routes
        model(**batch, past_key_values=DynamicCache(), use_cache=True)


def test_inner_model_without_routing_refuses(model):
    with pytest.raises(RuntimeError, match="ran without a routing decision"):
        with torch.no_grad():
            model.base_model.model(**left_pad([ALPHA[0]]))


# ---------------------------------------------------------------- explicit beats inferred
def test_task_names_with_base_rows_on_forward_and_generate(model, rows):
    batch = left_pad(rows[:4])
    names = ["beta", None, "alpha", "__base__"]
    with torch.no_grad():
        logits = model(**batch, task_names=names).logits
    for i, (row, name) in enumerate(zip(rows[:4], names)):
        single = left_pad([row])
        with torch.no_grad(), model.use_task(name):
            ref = model(**single).logits[0]
        got = logits[i, batch["attention_mask"][i].bool()]
        assert torch.allclose(got, ref[single["attention_mask"][0].bool()], atol=1e-5), i
    out = model.generate(**batch, task_names=names, max_new_tokens=4, num_beams=2, **GEN)
    new = _new_tokens(out, batch)
    for i, ref in enumerate(_pinned_generate(model, rows[:4], names, max_new_tokens=4, num_beams=2)):
        assert new[i].tolist() == ref[0].tolist(), i


class Work:
    """Counts calls of the input embeddings: any refusal "before any work" must leave it at 0."""

    def __init__(self, model):
        self.module = model.get_input_embeddings()
        self.calls = 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_task_names_are_validated_before_any_work(model):
    batch = left_pad([ALPHA[0], BETA[0]])
    with Work(model) as work:
        with pytest.raises(ValueError, match=r"`task_names\[1\]` is 'gamma', which is not a task of the bank"):
            model(**batch, task_names=["alpha", "gamma"])
        with pytest.raises(ValueError, match="`task_names` has 1 entries but the batch has 2 rows"):
            model(**batch, task_names=["alpha"])
        with pytest.raises(ValueError, match="`task_names` has 3 entries but the batch has 2 rows"):
            model.generate(**batch, task_names=["alpha", "beta", None], max_new_tokens=2, **GEN)
        with pytest.raises(TypeError, match="one entry per row"):
            model(**batch, task_names="alpha")
    assert work.calls == 0


# ---------------------------------------------------------------- one prompt rule, one way to compute positions
def _gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    # fitted on left-padded prompts: with positions from the mask, their features do not depend on the padding
    return two_task_model(base, target_modules=["c_attn"])


def test_absolute_positions_gpt2_route_the_same_padded_alone_and_in_generate():
    model = _gpt2_model()
    rows = [ALPHA[0], BETA[0][:3], ALPHA[1] + ALPHA[2], BETA[1]]
    padded = model.route_scores(**left_pad(rows))
    alone = torch.cat([model.route_scores(**left_pad([r])) for r in rows])
    assert torch.allclose(padded, alone, atol=1e-6)
    assert torch.allclose(model.route_scores(**right_pad(rows)), alone, atol=1e-6)
    with Decisions(model) as seen:
        out = model.generate(**left_pad(rows), max_new_tokens=4, **GEN)
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)
    tasks = model.route(**left_pad(rows))
    new = _new_tokens(out, left_pad(rows))
    for i, ref in enumerate(_pinned_generate(model, rows, tasks, max_new_tokens=4)):
        assert new[i].tolist() == ref[0].tolist(), i


def test_absolute_positions_gpt2_routed_forward_decides_like_route():
    """A left-padded routed forward without `position_ids` runs GPT-2 with positions counted from the pads (as HF
    does); its decision is still `route`'s (one separate shallow pass), so the logits equal `task_names=route(...)`."""
    model = _gpt2_model()
    rows = [ALPHA[0], BETA[0][:3], ALPHA[1] + ALPHA[2], BETA[1]] + ambiguous_prompts(model, 4, seed=21)
    batch = left_pad(rows)
    tasks = model.route(**batch)
    with torch.no_grad(), Decisions(model) as seen:
        routed = model(**batch).logits
        explicit = model(**batch, task_names=tasks).logits
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)
    assert torch.allclose(routed, explicit, atol=1e-6)
    with torch.no_grad(), Decisions(model) as seen:  # with generate's positions the decision is taken in the pass
        model(**batch, position_ids=positions_from_mask(batch["attention_mask"]))
    assert torch.allclose(seen.pooled[0], _alone_features(model, rows), atol=1e-6)


# ---------------------------------------------------------------- no silent merge
def test_merge_adapter_without_a_pinned_task_is_refused():
    model = two_task_model()
    model.base_model._training_task = "beta"  # what training leaves behind
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="cannot be merged as a whole; pin one task"):
        model.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)
    batch = left_pad([ALPHA[0], BETA[0]])
    with torch.no_grad():
        routed = model(**batch).logits
        with model.use_task("alpha"):
            model.merge_adapter()
            merged_alpha = model(**batch).logits
        with pytest.raises(RuntimeError, match="task 'alpha' is merged into the base weights"):
            model(**batch)
        with pytest.raises(RuntimeError, match="task 'alpha' is merged"):
            model(**batch, task_names=["alpha", "alpha"])
        with pytest.raises(RuntimeError, match="task 'alpha' is merged"):
            model.generate(**batch, max_new_tokens=2, **GEN)
        with model.use_task("beta"), pytest.raises(RuntimeError, match="task 'alpha' is merged"):
            model(**batch)
        model.unmerge_adapter()
        assert torch.allclose(model(**batch).logits, routed, atol=1e-5)
        with model.use_task("alpha"):
            assert torch.allclose(model(**batch).logits, merged_alpha, atol=1e-5)


# ---------------------------------------------------------------- shapes that cannot be mapped raise
def test_a_layer_given_rows_it_cannot_map_raises(model):
    layer = next(model.base_model._asr_layers())
    x = torch.randn(4, 3, layer.in_features)
    with pytest.raises(RuntimeError, match="2 routing decisions but an adapted layer received 4 rows"):
        layer(x, asr_task_ids=torch.tensor([1, 2]))


def test_packed_rows_in_a_routed_forward_are_refused(model):
    ids = torch.tensor([ALPHA[0] + BETA[0]])
    positions = torch.tensor([list(range(len(ALPHA[0]))) + list(range(len(BETA[0])))])
    with pytest.raises(ValueError, match="packed rows"):
        model(input_ids=ids, position_ids=positions)


def test_seq2seq_beams_expand_the_encoder_decision():
    model = _t5_model()
    rows = [ALPHA[0], BETA[0], BETA[1], ALPHA[1]]
    batch = right_pad(rows)
    tasks = model.route(**batch)
    assert tasks == ["alpha", "beta", "beta", "alpha"]
    out = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False, eos_token_id=None)
    differ = 0
    for i, (row, task) in enumerate(zip(rows, tasks)):
        with model.use_task(task):
            ref = model.generate(**right_pad([row]), max_new_tokens=4, num_beams=2, do_sample=False,
                                 eos_token_id=None)
        other = "beta" if task == "alpha" else "alpha"
        with model.use_task(other):
            wrong = model.generate(**right_pad([row]), max_new_tokens=4, num_beams=2, do_sample=False,
                                   eos_token_id=None)
        assert out[i].tolist() == ref[0].tolist(), i
        differ += wrong[0].tolist() != ref[0].tolist()
    assert differ >= 2  # the tasks answer differently, so the comparison has teeth


def test_generate_refuses_encoder_outputs_without_a_prompt():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, pad_token_id=0,
                                               decoder_start_token_id=0)).eval()
    model = get_peft_model(base, ASRConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"], router_layer=1))
    model.add_task("alpha")
    model.fit_router([right_pad(prompts(10, 30, 8, seed=1))], task="alpha", progress=False)
    model.eval()
    with model.use_task("alpha"):
        encoder_outputs = model.get_encoder()(**right_pad(prompts(10, 30, 2, seed=2)))
    with pytest.raises(ValueError, match="`encoder_outputs` without `input_ids`"):
        model.generate(encoder_outputs=encoder_outputs, max_new_tokens=2)


# ---------------------------------------------------------------- the hooks never outlive a call
def test_refusals_leave_no_hook_behind(model):
    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    batch = left_pad([ALPHA[0], BETA[0]])
    # each of these is refused by a hook, inside the call (the hooks exist then)
    for call in (lambda: model(**batch, task_names=["alpha"]),
                 lambda: model(input_ids=torch.tensor([[12, 13, 61]]), position_ids=torch.tensor([[0, 1, 0]])),
                 lambda: model(input_ids=torch.tensor([[12, 13]]), attention_mask=torch.ones(1, 1, 2, 2))):
        with pytest.raises(ValueError):
            with torch.no_grad():
                call()
        assert hooks() == before
    with torch.no_grad():  # a routed call with a cache leaves its decision behind, and a deep copy keeps routing
        model(**batch, use_cache=True)
    twin = copy.deepcopy(model)
    assert twin.route(**batch) == model.route(**batch) == ["alpha", "beta"]


def _t5_model():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                               num_decoder_layers=3, num_heads=4, pad_token_id=0,
                                               decoder_start_token_id=0, dropout_rate=0.0)).eval()
    return two_task_model(base, router_layer=1, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])


def test_seq2seq_manual_decode_loop_reuses_the_prompt_decision():
    model = _t5_model()
    batch = right_pad([ALPHA[0], BETA[0]])
    tasks = model.route(**batch)
    start = torch.zeros(2, 1, dtype=torch.long)

    def loop(task_names=None):
        extra = {} if task_names is None else {"task_names": task_names}
        with torch.no_grad():
            out = model(**batch, decoder_input_ids=start, use_cache=True, **extra)
            tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
            for _ in range(3):
                out = model(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=batch["attention_mask"],
                            decoder_input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True,
                            **extra)
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)

    assert torch.equal(loop(), loop(task_names=tasks))
    with torch.no_grad(), model.use_task("alpha"):
        encoded = model.get_encoder()(**batch)
    with Work(model) as work, pytest.raises(ValueError, match="got `encoder_outputs`"):
        with torch.no_grad():
            model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], decoder_input_ids=start)
    assert work.calls == 0


def test_generate_in_training_mode_refuses_while_the_trained_task_is_unknown(model):
    model.base_model.add_task("gamma")
    model.train()
    try:
        with Work(model) as work, pytest.raises(RuntimeError, match=r"\('gamma'\) is not in the router yet"):
            model.generate(**left_pad([ALPHA[0]]), max_new_tokens=2, **GEN)
        assert work.calls == 0
        with model.use_task("gamma"):  # what `ASRCallback(pin_during_training=True)` does for RL rollouts
            model.generate(**left_pad([ALPHA[0]]), max_new_tokens=2, **GEN)
    finally:
        model.eval()
        model.base_model.remove_task("gamma")


def test_continuous_batching_is_refused_unless_a_task_is_pinned(model):
    with pytest.raises(RuntimeError, match=r"`generate_batch` \(continuous batching\) runs the model in a worker"):
        model.generate_batch([[12, 13, 14]], max_new_tokens=2)
    with model.use_task("alpha"), pytest.raises(RuntimeError, match="manager whose worker thread"):
        model.init_continuous_batching()  # refused even inside a pin: the manager can outlive it
    with pytest.raises(RuntimeError, match="manager whose worker thread"):
        model.continuous_batching_context_manager()


def test_pins_are_released_in_any_order(model):
    base = model.base_model
    batch = left_pad([BETA[0]])
    with torch.no_grad(), model.use_task("alpha"):
        alpha = model(**batch).logits
    base.hold_task("beta")
    with torch.no_grad(), model.use_task("alpha"):
        base.release_task()  # a new run releases the held pin while the user's `with` block is open
        assert base._pinned == ["alpha"]
        assert torch.equal(model(**batch).logits, alpha)  # the user's pin still answers
    assert base._pinned == []


def test_a_model_with_a_held_pin_and_routed_caches_pickles_and_copies(model, tmp_path):
    batch = left_pad([ALPHA[0], BETA[0]])
    with torch.no_grad():
        model(**batch, use_cache=True)  # leaves an entry in the cache map
    model.base_model.hold_task("beta")
    try:
        twin = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
        assert twin.base_model._pinned == ["beta"]
        twin.base_model.release_task()
        assert twin.base_model._pinned == [] and model.base_model._pinned == ["beta"]
    finally:
        model.base_model.release_task()
    assert twin.route(**batch) == ["alpha", "beta"]


def test_generate_continuing_a_cache_keeps_the_decision_that_made_it(model):
    from transformers import DynamicCache

    row = BETA[0]
    batch = left_pad([row])
    with torch.no_grad(), model.use_task("alpha"):
        reference = model.generate(**batch, max_new_tokens=6, **GEN)  # what alpha answers for the whole sequence
    with torch.no_grad():
        out = model(**batch, use_cache=True, task_names=["alpha"])  # the prompt, run with alpha
        nxt = out.logits[:, -1:].argmax(-1)
        ids = torch.cat([batch["input_ids"], nxt], 1)
        mask = torch.ones_like(ids)
        # the router would pick beta for this row; the cache's deep states were computed with alpha: alpha goes on
        gen = model.generate(input_ids=ids, attention_mask=mask, past_key_values=out.past_key_values,
                             max_new_tokens=5, return_dict_in_generate=True, **GEN)
    assert model.route(**batch) == ["beta"]
    assert gen.sequences.tolist() == reference.tolist()
    # a forward continuing the cache `generate` returned keeps that decision too
    with torch.no_grad(), Decisions(model) as seen:
        model(input_ids=gen.sequences[:, -1:], attention_mask=torch.ones_like(gen.sequences),
              past_key_values=gen.past_key_values)
    assert seen.pooled == []
    assert model.base_model._cache_routes[gen.past_key_values].tolist() == [1]
    # a cache no routed call made is refused by generate as well
    with torch.no_grad(), model.disable_adapter():
        plain = model(**batch, use_cache=True).past_key_values
    with Work(model) as work, pytest.raises(RuntimeError, match="this generate continues a cache"):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=plain, max_new_tokens=2, **GEN)
    assert work.calls == 0
    model.generate(**batch, past_key_values=DynamicCache(), max_new_tokens=2, **GEN)  # an empty cache: routed


def _encoder(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=72, pad_token_id=1, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=2)
    if kind == "roberta":
        base = RobertaForSequenceClassification(RobertaConfig(**common))
    else:
        base = BertForSequenceClassification(BertConfig(type_vocab_size=2, **common))
    model = get_peft_model(base.eval(), ASRConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=["query", "value"], router_layer=1))
    model.add_task("alpha")
    model.add_task("beta")
    randomize_tasks(model)
    for task, ids, seed in (("alpha", ALPHA_IDS, 1), ("beta", BETA_IDS, 2)):
        batch = right_pad(prompts(*ids, 32, seed=seed), pad_id=1)
        model.fit_router([dict(batch, labels=torch.zeros(32, dtype=torch.long))], task=task, progress=False)  # (B,)
    return model.eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoders_route_a_forward_like_route(kind):
    """Encoders keep their own positions (RoBERTa's start after the padding index) in `route` and in the routed
    forward alike; BERT's `token_type_ids` reach the router's pass too."""
    model = _encoder(kind)
    rows = [ALPHA[0], BETA[0][:3], ALPHA[1] + ALPHA[2], BETA[1]] + ambiguous_prompts(model, 4, seed=31)
    for pad in (right_pad, left_pad):
        batch = pad(rows, pad_id=1)
        if kind == "bert":
            batch["token_type_ids"] = (torch.arange(batch["input_ids"].shape[1]) % 2).expand_as(batch["input_ids"])
        with torch.no_grad(), Decisions(model) as seen:
            model(**batch, labels=torch.zeros(len(rows), dtype=torch.long))
        assert torch.allclose(seen.pooled[-1], model.base_model.router_features(batch), atol=1e-6), pad.__name__
        alone = []
        for i, row in enumerate(rows):  # and each row's features as the row alone
            single = right_pad([row], pad_id=1)
            if kind == "bert":
                single["token_type_ids"] = batch["token_type_ids"][i][batch["attention_mask"][i].bool()][None]
            alone.append(model.base_model.router_features(single))
        if pad is right_pad or kind == "roberta":  # BERT counts positions from the row start, pads included
            assert torch.allclose(seen.pooled[-1], torch.cat(alone), atol=1e-5), pad.__name__
        assert model.route(**batch) == [model.tasks[int(i) - 1] for i in model.base_model.router.predict(
            seen.pooled[-1])]
