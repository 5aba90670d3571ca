"""FLAME: activation-aware aggregation against hand computations, its t = 0 reduction to FedIT,
budgets, the private rescaler, and a real (tiny) FLAME run."""

import pytest
import torch

from helpers import built, reply

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.budgets import BudgetConfig, client_levels, default_top_k_levels
from fedmoe.algorithms.flame import COUNTS, TOKENS, activation_aware_average
from fedmoe.config import load_config
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config

NAME = "model.layers.0.mlp.experts.down_lora_A"


def _average(g, clients, temperature):
    """clients: (values, counts, tokens, n) of one layer with 3 experts."""
    return activation_aware_average(g, [{NAME: torch.tensor(v).reshape(3, 1)} for v, _, _, _ in clients],
                                    [torch.tensor([c]) for _, c, _, _ in clients],
                                    [torch.tensor([t]) for _, _, t, _ in clients],
                                    [n for *_, n in clients], {NAME: 0}, temperature)[NAME].flatten()


def test_activation_aware_average_by_hand():
    g = {NAME: torch.tensor([9.0, 9.0, 9.0]).reshape(3, 1)}
    # layer saw 20 tokens, k=2 -> 40 assignments
    out = _average(g, [([1.0, 2.0, 3.0], [30, 10, 0], 20, 1), ([5.0, 6.0, 7.0], [10, 10, 0], 10, 2)], 2.0)
    # expert 0: γ1 = (30/20)^2·1 = 2.25, γ2 = (10/10)^2·2 = 2 -> (2.25·1 + 2·5) / 4.25
    assert out[0].item() == pytest.approx((2.25 * 1 + 2 * 5) / 4.25)
    # expert 1: γ1 = (10/20)^2·1 = 0.25, γ2 = 1·2 = 2 -> (0.25·2 + 2·6) / 2.25
    assert out[1].item() == pytest.approx((0.25 * 2 + 2 * 6) / 2.25)
    # expert 2: nobody routed to it -> keeps the previous global value
    assert out[2].item() == 9.0


def test_temperature_zero_is_exactly_fedavg():
    g = {NAME: torch.zeros(3, 1)}
    out = _average(g, [([1.0, 2.0, 3.0], [30, 10, 0], 20, 1), ([5.0, 6.0, 7.0], [10, 10, 0], 10, 3)], 0.0)
    assert out.tolist() == pytest.approx([(1 + 15) / 4, (2 + 18) / 4, (3 + 21) / 4])


def test_flame_aggregate_with_t0_equals_fedit_on_a_real_model():
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.flame.temperature=0", "lora.rank=2",
                             "data.partition.num_clients=2"])
    server, client, spec = built(METHODS["flame"], cfg, MoEModel.from_config(tiny_config("olmoe")))
    fedit = METHODS["fedit"].server(cfg, spec)
    g = server.initial_global()
    assert not any("output_scale" in k for k in g)  # the rescaler is private: not in the global state
    torch.manual_seed(0)
    replies = []
    for cid, n in ((0, 3), (1, 5)):
        t = {k: torch.randn_like(v) for k, v in server.downlink(g, {}, cid).tensors.items()}
        counts = torch.randint(0, 50, (2, 8))
        counts[0, 3] = 0  # an expert one client never used still averages at t = 0
        replies.append(reply(cid, {**t, COUNTS: counts, TOKENS: torch.tensor([40, 40])}, n))
    new_flame, _, _ = server.aggregate(g, {}, replies)
    plain = [reply(r.client, {k: v for k, v in r.message.tensors.items() if k in g}, r.message.scalars["n_train"])
             for r in replies]
    new_fedit, _, _ = fedit.aggregate(g, {}, plain)
    assert set(new_flame) == set(new_fedit) == set(g)
    for k, v in new_fedit.items():
        torch.testing.assert_close(new_flame[k], v, rtol=0, atol=1e-6)


def test_budget_levels_and_assignment():
    assert default_top_k_levels(8) == [8, 4, 2, 1]
    assert default_top_k_levels(2) == [2, 1, 1, 1]
    assert client_levels(BudgetConfig(), 4, 6, seed=0) == [0, 1, 2, 3, 0, 1]
    assert client_levels(BudgetConfig(assign="map", map=[3, 3, 0]), 4, 3, 0) == [3, 3, 0]
    d = BudgetConfig(assign="distribution", probs=[0.5, 0.5, 0, 0])
    assert client_levels(d, 4, 40, 1) == client_levels(d, 4, 40, 1)
    assert set(client_levels(d, 4, 40, 1)) == {0, 1}
    with pytest.raises(ValueError, match="valid levels are 0..3"):
        client_levels(BudgetConfig(assign="map", map=[4]), 4, 1, 0)


def test_rescaler_variants_scale_the_routed_output():
    mm = MoEModel.from_config(tiny_config("olmoe"))
    ids = torch.randint(2, 128, (1, 6))
    captured = []
    h = mm.layers[0].block.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    mm.model(ids)
    mm.add_output_scale(init=1.0, trainable=False)
    mm.set_output_scale(2.5)
    mm.model(ids)
    h.remove()
    torch.testing.assert_close(captured[1], 2.5 * captured[0])


TINY = ["data.max_examples=240", "data.max_length=64", "train.max_steps=2", "train.batch_size=2",
        "eval.max_examples=2", "eval.max_new_tokens=3", "data.max_test_per_client=4", "lora.rank=4",
        "model.name=builtin:tiny-olmoe", "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]",
        "data.partition.num_clients=2", "eval.zero_shot=false"]


def test_flame_run_keeps_rescaler_private_and_counts_uplink(tmp_path):
    from fedmoe.federation import resume_federated, run_federated

    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=flame", "federation.rounds=2", "train.lr=0.05"])
    summary, rd = run_federated(cfg)
    assert [c["k"] for c in summary["clients"]] == [2, 1]
    # activation counts travel up: 4 layers x 8 experts + 4 token totals, int64; and n_i
    rows = [r for r in rd.read_metrics() if r["split"] == "train"]
    assert all(r["bytes_up"] == r["bytes_down"] + (4 * 8 + 4) * 8 + 8 for r in rows)
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    assert all(n.endswith(".experts.output_scale") for c in (0, 1) for n in ck["transport"]["private"][c])
    scales = [ck["transport"]["private"][c][n].item() for c in (0, 1) for n in sorted(ck["transport"]["private"][c])]
    assert len(scales) == 8 and all(s != 1.0 for s in scales)  # learned, per client, per layer
    # a resumed FLAME run (private rescalers restored) ends with the same numbers
    cut, rd2 = run_federated(load_config(None, TINY + [f"output_dir={tmp_path}", "name=cut", "federation.rounds=2",
                                                       "train.lr=0.05"]), stop_after_round=1)
    resumed, _ = resume_federated(rd2.path)
    assert [c["loss"] for c in resumed["clients"]] == [c["loss"] for c in summary["clients"]]
