"""Routed inference against PEFT: forward latency and ``generate`` throughput, side by side in one process.

Variants, same rank, targets and layers (the layers at and above ``router_layer``, where ASR puts its subspaces):

* ``base``            the model without adapters;
* ``peft_single``     PEFT LoRA, one adapter;
* ``peft_mixed8``     PEFT LoRA with 8 adapters, one per row (``adapter_names=``, PEFT's mixed-batch inference);
* ``asr_1task``       an ASR bank with 1 task, every row routed to it;
* ``asr_8mixed``      an ASR bank with 8 tasks, the 8 rows routed to 8 different tasks (checked);
* ``asr_8mixed_grouped``  the same with the task-by-task reference kernel (``benchmarks/kernels.py``).

Every adapter has random (non-zero) A and B. The routed variants include the router: the pooled feature, the
projection and the argmax run inside the same forward. Forward: batch ``--batch`` x ``--length`` random tokens, no
padding; ``generate``: greedy, ``--new-tokens`` new tokens. Medians over ``--reps`` interleaved rounds.
``--profile`` adds a ``torch.profiler`` table of the top ops of one ``asr_8mixed`` forward.

Each model's results are kept with the command and machine that measured them: a run of some models replaces their
entries in ``results/perf_inference.json`` and the RESULTS.md block, and keeps the others.

Usage:
    python benchmarks/perf_inference.py                      # SmolLM2-135M and the tiny stories260K
    python benchmarks/perf_inference.py --models stories --reps 31 --gen-reps 31 --threads 1
    python benchmarks/perf_inference.py --models smollm2 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, STORIES, add_device_args, load_causal_lm, machine_line, md_table,  # noqa: E402
                    results_dir, round_robin, save_json, versions, write_block)

TARGETS = ["q_proj", "v_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "stories"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--gen-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_device_args(p)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-only", action="store_true", help="only the profile (e.g. against an older checkout)")
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "asr_" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g).to(param.dtype))


def _layers(model, router_layer: int) -> list[int]:
    return list(range(router_layer, model.config.num_hidden_layers))


def build(name: str, args):
    """Fresh copies of the model for every variant (adapters are injected in place)."""
    from peft import LoraConfig, get_peft_model

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig

    def fresh():
        return load_causal_lm(name, args.device, args.dtype)[0]

    base = fresh()
    router_layer = min(args.router_layer, base.config.num_hidden_layers // 2)  # tiny models: half the blocks
    layers = _layers(base, router_layer)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.length), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, layers_to_transform=layers)

    peft_single = get_peft_model(fresh(), LoraConfig(**lora))
    _randomize(peft_single, 1)
    peft_mixed = get_peft_model(fresh(), LoraConfig(**lora), adapter_name="t0")
    for k in range(1, args.tasks):
        peft_mixed.add_adapter(f"t{k}", LoraConfig(**lora))
    _randomize(peft_mixed, 2)
    names = [f"t{k % args.tasks}" for k in range(args.batch)]

    def asr(tasks: int):
        model = get_peft_model(fresh(), ASRConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                                                  target_modules=TARGETS, router_layer=router_layer))
        for k in range(tasks):
            model.add_task(f"task{k}")
        _randomize(model, 3)
        # fit the router so that row i goes to task i % tasks: each row's own prompt, and copies of it with a tenth
        # of the tokens redrawn (the default discriminant head needs prompts that vary within a task), are its data
        for k in range(tasks):
            rows = [i for i in range(args.batch) if i % tasks == k]
            ids = batch["input_ids"][rows].cpu()
            copies = [ids] + [torch.where(torch.rand(ids.shape, generator=g) < 0.1,
                                          torch.randint(3, vocab, ids.shape, generator=g), ids) for _ in range(3)]
            ids = torch.cat(copies).to(args.device)
            model.fit_router([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], task=f"task{k}",
                             progress=False)
        model.eval()
        routes = model.route(**batch)
        expected = [f"task{i % tasks}" for i in range(args.batch)]
        if routes != expected:
            raise RuntimeError(f"routing set-up failed: {routes} != {expected}")
        return model

    models = {"base": base.eval(), "peft_single": peft_single.eval(), "peft_mixed8": peft_mixed.eval(),
              "asr_1task": asr(1), "asr_8mixed": asr(args.tasks)}
    return models, batch, names, router_layer


def measure(name: str, args) -> dict:
    from kernels import use_grouped

    models, batch, names, router_layer = build(name, args)

    def forward(key):
        model = models[key]
        extra = {"adapter_names": names} if key == "peft_mixed8" else {}

        def run():
            with torch.no_grad():
                model(**batch, **extra)
        return run

    def generate(key):
        model = models[key]
        extra = {"adapter_names": names} if key == "peft_mixed8" else {}

        def run():
            with torch.no_grad():
                model.generate(**batch, **extra, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)
        return run

    def with_grouped(fn):
        def run():
            with use_grouped():
                fn()
        return run

    fwd = {key: forward(key) for key in models}
    gen = {key: generate(key) for key in models}
    fwd["asr_8mixed_grouped"] = with_grouped(forward("asr_8mixed"))
    gen["asr_8mixed_grouped"] = with_grouped(generate("asr_8mixed"))
    print(f"[{name}] forward x{args.reps} ...", flush=True)
    f = round_robin(fwd, args.reps, args.device)
    print(f"[{name}] generate x{args.gen_reps} ...", flush=True)
    g = round_robin(gen, args.gen_reps, args.device)
    tokens = args.batch * args.new_tokens
    out = {"model": name, "router_layer": router_layer, "layers_adapted": len(_layers(models["base"], router_layer)),
           "num_layers": models["base"].config.num_hidden_layers, "variants": {}}
    for key in fwd:
        out["variants"][key] = {"forward_ms": round(1000 * f[key]["median_s"], 2),
                                "generate_s": round(g[key]["median_s"], 3),
                                "generate_tok_s": round(tokens / g[key]["median_s"], 1)}
    v = out["variants"]
    out["ratios"] = {
        "forward asr_1task / peft_single": v["asr_1task"]["forward_ms"] / v["peft_single"]["forward_ms"],
        "forward asr_8mixed / asr_1task": v["asr_8mixed"]["forward_ms"] / v["asr_1task"]["forward_ms"],
        "forward peft_mixed8 / peft_single": v["peft_mixed8"]["forward_ms"] / v["peft_single"]["forward_ms"],
        "generate asr_1task / peft_single (time)": v["asr_1task"]["generate_s"] / v["peft_single"]["generate_s"],
        "generate asr_8mixed / asr_1task (time)": v["asr_8mixed"]["generate_s"] / v["asr_1task"]["generate_s"],
        "generate peft_mixed8 / peft_single (time)": v["peft_mixed8"]["generate_s"] / v["peft_single"]["generate_s"],
    }
    if args.profile:
        out["profile"] = profile(models["asr_8mixed"], batch)
    return out


def profile(model, batch, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad():
        model(**batch)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                model(**batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


SETTINGS = ("command", "versions", "batch", "length", "rank", "new_tokens", "dtype")


def _setting_line(entry: dict) -> list[str]:
    return [f"Command: `{entry['command']}`", "", machine_line(entry["versions"]), "",
            f"Batch {entry['batch']} x {entry['length']} tokens, LoRA r {entry['rank']} on {', '.join(TARGETS)} in the "
            f"layers at and above the router layer (the same layers for PEFT and ASR), {entry['dtype']}; `generate` "
            f"greedy, {entry['new_tokens']} new tokens per row. Medians of interleaved rounds.", ""]


def markdown(results: dict) -> str:
    lines = ["## Routed inference vs PEFT (`benchmarks/perf_inference.py`)", ""]
    for entry in results["models"]:
        rows = [[k, f"{v['forward_ms']:.1f}", f"{v['generate_s']:.2f}", f"{v['generate_tok_s']:.0f}"]
                for k, v in entry["variants"].items()]
        lines += [f"**{entry['model']}** (router layer {entry['router_layer']}; {entry['layers_adapted']} of "
                  f"{entry['num_layers']} layers adapted"
                  + (f"; {entry['reps']} forward and {entry['gen_reps']} `generate` rounds)" if "reps" in entry
                     else ")"), "", *_setting_line(entry),
                  md_table(["variant", "forward (ms)", "generate (s)", "generate (tokens/s)"], rows), "",
                  "Ratios: " + "; ".join(f"{k} **{r:.3f}**" for k, r in entry["ratios"].items()) + ".", ""]
        if entry.get("profile"):
            lines += ["Top ops of three `asr_8mixed` forwards (self CPU time):", "", "```text", entry["profile"].rstrip(),
                      "```", ""]
    return "\n".join(lines)


def _kept_entries(names: list[str]) -> list[dict]:
    """The saved entries of the models this run does not measure, each with the settings it was measured with."""
    path = RESULTS_DIR / "perf_inference.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    kept = []
    for entry in old.get("models", []):
        if entry["model"] not in names:
            kept.append({**{k: old[k] for k in SETTINGS if k in old}, **entry})  # older files: settings at the top
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile_only:
        models, batch, _, _ = build(args.models[0], args)
        print(profile(models["asr_8mixed"], batch))
        return 0
    command = "python benchmarks/perf_inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {"command": command.strip(), "versions": versions(args.device), "batch": args.batch,
                "length": args.length, "rank": args.rank, "new_tokens": args.new_tokens, "dtype": args.dtype, "reps": args.reps, "gen_reps": args.gen_reps}
    measured = []
    for name in args.models:
        if name == "stories" and not STORIES.is_dir():
            print(f"model stories skipped: {STORIES} is absent")
            continue
        measured.append({**settings, **measure(name, args)})  # router_layer: the one used (tiny models: lower)
        print(markdown({"models": measured}), flush=True)
    kept = _kept_entries([e["model"] for e in measured])
    order = ["smollm2", "stories"]
    results = {"models": sorted(kept + measured, key=lambda e: order.index(e["model"]) if e["model"] in order else 99)}
    save_json("perf_inference", results, results_dir(args.no_markdown))
    if not args.no_markdown:
        write_block("perf_inference", markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
