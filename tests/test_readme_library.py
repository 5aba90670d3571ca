"""The README as a user meets it: its "As a library" example runs as pasted, its benchmark command runs as printed,
and it names no path outside the repository."""

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


ROOT = Path(__file__).resolve().parents[1]


def test_the_library_run_example_runs_as_written(tmp_path, monkeypatch):
    """The README's run from Python, as pasted in the repository's root — but quick (two local steps, 400 examples,
    a few test examples, no ROUGE) and into tmp_path: ``load_config`` gets those keys after the example's own. What
    it prints is the run's summary: the global and client losses of summary.json in the run directory it names."""
    import contextlib
    import io
    import json

    import fedmoe.config

    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text().split("## As a library", 1)[1], re.S)[1]
    load = fedmoe.config.load_config
    quick = ["train.max_steps=2", "eval.rouge=false", "data.max_examples=400", "data.max_test_per_client=4",
             f"output_dir={tmp_path}"]
    monkeypatch.setattr(fedmoe.config, "load_config", lambda path, sets=(): load(ROOT / path, [*sets, *quick]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (As a library, a run)", "exec"), {})  # noqa: S102 - our own README
    summary = json.loads((tmp_path / "one-round" / "summary.json").read_text())
    assert summary["rounds"] == 1 and len(summary["clients"]) == 4
    printed = out.getvalue().strip().splitlines()[-1]
    assert printed == f"{summary['global']['loss']} {[c['loss'] for c in summary['clients']]} {tmp_path / 'one-round'}"


def test_the_readmes_evidence_tables_command_runs_as_printed(tmp_path):
    """`python benchmarks/evidence_tables.py ...` as README prints it: argparse takes it (it needs a scenario), and
    without the sweeps' runs it says to run them first (exit 1), never a usage error (exit 2)."""
    import shlex
    import subprocess
    import sys

    cmds = re.findall(r"`(python benchmarks/evidence_tables\.py[^`]*)`", (ROOT / "README.md").read_text())
    assert cmds
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        r = subprocess.run([sys.executable, *argv, "--runs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1 and "run the sweep first" in r.stdout + r.stderr, (cmd, r.stderr[-500:])


def test_the_readme_names_no_path_outside_the_repository():
    """A checkout has only what is in it: README names no `../` path, and the model configs its will-it-fit table
    was planned on are in the repository."""
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"[`(]\.\./[^`)\s]*", readme)
    configs = ROOT / "benchmarks" / "model-configs"
    assert "(config: [`benchmarks/model-configs`](benchmarks/model-configs)" in readme
    assert {p.name for p in configs.glob("*.json")} >= {"allenai--OLMoE-1B-7B-0924.json", "Qwen--Qwen1.5-MoE-A2.7B.json",
                                                        "Qwen--Qwen3-30B-A3B.json", "mistralai--Mixtral-8x7B-v0.1.json"}
