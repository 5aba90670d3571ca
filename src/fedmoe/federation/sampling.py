"""Seeded client sampling: a function of (seed, round) only, so a resumed run samples exactly what an
uninterrupted one would."""

from __future__ import annotations

import numpy as np

from ..seeds import Stream, derive_seed


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> list[int]:
    """The clients of round ``round_idx``: round(fraction × num_clients) of them (Python's rounding, ties to even:
    5 × 0.5 → 2, 7 × 0.5 → 4; at least one), sorted."""
    m = max(1, int(round(fraction * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, Stream.CLIENT_SAMPLING, round_idx))
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))
