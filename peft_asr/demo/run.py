"""``peft-asr demo``: continual learning on a real small LLM, offline, next to the usual forgetting baseline.

Steps: load the embedded SmolLM2-135M-Instruct (or ``--model``); score the base model on the built-in stream
(``peft_asr.demo.stream``); train the stream with Analytic Subspace Routing (``Trainer`` + ``ASRCallback``) and with a
plain sequential LoRA (same rank, targets and steps); check that everyday prompts are routed to the untouched base
model; print the tables and write ``results.json``, two PNG plots and the saved bank into the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from ..tuner.config import BASE_ROUTE, ASRConfig
from ..cl.metrics import percent
from ..cl.runner import StreamResults, generate_answers, run_stream
from ..cl.tokenization import prompt_batches
from .stream import demo_stream, general_prompts

__all__ = ["run_demo", "format_tables"]

SETTINGS = {
    # n_train / batch 8 = optimizer steps per task; chosen so the default run stays under 15 minutes on 2 cores
    "default": dict(n_train=320, n_eval=40, n_general=60, learning_rate=3e-3, max_new_tokens=16,
                    tasks=("reverse", "shout", "initials", "echo")),
    # three tasks (the same-instruction pair kept), 10 steps each: under 3 minutes on 2 cores
    "quick": dict(n_train=80, n_eval=10, n_general=24, learning_rate=5e-3, max_new_tokens=12,
                  tasks=("reverse", "shout", "echo")),
}


def _general_check(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """Where held-out everyday prompts are routed, and whether the base-routed ones answer exactly as the base."""
    routes: list[str] = []
    for batch in prompt_batches(tokenizer, prompts, batch_size=32, use_chat_template=False):
        routes.extend(model.route(**batch))
    to_base = [p for p, r in zip(prompts, routes) if r == BASE_ROUTE]
    identical = None
    if to_base:
        gen = dict(max_new_tokens=max_new_tokens, use_chat_template=False)
        routed = generate_answers(model, tokenizer, to_base, **gen)
        with model.disable_adapter():
            plain = generate_answers(model, tokenizer, to_base, **gen)
        identical = sum(a == b for a, b in zip(routed, plain)) / len(to_base)
    return {"prompts": len(prompts), "routed_to_base": len(to_base) / len(prompts), "identical_to_base": identical,
            "routes": dict(zip(prompts, routes))}


def format_tables(results: dict[str, StreamResults], general: Optional[dict] = None) -> str:
    """The terminal report: accuracy matrices, CL metrics, routing accuracy and confusion, time per stage."""
    lines: list[str] = []
    for name, res in results.items():
        tasks = res.tasks
        width = max(8, max(len(t) for t in tasks) + 1)
        lines.append(f"\n== {name}: accuracy matrix R[t][i] (%), row = after training task t ==")
        lines.append(" " * (width + 6) + "".join(f"{t:>{width}}" for t in tasks))
        if res.baseline is not None:
            lines.append(f"{'base model':<{width + 6}}" + "".join(f"{percent(v, width=5):>{width}}" for v in res.baseline))
        for t, row in enumerate(res.matrix):
            lines.append(f"after {tasks[t]:<{width}}" + "".join(f"{percent(v, width=5):>{width}}" for v in row))
        s = res.summary
        lines.append(f"OP {percent(s.get('op'), width=5)}   BWT {percent(s.get('bwt'), True, width=5)}   FWT {percent(s.get('fwt'), True, width=5)}   "
                     f"forgetting {percent(s.get('forgetting'), True, width=5)}")
        if res.routing:
            lines.append("routing accuracy per stage (%): " + "  ".join(percent(r["accuracy"], width=5).strip() for r in res.routing))
            last = res.routing[-1]
            lines.append("routing confusion after the last task (rows: true task, columns: routed to):")
            labels = last["labels"]
            w = max(len(x) for x in labels) + 2
            lines.append(" " * w + "".join(f"{x:>{w}}" for x in labels))
            for label, row in zip(labels, last["confusion"]):
                if label == BASE_ROUTE and sum(row) == 0:
                    continue
                lines.append(f"{label:<{w}}" + "".join(f"{c:>{w}}" for c in row))
        lines.append("time per stage (s): " + "; ".join(
            f"{t['task']}: train {t['train_s']:.0f}, router {t['router_s']:.1f}, eval {t['eval_s']:.0f}"
            for t in res.timings))
    if general:
        identical = general["identical_to_base"]
        lines.append(
            f"\n== general prompts (held out) ==\nrouted to the base model: {percent(general['routed_to_base'], width=5).strip()}% "
            f"of {general['prompts']}; answers identical to the base model: "
            f"{'-' if identical is None else percent(identical, width=5).strip() + '%'}")
    return "\n".join(lines)


def run_demo(output_dir: str = "asr-demo", *, quick: bool = False, model: Optional[str] = None, seed: int = 0,
             progress: bool = True, overrides: Optional[dict] = None) -> dict:
    """Run the demo and write its outputs into ``output_dir``; returns the content of ``results.json``.

    ``overrides`` replaces entries of the chosen ``SETTINGS`` (``n_train``, ``n_eval``, ``n_general``,
    ``learning_rate``, ``max_new_tokens``, ``tasks``), e.g. for a smoke test. Prompts are fed raw, without the chat
    template: it would triple the sequence length (SmolLM2's template adds a ~30-token system prompt) and the run
    would not fit its time budget.
    """
    from ..cl.default_model import load_model_and_tokenizer
    from ..cl.plots import plot_accuracy_matrices, plot_routing_confusion

    started = time.perf_counter()
    settings = {**SETTINGS["quick" if quick else "default"], **(overrides or {})}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = demo_stream(n_train=settings["n_train"], n_eval=settings["n_eval"], seed=seed, tasks=tuple(settings["tasks"]))
    max_new_tokens = settings["max_new_tokens"]
    general = general_prompts(settings["n_general"], seed=seed)
    general_fit, general_held = general[: len(general) // 2], general[len(general) // 2:]
    training = {"per_device_train_batch_size": 8, "learning_rate": settings["learning_rate"], "seed": seed,
                "disable_tqdm": not progress}
    config = ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], router_layer=4)
    common = dict(max_new_tokens=max_new_tokens, progress=progress, use_chat_template=False)

    base, tokenizer = load_model_and_tokenizer(model)
    torch.manual_seed(seed)
    asr = run_stream(base, tasks, training, tokenizer=tokenizer, method="asr", asr_config=config,
                     general_prompts=general_fit, output_dir=out / "runs", bank_dir=out / "bank", **common)
    general_report = _general_check(asr.model, tokenizer, general_held, max_new_tokens)

    base, _ = load_model_and_tokenizer(model)
    torch.manual_seed(seed)
    seq = run_stream(base, tasks, training, tokenizer=tokenizer, method="seqlora", asr_config=config,
                     baseline=asr.baseline, output_dir=out / "runs", **common)

    results = {"asr": asr, "seqlora": seq}
    plots = {
        "accuracy_matrices": plot_accuracy_matrices(results, out / "accuracy_matrices.png"),
        "routing_confusion": plot_routing_confusion(asr.routing[-1]["labels"], asr.routing[-1]["confusion"],
                                                    out / "routing_confusion.png",
                                                    title="ASR routing after the last task"),
    }
    report = {
        "asr": asr.to_dict(),
        "seqlora": seq.to_dict(),
        "general": general_report,
        "settings": {**settings, "quick": quick, "model": model or "SmolLM2-135M-Instruct (embedded)", "seed": seed,
                     "router_layer": config.router_layer, "r": config.r, "lora_alpha": config.lora_alpha,
                     "target_modules": sorted(config.target_modules), "tasks": [t.name for t in tasks]},
        "plots": plots,
        "bank": str(out / "bank"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(format_tables(results, general_report))
    print(f"\nwall time {report['wall_s']:.0f} s; wrote {out / 'results.json'}, {plots['accuracy_matrices']}, "
          f"{plots['routing_confusion']} and the bank {out / 'bank'}")
    return report
