"""Client compute budgets (FLAME, Table 1): which budget level each client has.

Shared by FLAME (a level gives k_i activated experts) and the rank-compression baselines (a level
gives a LoRA rank r_i). The server and every client derive the levels from the run config alone.
"""

from __future__ import annotations

from typing import Literal

from ..configbase import StrictModel
from ..seeds import NumpyStream, numpy_rng


class BudgetConfig(StrictModel):
    """Client compute budgets β1..βB (FLAME Table 1). Level b gives a client k_i = top_k[b] activated
    experts (FLAME) or LoRA rank ranks[b] (rank-compression baselines)."""

    top_k: list[int] | None = None  # None = k, k/2, k/4, k/8 of the model (>= 1), as in FLAME
    ranks: list[int] | None = None  # None = lora.rank x (1, 0.6, 0.4, 0.3), rounded up: 20 -> 20, 12, 8, 6
    assign: Literal["uniform", "map", "distribution"] = "uniform"  # uniform: client i gets level i mod B
    map: list[int] | None = None  # assign=map: level index per client
    probs: list[float] | None = None  # assign=distribution: probability of each level (seeded draw)


def default_top_k_levels(model_k: int, levels: int = 4) -> list[int]:
    """k, k/2, k/4, ... (at least 1): OLMoE's top-8 gives 8, 4, 2, 1 (β1..β4)."""
    return [max(1, model_k >> i) for i in range(levels)]


def client_levels(cfg: BudgetConfig, num_levels: int, num_clients: int, seed: int) -> list[int]:
    """The budget level (0 = β1, the largest) of every client."""
    if cfg.assign == "uniform":
        return [i % num_levels for i in range(num_clients)]
    if cfg.assign == "map":
        if cfg.map is None or len(cfg.map) != num_clients:
            raise ValueError(f"algorithm.budgets.map must give one level per client ({num_clients}), got {cfg.map}")
        bad = [b for b in cfg.map if not 0 <= b < num_levels]
        if bad:
            raise ValueError(f"algorithm.budgets.map has levels {bad}; valid levels are 0..{num_levels - 1}")
        return list(cfg.map)
    probs = cfg.probs
    if probs is None or len(probs) != num_levels or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"algorithm.budgets.probs must be {num_levels} probabilities summing to 1, got {probs}")
    rng = numpy_rng(seed, NumpyStream.BUDGETS)
    return [int(b) for b in rng.choice(num_levels, size=num_clients, p=probs)]
