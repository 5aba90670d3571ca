"""FLAME: activation-aware aggregation against hand computations, its t = 0 reduction to FedIT,
budgets, the private rescaler (its own learning rate, no weight decay, reported per client), one
expert per layer, the split layout with router LoRA, and real (tiny) FLAME runs."""

import pytest
import torch

from helpers import built, reply

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.budgets import BudgetConfig, client_levels, default_top_k_levels
from fedmoe.algorithms.flame import COUNTS, TOKENS, activation_aware_average
from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.moe import MoEModel, Role
from fedmoe.moe.tiny import tiny_config
from fedmoe.train import train_local

NAME = "model.layers.0.mlp.experts.down_lora_A"


def _average(g, clients, temperature):
    """clients: (values, counts, tokens, n) of one layer with 3 experts."""
    return activation_aware_average(g, [{NAME: torch.tensor(v).reshape(3, 1)} for v, _, _, _ in clients],
                                    [torch.tensor([c]) for _, c, _, _ in clients],
                                    [torch.tensor([t]) for _, _, t, _ in clients],
                                    [n for *_, n in clients], {NAME: 0}, temperature)[NAME].flatten()


def test_activation_aware_average_by_hand():
    g = {NAME: torch.tensor([9.0, 9.0, 9.0]).reshape(3, 1)}
    # k = 1: each token goes to one expert, so a layer's counts sum to its tokens S and a/S <= 1
    out = _average(g, [([1.0, 2.0, 3.0], [15, 5, 0], 20, 1), ([5.0, 6.0, 7.0], [4, 6, 0], 10, 2)], 2.0)
    # expert 0: γ1 = (15/20)^2·1 = 0.5625, γ2 = (4/10)^2·2 = 0.32 -> (0.5625·1 + 0.32·5) / 0.8825
    assert out[0].item() == pytest.approx((0.5625 * 1 + 0.32 * 5) / 0.8825, rel=1e-6)
    # expert 1: γ1 = (5/20)^2·1 = 0.0625, γ2 = (6/10)^2·2 = 0.72 -> (0.0625·2 + 0.72·6) / 0.7825
    assert out[1].item() == pytest.approx((0.0625 * 2 + 0.72 * 6) / 0.7825, rel=1e-6)
    # expert 2: nobody routed to it -> keeps the previous global value
    assert out[2].item() == 9.0


def test_activation_aware_average_uses_each_layers_own_counts():
    """Two MoE layers with different counts: catches weights taken from layer 0's counts (or any one
    layer's) for every layer. k = 1, so each layer's counts sum to S and a/S <= 1."""
    names = ["model.layers.0.mlp.experts.down_lora_A", "model.layers.1.mlp.experts.gate_up_lora_B"]
    g = {n: torch.full((3, 1), 9.0) for n in names}
    values = [{names[0]: [1.0, 2.0, 3.0], names[1]: [10.0, 20.0, 30.0]},  # client 1, n = 1, S = 4
              {names[0]: [5.0, 6.0, 7.0], names[1]: [50.0, 60.0, 70.0]}]  # client 2, n = 3, S = 5
    counts = [torch.tensor([[2, 2, 0], [1, 0, 3]]), torch.tensor([[5, 0, 0], [0, 4, 1]])]
    tokens = [torch.tensor([4, 4]), torch.tensor([5, 5])]
    out = activation_aware_average(g, [{n: torch.tensor(v[n]).reshape(3, 1) for n in names} for v in values],
                                   counts, tokens, [1, 3], {names[0]: 0, names[1]: 1}, temperature=2.0)
    l0, l1 = out[names[0]].flatten().tolist(), out[names[1]].flatten().tolist()
    # layer 0, expert 0: γ1 = (2/4)^2·1 = 0.25, γ2 = (5/5)^2·3 = 3
    assert l0[0] == pytest.approx((0.25 * 1 + 3 * 5) / 3.25, rel=1e-6)
    # layer 0, expert 1: γ1 = 0.25, γ2 = 0 -> client 1's value
    assert l0[1] == pytest.approx(2.0, rel=1e-6)
    # layer 0, expert 2: nobody routed to it -> global value
    assert l0[2] == 9.0
    # layer 1, expert 0: γ1 = (1/4)^2·1 = 0.0625, γ2 = 0 -> client 1's value
    assert l1[0] == pytest.approx(10.0, rel=1e-6)
    # layer 1, expert 1: γ1 = 0, γ2 = (4/5)^2·3 = 1.92 -> client 2's value
    assert l1[1] == pytest.approx(60.0, rel=1e-6)
    # layer 1, expert 2: γ1 = (3/4)^2·1 = 0.5625, γ2 = (1/5)^2·3 = 0.12
    assert l1[2] == pytest.approx((0.5625 * 30 + 0.12 * 70) / 0.6825, rel=1e-6)


