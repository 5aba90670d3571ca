"""No file fedmoe loads runs code: a pickle payload planted in a checkpoint (resume, export), a client's
private store (Flower, `fedmoe export --private`), an export folder's private state (`fedmoe mmlu FOLDER`,
`load_exported`) or a pretraining checkpoint is refused with one line naming the file, and its payload
never runs. A checkpoint in the current format loads; one an older fedmoe wrote is converted once on
request (`fedmoe migrate-checkpoint`), after which a resume gives the same RNG streams. No path escapes:
a run's name is one folder name, and a SuperNode builds its store's path from a validated run id."""

import math
import json
import re
import os
import random
import subprocess
import sys
from pathlib import Path

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

        _plant(tmp_path / "state" / "run1" / "client-0" / "private-r00003.pt", marker)
        call = lambda: _private_from(tmp_path / "state", "run1", 0, 3)  # noqa: E731
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
    with pytest.raises(FileNotFoundError, match="not a fedmoe run directory"):  # a run's folder: its config.yaml
        migrate_checkpoints(tmp_path / "run", log=lambda *a: None)
    (tmp_path / "run" / "config.yaml").write_text("name: run\n")
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


# ------------------------------------------------------------------------------------------ hostile replies
def _sent():
    from fedmoe.messages import Message

    return Message(tensors={"a": torch.zeros(3, 4), "b": torch.zeros(5)}, header={"kind": "train", "round": 1})


def _reply(tensors=None, n=10, **scalars):
    from fedmoe.messages import Message

    t = {"a": torch.ones(3, 4), "b": torch.ones(5)} if tensors is None else tensors
    return Message(tensors=t, scalars={"n_train": n, **scalars})


_GLOBAL = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}


@pytest.mark.parametrize("case,want", [
    ({"n": 1e15}, "more than the 40 training examples"),
    ({"n": -3}, "not a positive integer"),
    ({"n": 2.5}, "not a positive integer"),
    ({"n": True}, "not a positive integer"),
    ({"n": float("nan")}, "not a positive integer"),
    ({"tensors": {"a": torch.ones(1), "b": torch.ones(5)}}, "a is (1,) float32, the method expects (3, 4) float32"),
    ({"tensors": {"a": torch.zeros(3, 4, dtype=torch.int64), "b": torch.ones(5)}}, "a is (3, 4) int64"),
    ({"tensors": {"a": torch.ones(3, 4, dtype=torch.float64) * 1e6, "b": torch.ones(5)}}, "float64"),
    ({"tensors": {"a": torch.ones(3, 4, dtype=torch.bool), "b": torch.ones(5)}}, "bool"),
    ({"tensors": {"a": torch.ones(3, 4)}}, "1 of the model's 2 tensors are missing (b"),
    ({"tensors": {"a": torch.ones(4, 4), "b": torch.ones(5)}}, "a is (4, 4)"),
    ({"tensors": {"a": torch.ones(3, 4), "b": torch.ones(5), "evil": torch.ones(2)}}, "a tensor 'evil' the method does not"),
    ({"scalars": {"rank": 4}}, "scalars the method does not expect: ['rank']"),
    ({"metrics": {"loss": 0.0}}, "metrics use the runtime's names ['loss']"),
    ({"metrics": {"accuracy_boost": 1.0}}, "metrics outside the method's namespace ['rescaler_by_layer']: ['accuracy_boost']"),
    ({"metrics": {"rescaler_by_layer": [1.0, float("nan")]}}, "['rescaler_by_layer'] that are not finite numbers"),
    ({"metrics": {"rescaler_by_layer": "x" * 10}}, "that are not finite numbers"),
])
def test_a_reply_that_does_not_fit_what_was_sent_is_invalid(case, want):
    from fedmoe.federation.runtime import invalid_reply

    reply = _reply(case.get("tensors"), case.get("n", 10), **case.get("scalars", {}))
    ns = ("rescaler_by_layer",)
    why = invalid_reply(_sent(), reply, _GLOBAL, 40, case.get("metrics", {}), client_metrics=ns)
    assert why is not None and want in why and why.startswith("an invalid reply"), why
    assert invalid_reply(_sent(), _reply(), _GLOBAL, 40, {"rescaler_by_layer": [1.0, 0.5]}, client_metrics=ns) is None
    # a reply that carries no global tensor: fine for a method that aggregates none (local_only) and under SecAgg+
    # (masked); for any other it left the aggregate without the model's tensors (KeyError, or a global state of
    # none checkpointed as intact)
    assert "2 of the model's 2 tensors are missing" in invalid_reply(_sent(), _reply({}), _GLOBAL, 40, {})
    assert invalid_reply(_sent(), _reply({}), _GLOBAL, 40, {}, secure=True) is None


def test_an_empty_reply_is_invalid_for_every_method_that_aggregates_updates():
    from fedmoe.federation.runtime import invalid_reply
    from fedmoe.messages import Message

    for name in ("fedit", "flex", "scaffold", "flame", "fcmoe", "local_only"):
        method, server, g = _server(name)
        sent = server.downlink(g, server.initial_server_state(g), 0, round_idx=1)
        why = invalid_reply(sent, Message({}, {"n_train": 3}), g, 5, {}, server)
        assert (why is None) == (name == "local_only"), (name, why)


def _server(method_name, *overrides):
    from fedmoe.algorithms import get_method, model_spec
    from fedmoe.config import load_config

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "lora.rank=2", f"algorithm.name={method_name}", *overrides])
    method = get_method(method_name)
    server = method.server(cfg, model_spec(cfg, method))
    return method, server, server.initial_global()


