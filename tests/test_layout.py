"""The package's shape, read from source with ``ast`` (nothing checked is imported).

* no import cycles among the modules of ``ippo/``, nor among those of ``benchmarks/`` -- imports inside
  functions count too (a deferred import hides a cycle, it does not remove it);
* no module inside ``ippo/`` imports the top-level package ``ippo`` itself (only its submodules);
* no private name (``_name``) of an ``ippo`` module is imported by another module;
* ``ippo/rl/``: functions of at most 80 lines (``ippo.rl.loop.train``: 150), blocks nested at most 4 deep.

An import is an edge from the importing module to the module it names: ``import a.b`` -> ``a.b``;
``from a.b import c`` -> ``a.b.c`` when that is a module, else ``a.b``; relative imports are resolved
against the importing module's package. The implicit import of parent packages is not an edge, so a
package's ``__init__`` may import its own submodules as long as they do not import the ``__init__`` back.
Imports under ``if TYPE_CHECKING:`` count as well (marked so in the messages; ``COUNT_TYPE_CHECKING``).

Every check's message lists every offender (file:line). The checker itself is tested on small synthetic
sources at the end of this file.
"""

from __future__ import annotations

import ast
import functools
import itertools
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = frozenset({"ippo._C"})  # compiled modules (setup.py / CMake): no .py file, modules all the same
FUNCTION_LINES = 80
FUNCTION_LINES_EXEMPT = {("ippo.rl.loop", "train"): 150}
MAX_NESTED_BLOCKS = 4
# Imports under `if TYPE_CHECKING:` never run, but they are a dependency all the same (pyright counts them,
# pylint does not): they count, marked "(TYPE_CHECKING)" in the messages. False: they make no edge.
COUNT_TYPE_CHECKING = True
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
          *((ast.TryStar,) if hasattr(ast, "TryStar") else ()))
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Module:
    name: str  # dotted: ippo.rl.loop; a package's __init__ is the package's name
    path: str  # relative to the repository root, for messages
    source: str
    is_package: bool
    _tree: ast.Module | None = field(default=None, repr=False)

    @property
    def tree(self) -> ast.Module:
        if self._tree is None:
            self._tree = ast.parse(self.source, filename=self.path)
        return self._tree

    @property
    def package(self) -> str:
        """The package that relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def module_from(rel_path: str, source: str) -> Module:
    parts = list(Path(rel_path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return Module(".".join(parts), rel_path, source, is_package)


def load_modules(root: Path, package: str) -> dict[str, Module]:
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if not all(p.isidentifier() for p in rel.with_suffix("").parts):
            continue  # not importable (a data or results folder)
        m = module_from(rel.as_posix(), path.read_text(encoding="utf-8"))
        mods[m.name] = m
    return mods


def modules_from(files: dict[str, str]) -> dict[str, Module]:
    mods = [module_from(p, s) for p, s in files.items()]
    return {m.name: m for m in mods}


@dataclass(frozen=True)
class ImportRef:
    importer: Module
    line: int
    base: str  # `import base` / `from base import name` (relative imports resolved)
    name: str | None  # None for `import base`
    type_only: bool  # under `if TYPE_CHECKING:`

    def target(self, known: set[str] | frozenset[str]) -> str:
        """The module this import names: base.name when that is a module, else base."""
        if self.name is not None and f"{self.base}.{self.name}" in known:
            return f"{self.base}.{self.name}"
        return self.base

    @property
    def where(self) -> str:
        return f"{self.importer.path}:{self.line}" + (" (TYPE_CHECKING)" if self.type_only else "")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node`` (function bodies included), with whether it sits under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(node):
        yield child, type_only
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_only
                yield from _walk(stmt, type_only)
        else:
            yield from _walk(child, type_only)


def imports_of(mod: Module) -> list[ImportRef]:
    out = []
    for node, type_only in _walk(mod.tree):
        if isinstance(node, ast.Import):
            out += [ImportRef(mod, node.lineno, a.name, None, type_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.package.split(".") if mod.package else []
                if node.level - 1 > len(parts):
                    continue  # beyond the top-level package: Python refuses it
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [ImportRef(mod, node.lineno, base, a.name, type_only) for a in node.names]
    return out


# ---------------------------------------------------------------------------------------------- checks


def import_graph(mods: dict[str, Module]) -> dict[str, dict[str, list[ImportRef]]]:
    """importer -> imported module -> the import statements (modules of ``mods`` only)."""
    known = set(mods)
    graph: dict[str, dict[str, list[ImportRef]]] = {m: {} for m in mods}
    for m in mods.values():
        for ref in imports_of(m):
            t = ref.target(known)
            if t in known and (COUNT_TYPE_CHECKING or not ref.type_only):
                graph[m.name].setdefault(t, []).append(ref)
    return graph


def _strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_path(graph: dict[str, dict], start: str, goal: str, allowed: set[str]) -> list[str]:
    prev: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if v == goal:
            break
        for w in sorted(graph[v]):
            if w in allowed and w not in prev:
                prev[w] = v
                queue.append(w)
    path, v = [], goal
    while v is not None:
        path.append(v)
        v = prev[v]
    return path[::-1]


def import_cycles(mods: dict[str, Module]) -> list[str]:
    """One entry per distinct cycle through each import that lies on a cycle: the path, then the
    file:line of each of its imports."""
    graph = import_graph(mods)
    seen, out = set(), []
    for comp in _strongly_connected(graph):
        members = set(comp)
        for u in comp:
            for v in sorted(graph[u]):
                if v not in members or (len(comp) == 1 and v != u):
                    continue
                cycle = [u] + (_shortest_path(graph, v, u, members) if v != u else [u])
                body = cycle[:-1]
                i = body.index(min(body))
                key = tuple(body[i:] + body[:i])
                if key in seen:
                    continue
                seen.add(key)
                steps = [f"    {a} imports {b} at " + ", ".join(dict.fromkeys(r.where for r in graph[a][b]))
                         for a, b in itertools.pairwise(cycle)]
                out.append(" -> ".join(cycle) + "\n" + "\n".join(steps))
    return out


def top_package_imports(mods: dict[str, Module], top: str = "ippo") -> list[str]:
    """Modules below ``top`` that import ``top`` itself (not one of its submodules)."""
    known = set(mods) | EXTENSIONS
    out = []
    for m in mods.values():
        if m.name == top:
            continue
        for ref in imports_of(m):
            if ref.base != top:
                continue
            if ref.name is None:
                out.append(f"{ref.where}: import {top}")
            elif f"{top}.{ref.name}" not in known:
                out.append(f"{ref.where}: from {top} import {ref.name} ({ref.name} is not a submodule)")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(mods: dict[str, Module], top: str = "ippo") -> list[str]:
    """``from <a module of top> import _name`` where ``_name`` is not itself a module."""
    known = set(mods) | EXTENSIONS
    out = []
    for m in mods.values():
        for ref in imports_of(m):
            if ref.name is None or not (ref.base == top or ref.base.startswith(top + ".")):
                continue
            if _private(ref.name) and f"{ref.base}.{ref.name}" not in known:
                out.append(f"{ref.where}: from {ref.base} import {ref.name}")
    return out


def functions(mod: Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function: module-level, methods, nested ones."""

    def visit(node: ast.AST, prefix: str) -> Iterator:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, FUNCTIONS):
                yield prefix + child.name, child
                yield from visit(child, f"{prefix}{child.name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(mod.tree, "")


def _is_elif(node: ast.AST, parent: ast.AST, lines: list[str]) -> bool:
    """``elif`` (not ``else: if``): the If that is its parent If's whole else branch, spelled ``elif``."""
    return (isinstance(node, ast.If) and isinstance(parent, ast.If) and len(parent.orelse) == 1
            and parent.orelse[0] is node and lines[node.lineno - 1][node.col_offset:].startswith("elif"))


def nesting(func: ast.AST, lines: list[str]) -> tuple[int, int]:
    """(deepest nesting of if/for/while/with/try blocks in ``func``, the line of that block), like pylint's
    too-many-nested-blocks: an elif is no new level; a nested function or class starts its own count."""
    best = (0, func.lineno)

    def visit(node: ast.AST, depth: int) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (*FUNCTIONS, ast.ClassDef, ast.Lambda)):
                continue
            d = depth
            if isinstance(child, BLOCKS) and not _is_elif(child, node, lines):
                d = depth + 1
                if d > best[0]:
                    best = (d, child.lineno)
            visit(child, d)

    visit(func, 0)
    return best


