"""The ``peft-asr`` command: ``demo``, ``train``, ``eval``, ``route``, ``info``, ``export``.

Bad input (a missing file, an unknown task, a model that does not fit the bank) ends with one line on stderr,
``peft-asr: error: ...``, and exit status 2, never a traceback. ``PEFT_ASR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "demo": "peft-asr demo --quick\n  peft-asr demo --output-dir my-demo --model ./my-causal-lm",
    "train": "peft-asr train --config stream.yaml",
    "eval": "peft-asr eval asr-demo/bank --task json:reverse=rows.json --task trace:../shared/data/trace/FOMC",
    "route": 'peft-asr route asr-demo/bank "Rewrite the list: owl, fox, bee" "Echo the objects: cup lamp"',
    "info": "peft-asr info asr-demo/bank\n  peft-asr info my-org/my-bank --revision refs/pr/3",
    "export": "peft-asr export asr-demo/bank served\n  peft-asr export asr-demo/bank served --tasks reverse echo --model ./my-causal-lm --overwrite",
}

STREAM_YAML = """\
model: null                 # a local causal LM folder; null = the embedded SmolLM2-135M-Instruct
output_dir: asr-stream
method: asr                 # or seqlora
tasks:                      # in training order
  - {kind: trace, path: ../shared/data/trace/FOMC, max_train: 200, max_eval: 50}
  - {kind: olora, path: ../shared/data/olora/agnews, max_train: 200, max_eval: 50}
  - {kind: json, name: mytask, train: train.json, eval: eval.json, metric: exact_match}
  - {kind: hf, name: other, path: json, data_files: {train: t.json, test: e.json}}
