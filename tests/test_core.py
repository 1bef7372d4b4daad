"""The core behaviour on a tiny Llama: one-pass per-row routing, pinning, training isolation, banks on disk."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import real_logits, ALPHA_IDS, BETA_IDS, left_pad, prompts, randomize_tasks, right_pad, tiny_llama, two_task_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

import peft_asr
from peft_asr import ASRConfig
from peft_asr.tuner.layer import ASRLayer

ALPHA = prompts(*ALPHA_IDS, 6, seed=11)  # held-out prompts of task alpha
BETA = prompts(*BETA_IDS, 6, seed=12)
MIXED = [ALPHA[0], BETA[0], BETA[1], ALPHA[1], ALPHA[2], BETA[2]]
MIXED_TASKS = ["alpha", "beta", "beta", "alpha", "alpha", "beta"]


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- wrapping and registration
def test_only_deep_blocks_are_adapted_and_only_the_new_task_trains(llama):
    model = get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], router_layer=2))
    adapted = [n for n, m in model.named_modules() if isinstance(m, ASRLayer)]
    assert adapted and all(".layers.2." in n or ".layers.3." in n for n in adapted), adapted
    assert len(adapted) == 4  # q and v in blocks 2 and 3
    model.add_task("alpha")
    model.add_task("beta")
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"beta"}
    assert model.tasks == ["alpha", "beta"] and model.training_task == "beta"
    trainable_count, total = model.get_nb_trainable_parameters()
    # 2 blocks x (q: A 4x32 + B 32x4, v: A 4x32 + B 16x4 since v has 2 KV heads of 8)
    assert trainable_count == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)


def test_regex_targets_stay_in_deep_blocks(llama):
    model = get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", target_modules=r".*\.(q_proj|v_proj)", router_layer=3))
    adapted = [n for n, m in model.named_modules() if isinstance(m, ASRLayer)]
    assert adapted and all(".layers.3." in n for n in adapted), adapted


def test_second_adapter_is_refused(llama):
    model = get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=1))
    with pytest.raises(ValueError, match="one bank"):
        model.add_adapter("other", ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=1))


def test_router_layer_out_of_range(llama):
    with pytest.raises(ValueError, match=r"`router_layer` must be in \[0, 3\]"):
        get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=4))


# ---------------------------------------------------------------- routing: one pass, per row
def test_route_and_scores():
    model = two_task_model()
    assert model.route(**left_pad(ALPHA)) == ["alpha"] * len(ALPHA)
    assert model.route(**right_pad(BETA)) == ["beta"] * len(BETA)
    scores = model.route_scores(**left_pad(MIXED))
    assert scores.shape == (len(MIXED), 2) and scores.dtype == torch.float64
    assert [model.tasks[i] for i in scores.argmax(1).tolist()] == MIXED_TASKS
    for i, row in enumerate(MIXED):  # each row scored as the row alone: the batch and its padding change nothing
        alone = model.route_scores(**left_pad([row]))
        assert torch.allclose(scores[i], alone[0], atol=1e-6), i
        assert model.route(**left_pad([row])) == [MIXED_TASKS[i]]


def test_routing_is_invariant_to_padding_side_and_length():
    model = two_task_model()
    a = model.route_scores(**left_pad(MIXED))
    b = model.route_scores(**right_pad(MIXED))
    c = model.route_scores(**left_pad(MIXED + [[5] * 30]))[: len(MIXED)]  # a long row adds 20+ pads to the others
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_mixed_batch_equals_each_row_pinned_to_its_task():
    model = two_task_model()
    mixed = real_logits(model, MIXED)
    worst = 0.0
    for row, task, got in zip(MIXED, MIXED_TASKS, mixed):
        alone = real_logits(model, [row], pinned=task)[0]
        worst = max(worst, (got - alone).abs().max().item())
        other = real_logits(model, [row], pinned="beta" if task == "alpha" else "alpha")[0]
        assert (got - other).abs().max() > 1e-3  # the tasks really differ, so the check has teeth
    print(f"max |mixed - pinned| logit difference: {worst:.3e}")
    assert worst < 1e-5


def test_shallow_blocks_run_once_per_forward_and_once_per_generated_token():
    model = two_task_model(router_layer=2)
    blocks = model.base_model.model.model.layers
    calls = [0] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**left_pad(MIXED))
        assert calls == [1, 1, 1, 1], calls
        calls[:] = [0] * len(blocks)
        predicts = []
        router = model.base_model.router
        original = router.predict
        router.predict = lambda pooled: predicts.append(1) or original(pooled)
        try:
            out = model.generate(**left_pad(MIXED), max_new_tokens=5, do_sample=False, pad_token_id=0)
        finally:
            del router.predict
        assert out.shape[1] - left_pad(MIXED)["input_ids"].shape[1] == 5
        assert calls == [5] * len(blocks), calls  # prefill + 4 decode steps: one call per block per token
        assert len(predicts) == 1  # routed once, at the prompt pass
    finally:
        for h in handles:
            h.remove()
    new = out[:, left_pad(MIXED)["input_ids"].shape[1]:]
    for i, (row, task) in enumerate(zip(MIXED, MIXED_TASKS)):  # the one decision was the right one for every row
        with model.use_task(task):
            ref = model.generate(**left_pad([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert new[i].tolist() == ref[0, len(row):].tolist(), (i, task)


@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 1}, {"num_beams": 3}])
def test_generate_mixed_batch_equals_per_row_pinned(gen_kwargs):
    model = two_task_model()
    batch = left_pad(MIXED)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, **gen_kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    for i, (row, task) in enumerate(zip(MIXED, MIXED_TASKS)):
        single = left_pad([row])
        with model.use_task(task):
            ref = model.generate(**single, max_new_tokens=6, do_sample=False, pad_token_id=0, **gen_kwargs)
        assert new[i].tolist() == ref[0, single["input_ids"].shape[1]:].tolist(), (i, task)


def _top_k_of_pinned(model, row, new_tokens, task, k):
    """Whether every sampled token is among the ``k`` most likely of its step for ``row`` alone, ``task`` pinned
    (the sampled prefix teacher-forced)."""
    ids = torch.tensor([row + new_tokens])
    with torch.no_grad(), model.use_task(task):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    steps = logits[len(row) - 1: len(row) - 1 + len(new_tokens)]  # (N, V): the logits each new token was drawn from
    top = steps.topk(k, dim=-1).indices  # (N, k)
    return all(token in top[j].tolist() for j, token in enumerate(new_tokens))


def test_generate_with_sampling_and_without_cache_routes_once_per_row():
    model = two_task_model()
    batch = left_pad(MIXED)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert out.shape == (len(MIXED), batch["input_ids"].shape[1] + 4)
    new = out[:, batch["input_ids"].shape[1]:]
    # the same draws with every row's task named: the same tokens (routing consumed no random numbers)
    torch.manual_seed(0)
    named = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0,
                           task_names=MIXED_TASKS)
    assert torch.equal(out, named)
    # each row alone with its task pinned: every sampled token is one its top-5 allows; under the other task no
    # row's four tokens all are (the check has teeth)
    for i, (row, task) in enumerate(zip(MIXED, MIXED_TASKS)):
        other = "beta" if task == "alpha" else "alpha"
        assert _top_k_of_pinned(model, row, new[i].tolist(), task, k=5), (i, task)
        assert not _top_k_of_pinned(model, row, new[i].tolist(), other, k=5), (i, other)
    # sampling from the single most likely token is greedy: then every sampled row equals its row alone, pinned
    sampled = model.generate(**left_pad(MIXED), max_new_tokens=4, do_sample=True, top_k=1, pad_token_id=0)
    new = sampled[:, left_pad(MIXED)["input_ids"].shape[1]:]
    for i, (row, task) in enumerate(zip(MIXED, MIXED_TASKS)):
        with model.use_task(task):
            ref = model.generate(**left_pad([row]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert new[i].tolist() == ref[0, len(row):].tolist(), (i, task)
    a = model.generate(**left_pad(MIXED), max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    b = model.generate(**left_pad(MIXED), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_hooks_are_scoped_to_the_call_even_on_error():
    model = two_task_model()
    before = _hooks(model)
    with torch.no_grad():
        model(**left_pad(MIXED))
    model.generate(**left_pad(MIXED), max_new_tokens=2, pad_token_id=0)
    assert _hooks(model) == before
    with pytest.raises((IndexError, RuntimeError)):  # a token id past the vocabulary fails inside the call
        with torch.no_grad():
            model(input_ids=torch.full((2, 3), 10_000, dtype=torch.long), attention_mask=torch.ones(2, 3))
    assert _hooks(model) == before


def test_use_task_pins_every_row_and_restores():
    model = two_task_model()
    pinned = real_logits(model, MIXED, pinned="alpha")
    for row, got in zip(MIXED, pinned):
        assert torch.allclose(got, real_logits(model, [row], pinned="alpha")[0], atol=1e-5)
    assert model.base_model._pinned == []
    with pytest.raises(ValueError, match=r"task 'gamma' is not in the bank \(tasks: \['alpha', 'beta'\]\)"):
        with model.use_task("gamma"):
            pass


# ---------------------------------------------------------------- the base route
def test_general_route_answers_with_the_plain_base_model():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = two_task_model(base)
    general = prompts(2, 10, 24, seed=5, min_len=6)  # a third kind of prompt: ids 2-9
    model.fit_router([left_pad(general)], task=None, progress=False)
    rows = [general[0], ALPHA[0], general[1], BETA[0]]
    assert model.route(**left_pad(rows)) == ["__base__", "alpha", "__base__", "beta"]
    batch = left_pad(rows)
    with torch.no_grad():
        got = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
        ref = reference(**batch).logits
    assert torch.equal(plain, ref)
    assert torch.allclose(got[[0, 2]], ref[[0, 2]], atol=1e-6)
    assert (got[[1, 3]] - ref[[1, 3]]).abs().max() > 1e-3


def test_confidence_threshold_falls_back_to_base():
    model = two_task_model(confidence_threshold=0.5)
    assert model.route(**left_pad(ALPHA[:2] + BETA[:2])) == ["alpha", "alpha", "beta", "beta"]
    model.base_model.router.confidence_threshold = 10.0  # no ridge score comes near 10: every row falls back
    assert set(model.route(**left_pad(MIXED))) == {"__base__"}


# ---------------------------------------------------------------- training
def test_training_mode_uses_the_training_task_for_every_row():
    model = two_task_model()
    model.train()
    with torch.no_grad():
        trained = model(**left_pad(MIXED)).logits
    model.eval()
    with torch.no_grad(), model.use_task("beta"):
        pinned = model(**left_pad(MIXED)).logits
    assert torch.allclose(trained, pinned, atol=1e-6)


def test_old_tasks_are_bit_identical_after_training_a_new_one():
    model = two_task_model()
    model.add_task("gamma")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".gamma" not in n}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    batch = left_pad(MIXED)
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    for n, p in model.named_parameters():
        if ".gamma" in n:
            continue
        assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "asr_B.default.gamma" in n)


def test_training_without_a_task_is_an_error(llama):
    model = get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=1))
    model.train()
    with pytest.raises(RuntimeError, match="no task is being trained"):
        model(**left_pad(MIXED))


def test_fit_router_prompt_masking_from_labels():
    model = two_task_model()
    batch = right_pad([ALPHA[0] + BETA[0]])  # prompt ALPHA[0], answer BETA[0]
    # -100 marks the prompt: pooling must see ALPHA[0] only
    labels = torch.where(torch.arange(batch["input_ids"].shape[1]) < len(ALPHA[0]), torch.tensor(-100), batch["input_ids"])
    pooled = model.base_model.router_features(dict(batch, labels=labels))
    prompt_only = model.base_model.router_features(right_pad([ALPHA[0]]))
    assert torch.allclose(pooled, prompt_only, atol=1e-6)
    # labels that mark no prompt (labels=input_ids, a language-modelling row): the whole real row is the prompt
    whole = model.base_model.router_features(dict(batch, labels=batch["input_ids"]))
    assert torch.allclose(whole, model.base_model.router_features(batch), atol=1e-12)
    assert not torch.allclose(whole, prompt_only, atol=1e-3)
    explicit = torch.zeros_like(batch["input_ids"])
    explicit[0, : len(ALPHA[0])] = 1
    pooled_explicit = model.base_model.router_features(dict(batch, labels=batch["input_ids"], prompt_mask=explicit))
    assert torch.allclose(pooled_explicit, prompt_only, atol=1e-6)


def test_fit_router_errors():
    model = two_task_model()
    with pytest.raises(ValueError, match="not in the bank"):
        model.fit_router([left_pad(ALPHA)], task="gamma")
    with pytest.raises(ValueError, match="got no batches"):
        model.fit_router([], task="alpha")
    with pytest.raises(TypeError, match="a batch must be a mapping"):
        model.fit_router([torch.ones(2, 3)], task="alpha")
    with pytest.raises(ValueError, match="already in the bank"):
        model.add_task("alpha")


def test_routing_before_any_fit_is_an_error(llama):
    model = get_peft_model(llama, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=1)).eval()
    model.add_task("alpha")
    model.eval()
    with pytest.raises(RuntimeError, match="not been fitted"):
        model.route(**left_pad(ALPHA))
    with pytest.raises(RuntimeError, match="not been fitted"):
        model(**left_pad(ALPHA))


# ---------------------------------------------------------------- PEFT API
def test_disable_adapter_gives_the_base_model():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = two_task_model(base)
    batch = left_pad(MIXED)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_merge_and_unload_needs_a_pinned_task():
    model = two_task_model()
    batch = left_pad(BETA[:3])
    with torch.no_grad(), model.use_task("beta"):
        expected = model(**batch).logits
    with pytest.raises(ValueError, match="cannot be merged as a whole"):
        model.merge_and_unload()
    merged = model.merge_and_unload(task="beta")
    assert not any(isinstance(m, ASRLayer) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
    assert _hooks(merged) == 0


def test_unload_returns_the_untouched_base_without_hooks():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = two_task_model(base)
    with torch.no_grad():
        model(**left_pad(MIXED))
    plain = model.unload()
    assert _hooks(plain) == 0 and not any(isinstance(m, ASRLayer) for m in plain.modules())
    batch = left_pad(MIXED)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, reference(**batch).logits)


# ---------------------------------------------------------------- banks on disk
def test_save_and_reload_give_identical_logits_and_routing(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = two_task_model(base)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "router_statistics.safetensors"} <= set(os.listdir(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "peft-asr" in card and "import peft_asr" in card and "`alpha`" in card
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert loaded.tasks == ["alpha", "beta"]
    batch = left_pad(MIXED)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.route(**batch) == MIXED_TASKS
    assert torch.equal(loaded.base_model.router.weight, model.base_model.router.weight)


def test_reload_in_a_fresh_process_gives_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = two_task_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "bank")
    batch = left_pad(MIXED)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    script = f"""