def long_functions(mods: dict[str, Module]) -> list[str]:
    out = []
    for m in mods.values():
        for qual, fn in functions(m):
            n = fn.end_lineno - fn.lineno + 1
            limit = FUNCTION_LINES_EXEMPT.get((m.name, qual), FUNCTION_LINES)
            if n > limit:
                out.append(f"{m.path}:{fn.lineno}: {qual} is {n} lines (at most {limit})")
    return out


def deep_functions(mods: dict[str, Module]) -> list[str]:
    out = []
    for m in mods.values():
        lines = m.source.splitlines()
        for qual, fn in functions(m):
            depth, line = nesting(fn, lines)
            if depth > MAX_NESTED_BLOCKS:
                out.append(f"{m.path}:{fn.lineno}: {qual} nests {depth} blocks deep (at most "
                           f"{MAX_NESTED_BLOCKS}; the deepest at line {line})")
    return out


def _report(what: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {what}:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------- the repository


@functools.cache
def repo(package: str) -> dict[str, Module]:
    return load_modules(ROOT, package)


@pytest.mark.parametrize("package", ["ippo", "benchmarks"])
def test_no_import_cycles(package):
    cycles = import_cycles(repo(package))
    assert not cycles, _report(f"import cycle(s) among the modules of {package}/", cycles)


def test_no_module_imports_the_top_level_package():
    bad = top_package_imports(repo("ippo"))
    assert not bad, _report("import(s) of the top-level package ippo (import its submodules instead)", bad)


def test_no_private_names_cross_modules():
    bad = private_imports(repo("ippo"))
    assert not bad, _report("private name(s) imported from another ippo module (make them public)", bad)


def _rl_modules() -> dict[str, Module]:
    return {n: m for n, m in repo("ippo").items() if n.startswith("ippo.rl.") or n == "ippo.rl"}


def test_rl_functions_are_short():
    mods = _rl_modules()
    assert any(qual == "train" for qual, _ in functions(mods["ippo.rl.loop"])), "ippo.rl.loop.train not found"
    bad = long_functions(mods)
    assert not bad, _report(f"function(s) in ippo/rl/ over {FUNCTION_LINES} lines (train: 150)", bad)


def test_rl_functions_are_flat():
    bad = deep_functions(_rl_modules())
    assert not bad, _report(f"function(s) in ippo/rl/ nested over {MAX_NESTED_BLOCKS} blocks deep", bad)


# ---------------------------------------------------------------------------------------------- the checker


def test_checker_finds_a_cycle_through_a_function_level_import():
    mods = modules_from({
        "p/__init__.py": "",
        "p/a.py": "from p import b\n",
        "p/b.py": "import os\n\ndef f():\n    if True:\n        from .a import x\n    return x\n",
    })
    (cycle,) = import_cycles(mods)
    assert cycle.splitlines()[0] == "p.a -> p.b -> p.a"
    assert "p/a.py:1" in cycle and "p/b.py:5" in cycle


def test_checker_resolves_relative_imports_and_submodules():
    mods = modules_from({
        "p/__init__.py": "from . import a\nfrom .sub import c\n",
        "p/a.py": "from .sub.c import thing\nfrom ..q import z\n",  # ..q: outside p (no edge)
        "p/sub/__init__.py": "",
        "p/sub/c.py": "from .. import a\n",  # a module of p, not p's __init__
    })
    graph = import_graph(mods)
    assert set(graph["p"]) == {"p.a", "p.sub.c"}
    assert set(graph["p.a"]) == {"p.sub.c"}
    assert set(graph["p.sub.c"]) == {"p.a"}
    (cycle,) = import_cycles(mods)  # p.a <-> p.sub.c, the __init__ is on no cycle
    assert cycle.splitlines()[0] == "p.a -> p.sub.c -> p.a"


def test_checker_init_importing_its_submodules_is_fine_unless_they_import_it_back():
    ok = modules_from({"p/__init__.py": "from .a import f\n", "p/a.py": "from p.b import g\n", "p/b.py": ""})
    assert import_cycles(ok) == []
    back = modules_from({"p/__init__.py": "from .a import f\n",
                         "p/a.py": "def f():\n    from p import VERSION\n"})
    (cycle,) = import_cycles(back)
    assert cycle.splitlines()[0] == "p -> p.a -> p"


def test_checker_lists_every_cycle():
    mods = modules_from({
        "p/__init__.py": "",
        "p/a.py": "import p.b\nimport p.c\n",
        "p/b.py": "import p.a\n",
        "p/c.py": "from p import a\n",
        "p/d.py": "from p import e\n",
        "p/e.py": "from . import d\n",
        "p/f.py": "from . import f\n",  # itself
    })
    heads = sorted(c.splitlines()[0] for c in import_cycles(mods))
    assert heads == ["p.a -> p.b -> p.a", "p.a -> p.c -> p.a", "p.d -> p.e -> p.d", "p.f -> p.f"]


def test_checker_marks_type_checking_imports(monkeypatch):
    mods = modules_from({
        "p/__init__.py": "",
        "p/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import B\nelse:\n    B = 1\n",
        "p/b.py": "import p.a\n",
    })
    (cycle,) = import_cycles(mods)
    assert "p/a.py:3 (TYPE_CHECKING)" in cycle and "p/b.py:1" in cycle and "p/b.py:1 (" not in cycle
    monkeypatch.setattr(sys.modules[__name__], "COUNT_TYPE_CHECKING", False)
    assert import_cycles(mods) == []


def test_checker_top_level_package_imports():
    mods = modules_from({
        "ippo/__init__.py": "from . import _moved\nfrom .x import y\n",
        "ippo/_moved.py": "",
        "ippo/errors.py": "",
        "ippo/rl/__init__.py": "",
        "ippo/rl/a.py": ("import ippo\nfrom ippo import errors, _C\nimport ippo.errors\n"
                         "def f():\n    from ippo import __version__\n    from .. import Thing\n"),
    })
    assert top_package_imports(mods) == [
        "ippo/rl/a.py:1: import ippo",
        "ippo/rl/a.py:5: from ippo import __version__ (__version__ is not a submodule)",
        "ippo/rl/a.py:6: from ippo import Thing (Thing is not a submodule)",
    ]


def test_checker_private_names():
    mods = modules_from({
        "ippo/__init__.py": "from . import _moved\nfrom ippo import _C\n",
        "ippo/_moved.py": "",
        "ippo/rl/__init__.py": "",
        "ippo/rl/config.py": "def _merge(a, b): ...\n",
        "ippo/rl/b.py": ("from ippo.rl.config import _merge, load\nfrom .config import __all__\n"
                         "from .config import load as _load\nfrom torch.nn import _private_torch_thing\n"
                         "def f():\n    from .config import (\n        load,\n        _merge,\n    )\n"),
    })
    assert private_imports(mods) == ["ippo/rl/b.py:1: from ippo.rl.config import _merge",
                                     "ippo/rl/b.py:6: from ippo.rl.config import _merge"]


def _one_function(src: str) -> tuple[Module, ast.FunctionDef]:
    m = module_from("m.py", src)
    return m, next(fn for _, fn in functions(m))


def test_checker_elif_chain_is_one_level():
    branches = "".join(f"    elif x == {i}:\n        pass\n" for i in range(10))
    m, fn = _one_function("def f(x):\n    if x:\n        pass\n" + branches + "    else:\n        pass\n")
    assert nesting(fn, m.source.splitlines()) == (1, 2)


def test_checker_else_if_is_a_level():
    src = "def f(x):\n    if x:\n        pass\n    else:\n        if x > 1:\n            pass\n"
    m, fn = _one_function(src)
    assert nesting(fn, m.source.splitlines()) == (2, 5)


def test_checker_counts_every_block_kind():
    src = """def f(xs):
    for x in xs:
        while x:
            with open(x) as fh:
                try:
                    if fh:
                        pass
                except OSError:
                    async_ = [y for y in xs if y]
    return async_
"""
    m, fn = _one_function(src)
    assert nesting(fn, m.source.splitlines()) == (5, 6)
    assert deep_functions({"m": m}) == ["m.py:1: f nests 5 blocks deep (at most 4; the deepest at line 6)"]
    # a block inside an except / else / finally branch is inside the try
    src = ("def g(x):\n    try:\n        pass\n    except E:\n        pass\n    else:\n        pass\n"
           "    finally:\n        if x:\n            for _ in x:\n                pass\n")
    m, fn = _one_function(src)
    assert nesting(fn, m.source.splitlines()) == (3, 10)


def test_checker_nested_function_restarts_the_count():
    src = """class C:
    def f(self, xs):
        for x in xs:
            for y in x:
                def inner(z):
                    if z:
                        for w in z:
                            pass
                    return z
                if y:
                    pass
"""
    m = module_from("m.py", src)
    got = {q: nesting(fn, src.splitlines()) for q, fn in functions(m)}
    assert got == {"C.f": (3, 10), "C.f.<locals>.inner": (2, 7)}


def test_checker_function_length():
    def body(n: int, indent: str = "    ") -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    src = f"def ok():\n{body(79)}\n\nclass K:\n    def long(self):\n{body(80, ' ' * 8)}"
    mods = {"m": module_from("m.py", src)}
    assert long_functions(mods) == ["m.py:84: K.long is 81 lines (at most 80)"]
    src = f"def train():\n{body(149)}\n\ndef other():\n{body(149)}"
    other = src.splitlines().index("def other():") + 1
    loop = module_from("ippo/rl/loop.py", src)  # train may have 150 lines, no other function
    assert long_functions({loop.name: loop}) == [f"ippo/rl/loop.py:{other}: other is 150 lines (at most 80)"]
    loop = module_from("ippo/rl/loop.py", f"def train():\n{body(150)}")
    assert long_functions({loop.name: loop}) == ["ippo/rl/loop.py:1: train is 151 lines (at most 150)"]