def test_the_extras_a_method_declares_are_required_and_checked():
    """SCAFFOLD's reply must carry dc/<name> of each global tensor's shape and dtype, FLAME's its counts; a
    HetLoRA reply may carry its rank; nothing else is accepted."""
    from fedmoe.federation.runtime import invalid_reply
    from fedmoe.messages import ACTIVATION_COUNTS, TOKENS_PER_LAYER, Message

    method, server, g = _server("scaffold")
    sent = server.downlink(g, server.initial_server_state(g), 0, round_idx=1)
    good = {**g, **{"dc/" + n: torch.zeros_like(t) for n, t in g.items()}}
    assert invalid_reply(sent, Message(good, {"n_train": 3}), g, 5, {}, server) is None
    first = next(iter(g))
    no_dc = {k: v for k, v in good.items() if k != "dc/" + first}
    assert f"no dc/{first}" in invalid_reply(sent, Message(no_dc, {"n_train": 3}), g, 5, {}, server)
    wide = {**good, "dc/" + first: torch.zeros(1)}
    assert f"dc/{first} is (1,) float32" in invalid_reply(sent, Message(wide, {"n_train": 3}), g, 5, {}, server)

    method, server, g = _server("flame")
    sent = server.downlink(g, server.initial_server_state(g), 0, round_idx=1)
    why = invalid_reply(sent, Message(dict(g), {"n_train": 3}), g, 5, {}, server, method.client_metrics)
    assert f"no {ACTIVATION_COUNTS} (and 1 more" in why
    counts = {ACTIVATION_COUNTS: torch.zeros(2, 4, dtype=torch.long), TOKENS_PER_LAYER: torch.zeros(2, dtype=torch.long)}
    assert invalid_reply(sent, Message({**g, **counts}, {"n_train": 3}), g, 5, {"rescaler_by_layer": [1.0, 1.0]},
                         server, method.client_metrics) is None

    method, server, g = _server("hetlora")
    sent = server.downlink(g, server.initial_server_state(g), 0, round_idx=1)
    assert invalid_reply(sent, Message(dict(g), {"n_train": 3, "rank": 2}), g, 5, {"pruned_rank": 2}, server,
                         method.client_metrics) is None


def _run_through(cfg, transport_class) -> dict:
    """The in-process run of ``cfg`` with its transport replaced by ``transport_class`` (a LocalTransport
    subclass that changes what the honest clients return): its summary."""
    from fedmoe.federation.directories import prepare_run_dir
    from fedmoe.federation.runtime import Federation

    rd = prepare_run_dir(cfg, log=lambda *a: None)
    fed = Federation(cfg, rd, log=lambda *a: None)
    honest = fed.transport
    fed.transport = transport_class.__new__(transport_class)
    fed.transport.__dict__.update(honest.__dict__)
    try:
        return fed.run()
    finally:
        rd.unlock()


