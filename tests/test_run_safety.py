"""Never lose a result, never report a wrong one: a finished run is never deleted by a new one, an
empty test set reports "no test data" (never a perfect score), a resume checks its config, one run
at a time per directory, and a checkpoint that cannot be read falls back to the previous round's."""

import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fedmoe.config import ConfigError, load_config
from fedmoe.data.sources import DataError
from fedmoe.federation import resume_federated, run_federated
from fedmoe.federation.evaluation import pooled
from fedmoe.federation.checkpoint import EXECUTION_KEYS, RunDirError
from fedmoe.rundir import RunDirBusy
from fedmoe.federation.sweep import run_sweep, sweep_points

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2",
        "train.max_steps=1", "train.batch_size=2", "eval.rouge=false", "eval.batch_size=4", "data.max_test_per_client=3",
        "lora.rank=4", "federation.rounds=1"]


def _cfg(tmp_path, name, extra=()):
    return load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *extra])


def _quiet(*a):
    pass


# ------------------------------------------------------------------ 1. a finished run is never deleted
def test_a_new_run_never_deletes_a_finished_run(tmp_path):
    first, rd = run_federated(_cfg(tmp_path, "r"), log=_quiet)
    kept = rd.summary_path.read_bytes()
    # the same name again, failing on a typo in the data path: the finished run is untouched
    logs = []
    with pytest.raises(DataError, match="nope.json"):
        run_federated(_cfg(tmp_path, "r", ["data.source=nope.json"]), log=logs.append)
    assert rd.summary_path.read_bytes() == kept and (rd.path / "checkpoints" / "state.pt").is_file()
    assert any(f"{tmp_path / 'r'} holds a finished run" in line and str(tmp_path / "r-2") in line for line in logs)
    # and again, successfully: a fresh numbered directory (the failed attempt's, which held nothing to resume)
    logs.clear()
    second, rd2 = run_federated(_cfg(tmp_path, "r"), log=logs.append)
    assert rd2.path == tmp_path / "r-2" and rd2.summary_path.is_file()
    assert rd.summary_path.read_bytes() == kept
    assert any("this run writes to " + str(tmp_path / "r-2") in line for line in logs)
    assert yaml.safe_load((rd2.path / "config.yaml").read_text())["name"] == "r-2"  # it names its directory
    third, rd3 = run_federated(_cfg(tmp_path, "r"), log=_quiet)
    assert rd3.path == tmp_path / "r-3"
    # --overwrite replaces it
    logs.clear()
    _, rd4 = run_federated(_cfg(tmp_path, "r", ["seed=1"]), log=logs.append, overwrite=True)
    assert rd4.path == tmp_path / "r" and rd4.summary_path.read_bytes() != kept
    assert json.loads(rd4.summary_path.read_text())["seed"] == 1
    assert not any("writes to" in line for line in logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "r-2", "r-3"]


def test_an_unfinished_run_is_refused_and_overwrite_starts_it_over(tmp_path):
    cfg = _cfg(tmp_path, "u", ["federation.rounds=2"])
    partial, rd = run_federated(cfg, stop_after_round=1, log=_quiet)
    assert partial is None
    with pytest.raises(RunDirError, match=f"fedmoe run --resume {rd.path}.*--overwrite"):
        run_federated(cfg, log=_quiet)
    assert (rd.path / "checkpoints" / "state.pt").is_file()
    summary, rd2 = run_federated(cfg, log=_quiet, overwrite=True)
    assert rd2.path == rd.path and summary is not None
    assert len([r for r in rd.read_metrics() if r["kind"] == "train"]) == 2 * 2  # started over, not appended


