"""The contract between the federation loop and a runtime: what a transport does, and what a client
reports of its local training.

:class:`~fedmoe.federation.runtime.Federation` drives a :class:`Transport` — the in-process
:class:`~fedmoe.federation.local.LocalTransport` or Flower's
:class:`~fedmoe.federation.flower.server.FlowerTransport` — with the messages the server half made,
and gets back each client's reply message and a :class:`TrainReport` (in-process: built from the
local training result; on Flower: built by the ClientApp, sent as JSON beside the reply, read back
here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..messages import ACTIVATION_COUNTS

if TYPE_CHECKING:
    from ..messages import Message
    from ..train import LocalResult


@dataclass
class TrainReport:
    """What a client reports of one round's local training, beside its reply message (never sent to
    the server half: the runtime's ledger and metrics rows read it). Under local DP with withheld reports
    (``federation.dp.reports: withhold``) the client keeps what its data decides to itself: those fields are
    None (the metrics empty) and ``withheld`` names them."""

    loss: float | None  # mean training loss over the round's optimizer steps
    steps: int | None
    lr: float
    tokens: int | None  # non-padding tokens processed
    activation_counts: torch.Tensor | None  # (MoE layers, experts): tokens routed to each expert
    metrics: dict[str, Any]  # the method's client metrics (Client.reply)
    overhead: dict[str, float] = field(default_factory=dict)  # the transport's timings: train_s, load_s
    withheld: tuple[str, ...] = ()  # the fields the client kept to itself (dp.WITHHELD_TRAINING)

    @classmethod
    def of(cls, result: LocalResult, metrics: dict, withhold: bool = False, **overhead: float) -> TrainReport:
        if withhold:
            from .dp import WITHHELD_TRAINING

            return cls(loss=None, steps=None, lr=result.lr, tokens=None, activation_counts=None, metrics={},
                       overhead=dict(overhead), withheld=WITHHELD_TRAINING)
        return cls(loss=result.loss, steps=result.steps, lr=result.lr, tokens=result.tokens,
                   activation_counts=result.activation_counts, metrics=dict(metrics), overhead=dict(overhead))

    def to_info(self, reply: Message | None = None) -> dict:
        """As JSON-able values, without the transport's timings. The activation counts travel once:
        as nested lists here, unless the reply message already holds them (:data:`ACTIVATION_COUNTS`)."""
        if self.withheld:
            return {"lr": self.lr, "withheld": list(self.withheld)}
        info = {"loss": self.loss, "steps": self.steps, "lr": self.lr, "tokens": self.tokens, "metrics": self.metrics}
        if reply is None or ACTIVATION_COUNTS not in reply.tensors:
            info[ACTIVATION_COUNTS] = self.activation_counts.tolist()
        return info

    @classmethod
    def from_info(cls, info: dict, reply: Message | None = None, **overhead: float) -> TrainReport:
        """The report :meth:`to_info` wrote, its activation counts from ``reply`` when they came with it.
        A report that says it withheld something carries nothing else (the runtime checks that the run asked
        for it)."""
        if "withheld" in info:
            from .dp import WITHHELD_TRAINING

            if tuple(info["withheld"]) != WITHHELD_TRAINING or set(info) != {"lr", "withheld"}:
                raise ValueError(f"a withheld report must name {list(WITHHELD_TRAINING)} and carry only lr")
            return cls(loss=None, steps=None, lr=_number(info, "lr"), tokens=None, activation_counts=None, metrics={},
                       overhead=dict(overhead), withheld=WITHHELD_TRAINING)
        counts = info.get(ACTIVATION_COUNTS)
        if counts is None:
            if reply is None or ACTIVATION_COUNTS not in reply.tensors:
                raise ValueError("the client's training report has no activation counts, nor has its reply")
            counts = reply.tensors[ACTIVATION_COUNTS]
        return cls(loss=_number(info, "loss", finite=False), steps=count(info, "steps"), lr=_number(info, "lr"),
                   tokens=count(info, "tokens"), activation_counts=torch.as_tensor(counts, dtype=torch.long).clone(),
                   metrics=dict(info["metrics"]), overhead=dict(overhead))


def is_number(v, finite: bool = True) -> bool:
    """Whether a value a client sent is a number a float holds (not a boolean or text, not an integer of
    hundreds of digits), finite where ``finite``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) or not finite
    except OverflowError:
        return False


def _number(info: dict, key: str, finite: bool = True) -> float:
    """``info[key]`` as a float: a JSON number (not a boolean or text; NaN or ±inf only where ``finite`` is
    False: a training loss that went non-finite is reported, and the runtime leaves that update out)."""
    v = info[key]
    if not is_number(v, finite):
        raise ValueError(f"{key} = {str(v)[:40]!r} is not a{' finite' if finite else ''} number")
    return float(v)


def seconds(info: dict, key: str) -> float:
    """``info[key]`` as a duration: a finite non-negative number (a client's timings, summed per round)."""
    v = _number(info, key)
    if v < 0:
        raise ValueError(f"{key} = {v!r} is negative")
    return v


MAX_COUNT = 2**53  # beyond any token or example count; above it a float no longer holds every integer


def count(info: dict, key: str) -> int:
    """``info[key]`` as a non-negative integer (a JSON integer, not a boolean, text or fraction) below
    :data:`MAX_COUNT` (JSON integers have no bound: 10**400 would overflow the first float it meets)."""
    v = info[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_COUNT:
        raise ValueError(f"{key} = {str(v)[:40]!r} is not a non-negative integer below 2**53")
    return v


class Transport(Protocol):
    """How the loop reaches the clients. Every method gets the messages the server half made (one per
    client, by id) and returns what came back; a client that failed is named with why, never dropped
    silently."""

    def wait_for_clients(self) -> None:
        """Block until every client of the run is reachable (or raise, naming who is missing)."""

    def setup(self, prog) -> dict[int, dict]:
        """Every client's one-shot setup: {client: {"setup": metrics, "data": its data, "profile": k, rank}}."""

    def started(self) -> list[dict]:
        """The client processes that started since the last call, each with its load times and device: [{"client",
        "load_s" (its data and, when it loaded it, the model), "model_s" (the model), "device"}]; [] where clients
        run in this process (the runtime loaded the model once)."""

    def train(self, round_idx: int, messages: dict[int, Message],
              prog) -> tuple[dict[int, tuple[Message, TrainReport]], dict[int, str]]:
        """({client: (reply, report)}, {client: why it failed}) for this round's train messages."""

    def evaluate(self, round_idx: int, messages: dict[int, Message], with_answers: bool,
                 general_for: dict[int, bool], prog) -> tuple[dict[int, dict], dict[int, str]]:
        """Each client's own model on its own test data: ({client: results}, {client: why it failed})."""

    def evaluate_with_global(self, round_idx: int, messages: dict[int, Message], global_message: Message,
                             with_answers: bool, general_for: dict[int, bool], general: bool,
                             prog) -> tuple[dict[int, dict], dict[int, str], dict | None, dict[int, str]]:
        """:meth:`evaluate`, and the global model (``global_message``) on the union of the clients' test data
        (the general text and MMLU if ``general``, of one addressed client's evaluation where clients compute it):
        (each client's own results, {client: why it failed}, the global results or None when no client could give
        them, {client whose test data is missing from them: why}). A runtime whose clients are elsewhere asks each
        for both in one message."""

    def state(self) -> dict:
        """What a checkpoint must hold to resume the transport (private stores, or where they are)."""

    def restore(self, state: dict) -> None:
        """Take back :meth:`state` from a checkpoint."""


__all__ = ["TrainReport", "Transport"]
