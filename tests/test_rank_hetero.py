"""Rank-heterogeneous baselines: HetLoRA padding/truncation and norm weights, FlexLoRA's SVD
redistribution, and zero components staying zero while a low-rank client trains."""

import pytest
import torch

from helpers import built, reply

from fedmoe.algorithms import METHODS, ModelSpec, model_spec
from fedmoe.algorithms.rank_hetero import (default_rank_levels, frobenius_of_product, lora_pairs, prune, pruning_term,
                                           truncate_rank)
from fedmoe.config import load_config
from fedmoe.messages import Message
from fedmoe.moe import MoEModel
from fedmoe.moe.inventory import Inventory, Role
from fedmoe.moe.lora import lora_pair_info
from fedmoe.moe.tiny import tiny_config

PAIR = ("m.q_proj.lora_A", "m.q_proj.lora_B")


def test_rank_ladder_and_pairs():
    assert default_rank_levels(20) == [20, 12, 8, 6]
    # the pairs come from the model's inventory: A with its B, the output scale (not a LoRA factor) left out
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=flame", "lora.attention_targets=[q_proj]"])
    spec = model_spec(cfg, METHODS["flame"])
    assert any(n.endswith("output_scale") for n in spec.initial)
    assert lora_pairs(spec.inventory)[:3] == [
        ("model.layers.0.mlp.experts.down_lora_A", "model.layers.0.mlp.experts.down_lora_B"),
        ("model.layers.0.mlp.experts.gate_up_lora_A", "model.layers.0.mlp.experts.gate_up_lora_B"),
        ("model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B")]
    assert len(lora_pairs(spec.inventory)) == 4 * 3  # gate_up, down, q per layer
    assert lora_pairs(spec.inventory, ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B",
                                       "model.layers.1.self_attn.q_proj.lora_A"]) == [
        ("model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B")]


def test_truncation_keeps_first_components_with_shapes():
    A = torch.arange(24.0).reshape(2, 3, 4)  # (experts, r_max=3, in)
    B = torch.arange(30.0).reshape(2, 5, 3)  # (experts, out, r_max)
    At, Bt = truncate_rank(A, B, 2)
    assert At.shape == A.shape and Bt.shape == B.shape
    assert torch.equal(At[:, :2], A[:, :2]) and At[:, 2:].abs().sum() == 0
    assert torch.equal(Bt[..., :2], B[..., :2]) and Bt[..., 2:].abs().sum() == 0


def test_frobenius_of_product_matches_dense():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 7, generator=g), torch.randn(3, 5, 4, generator=g)
    dense = sum(torch.linalg.norm(B[e].double() @ A[e].double()) for e in range(3))
    assert float(frobenius_of_product(A, B)) == pytest.approx(float(dense), rel=1e-9)


def _cfg(**kw):
    sets = ["lora.rank=4", "algorithm.budgets.ranks=[4,2]", "data.partition.num_clients=2", "lora.alpha=8"]
    return load_config(None, sets + [f"{k}={v}" for k, v in kw.items()])


def _server(name, shape_a=(4, 3), shape_b=(2, 4), **kw):
    """The server half of a rank method over one adapted weight (PAIR), clients at ranks 4 and 2."""
    a, b = torch.zeros(shape_a), torch.zeros(shape_b)
    inventory = Inventory({t.name: t for t in lora_pair_info(*PAIR, a, b, Role.ATTENTION, shape_a[0], 2.0)})
    spec = ModelSpec(config=None, initial={PAIR[0]: a, PAIR[1]: b}, num_experts=0, top_k=0, decoder_to_moe={},
                     inventory=inventory)
    return METHODS[name].server(_cfg(**{"algorithm.name": name, **kw}), spec)


