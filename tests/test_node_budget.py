"""A data owner's own privacy budget on its node (node config dp-epsilon, fedmoe.federation.flower.budget): the
client a SuperNode (or its worker) runs refuses a run whose config would let its data leave unnoised or with
noise the server can remove, keeps a ledger of every update it released and refuses the release that would
take its ε past the budget (counted by dp-accounting over releases of different σ), and keeps its evaluation
results and test-set size unless told to send them. The server takes a client that keeps its evaluation as
neither a result nor a failure. The messages are those an in-process run sends, as Flower's records."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

from fedmoe.config import config_to_dict, load_config
from fedmoe.federation import run_federated
from fedmoe.federation.dp import composed_epsilon
from fedmoe.federation.evaluation import WITHHELD_EVALUATION, EvalPolicy
from fedmoe.federation.flower.budget import LEDGER, BudgetRefusal, PrivacyLedger, node_budget
from fedmoe.federation.flower.client import ClientCache
from fedmoe.federation.flower.records import from_records, to_records
from fedmoe.federation.runtime import invalid_setup
from fedmoe.federation.summary import ClientRecord
from fedmoe.messages import Message

TINY = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "train.max_steps=1",
        "train.batch_size=2", "eval.rouge=false", "eval.batch_size=8", "data.max_test_per_client=4", "lora.rank=2",
        "data.partition.num_clients=2", "eval.zero_shot=false"]
SIGMA = 1.0
LOCAL_DP = ["federation.dp.clip_norm=0.05", f"federation.dp.noise_multiplier={SIGMA}", "federation.dp.where=client"]


def _eps(*sigmas, delta=1e-5):
    """ε of local-DP releases at these σ, each a Gaussian mechanism of noise multiplier σ/2 (dp-accounting)."""
    from dp_accounting import GaussianDpEvent, NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for s in sigmas:
        acc.compose(GaussianDpEvent(s / 2))
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, the train messages an in-process local-DP run sent, by (round, client)): 3 rounds."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + LOCAL_DP + [f"output_dir={tmp}", "name=r", "federation.rounds=3"])
    sent = {}

    def observe(kind, cid, msg):
        if kind == "downlink":
            sent[(msg.header["round"], cid)] = msg
    run_federated(cfg, observe=observe, log=lambda *a: None)
    return cfg, sent


def _node(tmp_path, **config):
    return {"partition-id": 0, "state-dir": str(tmp_path / "state"), **config}


def _ask(cache, cfg, node, kind, msg=None, also=None, **info):
    """One message to this node's client, as the Flower ClientApp hands it over: the reply's (message, info)."""
    msg = msg or Message(header={"kind": kind, "round": 0})
    content = to_records(msg.with_header(run_id="run-a"), info or None, also)
    options = {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False)}
    return from_records(cache.reply(kind, content, options, node))


def _trained_round_1(run, tmp_path):
    """A node with budget ε = 100 that set up the run and trained round 1: (its cache, node config, ledger path)."""
    cfg, sent = run
    node = _node(tmp_path, **{"dp-epsilon": "100"})
    cache = ClientCache()
    _ask(cache, cfg, node, "query")
    _ask(cache, cfg, node, "train", sent[(1, 0)])
    return cache, node, tmp_path / "state" / LEDGER


def _with(*sets):
    """The fixture's run config with ``sets`` on top."""
    return load_config(None, TINY + LOCAL_DP + ["federation.rounds=3", *sets])


def test_node_config_budget_is_parsed_or_refused_naming_the_key():
    assert node_budget({"partition-id": 0}) is None
    b = node_budget({"dp-epsilon": "8", "dp-delta": "1e-6", "dp-evaluation": "send"})
    assert (b.epsilon, b.delta, b.send_evaluation) == (8.0, 1e-6, True)
    assert node_budget({"dp-epsilon": 3}).delta == 1e-5 and not node_budget({"dp-epsilon": 3}).send_evaluation
    for bad, key in (({"dp-epsilon": "lots"}, "dp-epsilon = 'lots'"), ({"dp-epsilon": "-1"}, "dp-epsilon = '-1'"),
                     ({"dp-epsilon": "inf"}, "dp-epsilon"), ({"dp-epsilon": 1, "dp-delta": "1"}, "dp-delta = '1'"),
                     ({"dp-epsilon": 1, "dp-evaluation": "maybe"}, "dp-evaluation = 'maybe'"),
                     ({"dp-delta": "1e-6"}, "dp-delta is set without dp-epsilon"), ({"dp-epsilon": True}, "dp-epsilon = True"),
                     ({"dp-epsilon": "nan"}, "dp-epsilon"), ({"dp-epsilon": 0}, "dp-epsilon = 0")):
        with pytest.raises(ValueError, match=key):
            node_budget(bad)


