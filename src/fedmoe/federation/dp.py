"""Client-level differential privacy (``federation.dp``): DP-FedAvg (McMahan, Ramage, Talwar, Zhang,
ICLR 2018, "Learning Differentially Private Recurrent Language Models") on a method's aggregation.

Each round, with θ the global state, m the number of clients sampled (a constant of the config:
the fixed denominator) and C, σ = ``federation.dp.clip_norm``, ``noise_multiplier``:

    Δ_i = θ_i − θ                      over the global tensors (all the server aggregates of reply i)
    Δ_i ← Δ_i · min(1, C / ‖Δ_i‖₂)     one L2 norm over all of them (flat clipping)
    Δ̄  = (Σ_i w_i ⊙ Δ_i + N(0, σ²C²)) / m      w_i in [0, 1] from reply i alone (``Server.dp_weights``;
                                                uniform by default: DP-FedAvg's estimator)
    θ ← the server optimizer on θ + Δ̄ (``none``: θ + Δ̄)

Adding or removing one client changes Σ_i w_i ⊙ Δ_i by at most C (‖w_i ⊙ Δ_i‖ ≤ ‖Δ_i‖ ≤ C) and m does
not depend on the data, so a round is the Gaussian mechanism with noise multiplier σ; everything
after it (the server optimizer, the downlinks, the next rounds) is post-processing. The noise is
added to the average before the server optimizer, so its moments are computed from private values too.

Accounting: Rényi DP of Google's ``dp-accounting`` (the library Flower's own ``RdpAccountant``
wraps), one Gaussian event per applied round, add-or-remove-one client, no amplification by client
sampling (``federation.fraction`` < 1 samples a fixed number of clients, not Poisson: the ε reported is
then an upper bound). This is the accounting Flower's fixed-clipping DP strategies support.

Clipping is done by the server on each reply (central DP: the server is trusted with individual
updates, as in Flower's server-side fixed clipping); what the guarantee covers is the sequence of
global models. The run's own logs (per-client losses, activation counts, the report) are not private.

Why not Flower's helpers (``flwr.supercore.differential_privacy``): fedmoe runs its own loop on both
runtimes (the methods' replies are not the identical ArrayRecords Flower's strategies wrap), its
noise helper draws from NumPy's global generator (fedmoe draws every random number from a named,
seeded stream, so that a resumed run is exact), and its clipping helper works on NumPy arrays and
divides by the norm of an all-zero update. The formulas are the same: tests compare with Flower's.
"""

from __future__ import annotations

import math

import torch

from ..algorithms.server_opt import server_update
from ..config import ConfigError
from ..seeds import Stream, derive_seed

State = dict[str, torch.Tensor]
ACCOUNTING = ("Rényi DP (dp-accounting), one Gaussian mechanism per round, add-or-remove-one client, "
              "no amplification by client sampling")


def require_dp_accounting() -> None:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ConfigError("federation.dp reports (ε, δ) with Google's dp-accounting, which is not installed: "
                          "pip install 'fedmoe[dp]' (or remove federation.dp)") from None


def update_norm(update: State) -> float:
    """The L2 norm of all tensors of ``update`` together (float64)."""
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in update.values()))


def clip_update(update: State, clip_norm: float) -> tuple[State, float]:
    """(update · min(1, C/‖update‖) in float64, ‖update‖): the flat clipping of DP-FedAvg."""
    norm = update_norm(update)
    scale = clip_norm / norm if norm > clip_norm else 1.0
    return {n: t.to(torch.float64) * scale for n, t in update.items()}, norm


def _broadcast(w, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=torch.float64)
    if not bool(torch.all((w >= 0) & (w <= 1))):
        raise ValueError(f"DP weights must be in [0, 1], got {w}")
    return w.reshape(*w.shape, *([1] * (like.dim() - w.dim())))


def gaussian_noise(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def private_aggregate(server, cfg, global_state: State, server_state: dict, replies, denominator: int,
                      round_idx: int) -> tuple[State, dict, dict]:
    """The round's aggregation under ``cfg.federation.dp``: (new global state, server state, metrics)."""
    dp = cfg.federation.dp
    C, sigma = dp.clip_norm, dp.noise_multiplier
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in global_state.items()}
    clipped = 0
    for r in replies:
        delta = {n: r.message.tensors[n].to(torch.float64) - t.to(torch.float64) for n, t in global_state.items()}
        delta, norm = clip_update(delta, C)
        clipped += norm > C
        weights = server.dp_weights(global_state, r)
        for n in total:
            total[n] += delta[n] if n not in weights else _broadcast(weights[n], delta[n]) * delta[n]
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, Stream.DP_NOISE, round_idx))
    averaged = {}
    for n, t in global_state.items():
        noisy = total[n] + gaussian_noise(t.shape, sigma * C, gen) if sigma > 0 else total[n]
        averaged[n] = (t.to(torch.float64) + noisy / denominator).to(t.dtype)
    new, server_state = server_update(cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
    return new, server_state, {"dp_clipped_fraction": clipped / max(1, len(replies)),
                               "dp_noise_std": sigma * C / denominator}


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` Gaussian mechanisms of noise multiplier σ (RDP accountant of
    dp-accounting, add-or-remove-one, no sampling amplification); ∞ without noise, 0 before round 1."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import GaussianDpEvent, NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def round_metrics(cfg, rounds: int) -> dict:
    """What a round's server row reports: ε after ``rounds`` applied rounds, and δ."""
    dp = cfg.federation.dp
    return {"dp_epsilon": epsilon(dp.noise_multiplier, rounds, dp.delta), "dp_delta": dp.delta}


def privacy_summary(cfg, rounds: int, denominator: int) -> dict:
    """summary.json's ``privacy`` block."""
    dp = cfg.federation.dp
    return {"epsilon": epsilon(dp.noise_multiplier, rounds, dp.delta), "delta": dp.delta, "rounds": rounds,
            "clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier, "clients_per_round": denominator,
            "noise_std_of_average": dp.noise_multiplier * dp.clip_norm / denominator, "accounting": ACCOUNTING}


__all__ = ["clip_update", "epsilon", "private_aggregate", "privacy_summary", "require_dp_accounting", "update_norm"]
