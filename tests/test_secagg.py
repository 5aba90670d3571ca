"""SecAgg+ (federation.secagg). The protocol module (fedmoe.federation.flower.secagg) on Flower's simulation:
a plain message exchange and SecAgg+ rounds interleave on one grid; the unmasked mean equals the exact
weighted mean within the derived quantisation bound; a NaN client, a client failing in train, a client
dropping out at setup and a one-node round are handled; payloads reach the train handler. The methods'
aggregation from the mean alone equals their own. A fedmoe run on Flower's simulation with SecAgg+: the
global model of the plain in-process run to the quantisation error, no array and no test-set string in any
message a client sent."""

import os
import time

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedmoe.federation.flower import secagg as sa
from helpers import once_per_session

DIM = 257
WEIGHTS = [10.0, 25.0, 40.0, 73.0]  # by partition id
MAX_WEIGHT = 100.0
CLIP = 8.0
XMAX = 3.0


def client_vector(pid: int, rnd: int) -> np.ndarray:
    return np.random.default_rng(1000 * rnd + pid).uniform(-XMAX, XMAX, DIM)


def _drop_at_setup(msg, ctx, call_next):
    """Fault injection: partition 0 fails the SecAgg+ setup stage of round 3."""
    cfg = msg.content.config_records.get(sa.SECAGG_CONFIGS)
    if cfg is not None and cfg.get("stage") == "setup" and msg.metadata.group_id == "3" \
            and int(ctx.node_config["partition-id"]) == 0:
        raise RuntimeError("injected: drop at setup")
    return call_next(msg, ctx)


# rounds 6-8: one node's reply of one stage is malformed (what Flower's workflow indexes without checking, and
# raised on, stopping the run): (round, partition, stage) -> the corruption
CORRUPT = {6: (2, "collect_masked_vectors", "no configs record"), 7: (3, "collect_masked_vectors", "short vector"),
           8: (1, "unmask", "a share of a node not in the round")}


# round 9: a malicious node adds to its share of the weight total (the first element of its masked vector), which
# Flower divides the unmasked sum by: its mean would be scaled
TAMPER = {9: 2, 10: 3}  # round 10: a node reports a negative weight, which would cancel the others' in the total


def _corrupt(msg, ctx, call_next):
    """Fault injection: the reply of :data:`CORRUPT`'s node, made after its SecAgg+ mod answered."""
    cfg = msg.content.config_records.get(sa.SECAGG_CONFIGS)
    asked = None if cfg is None else cfg.get("stage")  # read first: the SecAgg+ mod consumes the record
    rnd = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else None
    reply = call_next(msg, ctx)
    if rnd in TAMPER and int(ctx.node_config["partition-id"]) == TAMPER[rnd] and asked == "collect_masked_vectors":
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes

        if rnd == 10:
            reply.content["fitres.num_examples"]["num_examples"] = -10**6
            return reply
        out = reply.content.config_records[sa.SECAGG_CONFIGS]
        first = bytes_to_ndarray(out["masked_params"][0])
        first[0] = (int(first[0]) - 10**6) % 2**32  # the sum's weight total 10**6 smaller: the mean far larger
        out["masked_params"] = [ndarray_to_bytes(first), *out["masked_params"][1:]]
        return reply
    if rnd not in CORRUPT:
        return reply
    pid, stage, how = CORRUPT[rnd]
    if int(ctx.node_config["partition-id"]) != pid or asked != stage:
        return reply
    from flwr.common import ndarray_to_bytes

    out = reply.content.config_records[sa.SECAGG_CONFIGS]
    if how == "no configs record":
        del reply.content[sa.SECAGG_CONFIGS]
    elif how == "short vector":
        out["masked_params"] = [ndarray_to_bytes(np.zeros(3, dtype=np.int64))]
    else:
        out["nids"] = [*out["nids"], 987654321]
        out["shares"] = [*out["shares"], b"not a share"]
    return reply


