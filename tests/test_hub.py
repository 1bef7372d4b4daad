"""Hub round trip against a local Hub: ``push_to_hub`` keeps the bank's card and uploads it in one commit, and
``PeftModel.from_pretrained(base, "org/bank")`` downloads the bank's files only, then loads it from the Hub cache with
``HF_HUB_OFFLINE=1``.

``FakeHub`` is an in-process HTTP server that speaks the calls ``huggingface_hub`` makes for an upload and a
download, with the JSON the Hub answers:

* ``POST /api/repos/create`` (the repository starts with an "initial commit" of ``.gitattributes``, as on the Hub),
  ``POST /api/validate-yaml``, ``POST /api/models/{repo}/branch/{branch}``;
* ``POST /api/models/{repo}/preupload/{rev}`` (every file answered "regular", so no LFS/Xet transfer is involved;
  ``oid`` for a file the revision already has) and ``POST /api/models/{repo}/commit/{branch}`` (ndjson);
* ``GET /api/models/{repo}[/revision/{rev}]`` (``sha``, ``siblings``: what ``snapshot_download`` pins a revision with)
  and ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...`` (paginated with a ``Link`` header: the listing
  ``snapshot_download`` filters and ``upload_folder(delete_patterns=...)`` matches);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``;
* ``GET /api/agent-harnesses``, a registry ``huggingface_hub`` reads for itself once a day (served empty).

Every request is logged; any other one is recorded as unknown and answered 404, and the tests assert that there was
none, so a new call in a future ``huggingface_hub`` shows up here.
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
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode

import pytest
import yaml

import peft_asr  # noqa: F401  (wraps PeftModel.push_to_hub for ASR banks)
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, two_task_model

TESTS = Path(__file__).resolve().parent
REPO = "peft-asr-test/bank"
BASE_ID = "peft-asr-test/tiny-llama"


class FakeHub:
    """A minimal Hub: model repositories with branches and a git-like history; files kept in memory.

    ``create_repo`` makes the repository with an "initial commit" holding ``.gitattributes`` on ``main``, as the Hub
    does. Every commit keeps the whole file set it leaves, so any branch or commit id can be read back. Every request
    is logged in ``requests`` (``"METHOD /path"``, unquoted, without the query); those FakeHub does not serve are also
    in ``unknown``.
    """

    TREE_PAGE = 1000  # entries per page of a tree listing (the Hub's; 50 with `expand`, which is not served here)

    def __init__(self, tree_page: int = TREE_PAGE):
        # repo_id -> {"refs": {branch: oid}, "commits": {oid: commit}, "created": date}; a commit is
        # {"oid", "parent", "summary", "date", "files": {path: bytes}, "added": [path], "deleted": [path]}
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, list[str]]] = []  # (method, unquoted path segments) of every request
        self.unknown: list[str] = []
        self.tree_page = tree_page
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

            def _handle(self, method: str):
                path, _, query = self.path.partition("?")
                body = self._body() if method == "POST" else b""
                with hub.lock:
                    status, payload, headers = hub.handle(method, path, parse_qs(query), body)
                self._send(status, payload, headers, head=method == "HEAD")

            def do_POST(self):
                self._handle("POST")

            def do_HEAD(self):
                self._handle("HEAD")

            def do_GET(self):
                self._handle("GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- what the tests read -------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][self._resolve(repo, revision)]["files"]

    def history(self, repo_id: str, revision: str = "main") -> list[dict]:
        """The commits reachable from ``revision``, oldest first (the "initial commit" of ``create_repo`` included)."""
        repo = self.repos[repo_id]
        oid, out = self._resolve(repo, revision), []
        while oid is not None:
            out.append(repo["commits"][oid])
            oid = repo["commits"][oid]["parent"]
        return out[::-1]

    @property
    def requests(self) -> list[str]:
        """Every request so far, as ``"METHOD /path"`` (unquoted, without the query)."""
        return [f"{method} /{'/'.join(parts)}" for method, parts in self.log]

    def fetched(self) -> list[str]:
        """The repository paths of every file download request (``HEAD`` or ``GET .../resolve/...``), in order."""
        return ["/".join(parts[4:]) for method, parts in self.log
                if method in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve"]

    # --- requests ------------------------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, query: dict, body: bytes):
        # one segment per `/` of the URL, then unquoted: a revision or a tree path arrives with `/` as %2F
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        self.log.append((method, parts))
        answer = self.route(method, parts, query, body, raw_path)
        if answer is None:
            self.unknown.append(f"{method} {raw_path}" + (f"?{urlencode(query, doseq=True)}" if query else ""))
            return 404, {"error": f"not served by FakeHub: {method} {raw_path}"}, {}
        status, payload, *headers = answer
        return status, payload, headers[0] if headers else {}

    def route(self, method, parts, query, body, raw_path):
        flag = lambda key: query.get(key, ["false"])[-1].lower() in ("1", "true")  # noqa: E731
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self.create_repo(json.loads(body))
        if method == "GET" and parts == ["api", "agent-harnesses"] and not query:
            # a registry the client itself reads (at most once a day) to shape its terminal output: served empty
            return 200, {"standardEnvVars": [], "harnesses": {}}
        if method == "POST" and parts == ["api", "validate-yaml"]:
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the card's metadata must be valid YAML
            return 200, {"errors": [], "warnings": []}
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            repo = self.repos.get(repo_id)
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                if set(query) - {"blobs"}:
                    return None
                return self.repo_info(repo_id, repo, rest[1] if rest else "main", flag("blobs"))
            if method == "GET" and len(rest) in (2, 3) and rest[0] == "tree":
                if set(query) - {"recursive", "expand", "cursor"} or flag("expand"):
                    return None  # `expand` (last commit and security scan of each entry) is not served
                return self.tree(repo_id, repo, rest[1], rest[2] if len(rest) == 3 else "", flag("recursive"),
                                 int(query.get("cursor", ["0"])[-1]), raw_path, query)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self.preupload(repo, rest[1], json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                if query:  # `create_pr`: pull requests are not served
                    return None
                return self.commit(repo_id, repo, rest[1], body)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self.create_branch(repo, rest[1], json.loads(body or b"{}"))
            return None
        if method in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return None

    # --- the API -------------------------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, code: str, message: str, **headers):
        return status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **headers}

    @staticmethod
    def _blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id, as the Hub reports it

    @staticmethod
    def _resolve(repo: dict, revision: str):
        if revision in repo["refs"]:
            return repo["refs"][revision]
        return revision if revision in repo["commits"] else None

    def _repo_and_commit(self, repo, revision):
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        oid = self._resolve(repo, revision)
        if oid is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid

    def _new_commit(self, repo: dict, branch: str, parent, summary: str, files: dict, added, deleted) -> dict:
        oid = hashlib.sha1(f"{parent}\0{summary}\0{len(repo['commits'])}\0".encode()
                           + b"".join(p.encode() + b"\0" + self._blob_id(d).encode() for p, d in sorted(files.items()))
                           ).hexdigest()
        commit = {"oid": oid, "parent": parent, "summary": summary, "files": files, "added": added,
                  "deleted": deleted, "date": _now()}
        repo["commits"][oid] = commit
        repo["refs"][branch] = oid
        return commit

    def create_repo(self, req: dict):
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = self.repos[repo_id] = {"refs": {}, "commits": {}, "created": _now()}
        self._new_commit(repo, "main", None, "initial commit", {".gitattributes": GITATTRIBUTES},
                         [".gitattributes"], [])
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id,
                     "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def create_branch(self, repo, branch: str, req: dict):
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if branch.startswith("refs/") or not branch:
            return 400, {"error": f"Invalid reference for a branch: {branch}"}
        if branch in repo["refs"]:
            return 409, {"error": "Reference already exists"}
        start = self._repo_and_commit(repo, req.get("startingPoint", "main"))
        if not isinstance(start, str):
            return start
        repo["refs"][branch] = start
        return 200, {}

    def repo_info(self, repo_id: str, repo, revision: str, blobs: bool):
        oid = self._repo_and_commit(repo, revision)
        if not isinstance(oid, str):
            return oid
        commit = repo["commits"][oid]
        siblings = [{"rfilename": path, **({"blobId": self._blob_id(data), "size": len(data)} if blobs else {})}
                    for path, data in sorted(commit["files"].items())]
        return 200, {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                     "author": repo_id.split("/")[0], "sha": oid, "lastModified": commit["date"],
                     "createdAt": repo["created"], "private": False, "disabled": False, "gated": False,
                     "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": [],
                     "usedStorage": sum(len(d) for d in commit["files"].values())}

    def tree(self, repo_id, repo, revision, path, recursive, cursor, raw_path, query):
        oid = self._repo_and_commit(repo, revision)
        if not isinstance(oid, str):
            return oid
        files = repo["commits"][oid]["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        under = {p: d for p, d in files.items() if p.startswith(prefix)}
        if prefix and not under:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", **{"X-Repo-Commit": oid})
        entries: dict[str, dict] = {}
        for name, data in under.items():
            rel = name[len(prefix):].split("/")
            depth = len(rel) if recursive else 1
            for i in range(1, min(depth, len(rel) - 1) + 1):  # the folders on the way
                folder = prefix + "/".join(rel[:i])
                inside = sorted(f"{p}:{self._blob_id(d)}" for p, d in files.items() if p.startswith(folder + "/"))
                entries[folder] = {"type": "directory", "oid": hashlib.sha1("\n".join(inside).encode()).hexdigest(),
                                   "size": 0, "path": folder}
            if len(rel) == 1 or recursive:
                entries[name] = {"type": "file", "oid": self._blob_id(data), "size": len(data), "path": name}
        page = [entries[k] for k in sorted(entries)][cursor:cursor + self.tree_page]
        headers = {}
        if cursor + self.tree_page < len(entries):  # the next page, as a `Link` header (GitHub's format)
            params = {k: v[-1] for k, v in query.items() if k != "cursor"}
            params["cursor"] = cursor + self.tree_page
            headers["Link"] = f'<{self.url}{raw_path}?{urlencode(params)}>; rel="next"'
        return 200, page, headers

    def preupload(self, repo, revision: str, req: dict):
        oid = self._repo_and_commit(repo, revision)
        if not isinstance(oid, str):
            return oid
        files = repo["commits"][oid]["files"]
        # every file "regular" (no LFS/Xet transfer); `oid` for a file the revision has, as the Hub answers it
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                **({"oid": self._blob_id(files[f["path"]])} if f["path"] in files else {})}
                               for f in req["files"]], "commitOid": oid}

    def commit(self, repo_id: str, repo, branch: str, body: bytes):
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if branch not in repo["refs"]:  # commits go to a branch, never to a commit id
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, ops = lines[0], lines[1:]
        assert header["key"] == "header"
        head = repo["refs"][branch]
        parent = header["value"].get("parentCommit")
        if parent is not None and parent != head:
            return 412, {"error": f"A commit has happened since {parent}: the branch is at {head}"}
        files = dict(repo["commits"][head]["files"])
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
        commit = self._new_commit(repo, branch, head, header["value"]["summary"], files, added, deleted)
        oid = commit["oid"]
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def resolve(self, repo_id: str, revision: str, filename: str):
        repo = self.repos.get(repo_id)
        oid = self._repo_and_commit(repo, revision)
        if not isinstance(oid, str):
            return oid[0], b"", oid[2]
        files = repo["commits"][oid]["files"]
        if filename not in files:
            return 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}
        data = files[filename]
        return 200, data, {"X-Repo-Commit": oid, "ETag": f'"{self._blob_id(data)}"'}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # as the Hub writes dates


GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""


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


BANK_FILES = ("adapter_config.json", "adapter_model.safetensors", "router_statistics.safetensors")
PICKLE = b"\x80\x04 a pickle file next to the bank: never to be fetched"


def test_push_keeps_card_and_uploads_in_one_commit(hub):
    model = _named_model()
    info = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", tags=["my-tag"])
    history = hub.history(REPO)
    assert [c["summary"] for c in history] == ["initial commit", "Upload Analytic Subspace Routing bank"]
    assert info.oid == history[-1]["oid"]
    files = hub.files(REPO)
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                             "router_statistics.safetensors"]
    assert history[-1]["deleted"] == []
    meta = _card_metadata(files["README.md"])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == BASE_ID
    assert {"peft", "peft-asr", "analytic-subspace-routing", "my-tag"} <= set(meta["tags"])
    body = files["README.md"].decode()
    assert "# Analytic Subspace Routing bank" in body and "import peft_asr" in body
    assert "| 1 | `alpha` | 48 |" in body and "| 2 | `beta` | 48 |" in body
    assert json.loads(files["adapter_config.json"])["tasks"] == ["alpha", "beta"]
    assert hub.unknown == []


def test_push_again_replaces_stale_statistics_in_the_same_commit(hub):
    hub.tree_page = 2  # the listing that finds the stale file spans pages
    model = _named_model()
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    model.peft_config["default"].save_router_statistics = False
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", commit_message="routing only")
    commits = hub.history(REPO)
    assert len(commits) == 3  # the repository existed (409 handled), one commit per push
    assert commits[2]["summary"] == "routing only"
    assert commits[2]["deleted"] == ["router_statistics.safetensors"]
    assert "router_statistics.safetensors" not in hub.files(REPO)
    assert ".gitattributes" in hub.files(REPO)
    # statistics kept again: uploaded, not deleted
    model.peft_config["default"].save_router_statistics = True
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", commit_message="with statistics")
    commits = hub.history(REPO)
    assert len(commits) == 4 and commits[3]["summary"] == "with statistics"
    assert "router_statistics.safetensors" in commits[3]["added"] and commits[3]["deleted"] == []
    assert hub.files(REPO)["router_statistics.safetensors"] == commits[1]["files"]["router_statistics.safetensors"]
    assert hub.unknown == []


def test_push_of_a_named_adapter_deletes_its_stale_statistics(hub):
    # PEFT saves an adapter not called "default" in a folder named after it: `[1]` must not read as a pattern
    from peft import get_peft_model

    from conftest import randomize_tasks, tiny_llama
    from peft_asr import ASRConfig

    base = tiny_llama()
    base.config._name_or_path = BASE_ID
    model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"],
                                           router_layer=2), adapter_name="task[1]")
    model.add_task("alpha")
    model.add_task("beta")
    randomize_tasks(model)
    model.fit_router([left_pad(prompts(*ALPHA_IDS, 8, seed=1))], task="alpha", progress=False)
    model.fit_router([left_pad(prompts(*BETA_IDS, 8, seed=2))], task="beta", progress=False)
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    assert "task[1]/router_statistics.safetensors" in hub.files(REPO)
    model.peft_config["task[1]"].save_router_statistics = False
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    assert hub.history(REPO)[-1]["deleted"] == ["task[1]/router_statistics.safetensors"]
    assert hub.unknown == []


def test_push_of_an_unchanged_bank_makes_no_commit(hub):
    model = _named_model()
    first = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    again = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")  # same files: nothing to commit
    assert len(hub.history(REPO)) == 2
    assert again.oid == first.oid == hub.history(REPO)[-1]["oid"]
    assert "router_statistics.safetensors" in hub.files(REPO)  # a file this save has is never deleted
    assert hub.unknown == []


def test_push_to_a_branch_and_pull_request_refused_before_any_request(hub):
    model = _named_model()
    with pytest.raises(ValueError, match="pull request"):
        model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", revision="dev", create_pr=True)
    assert hub.requests == [] and REPO not in hub.repos


def test_push_bank_to_hub_refuses_other_methods():
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_llama

    from peft_asr.bank.push import push_bank_to_hub

    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="uploads ASR banks only"):
        push_bank_to_hub(lora, REPO)


LOAD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import peft_asr
    from peft import PeftModel
    from conftest import tiny_llama, left_pad
    base = tiny_llama()
    model = PeftModel.from_pretrained(base, sys.argv[2], **json.loads(sys.argv[4])).eval()
    batch = left_pad(json.loads(sys.argv[3]))
    print(json.dumps({"routes": model.route(**batch), "tasks": model.tasks,
                      "counts": model.base_model.router.class_counts.tolist()}))
    """
)


