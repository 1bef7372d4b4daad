"""Evaluation of the continual-learning benchmark: answers, per-prompt scores, the answer cache of the ASR
subspaces, the general-prompt check, and the summary with its intervals.

Scoring. O-LoRA tasks are classification: an answer is correct when its normalised text (Unicode NFKC, case-folded,
surrounding whitespace, quotes and punctuation stripped, inner whitespace collapsed) *is* the gold label, or starts
with it followed by a space, and no longer label of the task matches it the same way (``"very negative"`` is not
``"negative"``). TRACE and demo tasks use their own scorer (``peft_asr.cl.scorers``), applied prompt by prompt (each
scorer is a mean over prompts, so the mean of the per-prompt scores is the task score).

Answer cache. Under Analytic Subspace Routing, an answer depends only on the prompt and the subspace that answers
it: a task's subspace is frozen once trained and the base weights never change. So every (prompt, route) pair is
generated once, with the route given per row (``generate(task_names=...)``, which is what a routed ``generate``
does after its own routing decision), and reused by every later stage, by the paper-router variant and by the
oracle; a row routed to the base model takes the base model's answer. The general-prompt check runs the routed
``generate`` itself, end to end.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Optional, Sequence

BASE = "__base__"
_EDGES = re.compile(r"^[\s\"'`.,;:!?()\[\]{}*_-]+|[\s\"'`.,;:!?()\[\]{}*_-]+$")


def normalise_label(text: str) -> str:
    """Case-folded NFKC text without surrounding whitespace, quotes or punctuation, inner whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_EDGES.sub("", text).split())


