"""Client-level differential privacy (federation.dp, DP-FedAvg): every client's update is clipped to
norm C, the sum gets Gaussian noise of std σC and is divided by the number of sampled clients, and the
accountant's ε is dp-accounting's (the library Flower's own accountant wraps)."""

import math

import numpy as np
import pytest
import torch

from helpers import reply

from fedmoe.algorithms import METHODS, ModelSpec, get_method, model_spec
from fedmoe.config import ConfigError, load_config
from fedmoe.federation import run_federated
from fedmoe.federation.dp import clip_update, epsilon, private_aggregate, update_norm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "train.max_steps=1",
        "train.batch_size=2", "eval.rouge=false", "eval.batch_size=8", "data.max_test_per_client=4", "lora.rank=2",
        "data.partition.num_clients=2", "eval.zero_shot=false"]


def _dp_cfg(clip, sigma, *extra):
    return load_config(None, [f"federation.dp.clip_norm={clip}", f"federation.dp.noise_multiplier={sigma}", *extra])


def _server(cfg, state):
    return METHODS[cfg.algorithm.name].server(cfg, ModelSpec(None, state, 0, 0, {}))


# ---------------------------------------------------------------------------- clipping
def test_clipping_bounds_every_clients_contribution():
    gen = torch.Generator().manual_seed(0)
    C = 0.5
    for scale in (0.0, 0.1, 1.0, 10.0, 1e6):
        update = {"a": torch.randn(7, 3, generator=gen) * scale, "b": torch.randn(5, generator=gen) * scale}
        clipped, norm = clip_update(update, C)
        assert norm == pytest.approx(update_norm(update))
        after = update_norm(clipped)
        assert after <= C * (1 + 1e-12)
        if norm > C:  # scaled onto the sphere of radius C, direction kept
            assert after == pytest.approx(C, rel=1e-12)
            assert torch.allclose(clipped["a"] * norm / C, update["a"].double())
        else:  # untouched (the zero update too)
            assert all(torch.equal(clipped[n], update[n].double()) for n in update)
    # through the aggregation: one client at a time, no noise, denominator 1 -> its contribution
    cfg = _dp_cfg(C, 0)
    theta = {"a": torch.randn(7, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    for scale in (0.01, 3.0, 1e4):
        client = {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in theta.items()}
        new, _, metrics = private_aggregate(_server(cfg, theta), cfg, theta, {}, [reply(0, client, n=100)], 1, 1)
        contribution = update_norm({n: new[n].double() - theta[n].double() for n in theta})
        assert contribution <= C * (1 + 1e-6)  # float32 global state
        assert metrics["dp_clipped_fraction"] == (1.0 if scale > 0.01 else 0.0)
    # the weights n_i play no part: uniform weights over the sampled clients (fixed denominator)
    zero = {n: torch.zeros_like(t) for n, t in theta.items()}
    big = {n: torch.full_like(t, 10.0) for n, t in theta.items()}
    new, _, _ = private_aggregate(_server(cfg, zero), cfg, zero, {}, [reply(0, big, n=1), reply(1, zero, n=1000)], 4, 1)
    assert update_norm(new) == pytest.approx(C / 4, rel=1e-6)


def test_clipping_equals_flowers_server_side_clipping():
    np = pytest.importorskip("numpy")
    dp_helpers = pytest.importorskip("flwr.supercore.differential_privacy")
    gen = torch.Generator().manual_seed(1)
    theta = {"a": torch.randn(4, 6, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    client = {n: t + 2.0 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in theta.items()}
    ours, _ = clip_update({n: client[n] - theta[n] for n in theta}, 0.7)
    flower = [client[n].numpy().copy() for n in theta]
    dp_helpers.compute_clip_model_update(flower, [theta[n].numpy() for n in theta], 0.7)
    for (n, t), f in zip(theta.items(), flower):
        np.testing.assert_allclose((t + ours[n]).numpy(), f, rtol=1e-12, atol=1e-12)


def test_flame_weights_depend_on_the_clients_own_counts_and_stay_in_0_1():
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]",
                             "federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1", "lora.rank=2"])
    spec = model_spec(cfg, get_method("flame"))
    server = get_method("flame").server(cfg, spec)
    L, E = spec.num_moe_layers, spec.num_experts
    counts = torch.zeros(L, E, dtype=torch.long)
    counts[:, 0], counts[:, 1], counts[:, 2] = 30, 15, 5  # expert 3.. never routed to
    tokens = torch.full((L,), 25, dtype=torch.long)
    r = reply(0, {"activation_counts": counts, "tokens_per_layer": tokens}, n=10)
    weights = server.dp_weights(spec.initial, r)
    assert weights and set(weights) <= set(spec.initial)
    for w in weights.values():  # t = 2: (f / max f)^2
        assert torch.allclose(w[:4], torch.tensor([1.0, 0.25, 1 / 36, 0.0], dtype=torch.float64))
        assert ((w >= 0) & (w <= 1)).all()


# ---------------------------------------------------------------------------- noise
def test_the_noise_has_the_stated_scale():
    C, sigma, m = 0.3, 1.2, 4
    cfg = _dp_cfg(C, sigma)
    theta = {"w": torch.zeros(400, 500)}
    zero_updates = [reply(i, {"w": torch.zeros(400, 500)}, n=1) for i in range(3)]  # 3 of m = 4 replied
    new, _, metrics = private_aggregate(_server(cfg, theta), cfg, theta, {}, zero_updates, m, 1)
    stated = sigma * C / m  # Flower's compute_stdv(σ, C, m): N(0, (σC)²) on the sum, / m
    assert metrics["dp_noise_std"] == pytest.approx(stated)
    assert float(new["w"].double().std()) == pytest.approx(stated, rel=0.02)
    assert abs(float(new["w"].double().mean())) < 5 * stated / math.sqrt(new["w"].numel())
    flower = pytest.importorskip("flwr.supercore.differential_privacy")
    assert flower.compute_stdv(sigma, C, m) == pytest.approx(stated)
    # secret by default: every SuperNode has the config and its seed, and a noise drawn from it could be rebuilt
    # and subtracted from the released model (3700 times the update's norm came off to 6e-8); the same round drawn
    # again gets other noise
    again, _, _ = private_aggregate(_server(cfg, theta), cfg, theta, {}, zero_updates, m, 1)
    assert not torch.equal(again["w"], new["w"])
    assert float(again["w"].double().std()) == pytest.approx(stated, rel=0.02)
    # server_noise: seeded (simulations whose numbers must repeat): the same round the same noise, another other
    seeded = _dp_cfg(C, sigma, "federation.dp.server_noise=seeded")
    one, _, _ = private_aggregate(_server(seeded, theta), seeded, theta, {}, zero_updates, m, 1)
    again, _, _ = private_aggregate(_server(seeded, theta), seeded, theta, {}, zero_updates, m, 1)
    other, _, _ = private_aggregate(_server(seeded, theta), seeded, theta, {}, zero_updates, m, 2)
    assert torch.equal(again["w"], one["w"]) and not torch.equal(other["w"], one["w"])
    assert float(one["w"].double().std()) == pytest.approx(stated, rel=0.02)


def test_each_sides_noise_key_is_refused_on_the_other_side():
    """client_noise: secret under where: server did nothing (the server's noise was seeded whatever it said)."""
    from fedmoe.config import ConfigError

    with pytest.raises(ConfigError, match="federation.dp.client_noise = seeded is the noise of where: client, but "
                                          "federation.dp.where is server: set federation.dp.server_noise instead"):
        _dp_cfg(1, 1, "federation.dp.client_noise=seeded")
    with pytest.raises(ConfigError, match="server_noise = seeded is the noise of where: server"):
        _dp_cfg(1, 1, "federation.dp.where=client", "federation.dp.server_noise=seeded")


# ---------------------------------------------------------------------------- accounting
def test_epsilon_matches_the_librarys_documented_example():
    """dp-accounting's test_compute_epsilon_delta_gaussian: q = 1, σ = 4.530877117, 1 step is exactly
    (1, 1e-6)-DP."""
    assert epsilon(4.530877117, 1, 1e-6) == pytest.approx(1.0, abs=1e-5)
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 3, 1e-5) == math.inf
    eps = [epsilon(1.0, r, 1e-5) for r in (1, 2, 3, 10)]
    assert eps == sorted(eps) and len(set(eps)) == 4


