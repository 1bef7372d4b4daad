"""What fitting the router adds to training a task, with the features harvested from training and without.

One task's rows (O-LoRA yelp from ../shared, full prompts in the chat template; the demo stream's first task when
../shared is absent) train a fresh ASR model for ``--epochs`` with the HF ``Trainer`` and ``ASRCallback``, once with
``harvest=False`` (the separate router pass over the rows after training: the behaviour before the harvest) and once
with ``harvest=True``, alternating, ``--reps`` times. Per run:

* ``train``: wall time of ``trainer.train()`` minus the router fit at its end (the harvest's work during training
  included);
* ``fit``: the router fit at the end (``ASRCallback.fit_seconds``: the pass over the rows training did not see, and
  the solve's statistics);
* ``harvest``: the harvest's own work (reading the rows' keys before training, pooling in training forwards);
* router cost = ``(fit + harvest) / (train - harvest)``: what the router adds to the training it rides on.

The routers of the two variants are compared (max |W| difference relative to max |W|: float32 round-off of other
batch shapes). Medians over the reps.

    python benchmarks/perf_router_harvest.py
    python benchmarks/perf_router_harvest.py --rows 32 --reps 1 --model stories --router-layer 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHARED_DATA, add_device_args, add_model_arg, finish, load_causal_lm, machine_line,  # noqa: E402
                    md_table, versions)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arg(p)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--router-layer", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-markdown", action="store_true")
    add_device_args(p)
    return p.parse_args(argv)


def task_rows(args) -> tuple[str, list[dict]]:
    if (SHARED_DATA / "olora" / "yelp").is_dir():
        from peft_asr.cl import load_olora_task

        task = load_olora_task(SHARED_DATA / "olora", "yelp", max_train=args.rows, max_eval=1, seed=0)
        return "O-LoRA yelp", list(task.train)
    from peft_asr.demo.stream import demo_stream

    task = demo_stream(n_train=args.rows, n_eval=1, seed=0)[0]
    return f"demo {task.name}", list(task.train)


def one_run(args, harvest: bool, rows, out: str) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from peft_asr import ASRCallback, ASRConfig
    from peft_asr.cl.tokenization import PromptAnswerCollator, tokenize_examples

    base, tokenizer = load_causal_lm(args.model, args.device, args.dtype)  # a fresh model per run
    model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                           target_modules=["q_proj", "v_proj"], router_layer=args.router_layer))
    model.add_task("task")
    data = tokenize_examples(tokenizer, rows, max_length=args.max_length)
    callback = ASRCallback(progress=False, harvest=harvest)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
                              num_train_epochs=args.epochs, report_to=[], save_strategy="no", logging_strategy="no",
                              use_cpu=args.device == "cpu", disable_tqdm=True, seed=0, dataloader_drop_last=False)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=PromptAnswerCollator(tokenizer.pad_token_id),
                      callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    report = callback.harvest_report
    train = total - callback.fit_seconds
    cost = (callback.fit_seconds + report["seconds"]) / (train - report["seconds"])
    weight = model.base_model.router.solve().weight.detach().cpu().clone()
    return {"harvest": harvest, "train_s": train, "fit_s": callback.fit_seconds, "harvest_s": report["seconds"],
            "router_cost": cost, "harvested_rows": report["harvested_rows"], "blocker": report["blocker"],
            "skipped_calls": report["skipped_calls"], "weight": weight}


def main(argv=None) -> int:
    args = parse_args(argv)
    source, rows = task_rows(args)
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for rep in range(args.reps):
            for harvest in (False, True):
                torch.manual_seed(0)
                run = one_run(args, harvest, rows, out)
                print(f"rep {rep} harvest={harvest}: train {run['train_s']:.1f} s, fit {run['fit_s']:.2f} s, "
                      f"harvest {run['harvest_s']:.2f} s, router cost {100 * run['router_cost']:.2f}%", flush=True)
                runs.append(run)
    by = {h: [r for r in runs if r["harvest"] is h] for h in (False, True)}
    ref, new = by[False][0]["weight"], by[True][0]["weight"]
    weight_diff = float((new - ref).abs().max() / ref.abs().max())
    summary = {}
    for h, name in ((False, "separate pass"), (True, "harvested")):
        summary[name] = {k: statistics.median(r[k] for r in by[h]) for k in ("train_s", "fit_s", "harvest_s",
                                                                               "router_cost")}
        summary[name]["harvested_rows"] = by[h][0]["harvested_rows"]
        summary[name]["blocker"] = by[h][0]["blocker"]
    for r in runs:
        r.pop("weight")
    results = {"command": "python benchmarks/perf_router_harvest.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(args.device), "source": source, "rows": len(rows), "epochs": args.epochs,
               "batch_size": args.batch_size, "model": args.model or "embedded SmolLM2-135M-Instruct",
               "runs": runs, "summary": summary, "weight_relative_difference": weight_diff}

    def markdown(res) -> str:
        table = md_table(
            ["router features", "training (s)", "router fit at the end (s)", "harvest work (s)", "router cost",
             "rows harvested"],
            [[name, f"{s['train_s']:.1f}", f"{s['fit_s']:.2f}", f"{s['harvest_s']:.2f}",
              f"{100 * s['router_cost']:.2f}%", f"{s['harvested_rows']} / {res['rows']}"]
             for name, s in res["summary"].items()])
        return (
            "## Router fit riding on training (`benchmarks/perf_router_harvest.py`)\n\n"
            f"Command: `{res['command']}`\n\n{machine_line(res['versions'])}\n\n"
            f"Model {res['model']} ({args.dtype}), {res['source']}: {res['rows']} rows, {res['epochs']} epoch(s) at "
            f"batch {res['batch_size']}, Trainer + ASRCallback. Router cost = (router fit at the end + harvest work) / "
            "(training - harvest work). Medians of "
            f"{args.reps} runs per variant, alternating.\n\n{table}\n\n"
            f"The two routers differ by {res['weight_relative_difference']:.1e} of max |W| (float32 round-off of "
            "other batch shapes).\n")

    return finish("perf_router_harvest", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
