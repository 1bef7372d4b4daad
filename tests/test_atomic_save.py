"""Nothing lost: a save killed at any moment leaves one complete bank (old or new), and an interrupted Trainer run
resumes with router statistics that are neither lost nor counted twice."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, PromptAnswerData, collate, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_asr
from peft_asr import ASRCallback, ASRConfig, BankError

HERE = Path(__file__).resolve().parent


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported torch/peft_asr once: a trial costs milliseconds, not seconds."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the SIGKILL trials use a Linux fork server")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "peft_asr", "atomic_save_worker"])
    return ctx


def _wait_for_save_start(log: Path, timeout: float) -> None:
    """Poll the child's log until its last line says a save of the bank has begun (``b <step>``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().split("\n") if log.exists() else []
        if len(lines) >= 2 and lines[-2].startswith("b "):
            return
        time.sleep(0.0005)


def _kill_trials(ctx, root: Path, trials: int, use_exchange: bool, seed: int) -> dict:
    import atomic_save_worker as worker

    rng = random.Random(seed)
    # mid_save: kills that landed between the start and the end of save_pretrained on the bank; of those, how many
    # left the previous bank (old) and how many the one being saved (new)
    stats = {"trials": 0, "mid_save": 0, "mid_save_old": 0, "mid_save_new": 0}
    for trial in range(trials):
        folder = root / f"trial{trial}"
        folder.mkdir()
        ready = ctx.Event()
        child = ctx.Process(target=worker.save_loop, args=(str(folder), use_exchange, ready), daemon=True)
        child.start()
        assert ready.wait(120), "the saving child never got going"
        if trial % 2:
            time.sleep(rng.uniform(0.0, 0.25))  # anywhere in the loop
        else:
            _wait_for_save_start(folder / "log", timeout=30.0)  # aim inside a save: it starts, then a short delay
            time.sleep(rng.uniform(0.0, 0.01))
        child.kill()  # SIGKILL: no finally, no atexit, no flush
        child.join()
        assert child.exitcode == -9
        last = (folder / "log").read_text().split("\n")[-2].split()  # e.g. ["b", "7"]: killed while saving step 7
        step = int(last[1])
        stats["mid_save"] += last[0] == "b"
        # the bank loads (an interrupted two-rename swap is finished by the load itself) ...
        loaded = PeftModel.from_pretrained(worker.tiny_base(), folder / "bank")
        assert loaded.tasks == ["alpha"]
        # ... and is byte for byte one complete save: the one before the kill, or the one in flight
        files = _tree(folder / "bank")
        candidates = {s: _tree(folder / "refs" / str(s)) for s in (step - 1, step) if (folder / "refs" / str(s)).is_dir()}
        matches = [s for s, ref in candidates.items() if ref == files]
        assert matches, f"trial {trial}: the bank after the kill at {last} is no complete save (a mix or a fragment)"
        if last[0] == "b":
            stats["mid_save_new" if matches[0] == step else "mid_save_old"] += 1
        else:
            assert matches == [step]  # the save had returned: the bank must be the new one
        stats["trials"] += 1
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".bank.")]
        assert not leftovers, f"leftovers of the killed save were not cleaned up: {leftovers}"
    return stats


def test_sigkill_during_save_leaves_one_complete_bank(forkserver, tmp_path, capsys):
    """24 children saving in a loop (renameat2 exchange), each SIGKILLed after a random delay."""
    stats = _kill_trials(forkserver, tmp_path, trials=24, use_exchange=True, seed=7)
    with capsys.disabled():
        print(f"\n[atomic save, exchange] {stats}")
    assert stats["trials"] == 24
    assert stats["mid_save"] >= 3, f"too few kills landed inside save_pretrained to prove anything: {stats}"


