"""Rank-compression baselines of FLAME's Table 2: each budget level gives a client a LoRA rank r_i
(all k experts active).

Mechanics: adapters are built at r_max; client i uses their first r_i components (the rest are zero
in its downlink, and stay zero while it trains: both their gradients vanish). Scaling: alpha/r_i for
``trivial`` and ``flexlora`` (FlexLoRA's formula has it); HetLoRA by default applies the global
model's alpha/r_max on every client (``algorithm.hetlora.scaling``, see HetLoRAConfig).

* ``trivial``: every client uses the smallest rank of the budget list; FedIT aggregation.
* ``hetlora`` (Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
  Foundation Models"): zero-pad to r_max, weight client i by w_i = Σ_modules ‖B_i A_i‖_F
  (normalised), average the padded factors (then the configured server optimizer), send each client
  the first r_i components; optional local rank self-pruning (the pruned rank is the client's own).
* ``flexlora`` (Bai et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources"): per adapted weight W_g = Σ p_i (alpha/r_i) B_i A_i, SVD
  W_g = U Σ Vᵀ (batched over experts), client i gets B_i = U[:, :r_i] Σ[:r_i] / (alpha/r_i),
  A_i = Vᵀ[:r_i]. The global state keeps the top r_max singular triplets: the model evaluated as
  "global" is W_g truncated to rank r_max, and the server metric ``global_truncation`` says how much
  of W_g (relative Frobenius norm) that leaves out.
"""

from __future__ import annotations

import math
import time

from typing import Literal

import torch
from pydantic import Field

from ..configbase import StrictModel
from ..messages import Message, Reply
from ..moe.inventory import RANKED_ROLES, Inventory
from .base import N_TRAIN, Method, Objective, State, sizes, weighted_average
from .budgets import client_levels
from .fedit import FedITClient, FedITServer, add_adapters
from .server_opt import server_update

FACTORED = "factored"  # FlexLoRA's server state: the global adapters are its SVD factors (after round 1)


class HetLoRAConfig(StrictModel):
    """HetLoRA's optional local rank self-pruning (Cho et al. 2024, §3.2). Off when prune_lambda = 0.
    A client adds λ·Σ‖B[:, ⌊γr⌋:r] A[⌊γr⌋:r, :]‖_F (its trailing components) to its loss; when that
    tail norm is smaller after a round than after the client's previous round, the client drops the
    tail: r ← max(1, ⌊γr⌋)."""

    prune_lambda: float = Field(0.0, ge=0)
    prune_gamma: float = Field(0.9, gt=0, lt=1)
    # The LoRA scaling a rank-r_i client applies. ``shared`` (default): alpha/r_max on every client, so a
    # client's model is exactly the global model truncated to its rank — HetLoRA (Cho et al. 2024, §3)
    # writes a client's update as the truncation B[:, :r_i] A[:r_i, :] of the global factors, with no
    # rank-dependent rescaling, and its zero-padding aggregation averages factors that mean the same
    # thing on every client. ``per_rank``: alpha/r_i (PEFT's default for a rank-r_i adapter), which
    # makes a rank-6 client apply the shared leading components 20/6 = 3.3x as strongly as a rank-20
    # client (the behaviour before this option existed).
    scaling: Literal["shared", "per_rank"] = "shared"


def default_rank_levels(rank: int) -> list[int]:
    """FLAME Table 1's ladder scaled to ``rank``: 20 -> 20, 12, 8, 6."""
    return [max(1, math.ceil(rank * f - 1e-9)) for f in (1.0, 0.6, 0.4, 0.3)]


def lora_pairs(inventory: Inventory, names=None) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA pair at the client's rank (attention, expert and router LoRA: the
    adapters built at r_max), from the model's inventory; ``names``: only pairs among these."""
    keep = None if names is None else set(names)
    return sorted((t.name, t.partner) for t in inventory if t.factor == "A" and t.role in RANKED_ROLES
                  and (keep is None or (t.name in keep and t.partner in keep)))  # by name: a fixed summation order


