"""The task-stream runner: train tasks one after another, evaluate every task after every stage.

``run_stream`` is what the demo, the command line and the benchmarks use. After stage ``t`` (tasks ``0..t`` trained)
it evaluates *all* tasks of the stream with greedy decoding, so the results carry the full accuracy matrix
``R[t][i]`` (the entries above the diagonal give forward transfer), plus, for Analytic Subspace Routing, the
routing confusion of the seen tasks at every stage and the time spent training, fitting the router and evaluating.

Methods:

* ``"asr"``: this package. ``add_task`` -> ``Trainer`` + ``ASRCallback`` (router fit at the end of training);
  evaluation is one routed ``generate`` over a mixed batch of every task's prompts.
* ``"seqlora"``: the usual forgetting baseline: one PEFT LoRA (same rank, alpha and target modules, in every layer)
  trained on each task in turn.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..tuner.config import BASE_ROUTE, ASRConfig
from .metrics import cl_summary, percent, routing_accuracy, routing_confusion
from .scorers import get_scorer
from .tasks import Task
from .tokenization import TRUNCATIONS, PromptAnswerCollator, prompt_batches, tokenize_examples

__all__ = ["StreamResults", "run_stream", "generate_answers", "evaluate_tasks", "evaluate_routing", "stage_scope",
           "METHODS", "EVAL_SCOPES"]

METHODS = ("asr", "seqlora")
EVAL_SCOPES = ("all", "seen+next", "diagonal+final")


def stage_scope(eval_scope: str, stage: int, num_tasks: int) -> list[int]:
    """The tasks evaluated after ``stage`` (0-based) of a ``num_tasks`` stream, in order.

    ``"all"``: every task (the full matrix); ``"seen+next"``: tasks ``0..stage+1`` (what OP, BWT, FWT and
    forgetting need); ``"diagonal+final"``: task ``stage`` only, and every task after the last stage (what OP and
    BWT need: about ``2T`` task evaluations instead of ``T^2 / 2``).
    """
    if eval_scope not in EVAL_SCOPES:
        raise ValueError(f"`eval_scope` must be one of {EVAL_SCOPES}, got {eval_scope!r}.")
    if eval_scope == "all" or stage == num_tasks - 1:
        return list(range(num_tasks))
    if eval_scope == "seen+next":
        return list(range(min(stage + 2, num_tasks)))
    return [stage]
DEFAULT_TRAINING = dict(
    per_device_train_batch_size=8, learning_rate=2e-3, num_train_epochs=1, lr_scheduler_type="constant",
    warmup_steps=0, weight_decay=0.0, logging_strategy="no", save_strategy="no", report_to=[], seed=0,
    use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
)


@dataclass
class StreamResults:
    """What a stream run measured. ``matrix[t][i]`` is task ``i``'s score (0-1) after training tasks ``0..t``."""

    method: str
    tasks: list[str]
    matrix: list[list[float]] = field(default_factory=list)
    baseline: Optional[list[float]] = None  # the base model's score per task (for forward transfer)
    routing: list[dict] = field(default_factory=list)  # per stage: labels, confusion (true x predicted), accuracy
    timings: list[dict] = field(default_factory=list)  # per stage: train_s, router_s, eval_s
    trainable_params: Optional[int] = None
    info: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)  # the trained PEFT model (not serialised)

    @property
    def summary(self) -> dict:
        """OP, BWT, FWT (with a baseline), forgetting, and the last stage's routing accuracy (ASR)."""
        out = dict(cl_summary(self.matrix, self.baseline)) if self.matrix else {}
        if self.routing:
            out["routing_accuracy"] = self.routing[-1]["accuracy"]
        return out

    def to_dict(self) -> dict:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "model"}
        data["summary"] = self.summary
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StreamResults":
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "StreamResults":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 32,
                     max_length: int = 256, use_chat_template: Optional[bool] = None, progress: bool = False,
                     truncation: str = "left", sort_by_length: bool = False,
                     task_names: Optional[Sequence[Optional[str]]] = None) -> list[str]:
    """Greedy answers (first line, stripped) for ``prompts``, in their order; routed per row when ``model`` is an
    ASR model, or each row on its task of ``task_names`` (None: the base model).

    ``sort_by_length`` batches prompts of similar length together (less padding, the same answers up to float
    rounding); ``truncation`` is that of :func:`~peft_asr.cl.tokenization.prompt_batches`.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if task_names is not None and len(task_names) != len(prompts):
        raise ValueError(f"`task_names` has {len(task_names)} entries for {len(prompts)} prompts; give one per prompt.")
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: len(prompts[i]))
    answers: list[Optional[str]] = [None] * len(prompts)
    batches = prompt_batches(tokenizer, [prompts[i] for i in order], batch_size=batch_size, max_length=max_length,
                             use_chat_template=use_chat_template, truncation=truncation)
    total = -(-len(prompts) // batch_size)
    for k, batch in enumerate(tqdm(batches, total=total, desc="generate", disable=not progress, leave=False)):
        rows = order[k * batch_size: (k + 1) * batch_size]
        device = next(model.parameters()).device
        batch = {key: v.to(device) for key, v in batch.items()}
        if task_names is not None:
            batch["task_names"] = [task_names[i] for i in rows]
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, L + new) -> (B, new)
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text.strip().split("\n")[0].strip()
    return answers


def evaluate_tasks(model, tokenizer, tasks: Sequence[Task], **generate_kwargs) -> list[float]:
    """Score of every task (its own scorer) from one mixed pass over all tasks' eval prompts."""
    prompts = [row["prompt"] for task in tasks for row in task.eval]
    answers = generate_answers(model, tokenizer, prompts, **generate_kwargs)
    scores, start = [], 0
    for task in tasks:
        stop = start + len(task.eval)
        refs = [row["answer"] for row in task.eval]
        sources = [row["prompt"] for row in task.eval]
        scores.append(float(get_scorer(task.metric)(answers[start:stop], refs, sources)))
        start = stop
    return scores


