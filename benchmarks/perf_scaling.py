"""Scaling with the number of tasks T: router update time, routed forward time, bank size and memory.

For T in ``--tasks`` (default 1, 4, 16, 64) an ASR bank with T tasks is built on the model (random subspaces, the
router fitted on ``--per-task`` random pooled features per task), then:

* router update per task: ``partial_fit`` of one more task's features + the lazy solve (the router part of
  ``fit_router``; the feature pass in front of it does not depend on T, see perf_features.py);
* routed forward: batch ``--batch`` x ``--length`` tokens, every row routed to a different task (as many as T allows);
* bank on disk: ``save_pretrained`` with the router statistics (the default, needed to keep learning after a reload)
  and without them (``save_router_statistics=False``: subspaces + solved router only);
* memory: adapter parameters, router state (weight, counts, per-task Gram matrices) and the cached task stacks;
* the task-stack cache's trade: what stacking every layer's tasks costs (``rebuild``, timed interleaved with the cached
  forward) and the routed forward with the cache switched off (``set_task_stack_cache(False)``: no copy of the bank
  kept, every call stacks afresh), timed after the cached rounds.

Usage:
    python benchmarks/perf_scaling.py
    python benchmarks/perf_scaling.py --model stories --tasks 1 4 16 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_args, finish, load_causal_lm, machine_line, md_table, round_robin, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--per-task", type=int, default=64, help="pooled features per task for the router")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="rounds of the forward timings")
    p.add_argument("--update-reps", type=int, default=21,
                   help="rounds of the router update (milliseconds each: 5 rounds varied by 1.4x)")
    add_device_args(p)
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_size(num_tasks: int, args) -> dict:
    from peft import get_peft_model

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig
    from peft_asr.tuner.layer import ASRLayer

    model, _ = load_causal_lm(args.model, args.device, args.dtype)
    router_layer = min(args.router_layer, model.config.num_hidden_layers // 2)
    peft_model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                                                 target_modules=["q_proj", "v_proj"], router_layer=router_layer))
    start = time.perf_counter()
    for k in range(num_tasks):
        peft_model.add_task(f"task{k}")
    add_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "asr_" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g).to(param.dtype))
    router = peft_model.base_model.router
    d = router.in_features  # the pooled feature's width (mean_last: twice the hidden size)
    centers = torch.randn(num_tasks + 1, d, generator=g, dtype=torch.float64)

    def feats(k):
        return centers[k] + 0.3 * torch.randn(args.per_task, d, generator=g, dtype=torch.float64)

    for k in range(1, num_tasks + 1):
        router.partial_fit(feats(k), k)
    router.solve()
    # router update for one more task: partial_fit + lazy solve, on a copy so every repetition starts alike
    peft_model.add_task("extra")
    extra = feats(num_tasks)
    snapshot = router.snapshot(classes=[num_tasks + 1])  # what the update changes: one class, cross, counts

    def update():
        router.restore(snapshot)
        router.partial_fit(extra, num_tasks + 1)
        router.solve()

    timing = round_robin({"update": update}, args.update_reps, args.device)
    router.restore(snapshot)
    peft_model.remove_task("extra")
    router.solve()

    # routed forward: row i -> task i % T, routed by the router itself (fitted on the rows' own features)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.length), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pooled = peft_model.router_features(batch)
    for i in range(args.batch):
        router.partial_fit(pooled[i: i + 1].repeat(8, 1), 1 + i % num_tasks)
    peft_model.eval()
    routes = peft_model.route(**batch)
    distinct = len(set(routes))

    def forward():
        with torch.no_grad():
            peft_model(**batch)

    layers = [m for m in peft_model.modules() if isinstance(m, ASRLayer)]
    adapter = next(iter(layers[0].asr_A))

    def rebuild():  # what a call without the cache pays on top: every layer's tasks stacked afresh
        with torch.no_grad():
            for m in layers:
                torch.stack(list(m.asr_A[adapter].values())), torch.stack(list(m.asr_B[adapter].values()))

    fwd = round_robin({"forward": forward, "rebuild": rebuild}, args.reps, args.device)
    adapter_bytes = _bytes(p for n, p in peft_model.named_parameters() if "asr_" in n)
    stack_bytes = sum(_bytes(m._asr_stack_cache[1:]) for m in layers if getattr(m, "_asr_stack_cache", None))
    peft_model.set_task_stack_cache(False)
    uncached = round_robin({"forward": forward}, args.reps, args.device)
    left = sum(1 for m in layers if getattr(m, "_asr_stack_cache", None) is not None)
    peft_model.set_task_stack_cache(True)
    router_bytes = _bytes(router.buffers())
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, keep in (("with_statistics", True), ("without_statistics", False)):
            peft_model.peft_config["default"].save_router_statistics = keep
            folder = Path(tmp) / label
            peft_model.save_pretrained(folder)
            sizes[label] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"tasks": num_tasks, "router_update_ms": round(1000 * timing["update"]["median_s"], 2),
            "forward_ms": round(1000 * fwd["forward"]["median_s"], 1), "distinct_routes_in_batch": distinct,
            "bank_bytes": sizes, "adapter_bytes": adapter_bytes, "router_state_bytes": router_bytes,
            "stack_cache_bytes": stack_bytes, "stack_rebuild_ms": round(1000 * fwd["rebuild"]["median_s"], 2),
            "forward_no_cache_ms": round(1000 * uncached["forward"]["median_s"], 1), "caches_left_when_off": left,
            "add_task_s": round(add_s, 3), "E": router.dim}


def markdown(results: dict) -> str:
    rows = []
    for r in results["sizes"]:
        rows.append([r["tasks"], f"{r['router_update_ms']:.1f}", f"{r['forward_ms']:.0f}", r["distinct_routes_in_batch"],
                     f"{r['bank_bytes']['with_statistics'] / 1e6:.2f}", f"{r['bank_bytes']['without_statistics'] / 1e6:.2f}",
                     f"{r['adapter_bytes'] / 1e6:.2f}", f"{r['router_state_bytes'] / 1e6:.2f}",
                     f"{r['stack_cache_bytes'] / 1e6:.2f}", f"{r['stack_rebuild_ms']:.1f}",
                     f"{r['forward_no_cache_ms']:.0f}" if "forward_no_cache_ms" in r else "-"])
    first, last = results["sizes"][0], results["sizes"][-1]
    span = last["tasks"] - first["tasks"]
    slope = {k: (last["bank_bytes"][k] - first["bank_bytes"][k]) / span / 1e6 for k in first["bank_bytes"]} if span else {}
    lines = ["## Scaling with the number of tasks (`benchmarks/perf_scaling.py`)", "",
             f"Command: `{results['command']}`", "", machine_line(results["versions"]), "",
             f"Model {results['model']} ({results['dtype']}), LoRA r {results['rank']} on q_proj, v_proj; router "
             f"E = {first['E']}, per-task statistics kept (the default). Router update = `partial_fit` of one more "
             f"task ({results['per_task']} features) + the lazy solve; forward = batch {results['batch']} x "
             f"{results['length']} tokens, rows routed to as many different tasks as T allows. Medians of "
             f"{results.get('update_reps', results['reps'] if 'reps' in results else '?')} router-update and "
             f"{results.get('reps', '?')} forward rounds.", "",
             md_table(["T", "router update (ms)", "routed forward (ms)", "tasks in the batch", "bank MB (with stats)",
                       "bank MB (no stats)", "adapters MB", "router state MB", "task-stack cache MB",
                       "stacking all tasks (ms)", "routed forward, cache off (ms)"], rows), "",
             "The task-stack cache is a second copy of the adapters that routed calls gather from; "
             "`model.set_task_stack_cache(False)` drops it, and every routed call (a forward, or the first forward of "
             "a `generate`: its decode steps reuse the rows gathered then) stacks the tasks afresh instead "
             "(`stacking all tasks`, timed interleaved with the cached forward; the forward with the cache off is "
             "timed after the cached rounds).", ""]
    if slope:
        lines += [f"Bank size slope from T = {first['tasks']} to {last['tasks']}: "
                  f"{slope['with_statistics']:.3f} MB per task with the statistics (subspaces + one E x E Gram "
                  f"matrix), {slope['without_statistics']:.3f} MB per task without them (subspaces + E router "
                  f"weights).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {"command": "python benchmarks/perf_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(args.device), "model": args.model, "dtype": args.dtype, "rank": args.rank,
               "batch": args.batch, "length": args.length, "per_task": args.per_task,
               "reps": args.reps, "update_reps": args.update_reps, "sizes": []}
    for t in args.tasks:
        print(f"T = {t} ...", flush=True)
        results["sizes"].append(one_size(t, args))
        print(results["sizes"][-1], flush=True)
    return finish("perf_scaling", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