def _apps(results: dict):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    client_app, server_app = ClientApp(), ServerApp()

    @client_app.train(mods=[_corrupt, _drop_at_setup, sa.secaggplus_mod_if_marked])
    def _train(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        if not sa.is_secagg_message(msg):  # the loop's own train message
            return Message(RecordDict({"plain": MetricRecord({"y": float(msg.content["plain"]["x"]) + pid})}),
                           reply_to=msg)
        ins = sa.read_secagg_instruction(msg)
        vec = client_vector(pid, ins.round_idx)
        vec = vec * float(ins.config.get("scale", 1.0))
        if "extra" in ins.content:  # a RecordDict payload's record
            vec = vec + float(ins.content["extra"]["shift"])
        if ins.config.get("nan_pid") == pid:
            vec[5] = np.nan  # secagg_reply refuses: this client drops out
        return sa.secagg_reply(msg, vec, WEIGHTS[pid], metrics={"pid": pid})

    @server_app.main()
    def _main(grid, context):
        while len(nodes := sorted(grid.get_node_ids())) < len(WEIGHTS):
            time.sleep(0.1)

        def plain(x):
            msgs = [Message(RecordDict({"plain": MetricRecord({"x": x})}), dst_node_id=n, message_type="train",
                            group_id="plain") for n in nodes]
            return {r.metadata.src_node_id: int(r.content["plain"]["y"] - x) for r in grid.send_and_receive(msgs)}

        results["pid_of"] = plain(0.0)
        kw = {"max_weight": MAX_WEIGHT, "clipping_range": CLIP, "timeout": 60, "context": context}
        results[1] = sa.secure_weighted_sum(grid, nodes, {n: {"scale": 0.5} for n in nodes}, DIM, round_idx=1, **kw)
        results["plain_again"] = plain(10.0)
        pid1 = next(n for n, p in results["pid_of"].items() if p == 1)
        results[2] = sa.secure_weighted_sum(grid, nodes, {pid1: {"nan_pid": 1}}, DIM, round_idx=2, **kw)
        results[3] = sa.secure_weighted_sum(grid, nodes, None, DIM, round_idx=3, **kw)
        extra = RecordDict({"extra": MetricRecord({"shift": 0.25})})
        results[4] = sa.secure_weighted_sum(grid, nodes, {n: extra for n in nodes}, DIM, round_idx=4, **kw)
        results[5] = sa.secure_weighted_sum(grid, nodes[:1], None, DIM, round_idx=5, **kw)
        for rnd in [*CORRUPT, *TAMPER]:
            results[rnd] = sa.secure_weighted_sum(grid, nodes, None, DIM, round_idx=rnd, **kw)
        results["plain_last"] = plain(20.0)

    return server_app, client_app


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return once_per_session(tmp_path_factory, "secagg-sim", _simulate)  # one simulation for every worker


def _simulate(folder):
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import sys

    import ray.cloudpickle
    from flwr.simulation import run_simulation

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray actors cannot import tests/
    results: dict = {}
    server_app, client_app = _apps(results)
    t0 = time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(WEIGHTS),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    results["wall_s"] = time.time() - t0
    return results


def _exact(results, rnd, pids, scale=1.0, shift=0.0):
    w = np.array([WEIGHTS[p] for p in pids])
    xs = np.stack([client_vector(p, rnd) * scale + shift for p in pids])
    return (w[:, None] * xs).sum(0) / w.sum(), w


def _check(res, results, rnd, pids, scale=1.0, shift=0.0):
    assert res.halted is None and res.mean is not None
    assert sorted(results["pid_of"][n] for n in res.included) == sorted(pids)
    exact, w = _exact(results, rnd, pids, scale, shift)
    q = sa.default_quantization_range(len(WEIGHTS))
    bound = sa.error_bound(w, max_weight=MAX_WEIGHT, clipping_range=CLIP, quantization_range=q,
                           max_abs=XMAX * scale + abs(shift))
    err = float(np.abs(res.mean - exact).max())
    assert err <= bound, (err, bound)
    # the test can see a wrong weighting: the unweighted mean is far outside the bound
    assert float(np.abs(res.mean - np.stack([client_vector(p, rnd) * scale + shift for p in pids]).mean(0)).max()) > 100 * bound
    assert res.total_weight == pytest.approx(w.sum())
    np.testing.assert_allclose(res.weighted_sum, exact * w.sum(), atol=bound * w.sum())
    return err, bound


def test_plain_messages_interleave(sim):
    assert sorted(sim["pid_of"].values()) == [0, 1, 2, 3]
    assert sim["plain_again"] == sim["pid_of"] == sim["plain_last"]


def test_clean_round_matches_weighted_mean(sim):
    err, bound = _check(sim[1], sim, 1, [0, 1, 2, 3], scale=0.5)
    assert sim[1].failures == {}
    assert {sim["pid_of"][n]: m["pid"] for n, m in sim[1].metrics.items()} == {p: p for p in range(4)}
    print(f"clean round: max|err| {err:.2e} <= bound {bound:.2e}; {sim[1].seconds:.2f} s; whole run {sim['wall_s']:.1f} s")


def test_nan_client_drops_out_and_the_rest_is_recovered(sim):
    _check(sim[2], sim, 2, [0, 2, 3])
    (nid, why), = sim[2].failures.items()
    assert sim["pid_of"][nid] == 1 and why.startswith("collect_masked_vectors") and "non-finite" in why


def test_dropout_at_setup_is_forgotten(sim):
    _check(sim[3], sim, 3, [1, 2, 3])
    (nid, why), = sim[3].failures.items()
    assert sim["pid_of"][nid] == 0 and why.startswith("setup")


def test_recorddict_payload_reaches_the_handler_and_state_is_reused(sim):
    _check(sim[4], sim, 4, [0, 1, 2, 3], shift=0.25)


@pytest.mark.parametrize("rnd", sorted(CORRUPT))
def test_a_malformed_reply_is_that_nodes_dropout_not_the_end_of_the_run(sim, rnd):
    """A node whose reply lacks the record Flower's workflow reads, holds a masked vector of another shape, or
    sends a share of a node that is not in the round: the workflow raised (KeyError, IndexError) and the run
    stopped. The reply is now dropped as that node's dropout, which the protocol recovers from: a missing masked
    vector leaves the node out of the mean; a missing unmask reply only its shares of the others."""
    pid, stage, _ = CORRUPT[rnd]
    (nid, why), = sim[rnd].failures.items()
    assert sim["pid_of"][nid] == pid and why.startswith(f"{stage}: a malformed reply")
    _check(sim[rnd], sim, rnd, [p for p in range(4) if p != pid] if stage != "unmask" else [0, 1, 2, 3])


def test_a_node_that_alters_its_share_of_the_weight_total_halts_the_round(sim):
    """Flower divides the unmasked sum by the weight total each client adds its share of: a client that lowers it
    scales the mean (a billion times at a total of 1, a division by zero at 0). The total is checked against the
    weights the clients reported: the round has no mean, and says why."""
    assert sim[9].mean is None and "TamperedWeightTotal" in sim[9].halted and "altered its share" in sim[9].halted
    # a weight a node reports outside (0, max_weight] (a negative one would cancel the others' in the total): refused
    assert sim[10].mean is None and "reported the weight -1000000, outside (0, max_weight = 100]" in sim[10].halted


def test_one_node_halts(sim):
    assert sim[5].mean is None and sim[5].halted


def test_flatten_roundtrip():
    t = {"b": torch.randn(3, 4, dtype=torch.bfloat16), "a": torch.arange(5, dtype=torch.float32),
         "c": np.ones((2, 2), np.float16)}
    vec, spec = sa.flatten_tensors(t)
    assert vec.dtype == np.float64 and vec.size == 12 + 5 + 4 and [s[0] for s in spec] == ["a", "b", "c"]
    back = sa.unflatten_tensors(vec, spec)
    assert back["b"].dtype == torch.bfloat16 and torch.equal(back["b"], t["b"]) and torch.equal(back["a"], t["a"])
    assert back["c"].dtype == np.float16 and np.array_equal(back["c"], t["c"])
    with pytest.raises(ValueError):
        sa.unflatten_tensors(vec[:-1], spec)


def test_reply_refuses_what_the_mod_would_corrupt():
    ins = sa.SecAggInstruction(1, 3, 100.0, 8.0, 2**29, {}, None)
    sa.secagg_reply_content([1.0, 2.0, 3.0], 50.0, ins)
    for vec, w in [([1.0, np.nan, 0.0], 50.0), ([1.0, 2.0], 50.0), ([1.0, 2.0, 3.0], 150.0), ([1.0, 2.0, 3.0], 0.0),
                   ([1.0, 2.0, 17.0], 50.0)]:  # 0.5 * 17 > clipping range 8
        with pytest.raises(ValueError):
            sa.secagg_reply_content(vec, w, ins)
    sa.secagg_reply_content([1.0, 2.0, 17.0], 50.0, ins, allow_clipping=True)
    assert sa.default_quantization_range(4) == 2**29 and sa.default_quantization_range(2) == 2**30


# ------------------------------------------------------------------------------- the methods, from the mean alone
def _method(*sets):
    from fedmoe.algorithms import get_method, model_spec
    from fedmoe.config import load_config

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "lora.rank=2", "data.partition.num_clients=4",
                             "federation.runtime=flower-sim", "federation.secagg.clipping_range=8", *sets])
    method = get_method(cfg.algorithm.name)
    server = method.server(cfg, model_spec(cfg, method))
    g = server.initial_global()
    return cfg, server, g, server.initial_server_state(g)