def test_a_client_claiming_1e15_examples_is_left_out_and_the_round_goes_on(tmp_path):
    """In-process: client 1 replies with n_train = 1e15 (which would make the global model its own). Its
    updates are left out of both rounds (a failure row each), the global model is client 0's alone, the run
    finishes."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, ["report.figures=false", "model.name=builtin:tiny-olmoe", "data.max_examples=120",
                             "data.max_length=32",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
                             "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
                             "federation.rounds=2", "federation.min_replies=1", f"output_dir={tmp_path}", "name=lie"])

    class Liar(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            if 1 in replies:
                reply, report = replies[1]
                reply.scalars["n_train"] = 1e15
                replies[1] = (reply, report)
            return replies, failures

    summary = _run_through(cfg, Liar)
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    fails = [(f["round"], f["client"], f["stage"]) for f in summary["failures"]]
    assert fails == [(1, 1, "invalid"), (2, 1, "invalid")]
    assert "more than the" in summary["failures"][0]["error"]


def test_a_client_that_sends_what_local_dp_withholds_is_left_out(tmp_path):
    """Local DP with withheld reports: client 1 replies with its training report after all (its loss, counts)
    and its true n_train; the server does not log or use either: both rounds leave it out (invalid), the
    metrics rows hold no loss, the global model is client 0's update alone."""
    import dataclasses

    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport
    from fedmoe.federation.transport import TrainReport

    cfg = load_config(None, ["report.figures=false", "model.name=builtin:tiny-olmoe", "data.max_examples=120",
                             "data.max_length=32",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
                             "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
                             "federation.rounds=2", "federation.min_replies=1", f"output_dir={tmp_path}", "name=tells",
                             "federation.dp.clip_norm=0.1", "federation.dp.noise_multiplier=1",
                             "federation.dp.where=client"])

    class Teller(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            reply, report = replies[1]
            told = TrainReport(loss=2.0, steps=1, lr=report.lr, tokens=10,
                               activation_counts=torch.zeros(4, 8, dtype=torch.long), metrics={})
            replies[1] = (reply, dataclasses.replace(told, overhead=report.overhead))
            return replies, failures

    summary = _run_through(cfg, Teller)
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "invalid"), (2, 1, "invalid")]
    assert "its training report sent under federation.dp.reports: withhold" in summary["failures"][0]["error"]
    rows = [json.loads(x) for x in (tmp_path / "tells" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    assert len(rows) == 4 and all("loss" not in r and "tokens" not in r and r["withheld"] for r in rows)


@pytest.mark.parametrize("part,key,bad,want", [
    ("profile", "k", 99, "profile k = 99, not an integer in 1..2"),
    ("profile", "rank", "r", "profile rank = 'r', not an integer in 0..2"),
    ("data", "n_train", -5, "data n_train = -5"),
    ("data", "category_counts", {"x": "many"}, "data category_counts = {'x': 'many'}"),
    ("setup", "seconds", "soon", "setup metrics that are not finite numbers"),
    ("setup", "seconds", 10 ** 400, "setup metrics that are not finite numbers"),
    ("data", "n_test", None, "no data n_test")])
def test_a_setup_report_that_cannot_be_right_stops_the_run_before_round_1(tmp_path, part, key, bad, want):
    """What a client says at setup sets the summary's FLOPs (k, rank), its data sizes and the bound on the
    n_train its replies may claim: one value fedmoe's client would never send stops the run before round 1,
    naming the client and the value."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, ["report.figures=false", "model.name=builtin:tiny-olmoe", "data.max_examples=120",
                             "data.max_length=32",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
                             "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
                             "federation.rounds=1", f"output_dir={tmp_path}", "name=setup"])

    class Odd(LocalTransport):
        def setup(self, prog):
            out = super().setup(prog)
            out[1][part][key] = bad
            if bad is None:  # the key left out
                del out[1][part][key]
            return out

    with pytest.raises(RuntimeError, match=rf"client 1's setup is not one fedmoe's client sends \({re.escape(want)}"):
        _run_through(cfg, Odd)


def test_a_profile_out_of_bounds_in_an_evaluation_is_not_taken(tmp_path):
    """An evaluation may update what a client runs (HetLoRA's pruned rank); one with k = 99 is not taken: the
    summary keeps the k it said at setup, and its FLOPs."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, ["report.figures=false", "model.name=builtin:tiny-olmoe", "data.max_examples=120",
                             "data.max_length=32",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
                             "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
                             "federation.rounds=1", f"output_dir={tmp_path}", "name=profile"])

    class Odd(LocalTransport):
        def evaluate(self, round_idx, messages, with_answers, general_for, prog):
            out, failed = super().evaluate(round_idx, messages, with_answers, general_for, prog)
            if 1 in out:
                out[1]["profile"] = {"k": 99, "rank": 2}
            return out, failed

    summary = _run_through(cfg, Odd)
    assert [c["k"] for c in summary["clients"]] == [2, 2]
    assert summary["clients"][1]["flops_per_seq"] == summary["clients"][0]["flops_per_seq"]


def test_activation_counts_that_cannot_be_right_are_invalid():
    """FLAME and FC-MoE weigh every expert by a client's counts: (L, E) non-negative integers, at most k routed
    experts per token a layer processed."""
    from fedmoe.federation.runtime import invalid_counts

    good, tokens = torch.tensor([[3, 1, 0, 4], [2, 2, 2, 2]]), torch.tensor([4, 4])
    assert invalid_counts(good, (2, 4), 2, tokens) is None and invalid_counts(good, (2, 4), 2) is None
    assert "shape (4, 2)" in invalid_counts(good.T, (2, 4), 2, tokens)
    assert "not non-negative integers" in invalid_counts(good.float(), (2, 4), 2, tokens)
    assert "not non-negative integers" in invalid_counts(good - 5, (2, 4), 2, tokens)
    assert "MoE layer 1 routed more than k = 2" in invalid_counts(good * torch.tensor([[1], [2]]), (2, 4), 2, tokens)
    assert "tokens per layer of shape (3,)" in invalid_counts(good, (2, 4), 2, torch.tensor([4, 4, 4]))
    assert "activation counts of shape ()" in invalid_counts([[1]], (2, 4), 2)


# ------------------------------------------------------------------------------------------ hostile evaluations
@pytest.mark.parametrize("result,want", [
    ({"loss": -5.0, "tokens": 40}, "a test loss of -5.0 over 40 tokens"),
    ({"loss": 2.0, "tokens": 0}, "a test loss of 2.0 over 0 tokens"),
    ({"loss": None, "tokens": 12}, "no test loss over 12 test tokens"),
    ({"loss": 2.0, "tokens": -1}, "test tokens = -1"),
    ({"loss": 2.0, "tokens": 4.5}, "test tokens = 4.5"),
    ({"loss": 2.0, "tokens": 5, "scores": [50.0, 101.0], "categories": ["a", "b"]}, "not numbers in [0, 100]"),
    ({"loss": 2.0, "tokens": 5, "scores": [50.0] * 4, "categories": ["a"] * 4}, "4 scored test examples, more than the 3"),
    ({"loss": 2.0, "tokens": 5, "scores": [50.0], "categories": []}, "one category per scored example"),
    ({"loss": 2.0, "tokens": 5, "scores": [100.0, 0.0], "categories": ["a", "a"], "labels": ["x", "y"],
      "confusion": [[5, 0], [0, 0]]}, "confusion matrix"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 250.0}, "mmlu = 250.0"),
    ({"loss": 2.0, "tokens": 5, "general_loss": float("inf")}, "general_loss = inf"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 10**400}, "mmlu = 1000"),  # no float holds it: refused, not a crash
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_micro": -1.0}, "mmlu_micro = -1.0"),
    ({"loss": 2.0, "tokens": 5, "mmlu_micro": 40.0}, "without the mean over subjects"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_questions": 4, "mmlu_fewer_shots": 5, "mmlu_questions_cut": 0},
     "MMLU prompt counts (questions 4, fewer shots 5, questions cut 0)"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_questions": 4, "mmlu_fewer_shots": 1, "mmlu_questions_cut": 2},
     "MMLU prompt counts"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_questions": 4, "mmlu_fewer_shots": 1}, "questions cut None"),
    ({"loss": 2.0, "tokens": 5, "mmlu_questions": 4, "mmlu_fewer_shots": 0, "mmlu_questions_cut": 0}, "beside an accuracy"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_questions": 0, "mmlu_fewer_shots": 0, "mmlu_questions_cut": 0},
     "MMLU prompt counts"),
    ({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_questions": True, "mmlu_fewer_shots": 0, "mmlu_questions_cut": 0},
     "MMLU prompt counts"),
    ({"loss": 10**400, "tokens": 5}, "a non-finite test loss"),
    ({"loss": 2.0, "tokens": 5, "scores": [10**400], "categories": ["a"]}, "not numbers in [0, 100]"),
    ("nonsense", "not a mapping"),
])
def test_an_evaluation_that_cannot_be_right_is_invalid(result, want):
    from fedmoe.federation.evaluation import invalid_evaluation

    why = invalid_evaluation(result, 3)
    assert why is not None and want in why, why
    assert invalid_evaluation({"loss": 2.0, "tokens": 5, "scores": [100.0, 0.0], "categories": ["a", "a"],
                               "labels": ["x", "y"], "confusion": [[1, 0], [1, 0]]}, 3) is None
    assert invalid_evaluation({"loss": 2.0, "tokens": 5, "mmlu": 50.0, "mmlu_micro": 40.0, "mmlu_questions": 4,
                               "mmlu_fewer_shots": 4, "mmlu_questions_cut": 4}, 3) is None


def test_perplexity_and_the_answer_metric_are_derived_not_taken():
    """A client's perplexity and its ROUGE-L are recomputed from its loss and per-example scores; a non-finite
    loss is left out while another client's is finite, and kept when every client's is (the model diverged)."""
    from fedmoe.federation.evaluation import screened

    ok, bad = screened({0: {"loss": 1.0, "perplexity": 1e-9, "tokens": 4, "rouge_l": 99.0, "scores": [10.0, 30.0],
                            "categories": ["a", "b"]},
                        1: {"loss": float("nan"), "perplexity": 1.0, "tokens": 4}},
                       {0: {"n_generated": 2}, 1: {"n_generated": 2}}, 32)
    assert ok[0]["perplexity"] == pytest.approx(math.e) and ok[0]["rouge_l"] == 20.0
    assert list(bad) == [1] and "non-finite test loss" in bad[1]
    both, none = screened({0: {"loss": float("nan"), "tokens": 4}, 1: {"loss": float("inf"), "tokens": 4}}, {}, 32)
    assert sorted(both) == [0, 1] and none == {}
    # more test tokens than the test examples a client declared can hold (n_test × data.max_length): its word would
    # weigh its loss in the pooled one by as much as it likes; at the bound, and with the size kept on its node, taken
    declared = {0: {"n_test": 3}, 1: {"n_test": 3}, 2: None}
    ok, bad = screened({0: {"loss": 1.0, "tokens": 96}, 1: {"loss": 0.0, "tokens": 10**15}, 2: {"loss": 1.0, "tokens": 7}},
                       declared, 32)
    assert sorted(ok) == [0, 2] and list(bad) == [1]
    assert "1000000000000000 test tokens, more than the 96 its declared test examples hold" in bad[1]


def test_a_client_reporting_a_negative_test_loss_is_left_out_of_the_global_loss(tmp_path):
    """In-process FedIT, every client's model is the global one, so the global loss is pooled from the clients'
    own evaluations: client 1 says its loss is -5. It is left out (a failure row per evaluated round), and the
    global loss is client 0's alone, not pulled down."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, ["report.figures=false", "model.name=builtin:tiny-olmoe", "data.max_examples=120",
                             "data.max_length=32",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
                             "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
                             "federation.rounds=1", f"output_dir={tmp_path}", "name=evil-eval"])
    seen = {}

    class Liar(LocalTransport):
        def evaluate(self, round_idx, messages, with_answers, general_for, prog):
            results, failed = super().evaluate(round_idx, messages, with_answers, general_for, prog)
            seen.update({cid: dict(r) for cid, r in results.items()})
            results[1]["loss"] = -5.0
            return results, failed

    summary = _run_through(cfg, Liar)
    assert summary["global"]["loss"] == pytest.approx(seen[0]["loss"], rel=1e-12)
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "evaluate")]
    assert "a test loss of -5.0" in summary["failures"][0]["error"]


@pytest.mark.processes
def test_hostile_replies_through_flower_are_those_clients_failures(tmp_path):
    """On Flower's simulation, the train replies of clients 1, 2 and 3 arrive changed (tests/flower_tamper.py): one
    claims 1e15 examples, one names a dtype that would make the server call torch.load, one carries a 32 MiB tensor
    the method does not expect (refused from its header, not decoded). Each is left out of every round as a failure
    (invalid, unreadable), the run finishes on client 0's updates."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    sets = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=4",
            "train.max_steps=1", "train.batch_size=2", "lora.rank=2", "eval.rouge=false", "eval.zero_shot=false",
            "data.max_test_per_client=2", "eval.loss_every_round=false", "federation.rounds=1",
            "federation.min_replies=1", f"output_dir={tmp_path}", "name=tampered"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, str(Path(__file__).parent / "flower_tamper.py"), "run", "--runtime", "flower-sim", "--quiet",
           *[x for a in sets for x in ("--set", a)]]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "tampered" / "summary.json").read_text())
    fails = {(f["client"], f["stage"]): f["error"] for f in summary["failures"]}
    assert "more than the" in fails[(1, "invalid")]
    assert "an unreadable reply" in fails[(2, "train")] and "'load'" in fails[(2, "train")]
    assert "a tensor 'junk' the method does not expect (33554" in fails[(3, "train")]  # its npy bytes, unread
    assert [c["rounds_trained"] for c in summary["clients"]] == [1, 0, 0, 0]


