"""The suite's own scheduling (tests/conftest.py): the tests it puts first exist, so a renamed one is not silently
left to run last, alone, at the end of `make test`."""

import ast
from pathlib import Path

import conftest

HERE = Path(__file__).parent


def test_every_test_named_to_run_first_is_a_test_of_a_process_module():
    defined = {node.name for name in conftest.PROCESS_MODULES
               for node in ast.walk(ast.parse((HERE / name).read_text())) if isinstance(node, ast.FunctionDef)}
    assert set(conftest.LONGEST_FIRST) <= defined, set(conftest.LONGEST_FIRST) - defined
    assert len(set(conftest.LONGEST_FIRST)) == len(conftest.LONGEST_FIRST)
