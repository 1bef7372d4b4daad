"""ASRCallback with the HF Trainer: router fit at train end, each prompt once, resume without double counting."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_POOLING, ALPHA_IDS, BETA_IDS, PromptAnswerData, collate, left_pad, prompts, tiny_llama
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_asr  # noqa: F401
from peft_asr import ASRCallback, ASRConfig


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, num_train_epochs=1,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                weight_decay=0.1)
    base.update(kw)
    return TrainingArguments(**base)


def _model():
    return get_peft_model(tiny_llama(), ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"], router_layer=2,
                                                  **TOY_POOLING))  # 24 prompts per task


DATA = {"alpha": PromptAnswerData(*ALPHA_IDS, 24, seed=1), "beta": PromptAnswerData(*BETA_IDS, 24, seed=2)}


def _train(model, task, out, eval_dataset=None, **kw):
    model.add_task(task)
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=DATA[task], data_collator=collate,
                      eval_dataset=eval_dataset, callbacks=[ASRCallback(progress=False)])
    trainer.train()
    return trainer


def test_two_tasks_with_trainer_and_callback(tmp_path):
    model = _model()
    _train(model, "alpha", tmp_path / "a", gradient_accumulation_steps=2, num_train_epochs=3)
    router = model.base_model.router
    assert router.class_counts.tolist() == [0, 24]  # three epochs, each prompt counted once
    alpha_params = {n: p.detach().clone() for n, p in model.named_parameters() if ".alpha" in n}
    _train(model, "beta", tmp_path / "b")
    assert router.class_counts.tolist() == [0, 24, 24]
    for n, p in model.named_parameters():
        if ".alpha" in n:
            assert torch.equal(p, alpha_params[n]), n  # weight decay 0.1 never touched the old task
    model.eval()
    held_a = prompts(*ALPHA_IDS, 5, seed=9)
    held_b = prompts(*BETA_IDS, 5, seed=10)
    assert model.route(**left_pad(held_a + held_b)) == ["alpha"] * 5 + ["beta"] * 5
    # the router the callback built equals a router fitted by hand on the same prompts (prompt-only pooling)
    manual = _model()
    manual.add_task("alpha")
    manual.add_task("beta")
    for task in ("alpha", "beta"):
        manual.fit_router([collate([DATA[task][i] for i in range(24)])], task=task, progress=False)
    # features are float32 hidden states, which move by ~1e-7 with the padding width of the batch they came in
    # (Trainer batches of 4 vs one batch of 24); the router math itself is exact (tests/test_rls.py)
    assert (manual.base_model.router.solve().weight - router.solve().weight).abs().max() < 1e-6
    assert model.base_model._pinned == []  # the callback unpinned the training task


def test_evaluation_during_training_uses_the_task_being_trained(tmp_path):
    # before the callback fits the router, a routed evaluation would fail ("not been fitted"): the callback pins
    # the task being trained, so evaluation inside train() works and measures that task
    model = _model()
    trainer = _train(model, "alpha", tmp_path, eval_dataset=DATA["alpha"], eval_strategy="steps", eval_steps=2,
                     max_steps=4, logging_strategy="steps", logging_steps=2)
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert len(evals) == 2
    with model.use_task("alpha"):
        pinned = trainer.evaluate()["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(pinned, rel=1e-5)  # after training: routed to alpha


def test_resume_from_checkpoint_neither_loses_nor_double_counts(tmp_path):
    straight = _model()
    _train(straight, "alpha", tmp_path / "s1")
    _train(straight, "beta", tmp_path / "s2", max_steps=6)

    # same run, but the process "dies" after step 3 of task beta and a new one resumes from the checkpoint
    first = _model()
    _train(first, "alpha", tmp_path / "r1")
    first.add_task("beta")
    args = _args(tmp_path / "r2", max_steps=6, save_strategy="steps", save_steps=3)
    crashed = Trainer(model=first, args=args, train_dataset=DATA["beta"], data_collator=collate,
                      callbacks=[ASRCallback(progress=False)])
    crashed.train()  # writes checkpoint-3 with alpha in the router statistics, beta not yet
    resumed = _model()
    resumed.add_task("alpha")
    resumed.add_task("beta")
    trainer = Trainer(model=resumed, args=args, train_dataset=DATA["beta"], data_collator=collate,
                      callbacks=[ASRCallback(progress=False)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "r2" / "checkpoint-3"))
    a, b = straight.base_model.router.solve(), resumed.base_model.router.solve()
    assert a.class_counts.tolist() == b.class_counts.tolist() == [0, 24, 24]
    assert (a.weight - b.weight).abs().max() < 1e-10


def test_callback_without_a_task_is_an_error(tmp_path):
    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=DATA["alpha"], data_collator=collate,
                      callbacks=[ASRCallback(progress=False)])
    with pytest.raises(RuntimeError, match="add_task"):
        trainer.train()


class _Crash(Exception):
    pass


def _crash_on_step(step: int):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Crash(f"the run dies at step {step}")

    return Crash()


def test_a_run_that_dies_leaves_no_pin_and_generate_routes(tmp_path):
    model = _model()
    _train(model, "alpha", tmp_path / "a")
    model.add_task("beta")
    trainer = Trainer(model=model, args=_args(tmp_path / "b", max_steps=4), train_dataset=DATA["beta"],
                      data_collator=collate, callbacks=[ASRCallback(progress=False), _crash_on_step(2)])
    with pytest.raises(_Crash):
        trainer.train()
    assert model.base_model._pinned == []  # nothing pinned beta: the router still decides
    batch = left_pad(prompts(*ALPHA_IDS, 3, seed=9))
    assert model.training  # the dead run left the model in training mode, and beta is not in the router:
    with pytest.raises(RuntimeError, match=r"task being trained \('beta'\) is not in the router yet"):
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.eval()
    with model.use_task("alpha"):
        pinned = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0), pinned)


def test_a_run_that_dies_inside_an_evaluation_is_unpinned_by_the_next_run(tmp_path):
    class BadEval(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise _Crash("the evaluation dies")

    model = _model()
    model.add_task("alpha")
    trainer = Trainer(model=model, args=_args(tmp_path / "a", max_steps=2, eval_strategy="steps", eval_steps=1),
                      train_dataset=DATA["alpha"], eval_dataset=BadEval(), data_collator=collate,
                      callbacks=[ASRCallback(progress=False)])
    with pytest.raises(_Crash):
        trainer.train()
    assert model.base_model._pinned == ["alpha"]  # held for the evaluation that died
    # a new run with a new callback releases it before its first step, then trains and fits the router
    Trainer(model=model, args=_args(tmp_path / "b", max_steps=2), train_dataset=DATA["alpha"], data_collator=collate,
            callbacks=[ASRCallback(progress=False)]).train()
    assert model.base_model._pinned == []
    assert model.base_model.router.class_counts.tolist() == [0, 24]


def test_router_batches_are_checked_before_the_first_step(tmp_path):
    def no_prompt(rows):
        batch = collate(rows)
        return dict(batch, prompt_mask=torch.zeros_like(batch["input_ids"]))  # a collator that marks no prompt

    from transformers import TrainerCallback

    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    model = _model()
    model.add_task("alpha")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=DATA["alpha"],
                      data_collator=no_prompt, callbacks=[ASRCallback(progress=False), Steps()])
    with pytest.raises(ValueError, match="have no prompt token"):
        trainer.train()
    assert steps == []


def test_evaluation_of_several_eval_datasets_all_use_the_task_being_trained(tmp_path):
    """`eval_dataset={...}`: `Trainer.evaluate` runs once per dataset and fires `on_evaluate` after each one; every
    one of them must see the pinned task (the router does not know it yet: a routed call would refuse)."""
    model = _model()
    model.add_task("alpha")
    seen = []
    handle = model.base_model.model.register_forward_pre_hook(  # batches with labels: training and evaluation
        lambda m, a, k: seen.append((m.training, list(model.base_model._pinned))) if "labels" in k else None,
        with_kwargs=True)
    try:
        trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
                          train_dataset=DATA["alpha"], data_collator=collate,
                          eval_dataset={"first": DATA["alpha"], "second": DATA["alpha"]},
                          callbacks=[ASRCallback(progress=False)])
        trainer.train()
    finally:
        handle.remove()
    evals = [pins for training, pins in seen if not training]
    assert len(evals) == 2 * 3 and all(pins == ["alpha"] for pins in evals), evals  # 2 datasets x 24 rows / 8
    logs = {k: v for log in trainer.state.log_history for k, v in log.items() if k.endswith("_loss")}
    assert logs["eval_first_loss"] == pytest.approx(logs["eval_second_loss"], rel=1e-6)
    assert model.base_model._pinned == []


def test_pin_during_training_for_trainers_that_generate(tmp_path):
    from transformers import TrainerCallback

    outputs = []

    class Rollout(TrainerCallback):  # what an RL trainer does inside its steps: generate in training mode
        def on_step_end(self, args, state, control, model=None, **kwargs):
            outputs.append(model.generate(**left_pad(prompts(*BETA_IDS, 2, seed=3)), max_new_tokens=2,
                                          do_sample=False, pad_token_id=0))

    model = _model()
    _train(model, "alpha", tmp_path / "a")
    model.add_task("beta")
    Trainer(model=model, args=_args(tmp_path / "b", max_steps=2), train_dataset=DATA["beta"], data_collator=collate,
            callbacks=[ASRCallback(progress=False, pin_during_training=True), Rollout()]).train()
    assert len(outputs) == 2 and model.base_model._pinned == []
    with pytest.raises(RuntimeError, match="not in the router yet"):  # the same without the pin: refused, not misrouted
        model.add_task("gamma")
        Trainer(model=model, args=_args(tmp_path / "c", max_steps=1), train_dataset=DATA["beta"],
                data_collator=collate, callbacks=[ASRCallback(progress=False), Rollout()]).train()


def test_the_callback_outside_a_trainer_and_with_processes_accelerate_does_not_know():
    """The callback's methods with plain arguments (a loop of one's own): rank and world size come from
    accelerate's state. Arguments naming processes that accelerate does not know are refused before the fit, which
    would otherwise give every rank the router of its own shard."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    model = _model()
    model.add_task("alpha")
    loader = DataLoader(DATA["alpha"], batch_size=4, collate_fn=collate)
    state = SimpleNamespace(is_local_process_zero=True)
    callback = ASRCallback(progress=False)
    alone = SimpleNamespace(per_device_train_batch_size=4)  # no process_index / world_size
    callback.on_train_end(alone, state, None, model=model, train_dataloader=loader)
    assert model.base_model.router.class_counts.tolist() == [0.0, 24.0]

    other = _model()
    other.add_task("alpha")
    two = SimpleNamespace(per_device_train_batch_size=4, process_index=0, world_size=2)
    with pytest.raises(RuntimeError, match="say 2 processes but accelerate knows 1"):
        callback.on_train_end(two, state, None, model=other, train_dataloader=loader)
    assert other.base_model.router.class_counts.tolist() == [0.0, 0.0]