def test_hetlora_weights_by_update_norm_by_hand():
    server = _server("hetlora")
    A1, B1 = torch.zeros(4, 3), torch.zeros(2, 4)
    A1[0, 0], B1[0, 0] = 1.0, 3.0  # ‖B1 A1‖ = 3
    A2, B2 = torch.zeros(4, 3), torch.zeros(2, 4)
    A2[1, 1], B2[1, 1] = 1.0, 1.0  # rank-2 client, ‖B2 A2‖ = 1
    p = [reply(0, {PAIR[0]: A1, PAIR[1]: B1}, 10), reply(1, {PAIR[0]: A2, PAIR[1]: B2}, 10)]
    new, _, metrics = server.aggregate(server.initial_global(), {}, p, round_idx=1)
    assert metrics["norm_weights"] == pytest.approx([0.75, 0.25])
    torch.testing.assert_close(new[PAIR[0]], 0.75 * A1 + 0.25 * A2)
    torch.testing.assert_close(new[PAIR[1]], 0.75 * B1 + 0.25 * B2)
    # the rank-2 client receives the first 2 components only
    down = server.downlink(new, {}, 1, round_idx=1).tensors
    assert down[PAIR[0]][2:].abs().sum() == 0 and down[PAIR[1]][:, 2:].abs().sum() == 0
    assert torch.equal(server.downlink(new, {}, 0, round_idx=1).tensors[PAIR[0]], new[PAIR[0]])


def test_hetlora_per_rank_weights_by_the_applied_update():
    """scaling: per_rank, each client applied (α/r_i)·B_i A_i: the rank-4 client's ‖·‖ = (8/4)·3 = 6, the
    rank-2 client's (8/2)·1 = 4 (from its budget, or the pruned rank its reply names): weights 0.6, 0.4."""
    server = _server("hetlora", **{"algorithm.hetlora.scaling": "per_rank"})
    A1, B1 = torch.zeros(4, 3), torch.zeros(2, 4)
    A1[0, 0], B1[0, 0] = 1.0, 3.0
    A2, B2 = torch.zeros(4, 3), torch.zeros(2, 4)
    A2[1, 1], B2[1, 1] = 1.0, 1.0
    p = [reply(0, {PAIR[0]: A1, PAIR[1]: B1}, 10), reply(1, {PAIR[0]: A2, PAIR[1]: B2}, 10)]
    _, _, metrics = server.aggregate(server.initial_global(), {}, p, round_idx=1)
    assert metrics["norm_weights"] == pytest.approx([0.6, 0.4])
    pruned = [p[0], reply(1, {PAIR[0]: A2, PAIR[1]: B2}, 10, rank=1)]  # pruned to rank 1: (8/1)·1 = 8
    _, _, metrics = server.aggregate(server.initial_global(), {}, pruned, round_idx=1)
    assert metrics["norm_weights"] == pytest.approx([6 / 14, 8 / 14])


def test_flexlora_reports_what_truncating_the_global_model_leaves_out():
    """Two rank-2 clients with updates in orthogonal subspaces: W_g has rank 4, the global model keeps its top
    r_max = 2 components; global_truncation = ‖dropped singular values‖ / ‖all‖, by hand."""
    server = _server("flexlora", shape_a=(2, 6), shape_b=(5, 2), **{"algorithm.budgets.ranks": "[2,2]",
                                                                   "lora.rank": 2})
    g = torch.Generator().manual_seed(3)
    payloads = [reply(i, {PAIR[0]: torch.randn(2, 6, generator=g), PAIR[1]: torch.randn(5, 2, generator=g)}, 1)
                for i in (0, 1)]
    W = sum(0.5 * (8 / 2) * p.message.tensors[PAIR[1]].double() @ p.message.tensors[PAIR[0]].double()
            for p in payloads)
    S = torch.linalg.svdvals(W)
    assert int((S > 1e-9).sum()) == 4
    _, _, metrics = server.aggregate(server.initial_global(), {}, payloads, round_idx=1)
    assert metrics["global_truncation"] == pytest.approx(float((S[2:] ** 2).sum() / (S ** 2).sum()) ** 0.5, rel=1e-9)
    assert 0 < metrics["global_truncation"] < 1


def test_hetlora_takes_a_server_optimizer_flexlora_refuses_it():
    server = _server("hetlora", **{"algorithm.server_optimizer.name": "fedavgm", "algorithm.server_optimizer.lr": 0.5,
                                   "algorithm.server_optimizer.momentum": 0.0})
    A, B = torch.ones(4, 3), torch.ones(2, 4)
    new, ss, _ = server.aggregate(server.initial_global(), {}, [reply(0, {PAIR[0]: A, PAIR[1]: B}, 1)],
                                  round_idx=1)
    torch.testing.assert_close(new[PAIR[0]], 0.5 * A)  # θ + η·Δ with Δ = A − 0
    assert "m" in ss
    from fedmoe.config import ConfigError

    with pytest.raises(ConfigError, match="flexlora re-factorises"):
        _cfg(**{"algorithm.name": "flexlora", "algorithm.server_optimizer.name": "fedadam"})


