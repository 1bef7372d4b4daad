"""Where ASR falls short of the oracle and of multi-task LoRA, split per task and by cause, from a stream JSON.

``asr``, ``asr-paper`` and ``oracle`` answer from one set of frozen subspaces through one answer cache
(``cl_asr``): a prompt routed to its own task gets, under a router, the very answer the oracle gets. So, per prompt,
``router - oracle`` is zero wherever the router was right, and the routing gap of a task is exactly the sum of its
misrouted prompts' differences, split here into prompts sent to another task and prompts sent to the base model
(the right-routed remainder is reported too: it must be 0, anything else is a bug in the benchmark; ``cl_asr`` runs
the oracle before ``asr-paper`` so that all three share their answers). For the same
reason a router's BWT can only come from prompts of earlier tasks that changed route after their stage.

``oracle - multitask`` is the other part of ``asr - multitask``: one subspace per task, trained on its task alone,
against one LoRA trained on every task for the same total number of steps. Every difference of OP has a paired
95% bootstrap interval (``bootstrap_intervals(..., versus=...)``: both methods' prompts drawn together).
"""

from __future__ import annotations

from typing import Optional

from cl_eval import BASE, mean

ROUTED = ("asr", "asr-paper")


def _final_items(rec: dict, num_tasks: int) -> Optional[list[list[float]]]:
    """Per task, the per-prompt scores after the last stage (a complete result of this benchmark), else None."""
    if not rec or not rec.get("complete"):
        return None
    items = rec["stages"][-1]["items"] if rec.get("stages") else rec.get("items")
    if not items or any(str(i) not in items for i in range(num_tasks)):
        return None
    return [items[str(i)] for i in range(num_tasks)]


def _diff_ci(a, b, seed: int):
    from peft_asr.cl.metrics import bootstrap_intervals

    return bootstrap_intervals(a, versus=b, seed=seed)["op_diff"]


def routing_gap(rec: dict, oracle: list[list[float]], tasks: list[str], seed: int) -> Optional[dict]:
    """A router's gap to the oracle, per task and in all, split by where its misrouted prompts went."""
    final = _final_items(rec, len(tasks))
    if final is None:
        return None
    routes = rec["stages"][-1].get("routes") or {}
    rows = []
    for i, (a, o) in enumerate(zip(final, oracle)):
        diff = [x - y for x, y in zip(a, o)]
        row = {"task": tasks[i], "score": mean(a), "oracle": mean(o), "gap": mean(diff)}
        r = routes.get(str(i))
        if r is not None:
            n = len(diff)
            row["routed_right"] = mean([float(x == tasks[i]) for x in r])
            row["to_tasks"] = sum(d for d, x in zip(diff, r) if x not in (tasks[i], BASE)) / n
            row["to_base"] = sum(d for d, x in zip(diff, r) if x == BASE) / n
            row["right_routed"] = sum(d for d, x in zip(diff, r) if x == tasks[i]) / n
        rows.append(row)
    out = {"tasks": rows, "op_gap": mean([row["gap"] for row in rows]), "op_gap_ci": _diff_ci(final, oracle, seed)}
    out["bwt"] = route_changes(rec, tasks)
    return out


def route_changes(rec: dict, tasks: list[str]) -> Optional[dict]:
    """How many prompts of the earlier tasks are routed, after the last stage, otherwise than just after their own
    stage (None when a stage kept no routes)."""
    stages = {s["stage"]: s for s in rec.get("stages", [])}
    last = len(tasks) - 1
    if last < 1 or last not in stages:
        return None
    changed = total = 0
    for i in range(last):
        before, after = stages.get(i, {}).get("routes", {}).get(str(i)), stages[last].get("routes", {}).get(str(i))
        if before is None or after is None:
            return None
        changed += sum(x != y for x, y in zip(before, after))
        total += len(before)
    return {"changed": changed, "prompts": total}


def asr_gaps(data: dict, seed: int = 0) -> Optional[dict]:
    """The gaps of a stream's routed methods to the oracle, and of the oracle to multi-task, when measured."""
    tasks, methods = data["tasks"], data["methods"]
    oracle = _final_items(methods.get("oracle"), len(tasks))
    if oracle is None:
        return None
    out = {"routers": {}}
    for name in ROUTED:
        gap = routing_gap(methods.get(name), oracle, tasks, seed)
        if gap is not None:
            out["routers"][name] = gap
    multi = _final_items(methods.get("multitask"), len(tasks))
    if multi is not None:
        out["multitask"] = [mean(m) for m in multi]
        out["oracle_vs_multitask"] = (mean([mean(o) - mean(m) for o, m in zip(oracle, multi)]),
                                      _diff_ci(oracle, multi, seed))
        asr = _final_items(methods.get("asr"), len(tasks))
        if asr is not None:
            out["asr_vs_multitask"] = (mean([mean(a) - mean(m) for a, m in zip(asr, multi)]),
                                       _diff_ci(asr, multi, seed))
    return out if out["routers"] or "multitask" in out else None