def test_temperature_zero_is_exactly_fedavg():
    g = {NAME: torch.zeros(3, 1)}
    out = _average(g, [([1.0, 2.0, 3.0], [15, 5, 0], 20, 1), ([5.0, 6.0, 7.0], [4, 6, 0], 10, 3)], 0.0)
    assert out.tolist() == pytest.approx([(1 + 15) / 4, (2 + 18) / 4, (3 + 21) / 4])


def _routed_counts(gen, tokens, k, num_experts, never=()):
    """Counts of a layer that routed ``tokens`` tokens to k distinct experts each (never to ``never``):
    every count is <= tokens and the counts sum to k·tokens, as a real router's do."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in never])
    picks = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(tokens)])
    return torch.bincount(picks.flatten(), minlength=num_experts)


def test_flame_aggregate_with_t0_equals_fedit_on_a_real_model():
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.flame.temperature=0", "lora.rank=2",
                             "data.partition.num_clients=2"])
    server, client, spec = built(METHODS["flame"], cfg, MoEModel.from_config(tiny_config("olmoe")))
    fedit = METHODS["fedit"].server(cfg, spec)
    g = server.initial_global()
    assert not any("output_scale" in k for k in g)  # the rescaler is private: not in the global state
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    replies = []
    for cid, n in ((0, 3), (1, 5)):
        t = {k: torch.randn_like(v) for k, v in server.downlink(g, {}, cid, round_idx=1).tensors.items()}
        # 40 tokens per layer, k = 2; client 0's layer 0 never used expert 3 (it still averages at t = 0)
        counts = torch.stack([_routed_counts(gen, 40, 2, 8, never=(3,) if cid == 0 and layer == 0 else ())
                              for layer in range(2)])
        replies.append(reply(cid, {**t, COUNTS: counts, TOKENS: torch.tensor([40, 40])}, n))
    new_flame, _, _ = server.aggregate(g, {}, replies, round_idx=1)
    plain = [reply(r.client, {k: v for k, v in r.message.tensors.items() if k in g}, r.message.scalars["n_train"])
             for r in replies]
    new_fedit, _, _ = fedit.aggregate(g, {}, plain, round_idx=1)
    assert set(new_flame) == set(new_fedit) == set(g)
    for k, v in new_fedit.items():
        torch.testing.assert_close(new_flame[k], v, rtol=0, atol=1e-6)


def test_flame_weights_experts_by_moe_layer_when_the_first_decoder_layer_is_dense():
    """Qwen2-MoE with a dense decoder layer 0 (``mlp_only_layers=[0]``): the expert LoRA of decoder
    layers 1 and 2 belongs to MoE layers 0 and 1, so it must be weighted with rows 0 and 1 of the
    (MoE layers, experts) counts. Catches indexing the counts by the decoder layer (the wrong row for
    decoder layer 1, no row at all for decoder layer 2) or an off-by-one between the two indices."""
    mc = tiny_config("qwen2_moe", num_layers=3)
    mc.mlp_only_layers = [0]
    mm = MoEModel.from_config(mc)
    assert [(layer.decoder_layer, layer.index) for layer in mm.layers] == [(1, 0), (2, 1)]
    moe_of_decoder = {1: 0, 2: 1}
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.flame.temperature=1", "lora.rank=2",
                             "data.partition.num_clients=2"])
    server, _, _ = built(METHODS["flame"], cfg, mm)
    g = server.initial_global()
    experts = {name: int(name.split(".")[2]) for name in g if ".mlp.experts." in name}
    assert sorted(set(experts.values())) == [1, 2]
    assert server.layer_of == {name: moe_of_decoder[d] for name, d in experts.items()}
    # each client's counts come from a real forward pass of the tiny model (MoE layers 0 and 1)
    gen = torch.Generator().manual_seed(0)
    replies, per_client = [], []
    for cid, n in ((0, 2), (1, 5)):
        ids = torch.randint(2, 128, (1, 6 + 4 * cid), generator=gen)
        mm.reset_activation_counts()
        with mm.tracking(torch.ones_like(ids)):
            mm.model(ids)
        counts, tokens = mm.activation_counts()
        assert counts.shape == (2, 8) and tokens.tolist() == [ids.numel()] * 2
        t = {k: torch.randn(v.shape, generator=gen) for k, v in g.items()}
        per_client.append((t, counts, tokens, n))
        replies.append(reply(cid, {**t, COUNTS: counts, TOKENS: tokens}, n))
    assert not torch.equal(per_client[0][1][0], per_client[0][1][1])  # the two layers routed differently
    new, _, _ = server.aggregate(g, {}, replies, round_idx=1)
    for name, value in g.items():
        if name not in experts:  # attention LoRA: plain n-weighted average
            expected = sum(t[name].double() * n for t, _, _, n in per_client) / 7
        else:  # γ_i = (a_i^{l,j} / S_i^l)^1 · n_i with l the MoE layer of this decoder layer
            layer = moe_of_decoder[experts[name]]
            expected = value.double().clone()
            for j in range(8):
                gammas = [c[layer, j].item() / s[layer].item() * n for _, c, s, n in per_client]
                if sum(gammas) > 0:
                    expected[j] = sum(gm * t[name][j].double() for gm, (t, *_) in zip(gammas, per_client)) / sum(gammas)
        torch.testing.assert_close(new[name].double(), expected, rtol=0, atol=1e-6, msg=name)


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


def test_the_static_rescaler_is_k_over_k_i():
    """rescaler: static sets s_i = k / k_i (the full model's k over the client's): 2 for a client at k_i = 1
    of k = 2, 1 at full k and for the global model; 'none' keeps 1. An inverted ratio (k_i / k) gives 0.5."""
    from helpers import built

    from fedmoe.algorithms import METHODS
    from fedmoe.config import load_config

    for variant, want in (("static", {0: 1.0, 1: 2.0, None: 1.0}), ("none", {0: 1.0, 1: 1.0, None: 1.0})):
        cfg = load_config(None, ["algorithm.name=flame", f"algorithm.flame.rescaler={variant}", "lora.rank=2",
                                 "algorithm.client_top_k=[2,1]", "data.partition.num_clients=2"])
        mm = MoEModel.from_config(tiny_config("olmoe"))
        assert mm.default_top_k == 2
        server, client, _ = built(METHODS["flame"], cfg, mm)
        g = server.initial_global()
        ss = server.initial_server_state(g)
        assert client.setup(1, mm, [])[0] == {}  # nothing private: the rescaler is a setting
        for cid, scale in want.items():
            client.load(mm, cid, server.downlink(g, ss, cid, round_idx=1), {})
            scales = [float(layer.block.experts.output_scale) for layer in mm.layers]
            assert scales == [scale] * len(mm.layers), (variant, cid, scales)
            assert mm.top_k == ([2, 1][cid] if cid is not None else 2)


def test_a_router_that_renormalises_its_top_k_weights_refuses_the_static_ratio():
    """The static rescaler k/k_i (and rescaler_init: ratio) makes up for the routed output a k_i client loses where
    the routing weights are the full softmax's (OLMoE, norm_topk_prob false: half of it at k_i = 1 of 2, measured
    here). Where the router renormalises (Qwen3-MoE's norm_topk_prob, Granite's softmax over the top-k) the top-k
    weights sum to 1 at any k and nothing is lost: there the ratio is refused, naming the setting and the fix. The
    learned rescaler from 1 and 'none' are taken; so is the ratio where every client runs at the full k."""
    from fedmoe.algorithms.base import check_top_k

    def half(arch, *sets, ks="[2,1]", **model):
        cfg = load_config(None, ["algorithm.name=flame", "lora.rank=2", f"algorithm.client_top_k={ks}",
                                 "data.partition.num_clients=2", *sets])
        mm = MoEModel.from_config(tiny_config(arch, **model))
        METHODS["flame"].client.build(cfg, mm)
        return METHODS["flame"].client(cfg), mm

    for arch, sets, refused in (("olmoe", ["algorithm.flame.rescaler=static"], False),
                                ("qwen3_moe", ["algorithm.flame.rescaler=static"], True),
                                ("granitemoe", ["algorithm.flame.rescaler_init=ratio"], True),
                                ("qwen3_moe", ["algorithm.flame.rescaler=learned"], False),
                                ("granitemoe", ["algorithm.flame.rescaler=none"], False)):
        client, mm = half(arch, *sets)
        if refused:
            with pytest.raises(ValueError, match=rf"{sets[0].split('=')[0]}: .* this {arch} model's router .* "
                                                  r"k_i = 1 .* multiply its output by 2: use"):
                check_top_k(client, mm, 2)
        else:
            check_top_k(client, mm, 2)
    check_top_k(*half("qwen3_moe", "algorithm.flame.rescaler=static", ks="[2,2]"), 2)
    # what the ratio is for, measured: OLMoE's routed weights at k = 1 sum to about half of those at k = 2
    sums = {}
    mm = MoEModel.from_config(tiny_config("olmoe"))
    def keep(module, args):  # the top-k weights the experts receive, by k (returns None: args unchanged)
        sums.setdefault(mm.top_k, args[2].sum(-1))
    mm.layers[0].block.experts.register_forward_pre_hook(keep)
    ids = torch.randint(2, 128, (2, 9))
    for k in (2, 1):
        mm.set_top_k(k)
        mm.model(ids)
    assert 0.4 < float((sums[1] / sums[2]).mean()) < 0.6


TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "data.max_examples=240", "data.max_length=64", "train.max_steps=2", "train.batch_size=2",
        "eval.max_examples=2", "eval.max_new_tokens=3", "data.max_test_per_client=4", "lora.rank=4",
        "model.name=builtin:tiny-olmoe", "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]",
        "data.partition.num_clients=2", "eval.zero_shot=false"]


def test_flame_run_keeps_rescaler_private_and_counts_uplink(tmp_path):
    from fedmoe.federation import resume_federated

    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=flame", "federation.rounds=2", "train.lr=0.05"])
    summary, rd = run_federated(cfg)
    assert [c["k"] for c in summary["clients"]] == [2, 1]
    # activation counts travel up: 4 layers x 8 experts + 4 token totals, int64; and n_i
    rows = [r for r in rd.read_metrics() if r["kind"] == "train"]
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


EXAMPLES = [{"input_ids": list(range(2 + i, 26 + i)), "labels": [-100] * 4 + list(range(6 + i, 26 + i))}
            for i in range(8)]


def _flame_step(*sets):
    """One AdamW step of a FLAME client (k_i = 1 of 2) from rescaler 1: (rescaler move, largest LoRA move)."""
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.budgets.top_k=[1]", "data.partition.num_clients=1",
                             "lora.rank=2", "train.max_steps=1", "train.batch_size=4", "train.grad_clip=null",
                             "train.lr=1e-4", *sets])
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, _ = built(METHODS["flame"], cfg, mm)
    private, _ = client.setup(0, mm, EXAMPLES)
    down = server.downlink(server.initial_global(), {}, 0, round_idx=1)
    client.load(mm, 0, down, private)
    before = mm.get_state()
    train_local(mm, EXAMPLES, cfg.train, pad_id=0, lr=cfg.train.lr, seed=0,
                objective=client.objective(0, mm, down, private))
    after = mm.get_state()
    moves = {n: (after[n] - before[n]).abs().max().item() for n in after}
    rescalers = set(mm.inventory().names(Role.RESCALER))
    scale = [v for n, v in moves.items() if n in rescalers]
    lora = max(v for n, v in moves.items() if n not in rescalers)
    return scale, lora


def test_rescaler_trains_with_its_own_lr_and_no_weight_decay():
    """Adam's first step moves a parameter by its lr (times g/(|g| + eps)); AdamW's decay would add
    lr·wd·s. So the rescaler moves by exactly rescaler_lr, not train.lr and not rescaler_lr·(1 + wd)."""
    scale, lora = _flame_step("algorithm.flame.rescaler_lr=0.01", "train.weight_decay=0.5")
    assert len(scale) == 2  # one per MoE layer of the tiny model
    assert all(v == pytest.approx(0.01, rel=1e-2) for v in scale), scale
    assert lora <= 1e-4 * 1.001 + 1e-4 * 0.5 * 1.0  # the LoRA keeps train.lr (and its decay)
    legacy, _ = _flame_step("algorithm.flame.rescaler_lr=null")  # the LoRA's lr: the rescaler hardly moves
    assert all(v == pytest.approx(1e-4, rel=1e-2) for v in legacy), legacy


def test_a_flame_run_reports_each_clients_learned_rescaler(tmp_path):

    sets = ["model.name=builtin:tiny-olmoe", "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]",
            "data.max_examples=200", "data.max_length=48", "data.partition.num_clients=2", "train.max_steps=2",
            "train.batch_size=2", "eval.rouge=false", "data.max_test_per_client=3", "lora.rank=4",
            "federation.rounds=2", f"output_dir={tmp_path}", "name=r"]
    summary, rd = run_federated(load_config(None, sets))
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    for c in summary["clients"]:
        private = ck["transport"]["private"][c["id"]]
        want = [float(private[n]) for n in private]  # layer order
        assert c["reported"]["rescaler_by_layer"] == want and len(want) == 4 and c["reported_round"] == 2
        assert all(abs(v - 1.0) > 1e-3 for v in want)  # it learned (rescaler_lr 1e-2, 4 steps)
    report = rd.report_path.read_text()
    assert "## Client-reported values" in report and "rescaler_by_layer" in report
    row = next(line for line in report.splitlines() if line.startswith("| 1 | 2 |"))
    assert f"{summary['clients'][1]['reported']['rescaler_by_layer'][0]:.4f}" in row


def test_flame_run_with_split_layout_and_router_lora(tmp_path):
    """A real (tiny) FLAME run: split expert LoRA aggregated per expert, the router LoRA like the
    attention LoRA (by n_i), and the summary's trainable counts from the same layout."""
    from fedmoe.config import load_config
    from fedmoe.eval.flops import count_flops, load_model_config

    cfg = load_config(None, [
        "data.max_examples=120", "data.max_length=48", "train.max_steps=1", "train.batch_size=2", "eval.max_examples=2",
        "eval.max_new_tokens=2", "data.max_test_per_client=2", "lora.rank=4", "model.name=builtin:tiny-olmoe",
        "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "data.partition.num_clients=2",
        "eval.zero_shot=false", "federation.rounds=1", "train.lr=0.05", "lora.expert_layout=split", "lora.router=true",
        f"output_dir={tmp_path}", "name=split"])
    summary, rd = run_federated(cfg)
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    g = ck["global_state"]
    assert "model.layers.0.mlp.experts.gate_lora_B" in g and "model.layers.0.mlp.gate.lora_B" in g
    assert g["model.layers.0.mlp.gate.lora_B"].abs().sum() > 0  # trained and aggregated
    fl = count_flops(load_model_config(cfg.model.name), cfg.eval.flops_seq_len, k=1, lora_rank=4,
                     expert_lora_layout="split", router_lora=True)
    # the client also trains its 4 private rescalers (one per MoE layer), which the config-only count lacks
    assert summary["clients"][1]["active_trainable"] == fl["active_trainable"] + 4
    assert summary["clients"][1]["total_trainable"] == summary["trainable_params"] == fl["total_trainable"] + 4


