"""Router features harvested from training (tuner.harvest): the router equals the separate pass's, each row counted
once, whatever training saw; models and calls whose training features differ fall back to the pass."""

from __future__ import annotations

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, TOY_POOLING, PromptAnswerData, collate, left_pad, tiny_llama
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_asr  # noqa: F401
from peft_asr import ASRCallback, ASRConfig
from peft_asr.tuner.callback import HARVEST_FILE, _read_harvest
from peft_asr.tuner.harvest import HarvestMismatch


def _model(dtype=torch.float64, **base_config):
    base = tiny_llama()
    for key, value in base_config.items():
        setattr(base.config, key, value)
    return get_peft_model(base.to(dtype), ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, router_layer=2,
                                                    target_modules=["q_proj", "v_proj"], **TOY_POOLING))


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


ALPHA = PromptAnswerData(*ALPHA_IDS, 24, seed=1)
FIRST = 4  # rows of the batch the callback checks before the first step (through the router pass)
WITH_DUPLICATE = Rows([ALPHA[i] for i in range(24)] + [ALPHA[0]])  # one prompt twice: counted twice, as a pass would


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, num_train_epochs=1,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _count_passed_rows(model) -> list[int]:
    """Patch the router pass to record how many rows it runs."""
    tuner = model.base_model
    passed, original = [], tuner.router_features

    def counting(batch):
        out = original(batch)
        passed.append(out.shape[0])
        return out

    tuner.router_features = counting
    return passed


def _train(out, data=ALPHA, harvest=True, model=None, collator=collate, callbacks=(), **kw):
    model = model if model is not None else _model()
    model.add_task("alpha")
    passed = _count_passed_rows(model)
    callback = ASRCallback(progress=False, harvest=harvest)
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=data, data_collator=collator,
                      callbacks=[callback, *callbacks])
    trainer.train()
    return model, callback, passed


def _router(model):
    return model.base_model.router.solve()


def _assert_same_router(a, b, tol=1e-10):
    a, b = _router(a), _router(b)
    assert a.class_counts.tolist() == b.class_counts.tolist()
    for name in ("class_gram", "cross", "weight", "bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert float((x - y).abs().max()) <= tol * float(y.abs().max()), name


def test_harvested_router_equals_the_separate_pass(tmp_path, one_thread):
    # three epochs and gradient accumulation: each row is taken once, the duplicated prompt twice
    harvested, callback, passed = _train(tmp_path / "h", WITH_DUPLICATE, num_train_epochs=3,
                                         gradient_accumulation_steps=2)
    report = callback.harvest_report
    assert (report["harvested_rows"], report["blocker"], report["skipped_calls"]) == (25, None, {})
    assert report["seconds"] > 0
    assert sum(passed) == FIRST  # the check of the first batch before training; no row at the end
    separate, off, passed_off = _train(tmp_path / "s", WITH_DUPLICATE, harvest=False, num_train_epochs=3,
                                       gradient_accumulation_steps=2)
    assert off.harvest_report["harvested_rows"] == 0 and sum(passed_off) == FIRST + 25
    assert _router(harvested).class_counts.tolist() == [0, 25]
    _assert_same_router(harvested, separate)


def test_float32_training_features_equal_the_pass_to_round_off(tmp_path, one_thread):
    harvested, callback, _ = _train(tmp_path / "h", model=_model(torch.float32))
    separate, _, _ = _train(tmp_path / "s", model=_model(torch.float32), harvest=False)
    assert callback.harvest_report["harvested_rows"] == 24
    _assert_same_router(harvested, separate, tol=1e-5)  # other batch shapes than the pass: float32 round-off


def test_rows_training_did_not_see_run_the_pass(tmp_path, one_thread):
    harvested, callback, passed = _train(tmp_path / "h", max_steps=3)  # 12 of the 24 rows
    assert callback.harvest_report["harvested_rows"] == 12
    assert sum(passed) == FIRST + 12
    separate, _, _ = _train(tmp_path / "s", harvest=False, max_steps=3)
    _assert_same_router(harvested, separate)
    assert _router(harvested).class_counts.tolist() == [0, 24]  # the router learns every prompt of the task


@pytest.mark.parametrize("noise", ["config", "module"])
def test_models_with_train_mode_randomness_below_the_router_block_use_the_pass(tmp_path, one_thread, noise):
    model = _model(attention_dropout=0.1) if noise == "config" else _model()
    if noise == "module":
        mlp = model.base_model.model.model.layers[0].mlp
        mlp.act_fn = torch.nn.Sequential(torch.nn.Dropout(0.1), mlp.act_fn)
    harvested, callback, passed = _train(tmp_path / "h", model=model)
    expected = "attention_dropout=0.1" if noise == "config" else "layers.0.mlp.act_fn.0` is a dropout with p=0.1"
    assert expected in callback.harvest_report["blocker"]
    assert callback.harvest_report["harvested_rows"] == 0 and sum(passed) == FIRST + 24
    assert _router(harvested).class_counts.tolist() == [0, 24]


def _left_collate(rows):
    batch = left_pad([r["input_ids"] for r in rows])
    labels = torch.full_like(batch["input_ids"], -100)
    for i, r in enumerate(rows):
        n = len(r["labels"])
        labels[i, labels.shape[1] - n:] = torch.tensor(r["labels"])
    batch["labels"] = labels
    return batch


def test_left_padded_training_rows_are_not_harvested(tmp_path, one_thread):
    # the training forward counts positions from the pads, the router from the mask: those calls are skipped
    harvested, callback, passed = _train(tmp_path / "h", collator=_left_collate)
    report = callback.harvest_report
    assert report["skipped_calls"].get("positions differ from the attention mask's (padding before real tokens)", 0) > 0
    assert report["harvested_rows"] + sum(passed) == FIRST + 24
    separate, _, _ = _train(tmp_path / "s", collator=_left_collate, harvest=False)
    _assert_same_router(harvested, separate)


class _DieAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("the process dies")


def test_resume_restores_the_pending_statistics_of_the_checkpoint(tmp_path, one_thread):
    straight, _, _ = _train(tmp_path / "s", harvest=False, max_steps=6)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    dying = _model()
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "r", model=dying, callbacks=[_DieAtStep(5)], **args)
    assert _router(dying).class_counts.tolist() == [0, 0]  # a run that dies adds nothing to the router
    saved = _read_harvest(str(tmp_path / "r" / "checkpoint-3" / HARVEST_FILE))
    assert sum(saved["taken"].values()) == 12 and saved["task"] == "alpha"
    resumed = _model()
    resumed.add_task("alpha")
    passed = _count_passed_rows(resumed)
    callback = ASRCallback(progress=False)
    trainer = Trainer(model=resumed, args=_args(tmp_path / "r", **args), train_dataset=ALPHA,
                      data_collator=collate, callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-3"))
    assert callback.harvest_report["harvested_rows"] == 24 and sum(passed) == FIRST  # 12 restored + 12 trained
    _assert_same_router(resumed, straight)


def _batches(rows, size=4):
    return [collate([rows[i] for i in range(start, min(start + size, len(rows)))]) for start in range(0, len(rows), size)]


def test_custom_loop_harvest_and_its_refusals(one_thread):
    model = _model()
    model.add_task("alpha")
    batches = _batches(ALPHA)
    harvest = model.start_router_harvest()  # no expected rows: every distinct row once
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batches[0])
    assert model.stop_router_harvest() is harvest
    assert harvest.rows == 24 and harvest.skipped == {"autocast": 1}
    before = _router(model).snapshot()
    with pytest.raises(HarvestMismatch, match="lack"):
        model.fit_router(batches[:3], task="alpha", harvest=harvest, progress=False)  # half the rows
    after = _router(model).snapshot()
    assert all(torch.equal(before[k], after[k]) for k in ("class_gram", "cross", "class_counts"))
    with pytest.raises(ValueError, match="harvest is of task 'alpha'"):
        model.fit_router(batches, task=None, harvest=harvest, progress=False)
    model.fit_router(batches, task="alpha", harvest=harvest, progress=False)
    separate = _model()
    separate.add_task("alpha")
    separate.fit_router(batches, task="alpha", progress=False)
    _assert_same_router(model, separate)


