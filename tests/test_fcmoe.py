"""FC-MoE: projection, importance weights by hand (per layer, per expert), retention on the client that
owns the residual only, the reduction to FedIT, and residuals never going up."""

import pytest
import torch
from helpers import built, reply

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.fcmoe import RESIDUAL, FCMoEConfig, conflict_aware_average
from fedmoe.algorithms.flame import COUNTS, TOKENS
from fedmoe.config import load_config
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config

W = "model.layers.0.self_attn.q_proj.lora_A"


def _shared(deltas, n, **cfg):
    g = {W: torch.zeros(2, dtype=torch.float64)}
    tensors = [{W: torch.tensor(d, dtype=torch.float64)} for d in deltas]
    return conflict_aware_average(g, tensors, n, [{} for _ in deltas], {}, FCMoEConfig(**cfg))


def test_a_conflicting_update_loses_its_part_along_the_consensus():
    deltas = [[1.0, 0.0], [1.0, 0.2], [-1.0, 0.5]]
    new, residuals, stats = _shared(deltas, [1, 1, 1], importance="n")
    d = torch.tensor([1.0 / 3, 0.7 / 3], dtype=torch.float64)  # Σ w_i Δ_i, w = 1/3
    c2 = torch.tensor(deltas[2], dtype=torch.float64)
    r2 = (c2 @ d) / (d @ d) * d
    assert torch.allclose(residuals[2][W], r2) and residuals[0] == {} and residuals[1] == {}
    projected = c2 - r2
    assert abs(float(projected @ d)) < 1e-12  # orthogonal to the consensus
    want = (torch.tensor(deltas[0]) + torch.tensor(deltas[1])).double() / 3 + projected / 3
    assert torch.allclose(new[W], want)  # the non-conflicting updates enter unchanged
    assert stats["projected_fraction"] == pytest.approx(1 / 3)
    # no projection: the plain weighted mean; a threshold above 1 projects everyone (all but zero-cosine)
    plain, res, _ = _shared(deltas, [1, 1, 1], importance="n", projection=False)
    assert torch.allclose(plain[W], torch.tensor(deltas, dtype=torch.float64).mean(0)) and res == [{}, {}, {}]


def test_importance_weights_by_hand_per_layer_and_expert():
    """3 clients, 2 MoE layers of 2 experts; layers route differently; expert 1 of layer 1 is used by nobody."""
    A0, A1 = "model.layers.0.mlp.experts.down_lora_A", "model.layers.1.mlp.experts.down_lora_A"
    g = {A0: torch.full((2, 1), 5.0), A1: torch.full((2, 1), 5.0)}
    vals = [1.0, 2.0, 4.0]
    tensors = [{A0: torch.full((2, 1), v), A1: torch.full((2, 1), v)} for v in vals]
    n = [1.0, 2.0, 1.0]
    freq = [{0: torch.tensor([0.5, 0.5]), 1: torch.tensor([1.0, 0.0])},
            {0: torch.tensor([0.25, 0.75]), 1: torch.tensor([0.5, 0.0])},
            {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 0.0])}]
    cfg = FCMoEConfig(importance="n_f_t", temperature=1.0, projection=False)
    new, _, _ = conflict_aware_average(g, tensors, n, freq, {A0: 0, A1: 1}, cfg)

    def mean(c):
        return sum(ci * v for ci, v in zip(c, vals)) / sum(c)

    assert new[A0][0].item() == pytest.approx(mean([0.5, 0.5, 1.0]))      # n·f: 0.5, 0.5, 1.0
    assert new[A0][1].item() == pytest.approx(mean([0.5, 1.5, 0.0]))      # 0.5, 1.5, 0
    assert new[A1][0].item() == pytest.approx(mean([1.0, 1.0, 0.0]))      # layer 1's own counts
    assert new[A1][1].item() == 5.0  # nobody routed to it: keeps its global value
    # the norm-weighted default: c = n·f·‖Δ‖ with ‖Δ‖ = |v − 5|
    new, _, _ = conflict_aware_average(g, tensors, n, freq, {A0: 0, A1: 1}, FCMoEConfig(projection=False))
    norms = [4.0, 3.0, 1.0]
    assert new[A1][0].item() == pytest.approx(mean([1.0 * 4.0, 1.0 * 3.0, 0.0]))
    assert new[A0][1].item() == pytest.approx(mean([0.5 * 4, 1.5 * 3, 0.0 * norms[2]]))