def test_flame_with_one_expert_per_layer_weights_that_experts_counts():
    cfg = load_config(None, ["algorithm.name=flame", "lora.experts_per_layer=1", "lora.rank=2", "lora.attention_targets=[]",
                             "data.partition.num_clients=2", "algorithm.flame.temperature=1"])
    server, _, _ = built(METHODS["flame"], cfg, MoEModel.from_config(tiny_config("olmoe")))
    g = server.initial_global()
    name = next(n for n in g if n.endswith("layers.1.mlp.experts.down_lora_B"))
    assert g[name].shape[0] == 1  # one expert's LoRA
    expert = server.experts[1][0]
    counts = [torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)]
    counts[0][1, expert], counts[1][1, expert] = 30, 10  # layer 1: a/S = 3/4 and 1/4
    counts[0][0, expert], counts[1][0, expert] = 10, 30  # layer 0 the other way round
    replies = [reply(i, {**{n: torch.full_like(t, float(i + 1)) for n, t in g.items()},
                         "activation_counts": counts[i], "tokens_per_layer": torch.tensor([40, 40])}, 10)
               for i in (0, 1)]
    new, _, _ = server.aggregate(g, {}, replies, round_idx=1)
    # layer 1: weights 0.75 and 0.25 on values 1 and 2 (layer 0's counts would give 1.75)
    torch.testing.assert_close(new[name], torch.full_like(g[name], 0.75 * 1 + 0.25 * 2))