def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunDirError, match="not a fedmoe run.*--overwrite does not delete"):
        run_federated(_cfg(tmp_path, "mine"), log=_quiet, overwrite=True)
    _, rd = run_federated(_cfg(tmp_path, "mine"), log=_quiet)
    assert rd.path == tmp_path / "mine-2" and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_only_a_directory_fedmoe_marked_is_ever_replaced(tmp_path):
    """A folder that holds a config.yaml (someone's project, notes) or a symlink to one is not a fedmoe run
    without fedmoe's marker: a new run goes beside it, --overwrite refuses it, nothing in it changes."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    for name in ("mine", "link"):
        with pytest.raises(RunDirError, match=r"no \.fedmoe-run marker.*delete them yourself"):
            run_federated(_cfg(tmp_path, name), log=_quiet, overwrite=True)
        _, rd = run_federated(_cfg(tmp_path, name), log=_quiet)
        assert rd.path == tmp_path / f"{name}-2"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "config.yaml").read_text() == "my: own\n"


def test_overwrite_by_a_run_that_fails_before_its_setup_keeps_the_old_run(tmp_path):
    """--overwrite of a finished run by a run whose data cannot be read: the old run is moved aside, not
    deleted, and put back when the new one fails; every file as it was."""
    _, rd = run_federated(_cfg(tmp_path, "r"), log=_quiet)
    before = {p.relative_to(rd.path): p.read_bytes() for p in rd.path.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    with pytest.raises(DataError):
        run_federated(_cfg(tmp_path, "r", [f"data.source={bad}"]), log=_quiet, overwrite=True)
    after = {p.relative_to(rd.path): p.read_bytes() for p in rd.path.rglob("*") if p.is_file()}
    assert after == before


def test_a_run_that_fails_before_writing_anything_leaves_no_directory(tmp_path, capsys):
    """A run whose data cannot be read leaves no run directory (it wrote only its config); run again, it says
    nothing of a run "restored" (there is none) and leaves none either. A directory that a run killed after its
    setup left (its config and metrics rows, no checkpoint) is put back when its replacement fails."""
    from fedmoe.rundir import RunDir

    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    for _ in range(2):
        with pytest.raises(DataError):
            run_federated(_cfg(tmp_path / "out", "r", [f"data.source={bad}"]), log=_quiet)
        assert "restored" not in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    started = tmp_path / "out" / "r"
    RunDir(started).write_config({"name": "r"})  # a run killed in its setup: only its config (nothing to restore)
    with pytest.raises(DataError):
        run_federated(_cfg(tmp_path / "out", "r", [f"data.source={bad}"]), log=_quiet)
    assert "restored" not in capsys.readouterr().err and not started.exists()
    RunDir(started).write_config({"name": "r"})  # such a leftover resumed: refused naming its config.yaml, kept
    with pytest.raises(RunDirError, match=r"has no checkpoint to resume from.*fedmoe run .*config.yaml --overwrite"):
        resume_federated(started, log=_quiet)
    assert (started / RunDir.CONFIG).is_file()
    RunDir(started).write_config({"name": "r"})
    (started / RunDir.METRICS).write_text('{"round": 0, "client": 0, "kind": "test", "loss": 1.5}\n')
    before = {p.name: p.read_bytes() for p in started.iterdir()}
    with pytest.raises(DataError):
        run_federated(_cfg(tmp_path / "out", "r", [f"data.source={bad}"]), log=_quiet)
    assert "the run it was to replace is restored" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in started.iterdir()} == before


def test_resuming_a_finished_run_changes_nothing_of_it(tmp_path):
    """--resume of a finished run: nothing to continue; its summary (its wall time), report and config stay as it
    wrote them, and the summary comes back; a --set there is refused (config.yaml would name what it never ran)."""
    from fedmoe.federation.entry import continue_run

    _, rd = run_federated(_cfg(tmp_path, "r"), log=_quiet)
    before = {p.relative_to(rd.path): p.read_bytes() for p in rd.path.rglob("*") if p.is_file()}
    logs = []
    summary, _ = continue_run(rd.path, log=logs.append)
    assert summary == json.loads(rd.summary_path.read_text()) and "holds a finished run: nothing to resume" in logs[0]
    with pytest.raises(RunDirError, match="finished run .*--set train.activation_checkpointing=true would make"):
        continue_run(rd.path, log=_quiet, overrides=["train.activation_checkpointing=true"])
    assert {p.relative_to(rd.path): p.read_bytes() for p in rd.path.rglob("*") if p.is_file()} == before


def test_a_replacement_killed_before_its_setup_is_undone_by_the_next_run(tmp_path):
    """A run replacing another was killed after moving the old run aside (its partial files and a stale lock
    left): the next run in that directory puts the old run back first, then treats it as the finished run
    it is (the new run goes beside it)."""
    from fedmoe.rundir import RunDir

    _, rd = run_federated(_cfg(tmp_path, "r"), log=_quiet)
    summary = rd.summary_path.read_bytes()
    assert rd.set_aside()
    from fedmoe.rundir import run_dir_problem

    # killed before it wrote its own config: --resume, compare, export say where the run is, not "no run here"
    assert "holds a run that another run with its name set aside (.fedmoe-replaced)" in run_dir_problem(rd.path, "resume")
    rd.write_config({"name": "half-started"})
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rd.lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    logs = []
    _, rd2 = run_federated(_cfg(tmp_path, "r"), log=logs.append)
    assert rd2.path == tmp_path / "r-2" and any("the replaced run is restored" in line for line in logs)
    assert rd.summary_path.read_bytes() == summary and not (rd.path / RunDir.ASIDE).exists()
    assert yaml.safe_load(rd.config_path.read_text())["name"] == "r"


def test_sweep_points_are_kept_resumed_or_run_in_place(tmp_path):
    tree = {"name": "sw", "output_dir": str(tmp_path), "model": {"name": "builtin:tiny-olmoe"},
            "data": {"max_examples": 120, "max_length": 32, "partition": {"num_clients": 2}, "max_test_per_client": 3},
            "train": {"max_steps": 1, "batch_size": 2}, "lora": {"rank": 2}, "eval": {"rouge": False},
            "federation": {"rounds": 1}, "sweep": {"lora.rank": [2, 4]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    run_sweep(path, log=_quiet)
    root = tmp_path / "sw"
    done = (root / "rank=2" / "summary.json").read_bytes()
    # a point that stopped before its first checkpoint (config.yaml only) is run again in its own directory
    (root / "rank=4" / "summary.json").unlink()
    for f in (root / "rank=4" / "checkpoints").iterdir():
        f.unlink()
    logs = []
    run_sweep(path, log=logs.append)
    assert "done before, kept" in logs[0] and "rank=4" in logs[1] and "kept" not in logs[1]
    assert (root / "rank=2" / "summary.json").read_bytes() == done and (root / "rank=4" / "summary.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["rank=2", "rank=4", "sweep_report.md"]  # no rank=2-2
    # a finished point whose config.yaml is gone was kept unchecked ("done before, kept") and tabulated as whatever
    # config the sweep now gives it: what it ran is not known, so the sweep is refused, naming it
    config = (root / "rank=4" / "config.yaml").read_bytes()
    (root / "rank=4" / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"rank=4 .*its config.yaml is missing or cannot be read .*move the point's folder"):
        run_sweep(path, log=_quiet)
    (root / "rank=4" / "config.yaml").write_bytes(config)
    # a point's folder holding files fedmoe did not mark as its own: the point ran into rank=4-2 (its table linked
    # rank=4, and each start of the sweep ran it again, into rank=4-3, ...): refused, naming the folder
    shutil.rmtree(root / "rank=4")
    (root / "rank=4").mkdir()
    (root / "rank=4" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"sweep point rank=4: .*rank=4 holds files fedmoe did not mark as its own run"):
        run_sweep(path, log=_quiet)
    assert sorted(p.name for p in root.iterdir()) == ["rank=2", "rank=4", "sweep_report.md"]
    assert [p.name for p in (root / "rank=4").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ 3. no test data is not a perfect score
@pytest.mark.parametrize("sets", [["data.partition.num_clients=15", "data.max_examples=20"], ["data.split=[1,0,0]"]])
def test_empty_test_sets_report_no_test_data(tmp_path, sets):
    summary, rd = run_federated(_cfg(tmp_path, "empty", ["eval.rouge=true", *sets]), log=_quiet)
    assert all(c["n_test"] == 0 for c in summary["clients"])
    assert summary["global"]["loss"] is None and summary["global"]["perplexity"] is None
    assert summary["global"]["rouge_l"] is None
    on_disk = json.loads(rd.summary_path.read_text())
    assert on_disk["global"]["loss"] is None and on_disk["zero_shot"]["loss"] is None
    tests = [r for r in rd.read_metrics() if r["kind"] == "test"]
    assert tests and all(r["loss"] is None and r["perplexity"] is None for r in tests)
    report = rd.report_path.read_text()
    global_row = next(line for line in report.splitlines() if line.startswith("| global model |"))
    assert global_row.count("no test data") == 2 and "0.0000" not in global_row
    # and none scored, said as 0 beside the score it has not (summary.json's n_scored)
    assert all(c["n_scored"] == 0 for c in summary["clients"]) and summary["global"]["n_scored"] is None
    assert global_row.split(" | ")[4:7] == ["no test data", "0", "no test data"]
    client_row = next(line for line in report.splitlines() if line.startswith("| 0 |"))
    assert client_row.split(" | ")[4:7] == ["no test data", "0", "no test data"]
    assert "No test data for any client" in report and "perplexity 1.000" not in report


def test_the_global_loss_is_recomputed_from_the_client_rows(tmp_path):
    """FedIT's global test loss is the clients' losses pooled by their test tokens, which each client's test row
    carries (so metrics.jsonl alone gives the global number, not the plain mean of the clients' losses)."""
    _, rd = run_federated(_cfg(tmp_path, "r", ["data.max_test_per_client=5", "eval.zero_shot=true"]), log=_quiet)
    rows = [r for r in rd.read_metrics() if r["kind"] == "test"]
    for rnd in (0, 1):
        clients = [r for r in rows if r["round"] == rnd and r["client"] is not None]
        (glob,) = [r for r in rows if r["round"] == rnd and r["client"] is None]
        assert len(clients) == 2 and len({r["tokens"] for r in clients}) == 2  # unequal weights: the test can fail
        assert glob["tokens"] == sum(r["tokens"] for r in clients)
        assert glob["loss"] == pytest.approx(sum(r["loss"] * r["tokens"] for r in clients) / glob["tokens"], rel=1e-12)


def test_pooled_metrics_leave_out_sets_without_test_data():
    a = {"loss": 2.0, "perplexity": 7.39, "tokens": 10}
    empty = {"loss": None, "perplexity": None, "tokens": 0}
    g = pooled([a, empty])
    assert g["loss"] == 2.0 and g["tokens"] == 10
    assert g["perplexity"] == pytest.approx(7.389056, rel=1e-6)
    g = pooled([empty, empty])
    assert g["loss"] is None and g["perplexity"] is None and g["tokens"] == 0


# ------------------------------------------------------------------ 4. resume checks the config
def _edit_config(rd, **changes):
    tree = yaml.safe_load(rd.config_path.read_text())
    for key, value in changes.items():
        *path, last = key.split("__")
        node = tree
        for part in path:
            node = node[part]
        node[last] = value
    rd.config_path.write_text(yaml.safe_dump(tree, sort_keys=False))


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    cfg = _cfg(tmp_path, "c", ["federation.rounds=2"])
    _, rd = run_federated(cfg, stop_after_round=1, log=_quiet)
    original = rd.config_path.read_text()
    _edit_config(rd, lora__rank=2, data__partition__num_clients=3)
    with pytest.raises(RunDirError) as e:
        resume_federated(rd.path, log=_quiet)
    msg = str(e.value)
    assert "data.partition.num_clients: 2 -> 3" in msg and "lora.rank: 4 -> 2" in msg and str(rd.config_path) in msg
    assert "model.device" in msg  # what may change
    assert not rd.summary_path.exists() and not (rd.path / "run.lock").exists()
    # execution-only keys may change
    rd.config_path.write_text(original)
    _edit_config(rd, model__device="cpu", federation__node_wait_s=5.0, report__tensorboard=False,
                 federation__max_inflight=2)
    summary, _ = resume_federated(rd.path, log=_quiet)
    assert summary is not None
    assert {"model.device", "federation.round_timeout_s", "federation.node_wait_s", "federation.max_inflight",
            "federation.simulation", "output_dir", "name"} <= set(EXECUTION_KEYS)


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path):
    _, rd = run_federated(_cfg(tmp_path, "old", ["federation.rounds=2"]), stop_after_round=1, log=_quiet)
    ck_path = rd.path / "checkpoints" / "state.pt"
    ck = torch.load(ck_path, weights_only=False)
    del ck["config_fingerprint"]  # as fedmoe wrote it before fingerprints
    torch.save(ck, ck_path)
    logs = []
    summary, _ = resume_federated(rd.path, log=logs.append)
    assert summary is not None
    assert any("predates config fingerprints" in line for line in logs)


