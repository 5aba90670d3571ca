"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning") on LoRA (one of FLEx's "MoE + X" baselines).

Client i, starting from x with server control c and its own control c_i (private), trains K steps on
gradients g − c_i + c, giving y_i; it replies with y_i, n_i and Δc_i = c_i⁺ − c_i. Server:
x ← Σ_{i∈S} p_i y_i (then the configured server optimizer), c ← c + (1/N) Σ_{i∈S} Δc_i with N the
number of clients. p_i (``algorithm.scaffold.weights``): ``uniform`` (default), 1/|S| — the paper's
x ← x + (η_g/|S|) Σ Δy_i with η_g = 1 —, or ``n``, n_i / Σ n (FedAvg's, what fedmoe used before).
The downlink carries x and c (both count in the bytes); c lives in the server state.

The new control c_i⁺ (``algorithm.scaffold.control``):

- ``mean_gradient`` (default, our choice): the mean over the K local steps of the raw minibatch
  gradients g_k of the local loss (before the correction and clipping). With plain SGD local steps this
  *is* the paper's option II: y = x − η Σ_k (g_k − c_i + c), so c_i − c + (x − y)/(Kη) = mean_k g_k.
  Unlike option II it stays gradient-sized under AdamW, the local optimizer the other methods use.
- ``option2``: the paper's formula c_i⁺ = c_i − c + (x − y_i)/(K·η), K·η with the round's lr. It is
  a mean gradient only for plain SGD steps (with AdamW each step moves each coordinate by about η, so
  (x − y)/(Kη) is ~1 per coordinate — measured 50–100× the gradient on the tiny OLMoE — and from
  round 2 the correction swamps the gradient), so it requires ``train.optimizer: sgd`` without momentum,
  weight decay or gradient clipping (``train.grad_clip: null``), each of which changes the step.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..configbase import StrictModel
from ..messages import Message, Reply
from .base import N_TRAIN, Method, Objective, State, sizes, weighted_average
from .fedit import FedITClient, FedITServer
from .server_opt import server_update

C = "c/"  # downlink: the server control, per trainable tensor
DC = "dc/"  # reply: the change of the client's control


class ScaffoldConfig(StrictModel):
    control: Literal["mean_gradient", "option2"] = "mean_gradient"  # how c_i⁺ is computed (module docstring)
    weights: Literal["uniform", "n"] = "uniform"  # p_i of x ← Σ p_i y_i: 1/|S| (the paper) or n_i / Σ n


def _rms(d: State) -> float:
    """The root mean square of all values of ``d``."""
    return (sum(float((t.double() ** 2).sum()) for t in d.values()) / max(1, sum(t.numel() for t in d.values()))) ** 0.5


class ScaffoldServer(FedITServer):
    def reply_extras(self, global_state):
        return {DC + n: (tuple(t.shape), t.dtype) for n, t in global_state.items()}

    supports_dp = False
    robust_note = ("also sums the clients' control-variate changes Δc_i into the server control c, which a robust "
                   "statistic of the model updates would leave unbounded")
    dp_note = ("also sums the clients' control-variate changes Δc_i into the server control c, which is sent to "
               "every client: a private SCAFFOLD would have to clip and noise those too")

    @classmethod
    def secagg_refusal(cls, cfg):
        if cfg.algorithm.scaffold.weights != "uniform":
            return ("with algorithm.scaffold.weights: n averages the models by n_i but sums the control changes "
                    "unweighted, two sums SecAgg+ cannot give in one (set weights: uniform)")
        return None

    @classmethod
    def secagg_weights(cls, cfg) -> str:
        return "uniform"

    def secure_aggregate(self, global_state, server_state, mean, replies, *, round_idx):
        """x ← the server optimizer on x + mean(Δy_i); c ← c + (|S|/N)·mean(Δc_i) = c + Σ Δc_i / N."""
        averaged = {n: (t.to(torch.float64) + mean[n]).to(t.dtype) for n, t in global_state.items()}
        new_x, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                            round_idx=round_idx)
        c, num_clients = server_state["c"], self.cfg.data.partition.num_clients
        new_c = {n: (c[n].to(torch.float64) + mean[DC + n] * replies / num_clients).to(c[n].dtype) for n in global_state}
        return new_x, {**server_state, "c": new_c}, {"control_rms": _rms(new_c)}

    def initial_server_state(self, global_state: State) -> dict:
        return {"c": {n: torch.zeros_like(t) for n, t in global_state.items()}}

    def downlink(self, global_state, server_state, client, *, round_idx) -> Message:
        return Message(tensors={**global_state, **{C + n: t for n, t in server_state["c"].items()}})

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        models = [{n: t for n, t in r.message.tensors.items() if not n.startswith(DC)} for r in replies]
        p = [1.0] * len(replies) if self.cfg.algorithm.scaffold.weights == "uniform" else sizes(replies)
        averaged = weighted_average(models, p)
        c = server_state["c"]
        new_x, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
        num_clients = self.cfg.data.partition.num_clients
        new_c = {n: c[n] + sum(r.message.tensors[DC + n] for r in replies) / num_clients for n in global_state}
        return new_x, {**server_state, "c": new_c}, {"control_rms": _rms(new_c)}


class ScaffoldClient(FedITClient):
    @classmethod
    def plan_state_bytes(cls, cfg, params) -> int:
        # the correction c − c_i (a tensor per trainable) and, for control: mean_gradient, the float64 gradient sum
        size = sum(p.numel() * p.element_size() for p in params.values())
        mean = sum(p.numel() * 8 for p in params.values()) if cfg.algorithm.scaffold.control == "mean_gradient" else 0
        return super().plan_state_bytes(cfg, params) + size + mean

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.algorithm.scaffold.control != "option2":
            return
        why = ("algorithm.scaffold.control = 'option2' computes c_i from (x − y)/(K·lr), a mean gradient only for "
               "plain SGD local steps")
        if cfg.train.optimizer != "sgd":
            raise ValueError(f"{why}, but train.optimizer is {cfg.train.optimizer!r}: set train.optimizer: sgd, or use "
                             "algorithm.scaffold.control: mean_gradient")
        # each of these changes the step (x − y is no longer lr times the summed corrected gradients), so c_i leaves
        # gradient units: on the tiny OLMoE at K = 5 (tests/test_scaffold.py) momentum 0.9 made it 3.0x the mean
        # gradient, weight decay 0.5 4.2x, a clip of 0.01 0.01x
        changed = [f"{key} = {value}" for key, value, plain in (
            ("train.momentum", cfg.train.momentum, 0.0), ("train.weight_decay", cfg.train.weight_decay, 0.0),
            ("train.grad_clip", cfg.train.grad_clip, None)) if value != plain]
        if changed:
            raise ValueError(f"{why}, and {', '.join(changed)} changes the steps (c_i is then not gradient-sized): set "
                             "train.momentum: 0, train.weight_decay: 0 and train.grad_clip: null (the paper's local "
                             "steps), or use algorithm.scaffold.control: mean_gradient (the mean raw gradient, for "
                             "any local optimizer)")

    def setup(self, client, mm, train):
        return {"c_i": {n: torch.zeros_like(t) for n, t in mm.get_state().items()}}, {}

    def model_state(self, client, mm, message, private) -> State:
        return {n: t for n, t in message.tensors.items() if not n.startswith(C)}

    def objective(self, client, mm, message, private) -> Objective:
        base = super().objective(client, mm, message, private)
        c = message.prefixed(C)
        return Objective(loss_terms=base.loss_terms, grad_correction={n: c[n] - private["c_i"][n] for n in c},
                         mean_gradient=self.cfg.algorithm.scaffold.control == "mean_gradient")

    def reply(self, client, mm, message, private, result):
        y = mm.get_state()
        c_i = private["c_i"]
        if self.cfg.algorithm.scaffold.control == "mean_gradient":
            new_ci = {n: result.mean_gradient[n].to(c_i[n].dtype) for n in y}
        else:
            x, c = self.model_state(client, mm, message, private), message.prefixed(C)
            new_ci = {n: c_i[n] - c[n] + (x[n] - y[n]) / (result.steps * result.lr) for n in y}
        tensors = {**y, **{DC + n: new_ci[n] - c_i[n] for n in y}}
        return Message(tensors=tensors, scalars={N_TRAIN: result.n_train}), {**private, "c_i": new_ci}, {}


METHOD = Method("scaffold", ScaffoldServer, ScaffoldClient, config=ScaffoldConfig, reads=("fedit",),
                summary="SCAFFOLD control variates (the mean local gradient, or option II with SGD) on LoRA",
                notes={"control_rms": "root mean square of the server control c after the round (gradient-sized)"})
