"""Hub round trip against a local Hub: ``push_to_hub`` keeps the bank's card and uploads it in one commit (to main, a
branch, a new pull request against any branch, or an open one), and ``PeftModel.from_pretrained(base, "org/bank")``
downloads the bank's files only, then loads it from the Hub cache with ``HF_HUB_OFFLINE=1``; the team flow (load a
shared bank, add a task, propose it as a pull request, merge banks by repo id); the card's ``base_model``.

``FakeHub`` is an in-process HTTP server that speaks the calls ``huggingface_hub`` makes for an upload and a
download, with the JSON the Hub answers:

* ``POST /api/repos/create`` (the repository starts with an "initial commit" of ``.gitattributes``, as on the Hub),
  ``POST /api/validate-yaml``, ``POST /api/models/{repo}/branch/{branch}``;
* ``POST /api/models/{repo}/preupload/{rev}`` (every file answered "regular", so no LFS/Xet transfer is involved;
  ``oid`` for a file the revision already has) and ``POST /api/models/{repo}/commit/{rev}`` (ndjson) to a branch or
  a ``refs/pr/N``; with ``?create_pr=1`` (what ``HfApi.create_commit(create_pr=True)`` sends) the commit opens pull
  request N against that branch: a ref ``refs/pr/N`` starting at the branch's head, the commit on it, and the
  ``pullRequestUrl`` ``.../discussions/N`` that ``CommitInfo.pr_revision`` is read from;
* ``GET /api/models/{repo}/refs[?include_prs=1]`` (branches, and the pull requests' refs);
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
import functools
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
        # repo_id -> {"refs": {branch or "refs/pr/N": oid}, "commits": {oid: commit}, "prs": [pull request],
        # "created": date}; a commit is {"oid", "parent", "summary", "date", "files": {path: bytes}, "added": [path],
        # "deleted": [path]}; a pull request is {"num", "ref", "target" (its base branch), "title"}
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
                if set(query) - {"create_pr"}:
                    return None
                return self.commit(repo_id, repo, rest[1], body, create_pr=flag("create_pr"))
            if method == "GET" and rest == ["refs"]:
                if set(query) - {"include_prs"}:
                    return None
                return self.refs(repo, flag("include_prs"))
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
        repo = self.repos[repo_id] = {"refs": {}, "commits": {}, "prs": [], "created": _now()}
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

    def refs(self, repo, include_prs: bool):
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        refs = sorted(repo["refs"].items())
        answer = {"branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in refs
                               if not name.startswith("refs/")], "converts": [], "tags": []}
        if include_prs:
            answer["pullRequests"] = [{"name": name, "ref": name, "targetCommit": oid} for name, oid in refs
                                      if name.startswith("refs/pr/")]
        return 200, answer

    def commit(self, repo_id: str, repo, branch: str, body: bytes, create_pr: bool = False):
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if branch not in repo["refs"]:  # commits go to a branch or a pull request, never to a commit id
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        if create_pr and branch.startswith("refs/"):
            return 400, {"error": f"A pull request is opened against a branch, not {branch}"}
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
        pr = None
        if create_pr:  # a new pull request: its ref starts at the branch's head and takes the commit
            pr = {"num": len(repo["prs"]) + 1, "target": branch, "title": header["value"]["summary"]}
            pr["ref"] = branch = f"refs/pr/{pr['num']}"
            repo["prs"].append(pr)
        commit = self._new_commit(repo, branch, head, header["value"]["summary"], files, added, deleted)
        oid = commit["oid"]
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pr['num']}" if pr else None}

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
    """A local Hub; offline mode (set by CI for the rest of the suite) is lifted for the upload calls only. It is the
    default endpoint too, so a call that names none (PEFT's save looks up a Hub-named base model's config.json with
    `huggingface_hub.file_exists`) reaches it, never the real Hub."""
    import huggingface_hub.constants
    import huggingface_hub.hf_api

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)  # the `file_exists` of the module
        yield server


def _named_base():
    from conftest import tiny_llama

    base = tiny_llama()
    # what `from_pretrained(BASE_ID)` sets: PEFT records `name_or_path` as the bank's `base_model_name_or_path` and
    # `config._name_or_path` as the card's `base_model`
    base.config.name_or_path = base.name_or_path = BASE_ID
    return base


def _named_model():
    return two_task_model(_named_base())


GAMMA_IDS = (100, 120)  # a third synthetic task, apart from ALPHA_IDS and BETA_IDS


def _add_task(model, task: str, ids, seed: int) -> None:
    """Add `task` with a subspace of its own (the other tasks' left as they are) and fit the router on it."""
    import torch

    model.add_task(task)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".asr_B." in name and name.endswith(f".{task}"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.fit_router([left_pad(prompts(*ids, 48, seed=seed))], task=task, progress=False)


def _hub_kwargs(hub, cache: Path) -> dict:
    return {"endpoint": hub.url, "token": "hf_test", "cache_dir": str(cache)}


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


def test_team_flow_a_task_added_to_a_shared_bank_is_proposed_as_a_pull_request(hub, tmp_path):
    """A colleague loads the shared bank, adds a task and opens a pull request against main; a reviewer loads the
    proposal from `refs/pr/1`; the colleague adds a commit to the same pull request. Main never changes."""
    from peft import PeftModel

    from conftest import tiny_llama

    _named_model().push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    main = hub.history(REPO)[-1]["oid"]

    colleague = PeftModel.from_pretrained(tiny_llama(), REPO, is_trainable=True, **_hub_kwargs(hub, tmp_path / "c"))
    _add_task(colleague, "gamma", GAMMA_IDS, seed=3)
    info = colleague.push_to_hub(REPO, endpoint=hub.url, token="hf_test", create_pr=True, commit_message="Add gamma")
    assert (info.pr_num, info.pr_revision) == (1, "refs/pr/1") and info.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert hub.repos[REPO]["prs"] == [{"num": 1, "ref": "refs/pr/1", "target": "main", "title": "Add gamma"}]
    assert hub.history(REPO)[-1]["oid"] == main  # main is untouched until the pull request is merged
    proposal = hub.history(REPO, "refs/pr/1")
    assert [c["oid"] for c in proposal[-2:]] == [main, info.oid]  # one commit, on top of main
    assert sorted(proposal[-1]["added"]) == ["README.md", *BANK_FILES]
    files = hub.files(REPO, "refs/pr/1")
    assert json.loads(files["adapter_config.json"])["tasks"] == ["alpha", "beta", "gamma"]
    assert "| 3 | `gamma` | 48 |" in files["README.md"].decode()
    assert _card_metadata(files["README.md"])["base_model"] == BASE_ID  # the loaded bank's record, kept

    rows = prompts(*ALPHA_IDS, 2, seed=7) + prompts(*BETA_IDS, 2, seed=8) + prompts(*GAMMA_IDS, 2, seed=9)
    reviewed = PeftModel.from_pretrained(tiny_llama(), REPO, revision=info.pr_revision,
                                         **_hub_kwargs(hub, tmp_path / "r")).eval()
    assert reviewed.tasks == ["alpha", "beta", "gamma"]
    routes = reviewed.route(**left_pad(rows))
    assert routes == colleague.eval().route(**left_pad(rows)) == ["alpha"] * 2 + ["beta"] * 2 + ["gamma"] * 2

    colleague.fit_router([left_pad(prompts(*GAMMA_IDS, 8, seed=10))], task="gamma", progress=False)
    more = colleague.push_to_hub(REPO, endpoint=hub.url, token="hf_test", revision=info.pr_revision,
                                 commit_message="More gamma prompts")
    assert hub.history(REPO, "refs/pr/1")[-1]["oid"] == more.oid and more.pr_url is None
    assert "| 3 | `gamma` | 56 |" in hub.files(REPO, "refs/pr/1")["README.md"].decode()
    assert len(hub.repos[REPO]["prs"]) == 1 and hub.history(REPO)[-1]["oid"] == main
    assert hub.unknown == []


def test_pull_request_against_a_branch_and_refs_that_do_not_exist(hub):
    model = _named_model()
    model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", revision="dev")
    dev = hub.history(REPO, "dev")[-1]["oid"]
    model.peft_config["default"].save_router_statistics = False  # a routing-only proposal: the statistics go
    info = model.push_to_hub(REPO, endpoint=hub.url, token="hf_test", revision="dev", create_pr=True)
    assert info.pr_revision == "refs/pr/1" and hub.repos[REPO]["prs"][0]["target"] == "dev"
    assert hub.history(REPO, "dev")[-1]["oid"] == dev and "router_statistics.safetensors" in hub.files(REPO, "dev")
    proposal = hub.history(REPO, "refs/pr/1")
    assert proposal[-2]["oid"] == dev and proposal[-1]["deleted"] == ["router_statistics.safetensors"]
    assert hub.unknown == []

    hub.log.clear()
    refs = {repo_id: dict(repo["refs"]) for repo_id, repo in hub.repos.items()}
    push = functools.partial(model.push_to_hub, endpoint=hub.url, token="hf_test")
    with pytest.raises(ValueError, match=r"branch 'nope', which peft-asr-test/bank does not have \(branches: "
                                         r"\['dev', 'main'\]\)"):
        push(REPO, revision="nope", create_pr=True)
    with pytest.raises(ValueError, match=r"has no pull request 'refs/pr/7'"):
        push(REPO, revision="refs/pr/7")
    with pytest.raises(ValueError, match=r"'peft-asr-test/other' is not a repository on the Hub"):
        push("peft-asr-test/other", revision="dev", create_pr=True)
    assert {r.split()[0] for r in hub.requests} == {"GET"}  # refused before anything was created or changed
    assert {repo_id: repo["refs"] for repo_id, repo in hub.repos.items()} == refs
    hub.log.clear()
    with pytest.raises(ValueError, match=r"opens a new pull request; to add a commit to the open one, push with "
                                         r"revision='refs/pr/1' and without `create_pr`"):
        push(REPO, revision="refs/pr/1", create_pr=True)
    assert hub.requests == []


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


def test_merge_banks_by_hub_repo_id_at_revisions_and_offline(hub, tmp_path, monkeypatch):
    """`merge_banks` takes repo ids (each at its own revision) as it takes folders, and offline it merges the cached
    snapshots: the output is byte for byte the merge of the same banks as local folders."""
    import huggingface_hub.constants
    from peft import get_peft_model

    from peft_asr import ASRConfig, BankError, merge_banks

    other = "peft-asr-test/bank-gamma"
    pair = _named_model()
    gamma = get_peft_model(_named_base(), ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                    target_modules=["q_proj", "v_proj"], router_layer=2))
    _add_task(gamma, "gamma", GAMMA_IDS, seed=3)
    pair.push_to_hub(REPO, endpoint=hub.url, token="hf_test")
    gamma.push_to_hub(other, endpoint=hub.url, token="hf_test", revision="dev")
    pair.save_pretrained(tmp_path / "pair")
    gamma.save_pretrained(tmp_path / "gamma")
    merge_banks([tmp_path / "pair", tmp_path / "gamma"], tmp_path / "local")

    kwargs = _hub_kwargs(hub, tmp_path / "cache")
    merge_banks([REPO, other], tmp_path / "from-hub", revision=[None, "dev"], **kwargs)
    for name in BANK_FILES:
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert _card_metadata((tmp_path / "from-hub" / "README.md").read_bytes())["base_model"] == BASE_ID
    with pytest.raises(BankError, match=r"neither a local folder nor a Hub repo with adapter_config.json"):
        merge_banks([REPO, other], tmp_path / "m", **kwargs)  # `other` has its bank on `dev` only
    with pytest.raises(BankError, match=r"is a local path; `revision` \('dev'\) chooses a revision of a Hub repo"):
        merge_banks([tmp_path / "pair", other], tmp_path / "m", revision="dev", **kwargs)
    with pytest.raises(ValueError, match=r"`revision` must be a string \(for every bank\) or a list of 2"):
        merge_banks([REPO, other], tmp_path / "m", revision=["dev"], **kwargs)
    assert not (tmp_path / "m").exists() and hub.unknown == []

    hub.__exit__()  # offline: the cached snapshots of those revisions
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    merge_banks([REPO, other], tmp_path / "offline", revision=[None, "dev"], **kwargs)
    for name in BANK_FILES:
        assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    with pytest.raises(BankError, match=r"cannot load 'peft-asr-test/bank': no such folder, and the Hub download "
                                         r"failed \(Cannot find an appropriate cached snapshot"):
        merge_banks([REPO, other], tmp_path / "m", revision=[None, "dev"], **_hub_kwargs(hub, tmp_path / "empty"))


def _readme(model, folder: Path) -> tuple[dict, str, dict]:
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    return _card_metadata(text.encode()), text, json.loads((folder / "adapter_config.json").read_text())


def test_card_names_the_base_model_by_its_hub_id_or_not_at_all(tmp_path):
    """The card's `base_model` and PEFT's `base_model:adapter:` tag link a bank to its base in the Hub's model tree:
    a Hub id, the id of a Hub-cache snapshot folder, or nothing (never a local path, never '')."""
    from conftest import tiny_llama

    snapshot = tmp_path / "hub" / "models--peft-asr-test--tiny-llama" / "snapshots" / ("0" * 40)
    local = tmp_path / "my-llama"
    snapshot.mkdir(parents=True)
    local.mkdir()
    for name_or_path, expected in ((BASE_ID, BASE_ID), (str(snapshot), BASE_ID), (str(local), None), ("", None)):
        base = tiny_llama()
        base.config.name_or_path = base.name_or_path = name_or_path
        meta, text, config = _readme(two_task_model(base), tmp_path / f"bank{len(list(tmp_path.iterdir()))}")
        assert config["base_model_name_or_path"] == (name_or_path or None)  # the bank records what PEFT records
        adapter_tags = [t for t in meta["tags"] if t.startswith("base_model:adapter:")]
        if expected:
            assert meta["base_model"] == expected and adapter_tags == [f"base_model:adapter:{expected}"]
            assert f"- Base model: `{expected}`" in text and f'from_pretrained("{expected}")' in text
        else:
            assert "base_model" not in meta and adapter_tags == [], meta
            assert "- Base model: " + (f"a local model (`{local}`)" if name_or_path else "not recorded") in text
        if name_or_path == str(local):  # no id known: named in the body (what it is, how to load it) only
            assert text.count(name_or_path) == 2
        elif name_or_path:  # an id known: the snapshot folder never reaches the card
            assert name_or_path == expected or name_or_path not in text


def test_the_embedded_model_is_recorded_by_its_hub_id(hub, tmp_path, monkeypatch):
    """The embedded SmolLM2 is loaded from a conversion folder but named `HuggingFaceTB/SmolLM2-135M-Instruct`, so a
    bank trained on it records that id (config, card, tag); loading the id takes the Hub cache's copy when there is
    one, else the embedded model, without a request."""
    import huggingface_hub.constants
    import torch
    from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

    from conftest import tiny_llama
    from peft_asr.cl import default_model

    sys.path.insert(0, str(TESTS.parent / "examples"))
    try:
        from tiny_model import byte_tokenizer
    finally:
        sys.path.remove(str(TESTS.parent / "examples"))
    converted = tmp_path / "peft_asr" / "smollm2-135m-instruct"  # stands in for the GGUF conversion folder
    tiny_llama(seed=0).save_pretrained(converted)
    byte_tokenizer().save_pretrained(converted)
    monkeypatch.setattr(default_model, "default_model_path", lambda: converted)
    monkeypatch.setattr(default_model, "_embedded_installed", lambda: True)
    model_id = default_model.DEFAULT_MODEL_ID

    base, _ = default_model.load_model_and_tokenizer(None)
    assert base.name_or_path == base.config._name_or_path == model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta, text, config = _readme(two_task_model(base), tmp_path / "bank")
    assert config["base_model_name_or_path"] == meta["base_model"] == model_id
    assert f"base_model:adapter:{model_id}" in meta["tags"] and str(converted) not in text

    # the id: from the Hub cache when it holds the model (other weights here, to tell them apart), else embedded
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    embedded, _ = default_model.load_model_and_tokenizer(model_id)
    assert embedded.name_or_path == model_id and torch.equal(embedded.lm_head.weight, base.lm_head.weight)
    monkeypatch.setattr(default_model, "_embedded_installed", lambda: False)
    with pytest.raises(FileNotFoundError, match=r"cannot load model 'HuggingFaceTB/SmolLM2-135M-Instruct': not a "
                                                r"local folder, and transformers could not load it"):
        default_model.load_model_and_tokenizer(model_id)
    monkeypatch.setattr(default_model, "_embedded_installed", lambda: True)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub_copy = tmp_path / "hub-copy"
    tiny_llama(seed=1).save_pretrained(hub_copy)
    byte_tokenizer().save_pretrained(hub_copy)
    api = HfApi(endpoint=hub.url, token="hf_test")
    api.create_repo(model_id)
    api.create_commit(model_id, [CommitOperationAdd(p.name, str(p)) for p in hub_copy.iterdir()], commit_message="up")
    snapshot_download(model_id, endpoint=hub.url, token="hf_test")
    hub.__exit__()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached, _ = default_model.load_model_and_tokenizer(model_id)
    assert cached.name_or_path == model_id and not torch.equal(cached.lm_head.weight, base.lm_head.weight)
    assert torch.equal(cached.lm_head.weight, tiny_llama(seed=1).lm_head.weight)
    assert hub.unknown == []