def goals(data: dict, seed: int = 0) -> list[str]:
    """The stream's results against the goals the benchmark was built to test, each with its measure."""
    tasks, methods = data["tasks"], data["methods"]
    asr = _final_items(methods.get("asr"), len(tasks))
    if asr is None:
        return []
    s = methods["asr"]["summary"]
    out = []
    oracle = methods.get("oracle", {}).get("summary") if _final_items(methods.get("oracle"), len(tasks)) else None
    if oracle and oracle["op"] > 0:
        ratio = s["op"] / oracle["op"]
        out.append(f"ASR OP / oracle OP {ratio:.3f} (goal >= 0.98: {'met' if ratio >= 0.98 else 'missed'})")
    if s.get("bwt") is not None:
        met = abs(s["bwt"]) <= 0.005
        out.append(f"ASR BWT {_with_ci(s['bwt'], s['bwt_ci'])} (goal within 0.5 of 0: {'met' if met else 'missed'})")
    for name, goal in (("multitask", "within 3 of multi-task"), ("seqlora", "ahead"), ("replay", "ahead"),
                       ("olora", "ahead")):
        other = _final_items(methods.get(name), len(tasks))
        if other is None:
            continue
        diff = mean([mean(a) - mean(b) for a, b in zip(asr, other)])
        met = diff >= -0.03 if name == "multitask" else diff > 0
        out.append(f"ASR - {name} OP {_with_ci(diff, _diff_ci(asr, other, seed))} (goal {goal}: "
                   f"{'met' if met else 'missed'})")
    return out


def _pts(v, signed: bool = True) -> str:
    return "-" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")


def _with_ci(point, ci) -> str:
    return _pts(point) if not ci else f"{_pts(point)} [{_pts(ci[0])}, {_pts(ci[1])}]"


def gaps_markdown(data: dict, seed: int = 0) -> str:
    """The "where ASR falls short" part of a stream's section ("" until asr and the oracle are measured)."""
    gaps = asr_gaps(data, seed)
    if gaps is None:
        return ""
    against = goals(data, seed)
    lines = ["Against the goals (points, paired 95% intervals): " + "; ".join(against) + ".", ""] if against else []
    lines += ["Where ASR falls short (points; `benchmarks/cl_gaps.py`): a prompt routed to its own task gets the "
             "oracle's very answer, so a router's gap to the oracle is its misrouted prompts' loss, split by where "
             "they went; `oracle - multi-task` is what separate per-task subspaces cost against one shared LoRA:", ""]
    multi = gaps.get("multitask")
    for name, gap in gaps["routers"].items():
        lines += [f"{name}: OP {_with_ci(gap['op_gap'], gap['op_gap_ci'])} against the oracle (paired interval)"
                  + _bwt_words(gap.get("bwt")) + ".", "",
                  "| task | routed right (%) | " + name + " | oracle | " + name + " - oracle | to other tasks | "
                  "to the base | right-routed (must be 0) |" + (" multi-task | oracle - multi-task |" if multi else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if multi else "")]
        for i, row in enumerate(gap["tasks"]):
            cells = [row["task"], _pts(row.get("routed_right"), False), _pts(row["score"], False),
                     _pts(row["oracle"], False), _pts(row["gap"]), _pts(row.get("to_tasks")),
                     _pts(row.get("to_base")), _pts(row.get("right_routed"))]
            if multi:
                cells += [_pts(multi[i], False), _pts(row["oracle"] - multi[i])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for key, words in (("oracle_vs_multitask", "oracle - multi-task"), ("asr_vs_multitask", "asr - multi-task")):
        if key in gaps:
            point, ci = gaps[key]
            lines.append(f"- OP, {words}: {_with_ci(point, ci)} (paired interval)")
    return "\n".join(lines).rstrip()


def _bwt_words(changes: Optional[dict]) -> str:
    if not changes:
        return ""
    return (f"; {changes['changed']} of the earlier tasks' {changes['prompts']} prompts changed route after their "
            "own stage (the only way a router's BWT can move: subspaces are frozen, answers cached per route)")
