"""The suite's own scheduling (tests/conftest.py): the tests it puts first exist, so a renamed one is not silently
left to run last, alone, at the end of `make test`."""

import ast
from pathlib import Path

import conftest

HERE = Path(__file__).parent


def _marked_processes(node) -> bool:
    return any(isinstance(d, ast.Attribute) and d.attr == "processes" for d in node.decorator_list)


def test_every_test_named_to_run_first_is_a_test_that_starts_processes():
    """Of a process module, or marked `processes` in another."""
    defined = {node.name for path in HERE.glob("test_*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef)
               and (path.name in conftest.PROCESS_MODULES or _marked_processes(node))}
    assert set(conftest.LONGEST_FIRST) <= defined, set(conftest.LONGEST_FIRST) - defined
    assert len(set(conftest.LONGEST_FIRST)) == len(conftest.LONGEST_FIRST)
