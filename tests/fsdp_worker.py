"""Worker for tests/test_distributed.py: the router pass over blocks sharded with FSDP2 (`fully_shard`), on CPU/gloo.

Writes OUT/fsdp-rank{r}.json: the max difference between sharded and unsharded router features, and the routes
after fitting the router on sharded blocks with statistics summed across processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import left_pad, prompts, tiny_llama
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

import peft_asr  # noqa: F401
from peft_asr import ASRConfig


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = get_peft_model(tiny_llama(), ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                   router_layer=2))
    model.add_task("alpha")
    model.add_task("beta")
    probe = left_pad(prompts(10, 30, 4, seed=1) + prompts(60, 80, 4, seed=2))
    unsharded = model.base_model.router_features(probe)
    inner = model.base_model.model
    for block in inner.model.layers:
        fully_shard(block)
    fully_shard(inner)
    sharded = model.base_model.router_features(probe)
    model.fit_router([left_pad(prompts(10, 30, 24, seed=10 + rank))], task="alpha", progress=False, reduce_sum=_sum)
    model.fit_router([left_pad(prompts(60, 80, 24, seed=20 + rank))], task="beta", progress=False, reduce_sum=_sum)
    model.eval()
    held = left_pad(prompts(10, 30, 3, seed=5) + prompts(60, 80, 3, seed=6))
    with torch.no_grad():
        logits = model(**held).logits  # a routed forward through the sharded model after the early-stopped passes
    report = {"max_feature_diff": (sharded - unsharded).abs().max().item(), "routes": model.route(**held),
              "finite": bool(torch.isfinite(logits).all()), "counts": model.base_model.router.class_counts.tolist()}
    (out / f"fsdp-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
