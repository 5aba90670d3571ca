"""Settings that make a baseline what its paper computes: the FedOpt server optimizers step with their
own default server learning rates."""

import pytest
import torch

from fedmoe.algorithms.server_opt import DEFAULT_LR, ServerOptimizerConfig, server_update
from fedmoe.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls


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


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_the_flower_convention_reproduces_flowers_strategies(name):
    """The same aggregated states, three rounds, into Flower 1.42's strategy and into fedmoe's server
    optimizer: equal to 1e-12 under convention: flower; under reddi (v0 = τ², no bias correction, FedAdagrad's
    β1 = 0.9) the adaptive ones differ."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import strategy as fs
    from flwr.supercore.task_identity import TaskIdentity

    # a Message outside a Flower run needs the ids a ServerApp's process has: set for this test only
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        _flower_convention(name, fs, np, Array, ArrayRecord, Message, MetricRecord, RecordDict)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _flower_convention(name, fs, np, Array, ArrayRecord, Message, MetricRecord, RecordDict):
    kw = dict(eta=0.05, tau=1e-3) if name != "fedavgm" else dict(server_learning_rate=0.7, server_momentum=0.9)
    if name in ("fedadam", "fedyogi"):
        kw.update(beta_1=0.8, beta_2=0.95)
    flower = {"fedadam": fs.FedAdam, "fedyogi": fs.FedYogi, "fedadagrad": fs.FedAdagrad, "fedavgm": fs.FedAvgM}[name](**kw)
    ours = {"name": name, "lr": kw.get("eta", kw.get("server_learning_rate")), "tau": 1e-3,
            "momentum": 0.9, "beta1": kw.get("beta_1", 0.9), "beta2": kw.get("beta_2", 0.99)}
    gen = torch.Generator().manual_seed(4)
    theta = {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64), "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    results = {}
    for convention in ("flower", "reddi"):
        cfg = ServerOptimizerConfig(**ours, convention=convention)
        g, ss, fl = dict(theta), {}, {k: v.numpy().copy() for k, v in theta.items()}
        for rnd in (1, 2, 3):
            averaged = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(10 * rnd + len(k)),
                                                  dtype=torch.float64) for k, v in g.items()}
            g, ss = server_update(cfg, g, averaged, ss, round_idx=rnd)
            if convention == "flower":  # Flower: one reply holding the averaged state, weight 1
                # what configure_train leaves: FedOpt's strategies a dict of arrays, FedAvgM an ArrayRecord
                current = {k: np.asarray(v) for k, v in fl.items()}
                flower.current_arrays = (ArrayRecord({k: Array(v) for k, v in current.items()}) if name == "fedavgm"
                                         else current)
                reply = Message(RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in averaged.items()}),
                                            "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=1,
                                message_type="train")
                arrays, _ = flower.aggregate_train(rnd, [reply])
                fl = {k: a.numpy() for k, a in arrays.items()}
                for k in g:
                    np.testing.assert_allclose(g[k].numpy(), fl[k], rtol=0, atol=1e-12)
                g = {k: torch.from_numpy(v.copy()) for k, v in fl.items()}  # both go on from the same state
        results[convention] = g
    gap = max(float((results["flower"][k] - results["reddi"][k]).abs().max()) for k in theta)
    assert (gap > 1e-6) if name != "fedavgm" else (gap == 0.0)
