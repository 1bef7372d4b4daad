"""Pooled router features of real prompts at several blocks and with several poolings, cached for the router grid
(``benchmarks/router_variants.py``).

One pass per prompt over the first ``max(--blocks)`` blocks of the model. At every block of ``--blocks`` the hidden
state entering it goes through the model's final norm (as the router's features do) and is pooled over the prompt's
real tokens in each of these ways:

* ``mean``: masked mean over every real token (the package's ``masked_mean``; the router's feature today);
* ``last``: the last real token;
* ``max``: masked max over real tokens;
* ``user``: mean over the user's text only (the chat template's system prompt and turn markers left out);
* ``instr`` / ``rest``: mean over the task instruction and over the rest of the user's text (O-LoRA prompts, whose
  template marks the instruction; other prompts have no mark and get ``user`` twice).

Prompts are the full prompts in the chat template (one user turn plus the generation prompt), truncated only beyond
the model's context. Positions come from the attention mask, as the router's own pass derives them. The ``mean`` at
the deepest block is checked against ``router_features`` of an ASR model with that ``router_layer``.

Each (source, task, split) is one file in ``--cache``, written when complete, so an interrupted run resumes.

    python benchmarks/router_features.py --cache /tmp/router_features
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = REPO.parent / "shared" / "data"

TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
OLORA_LONG_ORDER = ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                    "MultiRC", "BoolQA", "WiC"]  # O-LoRA long order (scripts/long.sh) without the absent yahoo
POOLS = ("mean", "last", "max", "user", "instr", "rest")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def olora_rows(task: str, split: str, n: int) -> list[tuple[str, int]]:
    """(prompt, length of its instruction part in characters) of the upstream O-LoRA input."""
    root = SHARED / "olora"
    instructions = read_json(root / "instructions.json")
    labels = read_json(root / task / "labels.json")
    rows = []
    for r in read_json(root / task / f"{split}.json")[:n]:
        if task == "COPA":  # the question is inside the sentence: no separate instruction
            rows.append((r["sentence"] + "\nAnswer:", 0))
        else:
            head = instructions[task] + "Option: " + ", ".join(labels) + " \n"
            rows.append((head + r["sentence"] + "\nAnswer:", len(head)))
    return rows


def sources(n_train: int, n_test: int) -> list[tuple[str, str, str, list[tuple[str, int]]]]:
    """(source, task, split, rows) for every prompt set of the grid, most needed first."""
    out = []
    for task in OLORA_LONG_ORDER:
        for split, n in (("train", n_train), ("test", n_test)):
            out.append(("olora", task, split, olora_rows(task, split, n)))
    from peft_asr.demo.stream import demo_stream, general_prompts

    for task in demo_stream(n_train=320, n_eval=40, seed=0):
        out.append(("demo", task.name, "train", [(r["prompt"], 0) for r in task.train]))
        out.append(("demo", task.name, "test", [(r["prompt"], 0) for r in task.eval]))
    out.append(("demo", "general", "test", [(p, 0) for p in general_prompts(60, seed=0)]))
    long_prompts = ("Py150", "20Minuten")  # thousands of tokens per prompt: last, so the short tasks are cached first
    for task in sorted(TRACE_ORDER, key=lambda t: t in long_prompts):
        if not (SHARED / "trace" / task / "train.json").exists():
            continue  # MeetingBank ships its eval split only: no task to learn, nothing to route to
        for split, file, n in (("train", "train.json", n_train), ("test", "eval.json", n_test)):
            path = SHARED / "trace" / task / file
            if path.exists():
                out.append(("trace", task, split, [(r["prompt"], 0) for r in read_json(path)[:n]]))
    return out


def encode(tok, rows: list[tuple[str, int]], max_length: int) -> list[dict]:
    """Token ids and the user / instruction token masks of every prompt (from character offsets)."""
    out = []
    for prompt, instr_chars in rows:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        start = text.index(prompt)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        user = [start <= a and b <= start + len(prompt) and b > a for a, b in offsets]
        instr = [u and b <= start + instr_chars for u, (a, b) in zip(user, offsets)]
        if len(ids) > max_length:  # beyond the context only: cut the middle of the prompt, keep both ends
            keep = list(range(max_length // 2)) + list(range(len(ids) - (max_length - max_length // 2), len(ids)))
            ids, user, instr = [ids[i] for i in keep], [user[i] for i in keep], [instr[i] for i in keep]
        out.append({"ids": ids, "user": user, "instr": instr if any(instr) else user,
                    "rest": [u and not i for u, i in zip(user, instr)] if any(instr) else user})
    return out


class _Stop(Exception):
    pass


def pooled_features(model, blocks_list, final_norm, encoded: list[dict], blocks: list[int], pad_id: int,
                    tokens_per_batch: int) -> dict[str, torch.Tensor]:
    """{f"{pool}@{block}": (N, d) float64} for every prompt, in order."""
    from peft_asr.tuner.features import masked_mean, positions_from_mask

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["ids"]))
    result: dict[str, list] = {}
    captured: dict[int, torch.Tensor] = {}
    deepest = max(blocks)

    def make_hook(b):
        def hook(_module, args, kwargs):
            captured[b] = (args[0] if args else kwargs["hidden_states"]).detach()
            if b == deepest:
                raise _Stop
        return hook

    handles = [blocks_list[b].register_forward_pre_hook(make_hook(b), with_kwargs=True) for b in blocks]
    rows_out: list[tuple[int, dict]] = []
    try:
        start = 0
        while start < len(order):
            width = len(encoded[order[start]]["ids"])
            take = 1
            while start + take < len(order) and (take + 1) * len(encoded[order[start + take]]["ids"]) <= tokens_per_batch:
                take += 1
            rows = order[start:start + take]
            start += take
            width = max(len(encoded[i]["ids"]) for i in rows)

            def pad(key, fill, i):  # left padding, as for generation
                seq = encoded[i][key]
                return [fill] * (width - len(seq)) + list(seq)

            ids = torch.tensor([pad("ids", pad_id, i) for i in rows])
            mask = torch.tensor([[0] * (width - len(encoded[i]["ids"])) + [1] * len(encoded[i]["ids"]) for i in rows])
            user = torch.tensor([pad("user", False, i) for i in rows])
            instr = torch.tensor([pad("instr", False, i) for i in rows])
            rest = torch.tensor([pad("rest", False, i) for i in rows])
            captured.clear()
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
            except _Stop:
                pass
            real = mask.bool()
            feats = {}
            with torch.no_grad():
                for b in blocks:
                    h = captured[b]
                    normed = final_norm(h)
                    feats[f"mean@{b}"] = masked_mean(h, real, transform=final_norm)
                    feats[f"last@{b}"] = normed[:, -1].double()  # left padding: the last position is real
                    feats[f"max@{b}"] = normed.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1).double()
                    feats[f"user@{b}"] = masked_mean(h, user, transform=final_norm)
                    feats[f"instr@{b}"] = masked_mean(h, instr, transform=final_norm)
                    feats[f"rest@{b}"] = masked_mean(h, rest, transform=final_norm)
            for j, i in enumerate(rows):
                rows_out.append((i, {k: v[j] for k, v in feats.items()}))
    finally:
        for h in handles:
            h.remove()
    rows_out.sort(key=lambda p: p[0])
    for key in rows_out[0][1]:
        result[key] = torch.stack([r[key] for _, r in rows_out])
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--model", default=None, help="HF causal LM folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--train-per-task", type=int, default=300)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--only", nargs="*", default=None, help="sources to run (olora, demo, trace)")
    args = p.parse_args(argv)
    from peft import get_peft_model

    from peft_asr import ASRConfig
    from peft_asr.cl.default_model import load_model_and_tokenizer
    from peft_asr.tuner.blocks import find_blocks, find_final_norm

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    name, blocks_list = find_blocks(model)
    final_norm = find_final_norm(model, name)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    max_length = int(getattr(model.config, "max_position_embeddings", 8192))
    todo = [s for s in sources(args.train_per_task, args.test_per_task) if args.only is None or s[0] in args.only]
    checked = False
    for source, task, split, rows in todo:
        path = cache / f"{source}__{task}__{split}.pt"
        if path.exists():
            continue
        enc = encode(tok, rows, max_length)
        if not checked:  # the `mean` pooling is the router's own feature (mean pooling): checked before any long pass
            deepest = max(args.blocks)
            sample = enc[:4]
            feats = pooled_features(model, blocks_list, final_norm, sample, args.blocks, tok.pad_token_id,
                                    args.tokens_per_batch)
            peft_model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                         router_layer=deepest, router_pooling="mean"))
            width = max(len(e["ids"]) for e in sample)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(e["ids"])) + e["ids"] for e in sample])
            mask = torch.tensor([[0] * (width - len(e["ids"])) + [1] * len(e["ids"]) for e in sample])
            ref = peft_model.router_features({"input_ids": ids, "attention_mask": mask})
            diff = float((ref - feats[f"mean@{deepest}"][:4]).abs().max())
            print(f"check: mean@{deepest} vs router_features max |diff| = {diff:.2e}", flush=True)
            if diff > 1e-6:
                sys.exit("the cached `mean` pooling differs from router_features")
            model = peft_model.unload()
            name, blocks_list = find_blocks(model)
            final_norm = find_final_norm(model, name)
            checked = True
        t0 = time.perf_counter()
        feats = pooled_features(model, blocks_list, final_norm, enc, args.blocks, tok.pad_token_id, args.tokens_per_batch)
        seconds = time.perf_counter() - t0
        info = {"prompts": len(enc), "tokens": sum(len(e["ids"]) for e in enc), "seconds": seconds,
                "max_tokens": max(len(e["ids"]) for e in enc)}
        tmp = path.with_suffix(".tmp")
        torch.save({"features": feats, "info": info}, tmp)
        tmp.replace(path)
        print(f"{source}/{task}/{split}: {info['prompts']} prompts, {info['tokens']} tokens (max {info['max_tokens']}), "
              f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
