"""Hub round trip against a local Hub: ``push_to_hub`` keeps the bank's card and uploads it in one commit, and
``PeftModel.from_pretrained(base, "org/bank")`` loads it from the Hub cache with ``HF_HUB_OFFLINE=1``.

``FakeHub`` is an in-process HTTP server that speaks the calls ``huggingface_hub`` makes for an upload and a
download: ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``
(every file answered "regular", so no LFS/Xet transfer is involved), ``POST /api/models/{repo}/commit/{rev}``
(ndjson) and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``. Any other request is recorded and answered 404, and
the tests assert that there was none, so a new call in a future ``huggingface_hub`` shows up here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import peft_asr  # noqa: F401
import peft_asr  # noqa: F401  (wraps PeftModel.push_to_hub for ASR banks)
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, two_task_model

TESTS = Path(__file__).resolve().parent
REPO = "peft-asr-test/bank"
BASE_ID = "peft-asr-test/tiny-llama"


class FakeHub:
    """A minimal Hub: repositories with a linear history on ``main``; files kept in memory."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "commits": [ {...} ]}
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status, payload=b"", headers=None, head=False):
                data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else payload
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if isinstance(payload, (dict, list)):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_POST(self):
                body = self._body()
                with hub.lock:
                    status, payload = hub.post(self.path.split("?")[0], body)
                self._send(status, payload)

            def do_HEAD(self):
                with hub.lock:
                    status, data, headers = hub.resolve(self.path.split("?")[0])
                self._send(status, data, headers, head=True)

            def do_GET(self):
                with hub.lock:
                    status, data, headers = hub.resolve(self.path.split("?")[0])
                self._send(status, data, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- the API -------------------------------------------------------------------------------------------------
    def post(self, path: str, body: bytes):
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {"files": {}, "commits": []}
            return 200, {"url": f"{self.url}/{repo_id}"}
        if path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the card's metadata must be valid YAML
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")  # ['', 'api', 'models', org, name, 'preupload'|'commit', revision]
        if len(parts) == 7 and parts[1:3] == ["api", "models"] and parts[5] in ("preupload", "commit"):
            repo_id = f"{parts[3]}/{parts[4]}"
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            if parts[5] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            return self.commit(repo_id, body)
        self.unknown.append(f"POST {path}")
        return 404, {"error": f"not served by FakeHub: {path}"}

    def commit(self, repo_id: str, body: bytes):
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, ops = lines[0], lines[1:]
        assert header["key"] == "header"
        files = dict(repo["files"])
        added, deleted = [], []
        for op in ops:
            value = op["value"]
            if op["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            elif op["key"] == "deletedFile":
                if value["path"] not in files:
                    return 404, {"error": f"A file with this name doesn't exist: {value['path']}"}
                del files[value["path"]]
                deleted.append(value["path"])
            else:  # lfsFile etc.: preupload said "regular", so a client must not send them
                return 400, {"error": f"unexpected commit operation {op['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        repo["files"] = files
        repo["commits"].append({"oid": oid, "summary": header["value"]["summary"], "added": added,
                                "deleted": deleted})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def resolve(self, path: str):
        parts = path.split("/")  # ['', org, name, 'resolve', revision, *file]
        if len(parts) < 6 or parts[3] != "resolve":
            self.unknown.append(f"GET {path}")
            return 404, b"", {}
        repo_id, revision, filename = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
        repo = self.repos.get(repo_id)
        if repo is None or not repo["commits"]:
            return 404, b"", {"X-Error-Code": "RepoNotFound"}
        if revision not in ("main", repo["commits"][-1]["oid"]):
            return 404, b"", {"X-Error-Code": "RevisionNotFound"}
        if filename not in repo["files"]:
            return 404, b"", {"X-Error-Code": "EntryNotFound"}
        data = repo["files"][filename]
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id, as the Hub reports it
        return 200, data, {"X-Repo-Commit": repo["commits"][-1]["oid"], "ETag": f'"{etag}"'}


@pytest.fixture
def hub(monkeypatch):
    """A local Hub; offline mode (set by CI for the rest of the suite) is lifted for the upload calls only."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        yield server


def _named_model():
    from conftest import tiny_llama

    base = tiny_llama()
    base.config._name_or_path = BASE_ID  # what from_pretrained would set; the card's base_model comes from it
    return two_task_model(base)


def _card_metadata(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


def test_push_keeps_card_and_uploads_in_one_commit(hub):
    model = _named_model()
    info = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", tags=["my-tag"])
    repo = hub.repos[REPO]
    assert len(repo["commits"]) == 1 and info.oid == repo["commits"][0]["oid"]
    assert repo["commits"][0]["summary"] == "Upload Analytic Subspace Routing bank"
    assert sorted(repo["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                     "router_statistics.safetensors"]
    meta = _card_metadata(repo["files"]["README.md"])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == BASE_ID
    assert {"peft", "peft-asr", "analytic-subspace-routing", "my-tag"} <= set(meta["tags"])
    body = repo["files"]["README.md"].decode()
    assert "# Analytic Subspace Routing bank" in body and "import peft_asr" in body
    assert "| 1 | `alpha` | 48 |" in body and "| 2 | `beta` | 48 |" in body
    assert json.loads(repo["files"]["adapter_config.json"])["tasks"] == ["alpha", "beta"]
    assert hub.unknown == []


def test_push_again_replaces_stale_statistics_in_the_same_commit(hub):
    model = _named_model()
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    model.peft_config["default"].save_router_statistics = False
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", commit_message="routing only")
    commits = hub.repos[REPO]["commits"]
    assert len(commits) == 2  # the repository existed (409 handled), one commit per push
    assert commits[1]["summary"] == "routing only"
    assert commits[1]["deleted"] == ["router_statistics.safetensors"]
    assert "router_statistics.safetensors" not in hub.repos[REPO]["files"]
    assert hub.unknown == []


def test_push_bank_to_hub_refuses_other_methods():
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_llama

    from peft_asr.bank.push import push_bank_to_hub

    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="uploads ASR banks only"):
        push_bank_to_hub(lora, REPO)


OFFLINE_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import peft_asr
    from peft import PeftModel
    from conftest import tiny_llama, left_pad
    base = tiny_llama()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    batch = left_pad(json.loads(sys.argv[3]))
    print(json.dumps({"routes": model.route(**batch), "tasks": model.tasks,
                      "counts": model.base_model.router.class_counts.tolist()}))
    """
)


def test_from_pretrained_from_hub_cache_offline(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    model = _named_model()
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    cache = tmp_path / "hub"
    # fill the standard cache (blobs/, snapshots/<commit>/, refs/main) the way any download does
    for filename in hub.repos[REPO]["files"]:
        hf_hub_download(REPO, filename, cache_dir=cache, endpoint=hub.url, token="hf_test")
    commit = hub.repos[REPO]["commits"][-1]["oid"]
    folder = cache / f"models--{REPO.replace('/', '--')}"
    assert (folder / "refs" / "main").read_text() == commit
    assert (folder / "snapshots" / commit / "adapter_model.safetensors").is_file()
    hub.__exit__()  # nothing answers any more: the load below must come from the cache alone

    rows = prompts(*ALPHA_IDS, 3, seed=7) + prompts(*BETA_IDS, 3, seed=8)
    expected = model.route(**left_pad(rows))
    assert expected == ["alpha"] * 3 + ["beta"] * 3
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url,
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("HF_HOME", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, str(TESTS), REPO, json.dumps(rows)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["routes"] == expected
    assert out["tasks"] == ["alpha", "beta"]
    assert out["counts"] == model.base_model.router.class_counts.tolist()
    assert hub.unknown == []