def test_epsilon_equals_flowers_accountant():
    pytest.importorskip("flwr")
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    for sigma, rounds, delta in ((1.0, 3, 1e-5), (0.7, 20, 1e-6)):
        acc = RdpAccountant(PrivacyConfig(delta, 4, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          SamplingMethod.NO_AMPLIFICATION))
        acc.compose(GaussianPrivacyEvent(sigma, 4, 4), rounds)
        assert epsilon(sigma, rounds, delta) == pytest.approx(acc.get_privacy_spent().epsilon, rel=1e-12)


# ---------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", ["scaffold", "hetlora", "flexlora", "trivial", "fcmoe"])
def test_methods_whose_aggregation_is_not_a_sum_of_updates_refuse_dp(name):
    with pytest.raises(ConfigError, match=rf"federation.dp .*but {name} .*remove federation.dp"):
        _dp_cfg(1.0, 1.0, f"algorithm.name={name}")


@pytest.mark.parametrize("name", ["scaffold", "hetlora", "flexlora", "trivial", "local_only"])
def test_methods_whose_replies_local_dp_cannot_cover_refuse_it(name):
    with pytest.raises(ConfigError, match=rf"federation.dp with where: client .* does not suit {name}, which "
                                          r".*; remove federation.dp"):
        _dp_cfg(1.0, 1.0, f"algorithm.name={name}", "federation.dp.where=client")


def test_fcmoe_takes_local_dp_where_its_counts_are_sent_or_not_read():
    """FC-MoE under local DP: its aggregation is post-processing of the noised updates, so it takes it, except
    where its importance reads the activation counts the clients withhold."""
    with pytest.raises(ConfigError, match=r"does not suit fcmoe, which weighs each expert by the clients' "
                                          r"activation counts \(importance: n_f_norm\).*otherwise remove federation.dp"):
        _dp_cfg(1.0, 1.0, "algorithm.name=fcmoe", "federation.dp.where=client")
    for extra in (["algorithm.fcmoe.importance=n"], ["federation.dp.reports=send"],
                  ["federation.dp.reports=send", "algorithm.fcmoe.importance=n_f_t"]):
        assert _dp_cfg(1.0, 1.0, "algorithm.name=fcmoe", "federation.dp.where=client", *extra).federation.dp


@pytest.mark.parametrize("name", ["fedit", "flame", "flex"])
def test_methods_whose_aggregation_is_a_sum_of_updates_accept_dp(name):
    assert _dp_cfg(1.0, 1.0, f"algorithm.name={name}").federation.dp.clip_norm == 1.0
    with pytest.raises(ConfigError, match="clip_norm"):
        load_config(None, [f"algorithm.name={name}", "federation.dp.noise_multiplier=1"])


# ---------------------------------------------------------------------------- real runs
def test_a_tiny_run_with_dp_reports_epsilon_per_round(tmp_path):
    sigma, delta = 0.8, 1e-4
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=dp", "federation.rounds=2",
                                    "federation.dp.clip_norm=0.01", f"federation.dp.noise_multiplier={sigma}",
                                    f"federation.dp.delta={delta}", "algorithm.server_optimizer.name=fedadam"])
    summary, rd = run_federated(cfg, log=lambda *a: None)
    rows = [r for r in rd.read_metrics() if r["kind"] == "server"]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dp_epsilon"] == pytest.approx(epsilon(sigma, r["round"], delta)) and r["dp_delta"] == delta
        assert r["dp_noise_std"] == pytest.approx(sigma * 0.01 / 2)
        assert r["dp_clipped_fraction"] == 1.0  # C = 0.01 is below any real update's norm
    assert rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] < math.inf
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(rows[-1]["dp_epsilon"]) and p["delta"] == delta and p["rounds"] == 2
    assert p["clients_per_round"] == 2
    report = rd.report_path.read_text()
    assert "## Differential privacy (client level)" in report and f"{p['epsilon']:.3f}" in report


