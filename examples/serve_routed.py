"""A routed multi-LoRA service on a `peft-asr export` folder: the shallow router picks each request's adapter, one
PEFT model with every exported adapter loaded generates.

    python examples/serve_routed.py --demo                                    # build, serve, ask once, exit
    python examples/serve_routed.py served --model-path base-model --port 8000
    curl -s localhost:8000/generate -d '{"prompts": ["Rewrite the list: owl, fox"], "max_new_tokens": 8}'

``served`` is the OUT of ``peft-asr export BANK OUT``: ``OUT/<task>/`` plain LoRA adapters, ``OUT/router/`` the
router, ``OUT/routes.json`` the map from route to adapter. Each ``POST /generate`` batch is tokenized once and
routed with :class:`peft_asr.ShallowRouter`; its rows are grouped by routed task and each group is generated with
that task's adapter active (``set_adapter``), the rows routed to ``__base__`` (and to tasks left out of the export)
with the adapters disabled; the answers go back in request order. This is what a multi-LoRA engine does with one
``LoRARequest`` per routed task (docs/serving.md, "A routed service"); here plain PEFT stands in for the engine.

``--demo`` builds a 2-task bank on the tiny model of ``tiny_model.py`` (the task subspaces get random weights in place
of training: ``custom_loop.py`` shows training), exports it into a temporary folder, serves it on a free port, sends
one mixed request with ``urllib`` and prints the response.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_asr  # noqa: F401  (registers the ASR PEFT type)
from peft_asr import ASRConfig, ShallowRouter
from peft_asr.cl import prompt_batches
from peft_asr.deploy.export_bank import EXPORT_FORMAT, ROUTES_FILE, export_bank

BASE_ROUTE = "__base__"
DEMO_TASKS = ("reverse", "initials")
DEMO_PROMPTS = ["Rewrite the list: owl, fox, bee", "Give the initials: quiet river stone",
                "Rewrite the list: cat, yak", "zzzz qqqq xxxx jjjj"]


class RoutedService:
    """Route with the shallow router, generate with one multi-adapter ``PeftModel``.

    ``generate`` holds a lock: the active adapter is state of the one model, so two requests never interleave.
    """

    def __init__(self, router: ShallowRouter, model: PeftModel, tokenizer: Any, routes: dict[str, Optional[str]],
                 max_prompts: int = 64, max_new_tokens_limit: int = 256) -> None:
        self.router, self.model, self.tokenizer, self.routes = router, model, tokenizer, routes
        self.max_prompts, self.max_new_tokens_limit = max_prompts, max_new_tokens_limit
        self._lock = threading.Lock()

    @classmethod
    def from_export(cls, out: str, base_model: str, **limits: int) -> "RoutedService":
        """Load ``out`` (a ``peft-asr export`` folder) on the checkpoint ``base_model`` (its tokenizer too)."""
        out_dir = Path(out)
        try:
            manifest = json.loads((out_dir / ROUTES_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{out_dir} has no readable {ROUTES_FILE} ({err}); pass the OUT folder of "
                             "`peft-asr export BANK OUT`.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{out_dir / ROUTES_FILE} is not a {EXPORT_FORMAT!r} manifest; re-run `peft-asr export`.")
        folders = {task: folder for task, folder in manifest["routes"].items() if folder is not None}
        if not folders:
            raise ValueError(f"{out_dir} exports no task adapter; export at least one task.")
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # batches are left-padded
        router = ShallowRouter.from_pretrained(str(out_dir / manifest["router"]), base_model)
        base = AutoModelForCausalLM.from_pretrained(base_model)
        (first, path), *rest = folders.items()
        model = PeftModel.from_pretrained(base, str(out_dir / path), adapter_name=first)
        for task, path in rest:
            model.load_adapter(str(out_dir / path), adapter_name=task)
        routes = {route: folders.get(route) for route in [BASE_ROUTE, *router.tasks]}  # not exported: None
        return cls(router, model.eval(), tokenizer, routes, **limits)

    def check_request(self, body: Any) -> tuple[list[str], int]:
        """The prompts and ``max_new_tokens`` of a request body, or a ``ValueError`` that names the fix."""
        if not isinstance(body, dict):
            raise ValueError(f'the body must be a JSON object {{"prompts": [...], "max_new_tokens": n}}, got '
                             f"{type(body).__name__}.")
        unknown = sorted(set(body) - {"prompts", "max_new_tokens"})
        if unknown:
            raise ValueError(f"unknown fields {unknown}; the fields are `prompts` and `max_new_tokens`.")
        prompts, max_new = body.get("prompts"), body.get("max_new_tokens", 16)
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
        if len(prompts) > self.max_prompts:
            raise ValueError(f"at most {self.max_prompts} prompts per request, got {len(prompts)}; split the batch.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"`prompts[{i}]` must be a non-empty string, got {prompt!r}.")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= self.max_new_tokens_limit:
            raise ValueError(f"`max_new_tokens` must be an int in [1, {self.max_new_tokens_limit}], got {max_new!r}.")
        return prompts, max_new

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        batch = next(prompt_batches(self.tokenizer, prompts, batch_size=len(prompts)))
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
        """One ``{"task", "adapter", "text"}`` per prompt, in request order (``prompts`` checked already)."""
        with self._lock:
            batch = next(prompt_batches(self.tokenizer, prompts, batch_size=len(prompts)))
            with torch.no_grad():
                routed = self.router.route(**batch)
            groups: dict[str, list[int]] = {}
            for row, task in enumerate(routed):
                groups.setdefault(task, []).append(row)
            texts: list[Optional[str]] = [None] * len(prompts)
            for task, rows in groups.items():  # one group per routed task: the engine's one LoRARequest per task
                group = [prompts[r] for r in rows]
                if self.routes[task] is None:  # `__base__`, or a task left out of the export: the base model
                    with self.model.disable_adapter():
                        answers = self._generate(group, max_new_tokens)
                else:
                    self.model.set_adapter(task)
                    answers = self._generate(group, max_new_tokens)
                for row, answer in zip(rows, answers):
                    texts[row] = answer
        return [{"task": task, "adapter": self.routes[task], "text": text} for task, text in zip(routed, texts)]


class Handler(BaseHTTPRequestHandler):
    """``POST /generate``: ``{"prompts": [...], "max_new_tokens": n}`` -> ``{"results": [{"task", "text"}, ...]}``."""

    server: "RoutedServer"

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802  (the name BaseHTTPRequestHandler dispatches to)
        if self.path != "/generate":
            return self._reply(404, {"error": f"no route {self.path!r}; POST to /generate."})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "send the body with a Content-Length header."})
        if not 0 <= length <= self.server.max_body:
            return self._reply(413, {"error": f"the body must be at most {self.server.max_body} bytes."})
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            return self._reply(400, {"error": f"the body is not valid JSON: {err}."})
        service = self.server.service
        try:
            prompts, max_new = service.check_request(body)
        except ValueError as err:
            return self._reply(400, {"error": str(err)})
        try:
            results = service.generate(prompts, max_new)
        except Exception as err:  # the server keeps serving; the client learns what failed
            self.log_error("generation failed: %r", err)
            return self._reply(500, {"error": f"generation failed: {type(err).__name__}: {err}"})
        self._reply(200, {"results": results})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's signature)
        if not self.server.quiet:
            super().log_message(format, *args)


class RoutedServer(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], service: RoutedService, quiet: bool = False,
                 max_body: int = 1 << 20) -> None:
        super().__init__(address, Handler)
        self.service, self.quiet, self.max_body = service, quiet, max_body


def build_demo_bank(root: Path) -> tuple[PeftModel, Path]:
    """A 2-task bank on the tiny model, with the base checkpoint it was built on saved to ``root/base``."""
    from peft_asr.demo import demo_stream
    from tiny_model import load

    torch.manual_seed(0)
    base, tokenizer = load(None)
    base.save_pretrained(root / "base")  # the checkpoint the service loads; get_peft_model changes `base` in place
    tokenizer.save_pretrained(root / "base")
    bank = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                          target_modules=["q_proj", "v_proj"], router_layer=2))
    stream = demo_stream(n_train=32, n_eval=24, tasks=DEMO_TASKS)
    for task in stream:
        bank.add_task(task.name)
        bank.fit_router(prompt_batches(tokenizer, [row["prompt"] for row in task.train]), task=task.name,
                        progress=False)
    with torch.no_grad():  # random subspaces stand in for training: LoRA B starts at zero (the base model)
        for name, weight in bank.named_parameters():
            if ".asr_B." in name:
                weight.normal_(std=0.5)
    # prompts far from both tasks go to the base model: 5% of held-out task prompts would
    bank.calibrate_base_route(prompt_batches(tokenizer, [row["prompt"] for task in stream for row in task.eval]),
                              false_positive_rate=0.05, progress=False)
    return bank.eval(), root / "base"


def post(url: str, payload: Any) -> tuple[int, dict]:
    """POST ``payload`` as JSON with urllib: ``(status, decoded JSON reply)``."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", nargs="?", help="the OUT folder of `peft-asr export BANK OUT`")
    parser.add_argument("--model-path", default=None, help="the base checkpoint folder (default: routes.json's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="--demo: tokens generated per prompt")
    parser.add_argument("--demo", action="store_true", help="build a tiny export, serve it, send one request, exit")
    args = parser.parse_args()
    if args.demo == (args.export is not None):
        parser.error("pass an export folder, or --demo (not both).")

    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            bank, base_model = build_demo_bank(Path(tmp))
            export = export_bank(bank, Path(tmp) / "served")  # what `peft-asr export` writes
        else:
            export = Path(args.export)
            base_model = args.model_path or json.loads((export / ROUTES_FILE).read_text()).get("base_model")
            if base_model is None:
                parser.error(f"{export / ROUTES_FILE} records no base model; pass --model-path.")
        service = RoutedService.from_export(str(export), str(base_model))
        server = RoutedServer((args.host, 0 if args.demo else args.port), service, quiet=args.demo)
        url = f"http://{server.server_address[0]}:{server.server_address[1]}/generate"
        print(f"serving {export} (routes {service.routes}) at {url}", flush=True)
        if not args.demo:
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
            return
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            status, reply = post(url, {"prompts": DEMO_PROMPTS, "max_new_tokens": args.max_new_tokens})
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        print(f"POST /generate -> {status}")
        print(json.dumps(reply, indent=2))
        if status != 200:
            raise SystemExit(f"the demo request failed with HTTP {status}")


if __name__ == "__main__":
    main()
