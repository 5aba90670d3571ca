"""FLEx: end to end on a real tiny run (private state never leaves a client, persists across rounds
and through a resume; the global model has no grafts; grafting is reported), the server's average,
and grafting on real (tiny) models: expert scores by hand, the gated grafted expert's output, its
place beside Qwen2-MoE's shared expert, greedy multi-expert grafts, both LoRA layouts."""

import pytest
import torch
from torch import nn

from helpers import built, reply, tiny_hf

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.flex import GraftedExperts, _expert_forward, score_experts
from fedmoe.config import load_config
from fedmoe.federation import resume_federated, run_federated
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config

TINY = ["model.name=builtin:tiny-olmoe", "algorithm.name=flex", "data.max_examples=240", "data.max_length=48",
        "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2", "train.lr=0.05",
        "eval.max_examples=2", "eval.max_new_tokens=3", "data.max_test_per_client=3", "lora.rank=4",
        "algorithm.flex.calibration_size=4", "eval.zero_shot=false", "federation.rounds=2"]


def test_flex_private_state_never_leaves_and_persists(tmp_path):
    sent = []
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=flex"])
    summary, rd = run_federated(cfg, observe=lambda kind, cid, msg: sent.append(msg) if kind == "reply" else None)
    assert len(sent) == 4  # 2 clients x 2 rounds
    for p in sent:
        assert p.tensors and all(".self_attn." in n and "lora_" in n for n in p.tensors)
        assert not any("grafted" in n or "gate" in n.split(".")[-1] for n in p.tensors)
    # bytes up are exactly the shared attention LoRA and n_i
    per_round = sum(t.numel() * t.element_size() for t in sent[0].tensors.values()) + 8
    assert all(c["bytes_up"] == 2 * per_round for c in summary["clients"])
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    for cid in (0, 1):
        priv = ck["transport"]["private"][cid]
        assert priv["graft_index"].shape == (4, 1)
        lora_b = [t for n, t in priv.items() if n.endswith("gate_up_lora_B")]
        assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # trained privately
    assert len(summary["client_setup_seconds"]) == 2 and all(v > 0 for v in summary["client_setup_seconds"].values())
    setup = summary["client_setup"]
    assert sorted(setup) == [0, 1] or sorted(setup) == ["0", "1"]
    for v in setup.values():  # 4 calibration examples of <= 48 tokens, streamed in one batch
        assert 0 < v["calibration_tokens"] <= 4 * 48 and v["scoring_peak_bytes"] > 0 and v["seconds"] > 0
        assert v["cached_bytes"] == 2 * 4 * v["calibration_tokens"] * 128 * 4  # 4 layers, hidden 128, fp32
    report = rd.report_path.read_text()
    assert "## Client setup" in report and "| client | seconds | calibration_tokens |" in report
    assert "`cached_bytes`: what caching every layer's X and Z" in report
    # resume: private grafts restored from the checkpoint, same final numbers
    _, rd2 = run_federated(load_config(None, TINY + [f"output_dir={tmp_path}", "name=cut"]), stop_after_round=1)
    resumed, _ = resume_federated(rd2.path)
    assert [c["loss"] for c in resumed["clients"]] == [c["loss"] for c in summary["clients"]]


def test_general_calibration_grafts_the_same_experts_everywhere(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=g", "algorithm.flex.calibration=general",
                                    "federation.rounds=1", "eval.rouge=false"])
    summary, rd = run_federated(cfg)
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    assert torch.equal(ck["transport"]["private"][0]["graft_index"], ck["transport"]["private"][1]["graft_index"])


def test_flex_server_averages_the_shared_lora_by_n():
    """The shared attention LoRA is averaged with p_i = n_i / Σ n: catches a uniform mean over the
    clients (here 3.0 instead of 4.0) and any grafted tensor reaching the global state."""
    cfg = load_config(None, ["algorithm.name=flex", "lora.rank=2", "data.partition.num_clients=2"])
    server, _, _ = built(METHODS["flex"], cfg, MoEModel.from_config(tiny_config("olmoe")))
    g = server.initial_global()
    assert g and all(".self_attn." in n and "lora_" in n for n in g)  # no grafted expert or gate
    # client 0 (n = 1) sends 1·c, client 1 (n = 3) sends 5·c, c a per-tensor constant in 1..len(g)
    consts = {name: float(i + 1) for i, name in enumerate(g)}
    replies = [reply(0, {k: torch.full_like(v, 1.0 * consts[k]) for k, v in g.items()}, 1),
               reply(1, {k: torch.full_like(v, 5.0 * consts[k]) for k, v in g.items()}, 3)]
    new, _, _ = server.aggregate(g, {}, replies, round_idx=1)
    assert set(new) == set(g)
    for k, v in new.items():  # (1·1 + 3·5) / 4 = 4
        torch.testing.assert_close(v, torch.full_like(v, 4.0 * consts[k]), rtol=1e-6, atol=0)