@pytest.mark.parametrize("sets", [["algorithm.name=fedit"], ["algorithm.name=fedit", "algorithm.server_optimizer.name=fedadam"],
                                  ["algorithm.name=scaffold"]])
def test_secure_aggregate_from_the_mean_equals_the_methods_aggregate(sets):
    """What the server computes from SecAgg+'s weighted mean of the updates (θ_i − θ; SCAFFOLD's Δc_i as sent,
    uniform weights) is the method's own aggregate of the individual replies: FedAvg (n-weighted) with or
    without a server optimizer, SCAFFOLD's x and c."""
    from fedmoe.messages import Message, Reply

    cfg, server, g, state = _method(*sets)
    gen = torch.Generator().manual_seed(0)
    extras = server.reply_extras(g)
    replies = []
    for i in range(3):
        t = {n: v + 0.01 * torch.randn(v.shape, generator=gen) for n, v in g.items()}
        t.update({n: 0.01 * torch.randn(shape, generator=gen) for n, (shape, _) in extras.items()})
        replies.append(Reply(i, Message(t, {"n_train": 5 * (i + 1) ** 2})))
    uniform = sets[0] == "algorithm.name=scaffold"  # SCAFFOLD averages uniformly by default, FedAvg by n_i
    assert server.secagg_weights(cfg) == ("uniform" if uniform else "n")
    w = [1.0 if uniform else float(r.message.scalars["n_train"]) for r in replies]
    names = set(g) | set(extras)
    mean = {n: sum(wi * (r.message.tensors[n].double() - (g[n].double() if n in g else 0)) for wi, r in zip(w, replies))
            / sum(w) for n in names}
    want, want_state, want_metrics = server.aggregate(g, state, replies, round_idx=1)
    got, got_state, got_metrics = server.secure_aggregate(g, state, mean, len(replies), round_idx=1)
    for n in g:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    if "c" in want_state:
        for n in g:
            torch.testing.assert_close(got_state["c"][n], want_state["c"][n], rtol=0, atol=1e-7)
    assert got_metrics.keys() == want_metrics.keys()


