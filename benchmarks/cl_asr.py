"""Analytic Subspace Routing in the continual-learning benchmark, and the two variants on the same subspaces.

* ``asr``        this package with its defaults: one LoRA subspace per task in the blocks at and above
                 ``router_layer``; after each task's training the router is fitted on the task's training prompts
                 (encoded as the evaluation encodes prompts: full length, the same truncation); everyday prompts
                 (``peft_asr.demo.stream.general_prompts``) are fitted to the base route before the first task.
* ``asr-paper``  the very subspaces ``asr`` trained (copied from its final bank: a subspace never changes after its
                 stage), with the paper's router (docs/migration.md): mean pooling, ridge head, a 10,000-wide
                 random expansion without activation, ridge 100, one shared Gram matrix. Its router is fitted stage
                 by stage exactly as ``asr``'s, so its stage ``t`` routes among tasks ``0..t``.
* ``oracle``     the same subspaces with the true task id (every prompt pinned to its task): the ceiling routing
                 can reach; ``oracle - asr`` is what routing costs. Measured once, after the last stage: task
                 ``i``'s subspace is frozen after stage ``i``, so its score right after its stage is its final one
                 (``R[i][i] = R[T-1][i]``, recorded as derived, not measured; BWT is 0 by construction).

All three answer through one ``AnswerCache`` (``cl_eval``): a (prompt, route) pair is generated once. They run in
the order ``asr``, ``oracle``, ``asr-paper``: the oracle adds its pinned answers to asr's final cache, and asr-paper
starts from that cache, so a prompt any of the three routes to its own task gets one and the same answer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from cl_eval import AnswerCache, general_check, routing_record
from cl_methods import folder_bytes, train

PAPER_ROUTER = dict(feature_dim=10000, activation="none", ridge=100.0, router_pooling="mean", router_head="ridge",
                    per_task_statistics=False)  # docs/migration.md, "Reproducing the paper's router settings"


def asr_config(args, paper: bool = False):
    from peft_asr import ASRConfig

    return ASRConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, target_modules=list(args.targets),
                     router_layer=args.router_layer, **(PAPER_ROUTER if paper else {}))


def asr_final(ctx) -> Path:
    """The checkpoint of ``asr``'s last stage: its bank and its answer cache."""
    return ctx.work.parent / "asr" / f"stage-{len(ctx.tasks) - 1}"


def _load_cache(ctx, folder: Optional[Path]) -> AnswerCache:
    saved = json.loads((folder / "answers.json").read_text()) if folder is not None else None
    return AnswerCache(ctx.base_answers, saved)


def _save_cache(cache: AnswerCache, folder: Path) -> None:
    tmp = folder / "answers.json.tmp"
    tmp.write_text(json.dumps(cache.pairs))
    os.replace(tmp, folder / "answers.json")


def _subspace_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".asr_A." in n or ".asr_B." in n}