import torch, peft_asr
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'bank')!r}).eval()
batch = torch.load({str(tmp_path / 'batch.pt')!r})
with torch.no_grad():
    torch.save(model(**batch).logits, {str(tmp_path / 'out.pt')!r})
print(model.route(**batch))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(MIXED_TASKS)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_learning_continues_after_reload_exactly(tmp_path):
    gamma = prompts(100, 120, 48, seed=7)
    uninterrupted = two_task_model(tiny_llama())
    uninterrupted.add_task("gamma")
    uninterrupted.fit_router([left_pad(gamma)], task="gamma", progress=False)

    first = two_task_model(tiny_llama())
    first.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    resumed.add_task("gamma")
    resumed.fit_router([left_pad(gamma)], task="gamma", progress=False)
    a, b = uninterrupted.base_model.router.solve(), resumed.base_model.router.solve()
    assert (a.weight - b.weight).abs().max() < 1e-10
    assert torch.equal(a.class_counts, b.class_counts)
    batch = left_pad(MIXED + prompts(100, 120, 3, seed=8))
    routes = resumed.route(**batch)
    assert routes == uninterrupted.route(**batch) and routes[-3:] == ["gamma"] * 3


def test_bank_without_statistics_routes_but_cannot_learn(tmp_path):
    model = two_task_model(save_router_statistics=False)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "router_statistics.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.eval().route(**left_pad(MIXED)) == MIXED_TASKS
    loaded.add_task("gamma")
    with pytest.raises(RuntimeError, match="statistics file"):
        loaded.fit_router([left_pad(ALPHA)], task="gamma", progress=False)


