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
