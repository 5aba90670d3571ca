"""Settings that make a baseline what its paper computes: FLAME's rescaler trains with its own learning
rate and no weight decay, and a run reports what each client's rescaler learned; the FedOpt server
optimizers step with their own default server learning rates."""

import pytest
import torch

from helpers import built

from fedmoe.algorithms import METHODS
from fedmoe.algorithms.server_opt import DEFAULT_LR, ServerOptimizerConfig, server_update
from fedmoe.config import ConfigError, load_config
from fedmoe.moe import MoEModel, Role
from fedmoe.moe.tiny import tiny_config
from fedmoe.train import train_local

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls

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
    from fedmoe.federation import run_federated

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


@pytest.mark.parametrize("name,eta", [("fedavgm", 1.0), ("fedadam", 1e-2), ("fedyogi", 1e-2), ("fedadagrad", 1e-1)])
def test_fedopt_default_server_learning_rates(name, eta):
    """First server step from m = 0, v = τ²: FedAvgM moves θ by η·Δ; the adaptive ones by
    η·(1−β1)·Δ / (sqrt(v1) + τ) with v1 from their own rule: computed here by hand with the default η."""
    cfg = ServerOptimizerConfig(name=name)
    assert DEFAULT_LR[name] == eta
    theta, delta, tau, b1, b2 = 0.5, 0.02, 1e-3, 0.9, 0.99
    new, _ = server_update(cfg, {"w": torch.tensor([theta], dtype=torch.float64)},
                           {"w": torch.tensor([theta + delta], dtype=torch.float64)}, {})
    if name == "fedavgm":
        want = theta + eta * delta
    else:
        v1 = {"fedadam": b2 * tau**2 + (1 - b2) * delta**2, "fedadagrad": tau**2 + delta**2,
              "fedyogi": tau**2 + (1 - b2) * delta**2}[name]  # Yogi: v − (1−β2)Δ² sign(v − Δ²), v = τ² < Δ²
        want = theta + eta * (1 - b1) * delta / (v1**0.5 + tau)
    assert new["w"].item() == pytest.approx(want, rel=1e-12)
    explicit, _ = server_update(ServerOptimizerConfig(name=name, lr=0.5), {"w": torch.tensor([theta])},
                                {"w": torch.tensor([theta + delta])}, {})
    assert explicit["w"].item() != pytest.approx(new["w"].item())  # an explicit lr wins


def test_server_lr_without_a_server_optimizer_is_refused():
    with pytest.raises(ConfigError, match="server_optimizer.lr"):
        load_config(None, ["algorithm.server_optimizer.lr=0.1"])
