"""Cost of the router's feature pass (only the blocks below ``router_layer`` run) against a full forward.

For each router layer L, times ``peft_model.router_features(batch)`` and a full ``model(**batch)`` (logits
included) of the same model, round-robin, and compares the ratio with L / num_layers. The full forward also pays
for the embedding lookup, the final norm and the LM head (large for a small model with a big vocabulary), so the
expected ratio is at most L / num_layers; the goal is a ratio no larger than 1.10 x L / num_layers.

Usage:
    python benchmarks/perf_features.py
    python benchmarks/perf_features.py --model stories --layers 1 2 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_args, finish, load_causal_lm, machine_line, md_table, round_robin, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    add_device_args(p)
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from peft import get_peft_model

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig

    args = parse_args(argv)
    model, _ = load_causal_lm(args.model, args.device, args.dtype)
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results = {"command": "python benchmarks/perf_features.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(args.device), "model": args.model, "num_layers": n, "batch": args.batch,
               "length": args.length, "dtype": args.dtype, "layers": []}
    # the feature pass never touches the adapters: the same base model is wrapped for one router layer at a time
    for layer in [L for L in args.layers if 0 < L < n]:
        peft_model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                     router_layer=layer))

        def features(pm=peft_model):
            pm.router_features(batch)

        fns = {"full": lambda pm=peft_model: full_peft(pm, batch), "features": features}
        t = round_robin(fns, args.reps, args.device)
        ratio = t["features"]["median_s"] / t["full"]["median_s"]
        entry = {"router_layer": layer, "features_ms": round(1000 * t["features"]["median_s"], 1),
                 "full_ms": round(1000 * t["full"]["median_s"], 1), "ratio": round(ratio, 4),
                 "layer_share": round(layer / n, 4), "ratio_over_share": round(ratio / (layer / n), 3)}
        results["layers"].append(entry)
        print(entry, flush=True)
        model = peft_model.unload()
    return finish("perf_features", results, markdown, args.no_markdown)


def full_peft(peft_model, batch) -> None:
    """A full forward of the base model under the bank, adapters off (the cost a feature pass is compared with)."""
    with torch.no_grad(), peft_model.disable_adapter():
        peft_model(**batch)


def markdown(results: dict) -> str:
    rows = [[e["router_layer"], f"{e['features_ms']:.1f}", f"{e['full_ms']:.1f}", f"{e['ratio']:.3f}",
             f"{e['layer_share']:.3f}", f"{e['ratio_over_share']:.2f}"] for e in results["layers"]]
    return "\n".join([
        "## Feature pass cost (`benchmarks/perf_features.py`)", "", f"Command: `{results['command']}`", "",
        machine_line(results["versions"]), "",
        f"Model {results['model']} ({results['num_layers']} blocks, {results['dtype']}), batch {results['batch']} x "
        f"{results['length']} tokens; full = a whole forward with logits (adapters off). Medians of interleaved rounds.",
        "", md_table(["router layer L", "feature pass (ms)", "full forward (ms)", "ratio", "L / num_layers",
                      "ratio / (L / num_layers)"], rows), ""])


if __name__ == "__main__":
    sys.exit(main())
