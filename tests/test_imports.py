"""The package does not import itself in a circle (tools/import_graph.py: every import of a fedmoe
module by another, also inside functions; annotation-only imports under TYPE_CHECKING left out). It
did: 32 modules (config -> registry -> every method -> moe -> export -> federation -> config ...)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_circle():
    tool = _tool()
    graph = tool.import_graph()
    assert len(graph) > 60 and "fedmoe.moe.model" in graph["fedmoe.algorithms.flex"] | graph["fedmoe.moe"]
    assert tool.cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """Two modules that import each other, one of them only inside a function, and a third that imports
    one of them under TYPE_CHECKING only: one cycle of two."""
    pkg = tmp_path / "fedmoe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"
                              "from fedmoe.a import thing\n")
    tool = _tool()
    graph = tool.import_graph(pkg)
    assert graph["fedmoe.c"] == {"fedmoe.a"} and graph["fedmoe.b"] == {"fedmoe.a"} and graph["fedmoe.a"] == {"fedmoe.b"}
    assert tool.cycles(graph) == [["fedmoe.a", "fedmoe.b"]]
