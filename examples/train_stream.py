"""Train a stream of tasks with Analytic Subspace Routing and the HF Trainer; runs unchanged under python, torchrun
and accelerate launch (DDP).

    python examples/train_stream.py --output_dir runs/stream --max_steps 4 --report_to none --use_cpu
    torchrun --nproc_per_node 2 examples/train_stream.py --output_dir runs/stream ... --ddp_backend gloo
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/train_stream.py --output_dir runs/stream ...

``--model_path``: a causal LM folder, ``smollm2`` for the embedded SmolLM2-135M-Instruct, or nothing for a tiny
model (``../shared/models/stories260K`` when present, else a random tiny Llama; see ``tiny_model.py``).

Tasks come from the demo's built-in stream (``--tasks reverse shout``) or from TRACE folders (``--trace_root``).
Every process trains on its shard of each task; at the end of each task ``ASRCallback`` runs the router pass over
the process's share of the prompts and sums the statistics across processes, so every rank holds the same router.
Rank 0 saves the bank into ``<output_dir>/bank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

import peft_asr  # noqa: F401  (registers the ASR PEFT type)
from peft_asr import ASRCallback, ASRConfig
from peft_asr.cl import PromptAnswerCollator, load_trace_task, tokenize_examples
from tiny_model import load
from peft_asr.demo import demo_stream


@dataclass
class StreamArguments:
    model_path: Optional[str] = field(
        default=None, metadata={"help": "causal LM folder, 'smollm2' (embedded SmolLM2-135M), or none: a tiny model"})
    tasks: list[str] = field(default_factory=lambda: ["reverse", "shout"], metadata={"help": "built-in tasks"})
    trace_root: Optional[str] = field(default=None, metadata={"help": "use these TRACE task folders instead"})
    trace_tasks: list[str] = field(default_factory=lambda: ["FOMC", "C-STANCE"])
    max_train: int = field(default=64, metadata={"help": "training rows per task"})
    router_layer: int = field(default=2)
    r: int = field(default=8)
    max_length: int = field(default=256)


def main() -> None:
    stream_args, train_args = HfArgumentParser((StreamArguments, TrainingArguments)).parse_args_into_dataclasses()
    model, tokenizer = load(stream_args.model_path)
    if stream_args.trace_root:
        tasks = [load_trace_task(stream_args.trace_root, name, max_train=stream_args.max_train, max_eval=8)
                 for name in stream_args.trace_tasks]
    else:
        tasks = demo_stream(n_train=stream_args.max_train, n_eval=8, tasks=tuple(stream_args.tasks))
    model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=stream_args.r, lora_alpha=2 * stream_args.r,
                                            target_modules=["q_proj", "v_proj"], router_layer=stream_args.router_layer))
    collator = PromptAnswerCollator(tokenizer.pad_token_id)
    for task in tasks:
        model.add_task(task.name)
        rows = tokenize_examples(tokenizer, task.train, max_length=stream_args.max_length)
        Trainer(model=model, args=train_args, train_dataset=rows, data_collator=collator,
                callbacks=[ASRCallback()]).train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        model.save_pretrained(f"{train_args.output_dir}/bank")
        counts = model.base_model.router.class_counts.tolist()
        print(f"tasks {model.tasks}; router samples per class (base first) {counts}")
        print(f"saved {train_args.output_dir}/bank")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it, multi-process runs crash at exit now and then


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
