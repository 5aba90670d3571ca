"""Server optimizers of the FedOpt family (Reddi et al., ICLR 2021, "Adaptive Federated
Optimization", Algorithm 2) over the aggregated delta Δ = Σ p_i (θ_i − θ):

  FedAvgM    m ← β·m + Δ;                      θ ← θ + η·m
  FedAdagrad m ← β1·m + (1−β1)·Δ; v ← v + Δ²;  θ ← θ + η·m / (√v + τ)
  FedAdam    m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²
  FedYogi    m ← β1·m + (1−β1)·Δ; v ← v − (1−β2)·Δ²·sign(v − Δ²)

(our choice) the second moment starts at v = τ² as in the paper's algorithm (v_{-1} ≥ τ²); no
bias correction. ``none`` is plain FedAvg: θ ← θ + Δ.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..configbase import StrictModel

State = dict[str, torch.Tensor]


class ServerOptimizerConfig(StrictModel):
    name: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "none"
    lr: float = Field(1.0, gt=0)  # server learning rate eta
    momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity


def server_update(cfg: ServerOptimizerConfig, global_state: State, averaged: State, server_state: dict) -> tuple[State, dict]:
    """The new global state from the averaged client states, and the server state with the optimizer's
    moments (``m``, ``v``) updated; every other key of ``server_state`` (the method's own) is kept."""
    if cfg.name == "none":
        return {n: t.clone() for n, t in averaged.items()}, server_state
    m = dict(server_state.get("m", {}))
    v = dict(server_state.get("v", {}))
    new: State = {}
    for name, theta in global_state.items():
        theta64 = theta.to(torch.float64)
        delta = averaged[name].to(torch.float64) - theta64
        if cfg.name == "fedavgm":
            m_n = cfg.momentum * m.get(name, torch.zeros_like(delta)) + delta
            m[name] = m_n
            new[name] = (theta64 + cfg.lr * m_n).to(theta.dtype)
            continue
        m_n = cfg.beta1 * m.get(name, torch.zeros_like(delta)) + (1 - cfg.beta1) * delta
        v_prev = v.get(name, torch.full_like(delta, cfg.tau**2))
        d2 = delta * delta
        if cfg.name == "fedadagrad":
            v_n = v_prev + d2
        elif cfg.name == "fedadam":
            v_n = cfg.beta2 * v_prev + (1 - cfg.beta2) * d2
        elif cfg.name == "fedyogi":
            v_n = v_prev - (1 - cfg.beta2) * d2 * torch.sign(v_prev - d2)
        else:
            raise ValueError(f"unknown server optimizer '{cfg.name}'")
        m[name], v[name] = m_n, v_n
        new[name] = (theta64 + cfg.lr * m_n / (v_n.sqrt() + cfg.tau)).to(theta.dtype)
    out = {**server_state, "m": m}
    if cfg.name != "fedavgm":
        out["v"] = v
    return new, out