def test_an_expert_no_client_routed_to_keeps_its_value_under_a_server_optimizer():
    """SPEC: an expert no client routed to keeps its previous global value. Its averaged update is 0, but FedAvgM's
    momentum from the round before moved it (0.009, beside 0.019 for a routed expert); FedAdam likewise."""
    for opt in ("fedavgm", "fedadam"):
        cfg = load_config(None, ["algorithm.name=flame", "lora.rank=2", "data.partition.num_clients=2",
                                 f"algorithm.server_optimizer.name={opt}"])
        server, _, _ = built(METHODS["flame"], cfg, MoEModel.from_config(tiny_config("olmoe")))
        g = server.initial_global()
        gen = torch.Generator().manual_seed(1)
        state = server.initial_server_state(g)

        def round_(g, state, never, rnd):
            replies = []
            for cid, n in ((0, 3), (1, 5)):
                t = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                     for k, v in server.downlink(g, state, cid, round_idx=rnd).tensors.items()}
                counts = torch.stack([_routed_counts(gen, 40, 2, 8, never=never) for _ in range(2)])
                replies.append(reply(cid, {**t, COUNTS: counts, TOKENS: torch.tensor([40, 40])}, n))
            new, state, _ = server.aggregate(g, state, replies, round_idx=rnd)
            return new, state

        g1, state = round_(g, state, (), 1)  # every expert routed: the optimizer's state moves every expert
        g2, state = round_(g1, state, (0,), 2)  # no client routes to expert 0 in round 2
        for name in server.layer_of:
            assert torch.equal(g2[name][0], g1[name][0]), (opt, name)
            assert not torch.equal(g2[name][1], g1[name][1])
