"""Bad input at every public entry point: a clear error of a stated class, raised from peft_asr code (not from deep
inside torch), and a model that still works afterwards.

One table drives the tests; docs/bad_inputs.md holds the same table (``test_doc_table_matches_the_test_table`` keeps
them in step). Regenerate the doc rows with ``python -c "import test_bad_inputs as t; print(t.render_table())"`` run
from ``tests/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, tiny_llama, two_task_model
from peft import PeftModel, get_peft_model

import peft_asr
from peft_asr import ASRConfig, ASRConfigError, ASRConfigTypeError, BankError, RouterNumericalError, merge_banks
from peft_asr.cli import CLIError, main
from peft_asr.tuner.router import AnalyticRouter

PACKAGE = Path(peft_asr.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
CFG = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], router_layer=2)
HELD = prompts(*ALPHA_IDS, 2, seed=50) + prompts(*BETA_IDS, 2, seed=51)
HELD_TASKS = ["alpha", "alpha", "beta", "beta"]


class Env:
    """Shared objects, built once per module; `fresh()` copies of the bank for cases that damage it."""

    def __init__(self, root: Path):
        self.root = root
        self.model = two_task_model()
        self.bank = root / "bank"
        self.model.save_pretrained(self.bank)
        other = two_task_model()
        other.fit_router([left_pad(prompts(*ALPHA_IDS, 8, seed=77))], task="alpha", progress=False)
        self.other_bank = root / "other"  # same shapes, different statistics
        other.save_pretrained(self.other_bank)
        self._unfitted = None
        self._fp16 = None
        self.tmp: Optional[Path] = None

    def fresh(self, name: str = "copy") -> Path:
        dest = self.tmp / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.bank, dest)
        return dest

    @property
    def unfitted(self):
        if self._unfitted is None:
            self._unfitted = get_peft_model(tiny_llama(), ASRConfig(**CFG))
            self._unfitted.add_task("alpha")
            self._unfitted.eval()
        return self._unfitted

    @property
    def fp16(self):
        """The two-task model in fp16 whose embeddings of the alpha tokens overflow (0.02 x 1e7 > 65504 -> inf)."""
        if self._fp16 is None:
            model = copy.deepcopy(self.model).half()
            with torch.no_grad():
                emb = model.get_input_embeddings().weight
                emb[ALPHA_IDS[0]:ALPHA_IDS[1]] *= 1e7  # an fp16 overflow, as in a real model with large activations
            assert torch.isinf(emb[ALPHA_IDS[0]:ALPHA_IDS[1]]).any()
            self._fp16 = model
        return self._fp16


def _batch(rows=None):
    return left_pad(rows or HELD)


def _edit_config(folder: Path, change: Callable[[dict], object]) -> Path:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _load(folder, hidden: int = 32):
    return PeftModel.from_pretrained(tiny_llama(hidden=hidden), folder)


def _cli(*argv):
    return lambda env: main([str(a(env)) if callable(a) else a for a in argv])


@dataclass
class Case:
    id: str
    entry: str  # the public entry point
    input: str  # the bad input, in words
    error: type
    message: str  # a fragment the message must contain
    run: Callable[[Env], object]


def _alpha_batch_with_pad_row(env):
    batch = _batch()
    batch["attention_mask"][1] = 0
    return batch


def _ill_conditioned(env):
    router = AnalyticRouter(in_features=4, num_classes=2, ridge=1e-300)
    feature = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    router.partial_fit(torch.cat([feature, 2 * feature, 3 * feature]), 1)  # rank 1: colinear rows
    return router.predict(feature)


def _task_names_in_training(e):
    e.model.base_model._training_task = "beta"
    e.model.train()
    try:
        e.model(**_batch(), task_names=["alpha"] * 4)
    finally:
        e.model.eval()
        e.model.base_model._training_task = None


def _unknown_cache(e):
    batch = _batch()
    with torch.no_grad(), e.model.disable_adapter():
        cache = e.model(**batch, use_cache=True).past_key_values  # the plain base model: no routing decision
    mask = torch.cat([batch["attention_mask"], torch.ones(4, 1, dtype=torch.long)], dim=1)
    e.model(input_ids=torch.full((4, 1), 12), attention_mask=mask, past_key_values=cache)


CASES = [
    # ------------------------------------------------------------------ ASRConfig(...)
    Case("config-r-zero", "ASRConfig", "`r=0`", ASRConfigError, "`r` must be an integer >= 1", lambda e: ASRConfig(**{**CFG, "r": 0})),
    Case("config-r-string", "ASRConfig", "`r=\"8\"` (a string)", ASRConfigError, "`r` must be an integer >= 1, got '8'", lambda e: ASRConfig(**{**CFG, "r": "8"})),
    Case("config-router-layer-negative", "ASRConfig", "`router_layer=-1`", ASRConfigError, "`router_layer` must be an integer >= 0", lambda e: ASRConfig(**{**CFG, "router_layer": -1})),
    Case("config-router-layer-beyond-base", "ASRConfig", "`router_layer=4` with `base_num_layers=4`", ASRConfigError, "`router_layer` must be in [0, 3]", lambda e: ASRConfig(**{**CFG, "router_layer": 4, "base_num_layers": 4})),
    Case("config-feature-dim-zero", "ASRConfig", "`feature_dim=0`", ASRConfigError, "`feature_dim` must be an integer >= 1", lambda e: ASRConfig(**{**CFG, "feature_dim": 0})),
    Case("config-feature-dim-negative", "ASRConfig", "`feature_dim=-8`", ASRConfigError, "`feature_dim` must be an integer >= 1", lambda e: ASRConfig(**{**CFG, "feature_dim": -8})),
    Case("config-ridge-zero", "ASRConfig", "`ridge=0`", ASRConfigError, "`ridge` must be a number > 0", lambda e: ASRConfig(**{**CFG, "ridge": 0})),
    Case("config-ridge-negative", "ASRConfig", "`ridge=-1.0`", ASRConfigError, "`ridge` must be a number > 0", lambda e: ASRConfig(**{**CFG, "ridge": -1.0})),
    Case("config-ridge-nan", "ASRConfig", "`ridge=nan`", ASRConfigError, "`ridge` must be a number > 0", lambda e: ASRConfig(**{**CFG, "ridge": math.nan})),
    Case("config-ridge-inf", "ASRConfig", "`ridge=inf`", ASRConfigError, "`ridge` must be a number > 0", lambda e: ASRConfig(**{**CFG, "ridge": math.inf})),
    Case("config-activation", "ASRConfig", "`activation=\"gelu\"`", ASRConfigError, "`activation` must be 'none' or 'relu'", lambda e: ASRConfig(**{**CFG, "activation": "gelu"})),
    Case("config-dropout", "ASRConfig", "`lora_dropout=1.5`", ASRConfigError, "`lora_dropout` must be in [0, 1)", lambda e: ASRConfig(**{**CFG, "lora_dropout": 1.5})),
    Case("config-tasks-not-list", "ASRConfig", "`tasks=\"alpha\"` (not a list)", ASRConfigTypeError, "`tasks` must be a list of task names", lambda e: ASRConfig(**{**CFG, "tasks": "alpha"})),
    Case("config-task-empty", "ASRConfig", "`tasks=[\"\"]` (empty name)", ASRConfigError, "task name '' is not valid", lambda e: ASRConfig(**{**CFG, "tasks": [""]})),
    Case("config-task-duplicated", "ASRConfig", "`tasks=[\"a\", \"a\"]`", ASRConfigError, "task 'a' is already in the bank", lambda e: ASRConfig(**{**CFG, "tasks": ["a", "a"]})),
    Case("config-task-not-string", "ASRConfig", "`tasks=[3]`", ASRConfigTypeError, "task name must be a str, got int", lambda e: ASRConfig(**{**CFG, "tasks": [3]})),
    Case("config-task-reserved", "ASRConfig", "`tasks=[\"__base__\"]`", ASRConfigError, "is reserved for the base route", lambda e: ASRConfig(**{**CFG, "tasks": ["__base__"]})),
    Case("config-target-modules-int", "ASRConfig", "`target_modules=5`", ASRConfigTypeError, "`target_modules` must be a regex or a non-empty list", lambda e: ASRConfig(**{**CFG, "target_modules": 5})),
    Case("config-bool-as-string", "ASRConfig", "`per_task_statistics=\"no\"`", ASRConfigTypeError, "`per_task_statistics` must be True or False", lambda e: ASRConfig(**{**CFG, "per_task_statistics": "no"})),
    Case("config-format-newer", "ASRConfig", "`format_version=2` (newer than this library)", ASRConfigError, "upgrade peft-asr", lambda e: ASRConfig(**{**CFG, "format_version": 2})),
    Case("config-task-type", "ASRConfig", "`task_type=\"CAUSAL\"`", ASRConfigError, "`task_type` must be one of", lambda e: ASRConfig(**{**CFG, "task_type": "CAUSAL"})),
    # ------------------------------------------------------------------ get_peft_model / tasks
    Case("wrap-router-layer-out-of-range", "get_peft_model", "`router_layer=9` on a 4-block model", ValueError, "`router_layer` must be in [0, 3]", lambda e: get_peft_model(tiny_llama(), ASRConfig(**{**CFG, "router_layer": 9}))),
    Case("add-task-empty", "add_task", "`add_task(\"\")`", ValueError, "task name '' is not valid", lambda e: e.model.add_task("")),
    Case("add-task-duplicated", "add_task", "`add_task(\"alpha\")` twice", ValueError, "task 'alpha' is already in the bank", lambda e: e.model.add_task("alpha")),
    Case("add-task-not-string", "add_task", "`add_task(3)`", TypeError, "task name must be a str, got int", lambda e: e.model.add_task(3)),
    Case("add-task-reserved", "add_task", "`add_task(\"__base__\")`", ValueError, "is reserved for the base route", lambda e: e.model.add_task("__base__")),
    Case("add-task-bad-characters", "add_task", "`add_task(\"my task/1\")`", ValueError, "use 1-64 letters, digits", lambda e: e.model.add_task("my task/1")),
    Case("remove-task-unknown", "remove_task", "`remove_task(\"gamma\")`", ValueError, "task 'gamma' is not in the bank", lambda e: e.model.remove_task("gamma")),
    Case("use-task-unknown", "use_task", "`use_task(\"gamma\")`", ValueError, "task 'gamma' is not in the bank", lambda e: e.model.use_task("gamma").__enter__()),
    # ------------------------------------------------------------------ fit_router
    Case("fit-no-batches", "fit_router", "empty task data: `fit_router([], task=\"alpha\")`", ValueError, "got no batches for task 'alpha'", lambda e: e.model.fit_router([], task="alpha", progress=False)),
    Case("fit-one-batch-not-a-list", "fit_router", "one batch dict instead of a list of batches", TypeError, "wrap it in a list", lambda e: e.model.fit_router(_batch(), task="alpha", progress=False)),
    Case("fit-task-not-string", "fit_router", "`task=3`", TypeError, "`task` must be a task name (str)", lambda e: e.model.fit_router([_batch()], task=3, progress=False)),
    Case("fit-task-unknown", "fit_router", "`task=\"gamma\"` (not added)", ValueError, "call `add_task('gamma')` first", lambda e: e.model.fit_router([_batch()], task="gamma", progress=False)),
    Case("fit-all-padding-row", "fit_router", "a row whose attention mask is all 0", ValueError, "rows [1] have no prompt token", lambda e: e.model.fit_router([_batch(), _alpha_batch_with_pad_row(e)], task="alpha", progress=False)),
    Case("fit-empty-prompt-mask", "fit_router", "an explicit `prompt_mask` that marks no token of a row", ValueError, "rows [0, 1, 2, 3] have no prompt token", lambda e: e.model.fit_router([dict(_batch(), prompt_mask=torch.zeros_like(_batch()["input_ids"]))], task="alpha", progress=False)),
    Case("fit-input-ids-list", "fit_router", "`input_ids` as a Python list", TypeError, "`input_ids` must be a torch.Tensor", lambda e: e.model.fit_router([{"input_ids": [[11, 12]], "attention_mask": torch.ones(1, 2)}], task="alpha", progress=False)),
    Case("fit-input-ids-float", "fit_router", "`input_ids` of dtype float32", TypeError, "must hold integer token ids", lambda e: e.model.fit_router([{"input_ids": torch.ones(1, 3)}], task="alpha", progress=False)),
    Case("fit-input-ids-1d", "fit_router", "`input_ids` of shape (L,) (no batch dimension)", ValueError, "must be 2-D (batch, length)", lambda e: e.model.fit_router([{"input_ids": torch.tensor([11, 12])}], task="alpha", progress=False)),
    Case("fit-token-out-of-vocab", "fit_router", "token id 500 for a 128-token vocabulary", ValueError, "token ids must lie in [0, 128)", lambda e: e.model.fit_router([{"input_ids": torch.tensor([[11, 500]])}], task="alpha", progress=False)),
    Case("fit-mask-shape", "fit_router", "`attention_mask` of another shape than `input_ids`", ValueError, "`attention_mask` has shape (1, 3)", lambda e: e.model.fit_router([{"input_ids": torch.tensor([[11, 12]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}], task="alpha", progress=False)),
    Case("fit-no-input-ids", "fit_router", "a batch without `input_ids`", ValueError, "a batch needs `input_ids`", lambda e: e.model.fit_router([{"attention_mask": torch.ones(1, 2)}], task="alpha", progress=False)),
    Case("fit-fp16-overflow", "fit_router", "NaN/inf hidden states (fp16 overflow)", RouterNumericalError, "contain NaN or inf", lambda e: e.fp16.fit_router([_batch()], task="alpha", progress=False)),
    # ------------------------------------------------------------------ route / generate
    Case("route-not-fitted", "route", "routing before any `fit_router`", RuntimeError, "has not been fitted on any task yet", lambda e: e.unfitted.route(**_batch())),
    Case("route-all-padding-row", "route", "a row whose attention mask is all 0", ValueError, "rows [1] have no prompt token", lambda e: e.model.route(**_alpha_batch_with_pad_row(e))),
    Case("route-empty-batch", "route", "`input_ids` of shape (0, 5)", ValueError, "the batch is empty", lambda e: e.model.route(input_ids=torch.zeros(0, 5, dtype=torch.long))),
    Case("route-fp16-overflow", "route", "NaN/inf hidden states (fp16 overflow)", RouterNumericalError, "the router features of rows [0, 1] contain NaN or inf", lambda e: e.fp16.route(**_batch())),
    Case("route-ill-conditioned", "AnalyticRouter.predict", "colinear features with `ridge=1e-300`", RouterNumericalError, "The router system G + ridge*I is", _ill_conditioned),
    Case("generate-not-fitted", "generate", "`generate` before any `fit_router`", RuntimeError, "has not been fitted on any task yet", lambda e: e.unfitted.generate(**_batch(), max_new_tokens=2)),
    Case("forward-task-names-unknown", "forward", "`task_names` naming a task the bank lacks", ValueError, "`task_names[1]` is 'gamma', which is not a task of the bank", lambda e: e.model(**_batch(), task_names=["alpha", "gamma", "beta", "beta"])),
    Case("forward-task-names-length", "forward", "`task_names` with fewer entries than rows", ValueError, "`task_names` has 1 entries but the batch has 4 rows", lambda e: e.model(**_batch(), task_names=["alpha"])),
    Case("generate-task-names-length", "generate", "`task_names` with more entries than rows", ValueError, "`task_names` has 5 entries but the batch has 4 rows", lambda e: e.model.generate(**_batch(), task_names=["alpha"] * 5, max_new_tokens=2)),
    Case("forward-task-names-in-training", "forward", "`task_names` on a training-mode forward", ValueError, "`task_names` is for inference", _task_names_in_training),
    Case("forward-unknown-cache", "forward", "a decode step continuing a cache no routed call produced", RuntimeError, "that no routed call of this model produced", _unknown_cache),
    Case("forward-packed-rows", "forward", "packed rows (`position_ids` restart inside a row) in a routed forward", ValueError, "a routed forward got packed rows", lambda e: e.model(input_ids=torch.tensor([[11, 12, 61, 62]]), position_ids=torch.tensor([[0, 1, 0, 1]]))),
    Case("forward-4d-mask", "forward", "a 4-D attention mask in a routed forward", ValueError, "needs a 2-D `attention_mask`", lambda e: e.model(input_ids=torch.tensor([[11, 12]]), attention_mask=torch.ones(1, 1, 2, 2))),
    Case("merge-adapter-unpinned", "merge_adapter", "`merge_adapter()` with no task pinned", ValueError, "cannot be merged as a whole; pin one task", lambda e: e.model.merge_adapter()),
    # ------------------------------------------------------------------ save_pretrained
    Case("save-pickle", "save_pretrained", "`safe_serialization=False`", BankError, "saved as safetensors only", lambda e: e.model.save_pretrained(e.tmp / "b", safe_serialization=False)),
    Case("save-into-a-file", "save_pretrained", "a path that is an existing file", BankError, "exists and is not a folder", lambda e: (e.tmp / "f").write_text("x") and e.model.save_pretrained(e.tmp / "f")),
    # ------------------------------------------------------------------ loading a bank
    Case("load-other-base-model", "PeftModel.from_pretrained", "a bank for a base model of hidden size 32 onto one of 48", ValueError, "built for a base model with hidden size 32", lambda e: _load(e.bank, hidden=48)),
    Case("load-newer-format", "PeftModel.from_pretrained", "a bank of `format_version` 2", ASRConfigError, "upgrade peft-asr", lambda e: _load(_edit_config(e.fresh(), lambda d: d.update(format_version=2)))),
    Case("load-unknown-key", "PeftModel.from_pretrained", "adapter_config.json with an unknown key `rr`", ASRConfigError, "has unknown keys ['rr']", lambda e: _load(_edit_config(e.fresh(), lambda d: d.update(rr=8)))),
    Case("load-missing-key", "PeftModel.from_pretrained", "adapter_config.json without `tasks`", ASRConfigError, "lacks the keys ['tasks']", lambda e: _load(_edit_config(e.fresh(), lambda d: d.pop("tasks") and None))),
    Case("load-invalid-json", "PeftModel.from_pretrained", "adapter_config.json cut in half", ASRConfigError, "is not valid JSON", lambda e: (_truncate(e.fresh() / "adapter_config.json"), _load(e.tmp / "copy"))),
    Case("load-json-not-object", "ASRConfig.from_pretrained", "adapter_config.json holding a list", ASRConfigError, "must hold a JSON object, got list", lambda e: ASRConfig.from_pretrained(_edit_config(e.fresh(), lambda d: [d]))),
    Case("load-bad-value", "PeftModel.from_pretrained", "adapter_config.json with `ridge: -1`", ASRConfigError, "`ridge` must be a number > 0", lambda e: _load(_edit_config(e.fresh(), lambda d: d.update(ridge=-1)))),
    Case("load-truncated-weights", "PeftModel.from_pretrained", "adapter_model.safetensors cut in half", BankError, "not a readable safetensors file", lambda e: (_truncate(e.fresh() / "adapter_model.safetensors"), _load(e.tmp / "copy"))),
    Case("load-truncated-statistics", "PeftModel.from_pretrained", "router_statistics.safetensors cut in half", BankError, "not a readable safetensors file", lambda e: (_truncate(e.fresh() / "router_statistics.safetensors"), _load(e.tmp / "copy"))),
    Case("load-pickle-only", "PeftModel.from_pretrained", "only adapter_model.bin (pickle), no safetensors", BankError, "holds only adapter_model.bin (a pickle file", lambda e: ((e.fresh() / "adapter_model.safetensors").rename(e.tmp / "copy" / "adapter_model.bin"), _load(e.tmp / "copy"))),
    Case("load-statistics-of-another-save", "PeftModel.from_pretrained", "router_statistics.safetensors from another save", BankError, "does not match the router", lambda e: (shutil.copy(e.other_bank / "router_statistics.safetensors", e.fresh() / "router_statistics.safetensors"), _load(e.tmp / "copy"))),
    Case("load-adapter-bad-bank", "load_adapter", "`load_adapter` (Trainer resume) of a bank with foreign statistics", BankError, "does not match the router", lambda e: (shutil.copy(e.other_bank / "router_statistics.safetensors", e.fresh() / "router_statistics.safetensors"), e.model.load_adapter(e.tmp / "copy", "default"))),
    Case("load-missing-folder", "load_adapter", "a folder that does not exist", BankError, "does not exist", lambda e: e.model.load_adapter(e.tmp / "nowhere", "default")),
    # ------------------------------------------------------------------ merge_banks
    Case("merge-one-bank", "merge_banks", "a single bank", BankError, "needs at least two banks", lambda e: merge_banks([e.bank], e.tmp / "m")),
    Case("merge-string-not-list", "merge_banks", "`merge_banks(\"bank\", out)` (a string, not a list)", TypeError, "`banks` must be a list of bank folders", lambda e: merge_banks(str(e.bank), e.tmp / "m")),
    Case("merge-output-exists", "merge_banks", "an output folder that exists", BankError, "already exists", lambda e: merge_banks([e.bank, e.other_bank], e.bank)),
    Case("merge-same-tasks", "merge_banks", "two banks with the same task names", BankError, "are already in another bank", lambda e: merge_banks([e.bank, e.other_bank], e.tmp / "m")),
    Case("merge-not-a-bank", "merge_banks", "a folder without adapter_config.json", BankError, "is not a saved bank", lambda e: merge_banks([e.bank, e.tmp], e.tmp / "m")),
    # ------------------------------------------------------------------ the peft-asr command (exit status 2, one line)
    Case("cli-info-missing-bank", "peft-asr info", "a folder that is not a bank", CLIError, "is not a saved bank (no adapter_config.json)", _cli("info", lambda e: e.tmp)),
    Case("cli-info-corrupt-config", "peft-asr info", "a bank whose adapter_config.json is cut in half", ASRConfigError, "is not valid JSON", _cli("info", lambda e: (_truncate(e.fresh() / "adapter_config.json"), e.tmp / "copy")[1])),
    Case("cli-route-no-base-model", "peft-asr route", "a bank whose base model is not available", CLIError, "pass --model PATH", _cli("route", lambda e: e.bank, "a prompt")),
    Case("cli-train-missing-config", "peft-asr train", "`--config` file that does not exist", CLIError, "not found", _cli("train", "--config", lambda e: e.tmp / "missing.yaml")),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread, no oversubscription


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_inputs"))


def _state(model) -> dict:
    router = model.base_model.router
    state = {f"router.{k}": v.clone() for k, v in router.statistics_state_dict().items()}
    state["router.weight"] = router.weight.clone()
    state.update({k: v.detach().clone() for k, v in model.named_parameters()})
    return state


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path, monkeypatch, capsys):
    env.tmp = tmp_path
    before, tasks, routes = _state(env.model), env.model.tasks, env.model.route(**_batch())
    assert routes == HELD_TASKS
    if case.entry.startswith("peft-asr"):
        monkeypatch.setenv("PEFT_ASR_DEBUG", "1")  # re-raise, so the error itself can be checked
    with pytest.raises(case.error) as info:
        case.run(env)
    assert case.message in str(info.value), str(info.value)
    raised_in = Path(str(info.traceback[-1].path)).resolve()
    assert PACKAGE in raised_in.parents, f"raised from {raised_in}, not from peft_asr"
    if case.entry.startswith("peft-asr"):  # without the debug switch: exit status 2 and one line, no traceback
        monkeypatch.delenv("PEFT_ASR_DEBUG")
        capsys.readouterr()
        assert case.run(env) == 2
        err = capsys.readouterr().err
        assert err.startswith("peft-asr: error: ") and err.count("\n") == 1 and "Traceback" not in err
    # the model is untouched and still works
    after = _state(env.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert env.model.tasks == tasks and env.model.base_model._pinned == []
    assert env.model.route(**_batch()) == routes


def test_fp16_model_routes_again_once_the_overflow_is_gone(env):
    """After the fp16 overflow errors, the same model works on finite input (the error left nothing behind)."""
    model = env.fp16
    with pytest.raises(RouterNumericalError):
        model.route(**_batch())
    beta = left_pad(prompts(*BETA_IDS, 3, seed=52))  # tokens whose embeddings did not overflow
    assert model.route(**beta) == ["beta"] * 3
    with torch.no_grad():
        logits = model(**beta).logits
    assert torch.isfinite(logits).all()


def test_unfitted_model_works_after_its_errors(env):
    model = env.unfitted
    with pytest.raises(RuntimeError):
        model.route(**_batch())
    model.fit_router([_batch()], task="alpha", progress=False)
    assert model.route(**_batch()) == ["alpha"] * 4


# ---------------------------------------------------------------- no code from a bank
class _Payload:
    """Unpickling this object runs `open(marker, "w")`: proof that a pickle file was read."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder: Path, marker: Path) -> None:
    payload = pickle.dumps(_Payload(str(marker)))
    for name in ("adapter_model.bin", "router_statistics.bin", "router_statistics.pt", "router_statistics.pkl",
                 "pytorch_model.bin", "training_args.bin"):
        (folder / name).write_bytes(payload)


