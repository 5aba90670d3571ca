"""fedmoe's import graph: every ``import`` of a fedmoe module by another (at module level or inside a
function; imports under ``if TYPE_CHECKING:`` are annotations only and left out), and its cycles.

    python tools/import_graph.py          # prints each cycle (a strongly connected set of modules); exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedmoe"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _targets(mods: dict[str, Path], current: str, node: ast.AST) -> list[str]:
    package = current if mods[current].name == "__init__.py" else current.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            up = package
            for _ in range(node.level - 1):
                up = up.rsplit(".", 1)[0]
            base = f"{up}.{node.module}" if node.module else up
        names = [f"{base}.{a.name}" for a in node.names]
        return [n if n in mods else base for n in names]
    return [a.name for a in node.names]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        annotations_only = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                annotations_only |= {id(x) for b in n.body for x in ast.walk(b)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in annotations_only:
                continue
            for t in _targets(mods, name, node):
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.startswith("fedmoe"):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print(f"{len(c)} modules: {' <-> '.join(c)}")
    print(f"{len(found)} cycle(s)")
    sys.exit(1 if found else 0)