def test_a_reply_tensor_beyond_what_the_method_expects_is_refused_before_it_is_decoded():
    """from_records with the names and shapes a reply may hold refuses an unexpected tensor, or one of another shape,
    from its array's header: the refusal allocates next to nothing (decoded and copied, 64 MiB more than the
    message already held)."""
    import tracemalloc

    import numpy as np
    from flwr.app import Array

    from fedmoe.federation.flower.records import from_records, to_records
    from fedmoe.messages import Message

    msg = Message({"w": torch.zeros(4, 3)}, {"n_train": 2})
    rd = to_records(msg, {"client": 0})
    assert torch.equal(from_records(rd, {"w": (4, 3)})[0].tensors["w"], msg.tensors["w"])
    assert torch.equal(from_records(rd, {"w": None})[0].tensors["w"], msg.tensors["w"])  # any shape
    with pytest.raises(ValueError, match=r"w is \(4, 3\), the method expects \(3, 4\) \(refused unread\)"):
        from_records(rd, {"w": (3, 4)})
    rd["tensors"]["junk"] = Array(np.ones(8 << 20, dtype=np.float32))
    assert set(from_records(rd)[0].tensors) == {"w", "junk"}  # unchecked: decoded
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"a tensor 'junk' the method does not expect \(\d+ bytes, refused unread\)"):
            from_records(rd, {"w": (4, 3)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_a_start_a_client_reports_is_recorded_only_as_durations_and_a_device_name():
    """What a query's reply says of its process's start (load times, device) goes into metrics.jsonl's start rows:
    a timing that is not a non-negative finite number drops the row, a client id out of range or not an integer
    too, and a device that is not a device's name (a path, a long text) is left out of it."""
    from fedmoe.config import load_config
    from fedmoe.federation.flower.server import FlowerTransport

    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=3"]))
    good = {"client": 1, "load_s": 2.5, "model_s": 2.0, "device": "cuda:0"}
    transport._note_start(good)
    for bad in ({"load_s": -1.0}, {"load_s": float("nan")}, {"load_s": "2"}, {"model_s": True}, {"client": 3},
                {"client": True}, {"client": "1"}, {"load_s": 1e400}):
        transport._note_start({**good, **bad})
    for device in ("../../etc", "cuda 0", "x" * 40, 7, None):
        transport._note_start({**good, "device": device})
    assert transport.started() == [good] + [{k: v for k, v in good.items() if k != "device"}] * 5
    assert transport.started() == []  # taken once


@pytest.mark.parametrize("result,want", [
    ({"loss": 2.0, "tokens": 5, "rouge_l": 1e6}, "a rouge_l without the per-example scores"),
    ({"loss": 2.0, "tokens": 5, "accuracy": "hello"}, "a accuracy without the per-example scores"),
    ({"loss": 2.0, "tokens": 5, "eval_s": "hello"}, "eval_s = 'hello'"),
    ({"loss": 2.0, "tokens": 5, "eval_s": -1.0}, "eval_s = '-1.0', not a duration"),
])
def test_what_a_client_could_claim_beside_its_loss_is_checked(result, want):
    """A ROUGE-L or accuracy without the scores it is recomputed from was taken as sent (1e6 in the report; a text
    one crashed the report after the last round, no summary written); a non-numeric eval_s crashed the server."""
    from fedmoe.federation.evaluation import invalid_evaluation

    why = invalid_evaluation(result, 3)
    assert why is not None and want in why, why


def _flower_reply(nid: int, info, msg=None):
    """A Flower reply as the server pulls it: its sender node, no error, the records a client sends."""
    from types import SimpleNamespace

    from fedmoe.federation.flower.records import to_records
    from fedmoe.messages import Message

    content = to_records(msg or Message(), info)
    if msg is None:
        del content["tensors"]
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=nid), has_error=lambda: False, content=content)