def _setup(*sets):
    cfg = load_config(None, ["algorithm.name=fcmoe", "lora.rank=2", "data.partition.num_clients=3", *sets])
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, spec = built(METHODS["fcmoe"], cfg, mm)
    return cfg, mm, server, client, spec


def _replies(g, ns, seed=0, flip=None):
    gen = torch.Generator().manual_seed(seed)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in ns]
    if flip is not None:  # an update against the others' (their sum, reversed): conflicts everywhere
        states[flip] = {k: v - sum(s[k] - v for i, s in enumerate(states) if i != flip) for k, v in g.items()}
    out = []
    for cid, (n, t) in enumerate(zip(ns, states)):
        counts = torch.randint(1, 50, (2, 8), generator=gen)
        out.append(reply(cid, {**t, COUNTS: counts, TOKENS: torch.tensor([60, 60])}, n))
    return out


def test_uniform_importance_no_projection_no_retention_is_fedit_exactly():
    cfg, mm, server, client, spec = _setup("algorithm.fcmoe.importance=n", "algorithm.fcmoe.projection=false",
                                           "algorithm.fcmoe.retention=0")
    g = server.initial_global()
    replies = _replies(g, [3, 5, 2])
    new, ss, _ = server.aggregate(g, server.initial_server_state(g), replies, round_idx=1)
    fedit = METHODS["fedit"].server(cfg, spec)
    want, _, _ = fedit.aggregate(g, {}, [reply(r.client, {k: r.message.tensors[k] for k in g}, r.message.scalars["n_train"])
                                         for r in replies], round_idx=1)
    assert set(new) == set(want) and all(torch.equal(new[k], want[k]) for k in want)
    assert ss["residuals"] == {}


def test_the_residual_goes_to_its_client_once_and_is_re_applied_with_lambda():
    cfg, mm, server, client, _ = _setup("algorithm.fcmoe.retention=0.5")
    g = server.initial_global()
    ss = server.initial_server_state(g)
    g2, ss, stats = server.aggregate(g, ss, _replies(g, [3, 5, 2], flip=2), round_idx=1)
    assert stats["projected_fraction"] > 0 and len(stats["mean_cosine_by_layer"]) == 2
    assert ss["residuals"][2][0] == 1  # tagged with the round it comes from (a client keeps the newest)
    res = ss["residuals"][2][1]
    assert res  # client 2 went against the consensus: it has a residual
    down = {cid: server.downlink(g2, ss, cid, round_idx=1) for cid in range(3)}
    assert {n[len(RESIDUAL):] for n in down[2].tensors if n.startswith(RESIDUAL)} == set(res)
    assert down[2].nbytes() > down[0].nbytes()  # the residual costs downlink bytes, counted
    assert not any(n.startswith(RESIDUAL) for n in server.downlink(g2, ss, None, round_idx=1).tensors)  # not global
    private = client.setup(2, mm, [])[0]
    mine = client.model_state(2, mm, down[2], private)
    for n, t in g2.items():
        want = t + 0.5 * res[n] if n in res else t
        torch.testing.assert_close(mine[n], want)
    for cid in (0, 1):  # the others start from the global state plus their own residual only
        own = ss["residuals"].get(cid, (0, {}))[1]
        assert {n[len(RESIDUAL):]: t for n, t in down[cid].tensors.items() if n.startswith(RESIDUAL)}.keys() == own.keys()
        theirs = client.model_state(cid, mm, down[cid], client.setup(cid, mm, [])[0])
        for n, t in g2.items():
            torch.testing.assert_close(theirs[n], t + 0.5 * own[n] if n in own else t)
            if n in res and n not in own:
                assert torch.equal(theirs[n], t)  # client 2's residual is not theirs
    # after training, the client keeps it: a message without it still re-applies it
    mm.load_state(mine)
    from fedmoe.train import LocalResult

    result = LocalResult(0.0, 1, 1, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long), 10, 0.1)
    up, private, _ = client.reply(2, mm, down[2], private, result)
    assert not any(n.startswith(RESIDUAL) for n in up.tensors)  # never goes up
    assert set(private["residual"]) == set(res)
    plain = server.downlink(g2, {"residuals": {}}, 2, round_idx=1)
    again = client.model_state(2, mm, plain, private)
    assert all(torch.equal(again[n], mine[n]) for n in mine)