def test_flex_grafted_experts_in_the_split_layout():
    from fedmoe.algorithms.flex import GraftedExperts

    SPLIT = ("gate_lora_A", "gate_lora_B", "up_lora_A", "up_lora_B", "down_lora_A", "down_lora_B")
    mm = MoEModel(tiny_hf("olmoe"))
    layer = mm.layers[0]
    torch.manual_seed(0)
    fused = GraftedExperts(layer, 1, rank=4, alpha=8.0)
    split = GraftedExperts(layer, 1, rank=4, alpha=8.0, layout="split")
    assert [n for n, _ in split.named_parameters()] == ["gate", *SPLIT]
    for g in (fused, split):
        g.init_from([3])
    g_ = torch.Generator().manual_seed(1)
    I = layer.intermediate_size
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=g_) * 0.3)
        split.gate.copy_(fused.gate)
        split.gate_lora_A.copy_(fused.gate_up_lora_A)
        split.up_lora_A.copy_(fused.gate_up_lora_A)
        split.gate_lora_B.copy_(fused.gate_up_lora_B[:, :I])
        split.up_lora_B.copy_(fused.gate_up_lora_B[:, I:])
        split.down_lora_A.copy_(fused.down_lora_A)
        split.down_lora_B.copy_(fused.down_lora_B)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-5)
    split.init_from([2])  # reset: A redrawn, B zero
    assert all(not getattr(split, n).any() for n in SPLIT if n.endswith("_B"))


def attach_grafts(mm, num_grafts=1, rank=8, alpha=16.0, train_full=False, gate="sigmoid"):
    return mm.attach_to_blocks("grafted", lambda layer: GraftedExperts(layer, num_grafts, rank, alpha, train_full, gate))


def _mm(arch="olmoe"):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(arch))


def _batches(n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 128, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_scores_equal_a_hand_computation():
    mm = _mm()
    batches = _batches()
    stats = {}
    chosen, scores = score_experts(mm, batches, stats=stats)
    # memory and token accounting: 2 batches of 2x9 tokens, 3 padding each -> 2 x 15 scored tokens
    L, H = len(mm.layers), mm.config.hidden_size
    assert stats["calibration_tokens"] == 30
    assert stats["cached_bytes"] == 2 * L * 30 * H * 4  # X and Z of every layer, float32
    assert stats["scoring_peak_bytes"] == 15 * H * (4 + 4 + 3 * 8)  # one batch: X, Z fp32 + 3 float64
    # by hand: capture X and Z of layer 1 with a plain hook, non-padding rows only
    expected = torch.zeros(8, dtype=torch.float64)
    ex = mm.experts_module(1)
    cap = {}
    h = ex.register_forward_hook(lambda m, a, o: cap.update(x=a[0].detach(), z=o.detach()))
    for b in batches:
        mm.model(**b)
        keep = b["attention_mask"].reshape(-1).bool()
        x, z = cap["x"][keep], cap["z"][keep].double()
        for e in range(8):
            expected[e] += torch.linalg.norm(z - _expert_forward(ex.base, e, x).double())
    h.remove()
    torch.testing.assert_close(scores[1], expected, rtol=1e-12, atol=1e-12)
    assert chosen[1] == [int(expected.argmin())]


class _FixedRouter(nn.Module):
    def __init__(self, expert, num_experts, hidden):
        super().__init__()
        self.expert, self.top_k = expert, 1
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x):
        x = x.reshape(-1, self.weight.shape[1])
        idx = torch.full((x.shape[0], 1), self.expert, dtype=torch.long)
        return None, torch.ones(x.shape[0], 1), idx


def test_the_expert_that_produces_the_routed_output_is_chosen():
    mm = _mm()
    mm.layers[0].block.gate = _FixedRouter(5, 8, 32)  # every token -> expert 5 with weight 1: Z = E_5(X)
    chosen, scores = score_experts(mm, _batches())
    assert chosen[0] == [5] and scores[0, 5].item() == pytest.approx(0.0, abs=1e-9)
    assert (scores[0, [0, 1, 2, 3, 4, 6, 7]] > 0).all()


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_grafted_expert_output_is_gated_copy_beside_the_block(arch):
    mm = _mm(arch)
    ids = _batches(1)[0]["input_ids"]
    captured = {}
    layer = mm.layers[0]
    def keep(name):
        def hook(m, a, o):  # returns None: observe, do not replace the output
            captured[name] = (a[0].detach(), o.detach())
        return hook

    h = layer.block.register_forward_hook(keep("plain"))
    mm.model(ids)
    h.remove()
    x, plain = captured["plain"]
    grafts = attach_grafts(mm, rank=4, alpha=8)
    grafts[0].init_from([3])
    assert torch.equal(grafts[0].gate.data[0], layer.router.weight.data[3])  # gate = router row of e*
    h = layer.block.register_forward_hook(keep("grafted"))
    mm.model(ids)
    h.remove()
    captured["grafted"] = captured["grafted"][1]
    x2 = x.reshape(-1, x.shape[-1])
    expected = plain + (torch.sigmoid(x2 @ layer.router.weight.data[3])[:, None]
                        * _expert_forward(layer.experts, 3, x2)).reshape(plain.shape)
    torch.testing.assert_close(captured["grafted"], expected, rtol=0, atol=1e-5)
    if arch == "qwen2_moe":  # the shared expert and its gate are untouched
        assert layer.shared_expert is not None and layer.block.shared_expert is layer.shared_expert