def test_sigkill_during_two_rename_save_leaves_one_complete_bank(forkserver, tmp_path, capsys):
    """The portable swap (two renames), 12 trials: same guarantee, with recovery on load."""
    stats = _kill_trials(forkserver, tmp_path, trials=12, use_exchange=False, seed=11)
    with capsys.disabled():
        print(f"\n[atomic save, two renames] {stats}")
    assert stats["trials"] == 12


def test_crash_between_the_two_renames_is_recovered_on_load(forkserver, tmp_path):
    import atomic_save_worker as worker

    child = forkserver.Process(target=worker.crash_between_renames, args=(str(tmp_path),))
    child.start()
    child.join(120)
    assert child.exitcode == -9
    assert not (tmp_path / "bank").exists()  # the window the two-rename swap cannot avoid
    kinds = sorted(p.name.split(".")[2].split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".bank."))
    assert kinds == ["old", "tmp"]
    loaded = PeftModel.from_pretrained(worker.tiny_base(), tmp_path / "bank")  # finishes the swap, then loads
    assert loaded.tasks == ["alpha"]
    assert _tree(tmp_path / "bank") == _tree(tmp_path / "refs" / "2")  # the new bank, complete
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bank.")]


def test_half_written_leftover_is_never_promoted(tmp_path):
    """A lone `.tmp-` folder (a save killed while writing) must not replace a missing bank."""
    (tmp_path / ".bank.tmp-999999-abc").mkdir()
    (tmp_path / ".bank.tmp-999999-abc" / "adapter_config.json").write_text("{")
    assert peft_asr.recover_bank(tmp_path / "bank") is False
    assert not (tmp_path / "bank").exists()


