"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from fedmoe.algorithms.base import N_TRAIN, ModelSpec
from fedmoe.messages import Message, Reply


def reply(client: int, tensors: dict, n: int, **scalars) -> Reply:
    """A client's reply as the server receives it."""
    return Reply(client, Message(tensors=dict(tensors), scalars={N_TRAIN: n, **scalars}))


def built(method, cfg, mm, seed: int = 0):
    """Build ``method``'s adapters on ``mm`` (seeded) and return (server half, client half, spec)."""
    torch.manual_seed(seed)
    method.client.build(cfg, mm)
    spec = ModelSpec.of(mm)
    return method.server(cfg, spec), method.client(cfg), spec
