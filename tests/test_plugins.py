"""A method of another package: declared under the entry-point group ``fedmoe.methods``, it is a method like
fedmoe's own — the config takes its name and its section, the run uses its halves, the report explains its
metrics — and one that cannot be used is named with its reason, never silently replaced."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from fedmoe.algorithms import registry

PLUGIN = textwrap.dedent('''
    from fedmoe.algorithms.base import Method
    from fedmoe.algorithms.fedit import FedITClient, FedITServer
    from fedmoe.configbase import StrictModel


    class ScaledConfig(StrictModel):
        scale: float = 1.0


    class ScaledServer(FedITServer):
        """FedIT's aggregate, its update times algorithm.scaled.scale."""

        def aggregate(self, global_state, server_state, replies, *, round_idx):
            new, server_state, metrics = super().aggregate(global_state, server_state, replies, round_idx=round_idx)
            s = self.cfg.algorithm.scaled.scale
            return ({n: global_state[n] + s * (new[n] - global_state[n]) for n in new}, server_state,
                    {**metrics, "scaled_scale": s})


    METHOD = Method("scaled", ScaledServer, FedITClient, config=ScaledConfig, summary="FedIT's update times a factor",
                    notes={"scaled_scale": "the factor the server applied"})
    NOT_A_METHOD = 3
    OTHER_NAME = Method("other", ScaledServer, FedITClient)


    class NeedsAValue(StrictModel):
        scale: float


    NO_DEFAULT = Method("nodefault", ScaledServer, FedITClient, config=NeedsAValue)
    AN_INSTANCE = Method("instance", ScaledServer, FedITClient, config=ScaledConfig())
    MODEL_CONFIG = Method("model_config", ScaledServer, FedITClient, config=ScaledConfig)
    UNDERSCORED = Method("_hidden", ScaledServer, FedITClient, config=ScaledConfig)
