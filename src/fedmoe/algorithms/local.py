"""Local-only training: the lower bound of every federated method (no federation at all).

Each client trains FedIT's adapters on its own data alone, round after round, and keeps them as
private state; nothing is sent up (a reply carries n_i only) and nothing is sent down after the
start (a train message is empty). The server's global model stays the initial one, so the "global"
numbers of such a run are the zero-shot model's; each client's own model is what it learned alone.

Where a federated method beats this, federation helped the client; where it loses, the other
clients' updates hurt it (the question of label skew and concept shift). The upper bound is the
centralised run (``data.pool_train``: every client trains on all the clients' training data).
"""

from __future__ import annotations

from ..messages import Message
from .base import N_TRAIN, Method, Server, State
from .fedit import FedITClient

STATE = "state"  # private: the client's own adapters


class LocalServer(Server):
    trains_global_model = False
    supports_server_optimizer = False
    server_optimizer_note = "aggregates nothing (each client trains alone)"
    dp_note = "aggregates nothing: no client update reaches the server"

    @classmethod
    def secagg_refusal(cls, cfg):
        return cls.dp_note

    def downlink(self, global_state, server_state, client, *, round_idx) -> Message:
        # the global model (client None) is the initial one; a client needs nothing: it has its own
        return Message(tensors=dict(global_state) if client is None else {})

    def aggregate(self, global_state: State, server_state: dict, replies, *, round_idx):
        return global_state, server_state, {}


class LocalClient(FedITClient):
    personalized = True

    def setup(self, client, mm, train):
        return {STATE: {n: t.clone() for n, t in mm.get_state().items()}}, {}

    def model_state(self, client, mm, message, private) -> State:
        if client is None or not private:
            return dict(message.tensors)
        return dict(private[STATE])

    def reply(self, client, mm, message, private, result):
        return Message(tensors={}, scalars={N_TRAIN: result.n_train}), {STATE: mm.get_state()}, {}


METHOD = Method("local_only", LocalServer, LocalClient,
                summary="local-only training (no federation): each client trains alone, the lower bound")
