"""The typed inventory of the trainable tensors (fedmoe.moe.inventory) and the counts built on it.

* Every adapter says what it is (role, layers, expert rows, A/B partner, rank, private), on a real
  model of every method — no name parsing.
* For every registered method **at its default settings** (no ``lora.experts: false``), the summary's
  ``total_trainable`` of each client equals the number of elements that client's local training
  actually changes, and its ``flops_per_seq`` equals torch's FlopCounterMode on that client's model.
  Before the inventory, FLEx's counts came from a second, config-only model of the adapters (expert
  LoRA that FLEx never builds) and were 1.5x too high here (98,304 vs 66,048 on the tiny OLMoE).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import built

from fedmoe.algorithms import METHODS
from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.moe import MoEModel, Role
from fedmoe.moe.model import builtin_tiny_olmoe_config
from fedmoe.train import train_local

pytestmark = pytest.mark.usefixtures("one_thread")

T = 24  # tokens per sequence of the FLOPs figure
RUN = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
       "model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=40", "data.partition.num_clients=2",
       "train.max_steps=1", "train.batch_size=2", "eval.rouge=false", "eval.zero_shot=false", "federation.rounds=1",
       "data.max_test_per_client=2", f"eval.flops_seq_len={T}"]
# token ids of a few training examples: enough tokens that every expert of every layer is routed to
EXAMPLES = [{"input_ids": [(7 * i + 3 * j) % 500 + 2 for j in range(32)],
             "labels": [-100] * 4 + [(7 * i + 3 * j) % 500 + 2 for j in range(4, 32)]} for i in range(16)]


def _tiny():
    return MoEModel.from_config(builtin_tiny_olmoe_config())  # builtin:tiny-olmoe: H 128, I 256, E 8, k 2, 4 layers


def test_every_adapter_describes_itself():
    cfg = load_config(None, ["algorithm.name=flame", "lora.rank=4", "lora.router=true",
                             "lora.experts_per_layer=3", "lora.expert_layout=split"])
    mm = _tiny()
    _, _, spec = built(METHODS["flame"], cfg, mm)
    inv = spec.inventory
    assert list(inv.tensors) == list(spec.initial)  # parameter order, every trainable
    roles = {t.role for t in inv}
    assert roles == {Role.ATTENTION, Role.EXPERT, Role.ROUTER, Role.RESCALER}
    for t in inv:
        if t.factor is not None:  # A (…, r, in) with its B (…, out, r), at the same rank and scaling
            p = inv[t.partner]
            assert p.partner == t.name and {t.factor, p.factor} == {"A", "B"} and p.rank == t.rank == 4
            a, b = (t, p) if t.factor == "A" else (p, t)
            assert a.shape[-2] == b.shape[-1] == 4 and t.scaling == cfg.lora.alpha / 4
        if t.role is Role.EXPERT:  # rows: the 3 seeded experts per layer that have LoRA
            assert t.stacked and len(t.rows) == t.shape[0] == 3 and t.moe_layer == t.decoder_layer
        if t.role is Role.ATTENTION:
            assert t.moe_layer is None and f"layers.{t.decoder_layer}.self_attn." in t.name
    # private by the method's roles: FLAME's learned rescaler, one per MoE layer
    assert inv.private() == [f"model.layers.{i}.mlp.experts.output_scale" for i in range(4)]
    assert set(spec.shared()) == set(spec.initial) - set(inv.private()) == set(METHODS["flame"].server(cfg, spec)
                                                                               .initial_global())
    # the rows are the experts lora.experts_per_layer drew, per layer
    from fedmoe.algorithms.fedit import random_experts_per_layer
    assert inv.expert_rows() == {l: tuple(e) for l, e in random_experts_per_layer(4, 8, 3, cfg.seed).items()}

    # FLEx: shared attention LoRA, private grafts and gates; a trainable no module describes is OTHER
    cfg = load_config(None, ["algorithm.name=flex", "lora.rank=4", "algorithm.flex.graft_rank=2"])
    mm = _tiny()
    _, _, spec = built(METHODS["flex"], cfg, mm)
    inv = spec.inventory
    assert {t.role for t in inv if t.private} == {Role.GRAFT, Role.GATE}
    assert {t.role for t in inv if not t.private} == {Role.ATTENTION}
    assert all(t.rank == 2 for t in inv if t.role is Role.GRAFT)  # the graft's own rank
    mm.model.model.norm.weight.requires_grad_(True)
    assert mm.inventory()["model.norm.weight"].role is Role.OTHER


def test_flex_counts_the_grafts_it_built():
    """Hand count on the tiny OLMoE (H 128, I 256, 4 layers, rank 8): attention LoRA on q, k, v (FLEx's
    default; not o) 4·3·8·(128+128) = 24,576; per layer one graft = gate 128 + gate_up 8·128 + 512·8 +
    down 8·256 + 128·8 = 8,320, and a graft is on every token's path, so active = total = 24,576 + 4·8,320
    = 57,856 (66,048 with o as well). The config-only count (expert LoRA at k = 2, which FLEx does not
    build) said 98,304; its FLOPs missed the grafted FFN."""
    cfg = load_config(None, ["algorithm.name=flex"])  # defaults: lora.experts is true, FLEx ignores it
    _, _, spec = built(METHODS["flex"], cfg, _tiny())
    c = spec.counts(k=2, rank=8, seq_len=T)
    assert c["total_trainable"] == c["active_trainable"] == 57_856
    assert c["shared_trainable"] == 24_576
    assert spec.inventory.counts(2)["frozen_active_params"] == 4 * 3 * 128 * 256  # one pretrained expert per layer


def _client_model(name, cfg, cid, summary_client):
    """A fresh client model of ``name`` as client ``cid`` trains it: built, set up, loaded."""
    mm = _tiny()
    server, client, spec = built(METHODS[name], cfg, mm)
    private, _ = client.setup(cid, mm, EXAMPLES)
    g = server.initial_global()
    message = server.downlink(g, server.initial_server_state(g), cid, round_idx=1)
    client.load(mm, cid, message, private)
    assert mm.top_k == summary_client["k"]
    return mm, client, spec, message, private


@pytest.mark.parametrize("name", list(METHODS))
def test_summary_counts_are_what_each_client_trains(tmp_path, name):
    cfg = load_config(None, RUN + [f"algorithm.name={name}", f"output_dir={tmp_path}", "name=run"])
    summary, _ = run_federated(cfg, log=lambda *a: None)
    for c in summary["clients"]:
        mm, client, spec, message, private = _client_model(name, cfg, c["id"], c)
        # FLOPs: the client's model on T tokens, on the per-expert path (FlopCounterMode has no grouped_mm)
        for layer in mm.layers:
            mm.experts_module(layer.index).grouped = False
        ids = torch.tensor([EXAMPLES[0]["input_ids"][:T]])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mm.model(input_ids=ids)
        if c["rank"] == max(x["rank"] for x in summary["clients"]) or name not in ("trivial", "hetlora", "flexlora"):
            # (a rank-r_i client runs zero-padded r_max adapters here; its figure counts rank r_i)
            assert c["flops_per_seq"] == pytest.approx(counter.get_total_flops(), rel=0.01), name
        # trainables: every element that local training changes (SGD-free of coincidences: Adam, 6 steps)
        before = mm.get_state()
        tc = cfg.train.model_copy(update={"max_steps": 6, "batch_size": 4, "lr": 1e-2, "grad_clip": None})
        result = train_local(mm, EXAMPLES, tc, pad_id=1, lr=1e-2, seed=0,
                             objective=client.objective(c["id"], mm, message, private))
        after = mm.get_state()
        changed = sum(int((after[n] != before[n]).sum()) for n in after)
        assert c["total_trainable"] == changed, (name, c["id"])
        # the trainables it sends are what the spec calls shared (local-only: none; FLAME and SCAFFOLD also
        # send activation counts and control deltas)
        sent = set(client.reply(c["id"], mm, message, private, result)[0].tensors) & set(after)
        assert sent == (set() if name == "local_only" else set(spec.shared())), name
        assert c["active_trainable"] <= c["total_trainable"]


def test_a_stack_of_some_experts_counts_the_share_a_token_meets():
    """With lora.experts_per_layer = n of the layer's E experts, a token's k experts are spread over the E: it meets
    n·k/E of the adapted rows on average, not min(k, n). The count said k of them (94,208 active = every trainable
    element of a one-expert stack at any k; FLOPs 3x the measured expert-LoRA part), the same at k = 4 and k = 1."""
    for n in (1, 3, 8):
        cfg = load_config(None, ["algorithm.name=fedit", "lora.rank=4", f"lora.experts_per_layer={n}"])
        _, _, spec = built(METHODS["fedit"], cfg, _tiny())
        inv = spec.inventory
        expert = sum(t.numel for t in inv if t.role is Role.EXPERT)
        other = sum(t.numel for t in inv if t.role is not Role.EXPERT)
        E = 8
        for k in (2, 1):
            assert inv.counts(k)["active_trainable"] == other + round(expert * (min(k, n) if n == E else n * k / E) / n)
            assert all(t.of_experts == E for t in inv if t.role is Role.EXPERT)
