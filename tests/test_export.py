"""`export_task`: one task of a bank as a plain PEFT LoRA adapter (peft_asr/tuner/export.py).

The central check runs in a fresh interpreter that never imports ``peft_asr``: it loads each exported folder with
``PeftModel.from_pretrained(base, path)`` on the saved base model and compares the logits with the bank's
``use_task(name)`` logits, on a tiny Llama (``nn.Linear`` targets) and a tiny GPT-2 (``Conv1D`` targets). Every task's
LoRA B is given random values first (it starts at zero, and an all-zero export would equal the base model), and the
tests check that each task's logits differ from the base model's and from the other tasks', so a wrong export shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import peft_asr  # noqa: F401  (registers the ASR method)
from conftest import randomize_tasks, tiny_llama
from peft import PeftModel, get_peft_model
from peft_asr import ASRConfig
from peft_asr.tuner import export as export_module
from peft_asr.tuner.layer import ASRLayer

TASKS = ("alpha", "beta", "gamma")
ROUTER_LAYER = 2  # of 4 blocks: blocks 2 and 3 carry the tasks
TOL = 1e-5


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


# family -> (base builder, bank targets, block list name, targets are Conv1D)
FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], "layers", False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], "h", True),  # c_proj: attn.c_proj and mlp.c_proj
}


def make_bank(family: str, base_dir=None, target_modules=None, tasks=TASKS):
    build, targets, _, _ = FAMILIES[family]
    base = build()
    if base_dir is not None:
        base.save_pretrained(base_dir)  # before wrapping: get_peft_model changes the model in place
    bank = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, router_layer=ROUTER_LAYER,
                                          target_modules=target_modules or targets))
    for task in tasks:
        bank.add_task(task)
    randomize_tasks(bank)
    return bank.eval()


def asr_layers(bank) -> dict[str, ASRLayer]:
    return {n: m for n, m in bank.base_model.model.named_modules() if isinstance(m, ASRLayer)}


def task_logits(bank, task, input_ids) -> torch.Tensor:
    with torch.no_grad(), bank.use_task(task):
        return bank(input_ids=input_ids).logits


INPUT_IDS = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))

# runs in a fresh interpreter: plain transformers + peft, never peft_asr
LOADER = r"""
import json, sys, warnings
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

spec = json.loads(sys.argv[1])
refs = torch.load(spec["references"])
out = {"results": {}}
for job in spec["jobs"]:
    base = AutoModelForCausalLM.from_pretrained(job["base"]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    with torch.no_grad():
        logits = model(input_ids=refs["input_ids"]).logits
    out["results"][job["adapter"]] = {
        "max_abs_diff": (logits - refs[job["adapter"]]).abs().max().item(),
        "adapted": sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)),
        "peft_warnings": [str(w.message) for w in caught if "/peft/" in w.filename.replace("\\", "/")],
    }