def test_a_train_reply_without_tensors_or_with_a_huge_count_is_that_clients_failure():
    """A train reply with no tensors record reached the loop as None (AttributeError: the run died); a report's
    token count of 10**400, legal JSON, overflowed the first float it met (OverflowError: the run died)."""
    from fedmoe.config import load_config
    from fedmoe.federation.flower.server import FlowerTransport
    from fedmoe.messages import Message

    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=2"]))
    transport.node_of = {0: 10, 1: 11}
    report = {"loss": 1.0, "steps": 1, "lr": 0.1, "tokens": 10**400, "activation_counts": [[1]], "metrics": {}}
    timing = {"load_s": 0.0, "work_s": 1.0}
    transport._send = lambda *a, **k: ({0: (None, {"report": {**report, "tokens": 5}, **timing}),
                                        1: (Message({}, {"n_train": 1}), {"report": report, **timing})}, {})
    replies, failed = transport.train(1, {0: Message(), 1: Message()}, None)
    assert replies == {} and "without its tensors record" in failed[0]
    assert "tokens = '1000" in failed[1] and "below 2**53" in failed[1]


def test_a_node_that_comes_back_mid_run_is_held_to_what_its_client_declared(monkeypatch):
    """Which client a SuperNode is, asked mid-run of a node that connected since: an id that is not one of the run's
    clients, or unreadable, is not taken (a list crashed the server, a text id would later); a node claiming a
    client whose node is still connected and answering is not taken (it received that client's messages and
    answered for it: two votes in a robust aggregation), one whose node failed a message since is (a killed node
    stays listed for up to a minute); a client that comes back keeps the data it declared at setup (the new node
    re-declared 10**6 test examples, and the global loss it sent passed the check); two new nodes claiming one
    client are neither taken."""
    from fedmoe.config import load_config
    from fedmoe.federation.flower import server
    from fedmoe.federation.flower.server import FlowerTransport

    monkeypatch.setattr(server, "_message", lambda *a: None)  # the query's outgoing message: never sent here
    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=3"]))
    logged = []
    transport.log = logged.append
    transport.node_of = {0: 10, 1: 11, 2: 12}
    transport.infos = {c: {"client": c, "data": {"n_test": 4, "n_generated": 2}} for c in range(3)}
    answers = {20: {"client": [1]}, 21: {"client": "1"}, 22: {"nope": 1}, 23: {"client": 0},
               24: {"client": 2, "data": {"n_test": 10**6, "n_generated": 2}}, 25: {"client": 5}}
    transport._send_and_receive = lambda msgs, timeout=None: [_flower_reply(n, a) for n, a in answers.items()]

    class Grid:  # the nodes connected now: client 2's node 12 is gone, client 0's node 10 is still there
        @staticmethod
        def get_node_ids():
            return [10, 11, *answers]

    transport.grid = Grid()
    transport.run_id = "r"
    gone = transport._refresh()
    assert transport.node_of == {0: 10, 1: 11, 2: 24} and gone == set()
    assert transport.infos[2]["data"] == {"n_test": 4, "n_generated": 2}  # as declared at setup
    text = "\n".join(logged)
    assert text.count("answered which client it is unreadably") == 4  # [1], "1", no client, 5
    assert "SuperNode 23 says it is client 0, whose SuperNode 10 is still connected and answering: it is not taken" in text
    transport.unanswered.add(0)  # client 0's node failed a message since: killed, and Flower still lists it
    answers.clear()
    answers[40] = {"client": 0}
    Grid.get_node_ids = staticmethod(lambda: [10, 11, 24, 40])
    assert transport._refresh() == set() and transport.node_of[0] == 40 and 0 not in transport.unanswered
    answers.clear()
    answers.update({30: {"client": 1}, 31: {"client": 1}})
    Grid.get_node_ids = staticmethod(lambda: [40, 24, 30, 31])  # client 1's node 11 is gone; two claim it
    assert transport._refresh() == {1} and transport.node_of[1] == 11
    assert "SuperNodes [30, 31] all say they are client 1: none of them is taken" in "\n".join(logged)


