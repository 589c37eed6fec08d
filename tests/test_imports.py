"""No import cycles between ctxstretch's modules: every `import` statement of every module under src/ctxstretch,
function-level ones included, read with `ast`, makes one edge of the module graph; the graph must have no cycle.

Not counted: imports under `if TYPE_CHECKING:` (never run) and those inside a package `__init__`'s module-level
`__getattr__` (PEP 562 lazy attributes: nothing is imported while the package loads)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "ctxstretch"


def module_files() -> dict[str, Path]:
    """Module name → its file (a package is its __init__.py)."""
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _skipped(tree: ast.Module, is_package: bool) -> set[int]:
    """ids of the nodes whose imports do not count: TYPE_CHECKING blocks, a package's module-level __getattr__."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    if is_package:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported ctxstretch module, line) for every import statement in the module `name`."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    skip = _skipped(tree, is_package)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for a in node.names:  # `from .pkg import name`: the submodule pkg.name where it is one, else pkg
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                if target in modules:
                    out.append((target, node.lineno))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module → {imported module: line of its first import}; self-imports dropped."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, set(files)):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected component of more than one module (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

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
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in sorted(comps):
        inside = set(comp)
        start = comp[0]
        paths = {start: [start]}  # breadth first from `start` back to itself, inside the component
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    found = paths[v]
                    break
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        out.append(found)
    return out


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """'a → b (a.py:3) → a (b.py:9)': each arrow with the file and line of the import that makes it."""
    files = module_files()
    text = cycle[0]
    for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
        text += f" → {b} (src/{files[a].relative_to(SRC).as_posix()}:{graph[a][b]})"
    return text


def test_the_module_graph_has_no_cycle():
    graph = import_graph()
    found = [describe(c, graph) for c in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_graph_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    pkg = tmp_path / ROOT
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from .a import thing\n    return thing\n")
    (pkg / "a.py").write_text("import ctxstretch.b\n\ndef f():\n    from .sub import c\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n"
                              "from .sub.c import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("from ..sub import nothing_here\nx = 1\n\ndef g():\n    from ..a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert graph == {"ctxstretch": {}, "ctxstretch.a": {"ctxstretch.b": 1, "ctxstretch.sub.c": 4},
                     "ctxstretch.b": {"ctxstretch.sub.c": 4}, "ctxstretch.sub": {"ctxstretch.a": 1},
                     "ctxstretch.sub.c": {"ctxstretch.sub": 1, "ctxstretch.a": 5}}
    assert [describe(c, graph) for c in cycles(graph)] == [
        "ctxstretch.a → ctxstretch.sub.c (src/ctxstretch/a.py:4) → ctxstretch.a (src/ctxstretch/sub/c.py:5)"]