def truncate_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first r components: A (.., R, in) rows, B (.., out, R) columns; zero the rest."""
    A, B = A.clone(), B.clone()
    A[..., r:, :] = 0
    B[..., :, r:] = 0
    return A, B


def frobenius_of_product(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = torch.float64,
                         floor: float = 0.0) -> torch.Tensor:
    """Σ over stacked weights of ‖B A‖_F, without forming B A: ‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ).
    ``dtype`` None keeps the inputs' dtype (and autograd graph); ``floor`` > 0 keeps the gradient of
    the square root finite where B A = 0."""
    if dtype is not None:
        A, B = A.to(dtype), B.to(dtype)
    sq = ((B.transpose(-2, -1) @ B) * (A @ A.transpose(-2, -1))).sum(dim=(-2, -1))
    return sq.clamp_min(floor).sqrt().sum()


class _RankBudgets:
    """The budget ladder both halves derive from the run config: LoRA rank r_i per client, r_max."""

    cfg = None

    @classmethod
    def ladder_of(cls, cfg) -> list[int]:
        """LoRA rank of each budget level."""
        return cfg.algorithm.budgets.ranks or default_rank_levels(cfg.lora.rank)

    @property
    def r_max(self) -> int:
        return max(self.ladder_of(self.cfg))

    def budget_rank(self, client: int | None) -> int:
        if client is None:
            return self.r_max
        ladder = self.ladder_of(self.cfg)
        levels = client_levels(self.cfg.algorithm.budgets, len(ladder), self.cfg.data.partition.num_clients, self.cfg.seed)
        return ladder[levels[client]]


class _TrivialLadder(_RankBudgets):
    @classmethod
    def ladder_of(cls, cfg) -> list[int]:
        levels = super().ladder_of(cfg)
        return [min(levels)] * len(levels)


class RankClient(_RankBudgets, FedITClient):
    """Adapters at r_max; the client trains the first r_i components (the rest are zero in its
    downlink, and stay zero while it trains: both their gradients vanish) with scaling alpha/r_i."""

    personalized = True  # clients evaluate with their own rank

    @classmethod
    def budget_keys(cls, cfg) -> frozenset[str]:
        return frozenset({"ranks", "assign", "map", "probs"})

    @classmethod
    def build(cls, cfg, mm) -> None:
        add_adapters(cfg, mm, max(cls.ladder_of(cfg)))

    def rank(self, client, private) -> int:
        return self.budget_rank(client)

    def load(self, mm, client, message, private) -> None:
        super().load(mm, client, message, private)
        mm.set_lora_scaling(self.cfg.lora.alpha / self.budget_rank(client))


class RankServer(_RankBudgets, FedITServer):
    @classmethod
    def secagg_refusal(cls, cfg):
        return "zero-pads, weighs or re-factorises each client's rank-r_i factors on their own before combining them"

    reply_scalars = (N_TRAIN, "rank")

    supports_dp = False
    dp_note = ("keeps the adapter components beyond each client's budget rank at zero (no client trains them), "
               "while the Gaussian noise of DP would fill every component of the aggregate")

    @classmethod
    def local_dp_refusal(cls, cfg):
        # each client's noise would fill the components beyond its rank (HetLoRA and FlexLoRA too)
        return RankServer.dp_note

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.pairs = lora_pairs(spec.inventory)

    def downlink(self, global_state, server_state, client, *, round_idx) -> Message:
        """The global adapters truncated to the client's budget rank."""
        r = self.budget_rank(client)
        if r == self.r_max:
            return Message(tensors=dict(global_state))
        out = dict(global_state)
        for a, b in self.pairs:
            out[a], out[b] = truncate_rank(global_state[a], global_state[b], r)
        return Message(tensors=out)


class TrivialClient(_TrivialLadder, RankClient):
    personalized = False

    @classmethod
    def budget_keys(cls, cfg) -> frozenset[str]:
        return frozenset({"ranks"})  # every client at the smallest: which level a client has changes nothing


class TrivialServer(_TrivialLadder, RankServer):
    """Every client at the smallest budget's rank (k = all experts), FedIT aggregation."""


def tail_start(r: int, gamma: float) -> int:
    """First trailing component HetLoRA's self-pruning regularises at rank r: ⌊γ r⌋."""
    return int(math.floor(gamma * r + 1e-9))


def tail_norm(pairs, state, r: int, gamma: float, differentiable: bool = False):
    """Σ over adapted weights of ‖B[:, ⌊γr⌋:r] A[⌊γr⌋:r, :]‖_F."""
    lo = tail_start(r, gamma)
    total = 0.0
    for a, b in pairs:
        A, B = state[a][..., lo:r, :], state[b][..., :, lo:r]
        if differentiable:  # in the trainables' dtype, with a floor: finite gradient at B = 0
            total = total + frobenius_of_product(A, B, dtype=None, floor=1e-20)
        else:
            total += float(frobenius_of_product(A, B))
    return total