def test_the_server_reads_each_half_of_an_evaluation_reply_on_its_own():
    """A client's one evaluate reply holds its own results and the global model's (FlowerTransport._both_results):
    a global half that failed on the node leaves its own results and is that client's failure of the global stage
    (with the memory hint where it ran out of memory); a reply without a global half names the version mismatch; a
    result that is only the text of the withheld marker is not taken for a kept evaluation (its global half counts);
    a lying global half is left out and named; the global numbers are pooled from the others alone."""
    from fedmoe.config import load_config
    from fedmoe.federation.evaluation import WITHHELD_EVALUATION
    from fedmoe.federation.flower.server import FlowerTransport

    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=5"]))
    transport.node_of = {c: 10 + c for c in range(5)}
    transport.infos = {c: {"data": {"n_generated": 3}} for c in range(5)}

    def result(loss, tokens):
        return {"loss": loss, "perplexity": 1.0, "tokens": tokens}
    got = {0: (None, {"result": result(2.0, 10), "global_result": result(1.0, 10)}),
           1: (None, {"result": result(2.0, 10), "global_error": "OutOfMemoryError: CUDA out of memory."}),
           2: (None, {"result": result(2.0, 10)}),
           3: (None, {"result": WITHHELD_EVALUATION, "withheld": [], "global_result": result(3.0, 30)}),
           4: (None, {"result": result(2.0, 10), "global_result": result(-5.0, 10)})}
    own, failed, pooled, global_failed = transport._both_results(got, {})
    assert failed == {} and [c for c, r in own.items() if isinstance(r, dict)] == [0, 1, 2, 4]
    assert own[3] != WITHHELD_EVALUATION and "clients_withheld" not in pooled  # its node kept nothing: not kept
    assert sorted(global_failed) == [1, 2, 4]
    assert global_failed[1].startswith("node 11: OutOfMemoryError") and "activation_checkpointing" in global_failed[1]
    assert "carries no evaluation of the global model" in global_failed[2] and "a test loss of -5.0" in global_failed[4]
    assert pooled["tokens"] == 40 and pooled["loss"] == (1.0 * 10 + 3.0 * 30) / 40
    # a node that keeps its evaluation (its privacy budget) keeps both halves: counted as withheld, not failed
    got = {0: (None, {"result": None, "withheld": [WITHHELD_EVALUATION]}), 1: got[0]}
    own, _, pooled, global_failed = transport._both_results(got, {})
    assert own[0] == WITHHELD_EVALUATION and pooled["clients_withheld"] == [0] and 0 not in global_failed
    # no global result from anyone and none kept: None (the loop names the failures and stops)
    assert transport._both_results({1: (None, {"result": result(2.0, 10)})}, {})[2] is None


# ------------------------------------------------------- the numbers on shared data when their client fails
GENERAL_CFG = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
               "model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32",
               "data.partition.num_clients=3", "train.max_steps=1", "train.batch_size=2", "lora.rank=2",
               "eval.rouge=false", "data.max_test_per_client=2", "federation.rounds=1", "eval.general_blocks=1",
               "eval.mmlu=[anatomy]", "eval.mmlu_max_per_subject=2"]


