"""Is a change in a per-example metric real? A paired bootstrap over the test examples."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(after: list[float], before: list[float], n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``after - before`` over paired examples, with a percentile bootstrap interval.

    The examples are resampled with replacement as pairs, so what is common to both scores of an
    example (its difficulty) cancels: the interval is the one for the change, not for either mean.
    Deterministic for a given seed. Returns ``{"n", "mean", "low", "high", "confidence", "better",
    "worse", "equal"}`` (the last three count examples whose score rose, fell, stayed).
    """
    a = np.asarray(after, dtype=np.float64)
    b = np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: need two equally long lists of scores, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no examples to compare (empty lists)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence must lie in (0, 1), got {confidence}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // d.size)  # bound the index matrix at ~16 MB
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"n": int(d.size), "mean": float(d.mean()), "low": float(low), "high": float(high),
            "confidence": confidence, "better": int((d > 0).sum()), "worse": int((d < 0).sum()),
            "equal": int((d == 0).sum())}


# fewer paired examples than this and a percentile bootstrap interval says nothing: with 1 or 2 examples it is
# the examples' own differences (n = 1: a single point), which exclude 0 whenever they share a sign
MIN_PAIRS = 10


def change_verdict(change: dict) -> str:
    """What a :func:`paired_bootstrap` interval says of the change, in words; with fewer than :data:`MIN_PAIRS`
    examples, that it says nothing."""
    if change["n"] < MIN_PAIRS:
        return (f"too few examples ({change['n']}, fewer than {MIN_PAIRS}) for the interval to tell a change from "
                "noise")
    if change["low"] > 0:
        return "the interval excludes 0: an improvement beyond test-sample noise (this run's; seeds not varied)"
    if change["high"] < 0:
        return "the interval excludes 0: a drop beyond test-sample noise (this run's; seeds not varied)"
    return "the interval contains 0: no change distinguishable from noise"


def format_change(change: dict | None) -> str:
    """``+0.12 [-0.40, +0.64]``: a :func:`paired_bootstrap` result in one table cell ("–" when absent; its n
    added when under :data:`MIN_PAIRS`)."""
    if not change:
        return "–"
    few = f" (n = {change['n']}: too few)" if change["n"] < MIN_PAIRS else ""
    return f"{change['mean']:+.2f} [{change['low']:+.2f}, {change['high']:+.2f}]{few}"