def test_node_paths_do_not_depend_on_where_the_node_was_started(tmp_path, monkeypatch):
    """A relative state-dir followed the SuperNode's working directory: started elsewhere, the node found no stores
    and no privacy ledger (its budget began again at zero). It is refused; ~ is expanded. A worker socket path that
    is a symbolic link is followed, as the worker follows it (the relay looked for the lock and pid files beside the
    link and never stopped a hung worker)."""
    from fedmoe.federation.flower.paths import node_identity
    from fedmoe.federation.flower.relay import lock_path, worker_socket

    with pytest.raises(ValueError, match="state-dir = 'state': give it as an absolute path"):
        node_identity({"partition-id": 0, "state-dir": "state"}, {})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert node_identity({"partition-id": 1, "state-dir": "~/fl"}, {})[2] == str(tmp_path / "fl")
    assert node_identity({"partition-id": 1, "state-dir": "/srv/fl"}, {}) == (1, None, "/srv/fl")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    sock = worker_socket({"worker": str(tmp_path / "link" / "w.sock")})
    assert sock == tmp_path / "real" / "w.sock" and lock_path(sock) == tmp_path / "real" / "w.sock.lock"
    (tmp_path / "real" / "alias.sock").symlink_to(tmp_path / "real" / "w.sock")
    assert worker_socket({"worker": str(tmp_path / "real" / "alias.sock")}) == tmp_path / "real" / "w.sock"


def test_a_node_refuses_a_run_that_would_let_its_data_leave_unnoised(run, tmp_path):
    """Each setting a server could use to get more than noised updates is refused at setup and at training,
    naming it; the same run with local DP as the node asks is set up."""
    cfg, sent = run
    cache, node = ClientCache(), _node(tmp_path, **{"dp-epsilon": "100"})
    for sets, why in ((["federation.dp=null"], "no federation.dp"),
                      (["federation.dp.where=server", "federation.dp.reports=null"], "where = server"),
                      (["federation.dp.client_noise=seeded"], "client_noise = seeded"),
                      (["federation.dp.reports=send"], "reports = send"),
                      (["federation.dp.noise_multiplier=0"], "noise_multiplier = 0"),
                      (["train.max_steps=null"], "max_steps = null .epoch-based training")):
        bad = _with(*sets)
        for kind, msg in (("query", None), ("train", sent[(1, 0)])):
            with pytest.raises(PermissionError, match=f"client 0: this node trains only under local DP.*{why}"):
                _ask(cache, bad, node, kind, msg)
    assert not (tmp_path / "state" / LEDGER).exists()  # nothing released
    _, info = _ask(cache, cfg, node, "query")
    assert info["client"] == 0 and "evaluation" in info["withheld"]
    # no budget: the node follows the run's config (the seeded run trains)
    _, info = _ask(ClientCache(), _with("federation.dp.client_noise=seeded"), _node(tmp_path / "free"), "query")
    assert "evaluation" not in info["withheld"]


