"""The pure parts of the benchmark scripts: O-LoRA's penalty and the results tables (the runs themselves are the
benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

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


LEGACY_SETTINGS = {"model": None, "dtype": "float32", "steps": 2, "batch_size": 2, "train_per_task": 4, "lr": 1e-3,
                   "rank": 8, "alpha": 16, "targets": ["q_proj"], "router_layer": 4, "eval_per_task": 2,
                   "max_new_tokens": 2, "max_length": 64, "eval_scope": "seen+next", "seed": 0}


def test_stream_markdown_of_a_legacy_result_and_results_md_block(cl, tmp_path):
    tasks = ["a", "b"]
    data = {
        "tasks": tasks, "baseline": [0.1, 0.2], "commands": ["python benchmarks/cl_benchmark.py"],
        "settings": LEGACY_SETTINGS,
        "methods": {
            "asr": {"matrix": [[0.5, 0.2], [0.5, 0.75]], "summary": {"op": 0.625, "bwt": 0.0, "fwt": 0.0,
                                                                      "forgetting": 0.0, "routing_accuracy": 1.0},
                    "trainable_params": 10, "info": {"wall_s": 1.0, "bank_bytes": 2_000_000},
                    "routing": [{"labels": ["__base__", "a", "b"], "confusion": [[0, 0, 0], [0, 2, 0], [0, 0, 2]],
                                 "accuracy": 1.0}]},
            "multitask": {"final": [0.6, 0.8], "summary": {"op": 0.7}, "trainable_params": 20, "info": {"wall_s": 2}},
        },
    }
    text = cl.stream_markdown("s", data)
    assert "**0.1 benchmark (legacy budget, no intervals):** 2 steps x batch 2" in text  # labelled with its budget
    assert "| asr | 62.5 | +0.0 | +0.0 | 0.0 | 100.0 | 10 | 2.0 | 1.0 |" in text
    assert "| multitask | 70.0 | - | - | - | - | 20 | - | 2 |" in text
    assert "| base | 10.0 | 20.0 |" in text and "| a | 0 | 2 | 0 |" in text and "__base__ | 0" not in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro\n")
    cl.write_markdown({"s": data}, md)
    cl.write_markdown({"s": data}, md)  # rewriting replaces the block, never appends a second one
    out = md.read_text()
    assert out.count(cl.MARK_START) == 1 and out.startswith("# Benchmark results\n\nintro\n")
    assert "### s (0.1 benchmark): a -> b" in out


def test_a_new_run_moves_the_streams_01_results_aside_and_the_report_shows_both(cl, stories_path, tmp_path,
                                                                                 monkeypatch):
    import cl_streams

    monkeypatch.setitem(cl_streams.STREAMS, "demo2", cl_streams.Stream("demo", ("reverse", "echo"), "two tasks", 3))
    legacy = {"tasks": ["reverse", "echo"], "baseline": [0.0, 0.0], "settings": LEGACY_SETTINGS,
              "methods": {"asr": {"tasks": ["reverse", "echo"], "matrix": [[0.5, 0.0], [0.5, 0.5]],
                                  "summary": {"op": 0.5}}}}
    (tmp_path / "cl_demo2.json").write_text(json.dumps(legacy))
    argv = ["--model", str(stories_path), "--streams", "demo2", "--steps", "1", "--eval-per-task", "3",
            "--train-per-task", "4", "--router-layer", "2", "--no-markdown", "--out-dir", str(tmp_path),
            "--work-dir", str(tmp_path / "w"), "--methods", "seqlora"]
    assert cl.main(argv) == 0  # not refused: 0.1's results are another budget, not a clash of settings
    assert json.loads((tmp_path / "cl_demo2-0.1.json").read_text()) == legacy
    assert json.loads((tmp_path / "cl_demo2.json").read_text())["methods"]["seqlora"]["complete"]
    assert (tmp_path / "cl_demo2-0.1_matrices.png").is_file() and (tmp_path / "cl_demo2_matrices.png").is_file()
    # a new-format result with other settings is still refused
    with pytest.raises(SystemExit, match="other settings"):
        cl.main([*argv[:5], "2", *argv[6:]])


def _stage(stage, items, **extra):
    return {"stage": stage, "task": "abc"[stage], "items": {str(i): v for i, v in items.items()}, "train_s": 1.0,
            "router_s": 0.5, "eval_s": 2.0, "wall_s": 3.5, **extra}


def test_summarise_records_the_measured_entries_and_intervals(cl):
    import cl_eval

    rec = {"stages": [_stage(0, {0: [1.0, 1.0]}), _stage(1, {1: [1.0, 0.0]}),
                      _stage(2, {0: [1.0, 0.0], 1: [0.0, 0.0], 2: [1.0, 1.0]})]}
    out = cl_eval.summarise(rec, 3, [0.0, 0.0, 0.0], seed=0)
    assert out["matrix"] == [[1.0, None, None], [None, 0.5, None], [0.5, 0.0, 1.0]]
    assert out["measured"] == [[0, 0], [1, 1], [2, 0], [2, 1], [2, 2]]
    s = out["summary"]
    # OP = (0.5 + 0 + 1) / 3 = 0.5; BWT = ((0.5 - 1) + (0 - 0.5)) / 2 = -0.5
    assert s["op"] == pytest.approx(0.5) and s["bwt"] == pytest.approx(-0.5)
    assert s["fwt"] is None and s["forgetting"] is None
    assert s["op_ci"][0] <= 0.5 <= s["op_ci"][1] and s["bwt_ci"][0] <= -0.5 <= s["bwt_ci"][1]
    # the oracle's diagonal is derived from its last row (frozen subspaces): BWT exactly 0
    oracle = {"stages": [_stage(2, {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 1.0]})],
              "derived": {"entries": [[0, 0], [1, 1]], "why": "frozen"}}
    out = cl_eval.summarise(oracle, 3, [0.0, 0.0, 0.0], seed=0)
    assert out["summary"]["bwt"] == 0.0 and out["summary"]["bwt_ci"] == (0.0, 0.0)
    assert out["measured"] == [[2, 0], [2, 1], [2, 2]] and out["matrix"][0][0] == 0.5


def test_the_gaps_to_the_oracle_are_split_by_where_misrouted_prompts_went(cl):
    import cl_gaps

    # task a: 4 prompts; asr sends prompt 1 to b (it loses 1) and prompt 2 to the base (it gains 1), the rest right
    # task b: 2 prompts, both right; after stage 0, a's prompt 1 was still routed right: one prompt changed route
    oracle = {"complete": True, "stages": [_stage(1, {0: [1.0, 1.0, 0.0, 1.0], 1: [1.0, 0.0]})]}
    asr = {"complete": True, "stages": [
        _stage(0, {0: [1.0, 1.0, 0.0, 1.0]}, routes={"0": ["a", "a", "__base__", "a"]}),
        _stage(1, {0: [1.0, 0.0, 1.0, 1.0], 1: [1.0, 0.0]}, routes={"0": ["a", "b", "__base__", "a"], "1": ["b", "b"]})]}
    multitask = {"complete": True, "items": {"0": [1.0, 1.0, 1.0, 1.0], "1": [0.0, 0.0]}}
    data = {"tasks": ["a", "b"], "methods": {"asr": asr, "oracle": oracle, "multitask": multitask},
            "settings": {"seed": 0}}
    gaps = cl_gaps.asr_gaps(data)
    a, b = gaps["routers"]["asr"]["tasks"]
    assert a["routed_right"] == 0.5 and a["gap"] == 0.0  # -1 and +1 over 4 prompts
    assert (a["to_tasks"], a["to_base"], a["right_routed"]) == (-0.25, 0.25, 0.0)
    assert b["routed_right"] == 1.0 and b["gap"] == 0.0 and b["right_routed"] == 0.0
    assert gaps["routers"]["asr"]["bwt"] == {"changed": 1, "prompts": 4}
    assert "asr-paper" not in gaps["routers"]  # not measured: no row for it
    # oracle - multitask = ((0.75 - 1) + (0.5 - 0)) / 2 = 0.125
    point, (low, high) = gaps["oracle_vs_multitask"]
    assert point == 0.125 and low <= point <= high
    asr["summary"] = {"op": 0.625, "bwt": 0.25, "bwt_ci": (0.0, 0.5)}
    oracle["summary"] = {"op": 0.625}
    text = cl_gaps.gaps_markdown(data)
    assert "ASR OP / oracle OP 1.000 (goal >= 0.98: met)" in text
    assert "ASR BWT +25.0 [+0.0, +50.0] (goal within 0.5 of 0: missed)" in text
    assert "ASR - multitask OP +12.5 [" in text and "(goal within 3 of multi-task: met)" in text
    assert "asr: OP +0.0 [" in text and "1 of the earlier tasks' 4 prompts changed route" in text
    assert "| a | 50.0 | 75.0 | 75.0 | +0.0 | -25.0 | +25.0 | +0.0 | 100.0 | -25.0 |" in text
    assert "- OP, oracle - multi-task: +12.5 [" in text
    assert cl_gaps._with_ci(0.0, None) == "+0.0"  # a one-task stream: BWT 0 without an interval
    # until the oracle is measured there is nothing to split
    assert cl_gaps.gaps_markdown({**data, "methods": {"asr": asr}}) == ""


def test_stream_markdown_names_settings_measured_entries_and_intervals(cl):
    import cl_eval

    settings = {**LEGACY_SETTINGS, "eval_scope": "diagonal+final", "train_max_length": 128, "truncation": "middle",
                "scoring": "label word (normalised)"}
    rec = {"stages": [_stage(0, {0: [1.0, 1.0]}), _stage(1, {0: [1.0, 0.0], 1: [0.0, 1.0]})], "complete": True,
           "trainable_params": 7, "wall_s": 7.0}
    rec.update(cl_eval.summarise(rec, 2, [0.0, 0.0], seed=0))
    running = {"stages": [_stage(0, {0: [1.0, 1.0]})], "complete": False}
    data = {"tasks": ["a", "b"], "baseline": [0.0, 0.0], "settings": settings,
            "methods": {"seqlora": rec, "replay": running}}
    text = cl.stream_markdown("s", data, "about it")
    assert text.startswith("### s: a -> b (about it)")
    assert "Settings: 2 steps x batch 2" in text and "middle truncation; training rows up to 128 tokens" in text
    assert "Measured entries of the accuracy matrix: `R[t][t]` after each stage t and every task after the last" in text
    lo, hi = rec["summary"]["op_ci"]
    assert f"| seqlora | 50.0 [{100 * lo:.1f}, {100 * hi:.1f}] | -50.0 [" in text
    assert "| replay (stopped after 1 stages) |" in text
    assert "| seqlora | 1 + 0 + 2 | 1 + 0 + 2 |" in text  # time per stage


@pytest.mark.parametrize("kind", ["lora", "asr"])
def test_the_answer_position_loss_equals_the_models_loss_and_gradients(cl, kind, tmp_path):
    """The benchmark's Trainer computes logits only where a labelled token is predicted: the same loss and the same
    gradients as the model's own loss over every position (right-padded rows of other lengths)."""
    import cl_methods
    from transformers import TrainingArguments

    from peft_asr import ASRConfig
    from peft_asr.cl import PromptAnswerCollator

    torch.manual_seed(0)
    if kind == "lora":
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    else:
        model = get_peft_model(tiny_llama(), ASRConfig(r=4, target_modules=["q_proj", "v_proj"], router_layer=2))
        model.add_task("a")
    with torch.no_grad():  # B away from zero, so the adapters take part in the gradients
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * (n - a) + list(range(3 + n - a, 3 + n))}
            for n, a in ((9, 2), (6, 3), (12, 1))]
    batch = PromptAnswerCollator(0)(rows)
    model.train()
    reference = model(**batch).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    trainer = cl_methods.answer_loss_trainer()(model=model, args=TrainingArguments(output_dir=str(tmp_path),
                                                                                     use_cpu=True, report_to=[]))
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)  # no count: this batch's mean
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert outputs.logits.shape[1] == 6  # positions 2, 3, 4, 6, 7, 10 predict an answer token; 6 of 12 are skipped
    # with the Trainer's count of the accumulated batch (here 15 labelled tokens over the batches of one step), the
    # sum is divided by that count, as the model's loss does
    with torch.no_grad():
        summed = model(**batch, num_items_in_batch=torch.tensor(15)).loss
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(15))
    assert ours.item() == pytest.approx(summed.item(), rel=1e-5)
    assert ours.item() == pytest.approx(reference.item() * 6 / 15, rel=1e-5)