def test_flame_under_dp_is_the_clipped_weighted_sum_by_hand(tmp_path):
    """No noise (σ = 0): the new global state is θ + Σ_i w_i ⊙ clip(Δ_i) / m, w from each client's own counts."""
    C = 0.05
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=flame", "federation.rounds=2",
                                    "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]",
                                    f"federation.dp.clip_norm={C}", "federation.dp.noise_multiplier=0"])
    seen, sent = {}, {}

    def observe(kind, cid, msg):
        if kind == "downlink":
            sent[(msg.header["round"], cid)] = {n: t.clone() for n, t in msg.tensors.items()}
        if kind == "reply" and msg.header["round"] == 1:
            seen[cid] = {n: t.clone() for n, t in msg.tensors.items()}

    summary, rd = run_federated(cfg, observe=observe, log=lambda *a: None)
    assert summary["privacy"]["epsilon"] == math.inf  # no noise: no privacy, said so
    theta, after = sent[(1, 0)], sent[(2, 0)]
    layer_of = model_spec(cfg, METHODS["flame"]).inventory.expert_layers()
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in theta.items()}
    for cid, r in seen.items():
        delta = {n: r[n].double() - theta[n].double() for n in theta}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        s = min(1.0, C / norm)
        for n in theta:
            w = 1.0
            if n in layer_of:
                f = r["activation_counts"][layer_of[n]].double() / int(r["tokens_per_layer"][layer_of[n]])
                w = ((f / f.max()) ** 2).reshape(-1, *([1] * (delta[n].dim() - 1)))
            total[n] += w * delta[n] * s
    assert layer_of
    for n in theta:
        torch.testing.assert_close(after[n].double(), theta[n].double() + total[n] / 2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- local DP (where: client)
def test_a_client_clips_its_update_and_adds_the_noise_itself():
    """privatize_reply: σ = 0 gives θ + Δ·min(1, C/‖Δ‖) over the sent tensors together (a tensor not sent —
    FLAME's counts — is left as it is); σ > 0 adds N(0, σ²C²) per value, drawn from the operating system for
    each release (the same update released twice gets other noise: the two would otherwise give away the
    difference of two updates) or, seeded, from the run's seed (the same noise again)."""
    from fedmoe.federation.dp import privatize_reply
    from fedmoe.messages import Message

    gen = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(300, 40, generator=gen), "b": torch.randn(500, generator=gen)}
    sent = Message(dict(theta))
    reply = Message({n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in theta.items()} |
                    {"activation_counts": torch.ones(2, 4, dtype=torch.long)}, {"n_train": 7})
    delta = {n: reply.tensors[n].double() - theta[n].double() for n in theta}
    norm = update_norm(delta)
    C = norm / 4
    cfg = load_config(None, [f"federation.dp.clip_norm={C}", "federation.dp.noise_multiplier=0",
                             "federation.dp.where=client", "federation.dp.reports=send"])
    out, got_norm = privatize_reply(cfg, reply, sent, 0, 1)
    assert got_norm == pytest.approx(norm)
    for n in theta:
        torch.testing.assert_close(out.tensors[n].double(), theta[n].double() + delta[n] / 4, rtol=0, atol=1e-6)
    assert torch.equal(out.tensors["activation_counts"], reply.tensors["activation_counts"])
    assert out.scalars == {"n_train": 7}
    # withheld reports (the default): only the tensors it was sent, n_train = 1; the method's weights (one per
    # row of "a") multiply the clipped update before the noise
    cfg = load_config(None, [f"federation.dp.clip_norm={C}", "federation.dp.noise_multiplier=0",
                             "federation.dp.where=client"])
    assert cfg.federation.dp.reports == "withhold"
    w = torch.rand(300, generator=gen, dtype=torch.float64)
    out, _ = privatize_reply(cfg, reply, sent, 0, 1, {"a": w})
    assert set(out.tensors) == set(theta) and out.scalars == {"n_train": 1}
    torch.testing.assert_close(out.tensors["a"].double(), theta["a"].double() + w[:, None] * delta["a"] / 4,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out.tensors["b"].double(), theta["b"].double() + delta["b"] / 4, rtol=0, atol=1e-6)
    # a diverged update (NaN would never be clipped, inf turns into NaN) sends nothing of itself: θ + the noise
    for bad in (math.nan, math.inf):
        broken = Message({**reply.tensors, "a": reply.tensors["a"].clone()}, reply.scalars)
        broken.tensors["a"][0, 0] = bad
        out, got_norm = privatize_reply(cfg, broken, sent, 0, 1)
        assert not math.isfinite(got_norm)
        assert all(torch.equal(out.tensors[n], theta[n]) for n in theta)

    def noise(noise_kind, client=0):
        c = load_config(None, [f"federation.dp.clip_norm={C}", "federation.dp.noise_multiplier=2",
                               "federation.dp.where=client", f"federation.dp.client_noise={noise_kind}"])
        o, _ = privatize_reply(c, reply, sent, client, 1)
        return torch.cat([(o.tensors[n].double() - theta[n].double() - delta[n] / 4).reshape(-1) for n in theta])

    z = noise("secret")
    assert float(z.std()) == pytest.approx(2 * C, rel=0.05)
    assert not torch.allclose(z, noise("secret"))  # the same round and client again: new noise
    assert torch.equal(noise("seeded"), noise("seeded"))
    assert not torch.allclose(noise("seeded"), noise("seeded", client=1))