def test_the_ledger_counts_every_release_and_refuses_the_one_past_the_budget(run, tmp_path):
    """A budget between ε(2 releases) and ε(3 releases) at σ: rounds 1 and 2 are released and recorded before
    their replies leave; round 1 asked again (a server replaying it) is a third release and is refused, with
    the ε spent and the ε it would make; the ledger keeps the two. A ledger of releases at two σ gives
    dp-accounting's composition of both; a damaged ledger stops training, naming the file, and is kept."""
    cfg, sent = run
    two, three = _eps(SIGMA, SIGMA), _eps(SIGMA, SIGMA, SIGMA)
    assert _eps(2 * SIGMA, 2 * SIGMA, 2 * SIGMA) < two  # counting σ as the noise multiplier would let a third through
    budget = (two + three) / 2
    cache, node = ClientCache(), _node(tmp_path, **{"dp-epsilon": str(budget)})
    _ask(cache, cfg, node, "query")
    for r in (1, 2):
        reply, info = _ask(cache, cfg, node, "train", sent[(r, 0)])
        assert set(reply.tensors) == set(sent[(r, 0)].tensors) and reply.scalars == {"n_train": 1}
    ledger = PrivacyLedger(tmp_path / "state")
    assert [(x["run_id"], x["round"], x["client"], x["noise_multiplier"]) for x in ledger.releases()] == \
        [("run-a", 1, 0, SIGMA / 2), ("run-a", 2, 0, SIGMA / 2)]
    assert ledger.epsilon(1e-5) == pytest.approx(two, rel=1e-12)
    with pytest.raises(BudgetRefusal, match=rf"2 release\(s\) so far make ε = {two:.4g} .* would make ε = {three:.4g}, "
                                            rf"over its dp-epsilon = {budget:g}"):
        _ask(cache, cfg, node, "train", sent[(1, 0)])
    assert len(ledger.releases()) == 2
    # releases at different σ compose as dp-accounting composes them
    mixed = PrivacyLedger(tmp_path / "mixed")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / LEDGER).write_text(json.dumps({"releases": [{"noise_multiplier": 0.5}, {"noise_multiplier": 2.0},
                                                                      {"noise_multiplier": 0.5}]}))
    assert mixed.epsilon(1e-5) == pytest.approx(_eps(1.0, 4.0, 1.0), rel=1e-12)
    assert composed_epsilon({0.5: 2, 2.0: 1}, 1e-5) == pytest.approx(_eps(1.0, 4.0, 1.0), rel=1e-12)
    assert composed_epsilon({0.5: 2, 0.0: 1}, 1e-5) == math.inf and composed_epsilon({}, 1e-5) == 0.0
    # a damaged ledger is never taken for an empty one
    (tmp_path / "state" / LEDGER).write_text('{"releases": [{"noise_multiplier": "x"}]}')
    with pytest.raises(BudgetRefusal, match=f"ledger {tmp_path / 'state' / LEDGER} cannot be read"):
        _ask(ClientCache(), cfg, _node(tmp_path, **{"dp-epsilon": "1e9"}), "train", sent[(2, 0)])
    assert "\"x\"" in (tmp_path / "state" / LEDGER).read_text()


def test_a_node_under_a_budget_keeps_its_evaluation_unless_told_to_send_it(run, tmp_path):
    cfg, sent = run
    evaluate = sent[(1, 0)].with_header(kind="evaluate")
    for node, keeps in ((_node(tmp_path, **{"dp-epsilon": "100"}), True),
                        (_node(tmp_path / "send", **{"dp-epsilon": "100", "dp-evaluation": "send"}), False)):
        cache = ClientCache()
        _, setup = _ask(cache, cfg, node, "query")
        assert keeps == ("n_test" not in setup["data"] and "n_generated" not in setup["data"])
        assert keeps == ("evaluation" in setup["withheld"])
        for both in (False, True):  # its own model; its own and the global model in one message
            extra = {"global": {"general": False}} if both else {}
            _, info = _ask(cache, cfg, node, "evaluate", evaluate, with_answers=True, general=False, also=evaluate,
                           **extra)
            results = [info.get("result"), *([info.get("global_result")] if both else [])]
            if keeps:
                assert results == [None] * len(results) and info["withheld"] == ["evaluation"]
            else:
                assert all(r["tokens"] > 0 and r["loss"] > 0 for r in results)
    # the server takes such a setup (its test-set size absent) only from a client that says it keeps its evaluation
    kept = {"profile": {"k": 2, "rank": 2}, "data": {"n_train": 5, "shared_source": True}, "setup": {}}
    assert invalid_setup(kept, 2, 2, ("n_test", "n_generated")) is None
    assert invalid_setup(kept, 2, 2) == "no data n_test"