def test_flexlora_is_exact_when_every_client_has_full_rank():
    server = _server("flexlora", shape_a=(3, 5), shape_b=(3, 3), **{"algorithm.budgets.ranks": "[3,3]"})
    g = torch.Generator().manual_seed(1)
    payloads = [reply(i, {PAIR[0]: torch.randn(3, 5, generator=g), PAIR[1]: torch.randn(3, 3, generator=g)}, n)
                for i, n in ((0, 1), (1, 3))]
    s = 8 / 3
    W_g = sum(w * s * (p.message.tensors[PAIR[1]].double() @ p.message.tensors[PAIR[0]].double())
              for w, p in zip((0.25, 0.75), payloads))
    new, ss, metrics = server.aggregate(server.initial_global(), {}, payloads, round_idx=1)
    assert metrics["svd_s"] >= 0 and ss == {"factored": True}  # the server knows its state is factored
    for cid in (0, 1):
        d = server.downlink(new, ss, cid, round_idx=1).tensors
        torch.testing.assert_close((s * d[PAIR[1]].double() @ d[PAIR[0]].double()), W_g, rtol=0, atol=1e-5)


def test_flexlora_low_rank_client_gets_the_best_approximation():
    server = _server("flexlora", shape_a=(4, 6), shape_b=(5, 4))  # ranks 4 and 2
    g = torch.Generator().manual_seed(2)
    payloads = [reply(i, {PAIR[0]: torch.randn(4, 6, generator=g), PAIR[1]: torch.randn(5, 4, generator=g)}, 1)
                for i in (0, 1)]
    new, ss, _ = server.aggregate(server.initial_global(), {}, payloads, round_idx=1)
    t = [p.message.tensors for p in payloads]
    W = 0.5 * (8 / 4) * t[0][PAIR[1]].double() @ t[0][PAIR[0]].double() \
        + 0.5 * (8 / 2) * t[1][PAIR[1]].double() @ t[1][PAIR[0]].double()
    U, S, Vh = torch.linalg.svd(W)
    best2 = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    d = server.downlink(new, ss, 1, round_idx=1).tensors
    torch.testing.assert_close((8 / 2) * d[PAIR[1]].double() @ d[PAIR[0]].double(), best2, rtol=0, atol=1e-5)
    # the downlink is a function of the global state: computed again it is the same, the state untouched
    before = {n: v.clone() for n, v in new.items()}
    again = server.downlink(new, ss, 1, round_idx=1).tensors
    assert all(torch.equal(again[n], d[n]) for n in d) and all(torch.equal(new[n], before[n]) for n in new)
    # before any aggregation (the server's own state says so) a client gets the common adapters truncated to
    # its rank, not re-factorised and rescaled by r_i
    first = server.downlink(new, server.initial_server_state(new), 1, round_idx=1).tensors
    assert torch.equal(first[PAIR[0]][:2], new[PAIR[0]][:2]) and first[PAIR[0]][2:].abs().sum() == 0
    assert torch.equal(first[PAIR[1]][:, :2], new[PAIR[1]][:, :2]) and not torch.equal(first[PAIR[1]], d[PAIR[1]])


def test_low_rank_client_components_stay_zero_while_training():
    from fedmoe.train import train_local

    cfg = _cfg(**{"algorithm.name": "hetlora", "train.max_steps": 3, "train.lr": 0.05, "train.weight_decay": 0.1})
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, _ = built(METHODS["hetlora"], cfg, mm)
    g = server.initial_global()
    g = {n: (torch.randn_like(t) if "lora_B" in n else t) for n, t in g.items()}
    down = server.downlink(g, {}, 1, round_idx=1)
    client.load(mm, 1, down, {})
    from fedmoe.moe import ExpertsWithLoRA, LoRALinear

    lora_modules = [m for m in mm.model.modules() if isinstance(m, (LoRALinear, ExpertsWithLoRA))]
    # HetLoRA's default: the global model's alpha / r_max on every client (its model is the global one truncated)
    assert lora_modules and all(m.scaling == 8 / 4 for m in lora_modules)
    ex = [{"input_ids": list(range(2, 20)), "labels": list(range(2, 20))} for _ in range(4)]
    train_local(mm, ex, cfg.train, pad_id=0, lr=0.05, seed=0)
    after = mm.get_state()
    for a, b in server.pairs:
        assert after[a][..., 2:, :].abs().sum() == 0 and after[b][..., :, 2:].abs().sum() == 0
        assert after[a][..., :2, :].abs().sum() > 0
    assert any(not torch.equal(after[n], t) for n, t in down.tensors.items())


