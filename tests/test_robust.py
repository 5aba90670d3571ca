"""Robust aggregation (federation.robust): the rules equal Flower's FedMedian / FedTrimmedAvg / (multi-)Krum
aggregates on the same client models; norm bounding; one poisoning client moves the global model far under
FedAvg and little under each robust rule, in the aggregation and in a run."""

import numpy as np
import pytest
import torch

from fedmoe.algorithms import get_method, model_spec
from fedmoe.config import ConfigError, load_config
from fedmoe.messages import Message, Reply

from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

BASE = ["model.name=builtin:tiny-olmoe", "lora.rank=2", "data.partition.num_clients=5"]


def _server(*sets):
    cfg = load_config(None, BASE + list(sets))
    method = get_method(cfg.algorithm.name)
    server = method.server(cfg, model_spec(cfg, method))
    g = server.initial_global()
    return cfg, server, g, server.initial_server_state(g)


def _replies(g, n=5, seed=0, poison=None, scale=0.01):
    """n clients' models θ + N(0, scale²) (float32, as sent), n_i = 10·(i+1); ``poison``: that client sends θ + 50."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = {k: (v + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in g.items()}
        if i == poison:
            t = {k: v + 50.0 for k, v in g.items()}
        out.append(Reply(i, Message(t, {"n_train": 10 * (i + 1)})))
    return out


def _aggregate(cfg, server, g, state, replies):
    from fedmoe.federation.robust import robust_aggregate

    return robust_aggregate(server, cfg, g, state, replies, 1)


def _flower(fn, g, replies, *args):
    names = list(g)
    results = [([r.message.tensors[n].double().numpy() for n in names], int(r.message.scalars["n_train"]))
               for r in replies]
    return dict(zip(names, fn(results, *args)))


@pytest.mark.parametrize("rule,reference", [
    ("median", lambda g, rs: _flower(aggregate_median, g, rs)),
    ("trimmed_mean", lambda g, rs: _flower(aggregate_trimmed_avg, g, rs, 0.2)),
    ("krum", lambda g, rs: _flower(aggregate_krum, g, rs, 1, 0)),
])
def test_each_rule_is_flowers_aggregate(rule, reference):
    """Odd (5, 7) and even (4, 6) client counts (the median of an even count is the mean of the two middle values);
    the global model is θ + the statistic of the updates, which equals the statistic of the models. (The trimmed mean
    at trim 0.2 and Krum at f = 1 bound a poisoned update over 5 or more only: test below.)"""
    for n in ((5, 4) if rule == "median" else (7, 6)):
        cfg, server, g, state = _server(f"federation.robust.rule={rule}", "federation.robust.trim=0.2",
                                        "federation.robust.krum_malicious=1")
        replies = _replies(g, n=n, seed=n)
        new, _, metrics = _aggregate(cfg, server, g, state, replies)
        want = reference(g, replies)
        for name in g:
            assert new[name].dtype == g[name].dtype
            np.testing.assert_allclose(new[name].double().numpy(), want[name], rtol=0, atol=2e-7)
        assert metrics["robust_rule"] == rule


def test_multi_krum_is_flowers_n_weighted_mean_of_the_best():
    cfg, server, g, state = _server("federation.robust.rule=krum", "federation.robust.krum_keep=3")
    replies = _replies(g, poison=2)
    new, _, metrics = _aggregate(cfg, server, g, state, replies)
    want = _flower(aggregate_krum, g, replies, 1, 3)
    for name in g:
        np.testing.assert_allclose(new[name].double().numpy(), want[name], rtol=0, atol=2e-7)
    assert 2 not in metrics["krum_selected"] and len(metrics["krum_selected"]) == 3


def test_norm_bounding_scales_each_update_then_the_methods_mean():
    """rule mean with norm_bound B: FedAvg (n-weighted) of θ + Δ_i·min(1, B/‖Δ_i‖), by hand."""
    cfg, server, g, state = _server("federation.robust.rule=mean", "federation.robust.norm_bound=0.05")
    replies = _replies(g, poison=4)
    new, _, metrics = _aggregate(cfg, server, g, state, replies)
    weights = [10.0 * (i + 1) for i in range(5)]
    deltas = []
    for r in replies:
        d = {n: r.message.tensors[n].double() - g[n].double() for n in g}
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in d.values())))
        deltas.append({n: v * min(1.0, 0.05 / norm) for n, v in d.items()})
    for name in g:
        want = g[name].double() + sum(w * d[name] for w, d in zip(weights, deltas)) / sum(weights)
        torch.testing.assert_close(new[name].double(), want, rtol=0, atol=1e-6)
    assert metrics["robust_bounded_fraction"] == 1.0  # every update is longer than 0.05


def _distance(new, honest):
    return float(torch.sqrt(sum(((new[n].double() - honest[n].double()) ** 2).sum() for n in new)))


def test_one_poisoning_client_moves_fedavg_far_and_the_robust_rules_little():
    """Four honest clients, one sending θ + 50: FedAvg's global model lands ~16 (the poisoner's weight 50/150
    times 50 per coordinate, over many coordinates) from the honest clients' mean; the median, trimmed mean,
    Krum (which picks an honest client) and norm bounding stay within the honest clients' own spread."""
    cfg, server, g, state = _server()
    replies = _replies(g, poison=4)
    honest, _, _ = server.aggregate(g, state, replies[:4], round_idx=1)
    fedavg, _, _ = server.aggregate(g, state, replies, round_idx=1)
    spread = max(_distance(r.message.tensors, honest) for r in replies[:4])  # the farthest honest client
    assert _distance(fedavg, honest) > 1000 * spread
    for sets in (["federation.robust.rule=median"], ["federation.robust.rule=trimmed_mean"],
                 ["federation.robust.rule=krum"],
                 ["federation.robust.rule=mean", "federation.robust.norm_bound=1.0"]):
        cfg, server, g, state = _server(*sets)
        new, _, _ = _aggregate(cfg, server, g, state, replies)
        assert _distance(new, honest) <= spread, sets


