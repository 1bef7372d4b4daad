"""Peak memory of one forward at long context: a routed ASR bank against PEFT LoRA of the same rank and targets.

Each variant runs in a fresh process (the peak resident set of a process only grows): the process loads the model,
builds the variant, runs a short forward (weights are paged in on first use), then one no-grad forward of ``--batch`` x ``--length`` tokens; the figure is the peak
resident set during the forward minus the resident set just before it. The ASR bank has ``--tasks`` tasks, its router
fitted on short random prompts, so the long rows are routed (pooling included), not pinned.

Each child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor of 64 KiB or more from its own
mapping and returns it to the system when it is freed, so the resident set follows the tensors alive instead of what
the allocator kept from earlier ones (with glibc's defaults single runs varied by 480 MB).

CPU only: on CUDA, ``torch.cuda.max_memory_allocated`` would be the figure to read instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, load_causal_lm, machine_line, md_table, reset_peak, status_mb, versions  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
VARIANTS = ("peft_lora", "asr_routed")
MMAP_THRESHOLD = 65536  # bytes: larger allocations get their own mapping, unmapped when freed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="processes per variant, alternating; the median is reported")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def _build(variant: str, args):
    from peft import LoraConfig, get_peft_model

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig

    model = load_causal_lm(args.model, "cpu", "float32")[0]
    layers = list(range(args.router_layer, model.config.num_hidden_layers))
    if variant == "peft_lora":
        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                layers_to_transform=layers)).eval()
    bank = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                                           target_modules=TARGETS, router_layer=args.router_layer))
    g = torch.Generator().manual_seed(0)
    for k in range(args.tasks):
        bank.add_task(f"task{k}")
        ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=g)
        bank.fit_router([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], task=f"task{k}", progress=False)
    return bank.eval()


def child(args) -> dict:
    torch.manual_seed(0)
    model = _build(args.child, args)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # a short forward first: weights are paged in and kernels set up on first use
        model(input_ids=ids[:1, :8], attention_mask=torch.ones_like(ids[:1, :8]))
    reset_peak()
    before = status_mb("VmRSS")
    with torch.no_grad():
        model(**batch)
    peak = status_mb("VmHWM")
    return {"variant": args.child, "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1),
            "forward_peak_mb": round(peak - before, 1)}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def markdown(results: dict) -> str:
    peaks = {v: [r["forward_peak_mb"] for r in results["runs"] if r["variant"] == v] for v in VARIANTS}
    before = {v: _median([r["rss_before_mb"] for r in results["runs"] if r["variant"] == v]) for v in VARIANTS}
    lora, asr = _median(peaks["peft_lora"]), _median(peaks["asr_routed"])
    table = md_table(["variant", "resident before the forward (MB)", "peak during the forward, above that (MB, median)",
                      "runs (MB)"],
                     [[v, before[v], _median(peaks[v]), ", ".join(f"{x:.0f}" for x in peaks[v])] for v in VARIANTS])
    v = results["versions"]
    return "\n".join([
        "## Peak memory at long context (`benchmarks/perf_memory.py`)", "",
        f"Command: `{results['command']}`", "", machine_line(v), "",
        f"Model {results['model']} (float32), one no-grad forward of {results['batch']} x {results['length']} tokens; "
        f"LoRA r {results['rank']} on {', '.join(TARGETS)} in blocks >= {results['router_layer']}; the ASR bank has "
        f"{results['tasks']} tasks and routes every row. One process per run, variants alternating; the peak resident "
        "set (`VmHWM`, reset after a short warm-up forward) minus the resident set before the forward, with "
        f"`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` (tensors of 64 KiB or more are returned to the system when freed, "
        "so the resident set follows the tensors alive).", "",
        table, "",
        f"ASR / PEFT LoRA: {f'{asr / lora:.3f}x' if lora > 0 else 'n/a'} the forward's peak ({asr - lora:+.1f} MB), "
        f"medians of "
        f"{len(peaks['peft_lora'])} runs each.",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    command = "python benchmarks/perf_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"command": command.strip(), "versions": versions("cpu"), "malloc_mmap_threshold": MMAP_THRESHOLD, "model": args.model, "batch": args.batch,
               "length": args.length, "tasks": args.tasks, "rank": args.rank, "router_layer": args.router_layer,
               "reps": args.reps, "runs": []}
    passthrough = ["--model", args.model, "--batch", str(args.batch), "--length", str(args.length), "--tasks",
                   str(args.tasks), "--rank", str(args.rank), "--router-layer", str(args.router_layer)]
    for variant in [v for _ in range(args.reps) for v in VARIANTS]:
        print(f"{variant} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", variant, *passthrough], capture_output=True,
                              text=True, check=False, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results["runs"][-1], flush=True)
    return finish("perf_memory", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
