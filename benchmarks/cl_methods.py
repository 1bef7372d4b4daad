"""The baselines of the continual-learning benchmark, stage by stage: SeqLoRA, experience replay, O-LoRA, multi-task.

Every sequential method is a class with the same steps, which ``cl_benchmark.run_sequential`` calls in order and
checkpoints between stages: ``begin`` (fresh, or from the checkpoint of the last finished stage), ``train`` (one
stage), ``evaluate`` (the per-prompt scores of the tasks this stage evaluates), ``save`` (the checkpoint of the
stage) and ``finish`` (the general-prompt check, sizes), then ``close`` (the base model back, clean).

* ``seqlora``    one PEFT LoRA (same rank, alpha, targets, in every layer) trained task after task.
* ``replay``     ``seqlora`` with experience replay: each stage's training rows are the task's rows plus
                 ``--replay-fraction`` (2%) of every earlier task's training rows (at least one row each), shuffled.
* ``olora``      O-LoRA (Wang et al. 2023): a new LoRA per task, the earlier ones frozen but still applied, and the
                 loss ``CE + lambda_1 * sum_l |A_new,l A_old,l^T|_1`` (+ ``lambda_2 * |new LoRA|^2``).
* ``multitask``  one PEFT LoRA on the union of all tasks (shuffled), ``T x steps`` steps: not continual, the usual
                 upper bound; resumable at every ``steps`` steps through the Trainer's own checkpoints.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from cl_eval import general_check
from cl_streams import training_args

IGNORE = -100  # the label of a position outside the answer (PromptAnswerCollator)


def answer_loss_trainer():
    """``Trainer`` with the model's own loss (mean cross-entropy over the labelled tokens) computed from the logits of
    the positions that predict a labelled token only (``logits_to_keep``): the answers are a few tokens of each row,
    and a SmolLM2 step at batch 8 x 128 tokens takes 0.748x (ASR) / 0.674x (LoRA) of the time of the model's loss
    over every position (``benchmarks/perf_train_step.py``).
    Single process (the benchmark's); with ``num_items_in_batch`` the loss is normalised over the accumulated batch,
    as the model's is."""
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.accelerator.num_processes > 1:
                raise RuntimeError("AnswerLossTrainer is single-process; train with the plain Trainer on several.")
            target = inputs["labels"][:, 1:]  # position p predicts token p + 1
            keep = (target != IGNORE).any(0).nonzero().squeeze(1)  # (K,) positions predicting a labelled token
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
            logits = outputs.logits.float()  # (B, K, V)
            wanted = target[:, keep]  # (B, K)
            total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=IGNORE,
                                                      reduction="sum")
            if num_items_in_batch is None:
                count = (wanted != IGNORE).sum() * self.args.gradient_accumulation_steps
            else:
                count = num_items_in_batch
            loss = total / count
            return (loss, outputs) if return_outputs else loss

    return AnswerLossTrainer


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=sorted(args.targets))


def train_rows(ctx, rows):
    from peft_asr.cl import tokenize_examples

    return tokenize_examples(ctx.tokenizer, rows, max_length=ctx.args.train_max_length, use_chat_template=False,
                             truncation=ctx.args.truncation)


def train(ctx, model, rows, out: Path, trainer_cls=None, steps: Optional[int] = None, **trainer_kw) -> dict:
    """One Trainer run of ``rows`` (prompt/answer dicts); returns its seconds and steps."""
    from transformers import TrainingArguments, set_seed

    from peft_asr.cl import PromptAnswerCollator

    set_seed(ctx.args.seed)
    targs = TrainingArguments(output_dir=str(out), **training_args(ctx.args, steps))
    trainer = (trainer_cls or answer_loss_trainer())(model=model, args=targs, train_dataset=train_rows(ctx, rows),
                                       data_collator=PromptAnswerCollator(ctx.tokenizer.pad_token_id), **trainer_kw)
    start = time.perf_counter()
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)  # nothing of the Trainer's run is kept
    return {"train_s": round(time.perf_counter() - start, 2), "steps": trainer.state.global_step}


class SeqLoRA:
    name = "seqlora"

    def __init__(self, ctx) -> None:
        self.ctx, self.model = ctx, None

    def begin(self, folder: Optional[Path]) -> None:
        from peft import PeftModel, get_peft_model

        if folder is None:
            self.model = get_peft_model(self.ctx.model, lora_config(self.ctx.args))
        else:
            self.model = PeftModel.from_pretrained(self.ctx.model, str(folder), is_trainable=True)

    def rows(self, stage: int) -> list[dict]:
        return self.ctx.tasks[stage].train

    def train(self, stage: int) -> dict:
        rows = self.rows(stage)
        out = train(self.ctx, self.model, rows, self.ctx.work / f"trainer-{stage}")
        return {**out, "train_rows": len(rows)}

    def evaluate(self, stage: int, scope: list[int]) -> dict:
        return {"items": self.ctx.evaluator.score(self.model, scope)}

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))

    def trainable_params(self) -> int:
        return self.model.get_nb_trainable_parameters()[0]

    def finish(self, folder: Path) -> dict:
        ctx = self.ctx
        return {"trainable_params": self.trainable_params(), "adapter_bytes": folder_bytes(folder),
                "general": general_check(self.model, ctx.evaluator, ctx.general_heldout, ctx.general_base, False)}

    def close(self) -> None:
        if self.model is not None:
            self.model.unload()  # the base model back, every adapter layer removed
            self.model = None


