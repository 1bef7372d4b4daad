"""The peft-asr command: help with examples, one-line errors, and the bank commands on a real saved bank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft_asr.cli import EXAMPLES, main


def test_every_command_has_help_with_an_example(capsys):
    for command in EXAMPLES:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and EXAMPLES[command].splitlines()[0] in out, command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/bank"], "is not a saved bank"),
        (["route", "/no/such/bank", "hello"], "is not a saved bank"),
        (["eval", "/no/such/bank", "--task", "json:a=x.json"], "is not a saved bank"),
        (["train", "--config", "/no/such.yaml"], "config file /no/such.yaml not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-asr: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "peft_asr", "info", "/no/such/bank"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("peft-asr: error:") and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def bank(stories_path, tmp_path_factory):
    """A two-task bank on the real tiny Llama: story openings vs. sums."""
    import peft_asr  # noqa: F401
    from peft import get_peft_model

    from peft_asr import ASRConfig
    from peft_asr.cl import prompt_batches
    from peft_asr.cl.default_model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(stories_path))
    model = get_peft_model(model, ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                            router_layer=2))
    stories = [f"Once upon a time there was a {w} who loved to play." for w in ("cat", "dog", "girl", "boy", "bird")]
    sums = [f"{a} plus {b} equals" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9)]]
    for name, rows in (("stories", stories), ("sums", sums)):
        model.add_task(name)
        model.fit_router(prompt_batches(tok, rows, batch_size=8), task=name, progress=False)
    path = tmp_path_factory.mktemp("bank")
    model.save_pretrained(path)
    return path


def test_info_route_and_eval_on_a_bank(bank, stories_path, tmp_path, capsys):
    assert main(["info", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "tasks (2):       stories, sums" in out and "can keep learning: yes" in out
    assert main(["route", str(bank), "--model", str(stories_path), "Once upon a time there was a fox who loved to play.",
                 "4 plus 4 equals"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("stories") and lines[2].startswith("sums")
    data = tmp_path / "eval.json"
    data.write_text('[{"prompt": "3 plus 3 equals", "answer": "6"}, {"prompt": "1 plus 1 equals", "answer": "2"}]')
    assert main(["eval", str(bank), "--model", str(stories_path), "--task", f"json:sums={data}",
                 "--max-new-tokens", "2", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "routing accuracy on 1 known task(s): 100.0%" in out


def test_train_command_on_a_yaml_stream(stories_path, tmp_path, capsys):
    rows = [{"prompt": f"{a} plus {b} equals", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (tmp_path / "t.json").write_text(json.dumps(rows[:12]))
    (tmp_path / "e.json").write_text(json.dumps(rows[12:]))
    (tmp_path / "stream.yaml").write_text(f"""
model: {stories_path}
output_dir: {tmp_path / 'out'}
tasks:
  - {{kind: json, name: sums, train: {tmp_path / 't.json'}, eval: {tmp_path / 'e.json'}}}
asr: {{r: 2, target_modules: [q_proj], router_layer: 2}}
training: {{per_device_train_batch_size: 4, disable_tqdm: true}}
max_new_tokens: 2
""")
    assert main(["train", "--config", str(tmp_path / "stream.yaml")]) == 0
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "bank" / "adapter_config.json").is_file()
    (tmp_path / "bad.yaml").write_text("tasks: []\nmodle: x\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown keys" in capsys.readouterr().err


STORIES_ID = "peft-asr-test/stories260K"
BANK_ID = "peft-asr-test/story-bank"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local Hub of tests/test_hub.py as the default endpoint, with an empty Hub cache; online until a test
    switches `HF_HUB_OFFLINE` on."""
    import huggingface_hub.constants
    import huggingface_hub.hf_api

    from test_hub import FakeHub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
        yield server


def test_info_and_route_of_a_hub_bank_at_a_revision_online_then_offline(hub, bank, stories_path, monkeypatch, capsys):
    """BANK as a repo id with --revision; no --model: the base model the bank records is a Hub id too, loaded through
    transformers. Offline, both come from the Hub cache."""
    import huggingface_hub.constants
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token="hf_test")
    api.create_repo(STORIES_ID)
    api.create_commit(STORIES_ID, [CommitOperationAdd(name, str(stories_path / name)) for name in (
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")],
        commit_message="the base model")
    config = json.loads((bank / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(stories_path)  # the fixture's bank names a folder: name the id
    config["base_model_name_or_path"] = STORIES_ID
    api.create_repo(BANK_ID)
    api.create_branch(BANK_ID, branch="dev")
    api.create_commit(BANK_ID, [CommitOperationAdd(name, str(bank / name)) for name in (
        "adapter_model.safetensors", "router_statistics.safetensors")]
        + [CommitOperationAdd("adapter_config.json", json.dumps(config).encode())],
        commit_message="bank", revision="dev")
    prompts = ["Once upon a time there was a fox who loved to play.", "4 plus 4 equals"]

    assert main(["info", BANK_ID, "--revision", "dev"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bank:            {BANK_ID} (") and f"base model:      {STORIES_ID}\n" in out
    assert "tasks (2):       stories, sums" in out and "can keep learning: yes" in out
    assert main(["route", BANK_ID, "--revision", "dev", *prompts]) == 0
    online = capsys.readouterr().out
    assert online.splitlines()[0].startswith("stories") and online.splitlines()[2].startswith("sums")
    assert hub.unknown == []

    hub.__exit__()  # nothing answers: the bank and its base model come from the Hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["route", BANK_ID, "--revision", "dev", *prompts]) == 0
    assert capsys.readouterr().out == online
    for argv, message in (
        (["route", BANK_ID, "--revision", "dev", "--model", "peft-asr-test/missing", "hi"],
         "--model: cannot load model 'peft-asr-test/missing': not a local folder, and transformers could not load "
         "it from the Hub or its cache"),
        (["route", BANK_ID, "--revision", "dev", "--model", "/no/such/model", "hi"],
         "--model: model '/no/such/model' is not a local folder (and not a Hub repo id such as 'org/name'); pass "
         "--model PATH with the base model (a folder or a Hub id)."),
        (["info", BANK_ID], f"cannot load '{BANK_ID}': no such folder, and the Hub download failed"),
        (["info", str(bank), "--revision", "dev"], "is a local path; `revision` ('dev') chooses a revision"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("peft-asr: error: ") and message in err and err.count("\n") == 1, err


def test_a_bank_that_names_no_usable_base_model_says_to_pass_model(bank, tmp_path, capsys):
    import shutil

    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    for recorded, message in ((None, "the bank records no base model (`base_model_name_or_path`); pass --model PATH"),
                              ("/elsewhere/llama", "the bank's base model: model '/elsewhere/llama' is not a local "
                                                   "folder")):
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        assert main(["route", str(copy), "hi"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
