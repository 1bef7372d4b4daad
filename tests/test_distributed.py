"""Two CPU processes (gloo) give the same router as one process: statistics summed, each prompt counted once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out):
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd + [str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_build_the_router_of_one(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(HERE / "dist_worker.py")], single)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
          f"--master_port={_free_port()}", str(HERE / "dist_worker.py")], double)
    one = load_file(single / "router-rank0.safetensors")
    ranks = [load_file(double / f"router-rank{r}.safetensors") for r in (0, 1)]
    # every prompt counted exactly once (78 + 73 rows: 73 is a size that a distributed sampler would pad)
    assert one["class_counts"].tolist() == [0, 78, 73]
    for state in ranks:
        assert state["class_counts"].tolist() == [0, 78, 73]
        for key in ("class_gram", "cross", "weight"):
            assert (state[key] - one[key]).abs().max() < 1e-10, key
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # every rank holds the same router
    assert json.loads((double / "routes.json").read_text()) == json.loads((single / "routes.json").read_text())
    # a router that tells the tasks apart: the held-out prompts come from the tasks' disjoint token ranges, the
    # features from the frozen blocks below router_layer (no training changes them), so every route is fixed by the
    # seeds; the closest held-out prompt wins by 0.28 in score
    assert json.loads((single / "routes.json").read_text()) == ["alpha"] * 3 + ["beta"] * 3


def test_router_pass_over_fsdp2_sharded_blocks(tmp_path):
    """FSDP2 `fully_shard` on CPU (gloo): the early-stopped feature pass sees the same features as the unsharded
    model, the router fits across processes, and a routed forward still runs afterwards."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
          f"--master_port={_free_port()}", str(HERE / "fsdp_worker.py")], tmp_path)
    reports = [json.loads((tmp_path / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["max_feature_diff"] == 0.0 and report["finite"]
        assert report["counts"] == [0.0, 48.0, 48.0]  # 24 prompts per task on each of the two ranks, summed
    # 48 prompts a task over both ranks, disjoint token ranges: every held-out prompt routes to its own task (the
    # closest wins by 0.74 in score)
    for report in reports:
        assert report["routes"] == ["alpha"] * 3 + ["beta"] * 3
