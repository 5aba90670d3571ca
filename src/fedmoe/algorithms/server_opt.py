"""Server optimizers of the FedOpt family (Reddi et al., ICLR 2021, "Adaptive Federated
Optimization", Algorithm 2) over the aggregated delta Δ = Σ p_i (θ_i − θ):

  FedAvgM    m ← β·m + Δ;                      θ ← θ + η·m
  FedAdagrad m ← β1·m + (1−β1)·Δ; v ← v + Δ²;  θ ← θ + η·m / (√v + τ)
  FedAdam    m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²
  FedYogi    m ← β1·m + (1−β1)·Δ; v ← v − (1−β2)·Δ²·sign(v − Δ²)

(our choice, ``convention: reddi``, default) the second moment starts at v = τ² as in the paper's
algorithm (v_{-1} ≥ τ²); no bias correction. ``convention: flower`` reproduces Flower 1.42's
strategies (``flwr.serverapp.strategy``) exactly: v starts at 0, FedAdam's step is bias-corrected
with η·√(1 − β2^(t+1)) / (1 − β1^(t+1)) at round t, FedAdagrad has β1 = 0 (m = Δ); FedYogi and
FedAvgM are the same under both. ``none`` is plain FedAvg: θ ← θ + Δ.

Default server learning rates η (``lr: null``), per optimizer: FedAvgM 1.0 with momentum 0.9 (Hsu et
al., 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"); FedAdam and FedYogi 1e-2, FedAdagrad 1e-1, with τ = 1e-3: the orders of magnitude
Reddi et al. found best across their tasks for the adaptive optimizers (their grid: η ∈ 10^{-3..1}).
Flower's strategies default to the same orders (FedYogi 1e-2, FedAdagrad 1e-1; FedAdam 1e-1). An
adaptive step is ≈ η per coordinate whatever the size of Δ (m/√v is ≈ ±1 when Δ keeps its sign), so
η = 1 would move every LoRA factor by ~1 per round: far beyond what local training moves them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..configbase import StrictModel

State = dict[str, torch.Tensor]


class ServerOptimizerConfig(StrictModel):
    name: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "none"
    lr: float | None = Field(None, gt=0)  # server learning rate eta (None: the optimizer's default, DEFAULT_LR)
    momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity
    # reddi: Reddi et al.'s algorithm (v0 = τ², no bias correction); flower: Flower 1.42's strategies
    convention: Literal["reddi", "flower"] = "reddi"

    @model_validator(mode="after")
    def _lr_needs_an_optimizer(self):
        if self.name == "none" and self.lr is not None:
            raise ValueError(f"algorithm.server_optimizer.lr = {self.lr} is the server learning rate of a server "
                             "optimizer, but algorithm.server_optimizer.name is 'none' (plain FedAvg): set a name "
                             "(fedavgm, fedadam, fedyogi, fedadagrad) or remove the lr")
        return self


DEFAULT_LR = {"none": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-1}


def server_lr(cfg: ServerOptimizerConfig) -> float:
    """η: the configured server learning rate, or the optimizer's default."""
    return _lr(cfg.name, cfg.lr)


def _lr(name: str, lr: float | None) -> float:
    return DEFAULT_LR[name] if lr is None else lr


def _beta1(name: str, convention: str, beta1: float) -> float:
    """β1 as the update uses it: Flower's FedAdagrad has none (m = Δ)."""
    return 0.0 if convention == "flower" and name == "fedadagrad" else beta1