''')


def _package(root, entry_points: str):
    """An installed package as Python finds one: its module and a dist-info with ``entry_points``."""
    (root / "scaled_method").mkdir(parents=True)
    (root / "scaled_method" / "__init__.py").write_text(PLUGIN)
    info = root / "scaled_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scaled-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{entry_points}")
    return root


def test_an_installed_method_runs_with_its_own_section_and_halves(tmp_path):
    """A run in a process of its own (as a user's environment with the package installed): algorithm.name=scaled
    and algorithm.scaled.scale=0 are taken, and the server half is the plugin's — with scale 0 the global model
    after the round is the initial one, so its test loss is round 0's to the last bit (FedIT's would move: lr 0.05),
    and its metric is logged and explained in the report. A declaration beside it that cannot be used is named in a
    warning and stops nothing."""
    path = _package(tmp_path / "site", "scaled = scaled_method:METHOD\nbroken = no_such_module:METHOD\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ["PYTHONPATH"], str(path)])}
    sets = ["algorithm.name=scaled", "algorithm.scaled.scale=0", "data.max_examples=120", "data.max_length=32",
            "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2", "train.lr=0.05",
            "eval.rouge=false", "data.max_test_per_client=2", "lora.rank=4", "federation.rounds=1",
            f"output_dir={tmp_path / 'runs'}", "name=s"]
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # a declaration that cannot be used is named, and does not stop a run of another method
    assert ("fedmoe leaves out an installed method: entry point 'broken = no_such_module:METHOD' (package "
            "scaled-method) could not be loaded: ModuleNotFoundError") in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    global_loss = {row["round"]: row["loss"] for row in rows if row["kind"] == "test" and row["client"] is None}
    train = [row["loss"] for row in rows if row["kind"] == "train"]
    assert len(train) == 2 and global_loss[1] == global_loss[0]
    assert [row["scaled_scale"] for row in rows if row["kind"] == "server"] == [0.0]
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert summary["algorithm"] == "scaled"
    assert "* `scaled_scale`: the factor the server applied" in (tmp_path / "runs" / "s" / "report.md").read_text()


def _eps(text: str):
    return [EntryPoint(n.strip(), v.strip(), registry.ENTRY_POINT_GROUP)
            for n, v in (line.split("=", 1) for line in text.strip().splitlines())]


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    path = _package(tmp_path / "site", "")
    monkeypatch.syspath_prepend(str(path))
    yield path
    sys.modules.pop("scaled_method", None)


def test_each_unusable_declaration_is_left_out_with_its_reason(plugin_path):
    methods, broken = registry.installed_methods(entry_points=_eps("""
        scaled = scaled_method:METHOD
        fedit = scaled_method:METHOD
        budgets = scaled_method:METHOD
        not-a-name = scaled_method:METHOD
        missing = no_such_module:METHOD
        number = scaled_method:NOT_A_METHOD
        renamed = scaled_method:OTHER_NAME
        twice = scaled_method:METHOD
        twice = other_package:METHOD
        nodefault = scaled_method:NO_DEFAULT
        instance = scaled_method:AN_INSTANCE
        model_config = scaled_method:MODEL_CONFIG
        _hidden = scaled_method:UNDERSCORED
    """))
    assert list(methods) == ["scaled"] and methods["scaled"].server.__name__ == "ScaledServer"
    assert set(broken) == {"fedit", "budgets", "not-a-name", "missing", "number", "renamed", "twice", "nodefault",
                           "instance", "model_config", "_hidden"}
    # each would have stopped the algorithm section being built, and so every fedmoe command
    assert "its config section has no default (ValidationError" in broken["nodefault"]
    assert "not a subclass of fedmoe.configbase.StrictModel" in broken["instance"]
    assert "cannot name a config section" in broken["model_config"] and "cannot name" in broken["_hidden"]
    assert "one of fedmoe's own methods" in broken["fedit"]
    assert "a key of the algorithm section" in broken["budgets"]
    assert "cannot name a config section algorithm.<name>" in broken["not-a-name"]
    assert "could not be loaded: ModuleNotFoundError" in broken["missing"] and "no_such_module" in broken["missing"]
    assert "is a int, not a fedmoe.algorithms.Method" in broken["number"]
    assert "holds the method named 'other'" in broken["renamed"]
    assert "two installed packages" in broken["twice"] and "other_package:METHOD" in broken["twice"]


def test_a_method_that_is_not_installed_or_cannot_be_used_is_refused_with_the_reason(monkeypatch):
    from fedmoe.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.name=scaled"])
    assert "unknown algorithm 'scaled'" in str(e.value) and "'fedmoe.methods'" in str(e.value)
    monkeypatch.setitem(registry.BROKEN, "scaled", "entry point 'scaled = x:Y' could not be loaded: ImportError: no")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.name=scaled"])
    assert "'scaled' is installed but cannot be used: entry point 'scaled = x:Y' could not be loaded" in str(e.value)
    with pytest.raises(ValueError, match="installed but cannot be used"):
        registry.get_method("scaled")


def test_only_a_run_of_the_installed_method_carries_its_section_and_an_import_circle_is_explained(tmp_path):
    """In a process with the package installed: a FedIT run's config tree (its config.yaml) has no algorithm.scaled
    (it had, and with the package uninstalled the run no longer loaded to resume or export), the scaled run's has;
    a method module that imports fedmoe.config when imported (which imports the methods) is left out with a reason
    that says what to import instead."""
    path = _package(tmp_path / "site", "scaled = scaled_method:METHOD\ncircular = scaled_method.circular:METHOD\n")
    (path / "scaled_method" / "circular.py").write_text(
        "from fedmoe.config import RunConfig\nfrom scaled_method import METHOD\n")
    code = ("import json\nfrom fedmoe.config import config_to_dict, load_config\n"
            "print(json.dumps([sorted(config_to_dict(load_config(None, [f'algorithm.name={n}']))['algorithm'])"
            " for n in ('fedit', 'scaled')]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ["PYTHONPATH"], str(path)])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    fedit, scaled = json.loads(r.stdout.strip().splitlines()[-1])
    assert "scaled" not in fedit and "scaled" in scaled and "fedit" in fedit and "fedit" in scaled
    assert "could not be loaded: ImportError" in r.stderr and "not fedmoe.config or fedmoe.federation" in r.stderr
