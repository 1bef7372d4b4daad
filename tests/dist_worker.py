"""Worker for tests/test_distributed.py: two tasks with Trainer + ASRCallback, run by `python` or `torchrun`.

Writes each rank's router state to OUT/router-rank{r}.safetensors (and rank 0 the routes of held-out prompts) when
done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import prompts, tiny_llama
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

import peft_asr  # noqa: F401
from peft_asr import ASRCallback, ASRConfig
from peft_asr.cl import PromptAnswerCollator


def rows(lo, hi, n, seed):
    # equal-length prompts: no padding, so a prompt's feature does not depend on which rows share its batch
    return [{"input_ids": p + [lo, 2], "labels": [-100] * len(p) + [lo, 2]}
            for p in prompts(lo, hi, n, seed=seed, min_len=8, max_len=8)]


def main(out: Path) -> None:
    model = get_peft_model(tiny_llama(), ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                   router_layer=2))
    # uneven shards (39 + 39 rows a rank, the last batch short; 37 + 36), and enough rows for the 32-wide features
    # that the router tells held-out prompts apart (with 22 + 19 rows it nearly interpolates them and sends one
    # held-out beta prompt to alpha)
    data = {"alpha": rows(10, 30, 78, seed=1), "beta": rows(60, 80, 73, seed=2)}
    for task, dataset in data.items():
        model.add_task(task)
        args = TrainingArguments(output_dir=str(out / task), per_device_train_batch_size=4, max_steps=3,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True, seed=0,
                                 ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=PromptAnswerCollator(0),
                callbacks=[ASRCallback(progress=False)]).train()
    router = model.base_model.router.solve()
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {k: v.contiguous() for k, v in router.statistics_state_dict().items()}
    state["weight"] = router.weight.cpu().contiguous()
    save_file(state, str(out / f"router-rank{rank}.safetensors"))
    if rank == 0:
        held = [torch.tensor(p) for p in prompts(10, 30, 3, seed=9, min_len=8, max_len=8)
                + prompts(60, 80, 3, seed=10, min_len=8, max_len=8)]
        routes = model.eval().route(input_ids=torch.stack(held))
        (out / "routes.json").write_text(json.dumps(routes))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it, gloo runs crash at exit now and then


if __name__ == "__main__":
    main(Path(sys.argv[1]))