def test_bank_on_a_base_of_another_size_is_refused(tmp_path):
    two_task_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 32"):
        PeftModel.from_pretrained(tiny_llama(hidden=48), tmp_path)
    with pytest.raises(ValueError, match="number of blocks 4"):
        PeftModel.from_pretrained(tiny_llama(layers=5), tmp_path)


def test_truncated_bank_file_is_a_clear_error(tmp_path):
    two_task_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_pickle_only_bank_is_refused(tmp_path):
    two_task_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_pickle_serialization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        two_task_model().save_pretrained(tmp_path, safe_serialization=False)


def test_model_dtype_casts_never_touch_router_state():
    model = two_task_model()
    model.to(torch.bfloat16)
    router = model.base_model.router
    assert router.weight.dtype == torch.float64 and router.gram.dtype == torch.float64
    assert model.route(**left_pad(MIXED)) == MIXED_TASKS


# ---------------------------------------------------------------- the real tiny pretrained Llama
def test_stories260k_end_to_end(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_path)
    tok.padding_side = "left"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(stories_path),
                           ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], router_layer=2))
    cats = [f"Once upon a time there was a cat named {n}." for n in ("Tom", "Lily", "Max", "Sue", "Ben", "Mia")]
    math = [f"{a} plus {b} equals" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
    model.add_task("stories")
    model.add_task("sums")
    randomize_tasks(model, std=0.2)
    model.fit_router([dict(tok(cats[:4], return_tensors="pt", padding=True))], task="stories", progress=False)
    model.fit_router([dict(tok(math[:4], return_tensors="pt", padding=True))], task="sums", progress=False)
    model.eval()
    held = tok([cats[4], math[4], math[5], cats[5]], return_tensors="pt", padding=True)
    assert model.route(**held) == ["stories", "sums", "sums", "stories"]
    out = model.generate(**held, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_path), tmp_path).eval()
    assert torch.equal(loaded.generate(**held, max_new_tokens=4, do_sample=False), out)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputation in backward runs outside the forward's scope: the trained task must still be applied."""
    grads = []
    for checkpointing in (False, True):
        model = two_task_model()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = left_pad(MIXED)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_expanded_router_is_reproduced_after_reload(tmp_path):
    """The random projection is regenerated from its seed, not saved: routing and scores survive a reload."""
    model = two_task_model(feature_dim=96, activation="relu", router_seed=5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    batch = left_pad(MIXED)
    assert torch.equal(loaded.route_scores(**batch), model.route_scores(**batch))
    assert loaded.route(**batch) == MIXED_TASKS
    assert torch.equal(loaded.base_model.router.projection, model.base_model.router.projection)


def test_failed_router_fit_leaves_the_router_unchanged():
    model = two_task_model()
    router = model.base_model.router
    before = {k: v.clone() for k, v in router.statistics_state_dict().items()}
    weight = router.solve().weight.clone()
    bad = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}
    with pytest.raises(ValueError, match=r"rows \[1\] have no prompt token"):
        model.fit_router([left_pad(ALPHA), bad], task="alpha", progress=False)  # the first batch was fine
    for key, value in router.statistics_state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(router.solve().weight, weight)
    assert model.route(**left_pad(MIXED)) == MIXED_TASKS  # still usable