def test_save_keeps_foreign_files_and_drops_stale_statistics(tmp_path):
    from conftest import two_task_model

    model = two_task_model()
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "tokenizer.json").write_text("{}")
    (bank / "extra").mkdir()
    (bank / "extra" / "notes.txt").write_text("keep me")
    model.save_pretrained(bank)
    assert (bank / "tokenizer.json").read_text() == "{}" and (bank / "extra" / "notes.txt").read_text() == "keep me"
    assert (bank / "router_statistics.safetensors").is_file()
    assert oct(bank.stat().st_mode & 0o777) != oct(0o700)  # not the private mode of a temporary folder
    model.base_model.bank_config.save_router_statistics = False
    model.save_pretrained(bank)
    assert not (bank / "router_statistics.safetensors").exists()
    assert (bank / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bank.")]


def test_save_into_a_file_is_refused(tmp_path):
    from conftest import two_task_model

    (tmp_path / "file").write_text("x")
    with pytest.raises(BankError, match="is not a folder"):
        two_task_model().save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------- resume from a Trainer checkpoint
DATA = {"alpha": PromptAnswerData(*ALPHA_IDS, 24, seed=1), "beta": PromptAnswerData(*BETA_IDS, 24, seed=2)}


class _Crash(TrainerCallback):
    """Dies like a killed job at step ``at``: after checkpoint-3 is written, before the callback fits the router."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def _trainer(model, task, out, callbacks=(), **kw):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=6,
                             report_to=[], save_strategy="steps", save_steps=3, logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, **kw)
    return Trainer(model=model, args=args, train_dataset=DATA[task], data_collator=collate,
                   callbacks=[ASRCallback(progress=False), *callbacks])


def _model():
    return get_peft_model(tiny_llama(), ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"], router_layer=2))


def _statistics(model):
    return {k: v.clone() for k, v in model.base_model.router.statistics_state_dict().items()}


def _assert_same(a, b):
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-10, key


def test_resume_after_a_crash_counts_every_prompt_once(tmp_path):
    straight = _model()
    straight.add_task("alpha")
    _trainer(straight, "alpha", tmp_path / "s1").train()
    straight.add_task("beta")
    _trainer(straight, "beta", tmp_path / "s2").train()
    reference = _statistics(straight)
    assert reference["class_counts"].tolist() == [0, 24, 24]

    crashed = _model()
    crashed.add_task("alpha")
    _trainer(crashed, "alpha", tmp_path / "c1").train()
    crashed.add_task("beta")
    with pytest.raises(KeyboardInterrupt):
        _trainer(crashed, "beta", tmp_path / "c2", callbacks=[_Crash(at=4)]).train()
    checkpoint = tmp_path / "c2" / "checkpoint-3"
    assert checkpoint.is_dir()

    # a new process: rebuild the tasks, resume from the checkpoint
    fresh = _model()
    fresh.add_task("alpha")
    fresh.add_task("beta")
    _trainer(fresh, "beta", tmp_path / "c2").train(resume_from_checkpoint=str(checkpoint))
    _assert_same(_statistics(fresh), reference)

    # the same process, same model object, resumed after the exception
    # the crashed Trainer's callback never unpinned the task (its on_train_end did not run): leave its `with` block
    crashed.base_model._pinned.clear()
    _trainer(crashed, "beta", tmp_path / "c2").train(resume_from_checkpoint=str(checkpoint))
    _assert_same(_statistics(crashed), reference)

    # resuming a run that had already finished (and fitted beta) must not add beta a second time
    _trainer(straight, "beta", tmp_path / "s2").train(resume_from_checkpoint=str(tmp_path / "s2" / "checkpoint-6"))
    _assert_same(_statistics(straight), reference)


# ---------------------------------------------------------------- recovery touches ASR banks of this host only
def _fake_bank(folder: Path, peft_type: str = "ASR") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    return folder


def test_recovery_never_touches_folders_that_are_not_asr_banks(tmp_path):
    from peft_asr.bank.atomic import host_id as _host_id

    dead = f"{_host_id()}-999999-abc"
    # a LoRA adapter folder with leftovers named like ours: untouched
    _fake_bank(tmp_path / "lora", "LORA")
    stray = _fake_bank(tmp_path / f".lora.tmp-{dead}", "LORA")
    assert peft_asr.recover_bank(tmp_path / "lora") is False
    assert stray.is_dir()
    # a missing folder whose would-be replacement is not an ASR bank is not recreated from it
    _fake_bank(tmp_path / f".gone.tmp-{dead}", "LORA")
    _fake_bank(tmp_path / f".gone.old-{dead}", "LORA")
    assert peft_asr.recover_bank(tmp_path / "gone") is False and not (tmp_path / "gone").exists()


def test_recovery_deletes_only_this_hosts_leftovers_of_dead_processes(tmp_path):
    from peft_asr.bank.atomic import host_id as _host_id

    _fake_bank(tmp_path / "bank")
    ours_dead = _fake_bank(tmp_path / f".bank.tmp-{_host_id()}-999999-abc")
    ours_alive = _fake_bank(tmp_path / f".bank.tmp-{_host_id()}-{os.getpid()}-abd")
    other_host = _fake_bank(tmp_path / ".bank.tmp-h00000000-999999-abe")  # pid 999999 may live there
    no_host = _fake_bank(tmp_path / ".bank.old-999999-abf")  # an earlier version's leftover: host unknown
    peft_asr.recover_bank(tmp_path / "bank")
    assert not ours_dead.exists()
    assert ours_alive.is_dir() and other_host.is_dir() and no_host.is_dir()


def test_recovery_of_a_bank_whose_name_has_hyphens(tmp_path):
    """`checkpoint-500`: the save token is read from the end of the leftover's name, not split at the first '-'."""
    from peft_asr.bank.atomic import host_id as _host_id

    token = f"{_host_id()}-999999-abc"
    new = _fake_bank(tmp_path / f".checkpoint-500.tmp-{token}")
    (new / "marker").write_text("new")
    _fake_bank(tmp_path / f".checkpoint-500.old-{token}")
    assert peft_asr.recover_bank(tmp_path / "checkpoint-500") is True
    assert (tmp_path / "checkpoint-500" / "marker").read_text() == "new"
