"""The per-task step budget of the continual-learning benchmark, read off a score-vs-steps curve.

One PEFT LoRA per task (the settings every LoRA of ``cl_benchmark.py`` uses: rank, alpha, targets, batch, learning
rate, constant schedule, no warmup) is trained for ``max(--steps-list)`` steps on each of three tasks, one per kind
of the benchmark's streams: a sentiment task (O-LoRA amazon), an NLI task (O-LoRA MNLI) and a TRACE task (FOMC). At
every step count of ``--steps-list`` it is scored on the task's test prompts, exactly as the benchmark scores them
(up to 200 prompts, full length, label-word or TRACE scoring, 95% bootstrap interval). With a constant learning
rate, the model after ``s`` steps of a longer run is the model of an ``s``-step run (same data order), so one run per
task gives its whole curve.

The rule: a task's curve flattens at the smallest step count whose score is within ``--tolerance`` (1 point) of the
task's best score on the curve; the budget is the largest flattening point over the tasks, capped at ``--cap``
(200 steps: the CPU grid cannot afford more; the output says when the cap was applied). ``cl_benchmark.py --steps
auto`` reads it from ``cl_convergence.json``.

Resumable: a Trainer checkpoint every ``gcd(--steps-list)`` steps and every scored point saved as it is measured, so a
killed run resumes at its last checkpoint; ``--budget-minutes`` stops after a checkpoint (exit status 75).

    python benchmarks/cl_convergence.py                              # writes benchmarks/results/cl_convergence.json
    python benchmarks/cl_convergence.py --steps-list 2 4 --eval-per-task 4 --out-dir /tmp/conv --no-markdown
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from functools import reduce
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cl_benchmark import STOPPED, Deadline, recorded_argv, save_json  # noqa: E402
from cl_eval import Evaluator, mean  # noqa: E402
from cl_methods import answer_loss_trainer, lora_config, stop_callback, train_rows  # noqa: E402
from cl_report import report  # noqa: E402
from cl_streams import SHARED, context_length, load_model, settings_diff, training_args  # noqa: E402
from common import REPO, RESULTS_DIR, versions  # noqa: E402

DEFAULT_TASKS = ("olora:amazon", "olora:MNLI", "trace:FOMC")
KEYS = ("model", "dtype", "tasks", "steps_list", "batch_size", "train_per_task", "lr", "rank", "alpha", "targets",
        "eval_per_task", "max_length", "train_max_length", "truncation", "max_new_tokens", "seed")


def choose_budget(curves: dict, tolerance: float, cap: int) -> tuple[int, dict, str]:
    """``(budget, flattening point per task, note)``: per task the smallest step count scoring at least its best
    minus ``tolerance``; the budget is their maximum, at most ``cap``."""
    points = {}
    for task, curve in curves.items():
        best = max(curve["scores"])
        points[task] = min(s for s, v in zip(curve["steps"], curve["scores"]) if v >= best - tolerance - 1e-12)
    wanted = max(points.values())
    note = f"the curves ask for {wanted} steps; capped at {cap}" if wanted > cap else ""
    return min(wanted, cap), points, note


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="kind:name, kind olora or trace")
    p.add_argument("--steps-list", nargs="+", type=int, default=[25, 50, 100, 150, 200])
    p.add_argument("--tolerance", type=float, default=0.01, help="score (0-1) within which a curve counts as flat")
    p.add_argument("--cap", type=int, default=200)
    p.add_argument("--train-per-task", type=int, default=None, help="default: max steps x batch size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--eval-per-task", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None, help="default: the model's context")
    p.add_argument("--train-max-length", type=int, default=128)
    p.add_argument("--truncation", choices=["middle", "left"], default="middle")
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "cl_convergence"))
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument("--replace", action="store_true", help="start afresh when the saved curve has other settings")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.steps_list = sorted(set(args.steps_list))
    if args.steps_list[0] < 1 or args.cap < 1 or args.eval_per_task < 1:
        p.error("--steps-list, --cap and --eval-per-task must be >= 1")
    for spec in args.tasks:
        if spec.count(":") != 1 or spec.split(":")[0] not in ("olora", "trace"):
            p.error(f"--tasks takes kind:name with kind olora or trace, got {spec!r}")
    args.steps = args.steps_list[-1]  # what training_args reads
    if args.train_per_task is None:
        args.train_per_task = args.steps * args.batch_size
    return args


def load_task(spec: str, args):
    from peft_asr.cl import load_olora_task, load_trace_task

    kind, name = spec.split(":")
    root = SHARED / kind
    loader = load_olora_task if kind == "olora" else load_trace_task
    task = loader(root, name, max_train=args.train_per_task, max_eval=args.eval_per_task, seed=args.seed)
    labels = json.loads((root / name / "labels.json").read_text()) if kind == "olora" else None
    return task, labels


def run_curve(task, labels, model, tokenizer, args, curve: dict, save, deadline: Deadline) -> bool:
    """Train one LoRA on ``task`` and score it at each step count of ``args.steps_list`` not yet in ``curve``."""
    from peft import get_peft_model
    from transformers import TrainerCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from peft_asr.cl import PromptAnswerCollator
    from peft_asr.cl.metrics import bootstrap_intervals

    evaluator = Evaluator(tokenizer, [task], [labels], max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                          batch_size=args.eval_batch_size, truncation=args.truncation)
    every = reduce(math.gcd, args.steps_list)
    out = Path(args.work_dir) / task.name
    eval_here = [0.0]  # seconds of scoring inside this call's training
    # the training seconds and steps up to the last checkpoint (a killed run's later steps are trained again)
    timed_s, timed_steps, first_step = curve.get("train_s", 0.0), curve.get("timed_steps", 0), [None]

    def record_time(step: int) -> None:
        curve["train_s"] = round(timed_s + time.perf_counter() - start - eval_here[0], 1)
        curve["timed_steps"] = timed_steps + step - first_step[0]

    class Score(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            step = state.global_step
            if first_step[0] is None:
                first_step[0] = step - 1  # where this call's training started (a checkpoint when resumed)
            if step in args.steps_list and step not in curve["steps"]:
                start = time.perf_counter()
                items = evaluator.score(model, [0])[0]
                model.train()
                low, high = bootstrap_intervals([items], seed=args.seed)["op"]
                for key, value in (("steps", step), ("scores", mean(items)), ("low", low), ("high", high)):
                    curve[key].append(value)
                curve["items"][str(step)] = items
                curve["eval_s"][str(step)] = round(time.perf_counter() - start, 1)
                eval_here[0] += time.perf_counter() - start
                save()
                print(f"  [{task.name}] step {step}: {100 * mean(items):.1f} [{100 * low:.1f}, {100 * high:.1f}]",
                      flush=True)

        def on_save(self, targs, state, control, **kwargs):
            record_time(state.global_step)
            save()

    set_seed(args.seed)
    peft_model = get_peft_model(model, lora_config(args))
    settings = {**training_args(args), "save_strategy": "steps", "save_steps": every, "save_total_limit": 1}
    stop = stop_callback(deadline)
    trainer = answer_loss_trainer()(
        model=peft_model, args=TrainingArguments(output_dir=str(out), **settings),
        train_dataset=train_rows(SimpleNamespace(args=args, tokenizer=tokenizer), task.train),
        data_collator=PromptAnswerCollator(tokenizer.pad_token_id), callbacks=[Score(), stop])
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=get_last_checkpoint(str(out)) if out.is_dir() else None)
    finally:
        peft_model.unload()
    if first_step[0] is not None:
        record_time(trainer.state.global_step)
    if stop.stopped and trainer.state.global_step < args.steps:
        return False
    shutil.rmtree(out, ignore_errors=True)
    curve["complete"] = True
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [load_task(spec, args) for spec in args.tasks]  # bad names fail here, before the model loads
    model, tokenizer = load_model(args)
    if args.max_length is None:
        args.max_length = context_length(model, args.max_new_tokens)
    settings = {k: getattr(args, k) for k in KEYS}
    path = out_dir / "cl_convergence.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if data and data.get("settings") != settings:
        if not args.replace:
            raise SystemExit(f"{path} holds a curve measured with other settings "
                             f"({'; '.join(settings_diff(data.get('settings', {}), settings))}); pass --replace to "
                             "measure it afresh, or --out-dir for a separate folder.")
        data = {}
        shutil.rmtree(args.work_dir, ignore_errors=True)
    command = "python benchmarks/cl_convergence.py " + recorded_argv(sys.argv[1:] if argv is None else argv)
    data.update(settings=settings, steps=args.steps_list, versions=versions(args.device), command=command,
                rule=f"a task's curve flattens at the smallest step count within {100 * args.tolerance:g} point(s) "
                     f"of its best score; the budget is the largest of these over the tasks, at most {args.cap}.")
    data.setdefault("curves", {})
    data.setdefault("chosen", None)
    save = lambda: save_json(path, data)  # noqa: E731
    deadline = Deadline(args.budget_minutes)
    for (task, labels), spec in zip(tasks, args.tasks):
        curve = data["curves"].setdefault(task.name, {"source": spec, "steps": [], "scores": [], "low": [],
                                                      "high": [], "items": {}, "eval_s": {}})
        if curve.get("complete"):
            print(f"  [{task.name}] curve already measured (resume)")
            continue
        if not deadline.allows() or not run_curve(task, labels, model, tokenizer, args, curve, save, deadline):
            save()
            print(f"budget of {args.budget_minutes} minutes spent; run the same command again to continue.")
            return STOPPED
        deadline.longest = max(deadline.longest, curve.get("train_s", 0.0) + sum(curve["eval_s"].values()))
    chosen, points, note = choose_budget(data["curves"], args.tolerance, args.cap)
    for task, point in points.items():
        data["curves"][task]["flattens_at"] = point
    data.update(chosen=chosen, note=note)
    save()
    print(f"chosen budget: {chosen} steps per task ({data['rule']}{'; ' + note if note else ''})")
    report(out_dir, args.no_markdown, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
