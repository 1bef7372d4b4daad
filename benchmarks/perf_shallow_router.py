"""Memory, load time and latency of routing with `ShallowRouter` against the full bank (`PeftModel.route`).

A bank of ``--tasks`` tasks is built on the model (router fitted on random prompts, one token range per task) and
saved. Then, each in a fresh process (the peak resident set of a process only grows), one variant is loaded and
routes one batch:

* ``full``: ``AutoModelForCausalLM.from_pretrained(model)`` + ``PeftModel.from_pretrained(base, bank)``;
* ``shallow``: ``ShallowRouter.from_pretrained(bank, model)`` (embeddings, blocks below ``router_layer``, final norm).

Figures per process: parameter and buffer bytes of what was loaded; the resident set after loading and its peak
during loading and one ``route`` call, both above the resident set before loading (imports done); the load time.
Latency is timed in one process holding both, round-robin (``common.round_robin``), on the same batch, where the
scores of the two are also compared (float64; ``-inf`` for classes never fitted compares equal).

Usage:
    python benchmarks/perf_shallow_router.py                      # the embedded SmolLM2-135M-Instruct
    python benchmarks/perf_shallow_router.py --model tiny         # a random 8-block Llama (no real model needed)
    python benchmarks/perf_shallow_router.py --model path/to/causal-lm --router-layer 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (machine_line, md_table, reset_peak, results_dir, round_robin, save_json, status_mb,  # noqa: E402
                    versions, write_block)

VARIANTS = ("full", "shallow")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help='"smollm2", "stories", "tiny" or a causal LM folder')
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="processes per variant, alternating; the median is reported")
    p.add_argument("--timing-reps", type=int, default=15)
    p.add_argument("--results-md", action="store_true", help="also put the table into benchmarks/RESULTS.md")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--bank", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_path(name: str, root: Path) -> str:
    """A checkpoint folder: ShallowRouter loads a cut of it, so the model must be on disk."""
    if name == "smollm2":
        from peft_asr.cl.default_model import default_model_path

        return str(default_model_path())
    if name == "stories":
        from common import STORIES

        return str(STORIES)
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(root / "tiny")
        return str(root / "tiny")
    return name


def _batch(vocab: int, rows: int, length: int, lo: int, hi: int, seed: int) -> dict:
    """Left-padded random prompts with ids in [lo, hi): a fifth of each row is padding, so masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        pad = int(torch.randint(0, length // 5 + 1, (1,), generator=g))
        mask[i, :pad] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def build_bank(path: str, args, out: Path) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig

    model = AutoModelForCausalLM.from_pretrained(path)
    vocab = model.config.vocab_size
    bank = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           router_layer=args.router_layer))
    width = (vocab - 3) // (args.tasks + 1)
    for k in range(args.tasks):  # task k: token ids of its own range
        bank.add_task(f"task{k}")
        lo = 3 + k * width
        bank.fit_router([_batch(vocab, 16, 32, lo, lo + width, seed=k)], task=f"task{k}", progress=False)
    bank.save_pretrained(out / "bank")
    return out / "bank"


def _load(variant: str, path: str, bank: str):
    if variant == "full":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), bank).eval()
    from peft_asr import ShallowRouter

    return ShallowRouter.from_pretrained(bank, path)


def _tensor_mb(module) -> float:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:  # tied weights count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def child(args) -> dict:
    import peft  # noqa: F401  (imports first: they are not what is measured)
    import transformers  # noqa: F401

    import peft_asr  # noqa: F401

    torch.manual_seed(0)
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    loaded = _load(args.child, args.path, args.bank)
    load_s = time.perf_counter() - start
    after = status_mb("VmRSS")
    vocab = loaded.model.get_input_embeddings().num_embeddings if args.child == "shallow" else loaded.config.vocab_size
    loaded.route(**_batch(vocab, args.batch, args.length, 3, vocab, seed=99))
    peak = status_mb("VmHWM")
    with torch.no_grad():  # read every weight once: the pages of a mapped checkpoint the route never read come in
        for t in list(loaded.parameters()) + list(loaded.buffers()):
            t.sum()
    touched = status_mb("VmRSS")
    params = sum(p.numel() for p in loaded.parameters())
    return {"variant": args.child, "load_s": round(load_s, 3), "params": params, "tensor_mb": round(_tensor_mb(loaded), 1),
            "rss_loaded_mb": round(after - before, 1), "peak_mb": round(peak - before, 1),
            "rss_all_read_mb": round(touched - before, 1)}