def test_flexlora_run_logs_server_svd_time_and_client_ranks(tmp_path):
    from fedmoe.federation import run_federated

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=flexlora", "lora.rank=4",
                             "algorithm.budgets.ranks=[4,2]", "data.partition.num_clients=2", "data.max_examples=160",
                             "data.max_length=48", "train.max_steps=1", "train.batch_size=2", "eval.rouge=false",
                             "data.max_test_per_client=3", "federation.rounds=2", f"output_dir={tmp_path}", "name=flex"])
    summary, rd = run_federated(cfg)
    assert [c["rank"] for c in summary["clients"]] == [4, 2]
    assert summary["clients"][0]["flops_per_seq"] > summary["clients"][1]["flops_per_seq"]
    # `fedmoe flops RUN.yaml` lists each client's (k, rank) level with the figures its summary reports (the rank-2
    # client was missing: every row was at the rank built, 4)
    from fedmoe.algorithms import METHODS
    from fedmoe.algorithms.base import method_flops

    rows = {(r["k"], r["rank"]): r for r in method_flops(cfg, METHODS["flexlora"])}
    for c in summary["clients"]:
        row = rows[(c["k"], c["rank"])]
        assert row["clients"] == [c["id"]]
        assert [row[key] for key in ("flops_per_seq", "active_params", "active_trainable", "total_trainable")] == \
            [c[key] for key in ("flops_per_seq", "active_params", "active_trainable", "total_trainable")]
    assert sorted(rows) == [(1, 4), (2, 2), (2, 4)]  # the model's k halved (2, 1) at the rank built, and client 1's
    server = [r for r in rd.read_metrics() if r["kind"] == "server"]
    assert [r["round"] for r in server] == [1, 2] and all(r["svd_s"] >= 0 and r["aggregate_s"] >= r["svd_s"] for r in server)
    report = rd.report_path.read_text()
    assert "## Server per round" in report and "| round | clients aggregated | aggregate_s | svd_s |" in report
    for r in server:  # the report's rows are the logged times
        assert f"| {r['round']} | 2 | {r['aggregate_s']:.3f} s | {r['svd_s']:.3f} s |" in report
    assert "`svd_s`: time of the batched SVDs" in report


def test_hetlora_self_pruning_regularizer_by_hand():
    torch.manual_seed(0)
    A = torch.randn(4, 5, requires_grad=True)   # (r_max, in)
    B = torch.randn(3, 4, requires_grad=True)   # (out, r_max)
    reg = pruning_term([PAIR], r=4, lam=0.5, gamma=0.5)
    val = reg({PAIR[0]: A, PAIR[1]: B})
    # rank 4, γ = 0.5: the tail is components 2 and 3
    want = 0.5 * torch.linalg.matrix_norm(B.detach()[:, 2:4] @ A.detach()[2:4, :])
    torch.testing.assert_close(val.detach(), want, rtol=1e-5, atol=1e-6)
    val.backward()
    assert torch.all(A.grad[:2] == 0) and torch.all(B.grad[:, :2] == 0)  # the head is not regularised
    assert A.grad[2:].abs().sum() > 0
    # B = 0 (LoRA's initial state): the gradient stays finite
    A2, B2 = torch.randn(4, 5, requires_grad=True), torch.zeros(3, 4, requires_grad=True)
    reg({PAIR[0]: A2, PAIR[1]: B2}).backward()
    assert torch.isfinite(A2.grad).all() and torch.isfinite(B2.grad).all()
    # off by default: no private rank, no loss term
    cfg = _cfg(**{"algorithm.name": "hetlora"})
    mm = MoEModel.from_config(tiny_config("olmoe"))
    _, client, _ = built(METHODS["hetlora"], cfg, mm)
    assert client.setup(0, mm, []) == ({}, {})
    assert client.objective(0, mm, None, {}).loss_terms == []
    pruning = METHODS["hetlora"].client(_cfg(**{"algorithm.name": "hetlora", "algorithm.hetlora.prune_lambda": 0.5}))
    assert pruning.setup(0, mm, [])[0] == {"rank": 4} and pruning.setup(1, mm, [])[0] == {"rank": 2}


