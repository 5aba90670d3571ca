"""What a SuperNode tells its server when something fails, and how it reads its node config: an error that may
quote the node's data (a row that failed validation) reaches the server as its type only, the whole of it staying
in the node's own output (node config share-errors=true sends it); a node's privacy budget refuses a run before any
of its data is read; a node config value fedmoe cannot take is an error naming the key, never its default."""

import json

import pytest
import yaml

from fedmoe.config import config_to_dict, load_config
from fedmoe.federation.flower.paths import NodeConfigError, node_error_text, node_identity
from fedmoe.federation.flower.records import to_records
from fedmoe.messages import Message

SECRET = "SECRET: patient Jane Roe, SSN 078-05-1120"
TINY = ["model.name=builtin:tiny-olmoe", "data.max_length=32", "data.partition.num_clients=2", "lora.rank=2"]


@pytest.fixture
def private_file(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"question {i}", "output": f"{SECRET} #{i}"}) + "\n"
                            for i in range(8)))
    return path


def _options(*sets):
    # a run whose field_map makes the node's first row fail validation, quoting it (a server chooses these settings)
    cfg = load_config(None, [*TINY, "data.field_map={options: output}", *sets])
    return {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False)}


def _ask_client_app(node, options, kind="query"):
    """One message through the deployment ClientApp (no options given: Flower's run config), as Flower calls it."""
    import time

    from flwr.app import Context, Message as FlowerMessage, Metadata, RecordDict

    from fedmoe.federation.flower.apps import client_reply

    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=options)
    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="0",
                    created_at=time.time(), ttl=3600.0, message_type=kind)
    msg = FlowerMessage(content=to_records(Message(header={"kind": kind, "round": 0, "run_id": "run-a"})), metadata=meta)
    return client_reply(msg, ctx)


def test_a_row_of_the_nodes_data_never_reaches_the_server_in_an_error(tmp_path, private_file, capsys):
    from fedmoe.federation.flower.apps import NodeError

    node = {"partition-id": 0, "state-dir": str(tmp_path / "state"), "data-path": str(private_file)}
    with pytest.raises(NodeError) as told:
        _ask_client_app(node, _options())
    assert str(told.value).startswith("DataError on this node (its reason, which may quote the node's data, is in "
                                      "the node's log; the node config share-errors=true sends reasons to the server)")
    assert "SECRET" not in str(told.value) and str(private_file) not in str(told.value)
    assert SECRET in capsys.readouterr().err  # the node's own output has it all
    # the node's operator may send reasons (a lab, a trusted server)
    with pytest.raises(Exception, match="SECRET") as told:
        _ask_client_app({**node, "share-errors": "true"}, _options())
    assert type(told.value).__name__ == "DataError"


def test_a_nodes_budget_refuses_a_run_before_its_data_is_read(tmp_path, private_file):
    """A node with a privacy budget and a run without local DP: refused with its reason (which quotes no data), and
    the data file is not read (its failing row would otherwise say so first)."""
    node = {"partition-id": 0, "state-dir": str(tmp_path / "state"), "data-path": str(private_file), "dp-epsilon": 8}
    with pytest.raises(PermissionError, match="client 0: this node trains only under local DP.*no federation.dp"):
        _ask_client_app(node, _options())


