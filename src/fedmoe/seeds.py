"""Every random choice of a run, derived from the run seed and a named stream.

Two constructions, each with its own streams (the numbers are part of every result's identity:
renumbering a stream changes every number a run produces, so they never change):

* ``derive_seed(seed, stream, *parts)`` -> an int, for ``torch.manual_seed`` and for generators that
  need one integer (client sampling);
* ``numpy_rng(seed, stream, *parts)`` -> a ``numpy.random.Generator`` on ``SeedSequence([seed,
  stream, *parts])`` (data partition, splits, subsampling, budgets, the random expert choice).

A resumed run replays exactly what an uninterrupted one does, because each draw depends only on
(seed, stream, round, client), never on what ran before it.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Streams of :func:`derive_seed`."""

    ADAPTER_INIT = 0  # the initial adapters (LoRA A), identical on the server and every client
    CLIENT_SAMPLING = 1  # (round): which clients train in a round
    LOCAL_TRAINING = 2  # (round, client): data order and dropout of a client's local training
    CLIENT_SETUP = 4  # (client): a client's one-shot setup before round 1 (e.g. FLEx's graft init)
    BOOTSTRAP = 9  # the paired bootstrap of the ROUGE-L change
    DP_NOISE = 10  # (round): the Gaussian noise of client-level differential privacy (federation.dp)
    CLIENT_DP_NOISE = 11  # (round, client): a client's own noise (federation.dp.where: client, client_noise: seeded)


class NumpyStream(IntEnum):
    """Streams of :func:`numpy_rng` (the partition itself uses ``numpy_rng(seed)`` with no stream)."""

    DATA_SPLIT = 1  # (client): a client's train/val/test split
    DATA_SUBSAMPLE = 2  # data.max_examples
    BUDGETS = 3  # a client's compute-budget level (assign: distribution)
    LORA_EXPERTS = 5  # lora.experts_per_layer: which experts carry LoRA
    CONCEPT_SHIFT = 6  # data.concept_shift: which labels shift (no part), each group's derangement (group)
    HELDOUT = 7  # data.heldout: the shared held-out test examples


def _entropy(seed: int) -> int:
    """A non-negative seed for numpy (negative run seeds are mapped two's-complement style)."""
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def derive_seed(seed: int, stream: Stream | int, *parts: int) -> int:
    return int(np.random.SeedSequence([_entropy(seed), int(stream), *(int(p) for p in parts)]).generate_state(1)[0])


def numpy_rng(seed: int, stream: NumpyStream | int | None = None, *parts: int) -> np.random.Generator:
    """``default_rng(seed)`` without a stream, else a generator for ``(seed, stream, *parts)``."""
    if stream is None:
        return np.random.default_rng(_entropy(seed))
    return np.random.default_rng([_entropy(seed), int(stream), *(int(p) for p in parts)])


__all__ = ["NumpyStream", "Stream", "derive_seed", "numpy_rng"]
