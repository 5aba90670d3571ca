"""The local-only bound: every client trains alone (its replies carry n_i and nothing else, its train
messages are empty), its own model is what it trained, the global model stays the initial one; and
the update-conflict diagnostic against a hand count."""

import pytest
import torch
from helpers import built

from fedmoe.algorithms import METHODS
from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.federation.conflict import update_conflict
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-olmoe", "data.max_examples=200", "data.max_length=48", "data.partition.num_clients=3",
        "train.max_steps=2", "train.batch_size=2", "train.lr=0.05", "eval.max_examples=2", "eval.max_new_tokens=3",
        "data.max_test_per_client=3", "lora.rank=4", "federation.rounds=2"]


def test_local_only_sends_nothing_and_keeps_the_global_model(tmp_path):
    seen = []
    cfg = load_config(None, TINY + ["algorithm.name=local_only", f"output_dir={tmp_path}", "name=alone"])
    summary, rd = run_federated(cfg, observe=lambda kind, cid, msg: seen.append((kind, cid, msg)))
    downs = [m for kind, cid, m in seen if kind == "downlink"]
    ups = [m for kind, cid, m in seen if kind == "reply"]
    assert len(downs) == len(ups) == 3 * 2
    assert all(not m.tensors and not m.scalars for m in downs)
    assert all(not m.tensors and list(m.scalars) == ["n_train"] for m in ups)
    for c in summary["clients"]:
        assert c["bytes_down"] == 0 and c["bytes_up"] == 2 * 8  # one scalar (n_i) per round
    # the global model is the initial one: its final loss is the zero-shot loss, exactly
    assert summary["global"]["loss"] == summary["zero_shot"]["loss"]
    # each client's model moved away from it, and differently
    assert all(c["loss"] != summary["zero_shot"]["loss"] for c in summary["clients"])
    assert len({round(c["loss"], 6) for c in summary["clients"]}) == 3
    # and says so: the summary, the report, and export / generate, which want a client's model
    from fedmoe.export import ExportError, export_model

    assert summary["global_model_trained"] is False
    assert "trains no global model" in rd.report_path.read_text()
    from fedmoe.report.report import format_results_table  # the table fedmoe run prints says it too

    assert format_results_table(summary).endswith("local_only trains no global model: the global model row is the "
                                                  "initial model, and the change from zero-shot is that of the "
                                                  "clients' own models.")
    with pytest.raises(ExportError, match="trains no global model.*--client 0..2"):
        export_model(rd.path, tmp_path / "out")
    assert export_model(rd.path, tmp_path / "c1", client=1)[0] in ("peft", "fedmoe")  # a client's own model


def test_update_conflict_by_hand():
    """Three clients, one MoE layer of 2 experts (rows of a fused A and B) and one shared tensor."""
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "lora.rank=2"])
    _, _, spec = built(METHODS["fedit"], cfg, MoEModel.from_config(tiny_config("olmoe")))
    g = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in spec.initial.items()}
    layer_of = spec.inventory.expert_layers()
    a_name = next(n for n in g if n.endswith("experts.gate_up_lora_A") and layer_of[n] == 0)
    shared = next(n for n in g if n not in layer_of)
    clients = []
    for sign in (1.0, 1.0, -1.0):
        t = {n: v.clone() for n, v in g.items()}
        t[a_name][0].fill_(sign)          # expert 0 of layer 0: client 2 opposes clients 0 and 1
        t[a_name][1].fill_(1.0)           # expert 1: everyone agrees
        t[shared].fill_(sign)             # the shared tensor: the same split
        clients.append(t)
    out = update_conflict(g, clients, layer_of)
    # expert 0: pairs (0,1) +, (0,2) -, (1,2) -; expert 1: three + pairs; other experts and layers: nobody moved
    assert out["update_conflict_by_layer"][0] == pytest.approx(2 / 6)
    assert out["update_conflict_experts"] == pytest.approx(2 / 6)
    assert out["update_cosine_experts"] == pytest.approx((1 - 1 - 1 + 3) / 6)
    assert out["update_conflict_shared"] == pytest.approx(2 / 3)
    assert out["update_cosine_shared"] == pytest.approx(-1 / 3)
    assert all(v is None for v in out["update_conflict_by_layer"][1:])


def test_evaluating_only_at_the_ends_changes_no_result(tmp_path):
    """eval.loss_every_round: false skips the evaluations between round 0 and the last round; every number of
    the summary stays what it was (evaluation draws no randomness and changes no state)."""
    import json

    base = TINY + ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "federation.rounds=3",
                   "data.field_map={label: category}", "eval.task=choice", f"output_dir={tmp_path}"]
    every, _ = run_federated(load_config(None, base + ["name=every"]))
    ends, rd = run_federated(load_config(None, base + ["name=ends", "eval.loss_every_round=false"]))
    rows = rd.read_metrics()
    assert sorted({r["round"] for r in rows if r.get("kind") == "test"}) == [0, 3]
    # a round without evaluation counts no evaluation time (none carried over from round 0)
    clients_s = {r["round"]: r["clients_s"] for r in rows if r.get("kind") == "round"}
    train_s = {rnd: sum(r["train_s"] for r in rows if r.get("kind") == "train" and r["round"] == rnd) for rnd in (1, 2)}
    assert all(clients_s[rnd] == pytest.approx(train_s[rnd]) for rnd in (1, 2))
    # without a zero-shot round either: only the last round is evaluated
    last, rd = run_federated(load_config(None, base + ["name=last", "eval.loss_every_round=false", "eval.zero_shot=false"]))
    assert sorted({r["round"] for r in rd.read_metrics() if r.get("kind") == "test"}) == [3]
    assert last["global"]["accuracy"] == ends["global"]["accuracy"]
    drop = ("wall_s", "client_setup_seconds", "client_setup")
    strip = lambda s: json.dumps({k: v for k, v in s.items() if k not in drop}, sort_keys=True, default=str)  # noqa: E731
    assert strip(every) == strip(ends)
