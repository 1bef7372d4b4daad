"""The pure parts of the benchmark scripts: O-LoRA's penalty and the results tables (the runs themselves are the
benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cl():
    return _load("cl_benchmark")


def test_olora_penalty_is_zero_for_orthogonal_subspaces_and_grows_with_overlap(cl):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter_name="t0")
    model.add_adapter("t1", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "t1" in m.lora_A]
    assert layers
    with torch.no_grad():
        for m in layers:
            d = m.lora_A["t0"].weight.shape[1]
            eye = torch.eye(d)
            m.lora_A["t0"].weight.copy_(eye[:2])  # old subspace: e0, e1
            m.lora_A["t1"].weight.copy_(eye[2:4])  # new subspace: e2, e3 (orthogonal)
    assert cl.olora_penalty(model, "t1", ["t0"], 0.5, 0.0).item() == 0.0
    with torch.no_grad():
        for m in layers:
            m.lora_A["t1"].weight[0, 0] = 3.0  # overlap of 3 with e0 in every layer
    assert cl.olora_penalty(model, "t1", ["t0"], 0.5, 0.0).item() == pytest.approx(0.5 * 3.0 * len(layers))
    # the penalty only trains the new subspace: the old A receives no gradient
    for m in layers:
        m.lora_A["t1"].weight.requires_grad_(True)
        m.lora_A["t0"].weight.requires_grad_(True)
    cl.olora_penalty(model, "t1", ["t0"], 0.5, 1.0).backward()
    assert all(m.lora_A["t0"].weight.grad is None for m in layers)
    assert all(m.lora_A["t1"].weight.grad is not None for m in layers)
    # nothing before the first task: no penalty term at all (lambda2 = 0)
    assert cl.olora_penalty(model, "t0", [], 0.5, 0.0).item() == 0.0


def test_stream_markdown_and_results_md_block(cl, tmp_path):
    tasks = ["a", "b"]
    data = {
        "tasks": tasks, "baseline": [0.1, 0.2], "commands": ["python benchmarks/cl_benchmark.py"],
        "settings": {"model": None, "dtype": "float32", "steps": 2, "batch_size": 2, "train_per_task": 4, "lr": 1e-3,
                     "rank": 8, "alpha": 16, "targets": ["q_proj"], "router_layer": 4, "eval_per_task": 2,
                     "max_new_tokens": 2, "max_length": 64, "eval_scope": "seen+next", "seed": 0},
        "versions": {"platform": "p", "cpu_count": 2, "threads": 2, "torch": "t", "transformers": "x", "peft": "y",
                     "peft_asr": "z", "python": "3"},
        "methods": {
            "asr": {"matrix": [[0.5, 0.2], [0.5, 0.75]], "summary": {"op": 0.625, "bwt": 0.0, "fwt": 0.0,
                                                                      "forgetting": 0.0, "routing_accuracy": 1.0},
                    "trainable_params": 10, "info": {"wall_s": 1.0},
                    "routing": [{"labels": ["__base__", "a", "b"], "confusion": [[0, 0, 0], [0, 2, 0], [0, 0, 2]],
                                 "accuracy": 1.0}]},
            "multitask": {"final": [0.6, 0.8], "summary": {"op": 0.7}, "trainable_params": 20, "info": {"wall_s": 2}},
        },
    }
    text = cl.stream_markdown("s", data)
    assert "| asr | 62.5 | +0.0 | +0.0 | 0.0 | 100.0 | 10 | 1.0 |" in text
    assert "| multitask | 70.0 | - | - | - | - | 20 | 2 |" in text
    assert "| base | 10.0 | 20.0 |" in text and "| a | 0 | 2 | 0 |" in text and "__base__ | 0" not in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro\n")
    cl.write_markdown({"s": data}, md)
    cl.write_markdown({"s": data}, md)  # rewriting replaces the block, never appends a second one
    out = md.read_text()
    assert out.count(cl.MARK_START) == 1 and out.startswith("# Benchmark results\n\nintro\n") and "### s: a -> b" in out