def test_fcmoe_run_sends_no_residual_up_and_reports_conflicts(tmp_path):
    from fedmoe.federation import run_federated

    seen = []
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=fcmoe", "data.max_examples=200",
                             "data.max_length=48", "data.partition.num_clients=3", "train.max_steps=2",
                             "train.batch_size=2", "train.lr=0.05", "eval.rouge=false", "data.max_test_per_client=3",
                             "lora.rank=4", "federation.rounds=3", f"output_dir={tmp_path}", "name=fc"])
    summary, rd = run_federated(cfg, observe=lambda kind, cid, msg: seen.append((kind, cid, msg)))
    ups = [m for kind, _, m in seen if kind == "reply"]
    assert len(ups) == 9 and not any(n.startswith(RESIDUAL) for m in ups for n in m.tensors)
    server_rows = [r for r in rd.read_metrics() if r["kind"] == "server"]
    assert all(0 <= r["projected_fraction"] <= 1 and len(r["mean_cosine_by_layer"]) == 4 for r in server_rows)
    # a train message carries a residual exactly when the server kept one for that client
    downs = [(cid, m) for kind, cid, m in seen if kind == "downlink" and m.header["round"] > 1]
    assert any(any(n.startswith(RESIDUAL) for n in m.tensors) for _, m in downs) or all(
        r["projected_fraction"] == 0 for r in server_rows)
    report = rd.report_path.read_text()
    assert "mean_cosine_by_layer" in report and "projected_fraction" in report


def test_the_dense_space_is_the_scaled_product_of_each_pair():
    """space: dense compares updates as s·B·A of each adapted weight (the pairs and α/r from the inventory),
    expert row by expert row; without the pairs it refuses rather than guess them from the names."""
    from fedmoe.algorithms.fcmoe import _dense

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 4, generator=g), torch.randn(3, 5, 2, generator=g)  # 3 experts, rank 2
    state = {"x.lora_A": A, "x.lora_B": B, "y": torch.randn(7, generator=g)}
    members = [("x.lora_A", 1), ("x.lora_B", 1)]
    got = _dense(state, members, {"x.lora_A": ("x.lora_B", 4.0)})
    torch.testing.assert_close(got, (4.0 * B[1].double() @ A[1].double()).reshape(-1))
    assert _dense(state, [("y", None)], {"x.lora_A": ("x.lora_B", 4.0)}).numel() == 0  # not a pair: no dense part
    with pytest.raises(ValueError, match="dense space needs the LoRA pairs"):
        conflict_aware_average(state, [state], [1.0], [{}], {}, FCMoEConfig(space="dense"))