def evaluate_routing(model, tokenizer, seen: Sequence[Task], **kwargs) -> dict:
    """Route every eval prompt of ``seen``: labels (base route first), confusion (true x routed) and accuracy."""
    true, pred = [], []
    prompts = [row["prompt"] for task in seen for row in task.eval]
    for task in seen:
        true.extend([task.name] * len(task.eval))
    for batch in prompt_batches(tokenizer, prompts, batch_size=kwargs.get("batch_size", 32),
                                max_length=kwargs.get("max_length", 256),
                                use_chat_template=kwargs.get("use_chat_template"),
                                truncation=kwargs.get("truncation", "left")):
        pred.extend(model.route(**batch))
    labels = [BASE_ROUTE] + [t.name for t in seen]
    return {"labels": labels, "confusion": routing_confusion(true, pred, labels),
            "accuracy": routing_accuracy(true, pred)}


# ---------------------------------------------------------------------------------------------------- training
def _training_args(training_args, output_dir: str):
    from transformers import TrainingArguments

    if training_args is None:
        training_args = {}
    if isinstance(training_args, TrainingArguments):
        return dataclasses.replace(training_args, output_dir=output_dir)
    if not isinstance(training_args, Mapping):
        raise TypeError(f"`training_args` must be a TrainingArguments or a dict, got {type(training_args).__name__}.")
    return TrainingArguments(**{**DEFAULT_TRAINING, **dict(training_args), "output_dir": output_dir})


def _load(model_or_name, tokenizer):
    from .default_model import load_model_and_tokenizer

    if model_or_name is None or isinstance(model_or_name, (str, os.PathLike)):
        model, loaded_tokenizer = load_model_and_tokenizer(None if model_or_name is None else str(model_or_name))
        return model, tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("pass `tokenizer=` together with a model object.")
    return model_or_name, tokenizer


