"""A method in two halves that meet only through messages.

**Server half** (:class:`Server`, one per run): the initial global state, from the model's config and
the method's adapters (a :class:`ModelSpec`, never a live model); what each client is sent
(:meth:`Server.downlink`); how the replies become the new global state (:meth:`Server.aggregate`).
Its state between rounds is the global state plus a ``server_state`` dict, both returned, both
checkpointed by the runtime. It never sees a client's private state.

**Client half** (:class:`Client`, one per client process; in-process one serves every client in turn):
what the method adds to the frozen model (:meth:`Client.build`, also run on the server's weightless
skeleton, so both halves agree on every tensor name); the client's one-shot setup before round 1
(:meth:`Client.setup`); its model, built from the message it received plus its own private store
(:meth:`Client.load`); the local objective's extra terms (:meth:`Client.objective`); and, after local
training, the reply and the new private state (:meth:`Client.reply`). It has the run config and its
own data, never the global state or another client's anything. Private state and reply are return
values: nothing is kept on the objects between calls.

Every server and client step also returns a metrics dict, which the runtime logs and the report
shows by key (``*_s`` seconds, ``*_bytes`` bytes).

A method is one file with its config section, its two halves and a :class:`Method` entry, plus one
line in :mod:`fedmoe.algorithms.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..messages import Message, Reply
from ..moe.inventory import Inventory, Role
from ..seeds import Stream, derive_seed

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..moe import MoEModel
    from ..train import LocalResult

State = dict[str, torch.Tensor]
Private = dict[str, Any]  # a client's private store: tensors and small values, never sent
N_TRAIN = "n_train"  # the scalar every reply carries: the client's number of training examples


# ------------------------------------------------------------------------------------ helpers
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


def sizes(replies: list[Reply]) -> list[float]:
    """n_i of every reply."""
    return [float(r.message.scalars[N_TRAIN]) for r in replies]


@dataclass
class ModelSpec:
    """What the server knows of the model: its config, its MoE layout, and every trainable tensor a
    client's model has, at its seeded initial value (built on a weightless skeleton)."""

    config: Any
    initial: State  # name -> CPU tensor, in the model's parameter order
    num_experts: int
    top_k: int
    decoder_to_moe: dict[int, int]  # decoder layer index -> MoE layer index
    inventory: Inventory = field(default_factory=Inventory)  # what each tensor of ``initial`` is; private marked

    @property
    def num_moe_layers(self) -> int:
        return len(self.decoder_to_moe)

    def check(self, mm: MoEModel) -> None:
        """A client's built model must have exactly these trainable tensors, at these initial values."""
        live = mm.get_state()
        if list(live) != list(self.initial) or any(
                live[n].shape != t.shape or not torch.equal(live[n], t) for n, t in self.initial.items()):
            raise RuntimeError("the client's model and the server's skeleton disagree on the trainable tensors "
                               f"({len(live)} vs {len(self.initial)}): a method's build() must depend on the config only")

    @classmethod
    def of(cls, mm: MoEModel, private_roles=()) -> ModelSpec:
        """The spec of a model whose adapters are built (a skeleton, or a live model in tests);
        ``private_roles``: the roles of the tensors the method keeps on the client."""
        return cls(config=mm.config, initial=mm.get_state(), num_experts=mm.num_experts, top_k=mm.default_top_k,
                   decoder_to_moe={layer.decoder_layer: layer.index for layer in mm.layers},
                   inventory=mm.inventory(private_roles))

    def shared(self) -> list[str]:
        """The tensors the server holds: every trainable the method does not keep private."""
        inv = self.inventory
        return [n for n in self.initial if n not in inv or not inv[n].private]

    def counts(self, k: int, rank: int | None = None, seq_len: int = 128) -> dict[str, int]:
        """What a client at top-``k`` and LoRA ``rank`` runs, counted from the tensors that were built:
        the model's FLOPs per sequence of ``seq_len`` tokens (the base model's at k plus the adapters'),
        its active parameters, and its trainable parameters (total, active per token, shared)."""
        from ..eval.flops import count_flops

        base = count_flops(self.config, seq_len, k=k, lora_rank=0)
        inv = self.inventory.counts(k, rank)
        return {"flops_per_seq": base["flops_per_seq"] + self.inventory.adapter_flops(seq_len, k, rank),
                "active_params": base["active_params"] + inv["frozen_active_params"],
                "total_trainable": inv["total_trainable"], "active_trainable": inv["active_trainable"],
                "shared_trainable": inv["shared_trainable"]}