def test_secret_noise_is_drawn_from_the_operating_systems_bytes_alone(monkeypatch):
    """client_noise: secret: every noise value is Box–Muller of fresh os.urandom bytes, by hand — no seed behind it
    (torch's generator keeps 32 bits of a seed: 2^32 noise streams a server could try against a release and
    subtract): the radius's uniform in (0, 1) from a word of leading bits (its binade) and 52 bits of mantissa, the
    angle's from 53 bits. A release is the clipped update plus σC times exactly those values. The real draws are
    standard normal (moments and a Kolmogorov–Smirnov test)."""
    import os
    import struct

    from fedmoe.federation.dp import privatize_reply, secret_normal
    from fedmoe.messages import Message

    stream = bytes(range(256)) * 4
    asked = []

    def fake_urandom(n):
        asked.append(n)
        return stream[:n]

    monkeypatch.setattr(os, "urandom", fake_urandom)
    z = secret_normal((5,))
    assert asked == [24, 24, 24]  # 3 pairs: the radius's leading word and mantissa, the angle, 8 bytes each
    w = struct.unpack("<3Q", stream[:24])
    u = [math.ldexp(1 + (x >> 12) * 2.0 ** -52, -(64 - x.bit_length() + 1)) for x in w]
    want = [math.sqrt(-2 * math.log(u[i])) * f(2 * math.pi * (w[i] >> 11) * 2.0 ** -53)
            for f in (math.cos, math.sin) for i in range(3)]
    assert z.dtype == torch.float64 and z.tolist() == pytest.approx(want[:5], rel=1e-12)
    # a release: the clipped update plus σC times the values those bytes give, nothing else (no seeded stream)
    noise = secret_normal((7, 3))
    theta = {"a": torch.zeros(7, 3)}
    cfg = load_config(None, ["federation.dp.clip_norm=10", "federation.dp.noise_multiplier=3", "federation.dp.where=client"])
    out, _ = privatize_reply(cfg, Message({"a": torch.full((7, 3), 0.5)}), Message(dict(theta)), 0, 1)
    assert torch.allclose(out.tensors["a"].double(), 0.5 + 30 * noise, rtol=1e-6)
    monkeypatch.undo()
    n = 400_001
    z = secret_normal((n,))
    assert z.shape == (n,) and abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, abs=0.01)
    # Kolmogorov–Smirnov against Φ: the largest gap between the empirical and the normal CDF, below its critical
    # value at α = 1e-4, sqrt(ln(2/α) / 2) / sqrt(n)
    cdf = torch.special.ndtr(z.sort().values)
    gap = max(float((torch.arange(1, n + 1) / n - cdf).max()), float((cdf - torch.arange(n) / n).max()))
    assert gap < math.sqrt(math.log(2 / 1e-4) / 2) / math.sqrt(n)
    assert not torch.equal(secret_normal((8,)), secret_normal((8,)))


def test_secret_noise_has_the_gaussians_tail(monkeypatch):
    """From a 53-bit uniform the radius could not pass √(106 ln 2) = 8.57: a Gaussian cut off there, whose missing
    tail is a δ the accounting leaves out (2.4e-6 per release at σ = 0.5). The radius's uniform has every float's
    share: a leading word of 1 (63 zero bits) puts it in [2^-64, 2^-63), one all-zero word and then 1 in
    [2^-128, 2^-127)."""
    import os
    import struct

    from fedmoe.federation.dp import secret_normal

    for words, k in (([1], 63), ([0, 1], 127)):
        calls = iter([struct.pack("<Q", x) for x in words] + [bytes(8), bytes(8)])  # then mantissa 0, angle 0
        monkeypatch.setattr(os, "urandom", lambda n: next(calls))
        z = secret_normal((2,))
        assert z.tolist() == pytest.approx([math.sqrt(2 * (k + 1) * math.log(2)), 0.0], abs=1e-12)
        assert z[0] > 9.3