def test_a_key_a_newer_fedmoe_added_inside_an_optional_section_counts_as_its_default():
    """federation.dp.reports came after runs with federation.dp were checkpointed: their fingerprints lack it.
    A central-DP run's config (reports: none) still matches its checkpoint; a local-DP run's (reports: withhold,
    where such a run sent its reports before) is refused, naming the key, not resumed under another rule."""
    from fedmoe.federation.checkpoint import RunDirError, check_fingerprint, config_fingerprint

    def older(cfg):
        keys = {k: v for k, v in config_fingerprint(cfg)["keys"].items() if k != "federation.dp.reports"}
        return {"config_fingerprint": {"sha256": "older", "keys": keys}}

    dp = ["federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1"]
    central = load_config(None, dp)
    check_fingerprint(central, older(central), "run")
    local = load_config(None, dp + ["federation.dp.where=client"])
    with pytest.raises(RunDirError, match=r'federation.dp.reports: null -> "withhold"'):
        check_fingerprint(local, older(local), "run")
    changed = load_config(None, dp + ["federation.dp.delta=1e-6"])
    with pytest.raises(RunDirError, match=r"federation.dp.delta: 1e-05 -> 1e-06"):
        check_fingerprint(changed, older(central), "run")


@pytest.mark.parametrize("section", [["federation.robust.rule=median"],
                                     ["federation.secagg.clipping_range=8", "federation.runtime=flower-sim"],
                                     ["federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1"],
                                     ["data.concept_shift.groups=2", "data.field_map.label=category",
                                      "eval.task=choice"]])
