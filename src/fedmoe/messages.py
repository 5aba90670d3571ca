"""The only thing that passes between a method's server half and its client half.

A :class:`Message` is a plain record: named tensors (in the dtype actually sent), named scalars
(numbers) and a small header (message kind, round). Its size, :meth:`Message.nbytes`, is what
fedmoe counts as communication: every tensor's bytes plus 8 bytes per scalar; the header is the
transport's business (Flower sends it in its own message metadata) and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TRAIN = "train"
EVALUATE = "evaluate"
REPLY = "reply"
SCALAR_BYTES = 8  # a scalar travels as an int64 or a float64
# a reply tensor of the methods that aggregate by activation (FLAME, FC-MoE): (MoE layers, experts)
# tokens routed to each expert in the round's training; the runtime's ledger reads it from there too
ACTIVATION_COUNTS = "activation_counts"
# beside it: (MoE layers,) tokens each layer processed (the runtime checks the counts against it)
TOKENS_PER_LAYER = "tokens_per_layer"


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, int | float] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + SCALAR_BYTES * len(self.scalars)

    def with_header(self, **header: Any) -> "Message":
        return Message(self.tensors, self.scalars, {**self.header, **header})

    def copy(self) -> "Message":
        """The message with tensors of its own: what crosses a wire (Flower) arrives so, and an in-process client
        that wrote into the tensors it was sent would otherwise write into the server's state and the next client's
        message."""
        return Message({n: t.clone() for n, t in self.tensors.items()}, dict(self.scalars), dict(self.header))

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix``, with the prefix removed."""
        return {n[len(prefix):]: t for n, t in self.tensors.items() if n.startswith(prefix)}


@dataclass
class Reply:
    """A client's answer to a train message, as the server receives it."""

    client: int
    message: Message


__all__ = ["EVALUATE", "Message", "REPLY", "Reply", "SCALAR_BYTES", "TRAIN"]