def test_pickle_payloads_in_a_bank_are_never_executed(env, tmp_path):
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # the payload works: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()

    bank = tmp_path / "bank"
    shutil.copytree(env.bank, bank)
    _plant(bank, marker)
    loaded = PeftModel.from_pretrained(tiny_llama(), bank, is_trainable=True)  # safetensors present: they are used
    assert loaded.eval().route(**_batch()) == HELD_TASKS
    loaded.load_adapter(bank, "default")  # the Trainer's resume path
    assert loaded.base_model.router.has_statistics
    assert not marker.exists()

    (bank / "router_statistics.safetensors").unlink()  # only the pickle statistics left: routing only, no pickle read
    loaded = PeftModel.from_pretrained(tiny_llama(), bank)
    assert not loaded.base_model.router.has_statistics
    assert not marker.exists()

    (bank / "adapter_model.safetensors").unlink()  # only pickle weights left: refused, not read
    with pytest.raises(BankError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), bank)
    with pytest.raises(BankError, match="pickle"):
        env.model.load_adapter(bank, "default")
    with pytest.raises(BankError, match="pickle"):
        merge_banks([bank, env.bank], tmp_path / "merged")
    assert main(["info", str(bank)]) == 0  # info lists files, it never opens them
    assert not marker.exists()