def test_a_section_added_or_removed_on_resume_is_refused_even_at_its_defaults(section):
    """A section whose every key is at its default (robust: median; secagg: clipping_range 8) differs from no
    section at all: dropping secagg on resume would send the updates unmasked. Both ways refused, by name."""
    from fedmoe.federation.checkpoint import RunDirError, check_fingerprint, config_fingerprint

    name = section[0].rsplit(".", 1)[0]
    plain, with_it = load_config(None, section[1:] if "dp" not in name else []), load_config(None, section)
    for before, after in ((with_it, plain), (plain, with_it)):
        with pytest.raises(RunDirError, match=re.escape(name)):
            check_fingerprint(after, {"config_fingerprint": config_fingerprint(before)}, "run")


# ------------------------------------------------------------------ 5. one run per directory
def _cli(sets):
    return [sys.executable, "-m", "fedmoe.cli", "run", "--quiet"] + [x for a in sets for x in ("--set", a)]


def test_a_second_run_into_a_busy_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    sets = TINY + ["federation.rounds=200", f"output_dir={tmp_path}", "name=busy"]
    proc = subprocess.Popen(_cli(sets), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck, lock = tmp_path / "busy" / "checkpoints" / "state.pt", tmp_path / "busy" / "run.lock"
    try:
        deadline = time.time() + 300
        while not ck.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ck.exists() and proc.poll() is None
        assert json.loads(lock.read_text())["pid"] == proc.pid
        for attempt in (lambda: run_federated(_cfg(tmp_path, "busy"), log=_quiet),
                        lambda: run_federated(_cfg(tmp_path, "busy"), log=_quiet, overwrite=True),
                        lambda: resume_federated(tmp_path / "busy", log=_quiet)):
            with pytest.raises(RunDirBusy, match=f"{tmp_path / 'busy'} is in use by another fedmoe run "
                                                 f"\\(pid {proc.pid} on "):
                attempt()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rows = [r for r in (tmp_path / "busy").joinpath("metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(set(rows))  # nobody else wrote into it
    assert lock.exists()  # a kill leaves its lock behind: stale, taken over with a warning
    logs = []
    summary, rd = run_federated(_cfg(tmp_path, "busy"), log=logs.append, overwrite=True)
    assert summary is not None and rd.path == tmp_path / "busy"
    assert any(f"pid {proc.pid}" in line and "no longer running" in line for line in logs)
    assert not lock.exists()  # released at the end


def test_two_runs_that_find_one_stale_lock_at_once_do_not_both_take_it(tmp_path):
    """A and B both find the lock of a killed run. A is held between finding it stale and removing it while B
    takes it over; A must then find B's live lock and be refused, not remove it and take the directory too."""
    import socket
    import threading

    from fedmoe.rundir import RunDir

    (tmp_path / "run").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}
    (tmp_path / "run" / RunDir.LOCK).write_text(json.dumps(stale))
    a_found, b_done, results = threading.Event(), threading.Event(), {}

    def take(who, log):
        try:
            RunDir(tmp_path / "run", create=False).lock(log)
            results[who] = "taken"
        except RunDirBusy as e:
            results[who] = str(e)

    def log_a(_):  # A has found the lock stale: B goes now
        a_found.set()
        b_done.wait(60)

    a = threading.Thread(target=take, args=("a", log_a))
    a.start()
    assert a_found.wait(60)
    take("b", lambda _: None)
    b_done.set()
    a.join(60)
    assert results["b"] == "taken"
    assert results["a"].startswith(f"{tmp_path / 'run'} is in use by another fedmoe run (pid {os.getpid()} on ")
    assert json.loads((tmp_path / "run" / RunDir.LOCK).read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------ 6. an unreadable checkpoint falls back
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_round(tmp_path):
    full, _ = run_federated(_cfg(tmp_path, "full", ["federation.rounds=3"]), log=_quiet)
    _, rd = run_federated(_cfg(tmp_path, "cut", ["federation.rounds=3"]), stop_after_round=2, log=_quiet)
    folder = rd.path / "checkpoints"
    assert torch.load(folder / "state.pt", weights_only=False)["round"] == 2
    assert torch.load(folder / "state.prev.pt", weights_only=False)["round"] == 1
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])  # truncated
    logs = []
    resumed, _ = resume_federated(rd.path, log=logs.append)
    [warning] = [line for line in logs if line.startswith("warning:")]
    assert f"{folder / 'state.pt'} is unreadable" in warning and "state.prev.pt (round 1)" in warning
    assert resumed["global"]["loss"] == full["global"]["loss"]
    assert [c["loss"] for c in resumed["clients"]] == [c["loss"] for c in full["clients"]]
    assert (folder / "state.pt.unreadable").is_file()  # kept aside, not rotated into state.prev.pt
    assert torch.load(folder / "state.prev.pt", weights_only=False)["round"] == 2
    assert len([r for r in rd.read_metrics() if r["kind"] == "train"]) == 3 * 2


def test_summary_json_is_written_last(tmp_path, monkeypatch):
    """summary.json marks a run finished (a resume, `fedmoe run` on Flower returning when it sees it): when it is
    written the report is already there, so nothing that sees a finished run finds it without its report."""
    from fedmoe.rundir import RunDir

    seen = []
    real = RunDir.write_summary
    monkeypatch.setattr(RunDir, "write_summary", lambda rd, s: (seen.append(rd.report_path.is_file()), real(rd, s)))
    run_federated(load_config(None, TINY + ["federation.rounds=1", f"output_dir={tmp_path}", "name=order"]),
                  log=lambda *a: None)
    assert seen == [True]


# ------------------------------------------------------------------ 7. sweeps: stopped, and where they write
def _sweep_file(tmp_path, name="sw", **extra):
    tree = {"output_dir": str(tmp_path), "model": {"name": "builtin:tiny-olmoe"},
            "data": {"max_examples": 120, "max_length": 32, "partition": {"num_clients": 2}, "max_test_per_client": 3},
            "train": {"max_steps": 1, "batch_size": 2}, "lora": {"rank": 2}, "eval": {"rouge": False},
            "federation": {"rounds": 1}, "sweep": {"lora.rank": [2, 4]}, **({"name": name} if name else {}), **extra}
    path = tmp_path / f"{name or 'unnamed'}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_sweep_never_writes_into_a_runs_directory(tmp_path):
    """A sweep without a name: its folder is output_dir/<method>, where a single run of that method lives: its
    points went inside the run's directory, and `fedmoe run --overwrite` of the run then deleted them all."""
    from fedmoe.config import ConfigError

    run_federated(_cfg(tmp_path, "fedit"), log=_quiet)
    path = _sweep_file(tmp_path, name=None)
    with pytest.raises(ConfigError, match=r"fedit holds a run \(its config.yaml\), not a sweep: .*--set name=NEW"):
        run_sweep(path, log=_quiet)
    assert sorted(p.name for p in (tmp_path / "fedit").iterdir() if "=" in p.name) == []
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        run_sweep(_sweep_file(tmp_path, name="j"), log=_quiet, jobs=0)
    assert not (tmp_path / "j").exists()


def test_a_sweep_refuses_what_it_would_ignore_or_fail_on_later(tmp_path):
    """A --set of a key the sweep sets was ignored (each point's own value won); a point whose settings cannot run
    (a context the model lacks) failed only after the points before it ran, for hours on a real model."""
    from fedmoe.config import ConfigError

    path = _sweep_file(tmp_path)
    with pytest.raises(ConfigError, match=r"--set lora.rank=16: the sweep sets lora.rank .* --set 'sweep.lora.rank=\[...\]'"):
        run_sweep(path, ["lora.rank=16"], log=_quiet)
    with pytest.raises(ConfigError, match=r"sweep point rank=2,max_length=100000: data.max_length = 100000 is above"):
        run_sweep(path, ["sweep.data.max_length=[32,100000]"], log=_quiet)
    assert not (tmp_path / "sw").exists()  # nothing ran


def test_a_sweep_between_its_points_stops_as_a_sweep(tmp_path, monkeypatch):
    """Ctrl-C between two points (or before a point's run had its directory) said 'nothing was written' of a sweep
    whose first point had finished: it names the sweep's folder and the command that continues it."""
    from fedmoe.cli import _interrupted
    from fedmoe.federation import sweep as sw

    real, calls = sw._run_point, []

    def second_is_interrupted(point, *a, **k):
        calls.append(point)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(point, *a, **k)

    monkeypatch.setattr(sw, "_run_point", second_is_interrupted)
    with pytest.raises(sw.SweepInterrupted) as info:
        run_sweep(_sweep_file(tmp_path), log=_quiet)
    assert info.value.sweep_root == tmp_path / "sw" and (tmp_path / "sw" / "rank=2" / "summary.json").is_file()
    text = _interrupted(None, "fedmoe run sw.yaml", "Ctrl-C", info.value.sweep_root)
    assert text.startswith(f"stopped (Ctrl-C) the sweep in {tmp_path / 'sw'}: its finished points are kept")
    assert text.endswith("continue it with `fedmoe run sw.yaml`")


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_sigterm_stops_a_parallel_sweep_and_no_queued_point_starts(tmp_path, how):
    """`fedmoe run SWEEP --jobs 2` under SIGTERM: the pool kept running every queued point to its end (97 s, four
    points, the two not started included) and then said 'nothing was written'. Now the queued points never start,
    the running ones stop as a run stops (checkpoint kept), exit 143 with the command that continues the sweep."""
    path = _sweep_file(tmp_path, name="par", federation={"rounds": 200},
                       sweep={"lora.rank": [2, 4], "seed": [0, 1]})
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "run", str(path), "--quiet", "--jobs", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: Ctrl-C reaches the group
    root = tmp_path / "par"
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not list(root.glob("*/checkpoints/state.pt")):
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        if how == "SIGTERM":  # to the sweep's process alone, as a scheduler sends it
            proc.send_signal(signal.SIGTERM)
        else:  # a terminal's Ctrl-C: SIGINT to the foreground process group, the point processes included
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if how == "SIGTERM" else 130), err
    assert f"stopped ({how}) the sweep in {root}" in err and f"fedmoe run {path}" in err
    started = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert 1 <= len(started) <= 2, started  # the two queued points never started (the second running one may not
    # have made its directory yet when the signal came)
    for point in started:
        assert not (root / point / "summary.json").exists() and not (root / point / "run.lock").exists()


