"""The streams of the continual-learning benchmark, their data, and the settings every method shares.

Streams (data from ../shared/data and the package's demo stream; a stream whose data is absent is skipped with its
reason):

* ``olora-standard``  O-LoRA's standard order 1 (``scripts/order_1.sh``) as this data allows: dbpedia -> amazon ->
                      yelp -> agnews. Upstream's third task is yahoo; ../shared/data/olora has no yahoo (its upstream
                      snapshot ships only yahoo's labels), so yelp takes its place (shared/data/olora/README.md).
* ``olora-long14``    O-LoRA's long order (``scripts/long.sh``, 15 tasks) without yahoo, for the same reason: yelp ->
                      amazon -> MNLI -> CB -> COPA -> QQP -> RTE -> IMDB -> SST-2 -> dbpedia -> agnews -> MultiRC ->
                      BoolQA -> WiC.
* ``trace``           TRACE order 1 restricted to the tasks a 2-core CPU can run: C-STANCE -> FOMC -> ScienceQA ->
                      NumGLUE-cm -> NumGLUE-ds (MeetingBank has no train split here; Py150, 20Minuten and MeetingBank
                      need 100-token answers or multi-thousand-token prompts). Scored with TRACE's metrics
                      (ScienceQA: the answer letter; the model is trained on the letter only).
* ``demo``            the package's built-in stream (``peft_asr.demo.stream.demo_stream``): reverse -> shout ->
                      initials -> echo, exact match.
* ``olora-long8``     the first 8 tasks of the long order (the 0.1 benchmark's stream; not run by default).

O-LoRA tasks are classification: an answer is scored on its normalised label word (``cl_eval.label_word_scores``),
TRACE and demo tasks with their own metric.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
OLORA_LONG = ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "MultiRC",
              "BoolQA", "WiC"]


@dataclass(frozen=True)
class Stream:
    kind: str  # "olora", "trace" or "demo"
    tasks: tuple[str, ...]
    about: str
    max_new_tokens: int  # enough for every answer of the stream (O-LoRA labels <= 4 tokens, demo answers <= 14)


STREAMS = {
    "olora-standard": Stream("olora", ("dbpedia", "amazon", "yelp", "agnews"),
                             "O-LoRA standard order 1, yelp for the absent yahoo", 5),
    "trace": Stream("trace", ("C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds"),
                    "TRACE order 1, the tasks a CPU can run", 5),
    "demo": Stream("demo", ("reverse", "shout", "initials", "echo"), "peft_asr.demo.stream", 16),
    "olora-long14": Stream("olora", tuple(OLORA_LONG), "O-LoRA long order, yahoo skipped (absent from the data)", 5),
    "olora-long8": Stream("olora", tuple(OLORA_LONG[:8]), "first 8 tasks of the O-LoRA long order (0.1's stream)", 5),
}
DEFAULT_STREAMS = ("olora-standard", "trace", "demo", "olora-long14")


def load_stream(name: str, train_per_task: int, eval_per_task: int, seed: int):
    """``(tasks, labels, why)``: the stream's tasks, each task's label set (O-LoRA) or None, and why it cannot run
    (None when it can)."""
    from peft_asr.cl import Task, load_olora_task, load_trace_task

    stream = STREAMS[name]
    if stream.kind == "demo":
        from peft_asr.demo.stream import demo_stream

        tasks = demo_stream(n_train=train_per_task, n_eval=eval_per_task, seed=seed, tasks=stream.tasks)
        return tasks, [None] * len(tasks), None
    root = SHARED / stream.kind
    if not root.is_dir():
        return None, None, f"{root} is absent"
    tasks, labels = [], []
    for task_name in stream.tasks:
        if stream.kind == "olora":
            tasks.append(load_olora_task(root, task_name, max_train=train_per_task, max_eval=eval_per_task, seed=seed))
            labels.append(json.loads((root / task_name / "labels.json").read_text()))
            continue
        task = load_trace_task(root, task_name, max_train=train_per_task, max_eval=eval_per_task, seed=seed)
        if task_name == "ScienceQA":  # TRACE scores the answer letter; train on the letter, not the explanation
            train = [{"prompt": r["prompt"], "answer": r["answer"].strip().split("\n")[0].strip()} for r in task.train]
            task = Task(name=task.name, train=train, eval=task.eval, metric=task.metric,
                        description=task.description + " (trained on the answer letter)")
        tasks.append(task)
        labels.append(None)
    return tasks, labels, None


# ---------------------------------------------------------------------------------------------------- settings
RESULT_KEYS = ("model", "dtype", "steps", "batch_size", "train_per_task", "lr", "rank", "alpha", "targets",
               "router_layer", "eval_per_task", "eval_scope", "max_length", "train_max_length", "truncation",
               "max_new_tokens", "olora_lambda1", "olora_lambda2", "replay_fraction", "general_fit", "seed")


def settings_of(args, stream: Optional[str] = None) -> dict:
    """Everything a result depends on (the device, threads and batch size of evaluation do not change answers
    beyond float rounding, and are kept in ``versions``)."""
    out = {k: getattr(args, k) for k in RESULT_KEYS}
    out["targets"] = list(out["targets"])
    if stream is not None and out["max_new_tokens"] is None:
        out["max_new_tokens"] = STREAMS[stream].max_new_tokens
    out["scoring"] = "label word (normalised)" if stream and STREAMS[stream].kind == "olora" else "task metric"
    return out


def settings_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def context_length(model, max_new_tokens: int) -> int:
    """The longest prompt the model can read and still write ``max_new_tokens`` (its position limit)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return int(limit) - max_new_tokens


def training_args(args, steps: Optional[int] = None) -> dict:
    """The Trainer settings every method uses (constant learning rate, no warmup, no checkpoints unless asked)."""
    out = dict(per_device_train_batch_size=args.batch_size, learning_rate=args.lr, max_steps=steps or args.steps,
               seed=args.seed, use_cpu=args.device == "cpu", disable_tqdm=True, lr_scheduler_type="constant",
               warmup_steps=0, weight_decay=0.0, logging_strategy="no", save_strategy="no", report_to=[])
    if args.dtype == "bfloat16" and args.device != "cpu":
        out["bf16"] = True
    return out


def load_model(args):
    import torch

    from peft_asr.cl.default_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(args.device), tokenizer
