"""Analytic Subspace Routing (Any-SSR) in a plain PyTorch loop, without the Trainer.

    python examples/custom_loop.py --output-dir runs/loop
    python examples/custom_loop.py --output-dir runs/a --tasks reverse shout      # two banks trained apart,
    python examples/custom_loop.py --output-dir runs/b --tasks initials echo      # merged by merge_banks.py

For every task: ``add_task`` (a new LoRA subspace in the blocks at and above ``router_layer``; it alone is
trainable), an optimizer over the trainable parameters, a few steps, then ``fit_router`` over the task's training
batches (the same call ``ASRCallback`` makes at the end of ``Trainer.train``). At the end the eval prompts of every
task are routed in one mixed batch and the bank is saved to ``<output-dir>/bank``.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

import peft_asr  # noqa: F401  (registers the ASR PEFT type)
from peft_asr import ASRConfig
from peft_asr.cl import PromptAnswerCollator, prompt_batches, tokenize_examples
from peft_asr.demo import demo_stream
from tiny_model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model-path", default=None, help="causal LM folder, 'smollm2', or none: a tiny model")
    parser.add_argument("--tasks", nargs="+", default=["reverse", "shout"], help="tasks of the built-in stream")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--router-layer", type=int, default=2)
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load(args.model_path)
    model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                            target_modules=["q_proj", "v_proj"], router_layer=args.router_layer))
    collate = PromptAnswerCollator(tokenizer.pad_token_id)
    stream = demo_stream(n_train=args.steps * args.batch_size, n_eval=4, tasks=tuple(args.tasks))
    for task in stream:
        model.add_task(task.name)  # only this task's subspace is trainable now; older ones stay frozen
        rows = tokenize_examples(tokenizer, task.train, max_length=128)
        loader = DataLoader(rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model.train()  # training mode: every row uses the task being trained (no routing)
        for step, batch in enumerate(loader, 1):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"{task.name}: {step} steps, last loss {loss.item():.3f}")
        # the router absorbs the task's prompts (labels == -100 marks them); no gradients, shallow blocks only
        model.fit_router(DataLoader(rows, batch_size=args.batch_size, collate_fn=collate), task=task.name,
                         progress=False)

    model.eval()  # eval mode: every row is routed
    prompts = [row["prompt"] for task in stream for row in task.eval]
    expected = [task.name for task in stream for _ in task.eval]
    routed = [r for batch in prompt_batches(tokenizer, prompts) for r in model.route(**batch)]
    correct = sum(r == e for r, e in zip(routed, expected))
    print(f"routing: {correct}/{len(prompts)} eval prompts to their own task")
    model.save_pretrained(f"{args.output_dir}/bank")
    print(f"saved {args.output_dir}/bank (tasks {model.tasks}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
