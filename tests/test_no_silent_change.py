"""Nothing is silently taken for something else (issue 26): a YAML key set twice, a boolean, a text or a
fraction where a whole number goes, NaN or infinity in a config; a checkpoint write killed midway leaves no
temporary file for good; a resume whose data changed since its checkpoint is refused, naming the file."""

import hashlib
import json

import pytest
import torch

from fedmoe.config import ConfigError, load_config
from fedmoe.configbase import load_yaml
from fedmoe.data.sources import builtin_path
from fedmoe.federation import resume_federated, run_federated
from fedmoe.federation.checkpoint import (RunDirError, check_data_fingerprint, data_fingerprint,
                                          remove_stale_temporaries, write_checkpoint)
from fedmoe.federation.sweep import load_sweep
from fedmoe.pretrain import load_pretrain_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(tmp_path, text, sets=None):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p, load_config(p, sets)


def _error(tmp_path, text, sets=None) -> str:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text, sets)
    return str(e.value)


# ------------------------------------------------------------------ 1. a key set twice
def test_a_key_set_twice_is_refused_naming_the_file_the_key_and_both_lines(tmp_path):
    msg = _error(tmp_path, "train:\n  lr: 0.002\n  lr: 1000\n")
    assert msg == f"{tmp_path / 'c.yaml'}: the key 'train.lr' is set twice (lines 2 and 3); keep one of them"
    msg = _error(tmp_path, "federation:\n  rounds: 2\ntrain:\n  lr: 1\nfederation:\n  rounds: 3\n")
    assert "the key 'federation' is set twice (lines 1 and 5)" in msg
    msg = _error(tmp_path, "data:\n  partition:\n    num_clients: 2\n    alpha: 1\n    num_clients: 3\n")
    assert "'data.partition.num_clients' is set twice (lines 3 and 5)" in msg
    with pytest.raises(ConfigError, match=r"--set train: the key 'lr' is set twice"):
        load_config(None, ["train={lr: 1, lr: 2}"])
    # a key YAML's merge key brings in is not a key set twice
    assert load_yaml("a: &a {x: 1, y: 1}\nb:\n  <<: *a\n  x: 2\n", "s") == {"a": {"x": 1, "y": 1}, "b": {"x": 2, "y": 1}}
    p = tmp_path / "m.yaml"
    # the other YAML files a user writes: a sweep, a pretraining recipe
    p.write_text("sweep:\n  lora.rank: [2, 4]\n  lora.rank: [8]\n")
    with pytest.raises(ConfigError, match=r"m.yaml: the key 'sweep.lora.rank' is set twice \(lines 2 and 3\)"):
        load_sweep(p)
    p.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"the key 'train.lr' is set twice"):
        load_pretrain_config(p)


# ------------------------------------------------------------------ 2. whole numbers are whole numbers
def test_a_boolean_text_or_fraction_is_not_a_whole_number(tmp_path):
    assert "federation.rounds: a number is expected, not true/false (got True)" in _error(
        tmp_path, "federation:\n  rounds: true\n")
    assert "federation.rounds: Input should be a valid integer, got a number with a fractional part" in _error(
        tmp_path, "federation:\n  rounds: 2.5\n")
    assert "federation.rounds: a whole number is expected, not the text '3'" in _error(
        tmp_path, 'federation:\n  rounds: "3"\n')
    assert "train.lr: a number is expected, not true/false" in _error(tmp_path, "train:\n  lr: true\n")
    assert "algorithm.client_top_k: item 0: a number is expected, not true/false" in _error(
        tmp_path, "algorithm:\n  client_top_k: [true, 2, 2, 2]\n")
    assert "federation.rounds: a number is expected" in _error(tmp_path, "", ["federation.rounds=true"])
    # nor a number a boolean (pydantic reads 1 as true and 0 as false): a switch is true or false
    assert "lora.router: true or false is expected, not the number 1" in _error(tmp_path, "", ["lora.router=1"])
    assert "model.skip_padding: true or false is expected, not the number 0" in _error(
        tmp_path, "model:\n  skip_padding: 0\n")
    _, cfg = _load(tmp_path, "", ["train.activation_checkpointing=2"])  # true, or every n-th layer: a number fits
    assert cfg.train.activation_checkpointing == 2
    # what stays: --set's text parsed as YAML, an int where a float goes, YAML 1.1's text 1e-4 for a float
    _, cfg = _load(tmp_path, "train:\n  lr: 1\n  min_lr: 1e-5\n  schedule: cosine\n", ["federation.rounds=3"])
    assert cfg.federation.rounds == 3 and cfg.train.lr == 1.0 and cfg.train.min_lr == 1e-5
    assert isinstance(cfg.federation.rounds, int) and not isinstance(cfg.federation.rounds, bool)