def parity_and_latency(path: str, bank: str, args) -> dict:
    """Both in one process: the same scores and routes, and the route latency timed round-robin."""
    full, shallow = _load("full", path, bank), _load("shallow", path, bank)
    vocab = full.config.vocab_size
    width = (vocab - 3) // (args.tasks + 1)
    rows = [_batch(vocab, 1, args.length, 3 + k * width, 3 + (k + 1) * width, seed=50 + k) for k in range(args.tasks)]
    mixed = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}  # one row per task
    timed = _batch(vocab, args.batch, args.length, 3, vocab, seed=99)
    a, b = full.route_scores(**mixed, include_base=True), shallow.route_scores(**mixed, include_base=True)
    finite = torch.isfinite(a)
    same_inf = bool(torch.equal(finite, torch.isfinite(b)) and torch.equal(a[~finite], b[~finite]))
    diff = float((a[finite] - b[finite]).abs().max())
    routes_full, routes_shallow = full.route(**mixed), shallow.route(**mixed)
    times = round_robin({"full": lambda: full.route(**timed), "shallow": lambda: shallow.route(**timed)},
                        args.timing_reps)
    return {"max_abs_score_diff": diff, "same_unfitted_classes": same_inf, "routes_equal": routes_full == routes_shallow,
            "routes": routes_shallow, "rows": len(routes_shallow),
            "route_ms": {k: round(1000 * v["median_s"], 2) for k, v in times.items()}}


def markdown(results: dict) -> str:
    runs = results["runs"]

    def med(variant, key):
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    p = results["parity"]
    keys = ("tensor_mb", "rss_loaded_mb", "peak_mb", "rss_all_read_mb", "load_s")
    rows = [[v, f"{med(v, 'params') / 1e6:.1f} M", *(f"{med(v, k):.0f}" for k in keys[:-1]), f"{med(v, 'load_s'):.2f}",
             f"{p['route_ms'][v]:.1f}"] for v in VARIANTS]
    rows.append(["shallow / full", f"{med('shallow', 'params') / med('full', 'params'):.2f}x",
                 *(f"{med('shallow', k) / med('full', k):.2f}x" for k in keys),
                 f"{p['route_ms']['shallow'] / p['route_ms']['full']:.2f}x"])
    return "\n".join([
        "## Routing with `ShallowRouter` (`benchmarks/perf_shallow_router.py`)", "",
        f"Command: `{results['command']}`", "", machine_line(results["versions"]), "",
        f"Model {results['model']} ({results['num_layers']} blocks, float32), bank of {results['tasks']} tasks, "
        f"router layer {results['router_layer']}. full = `AutoModelForCausalLM` + `PeftModel.from_pretrained(base, "
        "bank)`; shallow = `ShallowRouter.from_pretrained(bank, model)`. Tensors: bytes of the parameters and "
        "buffers loaded (what a GPU allocates). Resident: the process's resident set above the one before loading "
        "(imports done), after loading, at its peak during loading and one `route` of "
        f"{results['batch']} x {results['length']} tokens, and once every weight has been read. transformers maps a "
        "safetensors checkpoint into memory, so on a CPU a weight that no call reads (the full model's deep blocks "
        "and head, when it only routes) takes no resident memory until something reads it. One fresh process per "
        f"run, {results['reps']} runs per variant, medians; `route` latency on that batch, medians of "
        f"{results['timing_reps']} interleaved rounds in one process.", "",
        md_table(["variant", "parameters", "tensors (MB)", "resident after load (MB)", "peak with a route (MB)",
                  "resident, every weight read (MB)", "load (s)", "route (ms)"], rows), "",
        f"Same scores: max |difference| {p['max_abs_score_diff']:.1e} over {p['rows']} prompts (one per task, "
        f"float64), routes equal: {p['routes_equal']}.",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    command = "python benchmarks/perf_shallow_router.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(args.model, Path(tmp))
        bank = build_bank(path, args, Path(tmp))
        from transformers import AutoConfig

        results = {"command": command.strip(), "versions": versions("cpu"), "model": args.model,
                   "num_layers": AutoConfig.from_pretrained(path).num_hidden_layers, "tasks": args.tasks,
                   "router_layer": args.router_layer, "batch": args.batch, "length": args.length, "reps": args.reps,
                   "timing_reps": args.timing_reps, "runs": []}
        passthrough = ["--path", path, "--bank", str(bank), "--batch", str(args.batch), "--length", str(args.length)]
        for variant in [v for _ in range(args.reps) for v in VARIANTS]:
            print(f"{variant} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", variant, *passthrough], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results["runs"][-1], flush=True)
        results["parity"] = parity_and_latency(path, str(bank), args)
    save_json("perf_shallow_router", results, results_dir(not args.results_md))
    text = markdown(results)
    if args.results_md:
        write_block("perf_shallow_router", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
