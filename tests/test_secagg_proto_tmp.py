"""SecAgg+ for fedmoe's own loop (fedmoe.federation.flower.secagg) on Flower's simulation: a plain
message exchange and SecAgg+ rounds interleave on one grid; the unmasked mean equals the exact
weighted mean within the derived quantisation bound; a NaN client, a client failing in train, a
client dropping out at setup and a one-node round are handled; payloads reach the train handler."""

import os
import time

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedmoe.federation.flower import secagg as sa

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


def _apps(results: dict):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    client_app, server_app = ClientApp(), ServerApp()

    @client_app.train(mods=[_drop_at_setup, sa.secaggplus_mod_if_marked])
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
        results["plain_last"] = plain(20.0)

    return server_app, client_app


@pytest.fixture(scope="module")
def sim():
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
