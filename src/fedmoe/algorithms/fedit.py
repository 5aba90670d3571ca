"""FedIT: FedAvg on LoRA (Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024), with FedProx (Li et al., MLSys 2020) as its client-side option.

Client: LoRA on the attention projections and, if ``lora.experts``, per-expert LoRA on the routed
experts (all experts, or ``lora.experts_per_layer`` seeded random ones: FLEx's "MoE + X"
baselines); trains every adapter, with μ/2·‖θ − θ_global‖² added to the loss when
``algorithm.fedit.proximal_mu`` > 0; replies with every adapter tensor and n_i.
Server: A and B averaged *separately* with p_i = n_i / Σ n, then the configured server optimizer;
the same state to everyone.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..configbase import StrictModel
from ..messages import Reply
from ..seeds import NumpyStream, numpy_rng
from .base import Client, Method, Objective, Server, State, sizes, weighted_average
from .server_opt import server_update


class FedITConfig(StrictModel):
    # FedProx: mu/2 * ||theta - theta_global||^2 over the trainable tensors, added to the local loss
    proximal_mu: float = Field(0.0, ge=0)


def random_experts_per_layer(num_layers: int, num_experts: int, n: int, seed: int) -> dict[int, list[int]]:
    """n distinct experts per MoE layer, seeded: every client (and the server) builds the same choice."""
    if n > num_experts:
        raise ValueError(f"lora.experts_per_layer = {n} but the model has {num_experts} experts per layer")
    rng = numpy_rng(seed, NumpyStream.LORA_EXPERTS)
    return {layer: sorted(int(e) for e in rng.choice(num_experts, size=n, replace=False)) for layer in range(num_layers)}


def add_adapters(cfg, mm, rank: int) -> None:
    """Expert LoRA (all experts, or lora.experts_per_layer random ones; lora.expert_layout), attention
    LoRA and, with lora.router, router LoRA, in that order (so turning the router LoRA on leaves the
    seeded initial values of the others as they were)."""
    lc = cfg.lora
    if lc.experts:
        subset = None
        if lc.experts_per_layer is not None:
            subset = random_experts_per_layer(len(mm.layers), mm.num_experts, lc.experts_per_layer, cfg.seed)
        mm.add_expert_lora(rank, lc.alpha, lc.expert_targets, lc.dropout, experts=subset, layout=lc.expert_layout)
    if lc.attention_targets is None or lc.attention_targets:
        mm.add_attention_lora(rank, lc.alpha, lc.attention_targets, lc.dropout)
    if lc.router:
        mm.add_router_lora(rank, lc.alpha)
    if not mm.trainable_names():
        raise ValueError(f"{cfg.algorithm.name} has nothing to train: set lora.experts: true, some "
                         "lora.attention_targets or lora.router: true")


def proximal_term(mu: float, reference: State, params) -> callable:
    """μ/2·Σ‖θ − θ_ref‖² over the trainables that ``reference`` holds (FedProx)."""
    ref = {n: reference[n].to(p.device) for n, p in params.items() if n in reference}
    return lambda p: 0.5 * mu * sum(((p[n] - ref[n]) ** 2).sum() for n in ref)


class FedITClient(Client):
    @classmethod
    def build(cls, cfg, mm) -> None:
        add_adapters(cfg, mm, cfg.lora.rank)

    @classmethod
    def plan_state_bytes(cls, cfg, params) -> int:
        # FedProx's reference: a copy of every trainable the message holds
        return sum(p.numel() * p.element_size() for p in params.values()) if cfg.algorithm.fedit.proximal_mu > 0 else 0

    def objective(self, client, mm, message, private) -> Objective:
        mu = self.cfg.algorithm.fedit.proximal_mu
        if mu <= 0:
            return Objective()
        # the reference is what the client starts from, the message's tensors as its method loaded them: the global
        # model for FedIT; under HetLoRA's self-pruning its pruned rank (the sent rank would pull the pruned
        # components away from zero); FC-MoE's θ + λ·r_i (θ alone would pull against the retained part)
        params = mm.trainable_parameters()
        start = {n: params[n].detach().clone() for n in message.tensors if n in params}
        return Objective(loss_terms=[proximal_term(mu, start, params)])


class FedITServer(Server):
    supports_dp = True  # a weighted sum of the clients' updates (uniform weights under federation.dp)

    @classmethod
    def secagg_refusal(cls, cfg) -> str | None:
        return None

    def secure_aggregate(self, global_state, server_state, mean, replies, *, round_idx):
        """FedAvg's n-weighted mean is θ + the n-weighted mean of the updates; then the server optimizer."""
        averaged = {n: (t.to(torch.float64) + mean[n]).to(t.dtype) for n, t in global_state.items()}
        new, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
        return new, server_state, {}

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        averaged = weighted_average([r.message.tensors for r in replies], sizes(replies))
        new, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
        return new, server_state, {}


METHOD = Method("fedit", FedITServer, FedITClient, config=FedITConfig,
                summary="FedAvg on LoRA; FedProx on the client; FedAvgM / FedAdam / FedYogi / FedAdagrad on the server")