def test_a_global_evaluation_that_fails_leaves_the_clients_own_and_a_malformed_one_is_refused(run, tmp_path):
    """One evaluate message holds the client's own model and the global model: the global half failing (here a
    global model whose tensor has another shape) leaves the own evaluation in the reply and says why the global one
    failed; a message whose 'global' part or second message's records are malformed is refused before any work,
    naming what is wrong."""
    cfg, sent = run
    evaluate = sent[(1, 0)].with_header(kind="evaluate")
    node, cache = _node(tmp_path), ClientCache()
    _ask(cache, cfg, node, "query")
    name = sorted(evaluate.tensors)[0]
    broken = Message(tensors={**evaluate.tensors, name: torch.zeros(3, 1)}, scalars=evaluate.scalars,
                     header=evaluate.header)
    _, info = _ask(cache, cfg, node, "evaluate", evaluate, also=broken, with_answers=False, general=False,
                   **{"global": {"general": False}})
    assert info["result"]["tokens"] > 0 and info["result"]["loss"] > 0 and "global_result" not in info
    assert info["global_error"].startswith(f"RefusedMessage: the global model it was sent does not load: '{name}': "
                                           "shape (3, 1) does not match"), info["global_error"]
    _, info = _ask(cache, cfg, node, "evaluate", evaluate, also=evaluate, with_answers=False, general=False,
                   **{"global": {"general": False}})
    assert "global_error" not in info and info["global_result"]["tokens"] == info["result"]["tokens"]
    with pytest.raises(ValueError, match="'global' is 'True', not"):
        _ask(cache, cfg, node, "evaluate", evaluate, also=evaluate, with_answers=False, general=False,
             **{"global": True})
    with pytest.raises(ValueError, match="carries no global model"):
        _ask(cache, cfg, node, "evaluate", evaluate, with_answers=False, general=False, **{"global": {"general": False}})
    content = to_records(evaluate.with_header(run_id="run-a"), {"with_answers": False, "general": False,
                                                                "global": {"general": False}}, evaluate)
    del content["also.header"]
    options = {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False)}
    with pytest.raises(ValueError, match="second message's records are malformed"):
        cache.reply("evaluate", content, options, node)


def test_the_server_counts_a_kept_evaluation_as_neither_a_result_nor_a_failure(tmp_path):
    """EvalPolicy with one client's evaluation kept by its node: that client has no row and no failure; the
    global numbers are the other's and name the client left out; with every client's kept, no number at all."""
    cfg = load_config(None, TINY)
    rows = []
    policy = EvalPolicy(cfg, rows.append)
    records = {0: ClientRecord(0), 1: ClientRecord(1)}
    result = {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 10}
    g = policy.evaluate_round(1, False, records, lambda a, g, general: {0: WITHHELD_EVALUATION, 1: dict(result)},
                              None, True, False)
    assert g["loss"] == 2.0 and g["clients_withheld"] == [0]
    assert [r["client"] for r in rows] == [1, None] and rows[1]["clients_withheld"] == [0]
    rows.clear()
    g = policy.evaluate_round(2, False, records, lambda a, g, general: {0: WITHHELD_EVALUATION, 1: WITHHELD_EVALUATION},
                              None, True, False)
    assert g["loss"] is None and g["perplexity"] is None and g["tokens"] == 0 and g["clients_withheld"] == [0, 1]
    assert [r["client"] for r in rows] == [None]
    # a client that failed is named as missing from the global numbers, not withheld
    g = policy.evaluate_round(3, False, records, lambda a, g, general: {1: dict(result)}, None, True, False)
    assert g["clients_missing"] == [0] and "clients_withheld" not in g and g["loss"] == 2.0
    # the numbers on shared data (general text, MMLU, held-out) are asked of the first client that sends its
    # evaluation: not client 0, whose node kept its test-set size at setup
    records[0].data, records[1].data = {"n_train": 5}, {"n_train": 5, "n_test": 3, "n_generated": 3}
    asked = {}

    def clients(answers, general_for, general):
        asked.update(general_for)
        return {0: WITHHELD_EVALUATION, 1: {**result, "general_loss": 1.5}}
    g = policy.evaluate_round(4, True, records, clients, None, True, False)
    assert asked == {0: False, 1: True} and g["general_loss"] == 1.5


