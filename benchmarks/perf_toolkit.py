"""What the toolkit's own code costs against the library it could call: the JSON reader of ``cl.tasks`` against
``datasets.load_dataset("json")`` on the TRACE and O-LoRA files, the subsample draw against
``Dataset.shuffle(seed).select``, and the scorers as functions against the same scorers as ``evaluate`` metrics.

Medians of ``--reps``; ``load_dataset`` gets a fresh cache folder per repetition (``cold``) or one shared folder
(``warm``). Needs ``../shared/data`` (or ``--data``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, finish, machine_line, md_table, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--no-markdown", action="store_true")
    return p.parse_args(argv)


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def json_reading(data: Path, reps: int) -> dict:
    import datasets

    from peft_asr.cl.tasks import load_prompt_answer_json

    files = sorted(p for p in data.rglob("*.json") if p.name in ("train.json", "test.json", "eval.json", "dev.json"))
    readable = [p for p in files if _reads(load_prompt_answer_json, p)]
    datasets.disable_progress_bars()

    def ours():
        for path in readable:
            load_prompt_answer_json(path)

    def library(cache: str):
        for path in readable:
            datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True, cache_dir=cache)

    def cold():
        with tempfile.TemporaryDirectory() as cache:
            library(cache)

    with tempfile.TemporaryDirectory() as shared_cache:
        library(shared_cache)  # fill it once
        warm = _median_s(lambda: library(shared_cache), reps)
    return {"files": len(readable), "megabytes": round(sum(p.stat().st_size for p in readable) / 2**20, 1),
            "ours_s": round(_median_s(ours, reps), 3), "load_dataset_warm_s": round(warm, 3),
            "load_dataset_cold_s": round(_median_s(cold, reps), 3)}


def _reads(loader, path: Path) -> bool:
    try:
        loader(path)
        return True
    except ValueError:  # O-LoRA files hold sentence/label rows, not prompt/answer rows
        return False


def subsample_overlap(total: int = 500, k: int = 64, seed: int = 0) -> dict:
    import datasets

    ours = set(random.Random(seed).sample(range(total), k))
    library = set(datasets.Dataset.from_dict({"i": list(range(total))}).shuffle(seed=seed).select(range(k))["i"])
    return {"split_rows": total, "drawn": k, "shared_rows": len(ours & library)}


def scorers(pairs: int, reps: int) -> list[dict]:
    from peft_asr.cl import scorers as fns
    from peft_asr.cl.evaluate_metrics import load

    rng = random.Random(0)
    words = "the a river stone owl fox bee quiet loud green red blue sun moon".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))

    preds, refs, srcs = ([sentence() for _ in range(pairs)] for _ in range(3))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name, fn in (("exact_match", fns.exact_match), ("first_letter", fns.first_letter_accuracy),
                         ("rouge_l", fns.rouge_l), ("sari", fns.sari), ("edit_similarity", fns.edit_similarity)):
            kwargs = {"sources": srcs} if name == "sari" else {}
            metric = load(name, cache_dir=cache)
            function_s = _median_s(lambda: fn(preds, refs, **kwargs), reps)
            compute_s = _median_s(lambda: metric.compute(predictions=preds, references=refs, **kwargs), reps)
            same = metric.compute(predictions=preds, references=refs, **kwargs)[name] == fn(preds, refs, **kwargs)
            rows.append({"scorer": name, "function_ms": round(1000 * function_s, 1),
                         "evaluate_compute_ms": round(1000 * compute_s, 1), "same_score": bool(same)})
    return rows


def markdown(results: dict) -> str:
    j, s = results["json"], results["subsample"]
    v = results["versions"]
    table = md_table(["scorer", "function (ms)", "`evaluate` compute (ms)", "same score"],
                     [[r["scorer"], r["function_ms"], r["evaluate_compute_ms"], r["same_score"]]
                      for r in results["scorers"]])
    return "\n".join([
        "## The toolkit against the libraries (`benchmarks/perf_toolkit.py`)", "",
        f"Command: `{results['command']}`", "", machine_line(v), "",
        f"Reading the {j['files']} TRACE prompt/answer files ({j['megabytes']} MB): `cl.tasks` {j['ours_s']} s, "
        f"`datasets.load_dataset(\"json\", keep_in_memory=True)` {j['load_dataset_warm_s']} s with a warm cache and "
        f"{j['load_dataset_cold_s']} s with a fresh one (medians of {results['reps']}).", "",
        f"Subsample draw (seed 0, {s['drawn']} of {s['split_rows']} rows): `random.Random(0).sample` and "
        f"`Dataset.shuffle(seed=0).select` share {s['shared_rows']} rows.", "",
        f"Scorers on {results['pairs']} pairs (medians of {results['reps']}):", "", table,
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data} does not exist: pass --data with the folder holding trace/ and olora/.")
    command = "python benchmarks/perf_toolkit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"command": command.strip(), "versions": versions("cpu"), "reps": args.reps, "pairs": args.pairs,
               "json": json_reading(data, args.reps), "subsample": subsample_overlap(),
               "scorers": scorers(args.pairs, args.reps)}
    return finish("perf_toolkit", results, markdown, args.no_markdown)


if __name__ == "__main__":
    sys.exit(main())