def test_a_sweep_whose_data_changed_since_its_points_ran_is_refused(tmp_path):
    """Finished points were kept after data.source's file was replaced, and a new point trained on the new data sat
    beside them in one table. A point's checkpoint has its data's fingerprint: the sweep is refused, naming it."""
    from fedmoe.config import ConfigError

    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "category": f"c{i % 2}"})
                              for i in range(60)))
    path = _sweep_file(tmp_path, name="dat", data={"source": str(data), "max_length": 32,
                                                   "partition": {"num_clients": 2, "scheme": "iid"},
                                                   "max_test_per_client": 3})
    run_sweep(path, log=_quiet)
    data.write_text(data.read_text().replace("a1\"", "changed\""))
    with pytest.raises(ConfigError, match=r"rank=2 \(.*\): its data changed since \(.*mine.jsonl changed"):
        run_sweep(path, ["sweep.lora.rank=[2,4,8]"], log=_quiet)
    assert not (tmp_path / "dat" / "rank=8").exists()
    # the fingerprint is read from checkpoints/data-fingerprint.json, not from the checkpoint (a full read of the
    # model's state per point): with every point's state.pt unreadable the change is still found
    for point in ("rank=2", "rank=4"):
        ck = tmp_path / "dat" / point / "checkpoints"
        assert json.loads((ck / "data-fingerprint.json").read_text())["data_fingerprint"]["sources"][0]["files"]
        for f in ck.glob("state*.pt"):
            f.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"rank=2 \(.*\): its data changed since \(.*mine.jsonl changed"):
        run_sweep(path, log=_quiet)


