"""The README's "As a library" example runs as pasted (a user's first contact with the API)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_library_example_runs_as_written():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## As a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (As a library)", "exec"), scope)  # noqa: S102 - our own README
    counts, tokens, batch = scope["counts"], scope["tokens"], scope["batch"]
    assert tuple(counts.shape) == (4, 16)  # the built-in model's layers and experts
    real = int(batch["attention_mask"].sum())
    assert tokens.tolist() == [real] * 4 and counts.sum(dim=1).tolist() == [2 * real] * 4  # k = 2 after set_top_k
