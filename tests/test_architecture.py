"""The package layout (docs/architecture.md): an acyclic import graph, the layers ``tuner`` < ``bank`` < ``deploy``, ``cl`` <
``demo`` < ``cli``, PEFT internals touched by ``_registry`` alone, short modules, and a light ``import peft_asr``.

Every module of ``peft_asr/`` is found on disk and read with ``ast``: every import statement counts, function-local
ones too (an import that runs late still ties the modules together). Relative imports are resolved against the
importing module; ``from .pkg import name`` counts as importing the submodule ``pkg.name`` when there is one, else
``pkg`` itself. Each check is a function that returns what it found, and the tests at the end run each one on a
small synthetic case it must report, so that a check that cannot fail shows up as a failing test.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_asr"

MAX_LINES = 400

# what a layer must not import (a name forbids the module and everything under it)
LAYERS = {
    "peft_asr.bank": ("peft_asr.deploy", "peft_asr.cl", "peft_asr.demo", "peft_asr.cli", "peft_asr._registry"),
    "peft_asr.deploy": ("peft_asr.cl", "peft_asr.demo", "peft_asr.cli", "peft_asr._registry"),
    "peft_asr.cl": ("peft_asr.demo", "peft_asr.cli", "peft_asr._registry"),
    "peft_asr.demo": ("peft_asr.cli",),
}
# the PEFT method stands alone: nothing of the package outside it (not bank, cl, demo, cli, _registry, _moved, nor
# the top-level package, whose __init__ imports all of those)
SELF_CONTAINED = "peft_asr.tuner"

REGISTRY = "peft_asr._registry"
PEFT_INTERNALS = ("peft.utils.peft_types", "peft.mapping", "peft.peft_model")

HEAVY = ("datasets", "matplotlib", "evaluate", "transformers.trainer")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (dotted, absolute)
    line: int
    text: str  # the statement as written

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: `{self.text}` imports {self.target}"


# ---------------------------------------------------------------- reading the package
def discover(package: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``package`` (a package's ``__init__.py`` is the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _base(module: Optional[str], level: int, importer: str, is_package: bool) -> str:
    """The absolute module of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's relative imports start from its package
    if level > 1:
        if level - 1 > len(parts) - 1:
            raise ValueError(f"{importer}: relative import beyond the top-level package")
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def imports_of(name: str, source: str, modules: Iterable[str], is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (module ``name``), resolved; ``modules`` are the known module names, used to tell
    a submodule from a name defined in a package."""
    known = set(modules)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        text = " ".join(ast.get_source_segment(source, node).split())  # one line, even when parenthesised
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, text))
        elif isinstance(node, ast.ImportFrom):
            base = _base(node.module, node.level, name, is_package)
            plain_names = False
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append(Import(name, sub, node.lineno, text))
                elif not _within(base, "peft_asr") and alias.name != "*" and alias.name[:1].islower():
                    # outside the package the module list is unknown: `from peft.utils import peft_types` may name a
                    # submodule, so record both (only the PEFT-internals check reads external imports)
                    found.append(Import(name, sub, node.lineno, text))
                    plain_names = True
                else:
                    plain_names = True
            if plain_names:
                found.append(Import(name, base, node.lineno, text))
    return found


def package_imports(package: Path = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    modules = discover(package)
    found = []
    for name, path in modules.items():
        found += imports_of(name, path.read_text(), modules, is_package=path.name == "__init__.py")
    return modules, found


def graph(modules: Iterable[str], imports: Iterable[Import]) -> dict[str, dict[str, Import]]:
    """Module -> {imported module: the first import of it}, for imports between the given modules."""
    known = set(modules)
    edges: dict[str, dict[str, Import]] = {m: {} for m in known}
    for imp in sorted(imports, key=lambda i: i.line):
        if imp.target in known and imp.target != imp.source:
            edges[imp.source].setdefault(imp.target, imp)
    return edges


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# ---------------------------------------------------------------- the checks
def tangles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or not (strongly connected, with a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(groups)


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for every tangle: a shortest one through the tangle's first module."""
    cycles = []
    for group in tangles(edges):  # a shortest way back to the group's first module, through the group only
        members, start = set(group), group[0]
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(edges.get(node, ())):
                    if nxt == start:
                        cycle = paths[node] + [start]
                        break
                    if nxt in members and nxt not in paths:
                        paths[nxt] = paths[node] + [nxt]
                        nxt_frontier.append(nxt)
                if cycle:
                    break
            frontier = nxt_frontier
        cycles.append(cycle)
    return cycles


def describe_cycle(cycle: list[str], edges: Mapping[str, Mapping[str, Import]]) -> str:
    steps = [f"  {a} -> {b}  (line {edges[a][b].line}: `{edges[a][b].text}`)" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Imports that go up the layers, or out of the self-contained PEFT method."""
    found = []
    for imp in imports:
        if not _within(imp.target, "peft_asr"):
            continue
        if _within(imp.source, SELF_CONTAINED) and not _within(imp.target, SELF_CONTAINED):
            found.append(f"{imp}: {SELF_CONTAINED} imports nothing of peft_asr outside itself")
        for layer, forbidden in LAYERS.items():
            if _within(imp.source, layer):
                for other in forbidden:
                    if _within(imp.target, other):
                        found.append(f"{imp}: {layer} must not import {other}")
    return found


def _root_name(node: ast.AST) -> Optional[str]:
    """``a`` for ``a``, ``a.b.c``, ``a.b[0]``; None for anything else."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def peft_internals_violations(name: str, source: str, imports: Iterable[Import]) -> list[str]:
    """In a module other than ``_registry``: imports of PEFT's internal modules, and writes to anything imported
    from PEFT (``PeftModel.x = ...``, ``MAPPING[key] = ...``, ``setattr(PeftModel, ...)``, ``del PeftModel.x``)."""
    if name == REGISTRY:
        return []
    found = [f"{imp}: only {REGISTRY} may use PEFT internals" for imp in imports
             if imp.source == name and any(_within(imp.target, internal) for internal in PEFT_INTERNALS)]
    tree = ast.parse(source)
    from_peft = set()  # the local names bound to PEFT modules or objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            from_peft |= {(a.asname or a.name.split(".")[0]) for a in node.names if _within(a.name, "peft")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _within(node.module or "", "peft"):
            from_peft |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args and _root_name(node.args[0]) in from_peft):
            found.append(f"{name} line {node.lineno}: `{ast.get_source_segment(source, node)}` changes a PEFT object; "
                         f"only {REGISTRY} may")
        for target in targets:
            for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(leaf, (ast.Attribute, ast.Subscript)) and _root_name(leaf) in from_peft:
                    found.append(f"{name} line {node.lineno}: `{ast.get_source_segment(source, node)}` changes a PEFT "
                                 f"object; only {REGISTRY} may")
    return found


def long_modules(modules: Mapping[str, Path], root: Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """Modules longer than ``limit`` physical lines (a last line without its newline counts too)."""
    found = []
    for name, path in sorted(modules.items()):
        text = path.read_text()
        lines = text.count("\n") + (0 if not text or text.endswith("\n") else 1)
        if lines > limit:
            found.append(f"{path.relative_to(root).as_posix()}: {lines} lines (at most {limit})")
    return found


def heavy_modules_loaded(statement: str, heavy: Iterable[str] = HEAVY) -> list[str]:
    """The ``heavy`` modules in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in {list(heavy)!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def package():
    return package_imports()


def test_the_package_is_found_whole(package):
    modules, imports = package
    # the parts named in peft_asr/__init__.py are all there, and their imports were read
    assert {"peft_asr", "peft_asr._registry", "peft_asr.cli", "peft_asr.tuner", "peft_asr.tuner.model",
            "peft_asr.bank", "peft_asr.cl", "peft_asr.demo"} <= set(modules)
    assert any(i.source == "peft_asr.tuner" and i.target == "peft_asr.tuner.model" for i in imports)


def test_the_import_graph_has_no_cycle(package):
    modules, imports = package
    edges = graph(modules, imports)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{describe_cycle(cycle, edges)}\n  (modules that import one another: {', '.join(group)})"
        for cycle, group in zip(cycles, tangles(edges)))


def test_every_layer_imports_only_the_layers_below_it(package):
    _, imports = package
    found = layer_violations(imports)
    assert not found, "\n".join(found)


def test_only_the_registry_touches_peft_internals(package):
    modules, imports = package
    found = []
    for name, path in modules.items():
        found += peft_internals_violations(name, path.read_text(), imports)
    assert not found, "\n".join(found)


def test_no_module_is_longer_than_400_lines(package):
    modules, _ = package
    found = long_modules(modules)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("statement", ["import peft_asr", "import peft_asr.tuner"])
def test_importing_the_package_loads_no_heavy_optional_module(statement):
    loaded = heavy_modules_loaded(statement)
    assert loaded == [], f"`{statement}` loads {loaded}; import them where they are used"


# ---------------------------------------------------------------- each check can fail
def _write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "peft_asr"


def test_imports_are_resolved_as_python_resolves_them(tmp_path):
    package = _write(tmp_path, {
        "peft_asr/__init__.py": "from . import tuner\nfrom .tuner import ASRModel\n",
        "peft_asr/cli.py": "def main():\n    from .bank import io, BankError\n    import peft_asr.demo.run as run\n",
        "peft_asr/tuner/__init__.py": "from .model import ASRModel\n",
        "peft_asr/tuner/model.py": "import torch\nfrom . import router\nfrom .router import solve\n"
                                   "def late():\n    from ..bank.io import load\n",
        "peft_asr/tuner/router.py": "from .. import tuner\n",
        "peft_asr/bank/__init__.py": "",
        "peft_asr/bank/io.py": "",
        "peft_asr/demo/__init__.py": "",
        "peft_asr/demo/run.py": "",
    })
    modules, imports = package_imports(package)
    assert set(modules) == {"peft_asr", "peft_asr.cli", "peft_asr.tuner", "peft_asr.tuner.model",
                            "peft_asr.tuner.router", "peft_asr.bank", "peft_asr.bank.io", "peft_asr.demo",
                            "peft_asr.demo.run"}
    pairs = {(i.source, i.target, i.line) for i in imports}
    assert ("peft_asr", "peft_asr.tuner", 1) in pairs  # `from . import tuner`: the submodule
    assert ("peft_asr", "peft_asr.tuner", 2) in pairs  # `from .tuner import ASRModel`: a name of the package
    assert ("peft_asr.cli", "peft_asr.bank.io", 2) in pairs and ("peft_asr.cli", "peft_asr.bank", 2) in pairs
    assert ("peft_asr.cli", "peft_asr.demo.run", 3) in pairs
    assert ("peft_asr.tuner.model", "peft_asr.tuner.router", 2) in pairs
    assert ("peft_asr.tuner.model", "peft_asr.tuner.router", 3) in pairs
    assert ("peft_asr.tuner.model", "peft_asr.bank.io", 5) in pairs  # function-local, two levels up
    assert ("peft_asr.tuner.model", "peft_asr.tuner", 2) not in pairs  # `from . import router` names a submodule
    assert ("peft_asr.tuner.router", "peft_asr.tuner", 1) in pairs  # `from .. import tuner`
    assert ("peft_asr.tuner.model", "torch", 1) in pairs


def test_the_cycle_finder_reports_a_cycle():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": [], "d": ["a", "c"]}) == []
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["a"]}) == [["a", "a"]]
    assert tangles({"a": ["b"], "b": ["a", "c"], "c": ["b"], "d": ["a"]}) == [["a", "b", "c"]]
    two = find_cycles({"a": ["b"], "b": ["a"], "x": ["y"], "y": ["z"], "z": ["x", "y"]})
    assert sorted(map(tuple, two)) == [("a", "b", "a"), ("x", "y", "z", "x")]


def test_a_cycle_in_a_package_is_reported_with_its_lines(tmp_path):
    package = _write(tmp_path, {
        "peft_asr/__init__.py": "from .bank import save\n",
        "peft_asr/bank/__init__.py": "\ndef save():\n    from .. import __version__\n",
    })
    modules, imports = package_imports(package)
    edges = graph(modules, imports)
    cycles = find_cycles(edges)
    assert cycles == [["peft_asr", "peft_asr.bank", "peft_asr"]]
    text = describe_cycle(cycles[0], edges)
    assert "line 3: `from .. import __version__`" in text and "line 1: `from .bank import save`" in text


def test_the_layer_check_reports_an_import_upwards():
    bad = [Import("peft_asr.tuner.model", "peft_asr.bank.io", 12, "from ..bank.io import load_bank"),
           Import("peft_asr.tuner.hooks", "peft_asr", 3, "from .. import BASE_ROUTE"),
           Import("peft_asr.tuner", "peft_asr._moved", 4, "from .. import _moved"),
           Import("peft_asr.bank.io", "peft_asr.cl.tasks", 7, "from ..cl.tasks import Task"),
           Import("peft_asr.cl.runner", "peft_asr.demo.stream", 9, "from ..demo.stream import demo_stream"),
           Import("peft_asr.cl.runner", "peft_asr._registry", 10, "from .._registry import register"),
           Import("peft_asr.demo.run", "peft_asr.cli", 2, "from ..cli import main")]
    found = layer_violations(bad)
    assert len(found) == len(bad), found
    assert found[0] == ("peft_asr.tuner.model line 12: `from ..bank.io import load_bank` imports peft_asr.bank.io: "
                        "peft_asr.tuner imports nothing of peft_asr outside itself")
    fine = [Import("peft_asr.tuner.model", "peft_asr.tuner.router", 1, "from .router import AnalyticRouter"),
            Import("peft_asr.bank.io", "peft_asr.tuner.config", 1, "from ..tuner.config import ASRConfig"),
            Import("peft_asr.cl.runner", "peft_asr.bank", 1, "from ..bank import save_bank"),
            Import("peft_asr.demo.run", "peft_asr.cl.runner", 1, "from ..cl.runner import run_stream"),
            Import("peft_asr.cli", "peft_asr.demo.run", 1, "from .demo.run import run_demo"),
            Import("peft_asr.cli", "peft_asr._registry", 1, "from ._registry import register"),
            Import("peft_asr.tuner.callback", "transformers", 1, "from transformers import TrainerCallback")]
    assert layer_violations(fine) == []


def test_the_peft_internals_check_reports_imports_and_patches():
    source = "\n".join([
        "import peft",
        "from peft import PeftModel, get_peft_model",
        "from peft.utils import peft_types",
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as MAPPING",
        "import peft.peft_model",
        "PeftModel.save_pretrained = None",
        "setattr(PeftModel, 'route', None)",
        "MAPPING['ASR'] = object",
        "peft.PeftModel.tasks = property(len)",
        "class Mine: pass",
        "Mine.x = PeftModel",  # a class of our own: fine
        "model = get_peft_model",
    ])
    name = "peft_asr.tuner.model"
    found = peft_internals_violations(name, source, imports_of(name, source, []))
    lines = sorted(int(f.split(" line ")[1].split(":")[0]) for f in found)
    assert lines == [3, 4, 5, 6, 7, 8, 9], found
    assert peft_internals_violations(REGISTRY, source, imports_of(REGISTRY, source, [])) == []
    plain = "from peft import PeftModel, get_peft_model\nfrom peft.tuners.tuners_utils import BaseTuner\n"
    assert peft_internals_violations(name, plain, imports_of(name, plain, [])) == []


def test_the_length_check_counts_physical_lines(tmp_path):
    package = _write(tmp_path, {"peft_asr/__init__.py": "x = 1\n" * 400, "peft_asr/long.py": "\n" * 400 + "y = 2"})
    found = long_modules(discover(package), root=tmp_path)
    assert found == ["peft_asr/long.py: 401 lines (at most 400)"]


def test_the_heavy_import_check_sees_a_module_loaded():
    assert heavy_modules_loaded("import json", heavy=("json", "json.decoder", "csv")) == ["json", "json.decoder"]