def test_a_run_with_local_dp(tmp_path):
    """FedIT, where: client, reports: send, σ = 1: every reply the server receives is θ + a clipped update + noise of std σC per
    value (its distance to θ is ≈ √d·σC, far beyond C); the global model is the method's own n-weighted mean of
    those replies; ε per client is dp-accounting's for σ/2 over the rounds it trained in. Two runs of the same
    config differ (each client's noise comes from its own secret); with client_noise: seeded they repeat."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    C, sigma, delta = 0.01, 1.0, 1e-4

    def run(name, *extra):
        cfg = load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", "federation.rounds=2",
                                        f"federation.dp.clip_norm={C}", f"federation.dp.noise_multiplier={sigma}",
                                        f"federation.dp.delta={delta}", "federation.dp.where=client",
                                        "federation.dp.reports=send", *extra])
        sent, seen, observe = _recorder()
        summary, rd = run_federated(cfg, observe=observe, log=lambda *a: None)
        return summary, rd, sent, seen

    summary, rd, sent, seen = run("secret")
    theta = sent[(1, 0)]
    d = sum(t.numel() for t in theta.values())
    for cid in (0, 1):
        dist = update_norm({n: seen[(1, cid)].tensors[n].double() - theta[n].double() for n in theta})
        assert dist == pytest.approx(math.sqrt(d) * sigma * C, rel=0.05)
    n = [float(seen[(1, c)].scalars["n_train"]) for c in (0, 1)]
    for name in theta:
        want = sum(w * seen[(1, c)].tensors[name].double() for w, c in zip(n, (0, 1))) / sum(n)
        torch.testing.assert_close(sent[(2, 0)][name].double(), want, rtol=0, atol=1e-6)
    acc = RdpAccountant()
    acc.compose(GaussianDpEvent(sigma / 2), 2)
    p = summary["privacy"]
    assert p["where"] == "client" and p["epsilon_by_client"] == {0: pytest.approx(acc.get_epsilon(delta))} | {
        1: pytest.approx(acc.get_epsilon(delta))}
    assert "## Differential privacy (local, on each client)" in rd.report_path.read_text()
    again = run("secret-again")[3]
    assert not torch.equal(again[(1, 0)].tensors[next(iter(theta))], seen[(1, 0)].tensors[next(iter(theta))])
    s1, s2 = run("seeded", "federation.dp.client_noise=seeded")[3], run("seeded-2", "federation.dp.client_noise=seeded")[3]
    assert all(torch.equal(s1[(1, 0)].tensors[k], s2[(1, 0)].tensors[k]) for k in theta)


def _recorder():
    """(downlinks by (round, client), replies by (round, client), the observe hook that fills them)."""
    sent, seen = {}, {}

    def observe(kind, cid, msg):
        if kind == "downlink":
            sent[(msg.header["round"], cid)] = {n: t.clone() for n, t in msg.tensors.items()}
        if kind == "reply":
            seen[(msg.header["round"], cid)] = msg
    return sent, seen, observe


def _local_run(tmp_path, name, *sets, observe=None):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *sets])
    return run_federated(cfg, observe=observe, log=lambda *a: None)


def test_withheld_reports_leave_only_the_noised_update_and_weigh_every_client_alike(tmp_path):
    """FedIT, where: client (reports: withhold, the default), σ = 1: a reply holds the global tensors and
    n_train = 1, nothing else; the global model is θ + the plain mean of the replies' updates (not n-weighted:
    the two clients' n differ); the training rows, the summary and the report hold no training loss, token
    count, expert count or data size of a client, and say what was withheld and what ε does not cover."""
    sent, seen, observe = _recorder()

    dp = ["federation.dp.clip_norm=0.01", "federation.dp.noise_multiplier=1", "federation.dp.where=client",
          "federation.rounds=2", "data.partition.scheme=pathological"]
    summary, rd = _local_run(tmp_path, "withheld", *dp, observe=observe)
    theta = sent[(1, 0)]
    for (rnd, cid), msg in seen.items():
        assert set(msg.tensors) == set(theta) and msg.scalars == {"n_train": 1}
    n = [c["n_train"] for c in _local_run(tmp_path, "plain", "federation.rounds=1",
                                          "data.partition.scheme=pathological")[0]["clients"]]
    assert n[0] != n[1]  # an n-weighted mean would differ from the plain one
    for name in theta:
        want = theta[name].double() + sum(seen[(1, c)].tensors[name].double() - theta[name].double() for c in (0, 1)) / 2
        torch.testing.assert_close(sent[(2, 0)][name].double(), want, rtol=0, atol=1e-6)
    rows = [r for r in rd.read_metrics() if r["kind"] == "train"]
    assert len(rows) == 4
    for r in rows:
        assert r["withheld"] == ["loss", "steps", "tokens", "activation_counts", "metrics"]
        assert not {"loss", "steps", "tokens", "tokens_per_s"} & set(r) and r["lr"] > 0
    for c in summary["clients"]:
        assert c["n_train"] is None and c["category_counts"] is None and c["expert_activation"] is None
        assert c["rounds_trained"] == 2 and c["loss"] is not None  # evaluated: that is sent
    p = summary["privacy"]
    assert p["reports"] == "withhold" and "evaluation results" in p["not_covered"]
    report = rd.report_path.read_text()
    assert "stayed on it (reports: withhold)" in report and p["not_covered"] in report


def test_flame_with_withheld_reports_is_central_dp_flame_computed_on_the_clients(tmp_path):
    """σ = 0, so the two runs differ only in where things happen. Central DP: the server clips each update and
    weighs expert j of layer l by (f_j / max f)^t from the client's counts, sums and divides by m = 2. Local DP
    with withheld reports: each client clips and weighs its own update (the counts never leave it) and the
    server takes the plain mean. The global models after each round are the same; no reply carries a count."""
    flame = ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "federation.rounds=2",
             "federation.dp.clip_norm=0.05", "federation.dp.noise_multiplier=0"]
    replies = []
    central = _local_run(tmp_path, "central", *flame)[1]
    local = _local_run(tmp_path, "local", *flame, "federation.dp.where=client", "federation.dp.client_noise=seeded",
                       observe=lambda kind, cid, msg: replies.append(msg) if kind == "reply" else None)[1]
    from fedmoe.federation.checkpoint import load_checkpoint

    a = load_checkpoint(central.path, log=lambda *a: None).state["global_state"]
    b = load_checkpoint(local.path, log=lambda *a: None).state["global_state"]
    layer_of = model_spec(load_config(None, TINY + flame), METHODS["flame"]).inventory.expert_layers()
    assert layer_of and set(layer_of) <= set(a)
    initial = model_spec(load_config(None, TINY + flame), METHODS["flame"]).initial
    assert max(float((a[n] - initial[n]).abs().max()) for n in layer_of) > 1e-4  # the experts moved
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)  # the replies travel in float32
    assert len(replies) == 4 and all("activation_counts" not in m.tensors and m.scalars == {"n_train": 1}
                                     for m in replies)


def test_a_withheld_report_and_reply_are_checked_as_such():
    """A withheld training report carries lr and the names of what it withheld, nothing else (a report that
    says it withheld and still sends a loss is refused); under withheld reports a reply's n_train must be 1 and
    FLAME's counts are no longer expected; reports is a setting of local DP only."""
    import json

    from fedmoe.federation.dp import WITHHELD_TRAINING, WithheldReports
    from fedmoe.federation.runtime import invalid_reply
    from fedmoe.federation.transport import TrainReport
    from fedmoe.messages import Message
    from fedmoe.train import LocalResult

    res = LocalResult(loss=2.5, steps=3, lr=1e-3, tokens=96, activation_counts=torch.ones(2, 4, dtype=torch.long),
                      tokens_per_layer=torch.full((2,), 48), n_train=12)
    kept = TrainReport.of(res, {"rescaler_by_layer": [1.0]}, withhold=True)
    info = json.loads(json.dumps(kept.to_info()))
    assert info == {"lr": 1e-3, "withheld": list(WITHHELD_TRAINING)}
    back = TrainReport.from_info(info, train_s=2.0)
    assert (back.loss, back.tokens, back.activation_counts, back.metrics, back.withheld) == (
        None, None, None, {}, WITHHELD_TRAINING) and back.overhead == {"train_s": 2.0}
    with pytest.raises(ValueError, match="carry only lr"):
        TrainReport.from_info({**info, "loss": 2.5})
    cfg = _dp_cfg(1, 1, "federation.dp.where=client", "algorithm.name=flame")
    method = get_method("flame")
    server = method.server(cfg, model_spec(cfg, method))
    g = server.initial_global()
    receiver = WithheldReports(server, cfg)
    assert receiver.reply_extras(g) == {} and server.reply_extras(g)  # FLAME's own server wants the counts
    sent = Message(dict(g))
    assert invalid_reply(sent, Message(dict(g), {"n_train": 1}), g, 1, {}, receiver, withheld=True) is None
    why = invalid_reply(sent, Message(dict(g), {"n_train": 12}), g, 1, {}, receiver, withheld=True)
    assert "n_train = 12, where under federation.dp.reports: withhold every reply carries 1" in why
    counts = {"activation_counts": torch.ones(2, 4, dtype=torch.long)}
    assert "does not expect" in invalid_reply(sent, Message({**g, **counts}, {"n_train": 1}), g, 1, {}, receiver,
                                              withheld=True)
    with pytest.raises(ConfigError, match="federation.dp.reports says what a client keeps to itself"):
        _dp_cfg(1, 1, "federation.dp.reports=send")
    assert _dp_cfg(1, 1).federation.dp.reports is None