def client_profiles(cfg: RunConfig, method: Method, model_top_k: int) -> dict[tuple[int, int], list[int]]:
    """(k_i, r_i) -> the clients of ``cfg`` that run at it, as the run's client half gives them (their profile at
    setup; a rank that changes in the run, HetLoRA's self-pruning, at its start), for a model that routes each token
    to ``model_top_k`` experts (nothing else of a model is read: no model is built)."""
    half = method.client(cfg)

    class _Routing:  # what Client.top_k reads of a model
        default_top_k = model_top_k

    out: dict[tuple[int, int], list[int]] = {}
    for cid in range(cfg.data.partition.num_clients):
        out.setdefault((int(half.top_k(cid, _Routing)), half.rank(cid, {})), []).append(cid)
    return out


def method_flops(cfg: RunConfig, method: Method, ks: list[int] | None = None, seq_len: int | None = None) -> list[dict]:
    """The FLOPs and parameter columns of ``cfg``'s ``method`` (FLAME Table 1 layout, one row per k; default
    k: the model's, halved down to 1, and every k and LoRA rank one of the run's clients runs at, each row naming
    its ``clients``), counted from the adapters the method builds on the model's skeleton — the figures the run's
    summary reports (``fedmoe flops RUN.yaml``). A row has the ``rank`` it counts the LoRA pairs at (the one built,
    unless a client trains fewer components). ``flops_by_part["lora"]`` holds everything the adapters add (a grafted
    expert's FFN included)."""
    from ..eval.flops import count_flops, default_k_list

    spec = model_spec(cfg, method)
    seq = cfg.eval.flops_seq_len if seq_len is None else int(seq_len)
    built = method.client(cfg).rank(None, {})  # the global model's rank: the adapters as built
    levels = client_profiles(cfg, method, spec.top_k)
    wanted = {(k, built) for k in (ks or default_k_list(spec.config))}
    if not ks:
        wanted |= set(levels)
    rows = []
    for k, rank in sorted(wanted, key=lambda kr: (-kr[0], -kr[1])):
        base = count_flops(spec.config, seq, k=k, lora_rank=0)
        counts = spec.counts(k, None if rank == built else rank, seq)
        adapters = counts["flops_per_seq"] - base["flops_per_seq"]
        rows.append({**base, "flops_per_seq": counts["flops_per_seq"], "flops_by_part": {**base["flops_by_part"],
                     "lora": adapters}, "active_params": counts["active_params"],
                     "active_trainable": counts["active_trainable"], "total_trainable": counts["total_trainable"],
                     "rank": rank, "clients": levels.get((k, rank), [])})
    return rows


def model_spec(cfg: RunConfig, method: Method) -> ModelSpec:
    """Build the method's adapters on a weightless skeleton of ``cfg.model`` with the run's adapter
    seed: the same names, shapes and initial values every client's model gets."""
    from ..moe import MoEModel

    sk = MoEModel.skeleton(cfg.model.name, dtype=cfg.model.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Stream.ADAPTER_INIT))
        method.client.build(cfg, sk)
    return ModelSpec.of(sk, method.client.private_roles)


@dataclass
class Objective:
    """What a method adds to the plain local loss: terms added to every micro-batch's loss (each a
    function of the trainable parameters, name -> tensor), a tensor per trainable added to its
    gradient before the optimizer step, optimizer settings of some trainables (name ->
    ``{"lr_scale": x, "weight_decay": y}``), and whether the trainer should return the mean of the
    raw local gradients (:attr:`~fedmoe.train.LocalResult.mean_gradient`)."""

    loss_terms: list[Callable[[dict[str, torch.Tensor]], torch.Tensor]] = field(default_factory=list)
    grad_correction: State | None = None
    param_options: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_gradient: bool = False