# ------------------------------------------------------------------ 3. no NaN, no infinity
@pytest.mark.parametrize("text, want", [
    ("data:\n  split: [.nan, 0.5, 0.5]\n", "data.split.0: Input should be a finite number"),
    ("data:\n  split: [0.5, .inf, 0.5]\n", "data.split.1: Input should be a finite number"),
    ("data:\n  split: [-0.5, 1.0, 0.5]\n", "data.split: split fractions must be >= 0 and sum to 1"),
    ("train:\n  epochs: .inf\n", "train.epochs: Input should be a finite number"),
    ("federation:\n  round_timeout_s: .inf\n", "federation.round_timeout_s: Input should be a finite number"),
])
def test_nan_and_infinity_are_refused_naming_the_key(tmp_path, text, want):
    assert want in _error(tmp_path, text)


def test_epochs_beside_max_steps_and_a_floor_without_cosine_are_refused_not_ignored(tmp_path):
    """max_steps decides a round's steps; epochs count only without it: epochs = 3 beside max_steps = 20 was
    accepted and trained 20 steps. Refused, naming both and the null that makes epochs count; the default
    epochs (1) beside max_steps stays accepted (every run directory's config.yaml holds both)."""
    assert ("train.epochs = 3, but train.max_steps = 20 decides how many steps a round trains"
            in _error(tmp_path, "train:\n  max_steps: 20\n", ["train.epochs=3"]))
    assert "set train.max_steps: null to train by epochs" in _error(tmp_path, "train:\n  epochs: 0.5\n")
    _, cfg = _load(tmp_path, "train:\n  epochs: 3\n  max_steps: null\n")
    assert (cfg.train.epochs, cfg.train.max_steps) == (3.0, None)
    _, cfg = _load(tmp_path, "train:\n  epochs: 1\n  max_steps: 7\n")
    assert (cfg.train.epochs, cfg.train.max_steps) == (1.0, 7)
    # likewise the floor of a cosine schedule under the constant one
    assert "train.min_lr = 1e-05 is the floor of schedule: cosine, but train.schedule is constant" in _error(
        tmp_path, "train:\n  min_lr: 1.0e-5\n")
    _, cfg = _load(tmp_path, "train:\n  min_lr: 1.0e-5\n  schedule: cosine\n")
    assert cfg.train.min_lr == 1e-5


def test_null_is_still_no_value(tmp_path):
    _, cfg = _load(tmp_path, "federation:\n  round_timeout_s: null\ntrain:\n  max_steps: null\n")
    assert cfg.federation.round_timeout_s is None and cfg.train.max_steps is None


# ------------------------------------------------------------------ 4. a killed checkpoint write's leftovers
LEFTOVERS = [".state.pt.k2x_9q0a.tmp", ".state.prev.pt.abcdefgh.tmp", ".state.prev.pt.tmp"]
KEPT = [".state.pt.tmp", "state.pt.k2x_9q0a.tmp", ".state.pt.k2x_9q0a.tmp.keep", ".state.pt.SHORT.tmp",
        ".other.pt.k2x_9q0a.tmp", ".state.pt.ABCDEFGH.tmp", "notes.txt", "state.pt.unreadable"]


