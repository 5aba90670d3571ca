"""FLAME (Le et al., 2025, "FLAME: Towards Federated Fine-Tuning Large Language Models Through
Adaptive SMoE"): resource-adaptive federated fine-tuning through the sparse MoE itself.

Client: per-expert LoRA of one rank r on every routed expert (+ attention LoRA if configured); client
i activates k_i <= k experts per token (its budget level, ``algorithm.budgets``); a rescaler s_i per
MoE layer multiplies the routed output (``learned``: trained, private; ``static``: k/k_i; ``none``:
1). Reply: the LoRA tensors, n_i and the activation counts a_i^{l,j} (tokens layer l routed to expert
j during local training) with S_i^l (tokens layer l processed). Server: expert tensors averaged with
γ_i^j = (a_i^j / S_i)^t · n_i, an expert nobody routed to keeps its global value; every other tensor
with n_i; the whole global LoRA to everyone. The global model runs at the model's k with s = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..configbase import StrictModel
from ..messages import ACTIVATION_COUNTS, TOKENS_PER_LAYER, Reply
from ..moe.inventory import Role
from .base import Method, Objective, Private, State, sizes, weighted_average
from .budgets import client_levels, default_top_k_levels
from .experts import expert_layout
from .fedit import FedITClient, FedITServer
from .server_opt import server_update

COUNTS = ACTIVATION_COUNTS  # reply: (L, E) tokens routed to each expert
TOKENS = TOKENS_PER_LAYER  # reply: (L,) tokens each MoE layer processed


class FlameConfig(StrictModel):
    temperature: float = Field(2.0, ge=0)  # activation-aware aggregation: γ = (a/S)^t · n
    rescaler: Literal["learned", "static", "none"] = "learned"  # s_i
    rescaler_init: Literal["one", "ratio"] = "one"  # learned s_i starts at 1.0 or at k/k_i
    # (our choice; the paper is silent) the learned s_i's own learning rate, without weight decay. With the
    # LoRA's lr (null) Adam moves s_i by about lr per step: at the paper's 1.5e-4 over ~376 steps at most
    # ~0.06, while the static ratio k/k_i it stands in for is up to 8. It follows train.schedule in
    # proportion (its lr is rescaler_lr x round lr / train.lr).
    rescaler_lr: float | None = Field(1e-2, gt=0)


def activation_aware_average(global_state: State, tensors: list[State], counts: list[torch.Tensor],
                             tokens: list[torch.Tensor], n: list[float], layer_of: dict[str, int],
                             temperature: float, experts: dict[int, list[int]] | None = None,
                             kept: dict[str, torch.Tensor] | None = None) -> State:
    """FLAME's aggregation of per-expert tensors (expert = dim 0 of each tensor): client i's weight for
    expert j of MoE layer l is (a_i^{l,j} / S_i^l)^t · n_i, from that layer's counts. ``experts``
    (MoE layer -> expert ids) when the tensors hold only some experts (``lora.experts_per_layer``). ``kept``, if
    given, receives per tensor the mask (experts, 1, ...) of the experts no client weighed, which keep their
    global value."""
    out: State = {}
    n64 = torch.tensor(n, dtype=torch.float64)
    for name, layer in layer_of.items():
        # (clients, experts) activation frequency a/S of this layer
        freq = torch.stack([c[layer].to(torch.float64) / max(int(s[layer]), 1) for c, s in zip(counts, tokens)])
        if experts is not None:
            freq = freq[:, experts[layer]]
        gamma = freq.pow(temperature) * n64[:, None]  # 0^0 = 1: t = 0 is FedAvg on every expert
        total = gamma.sum(dim=0)  # (experts,)
        stacked = torch.stack([t[name].to(torch.float64) for t in tensors])  # (C, E, ...)
        w = gamma / torch.where(total > 0, total, torch.ones_like(total))
        w = w.reshape(*w.shape, *([1] * (stacked.dim() - 2)))
        avg = (w * stacked).sum(dim=0)
        keep = (total == 0).reshape(-1, *([1] * (stacked.dim() - 2)))
        avg = torch.where(keep, global_state[name].to(torch.float64), avg)
        out[name] = avg.to(global_state[name].dtype)
        if kept is not None:
            kept[name] = keep
    return out


def own_expert_weights(reply, layer_of: dict[str, int], experts: dict[int, list[int]] | None,
                       temperature: float) -> dict[str, torch.Tensor]:
    """The weights of FLAME's aggregation under client-level DP, from one reply's counts alone (**ours**):
    expert j of MoE layer l weighs (f_j / max_j' f_j')^t, f = a/S of this client's counts (its most used
    expert of the layer 1, an expert it never routed to 0; t = 0: 1 everywhere, as FedAvg)."""
    counts, tokens = reply.tensors[COUNTS], reply.tensors[TOKENS]
    out = {}
    for name, layer in layer_of.items():
        f = counts[layer].to(torch.float64) / max(int(tokens[layer]), 1)
        if experts is not None:
            f = f[experts[layer]]
        top = f.max()
        out[name] = (f / top if top > 0 else torch.zeros_like(f)).pow(temperature)  # 0^0 = 1
    return out


class FlameServer(FedITServer):
    @classmethod
    def secagg_refusal(cls, cfg):
        return "weighs each expert by the clients' activation counts relative to each other's"

    def reply_extras(self, global_state):
        return {COUNTS: None, TOKENS: None}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.layer_of, self.experts = expert_layout(spec.inventory, spec.num_experts)

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        msgs = [r.message for r in replies]
        n = sizes(replies)
        shared = [name for name in global_state if name not in self.layer_of]
        averaged = dict(global_state)
        if shared:
            averaged.update(weighted_average([{s: m.tensors[s] for s in shared} for m in msgs], n))
        kept: dict[str, torch.Tensor] = {}
        averaged.update(activation_aware_average(global_state, [m.tensors for m in msgs],
                                                 [m.tensors[COUNTS] for m in msgs], [m.tensors[TOKENS] for m in msgs],
                                                 n, self.layer_of, self.cfg.algorithm.flame.temperature, self.experts,
                                                 kept))
        new, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
        # an expert no client routed to keeps its global value (SPEC): a server optimizer's momentum would move it
        for name, keep in kept.items():
            if bool(keep.any()):
                new[name] = torch.where(keep, global_state[name], new[name])
        return new, server_state, {}

    def dp_weights(self, global_state: State, reply: Reply) -> dict[str, torch.Tensor]:
        """Under client-level DP (federation.dp) the weights may depend on this reply only and stay in
        [0, 1], so γ is normalised within the client instead of across clients (**ours**): expert j of MoE
        layer l weighs (f_j / max_j' f_j')^t, f = a/S of this client's counts (its most used expert of the
        layer 1, an expert it never routed to 0; t = 0: 1 everywhere, as FedAvg); other tensors weigh 1."""
        return own_expert_weights(reply.message, self.layer_of, self.experts, self.cfg.algorithm.flame.temperature)


class FlameClient(FedITClient):
    personalized = True  # clients evaluate with their own k_i and rescaler
    private_roles = (Role.RESCALER,)  # a learned s_i stays on the client

    @classmethod
    def budget_keys(cls, cfg) -> frozenset[str]:
        # algorithm.client_top_k, when given, is each client's k: the levels are not read
        return frozenset() if cfg.algorithm.client_top_k is not None else frozenset({"top_k", "assign", "map", "probs"})

    @classmethod
    def unread(cls, cfg) -> list[tuple[str, str]]:
        fc, default = cfg.algorithm.flame, FlameConfig()
        out = super().unread(cfg)
        if fc.rescaler != "learned":
            out += [(f"algorithm.flame.{k}", f"algorithm.flame.rescaler is {fc.rescaler!r}: nothing is learned")
                    for k in ("rescaler_init", "rescaler_lr") if getattr(fc, k) != getattr(default, k)]
        return out

    @classmethod
    def build(cls, cfg, mm) -> None:
        if not cfg.lora.experts:
            raise ValueError("FLAME trains per-expert LoRA: set lora.experts: true")
        super().build(cfg, mm)
        mm.add_output_scale(init=1.0, trainable=cfg.algorithm.flame.rescaler == "learned")

    def check_model(self, mm) -> None:
        """The static rescaler k/k_i (and a learned one started there) makes up for the routed output a k_i client
        loses with fewer experts where the routing weights are the full softmax's probabilities (the paper's
        OLMoE). A router that gives its top-k weights the same sum at any k (``renormalises_top_k``) loses no scale:
        there k/k_i would multiply the client's output by up to k / min k_i, so it is refused."""
        from ..moe.arch import renormalises_top_k

        fc = self.cfg.algorithm.flame
        setting = ("algorithm.flame.rescaler: static" if fc.rescaler == "static" else
                   "algorithm.flame.rescaler_init: ratio" if fc.rescaler == "learned" and fc.rescaler_init == "ratio"
                   else None)
        if setting is None or not renormalises_top_k(mm.model.config):
            return
        lowest = min(self.top_k(c, mm) for c in range(self.cfg.data.partition.num_clients))
        if lowest < mm.default_top_k:
            raise ValueError(
                f"{setting} (s_i = k/k_i) makes up for the routed output a client loses with fewer experts where the "
                f"routing weights are the full softmax's probabilities (OLMoE's); this {mm.model_type} model's router "
                f"gives its top-k weights the same sum at any k (renormalised), so a client at k_i = {lowest} loses no "
                f"scale and k/k_i would multiply its output by {mm.default_top_k / lowest:g}: use "
                "algorithm.flame.rescaler: learned with rescaler_init: one (the default), or rescaler: none")

    def _levels_k(self, model_k: int) -> list[int]:
        levels = self.cfg.algorithm.budgets.top_k or default_top_k_levels(model_k)
        bad = [k for k in levels if not 1 <= k <= model_k]
        if bad:
            raise ValueError(f"algorithm.budgets.top_k has {bad}: this model routes to {model_k} experts per "
                             f"token, so each level must be in 1..{model_k}")
        return levels

    def top_k(self, client, mm) -> int:
        if client is None:
            return mm.default_top_k
        if self.cfg.algorithm.client_top_k is not None:
            return self.cfg.algorithm.client_top_k[client]
        levels = self._levels_k(mm.default_top_k)
        level_of = client_levels(self.cfg.algorithm.budgets, len(levels), self.cfg.data.partition.num_clients,
                                 self.cfg.seed)
        return levels[level_of[client]]

    def _ratio(self, client, mm) -> float:
        return mm.default_top_k / self.top_k(client, mm)

    # the rescaler: private (learned) or a setting (static, none) -------------------------------
    def setup(self, client, mm, train):
        fc = self.cfg.algorithm.flame
        if fc.rescaler != "learned":
            return {}, {}
        init = self._ratio(client, mm) if fc.rescaler_init == "ratio" else 1.0
        return {n: torch.tensor(init, dtype=torch.float32) for n in self.private_names(mm)}, {}

    def global_private(self, mm, names) -> State:
        return {n: torch.tensor(1.0) for n in names}  # the global model: full k, rescaler 1

    def load(self, mm, client, message, private: Private) -> None:
        super().load(mm, client, message, private)
        variant = self.cfg.algorithm.flame.rescaler
        if variant == "static":
            mm.set_output_scale(self._ratio(client, mm))
        elif variant == "none":
            mm.set_output_scale(1.0)

    def objective(self, client, mm, message, private) -> Objective:
        base = super().objective(client, mm, message, private)
        fc = self.cfg.algorithm.flame
        if fc.rescaler != "learned":
            return base
        scale = 1.0 if fc.rescaler_lr is None else fc.rescaler_lr / self.cfg.train.lr
        options = {n: {"lr_scale": scale, "weight_decay": 0.0} for n in self.private_names(mm)}
        return Objective(loss_terms=base.loss_terms, grad_correction=base.grad_correction, param_options=options)

    def reply(self, client, mm, message, private, result):
        reply, new_private, _ = super().reply(client, mm, message, private, result)
        reply.tensors[COUNTS], reply.tensors[TOKENS] = result.activation_counts, result.tokens_per_layer
        metrics = {}
        if new_private:  # the learned s_i per MoE layer (the names are in layer order), for the report
            metrics["rescaler_by_layer"] = [float(new_private[n]) for n in self.private_names(mm)]
        return reply, new_private, metrics

    def dp_weights(self, mm, reply) -> dict[str, torch.Tensor]:
        """Local DP with withheld reports: the server's DP weights (:meth:`FlameServer.dp_weights`), applied
        here, so that the counts they come from never leave the client."""
        layer_of, experts = expert_layout(mm.inventory(self.private_roles), mm.num_experts)
        return own_expert_weights(reply, layer_of, experts, self.cfg.algorithm.flame.temperature)


METHOD = Method("flame", FlameServer, FlameClient, config=FlameConfig, reads=("fedit",),
                summary="FLAME: per-client top-k_i from compute budgets, private learnable rescaler, "
                        "activation-aware aggregation",
                client_metrics=("rescaler_by_layer",),
                notes={"rescaler_by_layer": "the client's learned rescaler s_i per MoE layer after its last round "
                                            "(it starts at 1, or at k/k_i with rescaler_init: ratio)"})