def test_a_resume_on_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path):
    """`fedmoe run --resume RUN --set model.device=cuda` on a machine without one: a torch traceback, after
    config.yaml had been rewritten with the device (so the plain resume failed the same way). Refused first, naming
    --set model.device=cpu; config.yaml as it was."""
    from fedmoe.config import ConfigError
    from fedmoe.federation.entry import continue_run

    _, rd = run_federated(_cfg(tmp_path, "dev", ["federation.rounds=2"]), stop_after_round=1, log=_quiet)
    before = rd.config_path.read_bytes()
    with pytest.raises(ConfigError, match=r"model.device = cuda:99, but this machine has .*resume with --set "
                                          r"model.device=cpu"):
        continue_run(rd.path, log=_quiet, overrides=["model.device=cuda:99"])
    assert rd.config_path.read_bytes() == before
    summary, _ = continue_run(rd.path, log=_quiet, overrides=["model.device=cpu"])
    assert summary is not None and yaml.safe_load(rd.config_path.read_text())["model"]["device"] == "cpu"


def test_the_command_that_continues_a_flower_deployment_names_its_superlink(tmp_path):
    """A run on a Flower deployment resumes only with --federation NAME: the commands fedmoe suggests after a stop, a
    lost SuperLink or a full disk named no federation, and failed when pasted."""
    from fedmoe.cli import _interrupted
    from fedmoe.rundir import FLOWER_RUN, resume_command

    run = tmp_path / "my run"
    (run / "checkpoints").mkdir(parents=True)
    assert resume_command(run) == f"fedmoe run --resume '{run}'"
    (run / FLOWER_RUN).write_text(json.dumps({"flower_run_id": 7, "superlink": "lab two"}))
    assert resume_command(run) == f"fedmoe run --resume '{run}' --federation 'lab two'"
    torch.save({"round": 1}, run / "checkpoints" / "state.pt")
    assert _interrupted(run, None).endswith(f"continue with `fedmoe run --resume '{run}' --federation 'lab two'`")
    (run / FLOWER_RUN).write_text("{")  # unreadable: the plain command, not an error on top of the stop
    assert resume_command(run) == f"fedmoe run --resume '{run}'"