asr: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj], router_layer: 4}
training: {per_device_train_batch_size: 8, learning_rate: 0.002, num_train_epochs: 1}
max_new_tokens: 16
"""


class CLIError(Exception):
    """A user-facing error: printed on one line."""


def _task_from_spec(spec: dict):
    from .cl import tasks as data

    if not isinstance(spec, dict) or "kind" not in spec:
        raise CLIError(f"each task needs a `kind` (trace, olora, json or hf), got {spec!r}.")
    kind = spec["kind"]
    limits = {k: spec[k] for k in ("max_train", "max_eval", "seed") if k in spec}
    if kind in ("trace", "olora"):
        if "path" not in spec:
            raise CLIError(f"a {kind} task needs `path` (the task folder), got {spec!r}.")
        folder = Path(spec["path"])
        loader = data.load_trace_task if kind == "trace" else data.load_olora_task
        return loader(folder.parent, folder.name, **limits)
    if kind == "json":
        missing = [k for k in ("name", "train", "eval") if k not in spec]
        if missing:
            raise CLIError(f"a json task needs {missing}, got {spec!r}.")
        task = data.Task(name=spec["name"], train=data.load_prompt_answer_json(spec["train"]),
                         eval=data.load_prompt_answer_json(spec["eval"]), metric=spec.get("metric", "exact_match"))
        return task.subsample(limits.get("max_train"), limits.get("max_eval"), limits.get("seed", 0))
    if kind == "hf":
        spec = dict(spec)
        name = spec.pop("name", None)
        if not name:
            raise CLIError(f"an hf task needs `name`, got {spec!r}.")
        for key in ("kind", "max_train", "max_eval", "seed"):
            spec.pop(key, None)
        task = data.load_hf_task(name, spec)
        return task.subsample(limits.get("max_train"), limits.get("max_eval"), limits.get("seed", 0))
    raise CLIError(f"unknown task kind {kind!r}; use trace, olora, json or hf.")


def _task_from_flag(flag: str):
    """``KIND:PATH`` for eval: ``trace:DIR``, ``olora:DIR``, ``json:NAME=FILE`` (FILE is the eval split)."""
    from .cl import tasks as data

    kind, sep, rest = flag.partition(":")
    if not sep:
        raise CLIError(f"--task must look like trace:DIR, olora:DIR or json:NAME=FILE, got {flag!r}.")
    if kind == "json":
        name, eq, file = rest.partition("=")
        if not eq:
            raise CLIError(f"--task json:NAME=FILE, got {flag!r}.")
        rows = data.load_prompt_answer_json(file)
        return data.Task(name=name, train=[], eval=rows)
    return _task_from_spec({"kind": kind, "path": rest})


def _bank_folder(bank, revision: Optional[str] = None) -> Path:
    """The local folder of BANK: a folder (an interrupted save finished first), or a Hub repo id whose bank files are
    fetched from ``revision`` into the Hub cache (``HF_HUB_OFFLINE=1``: the cached snapshot). Its tensors are checked
    when a model loads them; `info` only describes them."""
    from .bank.io import resolve_bank
    from .tuner.errors import BankError

    try:
        return Path(resolve_bank(bank, check=False, **({"revision": revision} if revision is not None else {})))
    except BankError as err:
        raise CLIError(str(err)) from None


def _read_config(bank, revision: Optional[str] = None):
    """The `ASRConfig` of BANK (a folder or a Hub repo id, see `_bank_folder`), read strictly."""
    from .tuner.config import ASRConfig

    return ASRConfig.from_pretrained(str(_bank_folder(bank, revision)))


def _load_bank(bank: str, model: Optional[str], revision: Optional[str] = None):
    """The bank on its base model, in eval mode, and the tokenizer. The base model is ``model`` (a folder or a Hub
    id), else the one the bank records, loaded through transformers (a Hub id from the Hub cache when offline)."""
    import peft_asr  # noqa: F401  (registers the ASR type)
    from peft import PeftModel

    from .cl.default_model import load_model_and_tokenizer
    from .tuner.config import ASRConfig

    folder = str(_bank_folder(bank, revision))
    config = ASRConfig.from_pretrained(folder)
    base_name = model or config.base_model_name_or_path
    if not base_name:
        raise CLIError("the bank records no base model (`base_model_name_or_path`); pass --model PATH with the model "
                       "it was trained on (a folder or a Hub id).")
    try:
        base, tokenizer = load_model_and_tokenizer(base_name)
    except OSError as err:  # not a folder, not a repo id, not on the Hub or (offline) not in its cache
        origin = "--model" if model else "the bank's base model"
        raise CLIError(f"{origin}: {str(err).rstrip('.')}; pass --model PATH with the base model (a folder or a "
                       "Hub id).") from None
    return PeftModel.from_pretrained(base, folder).eval(), tokenizer  # every file checked before the model changes


def _cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(args.output_dir, quick=args.quick, model=args.model, seed=args.seed, progress=not args.no_progress)
    return 0


def _cmd_train(args) -> int:
    import yaml

    from .tuner.config import ASRConfig
    from .cl.runner import run_stream

    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"config file {path} not found. Example:\n{STREAM_YAML}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    unknown = set(spec) - {"model", "output_dir", "method", "tasks", "asr", "training", "max_new_tokens",
                           "general_prompts"}
    if unknown:
        raise CLIError(f"unknown keys in {path}: {sorted(unknown)}.")
    tasks = [_task_from_spec(t) for t in spec.get("tasks") or []]
    if not tasks:
        raise CLIError(f"{path} lists no tasks.")
    config = ASRConfig(task_type="CAUSAL_LM", **(spec.get("asr") or {}))
    general = None
    if spec.get("general_prompts"):
        general = [line for line in Path(spec["general_prompts"]).read_text().splitlines() if line.strip()]
    out = Path(spec.get("output_dir", "asr-stream"))
    results = run_stream(spec.get("model"), tasks, spec.get("training") or {}, method=spec.get("method", "asr"),
                         asr_config=config, general_prompts=general, output_dir=out,
                         max_new_tokens=int(spec.get("max_new_tokens", 16)))
    out.mkdir(parents=True, exist_ok=True)
    results.save(out / "results.json")
    from .demo.run import format_tables

    print(format_tables({results.method: results}))
    print(f"wrote {out / 'results.json'}" + (f" and the bank {results.info['bank']}" if "bank" in results.info else ""))
    return 0


def _cmd_eval(args) -> int:
    from .cl.runner import evaluate_routing, evaluate_tasks

    model, tokenizer = _load_bank(args.bank, args.model, args.revision)
    tasks = [_task_from_flag(flag) for flag in args.task]
    scores = evaluate_tasks(model, tokenizer, tasks, max_new_tokens=args.max_new_tokens)
    report = {"scores": {t.name: s for t, s in zip(tasks, scores)}}
    known = [t for t in tasks if t.name in model.tasks]
    if known:
        report["routing"] = evaluate_routing(model, tokenizer, known)
    for task, score in zip(tasks, scores):
        print(f"{task.name:<24} {task.metric:<16} {100 * score:6.1f}")
    if known:
        print(f"routing accuracy on {len(known)} known task(s): {100 * report['routing']['accuracy']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_route(args) -> int:
    from .cl.tokenization import prompt_batches

    model, tokenizer = _load_bank(args.bank, args.model, args.revision)
    batch = next(prompt_batches(tokenizer, list(args.prompts), batch_size=len(args.prompts)))
    routes = model.route(**batch)
    scores = model.route_scores(**batch)
    for prompt, route, row in zip(args.prompts, routes, scores.tolist()):
        detail = ", ".join(f"{t}={s:.3f}" for t, s in zip(model.tasks, row))
        print(f"{route:<16} {prompt!r}\n{'':<16} scores: {detail}")
    return 0


def _cmd_info(args) -> int:
    import peft_asr  # noqa: F401

    from .bank.files import STATISTICS_FILE

    bank = _bank_folder(args.bank, args.revision)  # a Hub id: its files in the Hub cache
    config = _read_config(bank)
    sizes = {f.name: f.stat().st_size for f in sorted(bank.iterdir()) if f.is_file()}
    print(f"bank:            {args.bank}" + (f" ({bank})" if str(bank) != args.bank else ""))
    print(f"base model:      {config.base_model_name_or_path}")
    print(f"tasks ({len(config.tasks)}):       {', '.join(config.tasks) or '-'}")
    print(f"LoRA:            r={config.r} alpha={config.lora_alpha} targets={sorted(config.target_modules)} "
          f"layers {config.router_layer}..{(config.base_num_layers or 0) - 1}")
    head = (f"lda, shrinkage {config.router_shrinkage}" if config.router_head == "lda" else f"ridge {config.ridge}")
    print(f"router:          layer {config.router_layer}, pooling {config.router_pooling}, head {head}, feature_dim "
          f"{config.router_dim}, activation {config.activation}, threshold {config.confidence_threshold}")
    print(f"can keep learning: {'yes' if STATISTICS_FILE in sizes else 'no (no router statistics)'}")
    for name, size in sizes.items():
        print(f"  {name:<34} {size / 1e6:9.3f} MB")
    card = bank / "README.md"
    if card.is_file() and "## Evaluation" in card.read_text():
        print(card.read_text().split("## Evaluation", 1)[1].strip())
    return 0


def _cmd_export(args) -> int:
    from .deploy.export_bank import ROUTER_FOLDER, ROUTES_FILE, check_target, check_tasks, export_bank

    check_target(args.out, args.overwrite)  # both before the model is loaded
    check_tasks(_read_config(args.bank, args.revision).tasks, args.tasks)
    model, _ = _load_bank(args.bank, args.model, args.revision)
    out = export_bank(model, args.out, tasks=args.tasks, overwrite=args.overwrite, base_model=args.model)
    routes = json.loads((out / ROUTES_FILE).read_text())
    print(f"wrote {out}")
    for task, folder in routes["routes"].items():
        if folder is not None:
            print(f"  {folder + '/':<24} task {task!r} as a LoRA adapter (PeftModel.from_pretrained(base, path))")
    print(f"  {ROUTER_FOLDER + '/':<24} the router (peft_asr.ShallowRouter.from_pretrained(path, base))")
    print(f"  {ROUTES_FILE:<24} route -> adapter folder (__base__ -> null: the plain base model)")
    if routes["not_exported"]:
        print(f"  not exported (the router still picks them): {', '.join(routes['not_exported'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-asr",
        description="Analytic Subspace Routing (Any-SSR): continual learning of LLMs with per-task LoRA subspaces "
                    "and an analytic router.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text,
                              epilog="example:\n  " + EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("demo", "Train the built-in 4-task stream on SmolLM2-135M-Instruct with ASR and with sequential LoRA, "
                    "offline; print the accuracy matrices and write results, plots and the bank.")
    p.add_argument("--quick", action="store_true", help="fewer steps and prompts (under 3 minutes on 2 cores)")
    p.add_argument("--model", help="any local HF causal LM folder instead of the embedded default model")
    p.add_argument("--output-dir", default="asr-demo", help="where results.json, plots and the bank go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = add("train", "Train a task stream described by a YAML file; write results.json and the bank.")
    p.add_argument("--config", required=True, help="stream YAML:\n" + textwrap.indent(STREAM_YAML, "  "))
    p.set_defaults(func=_cmd_train)

    p = add("eval", "Score a saved bank on tasks (greedy decoding, each row routed) and report routing accuracy.")
    p.add_argument("bank", help="a bank folder or a Hub repo id")
    p.add_argument("--task", action="append", required=True,
                   help="trace:DIR, olora:DIR or json:NAME=FILE (repeat for several tasks)")
    p.add_argument("--model", help="base model folder or Hub id (default: the one recorded in the bank)")
    p.add_argument("--revision", help="branch, tag, commit or refs/pr/N of a Hub bank (default: main)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = add("route", "Print the task the router picks for each prompt, with the scores of every task.")
    p.add_argument("bank", help="a bank folder or a Hub repo id")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--model", help="base model folder or Hub id (default: the one recorded in the bank)")
    p.add_argument("--revision", help="branch, tag, commit or refs/pr/N of a Hub bank (default: main)")
    p.set_defaults(func=_cmd_route)

    p = add("info", "Describe a saved bank: tasks, sizes, router settings and the scores in its card.")
    p.add_argument("bank", help="a bank folder or a Hub repo id")
    p.add_argument("--revision", help="branch, tag, commit or refs/pr/N of a Hub bank (default: main)")
    p.set_defaults(func=_cmd_info)

    p = add("export", "Write a bank for a multi-LoRA serving engine: OUT/<task>/ (each task as a plain PEFT LoRA "
                      "adapter), OUT/router/ (the router alone, for peft_asr.ShallowRouter) and OUT/routes.json "
                      "(route name -> adapter folder; __base__ -> null, the base model).")
    p.add_argument("bank", help="a bank folder or a Hub repo id")
    p.add_argument("out", help="the folder to write (new or empty; an earlier export with --overwrite)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="export only these tasks (default: all)")
    p.add_argument("--model", help="base model folder or Hub id (default: the one recorded in the bank)")
    p.add_argument("--revision", help="branch, tag, commit or refs/pr/N of a Hub bank (default: main)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, KeyError) as err:
        if os.environ.get("PEFT_ASR_DEBUG") == "1":
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"peft-asr: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