def test_fcmoe_under_local_dp_aggregates_the_noised_updates_as_its_own(tmp_path):
    """FC-MoE, local DP with withheld reports, importance n, σ = 1: the replies hold the global tensors and
    n_train = 1 only; the global model after round 1 is FC-MoE's own conflict-aware average of those noised
    replies with every client weighing 1 (projection and all), and the residual each client is sent in round 2
    is the part removed from its own noised update. With reports: send and importance n_f_norm the replies carry
    the counts and the run finishes."""
    from fedmoe.algorithms.fcmoe import RESIDUAL, FCMoEConfig, conflict_aware_average

    sent, seen, observe = _recorder()

    sets = ["algorithm.name=fcmoe", "algorithm.fcmoe.importance=n", "algorithm.fcmoe.threshold=0.9", "federation.rounds=2",
            "federation.dp.clip_norm=0.05", "federation.dp.noise_multiplier=1", "federation.dp.where=client"]
    summary, rd = _local_run(tmp_path, "fcmoe", *sets, observe=observe)
    theta = sent[(1, 0)]
    for c in (0, 1):
        assert set(seen[(1, c)].tensors) == set(theta) and seen[(1, c)].scalars == {"n_train": 1}
    cfg = load_config(None, TINY + sets)
    spec = model_spec(cfg, METHODS["fcmoe"])
    pairs = {t.name: (t.partner, t.scaling) for t in spec.inventory if t.factor == "A"}
    fc = FCMoEConfig(importance="n", threshold=0.9)
    new, residuals, stats = conflict_aware_average(theta, [seen[(1, c)].tensors for c in (0, 1)], [1.0, 1.0], None,
                                                   spec.inventory.expert_layers(), fc, pairs=pairs)
    assert stats["projected_fraction"] > 0  # two noised updates: each has cos ≈ 0.7 with their mean, below 0.9
    for name in theta:
        torch.testing.assert_close(sent[(2, 0)][name], new[name], rtol=0, atol=1e-7)
    for c in (0, 1):
        got = {n[len(RESIDUAL):]: t for n, t in sent[(2, c)].items() if n.startswith(RESIDUAL)}
        assert set(got) == set(residuals[c]) and got
        for name in got:
            torch.testing.assert_close(got[name], residuals[c][name], rtol=0, atol=1e-7)
    seen.clear()
    _local_run(tmp_path, "fcmoe-send", "algorithm.name=fcmoe", "federation.rounds=1", "federation.dp.clip_norm=0.05",
               "federation.dp.noise_multiplier=1", "federation.dp.where=client", "federation.dp.reports=send",
               observe=observe)
    assert all("activation_counts" in m.tensors and m.scalars["n_train"] > 1 for m in seen.values())


@pytest.mark.parametrize("where", ["server", "client"])
def test_a_target_epsilon_gives_the_smallest_noise_that_keeps_within_it(where):
    """σ from target_epsilon: ε after federation.rounds rounds at σ is within the target, and at a σ 1e-4
    smaller it is not (the smallest, to the digits written); local DP needs twice central DP's σ (each release has
    sensitivity 2C). A σ given beside a target must keep within it."""
    from fedmoe.federation.dp import resolve_noise

    def cfg(*extra):
        return load_config(None, ["federation.dp.clip_norm=1", "federation.dp.target_epsilon=3", "federation.rounds=20",
                                  f"federation.dp.where={where}", *extra])

    sigma = resolve_noise(cfg()).federation.dp.noise_multiplier
    eff = sigma / 2 if where == "client" else sigma
    assert epsilon(eff, 20, 1e-5) <= 3 < epsilon(eff * (1 - 1e-4), 20, 1e-5)
    central = resolve_noise(load_config(None, ["federation.dp.clip_norm=1", "federation.dp.target_epsilon=3",
                                               "federation.rounds=20"])).federation.dp.noise_multiplier
    assert sigma == pytest.approx(central * (2 if where == "client" else 1), rel=1e-5)
    assert resolve_noise(cfg(f"federation.dp.noise_multiplier={sigma * 1.5}")).federation.dp.noise_multiplier == sigma * 1.5
    with pytest.raises(ConfigError, match=r"noise_multiplier = .* spends ε = .* over 20 rounds .* more than "
                                          r"federation.dp.target_epsilon = 3: remove noise_multiplier"):
        resolve_noise(cfg(f"federation.dp.noise_multiplier={sigma * 0.9}"))
    with pytest.raises(ConfigError, match="give federation.dp.noise_multiplier .* or federation.dp.target_epsilon"):
        load_config(None, ["federation.dp.clip_norm=1"])


def test_a_run_with_a_target_epsilon_spends_it_and_fixes_sigma_in_its_config(tmp_path):
    """The run's config.yaml holds the computed σ (a resume uses it, not a new computation), the last round's ε
    is the target to the digits of σ, and the report says how σ was chosen."""
    summary, rd = _local_run(tmp_path, "target", "federation.rounds=2", "federation.dp.clip_norm=0.01",
                             "federation.dp.target_epsilon=8")
    written = load_config(rd.path / "config.yaml").federation.dp
    assert written.target_epsilon == 8 and written.noise_multiplier > 0
    p = summary["privacy"]
    assert p["noise_multiplier"] == written.noise_multiplier and p["target_rounds"] == 2
    assert 8 * (1 - 1e-4) < p["epsilon"] <= 8
    assert f"σ = {written.noise_multiplier:g} keeps ε within the target 8 over the run's 2 rounds" in \
        rd.report_path.read_text()