def test_a_worker_tells_the_relay_only_what_quotes_no_data(tmp_path, private_file):
    """The reviewer's path: a SuperNode relaying to a fedmoe worker. The worker's log keeps the reason."""
    from fedmoe.federation.flower.relay import WorkerError, ask_worker, kill_worker, log_path, records_to_wire

    from test_worker import _start

    path = tmp_path / "w.sock"
    node = {"partition-id": 0, "state-dir": str(tmp_path / "state"), "data-path": str(private_file)}
    proc = _start(path, " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node.items()))
    try:
        desc, payload = records_to_wire(to_records(Message(header={"kind": "query", "round": 0, "run_id": "run-a"})))
        header = {"op": "handle", "kind": "query", "records": desc, "options": _options(), "node": node}
        with pytest.raises(WorkerError, match="^DataError on this node") as told:
            ask_worker(path, header, payload, start=False)
        assert "SECRET" not in str(told.value)
        with pytest.raises(WorkerError, match="SECRET"):  # share-errors=true on the SuperNode's node config
            ask_worker(path, {**header, "node": {**node, "share-errors": True}}, payload, start=False)
    finally:
        kill_worker(path)
        out = proc.communicate(timeout=60)[0]
    assert SECRET in out or SECRET in (log_path(path).read_text() if log_path(path).exists() else "")


def test_error_text_by_kind():
    from fedmoe.data.sources import DataError
    from fedmoe.federation.flower.budget import BudgetRefusal

    quoted = DataError(f"notes.jsonl: line 1: got {SECRET!r}")
    assert node_error_text(quoted, {}).startswith("DataError on this node") and "SECRET" not in node_error_text(quoted, {})
    assert SECRET in node_error_text(quoted, {"share-errors": "yes"})
    assert SECRET in node_error_text(quoted, {}, deployed=False)  # a simulation: one process, one user
    assert SECRET not in node_error_text(quoted, {"share-errors": "perhaps"})  # unreadable: not shared
    for own in (BudgetRefusal("this node's budget: 2 releases make ε = 9 > 8"), NodeConfigError("node config x = 1")):
        assert node_error_text(own, {}) == f"{type(own).__name__}: {own}"
    import torch

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    from fedmoe.federation.directories import with_memory_hint

    assert "activation_checkpointing" in with_memory_hint(node_error_text(oom, {}))  # still told what to do


@pytest.mark.parametrize("key,value", [("share-examples", "off"), ("share-examples", "flase"), ("partition-id", "abc"),
                                       ("partition-id", 1.7), ("partition-id", True), ("partition-id", -1),
                                       ("worker-timeout-s", "abc"), ("worker-timeout-s", -5),
                                       ("worker-nproc", "abc"), ("worker-nproc", 0), ("worker-idle-s", 0.5)])
def test_a_node_config_value_that_cannot_be_read_is_refused_naming_the_key(key, value, tmp_path):
    from fedmoe.federation.flower.client import node_shares
    from fedmoe.federation.flower.relay import relay_timeout, start_worker

    node = {"partition-id": 0, "state-dir": str(tmp_path), key: value}
    share = load_config(None, ["eval.share_examples=true"])
    reads = {"share-examples": lambda: node_shares(node, share), "partition-id": lambda: node_identity(node, {}),
             "worker-timeout-s": lambda: relay_timeout({}, node),
             "worker-nproc": lambda: start_worker(tmp_path / "w.sock", node),
             "worker-idle-s": lambda: start_worker(tmp_path / "w.sock", node)}
    with pytest.raises(NodeConfigError, match=f"node config {key} = {value!r}: give "):
        reads[key]()
    assert not (tmp_path / "w.sock").exists()  # no worker was started on a value it could not read


def test_node_config_values_that_can_be_read():
    from fedmoe.federation.flower.client import node_shares
    from fedmoe.federation.flower.relay import DEFAULT_TIMEOUT_S, relay_timeout

    share = load_config(None, ["eval.share_examples=true"])
    assert [node_shares({"share-examples": v}, share) for v in ("false", "0", "no", False, "true", "YES", True)] == \
        [False] * 4 + [True] * 3
    assert node_shares({}, share) and not node_shares({}, load_config(None, []))
    # a node under a privacy budget shares its answers and their references (its data verbatim, which no ε covers)
    # only when its node config says so, also where it sends its evaluation numbers
    budget = {"dp-epsilon": "8", "dp-evaluation": "send"}
    assert not node_shares(budget, share) and node_shares({**budget, "share-examples": "true"}, share)
    assert node_identity({"partition-id": "2", "state-dir": "/srv"}, {})[0] == 2
    assert node_identity({"partition-id": 3, "state-dir": "/srv"}, {})[0] == 3
    assert relay_timeout({}, {}) == DEFAULT_TIMEOUT_S and relay_timeout({}, {"worker-timeout-s": "90"}) == 90.0


def test_a_deployments_local_paths_are_made_absolute_before_they_leave_this_directory(tmp_path, monkeypatch):
    """`fedmoe run --runtime flower` checked a relative model, tokenizer or data path against its own directory, and
    the SuperLink's ServerApp opened it against the SuperLink's (not found, or another file, or a hub id). Each such
    path that names something here is made absolute in the run's config; hub ids and shipped names stay."""
    from fedmoe.federation.flower.launch import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "notes.jsonl").write_text("")
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "model.tokenizer=tok", "data.source=[notes.jsonl, dolly, "
                             "org/not-here]", "data.partition.scheme=source", "data.partition.num_clients=3",
                             "data.field_maps={notes.jsonl: {output: answer}}"])
    logged = []
    out = absolute_local_paths(cfg, logged.append)
    assert out.model.name == "builtin:tiny-olmoe" and out.model.tokenizer == str(tmp_path / "tok")
    assert out.data.source == [str(tmp_path / "notes.jsonl"), "dolly", "org/not-here"]
    assert out.data.field_maps == {str(tmp_path / "notes.jsonl"): {"output": "answer"}}
    assert logged == [f"paths made absolute for the SuperLink's ServerApp and the SuperNodes (which run in other "
                      f"directories): model.tokenizer = tok -> {tmp_path / 'tok'}; data.source = notes.jsonl -> "
                      f"{tmp_path / 'notes.jsonl'}"]
    plain = load_config(None, [])
    assert absolute_local_paths(plain, logged.append) is plain and len(logged) == 1  # nothing to change: unchanged


def test_what_quotes_no_data_still_reaches_the_server_in_full(tmp_path):
    """Running out of memory (the CPU allocator's is a plain RuntimeError) keeps the server's remedy; a run config this
    node cannot read (another fedmoe on the server) is the server's message, told in full; an empty partition-id is
    an error naming the key."""
    from fedmoe.federation.directories import with_memory_hint
    from fedmoe.federation.flower.client import ClientCache

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                       "allocate 9663676416 bytes")
    assert node_error_text(cpu, {}) == f"RuntimeError: {cpu}"
    assert "activation_checkpointing" in with_memory_hint(node_error_text(cpu, {}))
    node = {"partition-id": 0, "state-dir": str(tmp_path / "state"), "dp-epsilon": 8}
    for cache_node in (node, {k: v for k, v in node.items() if k != "dp-epsilon"}):
        with pytest.raises(Exception) as told:
            ClientCache().reply("query", None, {"fedmoe-config": "model: {name: x, colour: blue}\n"}, cache_node)
        text = node_error_text(told.value, cache_node)
        assert text.startswith("RefusedMessage: this node cannot read the run's config: ") and "colour" in text
    with pytest.raises(NodeConfigError, match="node config partition-id is empty"):
        node_identity({"partition-id": "", "state-dir": "/srv"}, {})
