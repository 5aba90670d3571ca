"""The algorithm interface: the four decisions of SPEC.md as plain functions over named tensors.

1. ``setup``      — what is added to the frozen model and what is trainable (same on every client);
                    ``init_private`` gives a client's private state (never sent).
2. ``payload``    — what a client sends up after local training.
3. ``aggregate``  — how the server turns payloads into the new global state.
4. ``downlink``   — what each client receives.

Algorithms do no I/O and run no training loops; the runtime calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import RunConfig
from ..moe import MoEModel

State = dict[str, torch.Tensor]


@dataclass
class Payload:
    client_id: int
    tensors: State
    n_train: int
    activation_counts: torch.Tensor | None = None  # (L, E) tokens routed to each expert this round
    tokens_per_layer: torch.Tensor | None = None  # (L,)
    extra: dict = field(default_factory=dict)


def model_tensors(state: State) -> State:
    """The entries of a state that are model tensors (not "__"-prefixed private settings)."""
    return {n: t for n, t in state.items() if not n.startswith("__")}


def weighted_average(states: list[State], weights: list[float]) -> State:
    """Σ w_i · state_i per tensor, with w normalised to sum 1 (computed in float64, cast back)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must have a positive sum, got {weights}")
    out: State = {}
    for name in states[0]:
        acc = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[name].to(torch.float64) * (w / total)
        out[name] = acc.to(states[0][name].dtype)
    return out


class Algorithm:
    """Base class; FedIT's choices are the defaults."""

    name = "base"
    personalized = False  # True when a client's evaluated model differs from the global one

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.setup_stats: dict[int, dict] = {}  # per client: what its one-shot setup cost (FLEx grafting)

    # 1. client setup ---------------------------------------------------------------------
    def setup(self, mm: MoEModel) -> None:
        raise NotImplementedError

    def init_private(self, client_id: int, mm: MoEModel, calibration: list[dict] | None = None) -> State:
        """A client's private state before round 1 (``calibration``: its tokenised training examples,
        for one-shot setup such as FLEx's grafting). Keys starting with "__" are private settings
        that are not model tensors (the runtime keeps and checkpoints them; ``prepare_client`` applies them)."""
        return {}

    def client_top_k(self, client_id: int | None) -> int | None:
        """k_i of a client (None = the model's k); ``None`` as client means the global model."""
        ks = self.cfg.algorithm.client_top_k
        return None if ks is None or client_id is None else ks[client_id]

    def client_rank(self, client_id: int | None) -> int:
        """LoRA rank client ``client_id`` trains (rank-heterogeneous baselines override)."""
        return self.cfg.lora.rank

    def prepare_client(self, mm: MoEModel, client_id: int | None, private: State | None = None) -> None:
        """Set what is not trainable state before a client trains or is evaluated (default: nothing)."""

    # 2. payload --------------------------------------------------------------------------
    def payload(self, client_id: int, trained: State, n_train: int, activation_counts=None,
                tokens_per_layer=None) -> Payload:
        """Default: every trained tensor and n_i. Activation counts are not sent unless the method
        aggregates with them (FLAME, FC-MoE override this and pay for them in the uplink)."""
        return Payload(client_id, trained, n_train)

    def private_after_training(self, client_id: int, trained: State, private: State, **context) -> State:
        """The part of the trained state the client keeps (default: nothing). ``context`` has the
        round's ``downlink``, local ``steps`` and ``lr`` (SCAFFOLD's control-variate update uses them)."""
        return private

    def local_regularizer(self, client_id: int, private: State):
        """A function of the trainable parameters (name -> tensor) whose value is added to the local
        loss (HetLoRA's rank self-pruning term), or None."""
        return None

    def current_rank(self, client_id: int, global_state: State) -> int:
        """The rank the client trains now (HetLoRA's self-pruning lowers it over rounds)."""
        return self.client_rank(client_id)

    def grad_correction(self, client_id: int, private: State, downlink: State) -> State | None:
        """A tensor per trainable to add to its gradient during local training (SCAFFOLD: c − c_i)."""
        return None

    # 3. aggregation ----------------------------------------------------------------------
    def init_server_state(self, global_state: State) -> dict:
        return {}

    def aggregate(self, global_state: State, payloads: list[Payload], server_state: dict) -> tuple[State, dict]:
        raise NotImplementedError

    # 4. downlink -------------------------------------------------------------------------
    def downlink(self, global_state: State, client_id: int) -> State:
        return global_state

    def client_model_state(self, global_state: State, private: State, client_id: int | None) -> State:
        """What the client's model holds when it trains or evaluates: downlink + private state
        (``client_id`` None: the global model, evaluated on the global test set)."""
        return model_tensors({**self.downlink(global_state, client_id), **private})