def test_a_run_that_leaves_results_md_alone_leaves_the_committed_json_alone(capsys):
    common = _load("common")
    assert common.finish("scratch_probe", {"x": 1}, lambda r: "table", True) == 0
    assert not (common.RESULTS_DIR / "scratch_probe.json").exists()
    scratch = common.results_dir(True) / "scratch_probe.json"
    assert json.loads(scratch.read_text()) == {"x": 1} and str(scratch) in capsys.readouterr().out
    assert common.results_dir(False) == common.RESULTS_DIR


def test_label_word_scoring():
    import cl_eval

    labels = ["very negative", "negative", "neutral", "positive", "very positive"]
    preds = ["Negative.", "very negative", "negative review", "  'Positive'  ", "posit", "", "neutral\n", "Very  Positive"]
    refs = ["negative", "negative", "negative", "positive", "positive", "neutral", "neutral", "very positive"]
    # case and punctuation do not matter; a longer label wins ("very negative" is not "negative"); a label followed
    # by more words counts; a cut word or an empty answer does not
    assert cl_eval.label_word_scores(preds, refs, labels) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert cl_eval.normalise_label(" Science or  Technology! ") == "science or technology"
    with pytest.raises(ValueError, match=r"references \['odd'\] are not among the labels"):
        cl_eval.label_word_scores(["odd"], ["odd"], labels)


