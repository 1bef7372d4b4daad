"""What a training step costs: an ASR subspace against a PEFT LoRA, and the loss from the answer positions' logits.

The continual-learning benchmark trains every method on prompt/answer rows whose labels are the answer's few tokens.
The model's own loss runs the LM head over every position of the batch; ``cl_methods.answer_loss_trainer`` asks the
model for the logits of the positions that predict a labelled token only (``logits_to_keep``), the same loss. This
script times one optimiser step (forward, loss, backward, AdamW step) of:

* ``lora``: a PEFT LoRA in every block (the SeqLoRA / replay / multi-task adapter of the benchmark);
* ``asr``: an ASR subspace (blocks at and above ``--router-layer``, the task pinned as in training);

each with the model's loss and with the answer-position loss, in interleaved rounds on the same batches (O-LoRA
amazon's training rows as the benchmark cuts them, 128 tokens, middle truncation; the demo stream's first task when
../shared is absent). Medians, and the difference of the two losses on the first batch before any update.

    python benchmarks/perf_train_step.py
    python benchmarks/perf_train_step.py --model stories --reps 2 --router-layer 2 --no-markdown
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHARED_DATA, add_device_args, add_model_arg, finish, load_causal_lm, machine_line,  # noqa: E402
                    md_table, round_robin, versions)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arg(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="training rows cut to this many tokens (the benchmark's)")
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-markdown", action="store_true")
    add_device_args(p)
    return p.parse_args(argv)


def batches(args, tokenizer) -> tuple[str, list[dict]]:
    from peft_asr.cl import PromptAnswerCollator, tokenize_examples

    n = args.batch_size * (args.reps + 1)
    if (SHARED_DATA / "olora" / "amazon").is_dir():
        from peft_asr.cl import load_olora_task

        source, rows = "O-LoRA amazon", load_olora_task(SHARED_DATA / "olora", "amazon", max_train=n, max_eval=1, seed=0).train
    else:
        from peft_asr.demo.stream import demo_stream

        task = demo_stream(n_train=n, n_eval=1, seed=0)[0]
        source, rows = f"demo {task.name}", task.train
    data = tokenize_examples(tokenizer, list(rows), max_length=args.max_length, use_chat_template=False,
                             truncation="middle")
    collate = PromptAnswerCollator(tokenizer.pad_token_id)
    return source, [collate(data[k:k + args.batch_size]) for k in range(0, len(data) - args.batch_size + 1,
                                                                          args.batch_size)]


def adapted(args, kind: str):
    from peft import LoraConfig, get_peft_model

    from peft_asr import ASRConfig

    base, tokenizer = load_causal_lm(args.model, args.device, args.dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "lora":
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]))
    else:
        model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                               target_modules=["q_proj", "v_proj"], router_layer=args.router_layer))
        model.add_task("task")
    return model.train(), tokenizer


def main(argv=None) -> int:
    from transformers import TrainingArguments

    from cl_methods import answer_loss_trainer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {kind: adapted(args, kind) for kind in ("lora", "asr")}
    source, data = batches(args, models["lora"][1])
    data = [{k: v.to(args.device) for k, v in b.items()} for b in data]
    steps, first = {}, {}
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, use_cpu=args.device == "cpu", report_to=[])
        for kind, (model, _) in models.items():
            trainer = answer_loss_trainer()(model=model, args=targs)
            with torch.no_grad():  # the two losses on the first batch, before any update
                batch = data[0]
                first[kind] = abs(float(model(**batch).loss) - float(trainer.compute_loss(
                    model, dict(batch), num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())))
            optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            for loss_name in ("model loss", "answer positions"):
                feed = itertools.cycle(data)

                def step(model=model, trainer=trainer, optimiser=optimiser, loss_name=loss_name, feed=feed):
                    batch = next(feed)
                    if loss_name == "model loss":
                        loss = model(**batch).loss
                    else:
                        loss = trainer.compute_loss(model, dict(batch),
                                                    num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
                    loss.backward()
                    optimiser.step()
                    optimiser.zero_grad()

                steps[f"{kind}, {loss_name}"] = step
        timed = round_robin(steps, args.reps, args.device)
    for name, t in timed.items():
        print(f"{name}: {t['median_s']:.2f} s / step", flush=True)
    ratio = {kind: timed[f"{kind}, answer positions"]["median_s"] / timed[f"{kind}, model loss"]["median_s"]
             for kind in models}
    results = {"command": "python benchmarks/perf_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(args.device), "model": args.model or "embedded SmolLM2-135M-Instruct",
               "source": source, "batch_size": args.batch_size, "max_length": args.max_length,
               "padded_length": [int(b["input_ids"].shape[1]) for b in data],
               "labelled_tokens": [int((b["labels"] != -100).sum()) for b in data], "reps": args.reps,
               "timings": timed, "answer_vs_model_loss": ratio,
               "asr_vs_lora": timed["asr, model loss"]["median_s"] / timed["lora, model loss"]["median_s"],
               "first_batch_loss_difference": first}

    def markdown(res) -> str:
        table = md_table(["adapter", "model loss (s / step)", "answer positions (s / step)", "ratio"],
                         [[kind, f"{res['timings'][f'{kind}, model loss']['median_s']:.2f}",
                           f"{res['timings'][f'{kind}, answer positions']['median_s']:.2f}",
                           f"{res['answer_vs_model_loss'][kind]:.3f}x"] for kind in ("lora", "asr")])
        lengths = res["padded_length"]
        return (
            "## A training step (`benchmarks/perf_train_step.py`)\n\n"
            f"Command: `{res['command']}`\n\n{machine_line(res['versions'])}\n\n"
            f"Model {res['model']} ({args.dtype}), {res['source']} rows at batch {res['batch_size']}, cut to "
            f"{res['max_length']} tokens (padded batches of {min(lengths)}-{max(lengths)} tokens, "
            f"{min(res['labelled_tokens'])}-{max(res['labelled_tokens'])} labelled tokens a batch); one AdamW step. "
            f"Medians of {res['reps']} interleaved rounds. `lora`: a PEFT LoRA (r 8, q/v) in every block; `asr`: a "
            f"subspace in the blocks at and above {args.router_layer}.\n\n{table}\n\n"
            f"ASR against PEFT LoRA, model loss: {res['asr_vs_lora']:.3f}x. The two losses differ on the first batch "
            "by " + ", ".join(f"{v:.1e} ({k})" for k, v in res["first_batch_loss_difference"].items()) + ".\n")

    return finish("perf_train_step", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
