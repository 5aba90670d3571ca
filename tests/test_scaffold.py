"""SCAFFOLD control variates against their formulas on a real (tiny) model's adapters, the server
control surviving a server optimizer, and MoE + X (one random expert per layer)."""

import torch
from helpers import built, reply

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.scaffold import C, DC
from fedmoe.config import load_config
from fedmoe.messages import Reply
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config
from fedmoe.train import LocalResult


def _setup(*sets):
    cfg = load_config(None, ["algorithm.name=scaffold", "data.partition.num_clients=4", "lora.rank=2", *sets])
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, client, _ = built(METHODS["scaffold"], cfg, mm)
    return cfg, mm, server, client


def _result(steps, lr, n=10):
    return LocalResult(loss=0.0, steps=steps, examples_seen=0, tokens=0, activation_counts=torch.zeros(2, 8),
                       tokens_per_layer=torch.zeros(2), n_train=n, lr=lr)


def test_control_variates_by_formula():
    cfg, mm, server, client = _setup()
    g = server.initial_global()
    ss = server.initial_server_state(g)
    down = server.downlink(g, ss, 0)
    model_bytes = sum(t.numel() * t.element_size() for t in g.values())
    assert down.nbytes() == 2 * model_bytes  # x and c
    assert all(torch.equal(down.tensors[C + n], torch.zeros_like(t)) for n, t in g.items())  # c starts at 0
    gen = torch.Generator().manual_seed(1)
    rnd = lambda t: torch.randn(t.shape, generator=gen)  # noqa: E731
    c = {n: rnd(t) for n, t in g.items()}
    ss = {"c": c}
    down = server.downlink(g, ss, 0)
    private = {"c_i": {n: rnd(t) for n, t in g.items()}}
    corr = client.objective(0, mm, down, private).grad_correction
    for n in g:
        torch.testing.assert_close(corr[n], c[n] - private["c_i"][n], rtol=0, atol=0)  # c - c_i
    y = {n: g[n] + 0.1 * rnd(t) for n, t in g.items()}
    mm.load_state(y)
    msg, new_private, _ = client.reply(0, mm, down, private, _result(steps=4, lr=0.1))
    for n in g:  # c_i+ = c_i - c + (x - y)/(K lr), K = 4, lr = 0.1
        want = private["c_i"][n] - c[n] + (g[n] - y[n]) / 0.4
        torch.testing.assert_close(new_private["c_i"][n], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(msg.tensors[DC + n], want - private["c_i"][n], rtol=1e-6, atol=1e-6)
        assert torch.equal(msg.tensors[n], y[n])
    assert msg.nbytes() == 2 * model_bytes + 8  # y, Δc and n_i
    # server: x <- Σ p_i y_i (p = n / Σ n), c <- c + (1/N) Σ Δc_i with N = 4 clients in total
    y2 = {n: rnd(t) for n, t in g.items()}
    dc2 = {n: rnd(t) for n, t in g.items()}
    other = reply(1, {**y2, **{DC + n: t for n, t in dc2.items()}}, 30)
    new_g, new_ss, _ = server.aggregate(g, ss, [Reply(0, msg), other])
    for n in g:
        torch.testing.assert_close(new_g[n], 0.25 * y[n] + 0.75 * y2[n], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new_ss["c"][n], c[n] + (msg.tensors[DC + n] + dc2[n]) / 4, rtol=1e-6, atol=1e-6)


def test_server_control_survives_a_server_optimizer():
    cfg, mm, server, client = _setup("algorithm.server_optimizer.name=fedadam")
    g = server.initial_global()
    ss = server.initial_server_state(g)
    dc = {n: torch.ones_like(t) for n, t in g.items()}
    for _ in range(2):
        r = reply(0, {**{n: t + 1 for n, t in g.items()}, **{DC + n: t for n, t in dc.items()}}, 5)
        g, ss, _ = server.aggregate(g, ss, [r])
    assert set(ss) == {"c", "m", "v"}
    assert all(torch.allclose(ss["c"][n], torch.full_like(t, 0.5)) for n, t in g.items())  # 2 rounds x 1/4


def test_moe_plus_scaffold_run_with_one_random_expert_per_layer(tmp_path):
    from fedmoe.federation import resume_federated, run_federated

    sets = ["model.name=builtin:tiny-olmoe", "algorithm.name=scaffold", "lora.experts_per_layer=1",
            "data.max_examples=200", "data.max_length=48", "data.partition.num_clients=2", "train.max_steps=2",
            "train.batch_size=2", "eval.rouge=false", "data.max_test_per_client=3", "lora.rank=4",
            "federation.rounds=2", f"output_dir={tmp_path}"]
    summary, rd = run_federated(load_config(None, sets + ["name=s"]))
    ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    experts = [n for n in ck["global_state"] if n.endswith("gate_up_lora_A")]
    assert experts and all(ck["global_state"][n].shape[0] == 1 for n in experts)  # one expert per layer
    assert set(ck["server_state"]["c"]) == set(ck["global_state"])
    assert any(t.abs().sum() > 0 for t in ck["server_state"]["c"].values())
    model_bytes = sum(t.numel() * 4 for t in ck["global_state"].values())
    # up: y_i, Δc_i and n_i; down: x and c -> twice the model's LoRA bytes each way, every round
    assert all(c["bytes_up"] == 2 * (2 * model_bytes + 8) and c["bytes_down"] == 2 * 2 * model_bytes
               for c in summary["clients"])
    # the summary counts the model's trainable tensors, not the control variates
    assert summary["trainable_params"] == sum(t.numel() for t in ck["global_state"].values())
    _, rd2 = run_federated(load_config(None, sets + ["name=cut"]), stop_after_round=1)
    resumed, _ = resume_federated(rd2.path)
    assert [c["loss"] for c in resumed["clients"]] == [c["loss"] for c in summary["clients"]]