def test_local_dp_counts_every_training_request_as_a_release(tmp_path):
    """A client whose reply never reaches the server (lost, too late) may still have released an update: its ε
    counts the request. Client 1's replies are dropped in both rounds: its ε is that of 2 releases."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    from fedmoe.federation.directories import prepare_run_dir
    from fedmoe.federation.local import LocalTransport
    from fedmoe.federation.runtime import Federation

    class Lossy(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            replies.pop(1, None)
            return replies, {**failures, 1: "no reply within federation.round_timeout_s"}

    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=lossy", "federation.rounds=2", "federation.min_replies=1",
                                    "federation.dp.clip_norm=0.01", "federation.dp.noise_multiplier=1",
                                    "federation.dp.where=client"])
    fed = Federation(cfg, prepare_run_dir(cfg, log=lambda *a: None), log=lambda *a: None)
    honest = fed.transport
    fed.transport = Lossy.__new__(Lossy)
    fed.transport.__dict__.update(honest.__dict__)
    summary = fed.run()
    acc = RdpAccountant()
    acc.compose(GaussianDpEvent(0.5), 2)
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 0]
    assert summary["privacy"]["epsilon_by_client"][1] == pytest.approx(acc.get_epsilon(1e-5))


def test_a_round_that_fails_and_runs_again_counts_twice_toward_local_dp(tmp_path):
    """Local DP: round 2's replies are lost, so the round fails and the run stops at round 1's checkpoint; its
    requests may still have made the clients release updates. Resumed, round 2 runs again: each client's ε is
    that of 3 releases (the failed round's counted from the run directory, where the checkpoint does not hold
    it), not 2."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    from fedmoe.federation import resume_federated
    from fedmoe.federation.directories import locked, prepare_run_dir
    from fedmoe.federation.local import LocalTransport
    from fedmoe.federation.runtime import Federation, RoundFailed

    class LostRound2(LocalTransport):
        def train(self, round_idx, messages, prog):
            replies, failures = super().train(round_idx, messages, prog)
            if round_idx == 2:
                return {}, {cid: "no reply within federation.round_timeout_s" for cid in messages}
            return replies, failures

    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=again", "federation.rounds=2",
                                    "federation.dp.clip_norm=0.01", "federation.dp.noise_multiplier=1",
                                    "federation.dp.where=client"])
    rd = prepare_run_dir(cfg, log=lambda *a: None)
    fed = Federation(cfg, rd, log=lambda *a: None)
    honest = fed.transport
    fed.transport = LostRound2.__new__(LostRound2)
    fed.transport.__dict__.update(honest.__dict__)
    with pytest.raises(RoundFailed, match="round 2"):
        locked(rd, fed.run)
    summary, _ = resume_federated(rd.path, log=lambda *a: None)

    def eps(releases):
        acc = RdpAccountant()
        acc.compose(GaussianDpEvent(0.5), releases)
        return acc.get_epsilon(1e-5)

    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 2]
    assert summary["privacy"]["epsilon_by_client"] == {0: pytest.approx(eps(3)), 1: pytest.approx(eps(3))}