def test_package_never_unpickles_or_evaluates():
    """No pickle, no torch.load, no eval/exec, no trust_remote_code anywhere in peft_asr."""
    pattern = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|dill|marshal|joblib)\b|\bpickle\.(loads?|Unpickler)\b|\btorch\.load\("
        r"|(?<![\w.])eval\(|(?<![\w.])exec\(|trust_remote_code\s*=\s*True"
    )
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{path.name}:{number}: {line.strip()}")
    assert not hits, hits


# ---------------------------------------------------------------- the doc table
def _cell(text: str) -> str:
    return "`` " + text.replace("|", "\\|") + " ``"


def render_table() -> str:
    rows = ["| id | entry point | bad input | error | message contains | test |", "|---|---|---|---|---|---|"]
    for case in CASES:
        bad = case.input.replace("|", "\\|")
        rows.append(
            f"| `{case.id}` | {case.entry} | {bad} | `{case.error.__name__}` | "
            f"{_cell(case.message)} | `tests/test_bad_inputs.py::test_bad_input[{case.id}]` |"
        )
    return "\n".join(rows)


def test_doc_table_matches_the_test_table():
    text = DOC.read_text()
    documented = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([\w-]+)` \|[^|]*\|.*?\| `(\w+)` \| `` (.*?) `` \| `tests/test_bad_inputs\.py::test_bad_input\[([\w-]+)\]` \|$", line)
        if match:
            documented[match[1]] = (match[2], match[3].replace("\\|", "|"), match[4])
    expected = {c.id: (c.error.__name__, c.message, c.id) for c in CASES}
    assert documented == expected, "docs/bad_inputs.md is out of date: regenerate it with render_table()"
    assert len(CASES) >= 30