def effective(section) -> dict | None:
    """The server optimizer as :func:`server_update` runs it, for the run's record (summary.json's ``method``, the
    report's header, ``fedmoe run``'s banner, ``fedmoe compare``): its name, η as resolved (``lr: null`` → its
    optimizer's :data:`DEFAULT_LR`) and only the settings its update reads (FedAvgM: the momentum; FedAdagrad: no
    β2, and β1 = 0 under ``convention: flower``); None for plain FedAvg (``none``). ``section``: a
    :class:`ServerOptimizerConfig` or its dict as a run's config.yaml holds it (a key it lacks: the default)."""
    d = section.model_dump() if isinstance(section, ServerOptimizerConfig) else dict(section or {})
    defaults = ServerOptimizerConfig().model_dump()

    def get(key):
        return defaults.get(key) if d.get(key) is None else d[key]

    name = get("name")
    if name == "none":
        return None
    if name not in DEFAULT_LR:  # not one this fedmoe knows: named, nothing resolved
        return {"name": name}
    out = {"name": name, "lr": _lr(name, d.get("lr"))}
    if name == "fedavgm":
        return {**out, "momentum": get("momentum")}
    out["beta1"] = _beta1(name, get("convention"), get("beta1"))
    if name != "fedadagrad":
        out["beta2"] = get("beta2")
    return {**out, "tau": get("tau"), "convention": get("convention")}


def unread(cfg: ServerOptimizerConfig) -> list[tuple[str, str]]:
    """The settings of ``algorithm.server_optimizer`` set away from their defaults that its update does not read
    (FedAvgM reads only the momentum; FedAdagrad no β2, and no β1 under ``convention: flower``), each with why."""
    default = ServerOptimizerConfig()
    reads = {"none": set(), "fedavgm": {"momentum"}, "fedadam": {"beta1", "beta2", "tau", "convention"},
             "fedyogi": {"beta1", "beta2", "tau", "convention"},
             "fedadagrad": {"tau", "convention"} | ({"beta1"} if cfg.convention == "reddi" else set())}[cfg.name]
    out = []
    for key in ("momentum", "beta1", "beta2", "tau", "convention"):
        if key not in reads and getattr(cfg, key) != getattr(default, key):
            why = ("Flower's FedAdagrad has no first moment (convention: flower)" if key == "beta1"
                   and cfg.name == "fedadagrad" else f"algorithm.server_optimizer.name {cfg.name!r} has no {key}")
            out.append((f"algorithm.server_optimizer.{key}", why))
    return out


def server_update(cfg: ServerOptimizerConfig, global_state: State, averaged: State, server_state: dict,
                  round_idx: int | None = None) -> tuple[State, dict]:
    """The new global state from the averaged client states, and the server state with the optimizer's
    moments (``m``, ``v``) updated; every other key of ``server_state`` (the method's own) is kept.
    ``round_idx`` (1-based): FedAdam's bias correction under ``convention: flower``."""
    if cfg.name == "none":
        return {n: t.clone() for n, t in averaged.items()}, server_state
    eta = server_lr(cfg)
    flower = cfg.convention == "flower"
    beta1 = _beta1(cfg.name, cfg.convention, cfg.beta1)
    if flower and cfg.name == "fedadam":
        if round_idx is None:
            raise ValueError("FedAdam under convention: flower needs the round (its bias correction)")
        eta = eta * (1 - cfg.beta2 ** (round_idx + 1.0)) ** 0.5 / (1 - cfg.beta1 ** (round_idx + 1.0))
    m = dict(server_state.get("m", {}))
    v = dict(server_state.get("v", {}))
    new: State = {}
    for name, theta in global_state.items():
        theta64 = theta.to(torch.float64)
        delta = averaged[name].to(torch.float64) - theta64
        if cfg.name == "fedavgm":
            m_n = cfg.momentum * m.get(name, torch.zeros_like(delta)) + delta
            m[name] = m_n
            new[name] = (theta64 + eta * m_n).to(theta.dtype)
            continue
        m_n = beta1 * m.get(name, torch.zeros_like(delta)) + (1 - beta1) * delta
        v_prev = v.get(name, torch.zeros_like(delta) if flower else torch.full_like(delta, cfg.tau**2))
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
        new[name] = (theta64 + eta * m_n / (v_n.sqrt() + cfg.tau)).to(theta.dtype)
    out = {**server_state, "m": m}
    if cfg.name != "fedavgm":
        out["v"] = v
    return new, out