@pytest.mark.parametrize("sets,want", [
    (["algorithm.name=flame"], "weighs each expert by the clients' activation counts"),
    (["algorithm.name=fcmoe"], "projects each client's update"),
    (["algorithm.name=hetlora"], "zero-pads, weighs or re-factorises"),
    (["algorithm.name=scaffold", "algorithm.scaffold.weights=n"], "set weights: uniform"),
    (["federation.robust.rule=median"], "federation.robust needs them one by one"),
    (["federation.runtime=local"], "in-process the server is the clients' own process"),
])
def test_secagg_where_it_cannot_work_is_refused(sets, want):
    from fedmoe.config import ConfigError

    with pytest.raises(ConfigError, match=want):
        _method(*sets)


# ------------------------------------------------------------------------------- a fedmoe run with SecAgg+
def test_a_flower_run_with_secagg_gives_the_plain_model_and_no_client_data_leaves(tmp_path):
    """FedIT, 3 clients on Flower's simulation, one round with SecAgg+, answers generated at round 0 and at
    the end, every message recorded at the server's grid. The global model equals the in-process plain run's
    within the quantisation (the clients' training is the same: their losses are equal); no client ever sends
    an array (fedmoe's train reply carries no tensor, SecAgg+'s masked vector travels as integers in its
    config record); no test reference, answer text or category name of any client is in any message
    (eval.share_examples is off) while the per-example scores are; the report says what stayed with the
    clients."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fedmoe.config import load_config
    from fedmoe.data import prepare_federated_data
    from fedmoe.federation import run_federated
    from fedmoe.federation.checkpoint import load_checkpoint

    sets = ["model.name=builtin:tiny-olmoe", "data.max_examples=200", "data.max_length=48",
            "data.partition.num_clients=3", "train.max_steps=2", "train.batch_size=2", "train.lr=0.05",
            "eval.max_examples=2", "eval.max_new_tokens=3", "data.max_test_per_client=3", "lora.rank=4",
            "federation.rounds=1", f"output_dir={tmp_path}"]
    dump = tmp_path / "messages.bin"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, str(Path(__file__).parent / "flower_capture.py"), str(dump), "run", "--runtime",
           "flower-sim", "--quiet", *[x for a in sets + ["name=secure", "federation.secagg.clipping_range=8"]
                                       for x in ("--set", a)]]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the simulation's clients
    try:
        plain = run_federated(load_config(None, sets + ["name=plain"]), log=lambda *a: None)[0]
    finally:
        torch.set_num_threads(before)
    secure = json.loads((tmp_path / "secure" / "summary.json").read_text())
    def train_losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert train_losses("secure") == train_losses("plain")  # the same training, bit for bit
    # the global model differs by the quantisation only (SecAgg+ rounds stochastically: not bit-reproducible)
    assert [c["loss"] for c in secure["clients"]] == pytest.approx([c["loss"] for c in plain["clients"]], rel=1e-6)
    a = load_checkpoint(tmp_path / "secure", log=lambda *a: None).state["global_state"]
    b = load_checkpoint(tmp_path / "plain", log=lambda *a: None).state["global_state"]
    initial = _method("lora.rank=4", "data.partition.num_clients=3")[2]
    moved = max(float((b[n] - initial[n]).abs().max()) for n in b)
    assert moved > 1e-3  # the round changed the model, by far more than the tolerance below
    for n in b:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
    # the ServerApp says which run it is and reports every round (the terminal, Flower's log of the run)
    assert f"run id {secure['run_id']}" in r.stdout and len(secure["run_id"]) == 12
    assert "round 1/1: 3 of 3 sampled clients aggregated, 0 failures, test loss " in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert [r["secagg_clients"] for r in rows if r["kind"] == "server"] == [[0, 1, 2]]

    index = [json.loads(x) for x in Path(f"{dump}.jsonl").read_text().splitlines()]
    from_clients = [m for m in index if m["direction"] == "from-client"]
    assert sum(m["type"] == "train" and "fitres.parameters" in m["records"] for m in from_clients) == 3
    assert not [m for m in from_clients if any(m["records"].values())], "a client sent an array"
    assert any(any(m["records"].values()) for m in index if m["direction"] == "to-client")  # the capture sees arrays

    sent = dump.read_bytes()
    assert b"[evaluate info]" in sent and b'"scores": [' in sent  # the capture sees the evaluation replies
    data = prepare_federated_data(load_config(None, sets).data, 0)
    secrets = {s for c in data.clients for ex in c.test for s in (ex.output, ex.instruction, ex.input) if s and len(s) >= 12}
    secrets |= {ex.category for c in data.clients for ex in c.test + c.train if ex.category}
    assert len(secrets) > 5
    for s in sorted(secrets):
        for form in {s.encode(), json.dumps(s)[1:-1].encode()}:
            assert form not in sent, f"{s!r} left a client"
    assert all(c["examples"] == [] and c["category_counts"] is None for c in secure["clients"])
    assert plain["clients"][0]["examples"] and plain["clients"][0]["category_counts"]  # in-process keeps them
    assert secure["global"]["rouge_l"] is not None and secure["global"]["rouge_l_by_category"] is None
    assert secure["withheld_by_clients"]["sample answers with their references"] == [0, 1, 2]
    assert "## What stayed on the clients" in (tmp_path / "secure" / "report.md").read_text()
