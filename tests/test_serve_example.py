"""examples/serve_routed.py: a routed multi-LoRA service on a `peft-asr export` folder.

The answers of the service (route with ShallowRouter, group rows per task, one multi-adapter PeftModel) must equal
what the bank itself answers for each prompt alone with the routed task pinned (`use_task`); bad requests are
refused with a 400 before any generation.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the example imports its neighbour tiny_model.py

import serve_routed  # noqa: E402
from peft_asr.cl import prompt_batches  # noqa: E402
from peft_asr.deploy.export_bank import export_bank  # noqa: E402

# both tasks, a second prompt of each (groups of 2 rows), and a prompt far from both: the base route with stories260K
# and with the random tiny Llama alike (checked with both)
PROMPTS = ["Give the initials: blue lake moon", "Rewrite the list: owl, fox, bee", "zzzz qqqq xxxx jjjj",
           "Rewrite the list: cat, yak", "Give the initials: quiet river stone"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    bank, base = serve_routed.build_demo_bank(root)
    service = serve_routed.RoutedService.from_export(str(export_bank(bank, root / "served")), str(base))
    return bank, base, root, service


def _pinned(bank, tokenizer, prompt: str, task: str, max_new_tokens: int) -> str:
    """The bank's own answer to ``prompt`` alone, with ``task`` pinned (None: the plain base model)."""
    batch = next(prompt_batches(tokenizer, [prompt]))
    with torch.no_grad(), bank.use_task(None if task == "__base__" else task):
        out = bank.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_answers_equal_the_pinned_bank_one_prompt_at_a_time(demo):
    bank, _base, _root, service = demo
    results = service.generate(PROMPTS, 8)
    routed = [r["task"] for r in results]
    batch = next(prompt_batches(service.tokenizer, PROMPTS))
    assert routed == bank.route(**batch)  # the shallow router decides as the bank
    assert set(routed) == {"reverse", "initials", "__base__"}, routed  # every kind of group is exercised
    assert [r["adapter"] for r in results] == [None if t == "__base__" else t for t in routed]
    expected = [_pinned(bank, service.tokenizer, p, t, 8) for p, t in zip(PROMPTS, routed)]
    assert [r["text"] for r in results] == expected
    for prompt, task, answer in zip(PROMPTS, routed, expected):  # a wrong adapter would show on every row
        others = {"reverse", "initials", "__base__"} - {task}
        assert any(_pinned(bank, service.tokenizer, prompt, o, 8) != answer for o in others), (prompt, task)


def test_tasks_left_out_of_the_export_are_answered_by_the_base_model(demo):
    bank, base, root, _service = demo
    service = serve_routed.RoutedService.from_export(str(export_bank(bank, root / "only-reverse", tasks=["reverse"])),
                                                     str(base))
    assert service.routes == {"__base__": None, "reverse": "reverse", "initials": None}
    results = service.generate(PROMPTS, 6)
    for prompt, result in zip(PROMPTS, results):
        served = "reverse" if result["task"] == "reverse" else "__base__"
        assert result["text"] == _pinned(bank, service.tokenizer, prompt, served, 6), result


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def server(demo):
    service = demo[3]
    server = serve_routed.RoutedServer(("127.0.0.1", 0), service, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", service
    server.shutdown()
    server.server_close()
    thread.join()


BAD = [
    (b"{not json", r"not valid JSON"),
    (b'["Rewrite the list: owl"]', r"must be a JSON object"),
    (b'{"max_new_tokens": 4}', r"`prompts` must be a non-empty list"),
    (b'{"prompts": "Rewrite the list: owl"}', r"`prompts` must be a non-empty list"),
    (b'{"prompts": []}', r"`prompts` must be a non-empty list"),
    (b'{"prompts": ["ok", ""]}', r"`prompts\[1\]` must be a non-empty string"),
    (b'{"prompts": ["ok", 3]}', r"`prompts\[1\]` must be a non-empty string"),
    (b'{"prompts": ["ok"], "max_new_tokens": 0}', r"`max_new_tokens` must be an int in \[1, 256\]"),
    (b'{"prompts": ["ok"], "max_new_tokens": true}', r"`max_new_tokens` must be an int"),
    (b'{"prompts": ["ok"], "max_new_tokens": 4096}', r"`max_new_tokens` must be an int"),
    (b'{"prompts": ["ok"], "temperature": 0.7}', r"unknown fields \['temperature'\]"),
]


def test_http_generate_and_clear_400s_before_any_generation(server, monkeypatch):
    url, service = server
    status, reply = _post(url + "/generate", json.dumps({"prompts": PROMPTS, "max_new_tokens": 8}).encode())
    assert status == 200, reply
    assert reply == {"results": service.generate(PROMPTS, 8)}

    calls = []
    monkeypatch.setattr(service, "generate", lambda *a: calls.append(a) or [])
    for data, message in BAD:
        status, reply = _post(url + "/generate", data)
        assert status == 400 and re.search(message, reply["error"]), (data, status, reply)
    status, reply = _post(url + "/route", b'{"prompts": ["ok"]}')
    assert status == 404 and "POST to /generate" in reply["error"]
    assert calls == []  # refused before any work


def test_demo_command_of_the_readme(monkeypatch, capsys):
    readme = (EXAMPLES / "README.md").read_text()
    command = re.search(r"^python (examples/serve_routed\.py .*)$", readme, re.M).group(1).split()
    monkeypatch.setattr(sys, "argv", [str(ROOT / command[0])] + command[1:])
    capsys.readouterr()
    runpy.run_path(str(ROOT / command[0]), run_name="__main__")
    out = capsys.readouterr().out
    assert "POST /generate -> 200" in out, out
    reply = json.loads(out[out.index("\n{") + 1:])
    tasks = [r["task"] for r in reply["results"]]
    assert len(tasks) == len(serve_routed.DEMO_PROMPTS) and {"reverse", "initials"} <= set(tasks), out
    assert all(isinstance(r["text"], str) for r in reply["results"])