@pytest.mark.parametrize("sets,want", [
    (["algorithm.name=scaffold", "federation.robust.rule=median"], "federation.robust replaces a weighted mean.*"
                                                                     "control-variate changes"),
    (["algorithm.name=trivial", "federation.robust.rule=median"], "re-factorises each client's rank-r_i factors"),
    (["federation.robust.rule=median", "federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1"],
     "federation.robust and federation.dp together"),
    (["federation.robust.rule=krum", "federation.robust.krum_malicious=2"], r"at least 2f \+ 3 = 7 clients"),
    (["federation.robust.rule=krum", "federation.robust.krum_keep=6"], "krum_keep = 6 is more than the 5"),
    (["federation.robust.trim=0.5"], "trim"),
])
def test_robust_settings_that_cannot_work_are_refused(sets, want):
    with pytest.raises(ConfigError, match=want):
        load_config(None, BASE + sets)


def test_a_poisoning_client_in_a_run(tmp_path):
    """In-process FedIT, 3 clients, client 2 adds 3 to every value it sends: the final global model of the
    plain run is far from the honest run's (FedAvg: ~1 per coordinate), the coordinate-wise median's stays
    within the honest clients' own differences; the server row names the rule."""
    import json

    from fedmoe.federation.checkpoint import load_checkpoint
    from fedmoe.federation.local import LocalTransport

    from test_hostile_input import _run_through

    class Poisoner(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            reply, report = replies[2]
            sent = messages[2].tensors
            reply.tensors.update({n: t + 3.0 for n, t in reply.tensors.items() if n in sent})
            return replies, failures

    common = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32",
              "data.partition.num_clients=3", "train.max_steps=2", "train.batch_size=2", "lora.rank=2",
              "train.lr=0.01", "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=2",
              "eval.loss_every_round=false", "federation.rounds=1", f"output_dir={tmp_path}"]
    runs = {"honest": ([], LocalTransport), "fedavg": ([], Poisoner), "median": (["federation.robust.rule=median"], Poisoner)}
    final = {}
    for name, (sets, transport) in runs.items():
        _run_through(load_config(None, common + sets + [f"name={name}"]), transport)
        final[name] = load_checkpoint(tmp_path / name, log=lambda *a: None).state["global_state"]
    far, near = _distance(final["fedavg"], final["honest"]), _distance(final["median"], final["honest"])
    assert far > 50 * near, (far, near)  # ~100x here (the honest clients' spread sets near); a mean would give ~1x
    rows = [json.loads(x) for x in (tmp_path / "median" / "metrics.jsonl").read_text().splitlines()]
    assert [r["robust_rule"] for r in rows if r["kind"] == "server"] == ["median"]



@pytest.mark.parametrize("rule,sets,enough", [("median", [], 3), ("trimmed_mean", ["federation.robust.trim=0.2"], 5),
                                              ("trimmed_mean", ["federation.robust.trim=0.1"], 10),
                                              ("krum", ["federation.robust.krum_malicious=1"], 5)])
def test_a_rule_that_would_be_the_plain_mean_is_refused(rule, sets, enough):
    """With fewer updates than the rule needs it bounds nothing (the trimmed mean at ⌊trim·n⌋ = 0 is the mean: one
    client scaling its update by 1e3 moved the model 500x as far as the honest mean). Refused in the config where too
    few are sampled, and at a round where too few replied (dropouts)."""
    from fedmoe.federation.robust import TooFewForTheRule

    with pytest.raises(ConfigError, match=rf"federation.robust.rule = {rule}.* at least .*{enough} clients"):
        load_config(None, [f"federation.robust.rule={rule}", *sets, f"data.partition.num_clients={enough - 1}"])
    cfg, server, g, state = _server(f"federation.robust.rule={rule}", *sets, f"data.partition.num_clients={enough}")
    with pytest.raises(TooFewForTheRule, match=rf"{enough - 1} clients replied, .*only over at least {enough}"):
        _aggregate(cfg, server, g, state, _replies(g, n=enough - 1, seed=0))
    _aggregate(cfg, server, g, state, _replies(g, n=enough, seed=0))  # enough: aggregated