def test_hetlora_self_pruning_drops_the_tail_when_its_norm_falls():
    A, B = torch.ones(4, 5), torch.ones(3, 4)
    priv = {"rank": 4}
    # round 1: no previous tail norm -> keep rank 4, remember ‖B[:,2:4]A[2:4]‖ = 2·sqrt(15)
    sent, priv = prune([PAIR], {PAIR[0]: A, PAIR[1]: B}, priv, gamma=0.5)
    assert priv["rank"] == 4 and priv["tail_norm"] == pytest.approx(2 * 15 ** 0.5)
    assert torch.equal(sent[PAIR[0]], A)
    # round 2: the tail grew -> keep rank 4
    _, priv = prune([PAIR], {PAIR[0]: 2 * A, PAIR[1]: B}, priv, gamma=0.5)
    assert priv["rank"] == 4
    # round 3: the tail shrank -> rank ⌊0.5·4⌋ = 2; the reply carries zeros beyond it
    small = A.clone()
    small[2:] = 0.1
    sent, priv = prune([PAIR], {PAIR[0]: small, PAIR[1]: B}, priv, gamma=0.5)
    assert priv["rank"] == 2
    assert sent[PAIR[0]][2:].abs().sum() == 0 and sent[PAIR[1]][:, 2:].abs().sum() == 0
    # what the next round compares with: the tail of rank 2 (component 1), ‖B[:,1:2] A[1:2]‖ = sqrt(15), not the
    # old rank-4 tail (0.1·sqrt(15)·2, which the rank-2 tail would exceed and never prune again)
    assert priv["tail_norm"] == pytest.approx(15 ** 0.5)
    _, after = prune([PAIR], {PAIR[0]: 0.5 * sent[PAIR[0]], PAIR[1]: sent[PAIR[1]]}, priv, gamma=0.5)
    assert after["rank"] == 1  # rank 2's tail halved: pruned again
    # the pruned rank is the client's own: its model truncates what the server sends to rank 2
    client = METHODS["hetlora"].client(_cfg(**{"algorithm.name": "hetlora", "algorithm.hetlora.prune_lambda": 0.5}))
    from fedmoe.messages import Message

    pair = Inventory({t.name: t for t in lora_pair_info(*PAIR, A, B, Role.ATTENTION, 4, 2.0)})
    model = type("OnePair", (), {"inventory": lambda self: pair})()  # what model_state asks of the model
    state = client.model_state(0, model, Message(tensors={PAIR[0]: A, PAIR[1]: B}), priv)
    assert state[PAIR[0]][2:].abs().sum() == 0 and torch.equal(state[PAIR[0]][:2], A[:2])
    assert client.rank(0, priv) == 2 and client.rank(1, {"rank": 2}) == 2
    # with scaling: per_rank, a pruned client applies alpha/r at its pruned rank
    from fedmoe.moe import LoRALinear

    cfg = _cfg(**{"algorithm.name": "hetlora", "algorithm.hetlora.prune_lambda": 0.5,
                  "algorithm.hetlora.scaling": "per_rank"})
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, _ = built(METHODS["hetlora"], cfg, mm)
    client.load(mm, 0, server.downlink(server.initial_global(), {}, 0, round_idx=1), {"rank": 1})
    lin = next(m for m in mm.model.modules() if isinstance(m, LoRALinear))
    assert lin.scaling == pytest.approx(8 / 1)


def test_hetlora_self_pruning_run_reports_pruned_ranks(tmp_path):
    from fedmoe.federation import run_federated

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=hetlora", "lora.rank=4",
                             "algorithm.budgets.ranks=[4,2]", "data.partition.num_clients=2", "data.max_examples=160",
                             "data.max_length=48", "train.max_steps=2", "train.batch_size=2", "eval.rouge=false",
                             "algorithm.hetlora.prune_lambda=1000", "algorithm.hetlora.prune_gamma=0.5",
                             "train.lr=0.01", "data.max_test_per_client=3", "federation.rounds=3",
                             f"output_dir={tmp_path}", "name=prune"])
    summary, rd = run_federated(cfg)
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    ranks = [c["rank"] for c in summary["clients"]]
    assert ranks == [int(ck["transport"]["private"][i]["rank"]) for i in range(2)]
    assert not any("rank" in n for n in ck["global_state"])  # the rank is private, not global state
    assert ranks[0] < 4 and ranks[1] < 2 and min(ranks) >= 1  # a strong λ shrinks every tail, so both prune