def test_fedmoe_node_privacy_shows_the_ledger(tmp_path):
    """The operator's view of a node's ledger through the CLI: releases by run, ε at the δ given (dp-accounting's,
    over runs of different σ together), and what is left of the budget; a damaged ledger is an error naming it."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    (tmp_path / LEDGER).write_text(json.dumps({"releases": [
        {"run_id": "a", "round": 1, "noise_multiplier": 0.5}, {"run_id": "a", "round": 2, "noise_multiplier": 0.5},
        {"run_id": "b", "round": 1, "noise_multiplier": 2.0}]}))
    out = CliRunner().invoke(app, ["node-privacy", str(tmp_path), "--delta", "1e-6", "--budget", "50"])
    assert out.exit_code == 0, out.output
    total = _eps(1.0, 1.0, 4.0, delta=1e-6)
    assert "3 release(s)" in out.output and "run a: 2 (rounds 1, 2; σ = 1)" in out.output
    assert f"run b: 1 (rounds 1; σ = 4), ε = {_eps(4.0, delta=1e-6):.4g} alone" in out.output
    assert f"ε = {total:.4g} at δ = 1e-06 over all of them; of dp-epsilon = 50, {50 - total:.4g} left" in out.output
    empty = tmp_path / "empty"  # a state-dir with no ledger (and no stores): nothing released
    empty.mkdir()
    assert CliRunner().invoke(app, ["node-privacy", str(empty)]).output.strip().endswith("(ε = 0)")
    # a mistyped path or a file is an error naming it, never "ε = 0" (and nothing is created)
    for wrong, says in ((tmp_path / "none", "no such folder"), (tmp_path / LEDGER, "is a file, not a SuperNode's state-dir")):
        out = CliRunner().invoke(app, ["node-privacy", str(wrong)])
        assert out.exit_code == 2 and out.output.startswith(f"error: {wrong}") and says in out.output, out.output
        assert "ε = 0" not in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
    out = CliRunner().invoke(app, ["node-privacy", str(tmp_path / LEDGER), "--start"])
    assert out.exit_code == 2 and "is a file" in out.output and "started" not in out.output
    (tmp_path / LEDGER).write_text("{")
    bad = CliRunner().invoke(app, ["node-privacy", str(tmp_path)])
    assert bad.exit_code == 2 and "cannot be read" in bad.output


def test_a_server_cannot_choose_where_a_node_keeps_its_files(tmp_path):
    """On a deployment the run config comes from the server: a state-root in it is not taken (it would have a
    node write its stores anywhere its user may, and start its privacy ledger afresh wherever the server likes).
    The node's state-dir, else the default, holds them; only the in-process simulation passes a state-root."""
    from flwr.app import Context, RecordDict

    from fedmoe.federation.flower.apps import client_options
    from fedmoe.federation.flower.paths import DEFAULT_STATE_DIR, node_identity

    sent = {"fedmoe-config": "{}", "state-root": str(tmp_path / "server-chosen")}
    for node, want in (({"partition-id": 0}, str(DEFAULT_STATE_DIR)),
                       ({"partition-id": 0, "state-dir": str(tmp_path / "mine")}, str(tmp_path / "mine"))):
        ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=sent)
        opts = client_options(None, ctx)
        assert "state-root" not in opts and opts["fedmoe-config"] == "{}"
        assert node_identity(node, opts)[2] == want
        assert PrivacyLedger(node_identity(node, opts)[2]).path.parent == Path(want)
    simulation = {"fedmoe-config": "{}", "state-root": "/run/clients"}
    assert node_identity({"partition-id": 0}, client_options(simulation, ctx))[2] == "/run/clients"