def label_word_scores(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> list[float]:
    """1.0 per prediction whose normalised text is its reference label or starts with it (then a space), the
    longest matching label winning; else 0.0."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; they must be aligned.")
    options = sorted({normalise_label(label) for label in labels}, key=len, reverse=True)
    missing = sorted({r for r in references if normalise_label(r) not in options})
    if missing:
        raise ValueError(f"references {missing[:5]} are not among the labels {list(labels)}.")
    out = []
    for pred, ref in zip(predictions, references):
        text = normalise_label(pred)
        match = next((o for o in options if text == o or text.startswith(o + " ")), None)
        out.append(float(match is not None and match == normalise_label(ref)))
    return out


def item_scores(task, answers: Sequence[str], labels: Optional[Sequence[str]] = None) -> list[float]:
    """Per-prompt scores of ``answers`` to ``task.eval`` (label word when ``labels``, else the task's scorer)."""
    refs = [row["answer"] for row in task.eval]
    if labels is not None:
        return label_word_scores(answers, refs, labels)
    from peft_asr.cl import get_scorer

    scorer = get_scorer(task.metric)
    return [float(scorer([a], [r], [row["prompt"]])) for a, r, row in zip(answers, refs, task.eval)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class Evaluator:
    """Greedy answers and per-prompt scores of a stream's tasks, with the benchmark's generation settings."""

    def __init__(self, tokenizer, tasks, labels, *, max_new_tokens: int, max_length: int, batch_size: int,
                 truncation: str) -> None:
        self.tokenizer, self.tasks, self.labels = tokenizer, tasks, labels
        self.gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
                        use_chat_template=False, progress=False, truncation=truncation, sort_by_length=True)

    def answers(self, model, prompts: Sequence[str], task_names=None, max_new_tokens: Optional[int] = None):
        from peft_asr.cl import generate_answers

        gen = dict(self.gen, max_new_tokens=max_new_tokens or self.gen["max_new_tokens"])
        model.eval()
        return generate_answers(model, self.tokenizer, list(prompts), task_names=task_names, **gen)

    def score(self, model, indices: Sequence[int]) -> dict[int, list[float]]:
        """Per-prompt scores of the tasks ``indices``, generated in one mixed, length-sorted pass."""
        prompts = [row["prompt"] for i in indices for row in self.tasks[i].eval]
        answers = self.answers(model, prompts)
        return self.split(indices, answers)

    def split(self, indices: Sequence[int], answers: Sequence[str]) -> dict[int, list[float]]:
        out, start = {}, 0
        for i in indices:
            n = len(self.tasks[i].eval)
            out[i] = item_scores(self.tasks[i], answers[start:start + n], self.labels[i])
            start += n
        return out

    def batches(self, prompts: Sequence[str]):
        from peft_asr.cl import prompt_batches

        return prompt_batches(self.tokenizer, list(prompts), batch_size=self.gen["batch_size"],
                              max_length=self.gen["max_length"], use_chat_template=False,
                              truncation=self.gen["truncation"])

    def routes(self, model, prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for batch in self.batches(prompts):
            device = next(model.parameters()).device
            out.extend(model.route(**{k: v.to(device) for k, v in batch.items()}))
        return out


class AnswerCache:
    """Answers of (task index, prompt index, route) under frozen ASR subspaces; routes to the base take
    ``base_answers``. ``fill`` generates the pairs it lacks on ``model`` (pinned per row), in one pass."""

    def __init__(self, base_answers: Sequence[Sequence[str]], saved: Optional[dict] = None) -> None:
        self.base = base_answers
        self.pairs: dict[str, str] = dict(saved or {})
        self.generated = 0

    def get(self, i: int, k: int, route: str) -> str:
        return self.base[i][k] if route == BASE else self.pairs[f"{i}:{k}:{route}"]

    def fill(self, model, evaluator: Evaluator, wanted: Sequence[tuple[int, int, str]]) -> None:
        todo = sorted({w for w in wanted if w[2] != BASE and f"{w[0]}:{w[1]}:{w[2]}" not in self.pairs})
        if not todo:
            return
        prompts = [evaluator.tasks[i].eval[k]["prompt"] for i, k, _ in todo]
        answers = evaluator.answers(model, prompts, task_names=[route for _, _, route in todo])
        for (i, k, route), answer in zip(todo, answers):
            self.pairs[f"{i}:{k}:{route}"] = answer
        self.generated += len(todo)

    def score(self, model, evaluator: Evaluator, routes: dict[int, list[str]]) -> dict[int, list[float]]:
        """Per-prompt scores of each task ``i`` of ``routes`` answered on the route of each of its prompts."""
        self.fill(model, evaluator, [(i, k, r) for i, rs in routes.items() for k, r in enumerate(rs)])
        return {i: item_scores(evaluator.tasks[i], [self.get(i, k, r) for k, r in enumerate(rs)], evaluator.labels[i])
                for i, rs in routes.items()}


def routing_record(evaluator: Evaluator, routes: dict[int, list[str]], seen: int) -> dict:
    """Labels (base route first), confusion (true x routed) and accuracy of the routes of tasks ``0..seen-1``."""
    from peft_asr.cl import routing_accuracy, routing_confusion

    names = [t.name for t in evaluator.tasks]
    true = [names[i] for i in range(seen) for _ in routes[i]]
    pred = [r for i in range(seen) for r in routes[i]]
    labels = [BASE] + names[:seen]
    return {"labels": labels, "confusion": routing_confusion(true, pred, labels),
            "accuracy": routing_accuracy(true, pred)}


# ---------------------------------------------------------------------------------------------------- general prompts
def general_split(n_fit: int, seed: int) -> tuple[list[str], list[str]]:
    """Everyday prompts (``peft_asr.demo.stream.general_prompts``): the first ``n_fit`` of its 70 distinct ones
    for the base route, the rest held out for the check."""
    from peft_asr.demo.stream import general_prompts

    prompts = general_prompts(70, seed=seed)
    return prompts[:n_fit], prompts[n_fit:]


def general_check(model, evaluator: Evaluator, prompts: Sequence[str], base_answers: Sequence[str],
                  routed: bool) -> dict:
    """Held-out everyday prompts: share routed to the base model (ASR), share answered exactly as the base model,
    and the mean token agreement with the base model's greedy answer."""
    from peft_asr.cl.metrics import token_agreement

    start = time.perf_counter()
    answers = evaluator.answers(model, prompts, max_new_tokens=16)
    tok = evaluator.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    ref = [tok(a, add_special_tokens=False)["input_ids"] for a in base_answers]
    out = {"prompts": len(prompts), "identical_to_base": mean([float(a == b) for a, b in zip(answers, base_answers)]),
           "token_agreement": mean([token_agreement(a, b) for a, b in zip(ids, ref)])}
    if routed:
        routes = evaluator.routes(model, prompts)
        out["routed_to_base"] = mean([float(r == BASE) for r in routes])
        to_base = [a == b for a, b, r in zip(answers, base_answers, routes) if r == BASE]
        out["base_routed_identical"] = mean([float(x) for x in to_base]) if to_base else None
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


# ---------------------------------------------------------------------------------------------------- summary
def summarise(record: dict, num_tasks: int, baseline: Sequence[float], seed: int) -> dict:
    """The matrix, the measured entries, OP/BWT/FWT/forgetting and the 95% bootstrap intervals of a finished
    sequential method (``record["stages"]``: per stage the per-prompt scores of the tasks evaluated)."""
    from peft_asr.cl.metrics import bootstrap_intervals, cl_summary

    matrix = [[None] * num_tasks for _ in range(num_tasks)]
    items = {}
    for stage in record["stages"]:
        for key, values in stage["items"].items():
            matrix[stage["stage"]][int(key)] = mean(values)
            items[(stage["stage"], int(key))] = values
    for t, i in record.get("derived", {}).get("entries", []):  # e.g. the oracle's diagonal: its final row
        matrix[t][i] = matrix[num_tasks - 1][i]
        items[(t, i)] = items[(num_tasks - 1, i)]
    summary = cl_summary(matrix, list(baseline))
    last = num_tasks - 1
    ci = bootstrap_intervals([items[(last, i)] for i in range(num_tasks)],
                             [items[(i, i)] for i in range(num_tasks)], seed=seed)
    summary["op_ci"], summary["bwt_ci"] = ci["op"], ci["bwt"]
    if record["stages"] and record["stages"][-1].get("routing"):
        summary["routing_accuracy"] = record["stages"][-1]["routing"]["accuracy"]
    measured = [[s["stage"], int(k)] for s in record["stages"] for k in s["items"]]
    return {"matrix": matrix, "measured": measured, "summary": summary}