# ------------------------------------------------------------------------------------ halves
class Server:
    """Server half: the global state (every shared trainable, by default), what each client is sent
    (by default the global state) and the aggregation, which each method defines."""

    supports_server_optimizer = True
    server_optimizer_note = ""  # why not, when it does not (shown in the config error)
    # client-level DP (federation.dp) applies: the aggregation is θ + Σ_i w_i·(θ_i − θ) over the
    # global tensors, each w_i in [0, 1] computed from reply i alone (dp_weights), then the server
    # optimizer. The runtime then clips, sums with a fixed denominator and adds noise (federation.dp).
    supports_dp = False
    # the scalars a client's train reply carries (any other makes the reply invalid)
    reply_scalars: tuple[str, ...] = (N_TRAIN,)
    dp_note = "does not declare its aggregation a weighted sum of client updates (Server.supports_dp)"
    # why federation.robust does not apply, where neither secagg_refusal nor dp_note says it
    robust_note: str | None = None
    # False: the global model is the initial one (local_only): nothing to export or ask without a client
    trains_global_model = True

    def __init__(self, cfg: RunConfig, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec

    @classmethod
    def local_dp_refusal(cls, cfg) -> str | None:
        """Why local DP (``federation.dp.where: client``) cannot apply to this method under ``cfg``, or None.
        There each client clips and noises its own update and the aggregation is post-processing: a method
        qualifies when its reply holds nothing else its data decides (or the run sends that knowingly,
        ``reports: send``) and noise in every component does it no harm. By default: the methods that take
        central DP (``supports_dp``), whose estimator the runtime then uses (``dp.uniform_aggregate``)."""
        return None if cls.supports_dp else cls.dp_note

    def initial_global(self) -> State:
        """The global state before round 1 (default: every trainable tensor of the spec the method does
        not keep private, :attr:`Client.private_roles`)."""
        shared = set(self.spec.shared())
        return {n: t.clone() for n, t in self.spec.initial.items() if n in shared}

    def initial_server_state(self, global_state: State) -> dict:
        return {}

    def downlink(self, global_state: State, server_state: dict, client: int | None, *, round_idx: int) -> Message:
        """What ``client`` receives (None: the global model, for evaluating it) in round ``round_idx`` (the
        round the message belongs to: its training, or the evaluation after it; 0: before round 1)."""
        return Message(tensors=dict(global_state))

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *,
                  round_idx: int) -> tuple[State, dict, dict]:
        """(new global state, new server state, metrics) from the replies of round ``round_idx`` (1-based).
        Methods define it (FedIT's FedAvg is the usual base, :class:`fedmoe.algorithms.fedit.FedITServer`)."""
        raise NotImplementedError

    # under federation.secagg, each client's weight in the mean: its n_i ("n") or 1 ("uniform")
    @classmethod
    def secagg_weights(cls, cfg) -> str:
        return "n"

    @classmethod
    def secagg_refusal(cls, cfg) -> str | None:
        """Why this method cannot aggregate from the weighted mean of the clients' updates alone
        (``federation.secagg``), or None: then :meth:`secure_aggregate` does it."""
        return "needs each client's update to aggregate (Server.secagg_refusal)"

    def secure_aggregate(self, global_state: State, server_state: dict, mean: State, replies: int, *,
                         round_idx: int) -> tuple[State, dict, dict]:
        """(new global state, server state, metrics) from ``mean``: the n_i-weighted mean of the ``replies``
        clients' updates (each global tensor θ_i − θ; each extra of :meth:`reply_extras` as sent), which is
        all the server learns under ``federation.secagg``."""
        raise NotImplementedError

    def reply_extras(self, global_state: State) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
        """The tensors a client's train reply must carry besides the global ones: name -> (shape, dtype),
        or None where the runtime checks it by its own rule (the activation counts). Any tensor that is
        neither global, nor sent, nor named here makes the reply invalid."""
        return {}

    def dp_weights(self, global_state: State, reply: Reply) -> dict[str, torch.Tensor]:
        """Under client-level DP (``supports_dp``): this reply's weight per global tensor, in [0, 1], from
        the reply alone (a tensor is broadcast along dim 0, e.g. one weight per expert); a tensor not
        named weighs 1. The default, uniform weights, is DP-FedAvg's."""
        return {}


