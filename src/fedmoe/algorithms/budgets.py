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


# what each budget key gives a client: the methods that read it say which of them they read
BUDGET_USE = {"top_k": "client's k (activated experts)", "ranks": "LoRA rank", "assign": "level assignment",
              "map": "level assignment", "probs": "level assignment"}


def unread_budgets(cfg, reads: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    """The ``algorithm.budgets`` keys of ``cfg`` (a RunConfig) set away from their defaults that its run would not
    read, each with why: those outside ``reads`` (the keys its method reads), and ``map`` / ``probs`` unless
    ``assign`` is ``map`` / ``distribution``."""
    b, default = cfg.algorithm.budgets, BudgetConfig()
    out = []
    for key in BudgetConfig.model_fields:
        if getattr(b, key) == getattr(default, key):
            continue
        if key not in reads:
            why = (f"algorithm.name {cfg.algorithm.name} takes no {BUDGET_USE[key]} from the budgets"
                   + (" (algorithm.client_top_k gives each client's k)" if key == "top_k"
                      and cfg.algorithm.client_top_k is not None else ""))
            out.append((f"algorithm.budgets.{key}", why))
        elif key == "map" and b.assign != "map":
            out.append(("algorithm.budgets.map", f"algorithm.budgets.assign is {b.assign!r}, not map"))
        elif key == "probs" and b.assign != "distribution":
            out.append(("algorithm.budgets.probs", f"algorithm.budgets.assign is {b.assign!r}, not distribution"))
    return out

