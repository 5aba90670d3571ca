"""The typed inventory of a model's trainable tensors: what each one *is*, recorded by the module that
created it, so nothing downstream has to guess it from a name or from config flags.

Every adapter module of :mod:`fedmoe.moe.lora` (and any module a method attaches, e.g. FLEx's grafted
experts) describes its own parameters with :meth:`describe`: a :class:`TensorInfo` per parameter,
named relative to the module. :meth:`fedmoe.moe.MoEModel.inventory` walks the model and gives the
full names, the decoder and MoE layer, and whether the tensor is trainable. A trainable tensor no
module describes is recorded as :attr:`Role.OTHER` (counted, never mistaken for an adapter).

A method marks which tensors are **private** (kept on the client, never sent): by role
(:attr:`fedmoe.algorithms.base.Client.private_roles`), on the server's spec and on every client's
model alike. Counting (trainable parameters, active per token, adapter FLOPs) is done here, from the
tensors that were built, for a client's k and LoRA rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


class Role(str, Enum):
    ATTENTION = "attention_lora"  # a LoRA factor on an attention projection
    EXPERT = "expert_lora"  # a LoRA factor of routed experts, stacked over experts on dim 0
    ROUTER = "router_lora"  # a LoRA factor of a router weight (E, H)
    RESCALER = "rescaler"  # a scale of the routed experts' output (FLAME)
    GRAFT = "graft"  # a trainable of a grafted expert (FLEx): LoRA factors or full weights, stacked over grafts
    GATE = "gate"  # a grafted expert's gate (FLEx)
    OTHER = "other"  # a trainable no module describes


LORA_ROLES = frozenset({Role.ATTENTION, Role.EXPERT, Role.ROUTER, Role.GRAFT})
RANKED_ROLES = frozenset({Role.ATTENTION, Role.EXPERT, Role.ROUTER})  # at the client's LoRA rank (lora.rank, r_i)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the inventory.

    ``rows``: for a tensor stacked on dim 0 over experts (``EXPERT``: the routed expert id of each row;
    ``GRAFT``/``GATE``: one row per grafted expert, ids unknown until the client's setup, so None) —
    ``stacked`` says whether dim 0 is such a stack. ``factor`` "A" (rank on dim -2: (…, r, in)) or "B"
    (rank on dim -1: (…, out, r)) with its ``partner``; ``rank`` and ``scaling`` (α/r) of the pair.
    ``frozen_flops_per_token``: forward FLOPs of frozen weights this tensor's module adds per token
    (a grafted expert's pretrained FFN), counted once per module, on its first tensor."""

    name: str
    shape: tuple[int, ...]
    role: Role
    decoder_layer: int | None = None
    moe_layer: int | None = None
    stacked: bool = False
    rows: tuple[int, ...] | None = None
    factor: str | None = None
    partner: str | None = None
    rank: int | None = None
    scaling: float | None = None
    private: bool = False
    frozen_flops_per_token: int = 0
    frozen_params: int = 0  # frozen parameters its module adds to each token's path (a graft's expert)
    bias: bool = False  # a bias (gpt-oss's grafted gate and full-copy expert biases): added, no FLOPs counted
    of_experts: int | None = None  # a routed-expert stack: the experts its layer routes among (E)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def numel_at_rank(self, rank: int | None) -> int:
        """Elements trained at the client's LoRA rank ``rank``: a rank-heterogeneous client trains the
        first r_i components of the r_max-sized shared adapters (attention, expert, router LoRA); a
        grafted expert's LoRA has its own rank (``algorithm.flex.graft_rank``) and anything else is
        trained whole."""
        if rank is None or self.role not in RANKED_ROLES or self.rank is None or rank >= self.rank:
            return self.numel
        return self.numel // self.rank * int(rank)

    def rows_active(self, k: int) -> float:
        """Rows of dim 0 one token uses: k of a routed-expert stack that holds every expert; of one that holds n of
        the layer's E experts (``lora.experts_per_layer``), the n·k/E a token meets on average (its k are spread
        over the E, and only those among the n rows run their LoRA); every row of a graft."""
        if not self.stacked:
            return 1
        n = self.shape[0]
        if self.role is not Role.EXPERT:
            return n
        E = self.of_experts or n
        return min(int(k), n) if n >= E else n * min(int(k), E) / E


@dataclass
class Inventory:
    """The trainable tensors of a model with adapters, in parameter order (name -> :class:`TensorInfo`)."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.tensors.values())

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self, role: Role | None = None, private: bool | None = None) -> list[str]:
        return [t.name for t in self if (role is None or t.role is role) and (private is None or t.private is private)]

    def shared(self) -> list[str]:
        return self.names(private=False)

    def private(self) -> list[str]:
        return self.names(private=True)

    def mark_private(self, roles) -> Inventory:
        """A copy with every tensor of these roles private (the method's choice)."""
        roles = frozenset(roles)
        return Inventory({n: replace(t, private=t.role in roles) for n, t in self.tensors.items()})

    def expert_layers(self) -> dict[str, int]:
        """The MoE layer of every routed-expert LoRA tensor."""
        return {t.name: t.moe_layer for t in self if t.role is Role.EXPERT}

    def expert_rows(self) -> dict[int, tuple[int, ...]]:
        """MoE layer -> the routed expert id of each row of its expert LoRA tensors."""
        return {t.moe_layer: t.rows for t in self if t.role is Role.EXPERT}

    # ------------------------------------------------------------------ counting
    def counts(self, k: int, rank: int | None = None) -> dict[str, int]:
        """What a client at top-``k`` and LoRA ``rank`` trains: ``total_trainable`` (every element it
        updates), ``active_trainable`` (those one token passes through: k rows of a routed-expert
        stack, every row of anything else), ``shared_trainable`` (of the total, what it sends) and
        ``frozen_active_params`` (frozen weights a token passes through that the base model lacks: a
        grafted expert)."""
        total = active = shared = frozen = 0
        for t in self:
            n = t.numel_at_rank(rank)
            frozen += t.frozen_params
            total += n
            shared += 0 if t.private else n
            active += round(n // t.shape[0] * t.rows_active(k)) if t.stacked else n
        return {"total_trainable": total, "active_trainable": active, "shared_trainable": shared,
                "frozen_active_params": frozen}

    def adapter_flops(self, seq_len: int, k: int, rank: int | None = None) -> int:
        """Forward FLOPs (2 × MACs) the adapters add to one sequence of ``seq_len`` tokens: a LoRA
        factor (or a grafted expert's full weight, or a gate) costs 2 × its active elements per token (a
        bias nothing: element-wise);
        a router LoRA is merged into the router weight once per forward (2·E·r·H); a rescaler is
        element-wise (0); a grafted expert also runs its frozen FFN on every token."""
        T = int(seq_len)
        flops = 0
        for t in self:
            flops += T * t.frozen_flops_per_token
            if t.role is Role.RESCALER or t.role is Role.OTHER or t.bias:
                continue
            n = t.numel_at_rank(rank)
            if t.role is Role.ROUTER:
                if t.factor == "B":  # B (E, r) @ A (r, H): once per sequence
                    partner = self.tensors[t.partner]
                    flops += 2 * n * partner.shape[-1]
                continue
            per_token = round(n // t.shape[0] * t.rows_active(k)) if t.stacked else n
            flops += 2 * T * per_token
        return flops


__all__ = ["LORA_ROLES", "RANKED_ROLES", "Inventory", "Role", "TensorInfo"]
