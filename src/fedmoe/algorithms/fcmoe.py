"""FC-MoE (Lu et al., 2026, "Conflict-Aware Federated Fine-Tuning of Large Language Models with
Mixture-of-Experts", arXiv 2606.15625): conflict-aware aggregation for LoRA-tuned MoE LLMs.

Only the abstract is public; fedmoe's reading (docs/methods.md marks every choice as ours):

* groups: every routed expert (l, j) — the rows j of its layer's expert LoRA tensors — and, as one
  more group, all non-expert tensors (attention LoRA); Δ_i = θ_i − θ_global of the group, flattened;
* importance weighting: c_i = n_i · f_i · ‖Δ_i‖ (``n_f_norm``), n_i · f_i^t (``n_f_t``) or n_i
  (``n``), f_i = a_i^{l,j} / S_i^l the expert's activation frequency in the client's local training
  (1 for the shared group); w_i = c_i / Σ c; a group with Σ c = 0 keeps its global value;
* gradient-consensus projection: d = Σ w_i Δ_i; an update with cos(Δ_i, d) below the threshold loses
  its component along d, r_i = (⟨Δ_i, d⟩ / ‖d‖²)·d; the new global is θ + Σ w_i (Δ_i − r_i). The
  space is the flattened LoRA factors (default) or, per expert, the dense update
  ΔW_i = s·(B_i A_i − B A) (the coefficient and the decision from the dense updates, removed along
  the factors' consensus); a client with weight 0 for a group is neither projected nor given a
  residual (none of its update enters the global);
* local knowledge retention: r_i is client i's: the server sends it with that client's messages until
  the client's next reply replaces it (a client keeps only the newest round's), and the client keeps it privately (replacing the previous one) and starts from
  θ_global + λ·r_i (λ = 0.5); its own model (evaluation) is θ_global + λ·r_i too. It never goes up.

Client: FedIT's adapters (every expert, full k, and attention LoRA); reply: the trained tensors,
n_i and the activation counts.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..configbase import StrictModel
from ..messages import Message, Reply
from .base import N_TRAIN, Method, State, sizes
from .fedit import FedITClient, FedITServer
from .experts import expert_groups, expert_layout, flat_group
from .flame import COUNTS, TOKENS

RESIDUAL = "residual/"  # downlink: the client's retained residual, once
RESIDUAL_ROUND = "residual_round"  # downlink scalar: the round that residual comes from


class FCMoEConfig(StrictModel):
    importance: Literal["n_f_norm", "n_f_t", "n"] = "n_f_norm"
    temperature: float = Field(1.0, ge=0)  # t of n_f_t
    projection: bool = True
    threshold: float = Field(0.0, ge=-1, le=1)  # project updates with cos(Δ_i, d) below this
    space: Literal["factors", "dense"] = "factors"
    retention: float = Field(0.5, ge=0)  # λ: the client starts from θ_global + λ·r_i (0: off)


# ------------------------------------------------------------------------------------ aggregation
def _dense(state: State, members, pairs: dict[str, tuple[str, float]]) -> torch.Tensor:
    """The group's dense update s·B·A per adapted weight, flattened (``pairs``: A name -> (B name, α/r))."""
    parts = []
    by_name = dict(members)
    for n, j in members:
        if n not in pairs or pairs[n][0] not in by_name:
            continue
        b, scaling = pairs[n]
        A = state[n] if j is None else state[n][j]
        B = state[b] if j is None else state[b][j]
        parts.append((scaling * B.to(torch.float64) @ A.to(torch.float64)).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def conflict_aware_average(global_state: State, tensors: list[State], n: list[float], freq: list[dict] | None,
                           layer_of: dict[str, int], cfg: FCMoEConfig,
                           pairs: dict[str, tuple[str, float]] | None = None):
    """(new global state, per-client residuals {name: tensor} of the groups they were projected in,
    statistics). ``freq[i]``: {MoE layer: activation frequency a/S of client i of the expert each row of the layer's
    tensors holds (E rows; fewer under ``lora.experts_per_layer``)} (None with
    ``importance: n``, which does not read it). ``pairs`` (the
    ``dense`` space): every LoRA A name -> (its B name, α/r), from the model's inventory."""
    if cfg.space == "dense" and pairs is None:
        raise ValueError("FC-MoE in the dense space needs the LoRA pairs (A -> B, alpha/r) of the inventory")
    names = list(global_state)
    num_experts = {layer: int(global_state[next(nm for nm in names if layer_of.get(nm) == layer)].shape[0])
                   for layer in set(layer_of.values())}
    g64 = {k: v.to(torch.float64) for k, v in global_state.items()}
    deltas = [{k: t[k].to(torch.float64) - g64[k] for k in names} for t in tensors]
    projected = [{k: d.clone() for k, d in delta.items()} for delta in deltas]  # Δ̃_i
    weights = {k: torch.zeros((len(tensors), *((v.shape[0],) if k in layer_of else ())), dtype=torch.float64)
               for k, v in global_state.items()}
    residual_parts: list[dict[str, torch.Tensor]] = [{} for _ in tensors]
    cos_by_layer: dict = {}
    n_projected = n_pairs = 0
    for key, members in expert_groups(names, layer_of, num_experts):
        layer = None if key is None else key[0]
        f = [1.0] * len(tensors) if key is None or freq is None else [float(fr[layer][key[1]]) for fr in freq]
        flat = [flat_group(d, members) for d in deltas]
        if cfg.importance == "n":
            c = list(n)
        elif cfg.importance == "n_f_t":
            c = [ni * fi ** cfg.temperature for ni, fi in zip(n, f)]
        else:
            c = [ni * fi * float(torch.linalg.vector_norm(v)) for ni, fi, v in zip(n, f, flat)]
        total = sum(c)
        if total <= 0:  # nobody trained it: keeps its global value (weights stay 0)
            continue
        w = [ci / total for ci in c]
        for name, j in members:
            for i, wi in enumerate(w):
                if j is None:
                    weights[name][i] = wi
                else:
                    weights[name][i, j] = wi
        if not cfg.projection:
            continue
        d = sum(wi * v for wi, v in zip(w, flat))
        if cfg.space == "factors":
            space = flat
        else:  # the dense update of each client: ΔW_i = s·(B_i A_i − B A), not s·(B_i − B)(A_i − A)
            before = _dense(g64, members, pairs)
            space = [_dense({k: t[k].to(torch.float64) for k in names}, members, pairs) - before for t in tensors]
        d_space = d if cfg.space == "factors" else sum(wi * v for wi, v in zip(w, space))
        dd = float(d_space @ d_space)
        if dd <= 0:
            continue
        for i, (wi, v) in enumerate(zip(w, space)):
            if wi <= 0:  # weighted out (it routed nothing to this expert): none of it enters, nothing to retain
                continue
            n_pairs += 1
            cos = float(v @ d_space) / max(float(torch.linalg.vector_norm(v)) * dd ** 0.5, 1e-300)
            cos_by_layer.setdefault(layer, []).append(cos)
            if cos >= cfg.threshold:
                continue
            n_projected += 1
            alpha = float(v @ d_space) / dd
            offset = 0
            for name, j in members:  # r_i = α·d along the factors, per tensor of the group
                size = (global_state[name] if j is None else global_state[name][j]).numel()
                shape = (global_state[name] if j is None else global_state[name][j]).shape
                r = alpha * d[offset : offset + size].reshape(shape)
                offset += size
                if j is None:
                    projected[i][name] = projected[i][name] - r
                    residual_parts[i][name] = r
                else:
                    projected[i][name][j] = projected[i][name][j] - r
                    full = residual_parts[i].setdefault(name, torch.zeros_like(g64[name]))
                    full[j] = r
    new: State = {}
    for name, g in g64.items():
        w = weights[name]
        total = w.sum(dim=0)
        acc = torch.zeros_like(g)
        for i in range(len(tensors)):
            wi = w[i].reshape(*w[i].shape, *([1] * (g.dim() - w[i].dim())))
            acc += (g + projected[i][name]) * wi
        keep = (total == 0).reshape(*total.shape, *([1] * (g.dim() - total.dim())))
        new[name] = torch.where(keep, g, acc).to(global_state[name].dtype)
    layers = sorted(set(layer_of.values()))
    stats = {"projected_fraction": n_projected / n_pairs if n_pairs else 0.0,
             "mean_cosine_by_layer": [sum(cos_by_layer[k]) / len(cos_by_layer[k]) if cos_by_layer.get(k) else None
                                      for k in layers]}
    if None in cos_by_layer:
        stats["mean_cosine_shared"] = sum(cos_by_layer[None]) / len(cos_by_layer[None])
    residuals = [{k: v.to(global_state[k].dtype) for k, v in parts.items()} for parts in residual_parts]
    return new, residuals, stats


# ------------------------------------------------------------------------------------ halves
class FCMoEServer(FedITServer):
    @classmethod
    def secagg_refusal(cls, cfg):
        return "projects each client's update against the consensus of all of them and sends it the removed part"

    def reply_extras(self, global_state):
        return {COUNTS: None, TOKENS: None}

    supports_server_optimizer = False
    supports_dp = False
    dp_note = ("weights each client by its update's norm relative to the others', projects each update against "
               "their mean and sends the removed part back to that client: data-dependent across clients")
    server_optimizer_note = ("steps along the projected updates itself (its retention re-anchors clients on "
                             "the exact global), so a server optimizer on top does not apply")

    @classmethod
    def local_dp_refusal(cls, cfg):
        """Local DP: the importance weights, norms and projections are computed from the noised updates
        (post-processing; r_i goes back to client i only), so FC-MoE takes it, but with reports: withhold
        the activation counts its n_f_norm and n_f_t importances read stay on the clients."""
        if cfg.federation.dp.reports == "withhold" and cfg.algorithm.fcmoe.importance != "n":
            return (f"weighs each expert by the clients' activation counts (importance: "
                    f"{cfg.algorithm.fcmoe.importance}), which local DP with federation.dp.reports: withhold keeps "
                    "on the clients; set algorithm.fcmoe.importance: n (every client alike), or "
                    "federation.dp.reports: send (the counts then reach the server unnoised)")
        return None

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        # row j of a layer's expert tensors is expert experts[layer][j] under lora.experts_per_layer
        self.layer_of, self.experts = expert_layout(spec.inventory, spec.num_experts)
        self.pairs = {t.name: (t.partner, t.scaling) for t in spec.inventory if t.factor == "A"}

    def initial_server_state(self, global_state: State) -> dict:
        return {"residuals": {}}  # client -> (round, its residual): sent with its messages until its next reply

    def downlink(self, global_state, server_state, client, *, round_idx) -> Message:
        msg = Message(tensors=dict(global_state))
        pending = server_state["residuals"].get(client) if client is not None else None
        if pending is not None:
            rnd, residual = pending
            msg.tensors.update({RESIDUAL + n: t for n, t in residual.items()})
            msg.scalars[RESIDUAL_ROUND] = rnd
        return msg

    def _rows(self, layer: int, per_expert: torch.Tensor) -> torch.Tensor:
        """A layer's per-expert values read at the experts its LoRA tensors' rows hold."""
        return per_expert if self.experts is None else per_expert[self.experts[layer]]

    def aggregate(self, global_state: State, server_state: dict, replies: list[Reply], *, round_idx: int):
        fc = self.cfg.algorithm.fcmoe
        msgs = [r.message for r in replies]
        # (importance: n reads no counts: under local DP with withheld reports the replies carry none)
        freq = None if fc.importance == "n" else [
            {layer: self._rows(layer, m.tensors[COUNTS][layer].to(torch.float64) / max(int(m.tensors[TOKENS][layer]), 1))
             for layer in set(self.layer_of.values())} for m in msgs]
        new, residuals, stats = conflict_aware_average(
            global_state, [{k: m.tensors[k] for k in global_state} for m in msgs], sizes(replies), freq,
            self.layer_of, fc, pairs=self.pairs)
        pending = dict(server_state["residuals"])
        if fc.retention > 0:
            for r, res in zip(replies, residuals):
                pending[r.client] = (round_idx, res)  # replaces the previous one (empty: nothing was removed)
        return new, {**server_state, "residuals": pending}, stats


class FCMoEClient(FedITClient):
    personalized = True  # with retention a client's model is θ_global + λ·r_i

    @classmethod
    def unread(cls, cfg) -> list[tuple[str, str]]:
        fc, default = cfg.algorithm.fcmoe, FCMoEConfig()
        out = super().unread(cfg)
        if fc.importance != "n_f_t" and fc.temperature != default.temperature:
            out.append(("algorithm.fcmoe.temperature", f"it is t of importance n_f_t, and algorithm.fcmoe.importance "
                                                       f"is {fc.importance!r}"))
        if not fc.projection:
            out += [(f"algorithm.fcmoe.{k}", "algorithm.fcmoe.projection is false (no consensus projection)")
                    for k in ("threshold", "space") if getattr(fc, k) != getattr(default, k)]
        return out

    def setup(self, client, mm, train):
        return {"residual": {}, "residual_round": 0}, {}

    def _take(self, message, private):
        """The private store after this message: a newer residual replaces the kept one."""
        rnd = message.scalars.get(RESIDUAL_ROUND)
        if rnd is not None and rnd > private.get("residual_round", 0):
            return {**private, "residual": message.prefixed(RESIDUAL), "residual_round": rnd}
        return private

    def model_state(self, client, mm, message, private) -> State:
        tensors = {n: t for n, t in message.tensors.items() if not n.startswith(RESIDUAL)}
        lam = self.cfg.algorithm.fcmoe.retention
        if client is None or lam <= 0:
            return tensors
        for n, r in self._take(message, private)["residual"].items():
            tensors[n] = (tensors[n].to(torch.float64) + lam * r.to(torch.float64)).to(tensors[n].dtype)
        return tensors

    def reply(self, client, mm, message, private, result):
        trained = mm.get_state()
        tensors = {**trained, COUNTS: result.activation_counts, TOKENS: result.tokens_per_layer}
        return Message(tensors=tensors, scalars={N_TRAIN: result.n_train}), self._take(message, private), {}


METHOD = Method(
    "fcmoe", FCMoEServer, FCMoEClient, config=FCMoEConfig, reads=("fedit",),
    summary="FC-MoE: importance-weighted, consensus-projected aggregation per expert; clients keep the removed "
            "part",
    notes={"projected_fraction": "the share of (client, expert) updates whose conflicting part was removed",
           "mean_cosine_by_layer": "per MoE layer, the mean cosine between a client's expert update and the "
                                   "consensus of that expert",
           "mean_cosine_shared": "the mean cosine of the clients' attention-LoRA updates to their consensus"},
)