def test_the_dense_space_projects_the_dense_update_by_hand():
    """space: dense decides and scales by ΔW_i = s·(B_i A_i − B A), against Σ w_i ΔW_i. Built so that the
    dense updates and the factor differences disagree: client 1's product update opposes client 0's,
    while the product of its factor differences agrees with it."""
    A, B = "x.lora_A", "x.lora_B"
    g = {A: torch.tensor([[1.0, 0.0]], dtype=torch.float64), B: torch.tensor([[1.0], [0.0]], dtype=torch.float64)}
    c0 = {A: torch.tensor([[1.5, 0.0]], dtype=torch.float64), B: torch.tensor([[1.5], [0.0]], dtype=torch.float64)}
    c1 = {A: torch.tensor([[0.5, 0.0]], dtype=torch.float64), B: torch.tensor([[0.5], [0.0]], dtype=torch.float64)}
    s = 2.0
    pairs = {A: (B, s)}

    def dense(t):
        return s * t[B] @ t[A]

    dw = [(dense(c) - dense(g)).reshape(-1) for c in (c0, c1)]  # +2.5·e11 and −1.5·e11: opposed
    fd = [(s * (c[B] - g[B]) @ (c[A] - g[A])).reshape(-1) for c in (c0, c1)]  # +0.5 and +0.5: agree
    assert float(dw[0] @ dw[1]) < 0 < float(fd[0] @ fd[1])
    n = [3.0, 1.0]
    cfg = FCMoEConfig(importance="n", space="dense")
    new, residuals, stats = conflict_aware_average(g, [c0, c1], n, [{}, {}], {}, cfg, pairs=pairs)
    w = [0.75, 0.25]
    d_dense = w[0] * dw[0] + w[1] * dw[1]  # +1.5: client 1 (−1.5) conflicts
    coef = float(dw[1] @ d_dense) / float(d_dense @ d_dense)  # −1
    d = {k: w[0] * (c0[k] - g[k]) + w[1] * (c1[k] - g[k]) for k in g}  # the factors' consensus
    assert residuals[0] == {} and stats["projected_fraction"] == pytest.approx(0.5)
    for k in g:
        torch.testing.assert_close(residuals[1][k], coef * d[k])
        torch.testing.assert_close(new[k], g[k] + d[k] - w[1] * coef * d[k])


def test_a_client_with_weight_zero_is_neither_projected_nor_retained():
    """Expert 0 of the layer: client 1 routed nothing to it (f = 0, weight 0) and its update there opposes
    client 0's. It gets no residual and none of it enters the global; on expert 1 (f > 0) the same
    opposing update is projected and retained."""
    A = "model.layers.0.mlp.experts.down_lora_A"
    g = {A: torch.zeros(2, 2, dtype=torch.float64)}
    c0 = {A: torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)}
    c1 = {A: torch.tensor([[-1.0, 0.2], [-1.0, 0.2]], dtype=torch.float64)}
    freq = [{0: torch.tensor([0.5, 0.5])}, {0: torch.tensor([0.0, 0.2])}]
    cfg = FCMoEConfig(importance="n_f_t")
    new, residuals, stats = conflict_aware_average(g, [c0, c1], [1.0, 1.0], freq, {A: 0}, cfg)
    torch.testing.assert_close(new[A][0], c0[A][0])  # expert 0: client 0's update alone
    assert torch.equal(residuals[1][A][0], torch.zeros(2, dtype=torch.float64))  # no residual for weight 0
    assert residuals[1][A][1].abs().sum() > 0  # expert 1: projected and retained
    assert stats["projected_fraction"] == pytest.approx(1 / 3)  # 3 (client, expert) pairs with weight > 0