class Client:
    """Client half; FedIT's client (train every trainable, send it all with n_i) is the default.

    Its hooks, in the order a run calls them: :meth:`check_config` (the config alone, when it is
    validated), :meth:`build` (the adapters, on every client's model and the server's skeleton),
    :meth:`setup` (once per client), then per message :meth:`load` (the client's model in place),
    :meth:`objective` and :meth:`reply`; :meth:`top_k`, :meth:`rank` and :meth:`profile` say what a
    client runs."""

    personalized = False  # True when a client's evaluated model differs from the global one
    # the roles of the trainable tensors (fedmoe.moe.Role) the client keeps in its private store and never
    # sends: the server's spec marks them (ModelSpec.inventory), its global state leaves them out
    private_roles: tuple[Role, ...] = ()

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: RunConfig, mm: MoEModel) -> None:
        """Add the method's trainable structure to the frozen model (the same on every client)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Refuse settings this method cannot honour (a ValueError naming the key and the fix); run when
        the config is validated, before any model is built."""

    @classmethod
    def plan_state_bytes(cls, cfg: RunConfig, params: dict[str, torch.Tensor]) -> int:
        """The bytes its objective (:meth:`objective`) holds through a client's local training beside the
        trainables ``params``: a FedProx reference, SCAFFOLD's correction and gradient sum (``fedmoe plan``)."""
        return 0

    @classmethod
    def budget_keys(cls, cfg: RunConfig) -> frozenset[str]:
        """The ``algorithm.budgets`` keys this method reads under ``cfg`` (none by default)."""
        return frozenset()

    @classmethod
    def unread(cls, cfg: RunConfig) -> list[tuple[str, str]]:
        """The settings set away from their defaults that this method would not read under ``cfg``, each with why
        (key, why): keys of its own section under its other options, budget keys (:meth:`budget_keys`), expert-LoRA
        options it does not use. A new single run refuses them (:func:`fedmoe.config.unread_settings`)."""
        from .budgets import unread_budgets

        return unread_budgets(cfg, cls.budget_keys(cfg)) + cls.unread_lora(cfg)

    @classmethod
    def unread_lora(cls, cfg: RunConfig) -> list[tuple[str, str]]:
        """The ``lora`` keys of :meth:`unread`: by default the expert-LoRA options when ``lora.experts`` is false."""
        lc, default = cfg.lora, type(cfg.lora)()
        if lc.experts:
            return []
        return [(f"lora.{k}", "lora.experts is false (no LoRA on the routed experts)")
                for k in ("expert_targets", "expert_layout", "experts_per_layer") if getattr(lc, k) != getattr(default, k)]

    def check_model(self, mm: MoEModel) -> None:
        """Refuse settings this model cannot honour (a ValueError naming the key and the fix); run when a
        client's model is loaded, before anything runs (:func:`check_top_k`)."""

    # settings of this client --------------------------------------------------------------------
    def top_k(self, client: int | None, mm: MoEModel) -> int:
        """k of this client (None: the global model, at the model's k)."""
        ks = self.cfg.algorithm.client_top_k
        return mm.default_top_k if ks is None or client is None else ks[client]

    def rank(self, client: int | None, private: Private) -> int:
        """The LoRA rank this client trains."""
        return self.cfg.lora.rank

    def profile(self, client: int, mm: MoEModel, private: Private) -> dict:
        """What this client runs, for FLOPs and the summary: its k and LoRA rank."""
        return {"k": self.top_k(client, mm), "rank": self.rank(client, private)}

    # the client's model ----------------------------------------------------------------------
    def setup(self, client: int, mm: MoEModel, train: list[dict]) -> tuple[Private, dict]:
        """One-shot setup before round 1, on the freshly built model (initial adapters) and the
        client's tokenised training examples: (private state, metrics)."""
        return {}, {}

    def private_names(self, mm: MoEModel) -> list[str]:
        """The trainable tensors of ``mm`` this method keeps private (:attr:`private_roles`)."""
        return mm.inventory(self.private_roles).private() if self.private_roles else []

    def global_private(self, mm: MoEModel, names: list[str]) -> State:
        """The values of the private tensors in the global model (which has no private store): zeros."""
        params = mm.trainable_parameters()
        return {n: torch.zeros_like(params[n], device="cpu") for n in names}

    def model_state(self, client: int | None, mm: MoEModel, message: Message, private: Private) -> State:
        """The trainable tensors of the client's model: the message's, and the private ones from the
        client's store (the global model, ``client`` None, or a store without them: :meth:`global_private`)."""
        names = self.private_names(mm)
        if not names:
            return dict(message.tensors)
        mine = {} if client is None else {n: private[n] for n in names if n in private}
        missing = [n for n in names if n not in mine]
        return {**message.tensors, **(self.global_private(mm, missing) if missing else {}), **mine}

    def load(self, mm: MoEModel, client: int | None, message: Message, private: Private) -> None:
        """Put this client's model in place (``client`` None: the global model from its message): its
        trainable tensors (:meth:`model_state`) and its k. A method with settings that are not trainable
        state (a static output scale, a LoRA scaling, which grafts are on) sets them after this."""
        mm.load_state(self.model_state(client, mm, message, private))
        mm.set_top_k(self.top_k(client, mm))

    # local training ----------------------------------------------------------------------------
    def objective(self, client: int, mm: MoEModel, message: Message, private: Private) -> Objective:
        return Objective()

    def reply(self, client: int, mm: MoEModel, message: Message, private: Private,
              result: LocalResult) -> tuple[Message, Private, dict]:
        """(reply message, new private state, metrics) after local training: the shared tensors and n_i
        are sent; the private tensors go back into the store (its other entries are kept)."""
        trained = mm.get_state()
        names = set(self.private_names(mm))
        shared = {n: t for n, t in trained.items() if n not in names}
        new_private = {**private, **{n: trained[n].clone() for n in trained if n in names}} if names else private
        return Message(tensors=shared, scalars={N_TRAIN: result.n_train}), new_private, {}

    def dp_weights(self, mm: MoEModel, reply: Message) -> dict[str, torch.Tensor]:
        """Under local DP with withheld reports (``federation.dp.reports: withhold``): the weights of
        :meth:`Server.dp_weights`, computed on the client from its own ``reply`` and applied to its clipped
        update before the noise, so that what they come from stays here. Uniform (none) by default."""
        return {}


