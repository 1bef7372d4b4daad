"""The stream runner, the demo (quick path, end to end), plots and the bank's model card, on the real tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from peft_asr.cl.runner import StreamResults, evaluate_tasks, run_stream
from peft_asr.cl import Task
from peft_asr.demo import demo_stream, general_prompts


@pytest.fixture(scope="module")
def stories(stories_path):
    from peft_asr.cl.default_model import load_model_and_tokenizer

    return lambda: load_model_and_tokenizer(str(stories_path))


def test_demo_stream_is_deterministic_and_disjoint():
    a = demo_stream(n_train=50, n_eval=10, seed=3)
    b = demo_stream(n_train=50, n_eval=10, seed=3)
    assert [t.train for t in a] == [t.train for t in b] and [t.name for t in a] == ["reverse", "shout", "initials", "echo"]
    for task in a:
        assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.eval}, task.name
    reverse, shout = a[0], a[1]
    # same instruction wording, different skill
    assert reverse.train[0]["prompt"].startswith("Rewrite the list: ") and shout.train[0]["prompt"].startswith("Rewrite the list: ")
    items = reverse.train[0]["prompt"].removeprefix("Rewrite the list: ").split(", ")
    assert reverse.train[0]["answer"] == ", ".join(reversed(items))
    assert shout.train[0]["answer"] == shout.train[0]["prompt"].removeprefix("Rewrite the list: ").upper()
    words = a[3].eval[0]["prompt"].removeprefix("Echo the objects: ").split()
    assert a[3].eval[0]["answer"] == " ".join(f"{w} {w}" for w in words)
    words = a[2].eval[0]["prompt"].removeprefix("Give the initials: ").split()
    assert a[2].eval[0]["answer"] == "".join(w[0].upper() for w in words)
    assert len(set(general_prompts(40))) == 40 and demo_stream(n_train=5, n_eval=2, seed=4)[0].train != a[0].train[:5]
    with pytest.raises(ValueError, match="unknown demo tasks"):
        demo_stream(tasks=("nope",))


def test_results_round_trip(tmp_path):
    res = StreamResults(method="asr", tasks=["a", "b"], matrix=[[0.5, 0.0], [0.5, 1.0]], baseline=[0.0, 0.0],
                        routing=[{"labels": ["__base__", "a"], "confusion": [[0, 0], [0, 3]], "accuracy": 1.0}],
                        timings=[{"task": "a", "train_s": 1.0, "router_s": 0.1, "eval_s": 0.5}])
    res.save(tmp_path / "r.json")
    back = StreamResults.load(tmp_path / "r.json")
    assert back.matrix == res.matrix and back.routing == res.routing
    assert back.summary == pytest.approx({"op": 0.75, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0, "routing_accuracy": 1.0})
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["op"] == 0.75


def test_run_stream_asr_records_the_full_matrix_and_keeps_old_tasks(stories, tmp_path):
    model, tok = stories()
    tasks = demo_stream(n_train=16, n_eval=4, seed=0)[:2]
    res = run_stream(model, tasks, {"per_device_train_batch_size": 8, "disable_tqdm": True}, tokenizer=tok,
                     method="asr", general_prompts=general_prompts(6), output_dir=tmp_path, max_new_tokens=4,
                     progress=False)
    assert len(res.matrix) == 2 and all(len(row) == 2 for row in res.matrix) and len(res.baseline) == 2
    # 16 training prompts on a 260K-parameter story model: routing is good, not perfect, on the shared instruction
    assert res.routing[0]["accuracy"] == 1.0 and res.routing[1]["accuracy"] >= 0.5
    assert res.routing[-1]["labels"] == ["__base__", "reverse", "shout"]
    assert [sum(row) for row in res.routing[-1]["confusion"]] == [0, 4, 4]
    assert [t["steps"] for t in res.timings] == [2, 2] and res.timings[0]["router_s"] > 0
    bank = tmp_path / "bank"
    card = (bank / "README.md").read_text()
    assert "## Evaluation" in card and "| `reverse` | 2 |" in card and "- routing accuracy: " in card
    reloaded = PeftModel.from_pretrained(stories()[0], bank).eval()
    assert reloaded.tasks == ["reverse", "shout"]
    # the reloaded bank scores exactly what the run measured after its last stage
    assert evaluate_tasks(reloaded, tok, tasks, max_new_tokens=4) == res.matrix[-1]


def test_run_stream_seqlora_and_errors(stories, tmp_path):
    model, tok = stories()
    tasks = demo_stream(n_train=8, n_eval=2, seed=0)[:2]
    res = run_stream(model, tasks, {"disable_tqdm": True}, tokenizer=tok, method="seqlora", compute_baseline=False,
                     output_dir=tmp_path, max_new_tokens=2, progress=False)
    assert res.routing == [] and res.baseline is None and len(res.matrix) == 2 and "bank" not in res.info
    assert res.summary["fwt"] is None
    with pytest.raises(ValueError, match="`method` must be one of"):
        run_stream(model, tasks, method="ewc", tokenizer=tok)
    with pytest.raises(ValueError, match="task names must be unique"):
        run_stream(model, [tasks[0], tasks[0]], tokenizer=tok)
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        run_stream(model, tasks)
    with pytest.raises(ValueError, match="has no training rows"):
        run_stream(model, [Task("x", train=[], eval=[{"prompt": "p", "answer": "a"}])], tokenizer=tok)


def test_demo_quick_end_to_end(stories_path, tmp_path):
    from peft_asr.demo.run import run_demo

    report = run_demo(str(tmp_path), quick=True, model=str(stories_path), progress=False,
                      overrides={"n_train": 16, "n_eval": 4, "n_general": 8, "max_new_tokens": 4})
    for name in ("results.json", "accuracy_matrices.png", "routing_confusion.png", "bank/adapter_model.safetensors",
                 "bank/README.md"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    for method in ("asr", "seqlora"):
        for key in ("matrix", "summary", "baseline", "timings"):
            assert key in saved[method], (method, key)
        assert set(saved[method]["summary"]) >= {"op", "bwt", "fwt", "forgetting"}
    assert saved["asr"]["tasks"] == ["reverse", "shout", "echo"]  # the quick stream
    assert len(saved["asr"]["routing"]) == 3 and saved["asr"]["routing"][0]["accuracy"] == 1.0
    general = saved["general"]
    # prompts routed to the base route are answered exactly as by the base model (None: none was routed there)
    assert general["prompts"] == 4 and general["identical_to_base"] in (None, 1.0)
    assert report["wall_s"] > 0


def test_plots_reject_bad_input(tmp_path):
    from peft_asr.cl.plots import plot_accuracy_matrices, plot_routing_confusion

    with pytest.raises(ValueError, match="nothing to plot"):
        plot_accuracy_matrices({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be 2 x 2"):
        plot_routing_confusion(["__base__", "a"], [[1, 2, 3]], tmp_path / "y.png")
    path = plot_routing_confusion(["__base__", "a", "b"], [[0, 0, 0], [1, 4, 0], [0, 0, 5]], tmp_path / "z.png")
    assert (tmp_path / "z.png").stat().st_size > 1000 and path.endswith("z.png")


def test_run_stream_seen_next_scope_and_stage_hook(stories, tmp_path):
    model, tok = stories()
    tasks = demo_stream(n_train=8, n_eval=2, seed=0)[:3]
    seen = []
    res = run_stream(model, tasks, {"disable_tqdm": True}, tokenizer=tok, method="asr", output_dir=tmp_path,
                     max_new_tokens=2, progress=False, eval_scope="seen+next",
                     on_stage_end=lambda stage, m, r: seen.append((stage, m.training, len(r.matrix))))
    # after stage t only tasks 0..t+1 are scored; the rest is None, and every CL metric is still defined
    assert [[v is None for v in row] for row in res.matrix] == [[False, False, True], [False] * 3, [False] * 3]
    assert all(res.summary[k] is not None for k in ("op", "bwt", "fwt", "forgetting"))
    assert seen == [(0, False, 1), (1, False, 2), (2, False, 3)]
    from peft_asr.cl.plots import plot_accuracy_matrices

    assert plot_accuracy_matrices({"asr": res}, tmp_path / "m.png") and (tmp_path / "m.png").stat().st_size > 0
    with pytest.raises(ValueError, match="`eval_scope` must be one of"):
        run_stream(model, tasks, tokenizer=tok, eval_scope="some")
    with pytest.raises(TypeError, match="`on_stage_end` must be callable"):
        run_stream(model, tasks, tokenizer=tok, on_stage_end=3)


def test_run_stream_diagonal_final_scope_and_middle_truncation(stories, tmp_path):
    from peft_asr.cl.runner import stage_scope

    assert [stage_scope("diagonal+final", t, 3) for t in range(3)] == [[0], [1], [0, 1, 2]]
    assert [stage_scope("seen+next", t, 3) for t in range(3)] == [[0, 1], [0, 1, 2], [0, 1, 2]]
    assert stage_scope("all", 0, 2) == [0, 1]
    model, tok = stories()
    tasks = demo_stream(n_train=8, n_eval=2, seed=0)[:3]
    res = run_stream(model, tasks, {"disable_tqdm": True}, tokenizer=tok, method="seqlora", output_dir=tmp_path,
                     max_new_tokens=2, progress=False, eval_scope="diagonal+final", truncation="middle")
    # R[t][t] after each stage, every task after the last: OP and BWT, no FWT nor forgetting
    assert [[v is None for v in row] for row in res.matrix] == [[False, True, True], [True, False, True], [False] * 3]
    assert res.summary["op"] is not None and res.summary["bwt"] is not None
    assert res.summary["fwt"] is None and res.summary["forgetting"] is None
    with pytest.raises(ValueError, match="`truncation` must be one of"):
        run_stream(model, tasks, tokenizer=tok, truncation="right")


def test_generate_answers_sorted_and_per_row_tasks(stories, tmp_path):
    from peft import get_peft_model

    from peft_asr import ASRConfig
    from peft_asr.cl.runner import generate_answers

    model, tok = stories()
    tasks = demo_stream(n_train=4, n_eval=3, seed=0)[:2]
    prompts = [r["prompt"] for t in tasks for r in t.eval] + ["Tell me a story about a very small dog and a cat."]
    plain = generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2)
    # batching prompts of similar length together gives every prompt its own answer, in the caller's order
    assert generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2, sort_by_length=True) == plain
    peft_model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                 target_modules=["q_proj", "v_proj"], router_layer=2))
    for task in tasks:
        peft_model.add_task(task.name)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith(f".{tasks[1].name}") and ".asr_B." in name:
                p.normal_(0, 5.0)  # task 1's subspace changes answers; task 0's is zero (the base model)
    peft_model.eval()
    names = [tasks[0].name, tasks[1].name] * 3 + [None]
    routed = generate_answers(peft_model, tok, prompts, max_new_tokens=3, batch_size=2, sort_by_length=True,
                              task_names=names)
    for k, name in enumerate(names):
        with peft_model.use_task(name):
            alone = generate_answers(peft_model, tok, [prompts[k]], max_new_tokens=3)
        assert routed[k] == alone[0], k
    assert any(a != b for a, b, n in zip(routed, plain, names) if n == tasks[1].name)
    with pytest.raises(ValueError, match="`task_names` has 1 entries for 7 prompts"):
        generate_answers(peft_model, tok, prompts, task_names=[None])