def test_eval_forwards_and_other_tasks_are_not_harvested(one_thread):
    model = _model()
    model.add_task("alpha")
    harvest = model.start_router_harvest()
    model.eval()
    with model.use_task("alpha"):
        model(**_batches(ALPHA)[0])  # an evaluation pinned to the task being trained
    model.train()
    with model.use_task(None):
        model(**_batches(PromptAnswerData(*BETA_IDS, 4, seed=2))[0])  # pinned to the base model
    assert harvest.rows == 0
    with pytest.raises(RuntimeError, match="no task is being trained"):
        _model().start_router_harvest()


def test_gradient_checkpointing_takes_each_row_once(tmp_path, one_thread):
    # the checkpointed blocks run again in backward: the harvest pools in the forward only
    harvested, callback, passed = _train(tmp_path / "h", gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    assert callback.harvest_report["harvested_rows"] == 24 and sum(passed) == FIRST
    separate, _, _ = _train(tmp_path / "s", harvest=False)
    _assert_same_router(harvested, separate)


def test_a_harvested_training_forward_answers_as_the_task_pinned_row_by_row(one_thread):
    # the harvest only reads the hidden state: a training forward follows the task being trained, each row's logits
    # equal that row run alone with the task pinned, and nothing else changes
    model = _model()
    model.add_task("alpha")
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)  # subspaces that change the output
    batch = _batches(ALPHA)[0]
    model.train()
    plain = model(**batch).logits
    harvest = model.start_router_harvest()
    harvested = model(**batch).logits
    model.stop_router_harvest()
    assert harvest.rows == 4 and torch.equal(harvested, plain)
    mask = batch["attention_mask"].bool()
    for row in range(4):
        alone = {k: v[row:row + 1, : int(mask[row].sum())] for k, v in batch.items()}
        with model.use_task("alpha"):
            pinned = model(**alone).logits
        assert torch.allclose(harvested[row, mask[row]], pinned[0], atol=1e-10)