def check_top_k(half: Client, mm: MoEModel, num_clients: int) -> None:
    """Every client's k within the model's before anything runs (a TopKError naming the client), and the
    method's settings this model can honour (:meth:`Client.check_model`)."""
    from ..moe import TopKError

    half.check_model(mm)
    for cid in range(num_clients):
        k = half.top_k(cid, mm)
        if not 1 <= k <= mm.default_top_k:
            raise TopKError(f"client {cid} would activate k = {k} experts (algorithm.client_top_k / budgets), "
                            f"but {half.cfg.model.name} routes each token to {mm.default_top_k}: use "
                            f"1..{mm.default_top_k}")


@dataclass(frozen=True)
class Method:
    """A registry entry: the method's name, its halves and its config section ``algorithm.<name>``."""

    name: str
    server: type[Server]
    client: type[Client]
    config: type | None = None
    reads: tuple[str, ...] = ()  # other methods' sections its halves honour (e.g. FedIT's FedProx)
    summary: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # what its metric keys mean (shown in the report)
    # the metric names its client half reports (Client.reply): its namespace; a reply with another is invalid
    client_metrics: tuple[str, ...] = ()

    @property
    def sections(self) -> tuple[str, ...]:
        return ((self.name,) if self.config is not None else ()) + self.reads


__all__ = ["Client", "Message", "Method", "ModelSpec", "N_TRAIN", "Objective", "Private", "Reply", "Server", "State",
           "method_flops", "model_spec", "sizes", "weighted_average"]