def test_a_missing_ledger_beside_trained_stores_stops_training_until_started_knowingly(run, tmp_path):
    """A node whose state-dir shows it trained (a store of a round ≥ 1) but holds no ledger — the ledger deleted,
    or a budget set on a node that trained without one — does not take that for ε = 0: training is refused,
    naming the state-dir and the command that starts a ledger; `fedmoe node-privacy --start` starts an empty one
    (and never overwrites one), after which the node trains and counts again."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    cfg, sent = run
    cache, node, ledger = _trained_round_1(run, tmp_path)
    assert len(json.loads(ledger.read_text())["releases"]) == 1
    ledger.unlink()  # an operator's clean-up
    with pytest.raises(BudgetRefusal, match=rf"state-dir {tmp_path / 'state'} holds the stores of 1 round\(s\) .* "
                                            "fedmoe node-privacy .* --start"):
        _ask(cache, cfg, node, "train", sent[(2, 0)])
    assert not ledger.exists()
    out = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "state"), "--start"])
    assert out.exit_code == 0 and "started, empty" in out.output and "no release recorded" in out.output
    new = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "new" / "state"), "--start"])  # --start creates it
    assert new.exit_code == 0 and "started, empty" in new.output and (tmp_path / "new" / "state" / LEDGER).is_file()
    _ask(cache, cfg, node, "train", sent[(2, 0)])
    assert [r["round"] for r in json.loads(ledger.read_text())["releases"]] == [2]
    again = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "state"), "--start"])
    assert "already, kept as it is" in again.output and len(json.loads(ledger.read_text())["releases"]) == 1


@pytest.mark.parametrize("mode", ["late", "early"])
def test_ranks_training_together_follow_rank_0s_reading_of_the_ledger(run, tmp_path, mode):
    """``--nproc 2``: rank 0 reads the ledger and both ranks follow it. ``late``: the other rank's own reading would
    refuse (a release recorded in between by another process of the node) — both train and rank 0 records the
    release; ``early``: it would admit while rank 0's refuses — both refuse, so neither waits for the other in an
    all-reduce (each case a hang, or one rank trained and the other refused, without the shared verdict)."""
    import os
    import subprocess
    import sys

    import torch

    cfg, sent = run
    node = _node(tmp_path, **{"dp-epsilon": "1e9" if mode == "late" else "1"})
    _ask(ClientCache(), cfg, node, "query")  # the setup (rank 0 answers it alone)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (tmp_path / "node.json").write_text(json.dumps(node))
    torch.save(sent[(1, 0)], tmp_path / "train.pt")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(here / "budget_rank.py"), str(tmp_path), mode], env=env, timeout=240, capture_output=True,
                       text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    did = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    releases = PrivacyLedger(tmp_path / "state").releases()
    if mode == "late":
        assert did == ["trained", "trained"] and len(releases) == 1
    else:
        assert did[0].startswith("refused: this node's privacy budget is spent") and not releases
        assert did[1] == "refused: client 0: rank 0 refused this release (this node's privacy budget)"


@pytest.mark.parametrize("value", ["Infinity", "1e999", "NaN", "-0.5", str(10 ** 400), "600000.0", "true"])
def test_a_ledger_release_no_node_could_have_written_is_damage_not_a_free_one(tmp_path, value):
    """A release whose noise multiplier is infinite counted as ε = 0: a thousand of them, and the next release was
    admitted. One beyond σ/2 of the largest σ a run accepts (1e6), not finite, negative or a huge integer (which
    crashed `fedmoe node-privacy` with an OverflowError) is a damaged ledger, refused naming the file."""
    (tmp_path / LEDGER).write_text('{"releases": [' + ", ".join(['{"noise_multiplier": ' + value + "}"] * 1000) + "]}")
    with pytest.raises(BudgetRefusal, match=f"ledger {tmp_path / LEDGER} cannot be read .*finite noise multiplier"):
        PrivacyLedger(tmp_path).releases()
    (tmp_path / LEDGER).write_text('{"releases": [{"noise_multiplier": 500000}, {"noise_multiplier": 0.5}]}')
    assert len(PrivacyLedger(tmp_path).releases()) == 2  # what a node writes is read


def test_a_ledger_lacking_the_releases_of_stores_beside_it_stops_training_until_they_are_accepted(run, tmp_path):
    """An existing ledger was taken as complete: one restored from an older backup (or a node that trained a run
    with its budget taken off) let the data spend again what it had spent. A release is recorded before its round's
    store is written, so a store of a trained round with no release, and not accepted by the operator, refuses
    training and `fedmoe node-privacy` (naming the store and --accept-stores); --accept-stores lists it as accepted
    (not counted), and the node trains again. --start over existing stores accepts them the same way."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    cfg, sent = run
    cache, node, ledger = _trained_round_1(run, tmp_path)
    backup = ledger.read_text()
    _ask(cache, cfg, node, "train", sent[(2, 0)])
    assert [r["round"] for r in PrivacyLedger(tmp_path / "state").releases()] == [1, 2]
    ledger.write_text(backup)  # the backup of before round 2
    store = tmp_path / "state" / "run-a" / "client-0" / "private-r00002.pt"
    assert store.is_file()
    why = rf"ledger {ledger} records no release for 1 store\(s\) .*\(e\.g\. {store}\).* --accept-stores"
    with pytest.raises(BudgetRefusal, match=why):
        _ask(cache, cfg, node, "train", sent[(3, 0)])
    report = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "state")])
    assert report.exit_code == 2 and "records no release for 1 store(s)" in report.output
    out = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "state"), "--accept-stores"])
    assert out.exit_code == 0, out.output
    assert "1 store(s) without a recorded release accepted" in out.output and str(store) in out.output
    assert "1 release(s)" in out.output and "1 store(s) of rounds accepted without a recorded release" in out.output
    st = store.stat()
    assert json.loads(ledger.read_text())["accepted_stores"] == [
        {"path": "run-a/client-0/private-r00002.pt", "size": st.st_size, "mtime_ns": st.st_mtime_ns}]
    _ask(cache, cfg, node, "train", sent[(3, 0)])
    assert [r["round"] for r in PrivacyLedger(tmp_path / "state").releases()] == [1, 3]
    # an accepted store written anew at its path (a round trained again there without the budget) is not the one
    # accepted: the ledger keeps each accepted store's size and modification time, and refuses again
    kept = store.read_bytes()
    store.write_bytes(kept + b"\0")
    with pytest.raises(BudgetRefusal, match=r"1 store\(s\) .*1 of them accepted before and written anew since"):
        PrivacyLedger(tmp_path / "state").releases()
    store.write_bytes(kept)  # the same size, a later time
    os.utime(store, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(BudgetRefusal, match="written anew since"):
        PrivacyLedger(tmp_path / "state").releases()
    os.utime(store, ns=(st.st_atime_ns, st.st_mtime_ns))  # as it was accepted (a restore that keeps times)
    assert [r["round"] for r in PrivacyLedger(tmp_path / "state").releases()] == [1, 3]
    # the stores are compared as they were listed, before the ledger was read: a store written anew after that (by
    # another process of the node, which records its release first) is not taken for an unrecorded one
    state = PrivacyLedger(tmp_path / "state")
    listed = state._listed()
    store.write_bytes(kept + b"\0")
    assert state.unrecorded_stores(json.loads(ledger.read_text()), listed) == []
    assert state.unrecorded_stores(json.loads(ledger.read_text())) == [store]  # listed now
    store.write_bytes(kept)
    os.utime(store, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = CliRunner().invoke(app, ["node-privacy", str(tmp_path / "state"), "--accept-stores"])
    assert again.exit_code == 0 and "nothing to accept" in again.output

    # a run trained with the budget taken off the node: its stores have no release in the ledger
    free = ClientCache()
    other = to_records(sent[(1, 0)].with_header(run_id="run-b"))
    options = {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False)}
    free.reply("query", to_records(Message(header={"kind": "query", "round": 0}).with_header(run_id="run-b")), options,
               _node(tmp_path))
    free.reply("train", other, options, _node(tmp_path))
    with pytest.raises(BudgetRefusal, match=r"records no release for 1 store\(s\) .*run-b/client-0/private-r00001\.pt"):
        _ask(cache, cfg, node, "train", sent[(2, 0)])

    # --start over a state-dir with stores accepts them: the node trains, counting from there
    fresh = tmp_path / "fresh"
    (fresh / "run-a" / "client-0").mkdir(parents=True)
    (fresh / "run-a" / "client-0" / "private-r00004.pt").write_bytes(b"")
    (fresh / "run-a" / "client-0" / "private-r00005.pt").symlink_to(fresh / "gone.pt")  # a link to nothing: no store
    started = CliRunner().invoke(app, ["node-privacy", str(fresh), "--start"])
    assert started.exit_code == 0 and "1 store(s) of rounds accepted" in started.output, started.output
    assert PrivacyLedger(fresh).releases() == []
    # an entry of a path alone (as --start and --accept-stores wrote them first) accepts the store whatever it holds
    (fresh / LEDGER).write_text('{"releases": [], "accepted_stores": ["run-a/client-0/private-r00004.pt"]}')
    assert PrivacyLedger(fresh).releases() == []
    # what is not a list of stores is a damaged ledger
    for bad in ['"run-a/client-0/private-r00004.pt"', '[{"path": "run-a/client-0/private-r00004.pt"}]',
                '[{"path": "run-a/client-0/private-r00004.pt", "size": true, "mtime_ns": 1}]']:
        (fresh / LEDGER).write_text('{"releases": [], "accepted_stores": ' + bad + "}")
        with pytest.raises(BudgetRefusal, match="cannot be read .*accepted_stores is not a list of stores"):
            PrivacyLedger(fresh).releases()


@pytest.mark.parametrize("release", [{"client": [0]}, {"round": {"r": 1}}, {"run_id": ["abc"]}, {"client": True}])
def test_a_ledger_release_naming_its_round_with_anything_but_a_number_is_damage(tmp_path, release):
    """A release whose client or round is a list (unhashable) crashed the check of the stores against the releases
    with a TypeError: on the node an error type without a reason, in `fedmoe node-privacy` a traceback. It is a
    damaged ledger, named; so is a store folder or file whose digits are not ASCII ('²': isdigit() took it, int() not)."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    (tmp_path / "abc" / "client-0").mkdir(parents=True)
    (tmp_path / "abc" / "client-0" / "private-r00001.pt").write_bytes(b"x")
    (tmp_path / LEDGER).write_text(json.dumps({"releases": [{"run_id": "abc", "client": 0, "round": 1,
                                                             "noise_multiplier": 1.0, **release}]}))
    with pytest.raises(BudgetRefusal, match=f"ledger {tmp_path / LEDGER} cannot be read .*a release whose"):
        PrivacyLedger(tmp_path).releases()
    out = CliRunner().invoke(app, ["node-privacy", str(tmp_path)])
    assert out.exit_code == 2 and "cannot be read" in out.output and "Traceback" not in out.output, out.output
    (tmp_path / LEDGER).write_text(json.dumps({"releases": [{"run_id": "abc", "client": 0, "round": 1,
                                                             "noise_multiplier": 1.0}]}))
    (tmp_path / "abc" / "client-²").mkdir()
    (tmp_path / "abc" / "client-²" / "private-r00001.pt").write_bytes(b"x")
    (tmp_path / "abc" / "client-0" / "private-r².pt").write_bytes(b"x")
    with pytest.raises(BudgetRefusal, match=r"records no release for 1 store\(s\) .*client-²"):
        PrivacyLedger(tmp_path).releases()  # a stray folder's store is unknown, not a crash; the '²' round is no store


def test_a_store_written_while_the_ledger_is_read_is_not_taken_for_an_unrecorded_one(tmp_path, monkeypatch):
    """Two processes of one node (two runs, or clients sharing a state-dir): one checked its next release without
    the lock, read the ledger, and the other recorded a release and wrote its store before the first listed the
    stores: a legitimate node was refused and told to --accept-stores. The stores are listed before the ledger is
    read, so a store listed has its release in the ledger read after it."""
    from fedmoe.federation.flower.budget import NodeBudget

    budget = NodeBudget(epsilon=100.0)
    read = PrivacyLedger._read

    def the_other_process_trains_meanwhile(self):
        data = read(self)
        monkeypatch.setattr(PrivacyLedger, "_read", read)
        PrivacyLedger(tmp_path).record(budget, 1.0, "run-b", 1, 1)
        (tmp_path / "run-b" / "client-1").mkdir(parents=True)
        (tmp_path / "run-b" / "client-1" / "private-r00001.pt").write_bytes(b"x")
        return data

    PrivacyLedger(tmp_path).record(budget, 1.0, "run-a", 1, 0)
    monkeypatch.setattr(PrivacyLedger, "_read", the_other_process_trains_meanwhile)
    PrivacyLedger(tmp_path).check(budget, 1.0)
    assert [r["run_id"] for r in PrivacyLedger(tmp_path).releases()] == ["run-a", "run-b"]


def test_a_release_accounts_for_its_own_clients_store_only(tmp_path):
    """A release is matched to a store by run, client and round: client 0's release of round 1 does not account for
    client 1's store of the same run and round (two clients sharing a state-dir), nor for round 2's."""
    (tmp_path / LEDGER).write_text(json.dumps({"releases": [{"run_id": "run-a", "client": 0, "round": 1,
                                                             "noise_multiplier": 1.0}]}))
    (tmp_path / "run-a" / "client-0").mkdir(parents=True)
    (tmp_path / "run-a" / "client-0" / "private-r00001.pt").write_bytes(b"x")
    assert len(PrivacyLedger(tmp_path).releases()) == 1
    for store in ("client-1/private-r00001.pt", "client-0/private-r00002.pt"):
        (tmp_path / "run-a" / store).parent.mkdir(exist_ok=True)
        (tmp_path / "run-a" / store).write_bytes(b"x")
        with pytest.raises(BudgetRefusal, match=rf"records no release for 1 store\(s\) .*run-a/{store}"):
            PrivacyLedger(tmp_path).releases()
        (tmp_path / "run-a" / store).unlink()