class ASR:
    name = "asr"
    paper = False

    def __init__(self, ctx) -> None:
        self.ctx, self.model, self.cache = ctx, None, None

    def begin(self, folder: Optional[Path]) -> None:
        from peft import PeftModel, get_peft_model

        ctx = self.ctx
        if folder is None:
            self.model = get_peft_model(ctx.model, asr_config(ctx.args, self.paper))
            self.model.fit_router(ctx.evaluator.batches(ctx.general_fit), task=None, progress=False)
            self.cache = self.initial_cache()
        else:
            self.model = PeftModel.from_pretrained(ctx.model, str(folder / "bank"))
            self.cache = _load_cache(ctx, folder)

    def initial_cache(self) -> AnswerCache:
        return _load_cache(self.ctx, None)

    def add(self, stage: int) -> dict:
        task = self.ctx.tasks[stage]
        self.model.add_task(task.name)
        out = train(self.ctx, self.model, task.train, self.ctx.work / f"trainer-{stage}")
        return {**out, "train_rows": len(task.train)}

    def train(self, stage: int) -> dict:
        timing = self.add(stage)
        task = self.ctx.tasks[stage]
        start = time.perf_counter()
        self.model.fit_router(self.ctx.evaluator.batches([r["prompt"] for r in task.train]), task=task.name,
                              progress=False)
        self.model.base_model.router.solve()  # the closed-form solve, timed here rather than at the first route
        timing["router_s"] = round(time.perf_counter() - start, 2)
        return timing

    def evaluate(self, stage: int, scope: list[int]) -> dict:
        ev = self.ctx.evaluator
        self.model.eval()
        need = sorted(set(scope) | set(range(stage + 1)))
        prompts = [row["prompt"] for i in need for row in ev.tasks[i].eval]
        flat, routes, start = ev.routes(self.model, prompts), {}, 0
        for i in need:
            routes[i] = flat[start:start + len(ev.tasks[i].eval)]
            start += len(ev.tasks[i].eval)
        before = self.cache.generated
        items = self.cache.score(self.model, ev, {i: routes[i] for i in scope})
        return {"items": items, "routing": routing_record(ev, routes, stage + 1),
                "routes": {str(i): routes[i] for i in scope},  # per prompt: what cl_gaps splits the gaps by
                "generated": self.cache.generated - before}

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder / "bank"))
        _save_cache(self.cache, folder)

    def finish(self, folder: Path) -> dict:
        ctx, bank = self.ctx, folder / "bank"
        subspaces = sum(p.numel() for p in _subspace_params(self.model).values())
        return {"trainable_params": subspaces // len(ctx.tasks), "bank_bytes": folder_bytes(bank),
                "bank_files": {f.name: f.stat().st_size for f in sorted(bank.iterdir()) if f.is_file()},
                "answers_generated": len(self.cache.pairs),
                "general": general_check(self.model, ctx.evaluator, ctx.general_heldout, ctx.general_base, True)}

    def close(self) -> None:
        if self.model is not None:
            self.model.unload()
            self.model = None


class ASRPaper(ASR):
    name = "asr-paper"
    paper = True

    def begin(self, folder: Optional[Path]) -> None:
        from peft import PeftModel

        source = asr_final(self.ctx)
        if not (source / "bank").is_dir():
            raise RuntimeError(f"asr-paper uses the subspaces of asr's final bank ({source / 'bank'}), which is "
                               "absent: run asr first (cl_benchmark.py runs it before asr-paper when asked for both).")
        trained = PeftModel.from_pretrained(self.ctx.model, str(source / "bank"))
        self.weights = {n: p.detach().clone() for n, p in _subspace_params(trained).items()}
        trained.unload()
        super().begin(folder)

    def initial_cache(self) -> AnswerCache:
        return _load_cache(self.ctx, asr_final(self.ctx))  # the pairs asr generated: the same subspaces

    def add(self, stage: int) -> dict:
        """The task's subspace, copied from asr's bank (trained there: no training here)."""
        import torch

        name = self.ctx.tasks[stage].name
        self.model.add_task(name)
        mine = {n: p for n, p in _subspace_params(self.model).items() if n.endswith(f".{name}")}
        if not mine or set(mine) - set(self.weights):
            raise RuntimeError(f"asr's bank has no subspace {name!r} of the same shape; was it trained with other "
                               "settings? Run asr again with these settings.")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(self.weights[n])
        return {"train_s": 0.0, "steps": 0, "train_rows": 0, "note": "subspace of asr"}


def run_oracle(ctx) -> dict:
    """The subspaces of asr's final bank, every prompt pinned to its own task; one final evaluation."""
    from peft import PeftModel

    source = asr_final(ctx)
    if not (source / "bank").is_dir():
        raise RuntimeError(f"oracle uses asr's final bank ({source / 'bank'}), which is absent: run asr first.")
    model = PeftModel.from_pretrained(ctx.model, str(source / "bank"))
    try:
        cache = _load_cache(ctx, source)
        start = time.perf_counter()
        items = cache.score(model, ctx.evaluator, {i: [t.name] * len(t.eval) for i, t in enumerate(ctx.tasks)})
        _save_cache(cache, source)  # the pinned answers join asr's: asr-paper starts from them
        last = len(ctx.tasks) - 1
        stage = {"stage": last, "task": ctx.tasks[last].name, "items": {str(i): v for i, v in items.items()},
                 "train_s": 0.0, "router_s": 0.0, "eval_s": round(time.perf_counter() - start, 2),
                 "generated": cache.generated}
        return {"stages": [stage], "derived": {"entries": [[i, i] for i in range(last)],
                                               "why": "R[i][i] = R[T-1][i]: task i's subspace is frozen after stage i"},
                "trainable_params": sum(p.numel() for p in _subspace_params(model).values()) // len(ctx.tasks)}
    finally:
        model.unload()
