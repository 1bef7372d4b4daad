"""``peft-asr export BANK OUT``: the layout (``OUT/<task>/`` plain LoRA adapters, ``OUT/router/``, ``OUT/routes.json``),
each adapter loading with plain PEFT and answering as the pinned task, the router folder giving the bank's routes,
``--tasks``, ``--overwrite`` of an earlier export only, atomic writes, and errors on one line before any work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, randomize_tasks, tiny_llama
from peft import PeftModel, get_peft_model

import peft_asr  # noqa: F401
from peft_asr import ASRConfig, ShallowRouter
from peft_asr.cli import EXAMPLES, main
from peft_asr.deploy import export_bank as export_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_model import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base checkpoint with a tokenizer (what the command loads) and a two-task bank on it."""
    root = tmp_path_factory.mktemp("export")
    base_dir, bank_dir = root / "base", root / "bank"
    base = tiny_llama()
    base.save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    base.name_or_path = str(base_dir)  # as `from_pretrained(base_dir)` sets it: the bank records it
    model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           router_layer=2))
    for name, ids, seed in (("alpha", ALPHA_IDS, 1), ("beta", BETA_IDS, 2)):
        model.add_task(name)
        model.fit_router([left_pad(prompts(*ids, 32, seed=seed))], task=name, progress=False)
    randomize_tasks(model)  # tasks that change the output, so an adapter of the wrong task would show
    model.save_pretrained(bank_dir)
    return base_dir, bank_dir


BATCH = left_pad(prompts(*ALPHA_IDS, 2, seed=7) + prompts(*BETA_IDS, 2, seed=8))


def test_export_writes_the_layout_and_every_part_works(saved, tmp_path, capsys):
    base_dir, bank_dir = saved
    out = tmp_path / "served"
    assert main(["export", str(bank_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "alpha/" in printed and "router/" in printed
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "router", "routes.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left
    routes = json.loads((out / "routes.json").read_text())
    assert routes == {"format": "peft-asr-export", "format_version": 1, "base_model": str(base_dir),
                      "router": "router", "routes": {"__base__": None, "alpha": "alpha", "beta": "beta"},
                      "not_exported": []}
    bank = PeftModel.from_pretrained(tiny_llama(), str(bank_dir)).eval()
    for task in ("alpha", "beta"):  # each adapter: a plain LoRA that answers as the pinned task
        config = json.loads((out / routes["routes"][task] / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base_dir)
        lora = PeftModel.from_pretrained(tiny_llama(), str(out / task)).eval()
        with torch.no_grad(), bank.use_task(task):
            expected = bank(**BATCH).logits
        with torch.no_grad():
            assert torch.allclose(lora(**BATCH).logits, expected, atol=1e-5)
    router = ShallowRouter.from_pretrained(out / routes["router"], routes["base_model"])
    assert router.route(**BATCH) == bank.route(**BATCH) == ["alpha", "alpha", "beta", "beta"]
    assert torch.equal(router.route_scores(**BATCH), bank.route_scores(**BATCH))
    assert sorted(p.name for p in (out / "router").iterdir()) == ["adapter_config.json", "router.safetensors"]


def test_tasks_and_overwrite_of_an_earlier_export(saved, tmp_path, capsys):
    base_dir, bank_dir = saved
    out = tmp_path / "served"
    assert main(["export", str(bank_dir), str(out), "--tasks", "beta", "--model", str(base_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["beta", "router", "routes.json"]
    routes = json.loads((out / "routes.json").read_text())
    assert routes["routes"] == {"__base__": None, "beta": "beta"} and routes["not_exported"] == ["alpha"]
    assert "not exported (the router still picks them): alpha" in capsys.readouterr().out
    # the router still knows both tasks: a service reads `not_exported` to decide on their rows
    assert ShallowRouter.from_pretrained(out / "router", base_dir).tasks == ["alpha", "beta"]
    assert main(["export", str(bank_dir), str(out)]) == 2
    assert "holds an earlier export; pass `overwrite=True` (`--overwrite`)" in capsys.readouterr().err
    assert main(["export", str(bank_dir), str(out), "--overwrite", "--tasks", "alpha"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "router", "routes.json"]  # nothing of the old one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv, message", [
    (["BANK", "OUT", "--tasks", "gamma"], r"tasks \['gamma'\] are not in the bank \(tasks: \['alpha', 'beta'\]\)"),
    (["BANK", "OUT", "--tasks", "__base__"], "'__base__' is the base route"),
    (["BANK", "OUT", "--tasks", "alpha", "alpha"], r"tasks \['alpha'\] are listed more than once"),
    (["BANK", "FULL"], "is not empty and is not an earlier export"),
    (["BANK", "FULL", "--overwrite"], "is not empty and is not an earlier export"),
    (["BANK", "FILE"], "is a file; the export is a folder"),
    (["BANK", "BANK", "--overwrite"], "holds an ASR bank; an export never replaces a bank"),
    (["NOBANK", "OUT"], "not a saved bank"),
    (["BANK", "OUT", "--model", "NOMODEL"], "--model"),
])
def test_bad_input_fails_on_one_line_and_writes_nothing(saved, tmp_path, capsys, argv, message):
    base_dir, bank_dir = saved
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    names = {"BANK": str(bank_dir), "OUT": str(tmp_path / "out"), "FULL": str(tmp_path / "full"),
             "FILE": str(tmp_path / "file"), "NOBANK": str(tmp_path / "nobank"), "NOMODEL": str(tmp_path / "nomodel")}
    before = sorted(os.listdir(tmp_path))
    assert main(["export", *[names.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-asr: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert (bank_dir / "adapter_model.safetensors").is_file()


def test_a_task_named_like_the_router_folder_is_refused():
    with pytest.raises(ValueError, match="where the router goes"):
        export_module.check_tasks(["router", "alpha"], None)
    assert export_module.check_tasks(["router", "alpha"], ["alpha"]) == ["alpha"]


def test_a_failure_halfway_leaves_nothing_and_keeps_the_earlier_export(saved, tmp_path, monkeypatch):
    base_dir, bank_dir = saved
    bank = PeftModel.from_pretrained(tiny_llama(), str(bank_dir)).eval()
    out = export_module.export_bank(bank, tmp_path / "served", tasks=["alpha"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(folder, config, router):
        (Path(folder)).mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_router", broken)
    with pytest.raises(OSError, match="disk full"):
        export_module.export_bank(bank, out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_module.export_bank(bank, tmp_path / "new")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no `new`, no hidden sibling


def test_export_bank_checks_its_arguments(saved, tmp_path):
    with pytest.raises(TypeError, match="PeftModel holding an ASR bank"):
        export_module.export_bank(tiny_llama(), tmp_path / "out")
    with pytest.raises(TypeError, match="list of task names"):
        export_module.check_tasks(["alpha"], "alpha")
    with pytest.raises(TypeError, match="`overwrite` must be True or False"):
        export_module.check_target(tmp_path / "out", overwrite="yes")


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and EXAMPLES["export"].splitlines()[0] in out
    assert "--tasks" in out and "--overwrite" in out and "routes.json" in out