def test_a_threshold_above_zero_compares_normalised_cosines():
    """threshold 0.5: an update at cos 0.6 to the consensus is kept, one at cos 0.3 is projected, whatever
    their lengths (an unnormalised ⟨Δ_i, d⟩ would rank them by length)."""
    import math

    d_dir = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def at(cos, length):
        return [length * cos, length * math.sqrt(1 - cos * cos)]

    # two clients whose weighted mean lies along e1: a long update at cos 0.3 and a short one mirrored
    long_ = at(0.3, 10.0)
    deltas = [long_, [long_[0] * 1.0, -long_[1]]]  # the mean is along e1; both at cos 0.3
    new, residuals, stats = _shared(deltas, [1, 1], importance="n", threshold=0.5)
    assert stats["projected_fraction"] == 1.0 and residuals[0] and residuals[1]
    deltas = [at(0.6, 0.01), [at(0.6, 0.01)[0], -at(0.6, 0.01)[1]]]  # tiny, but at cos 0.6
    new, residuals, stats = _shared(deltas, [1, 1], importance="n", threshold=0.5)
    assert stats["projected_fraction"] == 0.0 and residuals == [{}, {}]
    assert torch.allclose(new[W], 0.6 * 0.01 * d_dir)


def test_a_residual_replaces_the_last_one_over_rounds():
    """Round 2's residual replaces round 1's in the server's pending store and in the client's private
    store; the client's model adds λ·r of the newest only (a sum would add both)."""
    cfg, mm, server, client, _ = _setup("algorithm.fcmoe.retention=0.5")
    g = server.initial_global()
    ss = server.initial_server_state(g)
    g2, ss, _ = server.aggregate(g, ss, _replies(g, [3, 5, 2], flip=2), round_idx=1)
    r1 = ss["residuals"][2][1]
    private = client.setup(2, mm, [])[0]
    private = client._take(server.downlink(g2, ss, 2, round_idx=2), private)
    g3, ss, _ = server.aggregate(g2, ss, _replies(g2, [3, 5, 2], seed=1, flip=2), round_idx=2)
    r2 = ss["residuals"][2][1]
    assert ss["residuals"][2][0] == 2 and any(not torch.equal(r1[n], r2[n]) for n in r2)
    down = server.downlink(g3, ss, 2, round_idx=3)
    mine = client.model_state(2, mm, down, private)
    for n, t in g3.items():
        want = t + 0.5 * r2[n] if n in r2 else t
        torch.testing.assert_close(mine[n], want)
    assert set(client._take(down, private)["residual"]) == set(r2)
    assert client._take(down, private)["residual_round"] == 2


def test_with_some_experts_per_layer_each_row_is_weighed_by_its_own_experts_frequency():
    """lora.experts_per_layer = 1: each layer's tensors hold one expert's LoRA, in row 0. The importance of that row
    was read at expert 0's frequency, whichever expert the row holds (here 0 for both clients: the row kept its global
    value though both trained it). It is read at the row's own expert, as FLAME reads it."""
    cfg, mm, server, client, spec = _setup("lora.experts_per_layer=1", "lora.attention_targets=[]",
                                           "algorithm.fcmoe.importance=n_f_t", "algorithm.fcmoe.temperature=1",
                                           "algorithm.fcmoe.projection=false", "algorithm.fcmoe.retention=0")
    g = server.initial_global()
    name = next(n for n in g if n.endswith("layers.1.mlp.experts.down_lora_B"))
    assert g[name].shape[0] == 1 and server.experts is not None
    expert = server.experts[1][0]
    assert expert != 0  # (the seed's draw: row 0 is not expert 0)
    counts = [torch.zeros(2, 8, dtype=torch.long) for _ in range(3)]
    counts[0][1, expert], counts[1][1, expert] = 30, 10  # a/S = 3/4 and 1/4; client 2 never routes to it
    counts[2][1, 0] = 40  # (expert 0, which row 0 does not hold, is client 2's only)
    replies = [reply(i, {**{n: torch.full_like(t, float(i + 1)) for n, t in g.items()}, COUNTS: counts[i],
                         TOKENS: torch.tensor([40, 40])}, 10) for i in range(3)]
    new, _, _ = server.aggregate(g, server.initial_server_state(g), replies, round_idx=1)
    torch.testing.assert_close(new[name], torch.full_like(g[name], 0.75 * 1 + 0.25 * 2))