def _global_rows(summary_run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (summary_run / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["kind"] == "test" and r["client"] is None}


@pytest.mark.parametrize("second_fails", [False, True])
def test_the_general_numbers_come_from_the_next_client_when_theirs_fails(tmp_path, second_fails):
    """FedIT (every client runs the global model): the general text and MMLU are asked of one client, 0. Its
    evaluation fails in every evaluated round; the loop asks client 1 for them in a message of its own, and the
    global rows hold the very numbers of the run where nothing failed (the same model, the same data). If client
    1 fails them too, that is its failure of that stage, and the global rows lack them (no number from nowhere)."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    asked = []

    class Failing(LocalTransport):
        def evaluate(self, round_idx, messages, with_answers, general_for, prog):
            asked.append((round_idx, sorted(messages), sorted(c for c, g in general_for.items() if g)))
            failing = [c for c in messages if general_for[c] and (c == 0 or second_fails)]
            out, failed = super().evaluate(round_idx, {c: m for c, m in messages.items() if c not in failing},
                                           with_answers, general_for, prog)
            return out, {**failed, **{c: f"node {10 + c}: it broke" for c in failing}}

    honest = _run_through(load_config(None, [*GENERAL_CFG, f"output_dir={tmp_path}", "name=honest"]), LocalTransport)
    summary = _run_through(load_config(None, [*GENERAL_CFG, f"output_dir={tmp_path}", "name=failing"]), Failing)
    assert asked == [(0, [0, 1, 2], [0]), (0, [1], [1]), (1, [0, 1, 2], [0]), (1, [1], [1])]
    want, got = _global_rows(tmp_path / "honest"), _global_rows(tmp_path / "failing")
    stages = [(f["round"], f["client"], f["stage"]) for f in summary["failures"]]
    if not second_fails:
        assert stages == [(0, 0, "evaluate"), (1, 0, "evaluate")]
        for r in (0, 1):
            assert want[r]["mmlu"] is not None and want[r]["general_loss"] > 0
            assert {k: got[r][k] for k in ("general_loss", "general_perplexity", "mmlu")} == \
                   {k: want[r][k] for k in ("general_loss", "general_perplexity", "mmlu")}
        assert summary["global"]["mmlu"] == honest["global"]["mmlu"]
    else:
        general = "evaluate the general text and MMLU on the global model"
        assert stages == [(0, 0, "evaluate"), (0, 1, general), (1, 0, "evaluate"), (1, 1, general)]
        assert all("general_loss" not in got[r] and "mmlu" not in got[r] for r in (0, 1))
        assert summary["global"]["mmlu"] is None and summary["global"]["loss"] is not None


@pytest.mark.parametrize("silent", [False, True])
def test_the_global_models_general_numbers_come_from_the_next_client_when_theirs_fails(tmp_path, silent):
    """FLAME at k_i: each client evaluates its own model and the global one in one message; the global model's
    general text and MMLU are asked of client 0, whose global half fails (as on Flower), or comes back without them
    (``silent``: not asked again). The loop asks client 1 for them, beside its own model, in a message of its own:
    the global rows hold the numbers of the honest run."""
    from fedmoe.config import load_config
    from fedmoe.federation.evaluation import GENERAL_KEYS
    from fedmoe.federation.local import LocalTransport

    sets = [*GENERAL_CFG, "algorithm.name=flame", "algorithm.budgets.top_k=[2,1,1]", f"output_dir={tmp_path}"]
    asked = []

    class Failing(LocalTransport):
        def evaluate_with_global(self, round_idx, messages, global_message, with_answers, general_for, general, prog):
            asked.append((round_idx, sorted(messages), general))
            own, failed, res, global_failed = super().evaluate_with_global(
                round_idx, messages, global_message, with_answers, general_for, general, prog)
            if len(messages) > 1 and general:  # client 0 was to give them: its global half failed
                res = {k: v for k, v in res.items() if k not in GENERAL_KEYS}
                global_failed = global_failed if silent else {**global_failed, 0: "node 10: OutOfMemoryError"}
            return own, failed, res, global_failed

    _run_through(load_config(None, [*sets, "name=honest"]), LocalTransport)
    summary = _run_through(load_config(None, [*sets, "name=failing"]), Failing)
    assert asked == [(0, [0, 1, 2], True), (0, [1], True), (1, [0, 1, 2], True), (1, [1], True)]
    want, got = _global_rows(tmp_path / "honest"), _global_rows(tmp_path / "failing")
    for r in (0, 1):
        assert want[r]["mmlu"] is not None and want[r]["mmlu_questions"] > 0
        assert {k: got[r][k] for k in GENERAL_KEYS if k in want[r]} == {k: want[r][k] for k in GENERAL_KEYS if k in want[r]}
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == \
           ([] if silent else [(0, 0, "evaluate the global model"), (1, 0, "evaluate the global model")])


def test_flower_asks_the_first_addressed_client_for_the_global_general_numbers():
    """FlowerTransport.evaluate_with_global asks the general text and MMLU on the global model of the first of
    the clients it addresses that sends its evaluation (the loop's second ask addresses the next one alone)."""
    from fedmoe.config import load_config
    from fedmoe.federation.flower.server import FlowerTransport

    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=4"]))
    transport.node_of = {c: 10 + c for c in range(4)}
    transport.infos = {0: {"data": {"n_test": 2}}, 1: {"data": {}}, 2: {"data": {"n_test": 2}},
                       3: {"data": {"n_test": 2}}}  # client 1's node keeps its evaluation
    sent = []
    transport._send = lambda round_idx, kind, messages, infos, also, timeout, expect: (sent.append(infos), ({}, {}))[1]
    for messages in ([0, 1, 2, 3], [1, 2, 3], [3]):
        transport.evaluate_with_global(1, dict.fromkeys(messages), None, False, dict.fromkeys(messages, False), True,
                                       None)
    assert [[c for c, i in infos.items() if i["global"]["general"]] for infos in sent] == [[0], [2], [3]]


def test_a_tensor_in_a_setup_or_evaluation_reply_is_refused_unread(monkeypatch):
    """Only a train reply carries tensors; a setup or evaluation reply that holds one (256 MiB of it, say) was decoded
    in full before anything looked at it. It is refused from its header: that client's failure, or for a setup the
    node's unreadable answer."""
    import numpy as np
    from flwr.app import Array

    import fedmoe.federation.flower.server as server
    from fedmoe.config import load_config
    from fedmoe.federation.flower.server import FlowerTransport
    from fedmoe.messages import Message

    monkeypatch.setattr(server, "_message", lambda *a: None)
    transport = FlowerTransport(None, load_config(None, ["data.partition.num_clients=2"]))
    transport.node_of, transport.run_id = {0: 10, 1: 11}, "r"
    transport.infos = {c: {"client": c, "data": {"n_test": 4, "n_generated": 2}} for c in range(2)}
    transport._refresh = lambda: set()

    def with_junk(nid, info):
        reply = _flower_reply(nid, info, Message({"w": torch.zeros(1)}))
        reply.content["tensors"]["junk"] = Array(np.ones(4 << 20, dtype=np.float32))
        return reply

    result = {"loss": 2.0, "perplexity": 7.4, "tokens": 10}
    transport._send_and_receive = lambda msgs, timeout=None: [_flower_reply(10, {"result": result}),
                                                              with_junk(11, {"result": result})]
    own, failed = transport.evaluate(1, {0: Message(), 1: Message()}, False, {0: False, 1: False}, None)
    assert set(own) == {0} and "a tensor 'w' the method does not expect" in failed[1] and "refused unread" in failed[1]
    logged = []
    transport.log = logged.append
    transport._send_and_receive = lambda msgs, timeout=None: [with_junk(12, {"client": 1})]
    assert transport._query([12], partial=True) == {}
    assert "answered which client it is unreadably (ValueError: a tensor 'w' the method does not expect" in logged[0]


_TINY2 = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2",
          "train.max_steps=1", "train.batch_size=2", "lora.rank=2", "eval.rouge=false", "eval.zero_shot=false",
          "data.max_test_per_client=2", "federation.min_replies=1"]


def test_a_reply_echoing_tensors_it_was_sent_is_left_out(tmp_path):
    """In-process SCAFFOLD: client 1 returns the server's control variates (c/...) it was sent beside its update.
    They are no update: the reply is invalid, not aggregated (they went into the global state, which then had 96
    tensors for 48, and every honest client of the next round was refused)."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, [*_TINY2, "algorithm.name=scaffold", "train.grad_clip=null", "federation.rounds=2",
                             f"output_dir={tmp_path}", "name=echo"])

    class Echo(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            reply, report = replies[1]
            echoed = {n: t for n, t in messages[1].tensors.items() if n not in reply.tensors}
            assert any(n.startswith("c/") for n in echoed)
            reply.tensors.update(echoed)
            return replies, failures

    summary = _run_through(cfg, Echo)
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "invalid"), (2, 1, "invalid")]
    assert "a tensor 'c/" in summary["failures"][0]["error"]


def test_activation_counts_the_method_aggregates_by_are_checked_as_the_reports_are(tmp_path):
    """In-process FLAME aggregates by the counts in the reply, and the runtime checked those of the transport's
    report. Client 1's reply counts are another client's routing (the experts rolled): valid numbers, not its own —
    left out; so is a reply with negative counts (they were aggregated)."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport
    from fedmoe.messages import ACTIVATION_COUNTS

    cfg = load_config(None, [*_TINY2, "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "federation.rounds=2",
                             f"output_dir={tmp_path}", "name=counts"])

    class Miscount(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            counts = replies[1][0].tensors[ACTIVATION_COUNTS]
            replies[1][0].tensors[ACTIVATION_COUNTS] = counts.roll(1, dims=1) if round_idx == 1 else -counts
            return replies, failures

    summary = _run_through(cfg, Miscount)
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    errors = [f["error"] for f in summary["failures"]]
    assert "activation counts in its reply that are not those of its training report" in errors[0]
    assert "activation counts that are not non-negative integers" in errors[1]


def test_an_in_process_client_writing_into_its_message_changes_no_one_elses(tmp_path):
    """Client 0 adds 1 in place to the tensors it was sent (as a method's client half might): client 1 still gets
    the global state as the server holds it (on Flower a message is the client's own; in-process it was the
    server's tensors themselves)."""
    from fedmoe.config import load_config
    from fedmoe.federation.local import LocalTransport

    cfg = load_config(None, [*_TINY2, "federation.rounds=1", f"output_dir={tmp_path}", "name=scribble"])
    seen = {}

    class Scribbled(LocalTransport):
        def train(self, round_idx, messages, prog):
            for cid, node in self.nodes.items():
                real = node.train

                def train(half, mm, msg, cfg, cid=cid, real=real, **kw):
                    seen[cid] = {n: t.clone() for n, t in msg.tensors.items()}
                    if cid == 0:
                        for t in msg.tensors.values():
                            t.add_(1.0)
                    return real(half, mm, msg, cfg, **kw)

                node.train = train
            return super().train(round_idx, messages, prog)

    _run_through(cfg, Scribbled)
    assert seen[0].keys() == seen[1].keys() and all(torch.equal(seen[0][n], seen[1][n]) for n in seen[0])


def test_a_secure_aggregation_dropout_is_not_counted_as_aggregated(tmp_path):
    """The runtime's ledger under SecAgg+ (the transport's secure mean, Flower's in a real run, here one that leaves
    client 1 out as SecAgg+ does a client whose weighted update exceeds clipping_range): client 1's update is in no
    aggregate, so its rounds_trained, expert counts and reported values do not count it, and the server rows name
    only client 0 (they counted it as aggregated)."""
    from fedmoe.algorithms import get_method, model_spec
    from fedmoe.config import load_config
    from fedmoe.federation.directories import prepare_run_dir
    from fedmoe.federation.local import LocalTransport
    from fedmoe.federation.runtime import Federation
    from fedmoe.messages import Message

    cfg = load_config(None, [*_TINY2, "federation.rounds=2", "federation.runtime=flower-sim",
                             "federation.secagg.clipping_range=8", f"output_dir={tmp_path}", "name=drop"])

    class DropsOne(LocalTransport):
        kept: dict = {}

        def train(self, round_idx, messages, prog):  # replies as SecAgg+'s: no tensors, the update kept aside
            replies, failures = super().train(round_idx, messages, prog)
            for cid, (reply, report) in replies.items():
                self.kept[cid] = {n: t.double() - messages[cid].tensors[n].double() for n, t in reply.tensors.items()}
                replies[cid] = (Message({}, dict(reply.scalars), reply.header), report)
            return replies, failures

        def secure_mean(self, round_idx, weights, spec):
            mean = {n: self.kept[0][n] for n, _ in spec}
            return mean, [0], {1: "dropped out of SecAgg+"}, {"bytes": {}}

    rd = prepare_run_dir(cfg, log=lambda *a: None)
    method = get_method(cfg.algorithm.name)
    try:
        summary = Federation(cfg, rd, transport=DropsOne(cfg, method, model_spec(cfg, method)), log=lambda *a: None).run()
    finally:
        rd.unlock()
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    assert summary["clients"][1]["expert_activation"] is None and summary["clients"][1]["reported"] is None
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "secure aggregation"),
                                                                                   (2, 1, "secure aggregation")]
    server_rows = [r for r in rd.read_metrics() if r["kind"] == "server"]
    assert [r["clients"] for r in server_rows] == [[0], [0]]
