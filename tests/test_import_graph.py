"""megamoe's modules depend on each other one way: no import cycle, even through imports inside functions.

A cycle forces an import to be deferred into a function or a package's lazy `__getattr__` to
survive, and makes the order in which a newcomer may import modules matter. The graph is read
from the source (every `import megamoe...` / `from megamoe... import`, at any depth), so a
deferred import counts as an edge like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megamoe

ROOT = Path(megamoe.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, importer: str, path: Path) -> str | None:
    """The absolute module of `from X import ...`, relative imports (`from .errors import`) resolved."""
    if node.level == 0:
        return node.module
    package = importer if path.name == "__init__.py" else importer.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def import_graph() -> dict[str, set[str]]:
    """module -> the megamoe modules it imports (a `from package import name` names the submodule
    when `name` is one)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("megamoe")}
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node, name, path)
                if base and base.startswith("megamoe"):
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        edges.add(sub if sub in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "megamoe.model.feed_forward" in graph["megamoe.moe.layer"]
    assert "megamoe.moe.layer" in graph["megamoe.model.dit"]
    assert "megamoe.data.errors" in graph["megamoe.data.decode_pool"]


def test_relative_imports_are_resolved():  # ruff's TID252 refuses them, but a cycle through one must still show
    def resolve(code, importer, file):
        return absolute(ast.parse(code).body[0], importer, Path(file))

    assert resolve("from .errors import X", "megamoe.data.video", "video.py") == "megamoe.data.errors"
    assert resolve("from ..config import Config", "megamoe.data.video", "video.py") == "megamoe.config"
    assert resolve("from . import layer", "megamoe.moe", "__init__.py") == "megamoe.moe"


def test_find_cycle_finds_a_deferred_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_megamoe():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