@pytest.mark.parametrize("method,scaling,want", [("hetlora", "shared", 8 / 4), ("hetlora", "per_rank", 8 / 2),
                                                 ("flexlora", None, 8 / 2), ("trivial", None, 8 / 2)])
def test_lora_scaling_of_a_low_rank_client(method, scaling, want):
    """The rank-2 client's attention LoRA output, by hand: scaling x B[:, :2] A[:2] x. HetLoRA by default
    applies alpha/r_max (a rank-2 client is the global model truncated), FlexLoRA and the trivial
    baseline alpha/r_i (FlexLoRA's formula divides by it)."""
    from fedmoe.moe import LoRALinear

    extra = {} if scaling is None else {"algorithm.hetlora.scaling": scaling}
    cfg = _cfg(**{"algorithm.name": method, **extra})
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, _ = built(METHODS[method], cfg, mm)
    gen = torch.Generator().manual_seed(0)
    g = {n: torch.randn(t.shape, generator=gen) for n, t in server.initial_global().items()}
    if method == "trivial":
        g = dict(server.downlink(g, {}, 1, round_idx=1).tensors)  # everyone at the smallest rank
    client.load(mm, 1, Message(tensors=server.downlink(g, {}, 1, round_idx=1).tensors), {})
    lin = next(m for m in mm.model.modules() if isinstance(m, LoRALinear))
    x = torch.randn(3, lin.lora_A.shape[1], generator=gen)
    got = lin(x) - lin.base(x)
    A, B = lin.lora_A.detach()[:2], lin.lora_B.detach()[:, :2]
    torch.testing.assert_close(got, want * (x @ A.T @ B.T), rtol=1e-5, atol=1e-5)
    assert lin.lora_A.detach()[2:].abs().sum() == 0  # truncated to rank 2


def test_fedprox_under_self_pruning_keeps_the_pruned_components_zero():
    """FedProx's reference was the message as sent (the server's rank-4 truncation) while the client's model was
    pruned to rank 2: the proximal pull −μ·ref filled the components beyond rank 2 as it trained (118 after three
    steps). The reference is what the client loaded: the pruned components stay zero while it trains."""
    from fedmoe.algorithms import METHODS
    from fedmoe.algorithms.base import ModelSpec
    from fedmoe.algorithms.rank_hetero import lora_pairs
    from fedmoe.config import load_config
    from fedmoe.moe import MoEModel
    from fedmoe.moe.tiny import tiny_config
    from fedmoe.train import train_local

    tails = {}
    for mu in (0.0, 1.0):
        cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=hetlora", "lora.rank=4",
                                 "algorithm.budgets.ranks=[4,2]", "data.partition.num_clients=2",
                                 "algorithm.hetlora.prune_lambda=0.1", f"algorithm.fedit.proximal_mu={mu}",
                                 "train.max_steps=3", "train.batch_size=2", "train.lr=0.01"])
        torch.manual_seed(0)
        mm = MoEModel.from_config(tiny_config("olmoe"))
        method = METHODS["hetlora"]
        method.client.build(cfg, mm)
        spec = ModelSpec.of(mm, method.client.private_roles)
        server, client = method.server(cfg, spec), method.client(cfg)
        g = {n: t + 0.05 * torch.randn_like(t) for n, t in server.initial_global().items()}  # every component set
        msg = server.downlink(g, {}, 0, round_idx=3)  # client 0's budget: rank 4
        private = {"rank": 2, "tail_norm": 1.0}  # self-pruned to rank 2 in an earlier round
        client.load(mm, 0, msg, private)
        pairs = lora_pairs(mm.inventory())

        def tail():
            state = mm.get_state()
            return sum(float(state[a][..., 2:, :].abs().sum() + state[b][..., :, 2:].abs().sum()) for a, b in pairs)

        assert tail() == 0.0
        examples = [{"input_ids": torch.randint(2, 100, (12,)).tolist(), "labels": torch.randint(2, 100, (12,)).tolist()}
                    for _ in range(4)]
        train_local(mm, examples, cfg.train, 0, 0.01, seed=0, objective=client.objective(0, mm, msg, private))
        tails[mu] = tail()
    assert tails == {0.0: 0.0, 1.0: 0.0}