def _load(hub_url: str, cache: Path, rows, offline: bool, **kwargs) -> dict:
    """``PeftModel.from_pretrained(tiny_llama(), REPO, **kwargs)`` in a fresh interpreter with the given Hub cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_CACHE": str(cache),
           "HF_ENDPOINT": hub_url, "HF_TOKEN": "hf_test", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("HF_HOME", None)
    proc = subprocess.run([sys.executable, "-c", LOAD, str(TESTS), REPO, json.dumps(rows), json.dumps(kwargs)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_from_pretrained_from_hub_cache_offline(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    model = _named_model()
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    cache = tmp_path / "hub"
    # fill the standard cache (blobs/, snapshots/<commit>/, refs/main) the way any download does
    for filename in hub.files(REPO):
        hf_hub_download(REPO, filename, cache_dir=cache, endpoint=hub.url, token="hf_test")
    commit = hub.history(REPO)[-1]["oid"]
    folder = cache / f"models--{REPO.replace('/', '--')}"
    assert (folder / "refs" / "main").read_text() == commit
    assert (folder / "snapshots" / commit / "adapter_model.safetensors").is_file()
    hub.__exit__()  # nothing answers any more: the load below must come from the cache alone

    rows = prompts(*ALPHA_IDS, 3, seed=7) + prompts(*BETA_IDS, 3, seed=8)
    expected = model.route(**left_pad(rows))
    assert expected == ["alpha"] * 3 + ["beta"] * 3
    out = _load(hub.url, cache, rows, offline=True)
    assert out["routes"] == expected
    assert out["tasks"] == ["alpha", "beta"]
    assert out["counts"] == model.base_model.router.class_counts.tolist()
    assert hub.unknown == []


def test_from_pretrained_of_a_hub_revision_and_subfolder_fetches_the_bank_files_only(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import CommitOperationAdd, HfApi

    from peft_asr.bank.io import _hub_bank

    hub.tree_page = 3  # snapshot_download's listing spans pages
    model = _named_model()
    info = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", revision="dev")
    assert sorted(hub.files(REPO)) == [".gitattributes"]  # the push went to the branch only
    assert hub.history(REPO, "dev")[-1]["oid"] == info.oid
    bank = hub.files(REPO, "dev")
    # the same bank in a sub-folder, a pickle file next to it and at the top, another folder: only the bank's three
    # files may be downloaded
    HfApi(endpoint=hub.url, token="hf_test").create_commit(
        REPO, [CommitOperationAdd(f"banks/alpha/{f}", bank[f]) for f in BANK_FILES]
        + [CommitOperationAdd("banks/alpha/adapter_model.bin", PICKLE), CommitOperationAdd("adapter_model.bin", PICKLE),
           CommitOperationAdd("banks/beta/adapter_config.json", bank["adapter_config.json"])],
        commit_message="more banks", revision="dev",
    )
    commit = hub.history(REPO, "dev")[-1]["oid"]
    hub.log.clear()

    rows = prompts(*ALPHA_IDS, 3, seed=7) + prompts(*BETA_IDS, 3, seed=8)
    expected = model.route(**left_pad(rows))
    cache = tmp_path / "hub"
    out = _load(hub.url, cache, rows, offline=False, revision="dev", subfolder="banks/alpha")
    assert out["routes"] == expected and out["tasks"] == ["alpha", "beta"]
    assert set(hub.fetched()) == {f"banks/alpha/{f}" for f in BANK_FILES}, hub.requests
    assert not [r for r in hub.requests if "adapter_model.bin" in r]
    folder = cache / f"models--{REPO.replace('/', '--')}"
    assert (folder / "refs" / "dev").read_text() == commit
    snapshot = folder / "snapshots" / commit
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == [
        f"banks/alpha/{f}" for f in BANK_FILES]
    assert hub.unknown == []

    hub.__exit__()  # offline, the bank's files come from the cache alone (the cached listing has the other files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    local = _hub_bank(REPO, "banks/alpha", {"revision": "dev", "cache_dir": str(cache)})
    assert Path(local) == snapshot / "banks" / "alpha"
    # and the whole load works offline: PEFT reads the checked snapshot folder, not `subfolder` again
    out = _load(hub.url, cache, rows, offline=True, revision="dev", subfolder="banks/alpha")
    assert out["routes"] == expected and out["tasks"] == ["alpha", "beta"]


def _push_with_a_pickle_only_folder(hub) -> None:
    """A bank at the top of the repo, and in `pickled/` its config next to a pickle file only."""
    from huggingface_hub import CommitOperationAdd, HfApi

    _named_model().push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    config = hub.files(REPO)["adapter_config.json"]
    HfApi(endpoint=hub.url, token="hf_test").create_commit(
        REPO, [CommitOperationAdd("pickled/adapter_config.json", config),
               CommitOperationAdd("pickled/adapter_model.bin", PICKLE)], commit_message="pickle only")


def test_hub_bank_without_safetensors_is_refused_without_fetching_the_pickle(hub, tmp_path):
    from peft_asr import BankError
    from peft_asr.bank.io import _hub_bank

    _push_with_a_pickle_only_folder(hub)
    hub.log.clear()
    with pytest.raises(BankError, match="has no adapter_model.safetensors"):
        _hub_bank(REPO, "pickled", {"endpoint": hub.url, "token": "hf_test", "cache_dir": str(tmp_path)})
    assert set(hub.fetched()) == {"pickled/adapter_config.json"}
    with pytest.raises(BankError, match="neither a local folder nor a Hub repo"):
        _hub_bank(REPO, "nowhere", {"endpoint": hub.url, "token": "hf_test", "cache_dir": str(tmp_path)})
    with pytest.raises(BankError, match="the Hub download failed"):
        _hub_bank(REPO, None, {"endpoint": hub.url, "token": "hf_test", "cache_dir": str(tmp_path),
                               "revision": "no-such-branch"})
    assert hub.unknown == []


def test_a_bad_hub_bank_is_refused_before_the_base_model_changes(hub, tmp_path):
    """`from_pretrained` of a Hub id fetches and checks the bank first, then PEFT builds the model from the checked
    files: a bad bank leaves the base model as it was, as a bad local bank does."""
    from peft import PeftModel

    from conftest import tiny_llama
    from peft_asr import BankError

    _push_with_a_pickle_only_folder(hub)
    base = tiny_llama()
    before = [name for name, _ in base.named_modules()]
    hub_kwargs = dict(endpoint=hub.url, token="hf_test", cache_dir=str(tmp_path))
    with pytest.raises(BankError, match="has no adapter_model.safetensors"):
        PeftModel.from_pretrained(base, REPO, subfolder="pickled", **hub_kwargs)
    assert [name for name, _ in base.named_modules()] == before  # no layer injected
    assert not [r for r in hub.requests if "adapter_model.bin" in r]
    # the good bank at the top of the same repo loads through the same path
    loaded = PeftModel.from_pretrained(base, REPO, **hub_kwargs)
    assert loaded.tasks == ["alpha", "beta"]
    assert hub.unknown == []
