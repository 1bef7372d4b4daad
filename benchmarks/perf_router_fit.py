"""Router fitting: the paper's per-sample float32 RLS against this package's float64 statistics and lazy solve.

Same features for every variant: pooled layer-``--router-layer`` features of ``--n-per-task`` prompts from each of
``--tasks`` O-LoRA tasks on SmolLM2-135M-Instruct (cached after the first run), or ``--features synthetic``
(Gaussian task clusters, no model needed). Two settings:

* official: E = 10000 (random projection of the pooled feature), no activation, ridge 100, as in the paper's code;
* defaults: this package's defaults (E = hidden size, no projection, no activation, ridge 1).

Variants (each runs in its own process, so its peak memory is its own):

* ``per_sample_fp32``  the paper's algorithm, re-implemented: one sample at a time, rank-1 RLS update of
                       ``R = (Phi^T Phi + ridge I)^-1`` and ``W`` in float32;
* ``lazy_fp64``        this package: ``AnalyticRouter.partial_fit`` per task (float64 Gram and cross statistics) and
                       one Cholesky solve when routing next needs the weight (what ``ASRModel`` does);
* ``solve_each_task``  the same statistics, but a full E^3 solve after every task (what a lazy solve avoids);
* ``woodbury_fp64``    ``peft_asr.tuner.rls.woodbury_update``: one block RLS step per task, float64.

Each solution is compared with the float64 joint solution ``solve(Phi^T Phi + ridge I, Phi^T Y)`` on all data.

Usage:
    python benchmarks/perf_router_fit.py                       # N = 8 x 300 = 2400 prompts
    python benchmarks/perf_router_fit.py --features synthetic --n-per-task 100 --settings defaults
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_line, md_table, peak_rss_mb, versions  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "olora"
TASKS = ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB"]
SETTINGS = {"official": {"feature_dim": 10000, "ridge": 100.0}, "defaults": {"feature_dim": None, "ridge": 1.0}}
VARIANTS = ["per_sample_fp32", "lazy_fp64", "solve_each_task", "woodbury_fp64"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", choices=["real", "synthetic"], default="real")
    p.add_argument("--n-per-task", type=int, default=300)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype for the feature pass (router math is float64 whatever this is)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "peft_asr" / "bench_features"))
    p.add_argument("--no-markdown", action="store_true")
    # child mode
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "SETTING", "FEATURES", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- features
def real_features(args) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import get_peft_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import load_causal_lm

    from peft_asr import ASRConfig
    from peft_asr.cl import load_olora_task, prompt_batches

    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: pass --features synthetic")
    model, tok = load_causal_lm(None, args.device, args.dtype)
    peft_model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                 router_layer=args.router_layer))
    feats, labels = [], []
    for k, name in enumerate(TASKS[: args.tasks]):
        task = load_olora_task(SHARED, name, max_train=args.n_per_task, seed=0)
        prompts = [r["prompt"] for r in task.train]
        for batch in prompt_batches(tok, prompts, batch_size=16, max_length=args.max_length, use_chat_template=False):
            feats.append(peft_model.router_features(batch).cpu())
        labels += [k + 1] * len(prompts)  # class 0 is the router's base route
        print(f"  features of {name}: {len(prompts)} prompts", flush=True)
    return torch.cat(feats), torch.tensor(labels)


def synthetic_features(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d = 576
    centers = torch.randn(args.tasks, d, generator=g, dtype=torch.float64)
    feats = torch.cat([centers[k] + 2.0 * torch.randn(args.n_per_task, d, generator=g, dtype=torch.float64)
                       for k in range(args.tasks)])
    labels = torch.arange(1, args.tasks + 1).repeat_interleave(args.n_per_task)
    return feats, labels


def features(args) -> tuple[torch.Tensor, torch.Tensor, float]:
    from safetensors.torch import load_file, save_file

    if args.features == "synthetic":
        return (*synthetic_features(args), 0.0)
    path = Path(args.cache) / f"olora{args.tasks}_n{args.n_per_task}_l{args.router_layer}_m{args.max_length}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return data["features"], data["labels"], float(data["seconds"])
    start = time.perf_counter()
    feats, labels = real_features(args)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous(), "labels": labels, "seconds": torch.tensor(seconds)}, str(path))
    return feats, labels, seconds


# ---------------------------------------------------------------------------------------------------- variants
def run_variant(variant: str, setting: str, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    from peft_asr.tuner import rls
    from peft_asr.tuner.router import AnalyticRouter

    cfg = SETTINGS[setting]
    num_classes = int(labels.max()) + 1
    router = AnalyticRouter(feats.shape[1], num_classes, feature_dim=cfg["feature_dim"], ridge=cfg["ridge"],
                            per_class_statistics=cfg["feature_dim"] is None)  # per-class E x E at E=10000: 7 GB
    tasks = labels.unique().tolist()
    if variant == "per_sample_fp32":
        phi = router.expand(feats).float()  # (N, E)
        targets = rls.one_hot(labels, num_classes).float()  # (N, K)
        start = time.perf_counter()
        r = torch.eye(phi.shape[1]) / cfg["ridge"]  # (E, E)
        w = torch.zeros(phi.shape[1], num_classes)  # (E, K)
        for x, y in zip(phi, targets):  # one sample at a time, as the paper's code
            rx = r @ x  # (E,)
            k = rx / (1.0 + x @ rx)  # (E,) gain
            w.addr_(k, y - x @ w)  # (E, K) += k (y - x W)
            r.addr_(k, rx, alpha=-1.0)  # (E, E) rank-1 downdate, in place (no E x E temporary per sample)
        return w.double(), time.perf_counter() - start
    if variant in ("lazy_fp64", "solve_each_task"):
        start = time.perf_counter()
        for task in tasks:
            router.partial_fit(feats[labels == task], task)
            if variant == "solve_each_task":
                router.solve()
        router.solve()  # the lazy solve, run once when routing next needs the weight
        return router.weight.clone(), time.perf_counter() - start
    if variant == "woodbury_fp64":
        start = time.perf_counter()
        r, w = rls.woodbury_init(router.dim, num_classes, cfg["ridge"])
        for task in tasks:
            rows = labels == task
            r, w = rls.woodbury_update(r, w, router.expand(feats[rows]), rls.one_hot(labels[rows], num_classes))
        return w, time.perf_counter() - start
    raise ValueError(variant)


def child(args) -> int:
    from safetensors.torch import load_file, save_file

    variant, setting, feature_file, out = args.child
    data = load_file(feature_file)
    base_rss = peak_rss_mb()
    weight, seconds = run_variant(variant, setting, data["features"], data["labels"])
    save_file({"weight": weight.contiguous()}, out)
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                                               "base_rss_mb": base_rss}))
    return 0


def joint(setting: str, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    from peft_asr.tuner import rls
    from peft_asr.tuner.router import AnalyticRouter

    cfg = SETTINGS[setting]
    num_classes = int(labels.max()) + 1
    router = AnalyticRouter(feats.shape[1], num_classes, feature_dim=cfg["feature_dim"], ridge=cfg["ridge"],
                            per_class_statistics=False)
    start = time.perf_counter()
    w = rls.joint_solve(router.expand(feats), rls.one_hot(labels, num_classes), cfg["ridge"])
    return w, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from safetensors.torch import load_file, save_file

    feats, labels, feature_s = features(args)
    print(f"features: {tuple(feats.shape)} ({args.features}), feature pass {feature_s:.1f} s", flush=True)
    results = {"features": args.features, "n": feats.shape[0], "tasks": int(labels.max()), "dim": feats.shape[1],
               "router_layer": args.router_layer, "feature_pass_s": round(feature_s, 1), "settings": {},
               "versions": versions(args.device), "command": "python benchmarks/perf_router_fit.py " +
               " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory() as tmp:
        feature_file = str(Path(tmp) / "features.safetensors")
        save_file({"features": feats.double().contiguous(), "labels": labels.contiguous()}, feature_file)
        for setting in args.settings:
            ref, joint_s = joint(setting, feats.double(), labels)
            entry = {"E": SETTINGS[setting]["feature_dim"] or feats.shape[1], "ridge": SETTINGS[setting]["ridge"],
                     "joint_s": round(joint_s, 2), "variants": {}}
            for variant in args.variants:
                out = str(Path(tmp) / f"{setting}-{variant}.safetensors")
                cmd = [sys.executable, __file__, "--child", variant, setting, feature_file, out]
                subprocess.run(cmd, check=True)
                info = json.loads(Path(out + ".json").read_text())
                weight = load_file(out)["weight"]
                entry["variants"][variant] = {
                    "seconds": round(info["seconds"], 3),
                    "peak_extra_mb": round(info["peak_rss_mb"] - info["base_rss_mb"], 1),
                    "max_abs_diff_vs_joint": float((weight - ref).abs().max()),
                    "max_abs_weight": float(ref.abs().max()),
                }
                print(f"  {setting:9s} {variant:16s} {info['seconds']:8.2f} s  "
                      f"+{entry['variants'][variant]['peak_extra_mb']:.0f} MB  "
                      f"max|dW| {entry['variants'][variant]['max_abs_diff_vs_joint']:.2e}", flush=True)
            results["settings"][setting] = entry
    return finish("perf_router_fit", results, markdown, args.no_markdown)


def markdown(results: dict) -> str:
    lines = ["## Router fitting (`benchmarks/perf_router_fit.py`)", "",
             f"Command: `{results['command']}`", "", machine_line(results["versions"]), "",
             f"N = {results['n']} prompts of {results['tasks']} tasks ({results['features']} features, pooled at "
             f"router layer {results['router_layer']}, d = {results['dim']}); the feature pass itself took "
             f"{results['feature_pass_s']} s and is the same for every variant. Time = fitting from features; "
             "memory = peak RSS above the process's state after loading the features; difference = max |W - W_joint| "
             "against the float64 joint solve.", ""]
    for setting, entry in results["settings"].items():
        base = entry["variants"].get("per_sample_fp32", {}).get("seconds")
        rows = []
        for variant, v in entry["variants"].items():
            speedup = f"{base / v['seconds']:.1f}x" if base and v["seconds"] > 0 else "-"
            rows.append([variant, f"{v['seconds']:.2f}", speedup, f"{v['peak_extra_mb']:.0f}",
                         f"{v['max_abs_diff_vs_joint']:.1e}"])
        lines += [f"**{setting}**: E = {entry['E']}, ridge {entry['ridge']} (max |W_joint| "
                  f"{next(iter(entry['variants'].values()))['max_abs_weight']:.2e}).", "",
                  md_table(["variant", "time (s)", "vs per-sample fp32", "peak memory (MB)", "max diff vs joint"],
                           rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