def test_choose_budget_rule():
    conv = _load("cl_convergence")
    curves = {"a": {"steps": [25, 50, 100, 150, 200], "scores": [0.30, 0.50, 0.595, 0.60, 0.59]},
              "b": {"steps": [25, 50, 100, 150, 200], "scores": [0.80, 0.805, 0.81, 0.80, 0.80]}}
    # a: best 0.60, within 1 point from 100 steps (0.595); b: best 0.81, within 1 point already at 25 -> budget 100
    assert conv.choose_budget(curves, 0.01, 200) == (100, {"a": 100, "b": 25}, "")
    assert conv.choose_budget(curves, 0.01, 50) == (50, {"a": 100, "b": 25}, "the curves ask for 100 steps; capped at 50")


def test_answer_cache_generates_each_pair_once():
    import cl_eval

    class Evaluator:
        tasks = [SimpleNamespace(eval=[{"prompt": "p0", "answer": "A"}, {"prompt": "p1", "answer": "B"}],
                                 metric="exact_match")]
        labels = [None]
        calls = []

        def answers(self, model, prompts, task_names=None):
            self.calls.append(list(zip(prompts, task_names)))
            return [f"{t}:{p}" for p, t in zip(prompts, task_names)]

    ev = Evaluator()
    cache = cl_eval.AnswerCache([["A", "x"]])  # the base model's answers
    scores = cache.score(None, ev, {0: ["__base__", "t"]})
    assert scores == {0: [1.0, 0.0]} and ev.calls == [[("p1", "t")]]  # the base route reads the base answers
    cache.score(None, ev, {0: ["t", "t"]})
    assert ev.calls[-1] == [("p0", "t")] and cache.generated == 2  # only the pair not seen before
    assert cl_eval.AnswerCache([["A", "x"]], cache.pairs).get(0, 1, "t") == "t:p1"  # saved and loaded