def pruning_term(pairs, r: int, lam: float, gamma: float):
    """HetLoRA's self-pruning loss term at rank r: λ·Σ‖B[:, ⌊γr⌋:r] A[⌊γr⌋:r, :]‖_F (differentiable)."""
    return lambda params: lam * tail_norm(pairs, params, r, gamma, differentiable=True)


def prune(pairs, trained: State, private: dict, gamma: float) -> tuple[State, dict]:
    """After local training: the tail norm at the client's rank r; if it fell since the client's
    previous round, r ← max(1, ⌊γr⌋). Returns (the trained state truncated to the new rank, the new
    private state with the rank and the tail norm at that rank: after a prune, the tail of the new
    rank's components, so that the next round compares like with like)."""
    r = private["rank"]
    norm = tail_norm(pairs, trained, r, gamma)
    prev = private.get("tail_norm")
    if prev is not None and norm < prev and r > 1:
        r = max(1, tail_start(r, gamma))
    out = dict(trained)
    for a, b in pairs:  # a pruned client sends rank r (zeros beyond it after padding)
        out[a], out[b] = truncate_rank(trained[a], trained[b], r)
    if r != private["rank"]:  # the next round compares the new rank's tail with the new rank's tail
        norm = tail_norm(pairs, out, r, gamma)
    return out, {**private, "rank": r, "tail_norm": norm}


class HetLoRAClient(RankClient):
    """Self-pruning (``algorithm.hetlora.prune_lambda`` > 0): the client's current rank is private;
    its model truncates the received adapters to it, and its reply carries it. Scaling: alpha/r_max on
    every client by default (``algorithm.hetlora.scaling``)."""

    @classmethod
    def unread(cls, cfg) -> list[tuple[str, str]]:
        hc = cfg.algorithm.hetlora
        out = super().unread(cfg)
        if hc.prune_lambda == 0 and hc.prune_gamma != HetLoRAConfig().prune_gamma:
            out.append(("algorithm.hetlora.prune_gamma", "algorithm.hetlora.prune_lambda is 0 (no self-pruning)"))
        return out

    @staticmethod
    def pairs_of(mm, names=None) -> list[tuple[str, str]]:
        return lora_pairs(mm.inventory(), names)

    def load(self, mm, client, message, private) -> None:
        super().load(mm, client, message, private)
        if self.cfg.algorithm.hetlora.scaling == "per_rank":  # alpha/r_i at the client's current (pruned) rank
            mm.set_lora_scaling(self.cfg.lora.alpha / self.rank(client, private))
        else:
            mm.set_lora_scaling(self.cfg.lora.alpha / self.r_max)

    @property
    def pruning(self) -> bool:
        return self.cfg.algorithm.hetlora.prune_lambda > 0

    def setup(self, client, mm, train):
        return ({"rank": self.budget_rank(client)} if self.pruning else {}), {}

    def rank(self, client, private) -> int:
        return private.get("rank", self.budget_rank(client)) if private else self.budget_rank(client)

    def model_state(self, client, mm, message, private) -> State:
        r = self.rank(client, private)
        out = dict(message.tensors)
        if client is not None and r < self.budget_rank(client):
            for a, b in self.pairs_of(mm, out):
                out[a], out[b] = truncate_rank(out[a], out[b], r)
        return out

    def objective(self, client, mm, message, private) -> Objective:
        base = super().objective(client, mm, message, private)
        if not self.pruning:
            return base
        hc = self.cfg.algorithm.hetlora
        term = pruning_term(self.pairs_of(mm), private["rank"], hc.prune_lambda, hc.prune_gamma)
        return Objective(loss_terms=[*base.loss_terms, term], grad_correction=base.grad_correction)

    def reply(self, client, mm, message, private, result):
        if not self.pruning:
            return super().reply(client, mm, message, private, result)
        trained = mm.get_state()
        sent, private = prune(self.pairs_of(mm, trained), trained, private, self.cfg.algorithm.hetlora.prune_gamma)
        r = private["rank"]
        return Message(tensors=sent, scalars={N_TRAIN: result.n_train, "rank": r}), private, {"pruned_rank": r}


