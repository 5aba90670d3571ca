"""Seeded client sampling: a function of (seed, round) only, so a resumed run samples exactly what an
uninterrupted one would."""

from __future__ import annotations

import numpy as np

from ..seeds import Stream, derive_seed


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients a round samples: round(fraction × num_clients) (Python's rounding, ties to even:
    5 × 0.5 → 2, 7 × 0.5 → 4), at least one, at most all."""
    return min(num_clients, max(1, int(round(fraction * num_clients))))


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> list[int]:
    """The clients of round ``round_idx``: :func:`clients_per_round` of them, sorted."""
    m = clients_per_round(num_clients, fraction)
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, Stream.CLIENT_SAMPLING, round_idx))
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))
