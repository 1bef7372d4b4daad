"""merge_banks: banks trained apart combine into the router of joint training; mismatches are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_POOLING, left_pad, prompts, tiny_llama
from peft import PeftModel, get_peft_model

import peft_asr  # noqa: F401
from peft_asr import ASRConfig, merge_banks

TASKS = {"alpha": (10, 30), "beta": (60, 80), "gamma": (100, 120), "delta": (35, 55)}
CONFIG = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], router_layer=2)


def _set_subspace(model, task):
    """Give `task` an A and B that depend on its name only, as if it had been trained the same way in any run."""
    gen = torch.Generator().manual_seed(sum(map(ord, task)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".{task}"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _bank(names, path, general=False, **overrides):
    model = get_peft_model(tiny_llama(), ASRConfig(**{**CONFIG, **overrides}))
    if general:
        model.fit_router([left_pad(prompts(2, 9, 16, seed=99, min_len=6))], task=None, progress=False)
    for name in names:
        model.add_task(name)
        _set_subspace(model, name)
        model.fit_router([left_pad(prompts(*TASKS[name], 32, seed=len(name)))], task=name, progress=False)
    model.save_pretrained(path)
    return model


def test_merged_bank_equals_joint_training(tmp_path):
    joint = _bank(["alpha", "beta", "gamma", "delta"], tmp_path / "joint", general=True)
    _bank(["alpha", "beta"], tmp_path / "a", general=True)
    _bank(["gamma", "delta"], tmp_path / "b")
    merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    merged = PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged", is_trainable=True).eval()
    assert merged.tasks == ["alpha", "beta", "gamma", "delta"]
    a, b = joint.base_model.router.solve(), merged.base_model.router
    assert (a.weight - b.weight).abs().max() < 1e-10
    assert torch.equal(a.class_counts, b.class_counts)
    held = [p for name in TASKS for p in prompts(*TASKS[name], 2, seed=123)]
    batch = left_pad(held)
    assert merged.route(**batch) == joint.eval().route(**batch)
    with torch.no_grad():
        assert (merged(**batch).logits - joint(**batch).logits).abs().max() < 1e-5
    assert (tmp_path / "merged" / "README.md").read_text().count("| `") == 4
    merged.add_task("epsilon")  # the statistics came along: the merged bank keeps learning
    merged.fit_router([left_pad(prompts(120, 128, 8, seed=5))], task="epsilon", progress=False)


@pytest.mark.parametrize("overrides, match", [
    ({"router_layer": 1}, "router_layer"),
    ({"ridge": 10.0}, "ridge"),
    ({"router_seed": 3, "feature_dim": 16}, "feature_dim"),
    ({"r": 2}, "r: 4 vs 2"),
])
def test_mismatched_settings_are_refused(tmp_path, overrides, match):
    _bank(["alpha"], tmp_path / "a")
    _bank(["beta"], tmp_path / "b", **overrides)
    with pytest.raises(ValueError, match=match):
        merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_overlapping_tasks_missing_statistics_and_bad_paths(tmp_path):
    _bank(["alpha"], tmp_path / "a")
    _bank(["alpha"], tmp_path / "b")
    with pytest.raises(ValueError, match=r"task\(s\) \['alpha'\]"):
        merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    _bank(["beta"], tmp_path / "c", save_router_statistics=False)
    with pytest.raises(ValueError, match="router statistics"):
        merge_banks([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    with pytest.raises(ValueError, match="not a saved bank"):
        merge_banks([tmp_path / "a", tmp_path / "nope"], tmp_path / "m")
    with pytest.raises(ValueError, match="at least two banks"):
        merge_banks([tmp_path / "a"], tmp_path / "m")
    with pytest.raises(ValueError, match="already exists"):
        merge_banks([tmp_path / "a", tmp_path / "c"], tmp_path / "a")
    other = get_peft_model(tiny_llama(hidden=48), ASRConfig(**CONFIG))
    other.add_task("beta")
    other.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="base_hidden_size: 32 vs 48"):
        merge_banks([tmp_path / "a", tmp_path / "d"], tmp_path / "m")


def test_merge_reads_banks_through_the_resolver(tmp_path):
    """Folders go through `resolve_bank` too (sub-folders per bank, an interrupted save finished first); the Hub
    keywords are checked before anything is read (Hub ids themselves: tests/test_hub.py)."""
    import shutil

    _bank(["alpha", "beta"], tmp_path / "a" / "banks" / "first")
    _bank(["gamma"], tmp_path / "b")
    # a save interrupted between its two renames: the old bank moved aside, the new one not yet in place
    shutil.move(tmp_path / "b", tmp_path / ".b.old-1-ab")
    shutil.copytree(tmp_path / ".b.old-1-ab", tmp_path / ".b.tmp-1-ab")
    merged = merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "m", subfolder=["banks/first", None])
    assert PeftModel.from_pretrained(tiny_llama(), merged).tasks == ["alpha", "beta", "gamma"]
    with pytest.raises(TypeError, match=r"unknown keywords \['revison'\]; it takes `subfolder` and the Hub download"):
        merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "n", subfolder=["banks/first", None], revison="dev")
    with pytest.raises(ValueError, match=r"`subfolder` must be a string \(for every bank\) or a list of 2"):
        merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "n", subfolder=["banks/first"])
    with pytest.raises(TypeError, match=r"every entry of `banks` must be a folder or a Hub repo id"):
        merge_banks([tmp_path / "a", 3], tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_remove_task_equals_never_having_learned_it(tmp_path):
    full = _bank(["alpha", "beta", "gamma"], tmp_path / "full", general=True, **TOY_POOLING)
    never = _bank(["alpha", "gamma"], tmp_path / "never", general=True, **TOY_POOLING)
    full.remove_task("beta")
    assert full.tasks == ["alpha", "gamma"]
    assert not any(".beta" in name for name, _ in full.named_parameters())
    a, b = full.base_model.router.solve(), never.base_model.router.solve()
    assert (a.weight - b.weight).abs().max() < 1e-10 and torch.equal(a.class_counts, b.class_counts)
    batch = left_pad(prompts(*TASKS["alpha"], 2, seed=7) + prompts(*TASKS["gamma"], 2, seed=8))
    routes = full.eval().route(**batch)
    assert routes == never.eval().route(**batch) and routes[2:] == ["gamma", "gamma"]
    with torch.no_grad():
        assert (full(**batch).logits - never(**batch).logits).abs().max() < 1e-5
    full.save_pretrained(tmp_path / "removed")
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "removed").tasks == ["alpha", "gamma"]
    with pytest.raises(ValueError, match="not in the bank"):
        full.remove_task("beta")


def test_remove_task_needs_per_task_statistics(tmp_path):
    model = _bank(["alpha", "beta"], tmp_path / "a", per_task_statistics=False)
    with pytest.raises(RuntimeError, match="per_task_statistics=False"):
        model.remove_task("alpha")
    assert model.tasks == ["alpha", "beta"]  # nothing changed
    assert any(".alpha" in name for name, _ in model.named_parameters())
