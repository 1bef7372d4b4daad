"""Tables and figures of the continual-learning benchmark: the RESULTS.md block, the figures of docs/benchmarks.md.

Every stream section names the settings its numbers were measured with (a stream JSON holds one set of settings:
``cl_benchmark.py`` refuses to add results of other settings to it), so tables of different budgets are never
mixed without saying so. Results of the 0.1 benchmark (no per-prompt scores) are shown as they were, without
intervals, and labelled.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

from cl_gaps import gaps_markdown
from cl_streams import DEFAULT_STREAMS, STREAMS
from common import REPO, RESULTS_DIR, RESULTS_MD, write_block

METHOD_ORDER = ("asr", "asr-paper", "oracle", "seqlora", "replay", "olora", "multitask")
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
DOCS_IMG = REPO / "docs" / "img"


LEGACY = "-0.1"  # a stream's 0.1 results, once the new benchmark runs it: cl_<stream>-0.1.json


def is_legacy(data: dict) -> bool:
    """Results of the 0.1 benchmark: no method has per-stage records (nor per-prompt scores)."""
    return bool(data.get("methods")) and not any("stages" in m for m in data["methods"].values())


def legacy_path(path: Path) -> Path:
    return path.with_name(path.stem + LEGACY + path.suffix)


def about_of(key: str) -> str:
    return STREAMS[key.removesuffix(LEGACY)].about


def pct(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def with_ci(value, ci, signed: bool = False) -> str:
    if value is None:
        return "-"
    if not ci or ci[0] is None:
        return pct(value, signed)
    return f"{pct(value, signed)} [{pct(ci[0], signed)}, {pct(ci[1], signed)}]"


def final_row(rec: dict) -> list:
    return rec["final"] if rec.get("final") is not None else rec["matrix"][-1]


def stage_times(rec: dict) -> list[dict]:
    return rec.get("stages") or rec.get("timings") or []


def wall_s(rec: dict):
    return rec["wall_s"] if "wall_s" in rec else rec.get("info", {}).get("wall_s")


def size_mb(rec: dict) -> str:
    size = rec.get("bank_bytes") or rec.get("adapter_bytes") or rec.get("info", {}).get("bank_bytes")
    return f"{size / 1e6:.1f}" if size else "-"


def last_routing(rec: dict) -> Optional[dict]:
    if rec.get("stages"):
        return rec["stages"][-1].get("routing")
    return (rec.get("routing") or [None])[-1]


def settings_line(s: dict, legacy: bool) -> str:
    train = s.get("train_max_length")
    line = (f"{s['steps']} steps x batch {s['batch_size']} per task ({s['train_per_task']} training rows at most), "
            f"lr {s['lr']}, LoRA r {s['rank']} / alpha {s['alpha']} on {', '.join(s['targets'])}, router layer "
            f"{s['router_layer']}; {s['eval_per_task']} test prompts per task at most (the whole split where "
            f"smaller), greedy, {s['max_new_tokens']} new tokens, prompts up to {s['max_length']} tokens "
            f"({s.get('truncation', 'left')} truncation{f'; training rows up to {train} tokens' if train else ''}); "
            f"scoring: {s.get('scoring', 'exact match')}; eval scope {s['eval_scope']}; seed {s['seed']}; model "
            f"{s['model'] or 'SmolLM2-135M-Instruct (embedded)'}, {s['dtype']}.")
    return ("**0.1 benchmark (legacy budget, no intervals):** " if legacy else "Settings: ") + line


def measured_line(data: dict) -> str:
    what = {"diagonal+final": "`R[t][t]` after each stage t and every task after the last stage (FWT and "
                              "forgetting need entries that are not measured: `-`)",
            "seen+next": "tasks 0..t+1 after stage t", "all": "every task after every stage"}
    line = f"Measured entries of the accuracy matrix: {what[data['settings']['eval_scope']]}."
    derived = data["methods"].get("oracle", {}).get("derived")
    if derived:
        why = re.sub(r"(R\[[^\]]+\]\[[^\]]+\])", r"`\1`", derived["why"])  # R[i][i] is no link in markdown
        line += f" `oracle`: the last row only; its diagonal is derived ({why}, so its BWT is 0)."
    return line


def stream_markdown(name: str, data: dict, about: str = "") -> str:
    tasks, methods = data["tasks"], data["methods"]
    legacy = is_legacy(data)
    heading = f"{name.removesuffix(LEGACY)}{' (0.1 benchmark)' if legacy else ''}"
    lines = [f"### {heading}: {' -> '.join(tasks)}" + (f" ({about})" if about else ""), "",
             settings_line(data["settings"], legacy)]
    lines += ["", measured_line(data)] if not legacy else []
    lines += ["", "| method | OP [95% CI] | BWT [95% CI] | FWT | forgetting | routing | trainable params | "
                  "bank / adapter (MB) | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for method in METHOD_ORDER:
        if method not in methods:
            continue
        m = methods[method]
        s = m.get("summary", {})
        done = "" if m.get("complete", True) else f" (stopped after {len(m.get('stages', []))} stages)"
        lines.append(f"| {method}{done} | {with_ci(s.get('op'), s.get('op_ci'))} | "
                     f"{with_ci(s.get('bwt'), s.get('bwt_ci'), True)} | {pct(s.get('fwt'), True)} | "
                     f"{pct(s.get('forgetting'))} | {pct(s.get('routing_accuracy'))} | "
                     f"{m.get('trainable_params') or '-'} | {size_mb(m)} | {wall_s(m) or '-'} |")
    lines += ["", "Final score per task (%, after the last stage; base = the model before any training):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    if data.get("baseline"):
        lines.append("| base | " + " | ".join(pct(v) for v in data["baseline"]) + " |")
    for method in METHOD_ORDER:
        m = methods.get(method)
        if m and (m.get("final") is not None or m.get("matrix")):
            lines.append(f"| {method} | " + " | ".join(pct(v) for v in final_row(m)) + " |")
    timed = [(k, stage_times(methods[k])) for k in METHOD_ORDER if k in methods and stage_times(methods[k])]
    if timed:
        lines += ["", "Time per stage (s: train + router fit + evaluation):", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for method, stages in timed:
            cells = ["-"] * len(tasks)
            for k, t in enumerate(stages):
                index = tasks.index(t["task"]) if t.get("task") in tasks else k
                cells[index] = f"{t.get('train_s', 0):.0f} + {t.get('router_s', 0):.0f} + {t.get('eval_s', 0):.0f}"
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    general = [(k, methods[k]["general"]) for k in METHOD_ORDER if k in methods and methods[k].get("general")]
    if general:
        lines += ["", f"General ability: {general[0][1]['prompts']} held-out everyday prompts "
                      "(`peft_asr.demo.stream.general_prompts`, not those fitted to the base route), 16 new tokens:", "",
                  "| method | routed to the base model | answers identical to the base model's | "
                  "token agreement with the base model |", "|---|---|---|---|"]
        for method, g in general:
            lines.append(f"| {method} | {pct(g.get('routed_to_base'))} | {pct(g['identical_to_base'])} | "
                         f"{pct(g['token_agreement'])} |")
    routing = last_routing(methods.get("asr", {}))
    if routing:
        labels = routing["labels"]
        lines += ["", "ASR routing confusion after the last stage (rows: true task, columns: routed to):", "",
                  "| true \\ routed | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for label, row in zip(labels, routing["confusion"]):
            if sum(row) or label != "__base__":
                lines.append(f"| {label} | " + " | ".join(str(c) for c in row) + " |")
    gaps = gaps_markdown(data, data["settings"].get("seed", 0))
    if gaps:
        lines += ["", gaps]
    if data.get("commands"):
        lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in data["commands"]) + "."]
    return "\n".join(lines)


def convergence_markdown(conv: dict) -> str:
    s = conv["settings"]
    lines = ["### Budget: score against steps (`benchmarks/cl_convergence.py`)", "",
             f"One PEFT LoRA per task (r {s['rank']} / alpha {s['alpha']} on {', '.join(s['targets'])}, batch "
             f"{s['batch_size']}, lr {s['lr']}, constant schedule), scored on {s['eval_per_task']} test prompts at "
             "most at each step count (%, 95% bootstrap interval in brackets):", "",
             "| task | " + " | ".join(str(k) for k in conv["steps"]) + " | flattens at | s / training step |",
             "|---|" + "---|" * (len(conv["steps"]) + 2)]
    for task, curve in conv["curves"].items():
        cells = [with_ci(v, [lo, hi]) for v, lo, hi in zip(curve["scores"], curve["low"], curve["high"])]
        cells += ["-"] * (len(conv["steps"]) - len(cells))
        timed = curve.get("timed_steps")  # absent from runs before the time was kept per checkpoint
        step_s = f"{curve['train_s'] / timed:.1f} ({timed} steps timed)" if timed else "-"
        lines.append(f"| {task} ({curve['source']}) | " + " | ".join(cells)
                     + f" | {curve.get('flattens_at', '-')} | {step_s} |")
    if conv.get("chosen") is not None:
        lines += ["", f"Rule: {conv['rule']} **Chosen budget: {conv['chosen']} steps per task**"
                      + (f" ({conv['note']})" if conv.get("note") else "") + "; every method trains that many steps "
                      "per task, multi-task LoRA the same total."]
    else:
        lines += ["", f"Rule: {conv['rule']} (the curve is not finished: no budget chosen yet)."]
    return "\n".join(lines + ["", f"Command: `{conv['command']}`."])


def op_groups(all_data: dict) -> dict:
    """``{stream: {method: (op, low, high)}}`` of the finished methods whose OP has an interval."""
    groups = {}
    for name, data in all_data.items():
        bars = {}
        for method in METHOD_ORDER:
            m = data["methods"].get(method, {})
            s = m.get("summary", {})
            # only results with an interval: the 0.1 benchmark's (another budget, no per-prompt scores) are left out
            if s.get("op") is not None and s.get("op_ci") and m.get("complete", True):
                bars[method] = (s["op"], s["op_ci"][0], s["op_ci"][1])
        if bars:
            groups[name] = bars
    return groups


def plot_all(all_data: dict, img_dir: Path, conv: Optional[dict] = None) -> list[tuple[str, Path]]:
    """The figures that the data allow, into ``img_dir``; returns ``(caption, path)`` pairs."""
    try:
        from peft_asr.cl import plots
    except ImportError:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    out = []
    curves = {t: c for t, c in (conv or {}).get("curves", {}).items() if c["steps"]}
    if curves:
        path = img_dir / "cl_convergence.png"
        plots.plot_score_curves(curves, path, chosen=conv.get("chosen"), title="single-task LoRA: score against steps")
        out.append(("Score against training steps of one LoRA per task, and the budget chosen from it", path))
    groups = op_groups(all_data)
    if groups:
        path = img_dir / "cl_op_by_method.png"
        plots.plot_op_by_method(groups, path, title="OP per method (95% bootstrap interval over test prompts)")
        out.append(("OP per stream and method", path))
    for name, data in all_data.items():
        legacy = is_legacy(data)
        label = f"{name.removesuffix(LEGACY)} (0.1 benchmark, its budget)" if legacy else name  # labelled as such
        panels = {m: data["methods"][m] for m in METHOD_ORDER[:-1] if data["methods"].get(m, {}).get("matrix")}
        if panels:
            path = img_dir / f"cl_{name}_matrices.png"
            plots.plot_accuracy_matrices(panels, path)
            out.append((f"{label}: accuracy matrices (blank: not measured)", path))
        routing = last_routing(data["methods"].get("asr", {}))
        if routing:
            path = img_dir / f"cl_{name}_routing.png"
            plots.plot_routing_confusion(routing["labels"], routing["confusion"], path,
                                         title=f"{label}: ASR routing after the last task")
            out.append((f"{label}: ASR routing confusion after the last task", path))
    return out


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def write_markdown(all_data: dict, results_md: Path, conv: Optional[dict] = None, figures=(), abouts=None) -> None:
    """The ``cl_benchmark`` block of ``results_md``: the convergence curve, then every stream."""
    body = ["## Continual-learning benchmark (`benchmarks/cl_benchmark.py`)", "",
            "OP: mean final score; BWT: mean (final - just after training); FWT: mean (score just before training - "
            "base model); forgetting: mean drop from the best earlier score (docs/metrics.md). Intervals: 95% "
            "percentile bootstrap over each task's test prompts (2,000 resamples, paired across stages). `oracle` "
            "uses ASR's own subspaces with the true task id, so `oracle - asr` is what routing costs; `asr-paper` the "
            "same subspaces with the paper's router. `multitask` trains on all tasks at once (not continual). Once "
            "`asr` and `oracle` have finished, a stream's section states its results against the goals and splits "
            "every gap of ASR to the oracle by where its misrouted prompts went (`benchmarks/cl_gaps.py`).", "",
            "The whole grid, resumable: `python benchmarks/cl_grid.py --budget-minutes 120` (run again to continue; "
            "each section below says which of its methods have finished).", ""]
    if figures:
        body += ["Figures: " + ", ".join(f"[{caption}]({_rel(path, results_md.parent)})" for caption, path in figures)
                 + " (shown on the Benchmarks page of the docs).", ""]
    if conv:
        body += [convergence_markdown(conv), ""]
    if len({json.dumps(d["settings"], sort_keys=True) for d in all_data.values()}) > 1:
        body += ["The streams below were measured with different settings; each section names its own.", ""]
    for name, data in all_data.items():
        body += [stream_markdown(name, data, (abouts or {}).get(name, "")), ""]
    write_block("cl_benchmark", "\n".join(body), results_md)


def write_figures_block(figures, page: Path = DOCS_PAGE) -> None:
    """The figures into the docs page, between its ``cl_figures`` markers (images under docs/img only)."""
    shown = [(c, p) for c, p in figures if Path(p).resolve().is_relative_to(DOCS_IMG.resolve())]
    lines = ["## Continual learning in figures", "",
             "Made by `benchmarks/cl_benchmark.py` and `benchmarks/cl_convergence.py` from the results below.", ""]
    lines += [f"![{c}]({_rel(Path(p), page.parent)})\n\n*{c}.*\n" for c, p in shown] or ["(no results yet)"]
    write_block("cl_figures", "\n".join(lines), page)


def report(out_dir: Path, no_markdown: bool = False, quiet: bool = False) -> int:
    """Figures of every stream saved in ``out_dir`` (and of its convergence curve) and, unless ``no_markdown``, the
    RESULTS.md tables and the docs' figures: only for the default results folder, whose figures live in docs/img
    (elsewhere the figures go next to the JSONs and no markdown is touched)."""
    all_data = {}
    for name in list(DEFAULT_STREAMS) + [s for s in STREAMS if s not in DEFAULT_STREAMS]:
        for key in (name, name + LEGACY):  # a stream, then its 0.1 results when the new ones replaced them
            path = out_dir / f"cl_{key}.json"
            if path.exists():
                all_data[key] = json.loads(path.read_text())
    conv_path = out_dir / "cl_convergence.json"
    conv = json.loads(conv_path.read_text()) if conv_path.exists() else None
    if not all_data and conv is None:
        print(f"no results in {out_dir}; run the benchmark first.")
        return 1
    default = out_dir.resolve() == RESULTS_DIR.resolve() and not no_markdown
    figures = plot_all(all_data, DOCS_IMG if default else out_dir, conv)
    if default:
        write_markdown(all_data, RESULTS_MD, conv, figures, {n: about_of(n) for n in all_data})
        write_figures_block(figures)
        made = {Path(p).resolve() for _, p in figures}
        for old in DOCS_IMG.glob("cl_*.png"):  # figures of results that are gone (e.g. renamed to their 0.1 name)
            if old.resolve() not in made:
                old.unlink()
    if not quiet:
        for name, data in all_data.items():
            print(stream_markdown(name, data, about_of(name)))
    return 0