def test_fedmoe_run_prints_the_privacy_it_spent(tmp_path):
    """Under the results, `fedmoe run` says what the run spent: ε at δ, σ (here computed from the target), C."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    args = TINY + ["federation.rounds=1", f"output_dir={tmp_path}", "name=cli", "federation.dp.clip_norm=0.01",
                   "federation.dp.target_epsilon=8"]
    r = CliRunner().invoke(app, ["run", "--quiet", *[x for a in args for x in ("--set", a)]])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    sigma = load_config(tmp_path / "cli" / "config.yaml").federation.dp.noise_multiplier
    assert f"privacy (central DP): ε = 8.000 at δ = 1e-05 after 1 rounds, σ = {sigma:g}, C = 0.01, within the " \
           "target 8" in out


def _hockey_stick(p_pdf, q_pdf, eps: float) -> float:
    """δ(ε) = ∫ max(0, p − e^ε q) of two densities on a fine grid (one coordinate: the clipped sum's direction)."""
    x = np.linspace(-60, 60, 2_400_001)
    return float(np.maximum(p_pdf(x) - math.exp(eps) * q_pdf(x), 0).sum() * (x[1] - x[0]))


@pytest.mark.parametrize("num_clients, fraction, sigma", [(4, 0.75, 1.0), (10, 0.5, 2.0)])
def test_the_epsilon_of_a_sampled_round_holds_for_the_mechanism_it_runs(num_clients, fraction, sigma):
    """A fixed number m < N of clients sampled without replacement: a client added to the population may take the
    place of one that would have been sampled (probability q = m/(N+1)), so the clipped sum moves by up to 2C and a
    round's output is (1-q)·N(0, σ²C²) + q·N(2C, σ²C²) against N(0, σ²C²). The ε reported for δ = 1e-5 was that of
    σ (sensitivity C): the true δ at it was 1.5e-2. Accounted with σ/2 it holds, in both directions; every client in
    every round keeps σ."""
    from scipy.stats import norm

    from fedmoe.federation.dp import privacy_summary, round_metrics

    delta = 1e-5
    cfg = load_config(None, [f"data.partition.num_clients={num_clients}", f"federation.fraction={fraction}",
                             "federation.dp.clip_norm=1", f"federation.dp.noise_multiplier={sigma}"])
    m = round(fraction * num_clients)
    eps = round_metrics(cfg, 1)["dp_epsilon"]
    assert eps == pytest.approx(epsilon(sigma / 2, 1, delta))
    assert privacy_summary(cfg, 1, m)["epsilon"] == eps and "sensitivity 2C" in privacy_summary(cfg, 1, m)["accounting"]
    q = m / (num_clients + 1)
    mixture = lambda x: (1 - q) * norm.pdf(x, 0, sigma) + q * norm.pdf(x, 2, sigma)  # noqa: E731
    plain = lambda x: norm.pdf(x, 0, sigma)  # noqa: E731
    assert max(_hockey_stick(mixture, plain, eps), _hockey_stick(plain, mixture, eps)) <= delta
    old = epsilon(sigma, 1, delta)  # what was reported: the mechanism does not meet it
    assert _hockey_stick(mixture, plain, old) > 10 * delta
    full = load_config(None, [f"data.partition.num_clients={num_clients}", "federation.dp.clip_norm=1",
                              f"federation.dp.noise_multiplier={sigma}"])
    assert round_metrics(full, 1)["dp_epsilon"] == pytest.approx(epsilon(sigma, 1, delta))


def test_a_target_epsilon_under_sampling_takes_the_doubled_sensitivity():
    from fedmoe.federation.dp import resolve_noise

    def sigma_for(fraction):
        cfg = load_config(None, ["data.partition.num_clients=10", f"federation.fraction={fraction}",
                                 "federation.dp.clip_norm=1", "federation.dp.target_epsilon=4", "federation.rounds=5"])
        return resolve_noise(cfg).federation.dp.noise_multiplier

    assert sigma_for(0.5) == pytest.approx(2 * sigma_for(1.0), rel=1e-4)


def test_a_round_run_again_after_a_resume_is_a_second_central_release(tmp_path, monkeypatch):
    """Central DP, secret noise: round 2's noised model went out (its evaluation) and the server died before its
    checkpoint; the resumed run draws round 2 again, fresh noise on the same clipped sum, a second release (averaged
    with the first, half its noise variance). ε counted the applied rounds only (2): it counts 3 releases."""
    from fedmoe.federation import resume_federated
    from fedmoe.federation.runtime import Federation

    sigma, delta = 1.0, 1e-5
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=dp", "federation.rounds=2",
                                    "federation.dp.clip_norm=0.01", f"federation.dp.noise_multiplier={sigma}",
                                    f"federation.dp.delta={delta}", "eval.loss_every_round=true"])
    real = Federation._evaluate

    def dies_in_round_2(self, round_idx, *a, **kw):
        out = real(self, round_idx, *a, **kw)  # the model went to the clients
        if round_idx == 2:
            raise RuntimeError("the server died after round 2's evaluation")
        return out

    monkeypatch.setattr(Federation, "_evaluate", dies_in_round_2)
    with pytest.raises(RuntimeError, match="server died"):
        run_federated(cfg, log=lambda *a: None)
    monkeypatch.setattr(Federation, "_evaluate", real)
    summary, rd = resume_federated(tmp_path / "dp", log=lambda *a: None)
    p = summary["privacy"]
    assert (p["rounds"], p["releases"]) == (2, 3)
    assert p["epsilon"] == pytest.approx(epsilon(sigma, 3, delta)) and p["epsilon"] > epsilon(sigma, 2, delta)
    assert [r["dp_epsilon"] for r in rd.read_metrics() if r["kind"] == "server"][-1] == pytest.approx(p["epsilon"])


def test_local_dp_noise_beyond_secaggs_clipping_range_is_refused():
    """Local DP with σ·C near SecAgg+'s clipping_range: every client's noised update has coordinates beyond it, each
    client refuses its update, and every round stops with no mean (a node's ledger having counted the release)."""
    sets = ["federation.runtime=flower-sim", "federation.secagg.clipping_range=8", "federation.dp.where=client",
            "federation.dp.clip_norm=1"]
    with pytest.raises(ConfigError, match=r"clipping_range = 8 is below what a client's noised update reaches .* at "
                                          r"least 19 \(C·\(1 \+ 6σ\)\)"):
        load_config(None, [*sets, "federation.dp.noise_multiplier=3"])
    load_config(None, [*sets, "federation.dp.noise_multiplier=1"])  # 8 >= 1 + 4: taken


def test_the_privacy_line_compares_with_the_target_and_counts_releases():
    """The line said "within the target" whenever a target was set, also where a round released again after a resume
    had put ε over it, and "after N rounds" of an ε over more releases than rounds; seeded noise went unmentioned in
    central DP."""
    from fedmoe.report.report import format_privacy, privacy_line

    p = {"where": "server", "epsilon": 2.108, "delta": 1e-5, "rounds": 10, "releases": 11, "noise_multiplier": 1.5,
         "clip_norm": 0.1, "target_epsilon": 2, "target_rounds": 10, "clients_per_round": 4, "noise_std_of_average": 0.04,
         "accounting": "RDP", "server_noise": "secret"}
    line = privacy_line({"privacy": p})
    assert "after 11 releases (10 rounds)" in line and ", over the target 2 (a round was released again" in line
    assert "within" not in line and "seeded" not in line
    text = " ".join(format_privacy({"privacy": p}, []))
    assert "after 11 releases (10 rounds)" in text and "This run's ε, 2.108, is over it" in text
    p.update(epsilon=1.9, releases=10, server_noise="seeded")
    line = privacy_line({"privacy": p})
    assert "after 10 rounds," in line and ", within the target 2" in line and "(seeded noise: whoever has the config" in line
    assert "server_noise: seeded" in " ".join(format_privacy({"privacy": p}, []))


@pytest.mark.parametrize("noise", ["client_noise", "server_noise"])
def test_seeded_noise_is_refused_on_a_real_deployment(tmp_path, noise):
    """server_noise: seeded on runtime flower let any SuperNode rebuild a round's noise from the seed in its config and
    subtract it (and client_noise: seeded, the server a client's): a new run is refused; a simulation keeps it."""
    from fedmoe.config import ConfigError, refuse_for_a_new_run

    where = "client" if noise == "client_noise" else "server"
    sets = ["federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1", f"federation.dp.where={where}",
            f"federation.dp.{noise}=seeded"]
    with pytest.raises(ConfigError, match=rf"federation.dp.{noise} = seeded draws the noise from the run's seed"):
        refuse_for_a_new_run(load_config(None, [*sets, "federation.runtime=flower"]))
    refuse_for_a_new_run(load_config(None, [*sets, "federation.runtime=flower-sim"]))
