"""The documentation runs: every ```python block of docs/**/*.md and README.md, every doctest in the package, the
commands of every ```bash block parse, and the site builds in strict mode and shows right offline (formulas as
MathML, figures as committed images, no script from the network).

Python blocks of one page run in order in one namespace, in a temporary working directory, with ``base`` bound to a
random 6-block Llama and ``tokenizer`` to a byte-level tokenizer (``examples/tiny_model.py``): the pages load real
models in blocks marked ``<!-- skip: reason -->`` (the line right before the fence), and nothing else is skipped. A
page whose blocks are fragments (signatures, placeholders) marks them the same way; the marks are counted and must
each give a reason.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None  # the reason, when marked


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = SKIP.search(before[-1]) if before else None
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                           marker.group(1) if marker else None))
    return found


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON_PAGES = sorted({b.page for b in ALL if b.lang == "python" and b.skip is None}, key=str)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _docs_namespace() -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from tiny_model import byte_tokenizer, random_llama
    finally:
        sys.path.remove(str(ROOT / "examples"))
    tokenizer = byte_tokenizer()
    return {"__name__": "__docs__", "base": random_llama(len(tokenizer), layers=6).eval(), "tokenizer": tokenizer}


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = _docs_namespace()
    ran = 0
    for block in blocks(page):
        if block.lang != "python" or block.skip is not None:
            continue
        try:
            exec(compile(block.code, f"{_rel(page)}:{block.line}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"{_rel(page)}, the python block at line {block.line} failed: {type(err).__name__}: {err}\n"
                        f"(mark a block that cannot run offline with `<!-- skip: reason -->` on the line before)\n"
                        f"{block.code}")
        ran += 1
    assert ran > 0


def test_skipped_blocks_are_few_and_explained():
    python = [b for b in ALL if b.lang == "python"]
    skipped = [b for b in python if b.skip is not None]
    for b in skipped:
        assert len(b.skip) >= 10, f"{_rel(b.page)}:{b.line}: give a reason in `<!-- skip: reason -->`"
    assert len(python) >= 20, f"only {len(python)} python blocks found: is the fence pattern still right?"
    # the count is printed so the skipped share stays visible in CI logs
    print(f"\n{len(python)} python blocks in the docs, {len(skipped)} skipped:")
    for b in skipped:
        print(f"  {_rel(b.page)}:{b.line}: {b.skip}")
    assert len(skipped) <= len(python) // 3, "more than a third of the docs' python blocks do not run"


def test_every_fence_has_a_language():
    bare = [f"{_rel(b.page)}:{b.line}" for b in ALL if not b.lang]
    assert not bare, f"code blocks without a language (write ```python, ```bash or ```text): {bare}"


# --- bash blocks: commands must parse ---------------------------------------------------------------------------

def _commands(code: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*&&\s*", line):
            out.append(shlex.split(part))
    return out


BASH = [(b, argv) for b in ALL if b.lang in ("bash", "sh") and b.skip is None for argv in _commands(b.code)]


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.parametrize("block,argv", BASH, ids=[f"{_rel(b.page)}:{b.line}:{a[0]}" for b, a in BASH])
def test_bash_commands_parse(block, argv):
    where = f"{_rel(block.page)}:{block.line}: {shlex.join(argv)}"
    if argv[0] == "peft-asr" or argv[:3] == ["python", "-m", "peft_asr"]:
        from peft_asr.cli import build_parser

        args = argv[1:] if argv[0] == "peft-asr" else argv[3:]
        try:
            build_parser().parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"{where}: the command does not parse (exit {exit_.code})")
    elif argv[0] == "pip":
        for arg in argv:
            for extra in re.findall(r"\[([\w,-]+)\]", arg):
                missing = set(extra.split(",")) - _extras()
                assert not missing, f"{where}: extras {missing} are not in pyproject.toml"
    scripts = [a for a in argv if a.endswith(".py") and "/" in a]
    for script in scripts:
        path = ROOT / script
        assert path.is_file() or script.startswith("path/"), f"{where}: {script} does not exist"


# --- docstrings -------------------------------------------------------------------------------------------------

def test_package_doctests():
    import peft_asr

    attempted = 0
    failures = []
    for info in pkgutil.walk_packages(peft_asr.__path__, "peft_asr."):
        if info.name == "peft_asr.__main__":  # importing it runs the command
            continue
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
        attempted += result.attempted
        if result.failed:
            failures.append(f"{info.name}: {result.failed} of {result.attempted} examples failed")
    assert not failures, "; ".join(failures) + " (run `python -m doctest -v` on the module to see them)"
    assert attempted > 0


# --- the site ---------------------------------------------------------------------------------------------------

@dataclass
class Site:
    proc: subprocess.CompletedProcess
    path: Path
    seconds: float


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    """One strict build of the site, shared by the tests below."""
    if shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    proc = subprocess.run(["mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    return Site(proc, out, time.perf_counter() - start)


def test_site_builds_in_strict_mode(site):
    assert site.proc.returncode == 0, site.proc.stderr[-4000:]
    print(f"\nmkdocs build --strict: {site.seconds:.1f} s")
    api = (site.path / "reference" / "model" / "index.html").read_text()
    assert "add_task" in api and "router_layer" in api  # the reference is rendered from the docstrings
    bench = (site.path / "benchmarks" / "index.html").read_text()
    first_heading = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()[0].lstrip("# ").strip()
    assert first_heading in bench  # benchmarks/RESULTS.md is included, not copied


# what a page must not contain to show right without network access: formulas are MathML, figures are images
CODE_OR_SCRIPT = re.compile(r"<(pre|code|script|style)\b[^>]*>.*?</\1>", re.S | re.I)
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")
RAW_MERMAID = re.compile(r"\b(?:flowchart|graph)\s+(?:TD|TB|BT|LR|RL)\b|class=[\"'][^\"']*\bmermaid\b")
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\s\"'>]*", re.I)


def test_site_renders_offline(site):
    if site.proc.returncode != 0:
        pytest.fail("the site does not build (see test_site_builds_in_strict_mode)")
    pages = sorted(site.path.rglob("*.html"))
    assert len(pages) >= 20, f"only {len(pages)} pages built"
    problems = []
    for page in pages:
        html = page.read_text()
        where = page.relative_to(site.path)
        text = CODE_OR_SCRIPT.sub("", html)  # code blocks may show TeX; script bodies are not shown
        for line in text.splitlines():
            if RAW_TEX.search(line):
                problems.append(f"{where}: raw TeX (the formula was not rendered): {line.strip()[:160]}")
        problems += [f"{where}: Mermaid source (commit the figure as an SVG in docs/img/): {m.group(0)}"
                     for m in RAW_MERMAID.finditer(html)]
        problems += [f"{where}: a script loaded from the network: {m.group(0)}" for m in REMOTE_SCRIPT.finditer(html)]
    if problems:
        pytest.fail("\n".join(problems[:30]) + (f"\n... {len(problems)} in all" if len(problems) > 30 else ""))
    metrics = (site.path / "metrics" / "index.html").read_text()
    assert metrics.count("<math ") >= 30, "the formulas of docs/metrics.md are not MathML"
    concepts = (site.path / "concepts" / "index.html").read_text()
    assert 'src="../img/routing_flow.svg"' in concepts
    svg = (ROOT / "docs" / "img" / "routing_flow.svg").read_text()
    assert not re.search(r"<(script|image|foreignObject)\b|href=|@import|url\(", svg), "the SVG must be self-contained"