class HetLoRAServer(RankServer):
    dp_note = ("weights each client by the norm of its update relative to the others' (normalised over the "
               "clients), so one client moves every weight: clipping does not bound its influence")

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        msgs = [r.message for r in replies]
        norms = [sum(float(frobenius_of_product(m.tensors[a], m.tensors[b])) for a, b in self.pairs) for m in msgs]
        if self.cfg.algorithm.hetlora.scaling == "per_rank":  # the update each client applied: (alpha/r_i)·B_i A_i
            norms = [w * self.cfg.lora.alpha / int(r.message.scalars.get("rank", self.budget_rank(r.client)))
                     for w, r in zip(norms, replies)]
        if sum(norms) <= 0:  # every update is zero (e.g. B still at init): fall back to n_i
            norms = sizes(replies)
        averaged = weighted_average([m.tensors for m in msgs], norms)
        new, server_state = server_update(self.cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
        total = sum(norms)
        return new, server_state, {"norm_weights": [w / total for w in norms]}


class FlexLoRAServer(RankServer):
    supports_server_optimizer = False
    server_optimizer_note = ("re-factorises the aggregated dense update by SVD every round, so there are no "
                             "averaged factors for a server optimizer to step on")
    dp_note = ("sums the clients' dense products B_i·A_i, not their factors, and re-factorises the sum by SVD: "
               "clipping and noising the factors would not bound that sum")

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        alpha = self.cfg.lora.alpha
        n = sizes(replies)
        total = sum(n)
        new = dict(global_state)
        t0 = time.perf_counter()
        kept = dropped = 0.0
        for a, b in self.pairs:
            dense = None
            for r, w in zip(replies, n):
                r_i = self.budget_rank(r.client)
                upd = (w / total) * (alpha / r_i) * (r.message.tensors[b].to(torch.float64)
                                                      @ r.message.tensors[a].to(torch.float64))
                dense = upd if dense is None else dense + upd
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)  # batched over stacked experts
            k = min(self.r_max, S.shape[-1])
            kept += float((S[..., :k] ** 2).sum())
            dropped += float((S[..., k:] ** 2).sum())
            B = torch.zeros(global_state[b].shape, dtype=torch.float64)
            A = torch.zeros(global_state[a].shape, dtype=torch.float64)
            # stored unscaled; downlink divides by alpha/r_i
            B[..., :, :k] = U[..., :, :k] * S[..., None, :k]
            A[..., :k, :] = Vh[..., :k, :]
            new[a], new[b] = A.to(global_state[a].dtype), B.to(global_state[b].dtype)
        truncated = (dropped / (kept + dropped)) ** 0.5 if kept + dropped > 0 else 0.0
        return new, {**server_state, FACTORED: True}, {"svd_s": time.perf_counter() - t0,
                                                        "global_truncation": truncated}

    def initial_server_state(self, global_state: State) -> dict:
        return {FACTORED: False}

    def downlink(self, global_state, server_state, client, *, round_idx) -> Message:
        factored = server_state.get(FACTORED)
        if factored is None:  # a checkpoint written before the server kept this: factored once B is not all zero
            factored = any(torch.count_nonzero(global_state[b]) for _, b in self.pairs)
        if not factored:  # before the first aggregation: the common initial adapters
            return super().downlink(global_state, server_state, client, round_idx=round_idx)
        r = self.budget_rank(client)
        s = self.cfg.lora.alpha / r
        out = dict(global_state)
        for a, b in self.pairs:
            A, B = truncate_rank(global_state[a], global_state[b], r)
            out[a], out[b] = A, B / s
        return Message(tensors=out)


TRIVIAL = Method("trivial", TrivialServer, TrivialClient, reads=("fedit",),
                 summary="FLAME's rank baseline: every client at the smallest budget's rank")
HETLORA = Method("hetlora", HetLoRAServer, HetLoRAClient, config=HetLoRAConfig, reads=("fedit",),
                 summary="HetLoRA: zero-padding, update-norm-weighted averaging, truncation; optional self-pruning",
                 client_metrics=("pruned_rank",),
                 notes={"norm_weights": "each client's aggregation weight ‖B_i A_i‖_F / Σ_j ‖B_j A_j‖_F, in reply order",
                        "pruned_rank": "the client's LoRA rank after this round's self-pruning"})
FLEXLORA = Method("flexlora", FlexLoRAServer, RankClient, reads=("fedit",),
                  summary="FlexLoRA: SVD of the weighted dense update, redistributed at each client's rank",
                  notes={"svd_s": "time of the batched SVDs of the dense updates (part of the aggregation)",
                         "global_truncation": "the global model (evaluated as 'global') is W_g = Σ p_i (α/r_i) B_i A_i "
                                              "truncated to its top r_max singular components: ‖dropped‖_F / ‖W_g‖_F "
                                              "over every adapted weight (0: the global model is W_g exactly)"})