out["peft_asr_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "peft_asr")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: a 3-task bank, every task exported (and task alpha with ``all_layers``), loaded by plain PEFT in
    one fresh interpreter."""
    root = tmp_path_factory.mktemp("export")
    refs, jobs, found = {"input_ids": INPUT_IDS}, [], {}
    for family in FAMILIES:
        folder = root / family
        bank = make_bank(family, base_dir=folder / "base")
        found[family] = {"bank": bank, "folders": {}, "base_logits": task_logits(bank, None, INPUT_IDS)}
        for task, all_layers in [(t, False) for t in TASKS] + [(TASKS[0], True)]:
            key = f"{task}-all" if all_layers else task
            path = bank.export_task(task, folder / key, all_layers=all_layers)
            refs[path] = task_logits(bank, task, INPUT_IDS)
            jobs.append({"base": str(folder / "base"), "adapter": path})
            found[family]["folders"][key] = path
    torch.save(refs, root / "refs.pt")
    spec = json.dumps({"references": str(root / "refs.pt"), "jobs": jobs})
    proc = subprocess.run([sys.executable, "-c", LOADER, spec], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"families": found, "refs": refs, **loaded}


# ---------------------------------------------------------------- plain PEFT, without peft_asr
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_peft_loads_every_task_with_the_banks_logits(exported, family):
    assert exported["peft_asr_modules"] == []  # the loading interpreter never imported the package
    found = exported["families"][family]
    deep = sorted(asr_layers(found["bank"]))
    diffs = {}
    for task in TASKS:
        path = found["folders"][task]
        result = exported["results"][path]
        diffs[task] = result["max_abs_diff"]
        assert result["max_abs_diff"] <= TOL, (task, result["max_abs_diff"])
        assert result["adapted"] == deep  # PEFT adapted the bank's layers, no more (layers_to_transform held)
        assert result["peft_warnings"] == []  # no missing / unexpected keys, no fan_in_fan_out correction
        # the comparison can fail: each task moves the logits away from the base model and from the other tasks
        assert (exported["refs"][path] - found["base_logits"]).abs().max() > 1e-2
    logits = [exported["refs"][found["folders"][t]] for t in TASKS]
    assert all((a - b).abs().max() > 1e-2 for i, a in enumerate(logits) for b in logits[i + 1:])
    print(f"\n{family}: max |logits(plain PEFT) - logits(use_task)| per task: {diffs}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_layers_adds_zero_pairs_below_router_layer_and_keeps_the_logits(exported, family):
    found = exported["families"][family]
    path = found["folders"][f"{TASKS[0]}-all"]
    result = exported["results"][path]
    assert result["max_abs_diff"] <= TOL and result["peft_warnings"] == []
    deep = sorted(asr_layers(found["bank"]))
    every_block = sorted({re.sub(r"\.\d+\.", f".{i}.", n, count=1) for n in deep for i in range(4)})
    assert result["adapted"] == every_block and len(every_block) == 2 * len(deep)
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None and config["target_modules"] == sorted(FAMILIES[family][1])
    with safe_open(Path(path) / "adapter_model.safetensors", "pt") as f:
        for name in set(every_block) - set(deep):
            for side in ("lora_A", "lora_B"):  # both zero: the update x A^T B^T is exactly 0
                assert not f.get_tensor(f"base_model.model.{name}.{side}.weight").any()


# ---------------------------------------------------------------- the files, in the form the engines load
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_folder_holds_a_plain_lora_config_and_peft_keys(exported, family):
    found = exported["families"][family]
    bank, path = found["bank"], Path(found["folders"]["beta"])
    _, targets, blocks, conv = FAMILIES[family]
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform",
                                   "layers_pattern", "fan_in_fan_out", "bias", "use_dora", "use_rslora",
                                   "modules_to_save", "task_type")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(targets), "layers_to_transform": [2, 3],
        "layers_pattern": blocks, "fan_in_fan_out": conv, "bias": "none", "use_dora": False, "use_rslora": False,
        "modules_to_save": None, "task_type": "CAUSAL_LM"}
    layers = asr_layers(bank)
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert keys == {f"base_model.model.{n}.lora_{s}.weight" for n in layers for s in "AB"}
        for key in keys:
            # vLLM's parse_fine_tuned_lora_name: drop "base_model.model.", end in lora_A/lora_B + ".weight"
            parts = key.removeprefix("base_model.model.").split(".")
            module, side = ".".join(parts[:-2]), parts[-2]
            assert parts[-1] == "weight" and side in ("lora_A", "lora_B") and module in layers
            assert int(re.search(rf"{blocks}\.(\d+)\.", key).group(1)) >= ROUTER_LAYER  # SGLang's layer id
            weight = (layers[module].asr_A if side == "lora_A" else layers[module].asr_B)["default"]["beta"]
            assert torch.equal(f.get_tensor(key), weight.detach())


def test_targets_the_leaf_names_would_overmatch_are_written_as_full_module_names(tmp_path):
    # the bank adapts attn.c_proj only; "c_proj" with layers_to_transform would also take mlp.c_proj
    bank = make_bank("gpt2", base_dir=tmp_path / "base", target_modules=["attn.c_proj"], tasks=("alpha",))
    path = bank.export_task("alpha", tmp_path / "alpha")
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    deep = sorted(asr_layers(bank))
    assert deep == ["transformer.h.2.attn.c_proj", "transformer.h.3.attn.c_proj"]
    assert config["target_modules"] == deep and config["layers_to_transform"] is None
    from transformers import AutoModelForCausalLM

    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), path).eval()
    from peft.tuners.lora import LoraLayer

    assert sorted(n for n, m in lora.base_model.model.named_modules() if isinstance(m, LoraLayer)) == deep
    with torch.no_grad():
        assert (lora(input_ids=INPUT_IDS).logits - task_logits(bank, "alpha", INPUT_IDS)).abs().max() <= TOL


def test_a_regex_bank_exports_as_leaf_names_when_they_select_the_same_layers(tmp_path):
    bank = make_bank("llama", target_modules=r".*\.self_attn\.(q_proj|v_proj)", tasks=("alpha",))
    config = json.loads((Path(bank.export_task("alpha", tmp_path / "a")) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["layers_to_transform"] == [2, 3]


def test_reachable_on_the_tuner_and_deterministic(tmp_path):
    bank = make_bank("llama", tasks=("alpha",))
    first = bank.export_task("alpha", tmp_path / "one")
    second = bank.base_model.export_task("alpha", tmp_path / "two")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(first) / file).read_bytes() == (Path(second) / file).read_bytes()


# ---------------------------------------------------------------- bad input: refused before anything is written
@pytest.fixture
def bank():
    return make_bank("llama", tasks=("alpha", "beta"))


@pytest.mark.parametrize("name,error,match", [
    ("gamma", ValueError, r"task 'gamma' is not in the bank \(tasks: \['alpha', 'beta'\]\); call `add_task"),
    ("__base__", ValueError, r"'__base__' is the base route.*needs no adapter.*\['alpha', 'beta'\]"),
    (None, TypeError, r"`name` must be a task name \(str\), got NoneType.*base route has no adapter"),
])
def test_bad_task_names_are_refused(bank, tmp_path, name, error, match):
    with pytest.raises(error, match=match):
        bank.export_task(name, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_bad_flags_and_paths_are_refused(bank, tmp_path):
    with pytest.raises(TypeError, match=r"`all_layers` must be True or False, got 1"):
        bank.export_task("alpha", tmp_path / "out", all_layers=1)
    with pytest.raises(TypeError, match=r"`overwrite` must be True or False, got 'yes'"):
        bank.export_task("alpha", tmp_path / "out", overwrite="yes")
    with pytest.raises(TypeError, match=r"`path` must be a folder path \(str or os.PathLike\), got int"):
        bank.export_task("alpha", 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"is a file; the export is a folder"):
        bank.export_task("alpha", tmp_path / "file", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_existing_folder_needs_overwrite_and_is_replaced_whole(bank, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; pass `overwrite=True`"):
        bank.export_task("alpha", out)
    assert os.listdir(out) == ["stale.txt"]
    bank.export_task("alpha", out, overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    bank.export_task("beta", empty)  # an empty folder needs no overwrite
    assert "adapter_model.safetensors" in os.listdir(empty)


def test_a_bank_folder_is_never_overwritten(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    before = sorted(os.listdir(tmp_path / "bank"))
    with pytest.raises(ValueError, match=r"holds an ASR bank; an export never replaces a bank"):
        bank.export_task("alpha", tmp_path / "bank", overwrite=True)
    assert sorted(os.listdir(tmp_path / "bank")) == before


def test_a_broken_subspace_is_refused(bank, tmp_path):
    with torch.no_grad():
        next(iter(asr_layers(bank).values())).asr_B["default"]["beta"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"task 'beta' has NaN or inf weights in `model.layers.2.self_attn.q_proj`"):
        bank.export_task("beta", tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- atomicity
def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")  # the write had started
    raise OSError("No space left on device")


def test_a_failure_mid_write_leaves_no_folder(bank, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        bank.export_task("alpha", tmp_path / "out")
    assert os.listdir(tmp_path) == []  # no folder, no hidden temporary sibling
    with pytest.raises(OSError, match="No space left"):
        bank.export_task("alpha", tmp_path / "new" / "deeper" / "out")
    assert os.listdir(tmp_path) == []  # nor the parent folders the export created


def test_a_failure_while_overwriting_leaves_the_old_folder(bank, tmp_path, monkeypatch):
    out = Path(bank.export_task("alpha", tmp_path / "out"))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    monkeypatch.setattr(export_module, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        bank.export_task("beta", out, overwrite=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(bank, tmp_path, monkeypatch):
    out = Path(bank.export_task("alpha", tmp_path / "out"))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real_rename = os.rename

    def rename(src, dst):
        if ".export-tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(export_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        bank.export_task("beta", out, overwrite=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["out"]