def test_a_stale_lock_is_taken_over_where_the_directory_cannot_be_read_or_flocked(tmp_path, monkeypatch):
    """The guard of a stale lock's takeover is a flock on the run directory; a directory this user may write but not
    read (or a file system without flock on directories) still has its stale lock taken over, by the compare alone."""
    import socket

    import fedmoe.rundir as rundir
    from fedmoe.rundir import RunDir

    (tmp_path / "run").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}
    real_open = os.open

    def no_read(path, flags, *a):
        if str(path) == str(tmp_path / "run") and flags == os.O_RDONLY:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(rundir.os, "open", no_read)
    (tmp_path / "run" / RunDir.LOCK).write_text(json.dumps(stale))
    RunDir(tmp_path / "run", create=False).lock(lambda _: None)
    assert json.loads((tmp_path / "run" / RunDir.LOCK).read_text())["pid"] == os.getpid()


def test_every_failed_point_of_a_parallel_sweep_is_named(tmp_path):
    """--jobs 2, both points fail for their own reasons: the error named the first alone, the second's cause was lost.
    Each is named, with its cause, and logged as it fails."""
    (tmp_path / "a.jsonl").write_text("")  # no example at all
    (tmp_path / "b.jsonl").write_text("not json\n")
    tree = {"name": "sw", "output_dir": str(tmp_path), "model": {"name": "builtin:tiny-olmoe"},
            "data": {"max_examples": 60, "max_length": 32, "partition": {"num_clients": 2}},
            "train": {"max_steps": 1, "batch_size": 2}, "lora": {"rank": 2}, "eval": {"rouge": False},
            "federation": {"rounds": 1}, "sweep": {"data.source": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    logs = []
    with pytest.raises(RuntimeError) as e:
        run_sweep(path, jobs=2, log=logs.append)
    text = str(e.value)
    points = [p for p, _ in sweep_points(tree["sweep"])]
    assert all(f"sweep point {p} failed (" in text for p in points) and "0 of 2 points finished" in text, text
    assert "a.jsonl" in text and "b.jsonl" in text and "line 1" in text, text
    assert sum(": failed (" in line for line in logs) == 2, logs
