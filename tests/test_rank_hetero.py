"""Rank-heterogeneous baselines: HetLoRA padding/truncation and norm weights, FlexLoRA's SVD
redistribution, and zero components staying zero while a low-rank client trains."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from fedmoe.algorithms import FlexLoRA, HetLoRA, Payload
from fedmoe.algorithms.rank_hetero import default_rank_levels, frobenius_of_product, lora_pairs, truncate_rank
from fedmoe.config import load_config
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config

PAIR = ("m.q_proj.lora_A", "m.q_proj.lora_B")


def test_rank_ladder_and_pairs():
    assert default_rank_levels(20) == [20, 12, 8, 6]
    names = ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B",
             "model.layers.0.mlp.experts.gate_up_lora_A", "model.layers.0.mlp.experts.gate_up_lora_B",
             "model.layers.0.mlp.experts.output_scale"]
    assert lora_pairs(names) == [("model.layers.0.mlp.experts.gate_up_lora_A", "model.layers.0.mlp.experts.gate_up_lora_B"),
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


def _alg(cls, pairs=(PAIR,)):
    alg = cls(_cfg(**{"algorithm.name": cls.name}))
    alg.rank_levels, alg.r_max, alg.level_of, alg.pairs = [4, 2], 4, [0, 1], list(pairs)
    return alg


def test_hetlora_weights_by_update_norm_by_hand():
    alg = _alg(HetLoRA)
    A1, B1 = torch.zeros(4, 3), torch.zeros(2, 4)
    A1[0, 0], B1[0, 0] = 1.0, 3.0  # ‖B1 A1‖ = 3
    A2, B2 = torch.zeros(4, 3), torch.zeros(2, 4)
    A2[1, 1], B2[1, 1] = 1.0, 1.0  # rank-2 client, ‖B2 A2‖ = 1
    p = [Payload(0, {PAIR[0]: A1, PAIR[1]: B1}, 10), Payload(1, {PAIR[0]: A2, PAIR[1]: B2}, 10)]
    new, st = alg.aggregate({PAIR[0]: torch.zeros(4, 3), PAIR[1]: torch.zeros(2, 4)}, p, {})
    assert st["last_weights"] == pytest.approx([3.0, 1.0])
    torch.testing.assert_close(new[PAIR[0]], 0.75 * A1 + 0.25 * A2)
    torch.testing.assert_close(new[PAIR[1]], 0.75 * B1 + 0.25 * B2)
    # the rank-2 client receives the first 2 components only
    down = alg.downlink(new, 1)
    assert down[PAIR[0]][2:].abs().sum() == 0 and down[PAIR[1]][:, 2:].abs().sum() == 0
    assert torch.equal(alg.downlink(new, 0)[PAIR[0]], new[PAIR[0]])


def test_flexlora_is_exact_when_every_client_has_full_rank():
    alg = _alg(FlexLoRA)
    alg.rank_levels, alg.r_max = [3, 3], 3  # out=3, in=5: rank 3 is full rank
    g = torch.Generator().manual_seed(1)
    payloads = [Payload(i, {PAIR[0]: torch.randn(3, 5, generator=g), PAIR[1]: torch.randn(3, 3, generator=g)}, n)
                for i, n in ((0, 1), (1, 3))]
    s = 8 / 3
    W_g = sum(w * s * (p.tensors[PAIR[1]].double() @ p.tensors[PAIR[0]].double())
              for w, p in zip((0.25, 0.75), payloads))
    new, st = alg.aggregate({PAIR[0]: torch.zeros(3, 5), PAIR[1]: torch.zeros(3, 3)}, payloads, {})
    assert st["svd_seconds"] >= 0
    for cid in (0, 1):
        d = alg.downlink(new, cid)
        torch.testing.assert_close((s * d[PAIR[1]].double() @ d[PAIR[0]].double()), W_g, rtol=0, atol=1e-5)


def test_flexlora_low_rank_client_gets_the_best_approximation():
    alg = _alg(FlexLoRA)  # ranks 4 and 2
    g = torch.Generator().manual_seed(2)
    payloads = [Payload(i, {PAIR[0]: torch.randn(4, 6, generator=g), PAIR[1]: torch.randn(5, 4, generator=g)}, 1)
                for i in (0, 1)]
    new, _ = alg.aggregate({PAIR[0]: torch.zeros(4, 6), PAIR[1]: torch.zeros(5, 4)}, payloads, {})
    W = 0.5 * (8 / 4) * payloads[0].tensors[PAIR[1]].double() @ payloads[0].tensors[PAIR[0]].double() \
        + 0.5 * (8 / 2) * payloads[1].tensors[PAIR[1]].double() @ payloads[1].tensors[PAIR[0]].double()
    U, S, Vh = torch.linalg.svd(W)
    best2 = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    d = alg.downlink(new, 1)
    torch.testing.assert_close((8 / 2) * d[PAIR[1]].double() @ d[PAIR[0]].double(), best2, rtol=0, atol=1e-5)


def test_low_rank_client_components_stay_zero_while_training():
    from fedmoe.train import train_local

    cfg = _cfg(**{"algorithm.name": "hetlora", "train.max_steps": 3, "train.lr": 0.05, "train.weight_decay": 0.1})
    mm = MoEModel.from_config(tiny_config("olmoe"))
    alg = HetLoRA(cfg)
    alg.setup(mm)
    g = mm.get_state()
    g = {n: (torch.randn_like(t) if "lora_B" in n else t) for n, t in g.items()}
    mm.load_state(alg.downlink(g, 1))
    alg.prepare_client(mm, 1)
    from fedmoe.moe import ExpertsWithLoRA, LoRALinear

    lora_modules = [m for m in mm.model.modules() if isinstance(m, (LoRALinear, ExpertsWithLoRA))]
    assert lora_modules and all(m.scaling == 8 / 2 for m in lora_modules)  # alpha / r_i
    ex = [{"input_ids": list(range(2, 20)), "labels": list(range(2, 20))} for _ in range(4)]
    train_local(mm, ex, cfg.train, pad_id=0, lr=0.05, seed=0)
    after = mm.get_state()
    for a, b in alg.pairs:
        assert after[a][..., 2:, :].abs().sum() == 0 and after[b][..., :, 2:].abs().sum() == 0
        assert after[a][..., :2, :].abs().sum() > 0
    assert any(not torch.equal(after[n], t) for n, t in alg.downlink(g, 1).items())


def test_flexlora_run_logs_server_svd_time_and_client_ranks(tmp_path):
    from fedmoe.federation import run_federated

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "algorithm.name=flexlora", "lora.rank=4",
                             "algorithm.budgets.ranks=[4,2]", "data.partition.num_clients=2", "data.max_examples=160",
                             "data.max_length=48", "train.max_steps=1", "train.batch_size=2", "eval.rouge=false",
                             "data.max_test_per_client=3", "federation.rounds=2", f"output_dir={tmp_path}", "name=flex"])
    summary, rd = run_federated(cfg)
    assert [c["rank"] for c in summary["clients"]] == [4, 2]
    assert summary["clients"][0]["flops_per_seq"] > summary["clients"][1]["flops_per_seq"]
    server = [r for r in rd.read_metrics() if r["split"] == "server"]
    assert [r["round"] for r in server] == [1, 2] and all(r["svd_s"] >= 0 and r["aggregate_s"] >= r["svd_s"] for r in server)
    report = rd.report_path.read_text()
    assert "## Server time per round" in report
    for r in server:  # the report's rows are the logged times
        assert f"| {r['round']} | 2 | {r['aggregate_s']:.3f} s | {r['svd_s']:.3f} s |" in report


def _pruning_alg(lam=0.5, gamma=0.5):
    alg = HetLoRA(_cfg(**{"algorithm.name": "hetlora", "algorithm.hetlora.prune_lambda": lam,
                          "algorithm.hetlora.prune_gamma": gamma}))
    alg.rank_levels, alg.r_max, alg.level_of, alg.pairs = [4, 2], 4, [0, 1], [PAIR]
    return alg


def test_hetlora_self_pruning_regularizer_by_hand():
    alg = _pruning_alg(lam=0.5, gamma=0.5)
    assert alg.init_private(0, None) == {"__rank": 4}
    torch.manual_seed(0)
    A = torch.randn(4, 5, requires_grad=True)   # (r_max, in)
    B = torch.randn(3, 4, requires_grad=True)   # (out, r_max)
    reg = alg.local_regularizer(0, {"__rank": 4})
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
    assert _alg(HetLoRA).local_regularizer(0, {}) is None  # off by default


def test_hetlora_self_pruning_drops_the_tail_when_its_norm_falls():
    alg = _pruning_alg(lam=0.5, gamma=0.5)
    A, B = torch.ones(4, 5), torch.ones(3, 4)
    priv = alg.init_private(0, None)
    # round 1: no previous tail norm -> keep rank 4, remember ‖B[:,2:4]A[2:4]‖ = 2·sqrt(15)
    priv = alg.private_after_training(0, {PAIR[0]: A, PAIR[1]: B}, priv)
    assert priv["__rank"] == 4 and priv["__tail_norm"] == pytest.approx(2 * 15 ** 0.5)
    p = alg.payload(0, {PAIR[0]: A, PAIR[1]: B}, 10)
    assert p.extra == {"rank": 4} and torch.equal(p.tensors[PAIR[0]], A)
    # round 2: the tail grew -> keep rank 4
    priv = alg.private_after_training(0, {PAIR[0]: 2 * A, PAIR[1]: B}, priv)
    assert priv["__rank"] == 4
    alg.payload(0, {PAIR[0]: 2 * A, PAIR[1]: B}, 10)
    # round 3: the tail shrank -> rank ⌊0.5·4⌋ = 2; the payload carries zeros beyond it
    small = A.clone()
    small[2:] = 0.1
    priv = alg.private_after_training(0, {PAIR[0]: small, PAIR[1]: B}, priv)
    assert priv["__rank"] == 2
    p = alg.payload(0, {PAIR[0]: small, PAIR[1]: B}, 10)
    assert p.extra == {"rank": 2}
    assert p.tensors[PAIR[0]][2:].abs().sum() == 0 and p.tensors[PAIR[1]][:, 2:].abs().sum() == 0
    # the server records it and from then on truncates that client's downlink to rank 2
    other = Payload(1, {PAIR[0]: A, PAIR[1]: B}, 10)
    g, _ = alg.aggregate({PAIR[0]: A, PAIR[1]: B}, [p, other], {})
    assert alg.current_rank(0, g) == 2 and alg.current_rank(1, g) == 2  # client 1's budget rank is 2
    d = alg.downlink(g, 0)
    assert set(d) == set(PAIR) and d[PAIR[0]][2:].abs().sum() == 0
    g2, _ = alg.aggregate(g, [Payload(1, {PAIR[0]: A, PAIR[1]: B}, 10)], {})
    assert alg.current_rank(0, g2) == 2  # a client that sat out keeps its pruned rank


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
    assert ranks == [int(ck["private"][i]["__rank"]) for i in range(2)]
    assert ranks[0] < 4 and ranks[1] < 2 and min(ranks) >= 1  # a strong λ shrinks every tail, so both prune
