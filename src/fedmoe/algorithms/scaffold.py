"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II control variates, on LoRA (one of FLEx's "MoE + X" baselines).

Client i, starting from x with server control c and its own control c_i (private), trains with
gradients g − c_i + c for K steps of learning rate η, giving y_i; then c_i⁺ = c_i − c + (x − y_i)/(K·η).
It replies with y_i, n_i and Δc_i = c_i⁺ − c_i. Server: x ← Σ p_i y_i (then the configured server
optimizer), c ← c + (1/N) Σ_{i∈S} Δc_i with N the number of clients. The downlink carries x and c
(both count in the bytes); c lives in the server state.
(our choice) with AdamW as the local optimizer the correction is added to the gradient before the
optimizer step; K·η uses the round's lr.
"""

from __future__ import annotations

import torch

from ..messages import Message, Reply
from .base import N_TRAIN, Method, Objective, State, sizes, weighted_average
from .fedit import FedITClient, FedITServer
from .server_opt import server_update

C = "c/"  # downlink: the server control, per trainable tensor
DC = "dc/"  # reply: the change of the client's control


class ScaffoldServer(FedITServer):
    def initial_server_state(self, global_state: State) -> dict:
        return {"c": {n: torch.zeros_like(t) for n, t in global_state.items()}}

    def downlink(self, global_state, server_state, client) -> Message:
        return Message(tensors={**global_state, **{C + n: t for n, t in server_state["c"].items()}})

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply]):
        models = [{n: t for n, t in r.message.tensors.items() if not n.startswith(DC)} for r in replies]
        averaged = weighted_average(models, sizes(replies))
        c = server_state["c"]
        new_x, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state)
        num_clients = self.cfg.data.partition.num_clients
        new_c = {n: c[n] + sum(r.message.tensors[DC + n] for r in replies) / num_clients for n in global_state}
        return new_x, {**server_state, "c": new_c}, {}


class ScaffoldClient(FedITClient):
    def setup(self, client, mm, train):
        return {"c_i": {n: torch.zeros_like(t) for n, t in mm.get_state().items()}}, {}

    def model_state(self, client, mm, message, private) -> State:
        return {n: t for n, t in message.tensors.items() if not n.startswith(C)}

    def objective(self, client, mm, message, private) -> Objective:
        base = super().objective(client, mm, message, private)
        c = message.prefixed(C)
        return Objective(loss_terms=base.loss_terms, grad_correction={n: c[n] - private["c_i"][n] for n in c})

    def reply(self, client, mm, message, private, result):
        y = mm.get_state()
        x, c, c_i = self.model_state(client, mm, message, private), message.prefixed(C), private["c_i"]
        new_ci = {n: c_i[n] - c[n] + (x[n] - y[n]) / (result.steps * result.lr) for n in y}
        tensors = {**y, **{DC + n: new_ci[n] - c_i[n] for n in y}}
        return Message(tensors=tensors, scalars={N_TRAIN: result.n_train}), {**private, "c_i": new_ci}, {}


METHOD = Method("scaffold", ScaffoldServer, ScaffoldClient, reads=("fedit",),
                summary="SCAFFOLD control variates (option II) on LoRA")
