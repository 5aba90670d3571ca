"""Rank-compression baselines of FLAME's Table 2 (SPEC.md §2): each budget gives a client a LoRA
rank r_i (all k experts active).

Mechanics: adapters are built at r_max; client i uses their first r_i components (the rest are zero
in its downlink, and stay zero while it trains: both their gradients vanish) with scaling alpha/r_i.

* ``trivial``: every client uses the smallest rank of the budget list; FedIT aggregation.
* ``hetlora`` (Cho et al. 2024): zero-pad to r_max, weight client i by w_i = Σ_modules ‖B_i A_i‖_F
  (normalised), average the padded factors, send each client the first r_i components.
* ``flexlora`` (Bai et al. 2024): per adapted weight W_g = Σ p_i (alpha/r_i) B_i A_i, SVD
  W_g = U Σ Vᵀ (batched over experts), client i gets B_i = U[:, :r_i] Σ[:r_i] / (alpha/r_i),
  A_i = Vᵀ[:r_i]. The global state keeps the top r_max singular triplets.
"""

from __future__ import annotations

import math
import re
import time

import torch

from ..moe import MoEModel
from .base import Payload, State, weighted_average
from .budgets import client_levels
from .fedit import FedIT

_PAIR = re.compile(r"^(.*?)(lora_A|lora_B)$")


RANK_KEY = "__hetlora_rank__/"  # global-state entry: a client's rank after self-pruning


def default_rank_levels(rank: int) -> list[int]:
    """FLAME Table 1's ladder scaled to ``rank``: 20 -> 20, 12, 8, 6."""
    return [max(1, math.ceil(rank * f - 1e-9)) for f in (1.0, 0.6, 0.4, 0.3)]


def lora_pairs(names) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted weight: ``x.lora_A``/``x.lora_B`` (attention) and
    ``experts.gate_up_lora_A``/``..._B`` (experts, stacked over experts)."""
    pairs = []
    names = set(names)
    for n in sorted(names):
        m = _PAIR.match(n)
        if m and m.group(2) == "lora_A" and (m.group(1) + "lora_B") in names:
            pairs.append((n, m.group(1) + "lora_B"))
    return pairs


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


class _RankBudgets(FedIT):
    """Shared budget handling: client rank r_i and scaling alpha/r_i."""

    personalized = True  # clients evaluate with their own rank

    def setup(self, mm: MoEModel) -> None:
        ac = self.cfg.algorithm
        self.rank_levels = self.rank_ladder()
        self.r_max = max(self.rank_levels)
        self.level_of = client_levels(ac.budgets, len(self.rank_levels), self.cfg.data.partition.num_clients,
                                      self.cfg.seed)
        self.add_adapters(mm, self.r_max)
        self.pairs = lora_pairs(mm.trainable_names())

    def rank_ladder(self) -> list[int]:
        """LoRA rank of each budget level."""
        return self.cfg.algorithm.budgets.ranks or default_rank_levels(self.cfg.lora.rank)

    def client_rank(self, client_id: int | None) -> int:
        return self.r_max if client_id is None else self.rank_levels[self.level_of[client_id]]

    def prepare_client(self, mm: MoEModel, client_id: int | None, private: State | None = None) -> None:
        mm.set_lora_scaling(self.cfg.lora.alpha / self.client_rank(client_id))

    def downlink(self, global_state: State, client_id: int | None) -> State:
        """The global adapters truncated to the client's current rank (server-side per-client
        entries, such as HetLoRA's pruned ranks, are not sent)."""
        tensors = {n: t for n, t in global_state.items() if not n.startswith(RANK_KEY)}
        r = self.r_max if client_id is None else self.current_rank(client_id, global_state)
        if r == self.r_max:
            return tensors
        out = dict(tensors)
        for a, b in self.pairs:
            out[a], out[b] = truncate_rank(tensors[a], tensors[b], r)
        return out


class Trivial(_RankBudgets):
    """Every client at the smallest budget's rank (k = all experts), FedIT aggregation."""

    name = "trivial"
    personalized = False

    def rank_ladder(self) -> list[int]:
        levels = super().rank_ladder()
        return [min(levels)] * len(levels)


def tail_start(r: int, gamma: float) -> int:
    """First trailing component HetLoRA's self-pruning regularises at rank r: ⌊γ r⌋."""
    return int(math.floor(gamma * r + 1e-9))


