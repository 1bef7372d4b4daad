"""The paper's "BP router" ablation: a linear router of the same size trained by gradient descent, task by task.

Uses the pooled features that ``router_ablation.py`` computes and caches (``--feature-cache``, router layer 4,
SmolLM2-135M-Instruct), so the analytic and the gradient-trained routers see exactly the same inputs. For each
stream (TRACE 7 tasks, O-LoRA 8 and 14 tasks, in the streams' task order):

* ``analytic``      this package's router at its defaults (E = d, no activation, ridge 1), fitted task by task;
* ``bp_sequential`` ``nn.Linear(d, T + 1)``, cross-entropy, Adam, ``--epochs`` epochs over each task's features when
                    that task arrives, no old data kept (the continual setting a router must live in);
* ``bp_joint``      the same linear router trained on all tasks at once (needs every task's data at the same time:
                    not continual; shown as the best a gradient-trained linear router of this size does).

Reports routing accuracy on the test prompts of every task after the last task, and after every task on the tasks
seen so far.

Usage:
    python benchmarks/router_ablation.py --layers 4 --olora14 --feature-cache ~/.cache/peft_asr/ablation
    python benchmarks/router_bp_ablation.py --feature-cache ~/.cache/peft_asr/ablation
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_line, md_table, versions  # noqa: E402

TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
OLORA_LONG_ORDER = ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                    "MultiRC", "BoolQA", "WiC"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--feature-cache", required=True, help="folder written by router_ablation.py --feature-cache")
    p.add_argument("--train-per-task", type=int, default=100)
    p.add_argument("--test-per-task", type=int, default=50)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def streams(feats: dict) -> dict[str, list[str]]:
    trace = [f"trace/{t}" for t in TRACE_ORDER if f"trace/{t}" in feats]
    olora = [f"olora/{t}" for t in OLORA_LONG_ORDER if f"olora/{t}" in feats]
    out = {"TRACE": trace, "O-LoRA-8": olora[:8]}
    if len(olora) == 14:
        out["O-LoRA-14"] = olora
    return out


def analytic(xs, ys, num_classes):
    from peft_asr.tuner.router import AnalyticRouter

    router = AnalyticRouter(xs[0].shape[1], num_classes)
    for x, y in zip(xs, ys):
        router.partial_fit(x, y)
        yield router.predict


def bp(xs, ys, num_classes, args, joint: bool = False):
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    layer = torch.nn.Linear(xs[0].shape[1], num_classes).double()
    opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
    chunks = [(torch.cat(xs), torch.cat(ys))] if joint else list(zip(xs, ys))
    for x, y in chunks:
        for _ in range(args.epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), args.batch_size):
                rows = order[i: i + args.batch_size]
                loss = torch.nn.functional.cross_entropy(layer(x[rows]), y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
        yield lambda f: layer(f).argmax(dim=1)


def accuracy(predict, x, y) -> float:
    with torch.no_grad():
        return float((predict(x) == y).double().mean() * 100)


def run(name: str, tasks: list[str], feats: dict, args) -> dict:
    xs = [feats[t]["train"].double() for t in tasks]
    ys = [torch.full((len(x),), k + 1, dtype=torch.long) for k, x in enumerate(xs)]  # class 0: base route
    xt = [feats[t]["test"].double() for t in tasks]
    yt = [torch.full((len(x),), k + 1, dtype=torch.long) for k, x in enumerate(xt)]
    out = {"tasks": [t.split("/", 1)[1] for t in tasks], "methods": {}}
    num_classes = len(tasks) + 1
    for method, fits in (("analytic", lambda: analytic(xs, ys, num_classes)),
                         ("bp_sequential", lambda: bp(xs, ys, num_classes, args)),
                         ("bp_joint", lambda: bp(xs, ys, num_classes, args, joint=True))):
        start = time.perf_counter()
        seen_acc, predict = [], None
        for k, predict in enumerate(fits()):
            if method != "bp_joint":
                seen_acc.append(accuracy(predict, torch.cat(xt[: k + 1]), torch.cat(yt[: k + 1])))
        seconds = time.perf_counter() - start
        per_task = [accuracy(predict, x, y) for x, y in zip(xt, yt)]
        out["methods"][method] = {"final_accuracy": accuracy(predict, torch.cat(xt), torch.cat(yt)),
                                  "per_task": per_task, "seen_accuracy_after_each_task": seen_acc,
                                  "seconds": round(seconds, 3)}
        print(f"  {name:9s} {method:13s} final {out['methods'][method]['final_accuracy']:6.2f}%  "
              f"({seconds:.2f} s)", flush=True)
    return out


def markdown(results: dict) -> str:
    lines = ["## Analytic router vs a gradient-trained (BP) router (`benchmarks/router_bp_ablation.py`)", "",
             f"Command: `{results['command']}`", "", machine_line(results["versions"]), "",
             f"Same pooled features (SmolLM2-135M-Instruct, router layer 4, {results['train_per_task']} train / "
             f"{results['test_per_task']} test prompts per task). BP: `nn.Linear(d, T + 1)` (the analytic router's "
             f"size at E = d), cross-entropy, Adam lr {results['lr']}, {results['epochs']} epochs per task, batch "
             f"{results['batch_size']}, float64. Routing accuracy (%) on every task's test prompts after the last task; "
             "`seen` = accuracy on the tasks seen so far, after each task.", ""]
    for name, s in results["streams"].items():
        rows = []
        for method, m in s["methods"].items():
            seen = " / ".join(f"{a:.0f}" for a in m["seen_accuracy_after_each_task"]) or "-"
            rows.append([method, f"{m['final_accuracy']:.2f}", seen, f"{m['seconds']:.2f}"])
        lines += [f"**{name}** ({len(s['tasks'])} tasks: {', '.join(s['tasks'])})", "",
                  md_table(["router", "final accuracy", "seen after each task", "fit (s)"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.feature_cache).expanduser() / f"features_L4_{args.train_per_task}_{args.test_per_task}.pt"
    if not path.exists():
        print(f"{path} is absent: run `python benchmarks/router_ablation.py --layers 4 --olora14 --train-per-task "
              f"{args.train_per_task} --test-per-task {args.test_per_task} --feature-cache {args.feature_cache}` first.")
        return 1
    feats, info = torch.load(path, weights_only=True)  # our own cache of plain tensors and numbers
    results = {"command": "python benchmarks/router_bp_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(), "train_per_task": args.train_per_task, "test_per_task": args.test_per_task,
               "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "streams": {}}
    for name, tasks in streams(feats).items():
        results["streams"][name] = run(name, tasks, feats, args)
    return finish("router_bp_ablation", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
