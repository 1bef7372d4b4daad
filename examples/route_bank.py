"""Load a saved Analytic Subspace Routing (Any-SSR) bank and route prompts: print each prompt's task and scores,
then generate with every row routed to its own task in one pass.

    python examples/route_bank.py runs/loop/bank "Rewrite the list: owl, fox, bee" "Rewrite the list: red, teal"

``--model-path`` must name the base model the bank was trained on (the default is the same tiny model as the other
examples). A bank on the Hub loads the same way: pass ``org/bank`` instead of a folder.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel

import peft_asr  # noqa: F401  (registers the ASR PEFT type: needed before loading a bank)
from peft_asr.cl import prompt_batches
from tiny_model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bank", help="bank folder (or Hub repo id)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--model-path", default=None, help="causal LM folder, 'smollm2', or none: a tiny model")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    base, tokenizer = load(args.model_path)
    model = PeftModel.from_pretrained(base, args.bank).eval()
    print(f"bank {args.bank}: tasks {model.tasks}")
    batch = next(prompt_batches(tokenizer, args.prompts, batch_size=len(args.prompts)))
    routes = model.route(**batch)  # one task per row ("__base__": the plain base model)
    scores = model.route_scores(**batch)  # (B, T) ridge scores, columns in `model.tasks` order
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for prompt, task, row, answer in zip(args.prompts, routes, scores.tolist(), answers):
        shown = ", ".join(f"{t} {s:+.2f}" for t, s in zip(model.tasks, row))
        print(f"{prompt!r} -> {task} ({shown}) -> {answer!r}")


if __name__ == "__main__":
    main()