class HetLoRA(_RankBudgets):
    """HetLoRA: zero-padding, Frobenius-norm-weighted averaging, truncation; optional local rank
    self-pruning (``algorithm.hetlora.prune_lambda`` > 0)."""

    name = "hetlora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prune = cfg.algorithm.hetlora
        self._rank_after_training: dict[int, int] = {}  # set by the client, read by its payload

    # ranks ----------------------------------------------------------------------------------
    def current_rank(self, client_id: int, global_state: State) -> int:
        t = global_state.get(f"{RANK_KEY}{client_id}")
        return self.client_rank(client_id) if t is None else int(t)

    # self-pruning (client side) ---------------------------------------------------------------
    def _tail_norm(self, state, r: int, differentiable: bool = False):
        lo = tail_start(r, self.prune.prune_gamma)
        total = 0.0
        for a, b in self.pairs:
            A, B = state[a][..., lo:r, :], state[b][..., :, lo:r]
            if differentiable:  # in the trainables' dtype, with a floor: finite gradient at B = 0
                total = total + frobenius_of_product(A, B, dtype=None, floor=1e-20)
            else:
                total += float(frobenius_of_product(A, B))
        return total

    def init_private(self, client_id: int, mm: MoEModel, calibration=None) -> State:
        return {"__rank": self.client_rank(client_id)} if self.prune.prune_lambda > 0 else {}

    def local_regularizer(self, client_id: int, private: State):
        if self.prune.prune_lambda <= 0:
            return None
        r, lam = private["__rank"], self.prune.prune_lambda
        return lambda params: lam * self._tail_norm(params, r, differentiable=True)

    def private_after_training(self, client_id: int, trained: State, private: State, **context) -> State:
        if self.prune.prune_lambda <= 0:
            return private
        r = private["__rank"]
        norm = self._tail_norm(trained, r)
        prev = private.get("__tail_norm")
        if prev is not None and norm < prev and r > 1:
            r = max(1, tail_start(r, self.prune.prune_gamma))
        self._rank_after_training[client_id] = r
        return {**private, "__rank": r, "__tail_norm": norm}

    def payload(self, client_id: int, trained: State, n_train: int, activation_counts=None,
                tokens_per_layer=None) -> Payload:
        r = self._rank_after_training.pop(client_id, None)
        if r is None:
            return Payload(client_id, trained, n_train)
        out = dict(trained)
        for a, b in self.pairs:  # a pruned client sends rank r (zeros beyond it after padding)
            out[a], out[b] = truncate_rank(trained[a], trained[b], r)
        return Payload(client_id, out, n_train, extra={"rank": r})

    # server ---------------------------------------------------------------------------------
    def aggregate(self, global_state: State, payloads: list[Payload], server_state: dict):
        norms = [sum(float(frobenius_of_product(p.tensors[a], p.tensors[b])) for a, b in self.pairs)
                 for p in payloads]
        if sum(norms) <= 0:  # every update is zero (e.g. B still at init): fall back to n_i
            norms = [float(p.n_train) for p in payloads]
        new = weighted_average([p.tensors for p in payloads], norms)
        new.update({n: t for n, t in global_state.items() if n.startswith(RANK_KEY)})
        for p in payloads:
            if "rank" in p.extra:
                new[f"{RANK_KEY}{p.client_id}"] = torch.tensor(p.extra["rank"])
        return new, {**server_state, "last_weights": norms}


class FlexLoRA(_RankBudgets):
    name = "flexlora"

    def aggregate(self, global_state: State, payloads: list[Payload], server_state: dict):
        alpha = self.cfg.lora.alpha
        n = [float(p.n_train) for p in payloads]
        total = sum(n)
        new = dict(global_state)
        t0 = time.perf_counter()
        for a, b in self.pairs:
            dense = None
            for p, w in zip(payloads, n):
                r_i = self.client_rank(p.client_id)
                upd = (w / total) * (alpha / r_i) * (p.tensors[b].to(torch.float64) @ p.tensors[a].to(torch.float64))
                dense = upd if dense is None else dense + upd
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)  # batched over stacked experts
            r = min(self.r_max, S.shape[-1])
            B = torch.zeros(global_state[b].shape, dtype=torch.float64)
            A = torch.zeros(global_state[a].shape, dtype=torch.float64)
            # stored unscaled; downlink divides by alpha/r_i
            B[..., :, :r] = U[..., :, :r] * S[..., None, :r]
            A[..., :r, :] = Vh[..., :r, :]
            new[a], new[b] = A.to(global_state[a].dtype), B.to(global_state[b].dtype)
        server_state = {**server_state, "svd_seconds": time.perf_counter() - t0}
        return new, server_state

    def downlink(self, global_state: State, client_id: int | None) -> State:
        if not any(torch.count_nonzero(global_state[b]) for _, b in self.pairs):
            return super().downlink(global_state, client_id)  # round 1: the common initial adapters
        r = self.client_rank(client_id)
        s = self.cfg.lora.alpha / r
        out = dict(global_state)
        for a, b in self.pairs:
            A, B = truncate_rank(global_state[a], global_state[b], r)
            out[a], out[b] = A, B / s
        return out
