"""A client whose local training raises in the in-process runtime: ``federation.on_client_error: stop``
(default) lets the exception end the run; ``skip`` leaves the client out of the round (the others are
aggregated when at least ``federation.min_replies`` succeeded) and reports it, as Flower's runtime does
with a node that fails."""

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.federation.runtime import Federation, RoundFailed
from fedmoe.federation.summary import nonfinite_exit_message
from fedmoe.report import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "train.max_steps=1",
        "train.batch_size=2", "eval.rouge=false", "eval.batch_size=8", "data.max_test_per_client=4", "lora.rank=2",
        "eval.zero_shot=false"]


def _federation(tmp_path, name, *extra, observe=None, broken=(1,)):
    """A run whose clients in ``broken`` hold a broken shard: their training data was tokenised with
    another tokenizer (token ids beyond this model's vocabulary), so their training raises."""
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *extra])
    fed = Federation(cfg, RunDir(tmp_path / name), log=lambda *a: None, observe=observe)
    vocab = fed.spec.config.vocab_size
    for cid in broken:
        node = fed.transport.nodes[cid]
        node.data.train = [{**ex, "input_ids": [vocab + 7 + i for i in range(len(ex["input_ids"]))]}
                           for ex in node.data.train]
    return fed


def test_stop_is_the_default_and_the_error_ends_the_run(tmp_path):
    fed = _federation(tmp_path, "stop", "data.partition.num_clients=3", "federation.rounds=1")
    assert fed.cfg.federation.on_client_error == "stop"
    with pytest.raises(IndexError, match="out of range"):
        fed.run()
    assert not (tmp_path / "stop" / "summary.json").exists()


def test_skip_aggregates_the_others_and_reports_the_failures(tmp_path):
    seen, sent, down = {}, {}, {}

    def observe(kind, cid, msg):
        if kind == "reply" and msg.header["round"] == 1:
            seen[cid] = ({n: t.clone() for n, t in msg.tensors.items()}, msg.scalars["n_train"])
        if kind == "downlink" and msg.header["round"] == 2:
            sent[cid] = {n: t.clone() for n, t in msg.tensors.items()}
        if kind == "downlink":
            down[cid] = down.get(cid, 0) + msg.nbytes()

    fed = _federation(tmp_path, "skip", "data.partition.num_clients=3", "federation.rounds=2",
                      "federation.on_client_error=skip", observe=observe)
    summary = fed.run()
    # round 1: FedIT's average of clients 0 and 2 by hand (what round 2 sends); client 1 never replied
    assert sorted(seen) == [0, 2]
    (t0, n0), (t2, n2) = seen[0], seen[2]
    for name, g in sent[0].items():
        torch.testing.assert_close(g.double(), (n0 * t0[name].double() + n2 * t2[name].double()) / (n0 + n2),
                                   rtol=1e-6, atol=1e-7)
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "train"), (2, 1, "train")]
    assert all(f["error"].startswith("IndexError: index out of range") for f in summary["failures"])
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0, 2]
    # the failed client was sent both rounds' messages: they count (its uplink: nothing came)
    assert [c["bytes_down"] for c in summary["clients"]] == [down[0], down[1], down[2]] and down[1] == down[0] > 0
    assert [c["bytes_up"] > 0 for c in summary["clients"]] == [True, False, True]
    assert [c["replies_received"] for c in summary["clients"]] == [2, 0, 2]
    rows = fed.rd.read_metrics()
    assert [r["clients"] for r in rows if r["kind"] == "server"] == [[0, 2], [0, 2]]
    assert [(r["round"], r["client"]) for r in rows if r["kind"] == "failure"] == [(1, 1), (2, 1)]
    report = fed.rd.report_path.read_text()
    assert "## Failures" in report and "| 2 | 1 | train | IndexError: index out of range" in report
    assert nonfinite_exit_message(summary) is None  # a failed client is not a non-finite update: exit 0


def test_skip_still_stops_when_fewer_than_min_replies_succeed(tmp_path):
    fed = _federation(tmp_path, "few", "data.partition.num_clients=2", "federation.rounds=1",
                      "federation.on_client_error=skip", "federation.min_replies=2")
    with pytest.raises(RoundFailed, match=r"round 1: 1 of 2 sampled clients replied, fewer than "
                                          r"federation.min_replies \(2\).*IndexError"):
        fed.run()


def test_a_client_out_of_memory_is_reported_with_what_to_do(tmp_path, monkeypatch):
    """`skip`: a client whose training runs out of memory is a failure of the round whose text says what
    changes no number (activation checkpointing, on resume); a Flower node's reason gets the same, any
    other failure is left as it is."""
    import fedmoe.federation.clients as clients
    from fedmoe.federation.directories import with_memory_hint

    real = clients.train_local

    def oom_for_client_1(mm, examples, *args, **kwargs):
        if examples is fed.transport.nodes[1].data.train:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(mm, examples, *args, **kwargs)

    fed = _federation(tmp_path, "oom", "data.partition.num_clients=3", "federation.rounds=1",
                      "federation.on_client_error=skip", broken=())
    monkeypatch.setattr(clients, "train_local", oom_for_client_1)
    summary = fed.run()
    [failure] = summary["failures"]
    assert (failure["round"], failure["client"], failure["stage"]) == (1, 1, "train")
    assert failure["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB [out of memory:")
    assert "--set train.activation_checkpointing=true" in failure["error"]
    flower = "node 42: <class 'torch.OutOfMemoryError'>:<'CUDA out of memory'> (code 0)"
    assert with_memory_hint(flower).startswith(flower + " [out of memory:")
    assert with_memory_hint("node 42: ValueError: bad shard (code 0)") == "node 42: ValueError: bad shard (code 0)"
