"""Shared plumbing of the benchmark scripts: versions, timing, model loading, and the RESULTS.md blocks.

Timing rules (these machines are noisy): variants compared with each other are timed round-robin in the same
process, and every figure is the median of its repetitions; ratios are taken between medians of one run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SHARED_DATA = REPO.parent / "shared" / "data"


def versions(device: str = "cpu") -> dict:
    import peft
    import transformers

    import peft_asr

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "peft_asr": peft_asr.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def machine_line(v: dict) -> str:
    where = v.get("gpu") or f"{v['platform']}, {v['cpu_count']} CPUs ({v['threads']} threads)"
    return (f"Machine: {where}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
            f"peft-asr {v['peft_asr']}, python {v['python']}.")


def add_model_arg(parser) -> None:
    """``--model`` as ``load_causal_lm`` reads it."""
    parser.add_argument("--model", default=None, help="HF causal LM folder or id, 'stories' (the tiny shared Llama), "
                        "or the embedded SmolLM2-135M-Instruct (default)")


def add_device_args(parser, model_dtype_help: str = "model dtype") -> None:
    """``--device`` / ``--dtype``, the same on every benchmark, so one script runs on a CPU or a GPU unchanged."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=model_dtype_help)


def results_dir(no_markdown: bool) -> Path:
    """Where a run's JSON goes: ``benchmarks/results`` beside the RESULTS.md table it backs, or, for a run that
    leaves RESULTS.md alone (a smoke run), a scratch folder, so the committed JSON and its table never part."""
    return Path(tempfile.gettempdir()) / "peft_asr_benchmarks" if no_markdown else RESULTS_DIR


def finish(name: str, results: dict, markdown, no_markdown: bool) -> int:
    """Save ``results`` as JSON, put its table into RESULTS.md (unless ``no_markdown``: then the JSON goes to a
    scratch folder, see ``results_dir``) and print it."""
    path = save_json(name, results, results_dir(no_markdown))
    text = markdown(results)
    if not no_markdown:
        write_block(name, text)
    print(text)
    if no_markdown:
        print(f"results in {path} (benchmarks/results and RESULTS.md left as they are)")
    return 0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin(fns: dict[str, Callable[[], object]], reps: int, device: str = "cpu", warmup: int = 1) -> dict:
    """Median seconds of each callable, timed in interleaved rounds so drift hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "reps": len(t)} for name, t in times.items()}


def load_causal_lm(name: Optional[str], device: str, dtype: str):
    """``None``/"smollm2": the embedded SmolLM2-135M-Instruct; "stories": the tiny shared Llama; else an HF id/folder."""
    from peft_asr.cl.default_model import load_model_and_tokenizer

    path = None if name in (None, "smollm2") else (str(STORIES) if name == "stories" else name)
    model, tok = load_model_and_tokenizer(path, dtype=getattr(torch, dtype))
    return model.to(device).eval(), tok


def write_block(key: str, block: str, path: Path = RESULTS_MD) -> None:
    """Put ``block`` between ``<!-- key:start -->`` and ``<!-- key:end -->`` in RESULTS.md (replacing an old one)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def save_json(name: str, data: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def status_mb(field: str) -> float:
    """A field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start the peak resident set (``VmHWM``) afresh, so what ran before does not count (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
