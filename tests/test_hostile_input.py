"""No file fedmoe loads runs code: a pickle payload planted in a checkpoint (resume, export), a client's
private store (Flower, `fedmoe export --private`), an export folder's private state (`fedmoe mmlu FOLDER`,
`load_exported`) or a pretraining checkpoint is refused with one line naming the file, and its payload
never runs. A checkpoint in the current format loads; one an older fedmoe wrote is converted once on
request (`fedmoe migrate-checkpoint`), after which a resume gives the same RNG streams. No path escapes:
a run's name is one folder name, and a SuperNode builds its store's path from a validated run id."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedmoe.federation.checkpoint import load_checkpoint, migrate_checkpoints, restore_rng_states, rng_states
from fedmoe.federation.flower.client import PrivateStore
from fedmoe.rundir import UnsafeFileError, load_tensor_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Payload:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"round": 1, "global_state": {}, "rng": {}, "x": Payload(marker), **extra}, path)


def test_a_planted_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _plant(run / "checkpoints" / "state.pt", marker)
    with pytest.raises(Exception) as e:
        load_checkpoint(run, log=lambda *a: None)
    msg = str(e.value)
    assert "holds a Python object (posix.system" in msg and "was not loaded" in msg and "\n" not in msg
    assert not marker.exists()
    # the command line: a resume of that run exits with a one-line error, nothing runs
    (run / "config.yaml").write_text("name: run\n")
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--resume", str(run)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and not marker.exists()
    assert "posix.system" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


@pytest.mark.parametrize("where", ["flower-store", "export-private", "export-folder", "pretrain"])
def test_every_other_loaded_file_refuses_a_payload(tmp_path, where):
    marker = tmp_path / "pwned"
    if where == "flower-store":
        _plant(tmp_path / "store" / "private-r00001.pt", marker)
        call = lambda: PrivateStore(tmp_path / "store").load(before=5)  # noqa: E731
    elif where == "export-private":
        from fedmoe.export import _private_from

        _plant(tmp_path / "store" / "private-r00003.pt", marker)
        call = lambda: _private_from(tmp_path / "store")  # noqa: E731
    elif where == "export-folder":
        from fedmoe.export import EXPORT_FILE, load_exported

        folder = tmp_path / "export"
        _plant(folder / "private.pt", marker)
        (folder / EXPORT_FILE).write_text(json.dumps({"format": 1, "client": 0, "config": {"name": "x"}}))
        call = lambda: load_exported(folder)  # noqa: E731
    else:
        from fedmoe.pretrain import load_pretrain_config, run_pretrain

        cfg = load_pretrain_config(None, [f"work_dir={tmp_path / 'work'}", f"export_dir={tmp_path / 'out'}"])
        _plant(tmp_path / "work" / "checkpoint.pt", marker)
        call = lambda: run_pretrain(cfg)  # noqa: E731
    with pytest.raises(UnsafeFileError, match=r"posix\.system.*was not loaded") as e:
        call()
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_current_checkpoint_loads_safely_and_an_old_one_migrates(tmp_path):
    """The RNG states as written now load with weights_only and restore every stream; a checkpoint with
    numpy's state pickled (fedmoe before 2026-12-05) is refused, then rewritten once on request."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    states = rng_states()
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    path = tmp_path / "run" / "checkpoints" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"round": 2, "global_state": {"w": torch.ones(2)}, "rng": states}, path)
    ck = load_checkpoint(tmp_path / "run", log=lambda *a: None).state
    restore_rng_states(ck["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    # the old format: numpy's state as numpy objects
    old = dict(states, numpy=np.random.get_state())
    torch.save({"round": 2, "global_state": {"w": torch.ones(2)}, "rng": old}, path)
    with pytest.raises(Exception, match="migrate-checkpoint"):
        load_checkpoint(tmp_path / "run", log=lambda *a: None)
    assert migrate_checkpoints(tmp_path / "run", log=lambda *a: None) == [path]
    assert load_tensor_file(path)["round"] == 2
    assert migrate_checkpoints(tmp_path / "run", log=lambda *a: None) == []  # nothing left to do


@pytest.mark.parametrize("bad", ["../escape", "/tmp/abs", "a/b", ".", "..", "a\\b"])
def test_a_run_name_that_is_a_path_is_refused(bad):
    from fedmoe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="one folder name under output_dir"):
        load_config(None, [f"name={bad}"])
    assert load_config(None, ["name=seed=0,method=FedIT"]).name == "seed=0,method=FedIT"  # a sweep point's


@pytest.mark.parametrize("bad", ["../../x", "/etc", "a/b", "..", "", "x" * 65, 7])
def test_a_hostile_run_id_never_becomes_a_path(tmp_path, bad):
    from fedmoe.federation.flower.client import store_path

    with pytest.raises(ValueError, match="run_id .* is not a plain name"):
        store_path(tmp_path, bad, 0)
    assert store_path(tmp_path, "0123456789ab", 3) == tmp_path / "0123456789ab" / "client-3"
