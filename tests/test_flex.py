"""FLEx end to end on a real tiny run: private state never leaves a client, persists across rounds
and through a resume; the global model has no grafts; grafting is reported."""

import torch

from helpers import built, reply

from fedmoe.algorithms import METHODS
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
