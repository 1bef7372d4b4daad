"""Merge Analytic Subspace Routing (Any-SSR) banks trained apart into one bank, and check the merged router.

    python examples/custom_loop.py --output-dir runs/a --tasks reverse shout
    python examples/custom_loop.py --output-dir runs/b --tasks initials echo
    python examples/merge_banks.py runs/a/bank runs/b/bank --output runs/merged

``peft_asr.merge_banks`` works on the files alone: the router statistics add up, so the merged router equals the
router trained jointly on all the tasks, and every task keeps its LoRA subspace unchanged. The banks must share the
base model, the LoRA shape and the router settings, and their task names must be disjoint. The script then loads the
merged bank and routes the eval prompts of every task.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel

import peft_asr  # noqa: F401  (registers the ASR PEFT type)
from peft_asr import merge_banks
from peft_asr.cl import prompt_batches
from peft_asr.demo import demo_stream
from tiny_model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("banks", nargs="+", help="two or more bank folders")
    parser.add_argument("--output", required=True, help="new folder for the merged bank (must not exist)")
    parser.add_argument("--model-path", default=None, help="the banks' base model: folder, 'smollm2' or none")
    args = parser.parse_args()

    merged = merge_banks(args.banks, args.output)
    torch.manual_seed(0)
    base, tokenizer = load(args.model_path)
    model = PeftModel.from_pretrained(base, str(merged)).eval()
    print(f"merged {len(args.banks)} banks into {merged}: tasks {model.tasks}")
    stream = demo_stream(n_train=1, n_eval=4, tasks=tuple(model.tasks))  # same seed: the same eval rows
    prompts = [row["prompt"] for task in stream for row in task.eval]
    expected = [task.name for task in stream for _ in task.eval]
    routed = [r for batch in prompt_batches(tokenizer, prompts) for r in model.route(**batch)]
    print(f"routing after the merge: {sum(r == e for r, e in zip(routed, expected))}/{len(prompts)} eval prompts "
          "to their own task")


if __name__ == "__main__":
    main()