def test_replay_mixes_a_share_of_every_earlier_task(cl):
    import cl_methods

    tasks = [SimpleNamespace(name=f"t{k}", train=[{"prompt": f"{k}-{i}", "answer": "a"} for i in range(100)])
             for k in range(3)]
    ctx = SimpleNamespace(tasks=tasks, args=SimpleNamespace(replay_fraction=0.02, seed=0))
    rows = cl_methods.Replay(ctx).rows(2)
    kinds = [r["prompt"].split("-")[0] for r in rows]
    assert kinds.count("2") == 100 and kinds.count("0") == 2 and kinds.count("1") == 2  # 2% of 100 rows each
    assert cl_methods.Replay(ctx).rows(2) == rows and cl_methods.Replay(ctx).rows(0) != tasks[0].train  # shuffled


def test_a_stopped_run_resumes_at_the_next_stage_and_equals_an_uninterrupted_one(cl, stories_path, tmp_path,
                                                                                monkeypatch):
    import cl_streams

    monkeypatch.setitem(cl_streams.STREAMS, "demo2", cl_streams.Stream("demo", ("reverse", "echo"), "two tasks", 3))
    base = ["--model", str(stories_path), "--streams", "demo2", "--methods", "asr", "oracle", "seqlora", "--steps",
            "1", "--eval-per-task", "3", "--train-per-task", "4", "--router-layer", "2", "--no-markdown"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cl.main(base + ["--out-dir", str(whole), "--work-dir", str(whole / "w")]) == 0
    split = base + ["--out-dir", str(parts), "--work-dir", str(parts / "w")]
    assert cl.main(split + ["--budget-minutes", "0.0001"]) == cl.STOPPED  # one stage, then the budget is spent
    saved = json.loads((parts / "cl_demo2.json").read_text())["methods"]["asr"]
    assert len(saved["stages"]) == 1 and saved["stopped"] == "budget spent before stage 1"
    assert (parts / "w" / "demo2" / "asr" / "stage-0" / "bank").is_dir()
    assert cl.main(split) == 0
    a = json.loads((whole / "cl_demo2.json").read_text())["methods"]
    b = json.loads((parts / "cl_demo2.json").read_text())["methods"]
    for method in ("asr", "oracle", "seqlora"):
        assert b[method]["complete"] and b[method]["matrix"] == a[method]["matrix"], method
        assert [s["items"] for s in b[method]["stages"]] == [s["items"] for s in a[method]["stages"]], method
    assert [s["routing"] for s in b["asr"]["stages"]] == [s["routing"] for s in a["asr"]["stages"]]
    assert b["asr"]["general"]["routed_to_base"] == a["asr"]["general"]["routed_to_base"]
    assert b["seqlora"]["general"]["token_agreement"] == a["seqlora"]["general"]["token_agreement"]
    assert b["oracle"]["summary"]["bwt"] == 0.0 and b["oracle"]["derived"]["entries"] == [[0, 0]]
    # results of other settings are never mixed into a stream's file
    with pytest.raises(SystemExit, match=r"other settings \(steps: 1 -> 2; train_per_task: 4 -> 8\)"):
        cl.main([{"1": "2", "4": "8"}.get(x, x) for x in split])


def test_recorded_command_leaves_out_the_budget_and_the_grid_hands_it_on(cl, capsys):
    assert cl.recorded_argv(["--streams", "demo", "--budget-minutes", "12.5", "--steps", "4"]) == "--streams demo --steps 4"
    assert cl.recorded_argv(["--budget-minutes=3", "--threads", "2"]) == "--threads 2"
    grid = _load("cl_grid")
    assert grid.main(["--dry-run", "--budget-minutes", "30", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert [line.split(":")[0] for line in lines] == ["== convergence", "== short streams", "== long order"]
    assert all(line.endswith("--threads 1 --budget-minutes 30.00") or "--budget-minutes 29.9" in line for line in lines)
    assert "olora " not in lines[2] and "--methods asr asr-paper oracle seqlora replay multitask" in lines[2]


def test_the_op_chart_shows_only_results_with_intervals(cl):
    report = _load("cl_report")
    legacy = {"methods": {"asr": {"summary": {"op": 0.4}}}}  # the 0.1 benchmark: no per-prompt scores
    new = {"methods": {"asr": {"summary": {"op": 0.5, "op_ci": [0.4, 0.6]}, "complete": True},
                       "seqlora": {"summary": {"op": 0.3, "op_ci": [0.2, 0.4]}, "complete": False}}}
    assert report.op_groups({"old": legacy, "s": new}) == {"s": {"asr": (0.5, 0.4, 0.6)}}


def test_every_method_runs_end_to_end_on_a_small_stream(cl, stories_path, tmp_path, monkeypatch):
    import cl_streams

    monkeypatch.setitem(cl_streams.STREAMS, "demo2", cl_streams.Stream("demo", ("reverse", "echo"), "two tasks", 3))
    argv = ["--model", str(stories_path), "--streams", "demo2", "--steps", "1", "--eval-per-task", "3",
            "--train-per-task", "4", "--router-layer", "2", "--no-markdown", "--out-dir", str(tmp_path),
            "--work-dir", str(tmp_path / "w")]
    assert cl.main(argv) == 0
    methods = json.loads((tmp_path / "cl_demo2.json").read_text())["methods"]
    assert set(methods) == set(cl.METHODS)
    for name, rec in methods.items():
        assert rec["complete"], name
        s = rec["summary"]
        assert 0.0 <= s["op"] <= 1.0 and s["op_ci"][0] <= s["op"] <= s["op_ci"][1], name
        if name != "oracle":  # the oracle pins every prompt: it has no general-prompt check
            assert rec["general"]["prompts"] > 0, name
    # asr-paper trains nothing: the subspaces are asr's, the router the paper's
    assert all(st["steps"] == 0 for st in methods["asr-paper"]["stages"])
    assert methods["oracle"]["summary"]["bwt"] == 0.0
    import cl_gaps

    gaps = cl_gaps.asr_gaps(json.loads((tmp_path / "cl_demo2.json").read_text()))
    for name in ("asr", "asr-paper"):  # a right-routed prompt has the oracle's very answer: its difference is 0
        assert all(row["right_routed"] == 0.0 for row in gaps["routers"][name]["tasks"]), name
        assert gaps["routers"][name]["bwt"]["prompts"] == 3, name
    assert "oracle_vs_multitask" in gaps and "asr_vs_multitask" in gaps
    # replay's second stage trains on the task's rows and one row of the first task
    assert [st["train_rows"] for st in methods["replay"]["stages"]] == [4, 5]
    assert methods["multitask"]["timings"][0]["steps"] == 2  # T x steps
    assert (tmp_path / "cl_demo2_matrices.png").is_file() and (tmp_path / "cl_op_by_method.png").is_file()


def test_the_benchmark_runs_in_bfloat16_as_a_gpu_run_would(cl, stories_path, tmp_path, monkeypatch):
    """``--dtype bfloat16`` (the 7B-on-a-GPU command's dtype) through the routed methods and a plain LoRA."""
    import cl_streams

    monkeypatch.setitem(cl_streams.STREAMS, "demo2", cl_streams.Stream("demo", ("reverse", "echo"), "two tasks", 3))
    argv = ["--model", str(stories_path), "--streams", "demo2", "--steps", "1", "--eval-per-task", "3",
            "--train-per-task", "4", "--router-layer", "2", "--no-markdown", "--out-dir", str(tmp_path),
            "--work-dir", str(tmp_path / "w"), "--dtype", "bfloat16", "--methods", "asr", "oracle", "seqlora"]
    assert cl.main(argv) == 0
    data = json.loads((tmp_path / "cl_demo2.json").read_text())
    assert data["settings"]["dtype"] == "bfloat16"
    assert all(data["methods"][m]["complete"] for m in ("asr", "oracle", "seqlora"))


def test_the_convergence_curve_runs_and_chooses_a_budget(stories_path, tmp_path):
    if not (BENCH.parents[1] / "shared" / "data" / "olora" / "COPA").is_dir():
        pytest.skip("../shared/data/olora is absent: the curve trains on its tasks")
    conv = _load("cl_convergence")
    argv = ["--model", str(stories_path), "--tasks", "olora:COPA", "--steps-list", "1", "2", "--eval-per-task", "3",
            "--no-markdown", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    assert conv.main(argv + ["--budget-minutes", "0.0001"]) == 75  # stops after the first checkpoint
    first = json.loads((tmp_path / "cl_convergence.json").read_text())["curves"]["COPA"]
    assert first["timed_steps"] == 1 and first["train_s"] > 0 and not first.get("complete")
    assert conv.main(argv) == 0  # resumes at step 1: the time of both steps is kept
    data = json.loads((tmp_path / "cl_convergence.json").read_text())
    curve = data["curves"]["COPA"]
    assert curve["complete"] and curve["steps"] == [1, 2] and len(curve["items"]["2"]) == 3
    assert curve["timed_steps"] == 2 and curve["train_s"] > first["train_s"]
    assert data["chosen"] in (1, 2) and curve["flattens_at"] == data["chosen"]
    assert conv.main(argv) == 0  # a finished curve is not measured again
    assert (tmp_path / "cl_convergence.png").is_file()