class Replay(SeqLoRA):
    name = "replay"

    def rows(self, stage: int) -> list[dict]:
        """The task's rows plus a ``replay_fraction`` sample of every earlier task's (the same rows at every stage
        for a given task, drawn with the run's seed), shuffled."""
        fraction, seed = self.ctx.args.replay_fraction, self.ctx.args.seed
        rows = list(self.ctx.tasks[stage].train)
        for earlier in self.ctx.tasks[:stage]:
            k = max(1, math.ceil(fraction * len(earlier.train)))
            rows += random.Random(f"{seed}-{earlier.name}").sample(earlier.train, min(k, len(earlier.train)))
        random.Random(f"{seed}-{stage}").shuffle(rows)
        return rows


def olora_penalty(peft_model, new: str, old: list[str], lambda1: float, lambda2: float) -> torch.Tensor:
    """O-LoRA's regulariser: ``lambda1 * sum_l |A_new A_old^T|_1 + lambda2 * sum |new LoRA|^2``.

    ``A`` is the (r, in) down-projection of every LoRA layer; the old tasks' ``A`` are stacked along the rank, as in
    upstream (``loranew_A`` against the concatenated ``lora_A``).
    """
    orth = l2 = None
    for module in peft_model.modules():
        if not hasattr(module, "lora_A") or new not in getattr(module, "lora_A", {}):
            continue
        a_new = module.lora_A[new].weight  # (r, in)
        if old:
            a_old = torch.cat([module.lora_A[name].weight for name in old], dim=0).detach()  # (r * k, in)
            term = torch.abs(a_new @ a_old.T).sum()
            orth = term if orth is None else orth + term
        if lambda2:
            sq = a_new.pow(2).sum() + module.lora_B[new].weight.pow(2).sum()
            l2 = sq if l2 is None else l2 + sq
    total = torch.zeros((), device=next(peft_model.parameters()).device)
    if orth is not None:
        total = total + lambda1 * orth
    if l2 is not None:
        total = total + lambda2 * l2
    return total


class OLoRA(SeqLoRA):
    """Per-task LoRA adapters ``task0, task1, ...``, all applied (summed), only the newest trained."""

    name = "olora"

    def begin(self, folder: Optional[Path]) -> None:
        from peft import PeftModel

        self.model = None
        if folder is not None:
            names = sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda n: int(n[4:]))
            self.model = PeftModel.from_pretrained(self.ctx.model, str(folder / names[0]), adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(str(folder / name), adapter_name=name)
            self.model.base_model.set_adapter(names)  # every adapter applied, as after its stage

    def train(self, stage: int) -> dict:
        from peft import get_peft_model

        args = self.ctx.args
        names = [f"task{i}" for i in range(stage + 1)]
        if self.model is None:
            self.model = get_peft_model(self.ctx.model, lora_config(args), adapter_name=names[0])
        else:
            self.model.add_adapter(names[-1], lora_config(args))
        self.model.base_model.set_adapter(names)  # all applied ...
        for pname, param in self.model.named_parameters():  # ... only the newest one trained
            param.requires_grad = f".{names[-1]}." in pname

        class OLoRATrainer(answer_loss_trainer()):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
                loss = loss + olora_penalty(model, names[-1], names[:-1], args.olora_lambda1, args.olora_lambda2)
                return (loss, outputs) if return_outputs else loss

        rows = self.ctx.tasks[stage].train
        out = train(self.ctx, self.model, rows, self.ctx.work / f"trainer-{stage}", trainer_cls=OLoRATrainer)
        return {**out, "train_rows": len(rows)}

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))  # one sub-folder per adapter (PEFT's layout for non-default names)

    def trainable_params(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if ".task0." in n)  # one adapter's


def stop_callback(deadline):
    """A ``TrainerCallback`` that ends training right after a checkpoint once the time budget is spent."""
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        stopped = False

        def on_save(self, args, state, control, **kwargs):
            if deadline.spent():
                self.stopped = control.should_training_stop = True

    return StopAfterSave()


def run_multitask(ctx, deadline) -> Optional[dict]:
    """Multi-task LoRA: ``T x steps`` steps over all tasks' rows, a Trainer checkpoint every ``steps`` steps
    (resumed from when present); None when the budget stopped it (its checkpoint kept for the next run)."""
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from peft_asr.cl import PromptAnswerCollator

    args, tasks = ctx.args, ctx.tasks
    set_seed(args.seed)
    rows = [r for task in tasks for r in train_rows(ctx, task.train)]
    random.Random(args.seed).shuffle(rows)
    model = get_peft_model(ctx.model, lora_config(args))
    out = ctx.work / "trainer"
    settings = {**training_args(args, args.steps * len(tasks)), "save_strategy": "steps", "save_steps": args.steps,
                "save_total_limit": 1}
    stop = stop_callback(deadline)
    trainer = answer_loss_trainer()(model=model, args=TrainingArguments(output_dir=str(out), **settings),
                                    train_dataset=rows, callbacks=[stop],
                                    data_collator=PromptAnswerCollator(ctx.tokenizer.pad_token_id))
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=last)
        train_s = time.perf_counter() - start
        if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
            return None
        start = time.perf_counter()
        items = ctx.evaluator.score(model, list(range(len(tasks))))
        eval_s = time.perf_counter() - start
        general = general_check(model, ctx.evaluator, ctx.general_heldout, ctx.general_base, False)
        model.save_pretrained(str(ctx.work / "adapter"))
        return {"items": {str(i): v for i, v in items.items()}, "trainable_params": model.get_nb_trainable_parameters()[0],
                "timings": [{"train_s": round(train_s, 2), "eval_s": round(eval_s, 2), "resumed_from": last,
                             "steps": trainer.state.global_step}],
                "general": general, "adapter_bytes": folder_bytes(ctx.work / "adapter")}
    finally:
        model.unload()
