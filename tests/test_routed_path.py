"""The routed forward path: the loop-free kernel equals the task-by-task one, it never waits on the device, and the
cached task stacks follow every change of the subspaces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, two_task_model

from peft_asr.tuner.layer import ASRLayer, gathered_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernels import grouped_delta, use_grouped  # noqa: E402  (the reference kernel lives with its benchmark)


def _mixed_batch(n: int = 6):
    rows = prompts(*ALPHA_IDS, n // 2, seed=7) + prompts(*BETA_IDS, n - n // 2, seed=8)
    return left_pad(rows)


def test_gathered_kernel_equals_grouped_kernel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 12, generator=g)
    a_all, b_all = torch.randn(4, 3, 12, generator=g), torch.randn(4, 9, 3, generator=g)
    ids = torch.tensor([0, 1, 4, 4, 2, 0, 3])  # base rows, repeated tasks, one task absent
    fast, ref = gathered_delta(x, ids, a_all, b_all, 0.5), grouped_delta(x, ids, a_all, b_all, 0.5)
    assert fast.shape == (7, 5, 9)
    assert torch.allclose(fast, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(fast[0], torch.zeros(5, 9)) and torch.equal(ref[5], torch.zeros(5, 9))


def test_model_logits_are_the_same_with_either_kernel():
    model = two_task_model()
    batch = _mixed_batch()
    with torch.no_grad():
        fast = model(**batch).logits
        with use_grouped():
            ref = model(**batch).logits
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)


class _HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync_in_package(monkeypatch):
    """Fail when code inside peft_asr reads a tensor value on the host (the calls that synchronise a device)."""
    calls = []

    def guard(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/peft_asr/" in caller.replace("\\", "/"):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        guard(name)
    return calls


def test_routed_forward_and_generate_never_sync_from_the_package(no_host_sync_in_package):
    model = two_task_model()
    batch = _mixed_batch()
    with torch.no_grad():
        model(**batch)  # first call: the router solve and the fitted check are computed once
    no_host_sync_in_package.clear()
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert no_host_sync_in_package == [], f"host reads on the routed path: {no_host_sync_in_package}"


def test_all_padding_row_goes_to_the_base_route_without_an_error():
    model = two_task_model()
    batch = _mixed_batch(4)
    batch["attention_mask"][1] = 0  # a row with no real token
    with torch.no_grad():
        routed = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert torch.isfinite(routed[0]).all()
    assert torch.allclose(routed[1], base[1], atol=1e-6)  # the empty row is answered by the base model
    with pytest.raises(ValueError, match=r"rows \[1\] have no prompt token"):
        model.route(**batch)  # explicit routing still says what is wrong


def test_task_stacks_are_rebuilt_when_a_subspace_changes():
    model = two_task_model()
    batch = _mixed_batch()
    with torch.no_grad():
        before = model(**batch).logits
        layer = next(m for m in model.modules() if isinstance(m, ASRLayer))
        adapter = next(iter(layer.asr_B))
        layer.asr_B[adapter]["beta"].add_(1.0)  # an in-place change bumps the version counter
        after = model(**batch).logits
        layer.asr_B[adapter]["beta"].sub_(1.0)
        again = model(**batch).logits
    assert not torch.allclose(before, after)
    assert torch.allclose(before, again, atol=1e-6)
    # a third task added after the cache was built is used at once
    model.add_task("gamma")
    assert len(layer._stacks(layer.asr_A[adapter], layer.asr_B[adapter])[0]) == 3


def _per_row_pinned(model, batch, tasks):
    rows = []
    with torch.no_grad():
        for i, task in enumerate(tasks):
            with model.use_task(task):
                rows.append(model(**{k: v[i:i + 1] for k, v in batch.items()}).logits[0])
    return torch.stack(rows)


def _pinned_generate(model, batch, tasks, new_tokens):
    rows = []
    for i, task in enumerate(tasks):
        with model.use_task(task):
            rows.append(model.generate(**{k: v[i:i + 1] for k, v in batch.items()}, max_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=0)[0])
    return torch.stack(rows)


def test_generate_gathers_each_layers_rows_once_and_equals_each_row_pinned(monkeypatch):
    import peft_asr.tuner.layer as layer_module

    model = two_task_model()
    batch = _mixed_batch()
    with torch.no_grad():
        tasks = model.route(**batch)
        gathers = []
        original = layer_module.gather_rows
        monkeypatch.setattr(layer_module, "gather_rows", lambda *a: gathers.append(1) or original(*a))
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        layers = sum(1 for m in model.modules() if isinstance(m, ASRLayer))
        assert len(gathers) == layers  # the prefill gathers; the 3 decode steps reuse it
        gathers.clear()
        model(**batch)
        model(**batch)
        assert len(gathers) == 2 * layers  # outside generate every call gathers for its own rows
        monkeypatch.setattr(layer_module, "gather_rows", original)
        assert set(tasks) == {"alpha", "beta"}
        assert torch.equal(out, _pinned_generate(model, batch, tasks, 4))
        # a second generate with other rows gathers afresh (nothing is kept between calls)
        other = {k: v.flip(0) for k, v in batch.items()}
        assert torch.equal(model.generate(**other, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           _pinned_generate(model, other, tasks[::-1], 4))


def test_the_task_stack_cache_can_be_switched_off_with_the_same_answers():
    model = two_task_model()
    batch = _mixed_batch()
    layers = [m for m in model.modules() if isinstance(m, ASRLayer)]
    with torch.no_grad():
        cached = model(**batch).logits
        assert all(m._asr_stack_cache is not None for m in layers)
        model.set_task_stack_cache(False)
        assert all(m._asr_stack_cache is None for m in layers)  # the copy goes at once
        fresh = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert all(m._asr_stack_cache is None for m in layers)  # and no routed call keeps one
        tasks = model.route(**batch)
        assert torch.allclose(fresh, _per_row_pinned(model, batch, tasks), atol=1e-5)  # each row alone, task pinned
        assert torch.equal(generated, _pinned_generate(model, batch, tasks, 3))
        model.set_task_stack_cache(True)
        assert torch.equal(generated, model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert torch.equal(cached, fresh)
    with pytest.raises(TypeError, match="must be True or False"):
        model.set_task_stack_cache("no")