def _check_tasks(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise ValueError("`tasks` is empty; a stream needs at least one task.")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"every task must be a peft_asr.cl.Task, got {type(task).__name__}.")
        if not task.train:
            raise ValueError(f"task {task.name!r} has no training rows.")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}.")


def run_stream(
    model_or_name=None,
    tasks: Sequence[Task] = (),
    training_args=None,
    *,
    tokenizer=None,
    method: str = "asr",
    asr_config: Optional[ASRConfig] = None,
    general_prompts: Optional[Sequence[str]] = None,
    baseline: Optional[Sequence[float]] = None,
    compute_baseline: bool = True,
    max_new_tokens: int = 16,
    eval_batch_size: int = 32,
    max_length: int = 256,
    use_chat_template: Optional[bool] = None,
    output_dir: Union[str, os.PathLike] = "asr-stream",
    bank_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    callbacks: Sequence = (),
    eval_scope: str = "all",
    on_stage_end: Optional[Callable[[int, Any, StreamResults], None]] = None,
    truncation: str = "left",
) -> StreamResults:
    """Train ``tasks`` in order with ``method`` and evaluate every task after every stage.

    Args:
        model_or_name: a causal LM (then pass ``tokenizer``), a local model folder, or ``None`` for the embedded
            default model (SmolLM2-135M-Instruct).
        tasks: the stream, as :class:`~peft_asr.cl.tasks.Task` objects (``demo_stream``, ``load_trace_task``...).
        training_args: ``TrainingArguments`` or a dict of its fields (defaults: batch 8, lr 2e-3, one epoch);
            ``output_dir`` is set per stage.
        method: ``"asr"`` or ``"seqlora"``.
        asr_config: the bank's settings (rank, alpha, targets, router); also gives the LoRA settings of
            ``"seqlora"``. Defaults to ``ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
            target_modules=["q_proj", "v_proj"])``.
        general_prompts: everyday prompts fitted to the router's base route before the first task (ASR only).
        baseline / compute_baseline: the base model's score per task, for forward transfer; computed before
            training when not given and ``compute_baseline`` is true.
        output_dir: where the Trainer runs are written (one folder per stage).
        bank_dir: where the ASR bank is saved at the end (default: ``output_dir/bank``).
        eval_scope: which tasks are evaluated after stage ``t`` (:func:`stage_scope`): ``"all"`` (every task, the
            full ``T x T`` matrix), ``"seen+next"`` (tasks ``0..t+1``: everything OP, BWT, FWT and forgetting need,
            about half the evaluation of a long stream) or ``"diagonal+final"`` (task ``t``, and every task after
            the last stage: OP and BWT); the entries not evaluated are ``None``.
        on_stage_end: called as ``on_stage_end(stage, model, results)`` after each stage's evaluation (the model is
            in eval mode), e.g. to measure more things on the model of that stage.
        truncation: how a prompt longer than ``max_length`` is cut, for training, routing and generation alike:
            ``"left"`` (its start is dropped) or ``"middle"`` (its start and end are kept).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed

    from ..tuner.callback import ASRCallback

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    _check_tasks(tasks)
    stage_scope(eval_scope, 0, len(tasks))  # checks the scope
    if truncation not in TRUNCATIONS:
        raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")
    if on_stage_end is not None and not callable(on_stage_end):
        raise TypeError(f"`on_stage_end` must be callable, got {type(on_stage_end).__name__}.")
    model, tokenizer = _load(model_or_name, tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` first.")
    output_dir = Path(output_dir)
    config = copy.deepcopy(asr_config) if asr_config is not None else ASRConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if config.tasks:
        raise ValueError("`asr_config.tasks` must be empty: the runner adds the stream's tasks.")
    gen = dict(max_new_tokens=max_new_tokens, batch_size=eval_batch_size, max_length=max_length,
               use_chat_template=use_chat_template, progress=progress, truncation=truncation)
    results = StreamResults(method=method, tasks=[t.name for t in tasks])
    if baseline is None and compute_baseline:
        model.eval()
        baseline = evaluate_tasks(model, tokenizer, tasks, **gen)
    results.baseline = list(baseline) if baseline is not None else None

    if method == "asr":
        model = get_peft_model(model, config)
        if general_prompts:
            model.fit_router(prompt_batches(tokenizer, list(general_prompts), batch_size=eval_batch_size,
                                            max_length=max_length, use_chat_template=use_chat_template,
                                            truncation=truncation),
                             task=None, progress=progress)
    else:
        targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout, target_modules=targets))
    collator = PromptAnswerCollator(tokenizer.pad_token_id)
    for stage, task in enumerate(tasks):
        args = _training_args(training_args, str(output_dir / f"{method}-{stage}-{task.name}"))
        set_seed(args.seed)
        train_rows = tokenize_examples(tokenizer, task.train, max_length=max_length, use_chat_template=use_chat_template,
                                       truncation=truncation)
        stage_callbacks = list(callbacks)
        asr_callback = None
        if method == "asr":
            model.add_task(task.name)
            asr_callback = ASRCallback(progress=progress)
            stage_callbacks.insert(0, asr_callback)
        trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator,
                          callbacks=stage_callbacks)
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        router_s = asr_callback.fit_seconds if asr_callback is not None else 0.0
        if stage == 0:
            results.trainable_params = model.get_nb_trainable_parameters()[0]
        model.eval()
        start = time.perf_counter()
        scope = stage_scope(eval_scope, stage, len(tasks))
        scored = dict(zip(scope, evaluate_tasks(model, tokenizer, [tasks[i] for i in scope], **gen)))
        results.matrix.append([scored.get(i) for i in range(len(tasks))])
        if method == "asr":
            results.routing.append(evaluate_routing(model, tokenizer, tasks[: stage + 1], batch_size=eval_batch_size,
                                                  max_length=max_length, use_chat_template=use_chat_template,
                                                  truncation=truncation))
        eval_s = time.perf_counter() - start
        results.timings.append({"task": task.name, "train_s": round(train_s - router_s, 2),
                                "router_s": round(router_s, 4), "eval_s": round(eval_s, 2),
                                "steps": trainer.state.global_step})
        if on_stage_end is not None:
            on_stage_end(stage, model, results)
    if method == "asr":
        bank = Path(bank_dir) if bank_dir is not None else output_dir / "bank"
        model.save_pretrained(bank)

        write_results_to_card(bank, results.to_dict())
        results.info["bank"] = str(bank)
        results.info["bank_bytes"] = sum(f.stat().st_size for f in bank.iterdir() if f.is_file())
    results.info["model"] = getattr(model.get_base_model(), "name_or_path", None)
    results.model = model
    return results


def write_results_to_card(bank_dir, results: dict) -> None:
    """Append a stream run's scores (per task after the last stage, OP/BWT/FWT, routing accuracy) to a bank's card."""
    from huggingface_hub import ModelCard

    path = os.path.join(str(bank_dir), "README.md")
    card = ModelCard.load(path)
    tasks = results["tasks"]
    last = results["matrix"][-1] if results.get("matrix") else [None] * len(tasks)
    steps = {t["task"]: t.get("steps") for t in results.get("timings", [])}
    rows = "\n".join(f"| `{t}` | {steps.get(t, '-')} | {percent(s)} |" for t, s in zip(tasks, last))
    names = {"op": "OP (average score)", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting",
             "routing_accuracy": "routing accuracy"}
    summary = "\n".join(
        f"- {names.get(k, k)}: {percent(v, signed=k in ('bwt', 'fwt', 'forgetting'))}"
        for k, v in results.get("summary", {}).items()
    )
    card.text += f"""
## Evaluation (after the last task, greedy decoding, scores in %)

| task | training steps | score |
|---|---|---|
{rows}

{summary}
"""
    card.save(path)