def test_grafted_expert_lora_path_by_hand():
    """Nonzero LoRA on two grafts of one layer: each graft computes σ(g_j·x) · E'_j(x), where E'_j is
    pretrained expert e_j with merged weights W + (alpha/r)·B·A on both gate_up and down. Catches a
    missing or wrong scaling, LoRA on the wrong path, the gate on only part of the output, and LoRA
    or gate rows indexed by the expert id instead of the graft slot."""
    mm = _mm()
    rank, alpha = 4, 8.0  # s = alpha / r = 2
    grafts = attach_grafts(mm, num_grafts=2, rank=rank, alpha=alpha)
    graft = grafts[1]
    graft.init_from([6, 2])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (graft.gate_up_lora_A, graft.gate_up_lora_B, graft.down_lora_A, graft.down_lora_B, graft.gate):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(5, 32, generator=g)
    base = mm.layers[1].experts
    s = alpha / rank
    expected = torch.zeros(5, 32, dtype=torch.float64)
    for j, e in enumerate([6, 2]):
        w_gu = base.gate_up_proj[e].double() + s * graft.gate_up_lora_B[j].double() @ graft.gate_up_lora_A[j].double()
        w_d = base.down_proj[e].double() + s * graft.down_lora_B[j].double() @ graft.down_lora_A[j].double()
        gate_in, up = (x.double() @ w_gu.T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate_in) * up) @ w_d.T  # OLMoE's expert activation is SiLU
        expected += torch.sigmoid(x.double() @ graft.gate[j].double())[:, None] * y
    out = graft(x).detach()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # the LoRA matters here: without it the output moves (the check above is not of base experts only)
    with torch.no_grad():
        graft.gate_up_lora_B.zero_()
        graft.down_lora_B.zero_()
    assert (graft(x).detach() - out).abs().max() > 1e-2


def test_ungated_and_full_grafts_and_greedy_two_experts():
    mm = _mm()
    grafts = attach_grafts(mm, gate="none", train_full=True)
    grafts[1].init_from([6])
    assert torch.equal(grafts[1].gate_up_proj.data[0], mm.layers[1].experts.gate_up_proj.data[6])
    x = torch.randn(5, 32)
    torch.testing.assert_close(grafts[1](x), _expert_forward(mm.layers[1].experts, 6, x), rtol=0, atol=1e-6)
    mm2 = _mm()
    chosen, _ = score_experts(mm2, _batches(), num_grafts=2)
    assert all(len(c) == 2 and c[0] != c[1] for c in chosen)
    single, _ = score_experts(mm2, _batches(), num_grafts=1)
    assert [c[0] for c in chosen] == [c[0] for c in single]


def test_flex_adapts_q_k_v_by_default_and_refuses_router_lora():
    """The method's attention LoRA is on q, k and v (not o, which the other methods add by default); a
    config that names targets gets those; lora.router is refused (FLEx trains no router)."""
    from fedmoe.config import ConfigError

    def projections(*sets):
        cfg = load_config(None, ["algorithm.name=flex", "lora.experts=false", "lora.rank=2", *sets])
        mm = MoEModel.from_config(tiny_config("olmoe"))
        built(METHODS["flex"], cfg, mm)
        return {n.split(".self_attn.")[1].split(".")[0] for n in mm.trainable_names() if ".self_attn." in n}

    assert projections() == {"q_proj", "k_proj", "v_proj"}
    assert projections("lora.attention_targets=[q_proj,o_proj]") == {"q_proj", "o_proj"}
    cfg = load_config(None, ["algorithm.name=fedit", "lora.rank=2"])
    mm = MoEModel.from_config(tiny_config("olmoe"))
    built(METHODS["fedit"], cfg, mm)
    assert any(".self_attn.o_proj." in n for n in mm.trainable_names())  # FedIT keeps q, k, v, o
    with pytest.raises((ConfigError, ValueError), match="FLEx keeps every router frozen"):
        load_config(None, ["algorithm.name=flex", "lora.router=true"])
