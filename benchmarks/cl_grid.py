"""The continual-learning grid, in the order its numbers matter, resumable across sessions.

Runs, one after the other, each step's command until it finishes (each command resumes where its last run stopped:
the convergence curve at its last checkpoint, every stream at the next stage of each method):

1. ``cl_convergence.py``: the per-task budget;
2. ``cl_benchmark.py --steps auto`` on the demo stream (its prompts are a few dozen tokens: the cheapest full table),
   then the O-LoRA standard order and TRACE, every method;
3. the same on O-LoRA's 14-task long order without ``olora`` (the first method the issue lets go on that stream:
   O-LoRA's penalty grows with the number of earlier adapters, and the 14-task stream alone would cost more than
   the three others together).

``--budget-minutes`` is handed to every step as the time left, so the grid stops between stages and exits with
status 75; running the same command again continues. Stage results are in ``benchmarks/results/*.json`` as they
complete, the tables in RESULTS.md and the figures on docs/benchmarks.md after each step (every step ends with the
report).

    python benchmarks/cl_grid.py --budget-minutes 120 --threads 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STOPPED = 75

STEPS = (
    ("convergence", ["cl_convergence.py"]),
    ("short streams", ["cl_benchmark.py", "--steps", "auto", "--streams", "demo", "olora-standard", "trace"]),
    ("long order", ["cl_benchmark.py", "--steps", "auto", "--streams", "olora-long14", "--methods", "asr",
                    "asr-paper", "oracle", "seqlora", "replay", "multitask"]),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-minutes", type=float, default=None, help="stop cleanly between stages after this long")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    end = None if args.budget_minutes is None else time.monotonic() + 60 * args.budget_minutes
    for label, command in STEPS:
        cmd = [sys.executable, str(HERE / command[0]), *command[1:]]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if end is not None:
            left = (end - time.monotonic()) / 60
            if left <= 0:
                print(f"budget spent before the {label} step; run the same command again to continue.")
                return STOPPED
            cmd += ["--budget-minutes", f"{left:.2f}"]
        print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
        if args.dry_run:
            continue
        code = subprocess.run(cmd, check=False).returncode
        if code == STOPPED:
            print(f"the {label} step stopped on the budget; run the same command again to continue.")
            return STOPPED
        if code != 0:
            print(f"the {label} step failed (exit status {code}); fix it and run the same command again.")
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