def _plant(folder):
    for name in LEFTOVERS + KEPT:
        (folder / name).write_bytes(b"x")


def test_a_checkpoint_write_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    _plant(tmp_path)
    (tmp_path / ".state.pt.dir12345.tmp").mkdir()  # not a file fedmoe wrote
    write_checkpoint(tmp_path, b"one")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEPT + [".state.pt.dir12345.tmp", "state.pt"])
    assert remove_stale_temporaries(tmp_path) == []


# ------------------------------------------------------------------ 5. a resume checks the data
def test_the_shipped_data_is_fingerprinted_and_an_old_checkpoint_resumes_with_a_warning():
    cfg = load_config(None)
    [entry] = data_fingerprint(cfg)["sources"]
    size, digest = entry["files"]["."]
    path = builtin_path("dolly")
    assert entry["kind"] == "builtin" and size == path.stat().st_size
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    logs = []
    check_data_fingerprint(cfg, {}, "runs/x", log=logs.append)
    assert "predates data fingerprints" in logs[0]


TINY = ["model.name=builtin:tiny-olmoe", "data.max_length=32", "data.partition.num_clients=2", "train.max_steps=1",
        "train.batch_size=2", "eval.rouge=false", "eval.batch_size=4", "data.max_test_per_client=3", "lora.rank=4",
        "eval.zero_shot=false", "eval.loss_every_round=false", "data.partition.scheme=iid"]


def test_a_resume_refuses_changed_data_naming_the_file_and_resumes_when_it_is_back(tmp_path):
    data = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}", "category": "c"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    original = data.read_bytes()
    cfg = load_config(None, TINY + ["federation.rounds=2", f"output_dir={tmp_path}", "name=d", f"data.source={data}"])
    _, rd = run_federated(cfg, stop_after_round=1, log=lambda *a: None)
    stored = torch.load(rd.checkpoint_dir / "state.pt", weights_only=True)["data_fingerprint"]
    assert stored["sources"][0]["files"]["."] == [len(original), hashlib.sha256(original).hexdigest()]
    # one answer edited, same size: refused, naming the file and the ways on
    data.write_bytes(original.replace(b'"output": "7"', b'"output": "8"'))
    with pytest.raises(RunDirError) as e:
        resume_federated(rd.path, log=lambda *a: None)
    msg = str(e.value)
    assert f"{data} changed (same size, other content" in msg and "put the data back as it was" in msg
    assert f"fedmoe run {rd.config_path} --overwrite" in msg and "\n" not in msg
    data.write_bytes(original + b"\n")
    with pytest.raises(RunDirError, match=f"{data} changed \\(size {len(original)} -> {len(original) + 1} bytes\\)"):
        resume_federated(rd.path, log=lambda *a: None)
    data.unlink()
    with pytest.raises(RunDirError, match=f"{data} is missing"):
        resume_federated(rd.path, log=lambda *a: None)
    # the file as it was (and a killed checkpoint write's leftovers): the run goes on, the leftovers go
    data.write_bytes(original)
    _plant(rd.checkpoint_dir)
    logs = []
    summary, _ = resume_federated(rd.path, log=logs.append)
    assert summary is not None and summary["rounds"] == 2
    names = {p.name for p in rd.checkpoint_dir.iterdir()}
    assert not names & set(LEFTOVERS) and set(KEPT) <= names
    assert any("removed 3 temporary file(s) an interrupted checkpoint write left" in str(x) for x in logs)


def test_a_label_task_scored_as_free_text_is_refused(tmp_path):
    """data.field_map.label makes each answer its label's name; under eval.task: generate every client scored
    ROUGE-L 0.00 of free text against 'brainstorming'. Refused, naming the label field and eval.task: choice."""
    why = _error(tmp_path, "data:\n  field_map: {label: category}\n")
    assert "data.field_map.label = 'category' makes each example's answer its label" in why
    assert "set eval.task: choice" in why
    _, cfg = _load(tmp_path, "data:\n  field_map: {label: category}\neval:\n  task: choice\n")
    assert cfg.eval.task == "choice"
