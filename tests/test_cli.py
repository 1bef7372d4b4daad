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
