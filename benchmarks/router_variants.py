"""Router variants beyond the paper, on real prompts at full length: poolings, feature fusion across blocks, heads
(ridge, class-balanced ridge, shared-covariance LDA with shrinkage, both after a random ReLU expansion), and the
calibrated base route.

Features come from ``benchmarks/router_features.py`` (one pass per prompt, cached: hidden states entering blocks
2, 4, 6, 8 after the final norm, pooled several ways). Every router here is the package's ``AnalyticRouter``, fitted
task by task with ``partial_fit`` from those features and scored with ``predict``: what a bank with that setting
routes. Multi-block fusion concatenates the pooled features of several blocks (the package routes on one block;
fusion is measured here to decide whether to build it).

Streams: O-LoRA (the 14 tasks of ../shared in O-LoRA's long order, yahoo absent upstream; up to 300 train / 100 test
prompts each), TRACE (tasks with a train split; up to 300 train prompts, eval split up to 100) and the demo's stream
(4 tasks, 320 / 40). Base route: fitted on no general data; the distance threshold is calibrated on the first half of
every task's test prompts at a false-positive rate of 0.5%, then the share of the other half sent to the base model
and the share of the demo's 60 general prompts sent there are measured.

    python benchmarks/router_features.py --cache /tmp/router_features     # the features (resumable)
    python benchmarks/router_variants.py --cache /tmp/router_features     # the grid, JSON and RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from router_features import OLORA_LONG_ORDER, TRACE_ORDER  # noqa: E402

from peft_asr.tuner.router import AnalyticRouter  # noqa: E402

DEMO = ["reverse", "shout", "initials", "echo"]
MARK_BEGIN, MARK_END = "<!-- router_variants:begin -->", "<!-- router_variants:end -->"
FPR = 0.005

# (label, feature keys, router kwargs): the paper's setting first, then today's default, then the candidates
VARIANTS = [
    ("paper: mean@4, E=10000, ridge 100", ["mean@4"], dict(head="ridge", ridge=100.0, feature_dim=10000,
                                                            per_class_statistics=False)),
    ("0.1 default: mean@4, ridge 1", ["mean@4"], dict(head="ridge", ridge=1.0)),
    ("mean@4, ridge 0.1", ["mean@4"], dict(head="ridge", ridge=0.1)),
    ("mean@8, ridge 1", ["mean@8"], dict(head="ridge", ridge=1.0)),
    ("mean@4, balanced ridge 1", ["mean@4"], dict(head="balanced", ridge=1.0)),
    ("mean@4, lda 0.01", ["mean@4"], dict(head="lda", shrinkage=0.01)),
    ("mean@4, lda 0.05", ["mean@4"], dict(head="lda", shrinkage=0.05)),
    ("mean@4, lda 0.1", ["mean@4"], dict(head="lda", shrinkage=0.1)),
    ("mean@4, lda 0.3", ["mean@4"], dict(head="lda", shrinkage=0.3)),
    ("last@4, lda 0.1", ["last@4"], dict(head="lda", shrinkage=0.1)),
    ("max@4, lda 0.1", ["max@4"], dict(head="lda", shrinkage=0.1)),
    ("user@4, lda 0.1", ["user@4"], dict(head="lda", shrinkage=0.1)),
    ("instr@4+rest@4, lda 0.1", ["instr@4", "rest@4"], dict(head="lda", shrinkage=0.1)),
    ("mean_last@4, ridge 1", ["mean@4", "last@4"], dict(head="ridge", ridge=1.0)),
    ("mean_last@4, lda 0.05", ["mean@4", "last@4"], dict(head="lda", shrinkage=0.05)),
    ("mean_last@4, lda 0.1", ["mean@4", "last@4"], dict(head="lda", shrinkage=0.1)),
    ("mean_last@4, lda 0.3", ["mean@4", "last@4"], dict(head="lda", shrinkage=0.3)),
    ("mean_last@4, E=4096 relu, lda 0.1", ["mean@4", "last@4"], dict(head="lda", shrinkage=0.1, feature_dim=4096,
                                                                      activation="relu")),
    ("mean_last@8, lda 0.1", ["mean@8", "last@8"], dict(head="lda", shrinkage=0.1)),
    ("fusion mean@2,4, lda 0.1", ["mean@2", "mean@4"], dict(head="lda", shrinkage=0.1)),
    ("fusion mean_last@2,4, lda 0.1", ["mean@2", "last@2", "mean@4", "last@4"], dict(head="lda", shrinkage=0.1)),
    ("fusion mean@2,4,6,8, lda 0.1", ["mean@2", "mean@4", "mean@6", "mean@8"], dict(head="lda", shrinkage=0.1)),
]
DEFAULT = "mean_last@4, lda 0.1"


def load_stream(cache: Path, source: str, tasks: list[str]):
    out = {}
    for task in tasks:
        parts = {s: cache / f"{source}__{task}__{s}.pt" for s in ("train", "test")}
        if all(p.exists() for p in parts.values()):
            out[task] = {s: torch.load(p) for s, p in parts.items()}
    return out


def features(entry: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([entry["features"][k] for k in keys], dim=1)


def fit(tasks, data, keys, kwargs) -> tuple[AnalyticRouter, float]:
    head = kwargs.get("head", "ridge")
    kw = dict(kwargs, head="ridge" if head == "balanced" else head)
    dim_in = features(data[tasks[0]]["train"], keys).shape[1]
    router = AnalyticRouter(in_features=dim_in, num_classes=len(tasks) + 1, **kw)
    t0 = time.perf_counter()
    for k, task in enumerate(tasks):  # task by task, as a stream arrives
        router.partial_fit(features(data[task]["train"], keys), k + 1)
    if head == "balanced":  # each class weighted by N / (K n_k): from the per-class Grams, as exact as the rest
        counts = router.class_counts
        weights = torch.where(counts > 0, counts.sum() / ((counts > 0).sum() * counts.clamp(min=1)), counts)
        from peft_asr.tuner import rls

        router.weight = rls.ridge_solve((router.class_gram * weights[:, None, None]).sum(0), router.cross * weights,
                                        router.ridge)
        router._dirty = False
    else:
        router.solve()
    return router, time.perf_counter() - t0


def evaluate(router, tasks, data, keys) -> dict:
    confusion = torch.zeros(len(tasks), len(tasks) + 1, dtype=torch.long)
    t0, n = time.perf_counter(), 0
    for k, task in enumerate(tasks):
        x = features(data[task]["test"], keys)
        pred = router.predict(x)
        n += len(x)
        for p in pred.tolist():
            confusion[k, p] += 1
    seconds = time.perf_counter() - t0
    correct = int(sum(confusion[k, k + 1] for k in range(len(tasks))))
    pairs = {}
    for k in range(len(tasks)):
        for j in range(len(tasks) + 1):
            if j != k + 1 and confusion[k, j]:
                pairs[f"{tasks[k]} -> {(['base'] + tasks)[j]}"] = int(confusion[k, j])
    return {"accuracy": 100 * correct / n, "errors": n - correct, "n_test": n, "confusion": confusion.tolist(),
            "pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1])), "head_us_per_prompt": 1e6 * seconds / n}


def base_route(router, tasks, data, keys, general) -> dict:
    """Calibrate on the first half of every task's test prompts; measure on the other half and on general prompts."""
    halves = [features(data[t]["test"], keys) for t in tasks]
    calibration = torch.cat([x[: len(x) // 2] for x in halves])
    held = torch.cat([x[len(x) // 2:] for x in halves])
    rate = max(FPR, 1.0 / len(calibration))  # split conformal needs >= 1/rate prompts: the demo has 80
    router.calibrate(router.distance(calibration), rate)
    out = {"false_positive_rate": rate, "calibration_prompts": len(calibration), "held_task_prompts": len(held),
           "task_to_base_pct": 100 * float((router.predict(held) == 0).double().mean())}
    if general is not None:
        g = torch.cat([general["features"][k] for k in keys], dim=1)
        out.update(general_prompts=len(g), general_to_base_pct=100 * float((router.predict(g) == 0).double().mean()))
    router.ood_threshold.fill_(float("inf"))
    return out


def exactness(tasks, data, keys, kwargs) -> dict:
    """Recursive (task by task, in chunks, in another order) vs joint; merge of two halves; removal of a task."""
    head = kwargs.get("head", "ridge")
    if head == "balanced":
        return {}
    dim_in = features(data[tasks[0]]["train"], keys).shape[1]
    make = lambda k: AnalyticRouter(in_features=dim_in, num_classes=k, **kwargs)  # noqa: E731
    joint = make(len(tasks) + 1)
    x = torch.cat([features(data[t]["train"], keys) for t in tasks])
    y = torch.cat([torch.full((len(data[t]["train"]["features"][keys[0]]),), k + 1) for k, t in enumerate(tasks)])
    joint.partial_fit(x, y).solve()
    chunked = make(len(tasks) + 1)
    for k, t in reversed(list(enumerate(tasks))):
        for part in torch.tensor_split(features(data[t]["train"], keys), 3):
            chunked.partial_fit(part, k + 1)
    chunked.solve()
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))  # noqa: E731
    out = {"recursive_vs_joint": max(rel(chunked.weight, joint.weight), rel(chunked.bias, joint.bias))}
    removed = make(len(tasks) + 1)
    removed.partial_fit(x, y)
    removed.remove_class(1)
    removed.solve()
    never = make(len(tasks))
    keep = y != 1
    never.partial_fit(x[keep], y[keep] - 1).solve()
    out["remove_vs_never"] = max(rel(removed.weight, never.weight), rel(removed.bias, never.bias))
    return out


def run_stream(name, tasks, data, general) -> list[dict]:
    rows = []
    for label, keys, kwargs in VARIANTS:
        if any(k not in data[t][split]["features"] for k in keys for t in tasks for split in ("train", "test")):
            continue  # blocks this stream's cache lacks (the long TRACE prompts were cached at blocks 2 and 4 only)
        router, fit_s = fit(tasks, data, keys, kwargs)
        row = {"stream": name, "variant": label, "keys": keys, **{k: v for k, v in kwargs.items()},
               "tasks": len(tasks), "n_train": sum(len(data[t]["train"]["features"][keys[0]]) for t in tasks),
               "dim": router.dim, "statistics_bytes_per_task": router.dim * router.dim * 8,
               "fit_s": fit_s, **evaluate(router, tasks, data, keys)}
        if router.head == "lda" and kwargs.get("head") == "lda":
            row["base_route"] = base_route(router, tasks, data, keys, general)
        if label in (DEFAULT, "0.1 default: mean@4, ridge 1"):
            row["exactness"] = exactness(tasks, data, keys, kwargs)
        rows.append(row)
        print(f"{name:9s} {label:40s} acc={row['accuracy']:6.2f}% ({row['errors']} errors) fit={fit_s:5.2f}s "
              f"{row.get('base_route', '')}", flush=True)
    return rows


def time_route(reps: int = 7) -> dict:
    """``model.route`` per prompt on the embedded model: 0.1's default router against today's, interleaved."""
    from peft import get_peft_model

    from peft_asr import ASRConfig
    from peft_asr.cl.default_model import load_model_and_tokenizer
    from peft_asr.cl.tokenization import prompt_batches
    from peft_asr.demo.stream import demo_stream

    stream = demo_stream(n_train=64, n_eval=16, seed=0)
    models = {}
    for name, extra in (("0.1 default", dict(router_pooling="mean", router_head="ridge")), ("default", {})):
        base, tok = load_model_and_tokenizer()
        model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], **extra))
        for task in stream:
            model.add_task(task.name)
            model.fit_router(prompt_batches(tok, [r["prompt"] for r in task.train], batch_size=16), task=task.name,
                             progress=False)
        models[name] = (model.eval(), tok)
    prompts = [r["prompt"] for task in stream for r in task.eval]  # 64 prompts
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, (model, tok) in models.items():
            batches = list(prompt_batches(tok, prompts, batch_size=16))
            t0 = time.perf_counter()
            for batch in batches:
                model.route(**batch)
            times[name].append((time.perf_counter() - t0) / len(prompts))
    median = {name: sorted(v)[len(v) // 2] * 1e3 for name, v in times.items()}
    return {"prompts": len(prompts), "reps": reps, "ms_per_prompt": median,
            "ratio": median["default"] / median["0.1 default"]}


def markdown(result: dict) -> str:
    out = [MARK_BEGIN, "", "## Router variants (`benchmarks/router_variants.py`)", "",
           f"Features: `{result['features_command']}`; grid: `{result['command']}`. Model: SmolLM2-135M-Instruct "
           "(embedded, fp32), full prompts in the chat template, CPU. Accuracy = share of test prompts routed to their "
           "own task; base route: threshold calibrated on half of each task's test prompts at a 0.5% false-positive "
           "rate (1/80 on the demo, whose 80 calibration prompts are too few for 0.5%), measured on the other half "
           "(task -> base) and on the demo's 60 general prompts (general -> base).", "",
           "Budget: up to 300 train / 100 test prompts per task (O-LoRA, TRACE), 320 / 40 (demo), full length. A "
           "stream whose features are not all cached is named with the tasks it has. TRACE: its 7 tasks with a train "
           "split (MeetingBank has none); C-STANCE and FOMC were cached at blocks 2, 4, 6 and 8, the five others at "
           "blocks 2 and 4 only (`--blocks 2 4`: their prompts run to 8192 tokens), so the variants at blocks 6 and 8 "
           "have no TRACE figure.", ""]
    streams = list(dict.fromkeys(r["stream"] for r in result["rows"]))
    header = "| variant | " + " | ".join(f"{s} acc %" for s in streams) + " | E | stats / task |"
    out += [header, "|---|" + "---|" * len(streams) + "---|---|"]
    for label, _, _ in VARIANTS:
        cells = {r["stream"]: r for r in result["rows"] if r["variant"] == label}
        if not cells:
            continue
        any_row = next(iter(cells.values()))
        accs = " | ".join(f"{cells[s]['accuracy']:.2f}" if s in cells else "" for s in streams)
        bold = "**" if label == DEFAULT else ""
        out.append(f"| {bold}{label}{bold} | {accs} | {any_row['dim']} | "
                   f"{any_row['statistics_bytes_per_task'] / 2**20:.1f} MiB |")
    out += ["", "Base route of the LDA variants (task prompts sent to the base model / general prompts sent there):", "",
            "| variant | " + " | ".join(streams) + " |", "|---|" + "---|" * len(streams)]
    for label, _, kwargs in VARIANTS:
        cells = {r["stream"]: r for r in result["rows"] if r["variant"] == label and "base_route" in r}
        if not cells:
            continue
        fmt = lambda b: f"{b['task_to_base_pct']:.2f}% / {b.get('general_to_base_pct', float('nan')):.1f}%"  # noqa
        out.append(f"| {label} | " + " | ".join(fmt(cells[s]["base_route"]) if s in cells else "" for s in streams)
                   + " |")
    out += ["", "Confusions of the default and of 0.1's default (test prompts):", ""]
    for r in result["rows"]:
        if r["variant"] in (DEFAULT, "0.1 default: mean@4, ridge 1"):
            pairs = ", ".join(f"{k} ({v})" for k, v in list(r["pairs"].items())[:6]) or "none"
            ex = r.get("exactness", {})
            out.append(f"- {r['stream']}, {r['variant']}: {r['errors']} errors of {r['n_test']}: {pairs}; fit "
                       f"{r['fit_s']:.2f} s for {r['n_train']} prompts; head {r['head_us_per_prompt']:.1f} us / prompt; "
                       f"recursive vs joint {ex.get('recursive_vs_joint', float('nan')):.1e}, remove vs never "
                       f"{ex.get('remove_vs_never', float('nan')):.1e} (relative)")
    if result.get("route_time"):
        t = result["route_time"]
        out += ["", f"`model.route` on the embedded model ({t['prompts']} demo prompts, batch 16, median of {t['reps']} "
                f"interleaved runs): 0.1's default {t['ms_per_prompt']['0.1 default']:.2f} ms / prompt, today's "
                f"default {t['ms_per_prompt']['default']:.2f} ms / prompt ({t['ratio']:.3f}x)."]
    out += ["", MARK_END]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the folder of benchmarks/router_features.py")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "router_variants.json"))
    p.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--time-route", action="store_true", help="also time `model.route` on the embedded model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cache = Path(args.cache)
    general = torch.load(cache / "demo__general__test.pt") if (cache / "demo__general__test.pt").exists() else None
    rows = []
    for name, source, order in (("O-LoRA-14", "olora", OLORA_LONG_ORDER), ("TRACE", "trace", TRACE_ORDER),
                                ("demo", "demo", DEMO)):
        data = load_stream(cache, source, order)
        tasks = [t for t in order if t in data]
        if len(tasks) < 2:
            print(f"{name}: features of {len(tasks)} tasks in {cache}; skipped", flush=True)
            continue
        complete = len(tasks) == len([t for t in order if t != "MeetingBank"])  # MeetingBank has no train split
        rows += run_stream(name if complete else f"{name.split('-')[0]}-{len(tasks)} ({', '.join(tasks)})",
                           tasks, data, general)
    result = {"command": " ".join(["python", *sys.argv]),
              "features_command": "python benchmarks/router_features.py --cache " + str(cache),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "rows": rows,
              "route_time": time_route() if args.time_route else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    text = markdown(result)
    md = Path(args.results_md)
    old = md.read_text() if md.exists() else ""
    if MARK_BEGIN in old and MARK_END in old:
        new = old[: old.index(MARK_BEGIN)] + text + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    md.write_text(new)
    print(text)


if __name__ == "__main__":
    main()
