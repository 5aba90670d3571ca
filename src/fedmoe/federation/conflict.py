"""Do the clients' updates pull the same tensors in opposite directions? (``eval.update_conflict``)

A diagnostic of the data, not part of any method: every round, before aggregation, for every routed
expert (l, j) — the rows j of its layer's expert LoRA tensors — and for the shared (non-expert)
tensors as one more group, the clients' updates Δ_i = θ_i − θ_global of that group are compared pair
by pair. A pair *conflicts* when cos(Δ_i, Δ_k) < 0. Clients that did not change a group (an expert
they never routed a token to) are left out of its pairs.

This is the premise of FC-MoE ("same-indexed experts optimise under inconsistent or even
conflicting feature-label correlations"): a fraction near 0 says the clients agree, so a conflict-
aware aggregation has nothing to resolve. FC-MoE's own projection fires on a different test, the
cosine of an update to the weighted consensus of all updates, which is negative only for an update
that opposes the others' mean; the two are reported side by side in benchmarks/EVIDENCE.md.
"""

from __future__ import annotations

import torch

from ..algorithms.experts import expert_groups, flat_group


def update_conflict(global_state: dict[str, torch.Tensor], tensors: list[dict[str, torch.Tensor]],
                    layer_of: dict[str, int]) -> dict:
    """Server metrics: ``update_conflict_experts`` (the fraction of conflicting client pairs over all
    expert groups), ``update_conflict_by_layer`` (per MoE layer), ``update_cosine_experts`` (the mean
    pairwise cosine), and ``update_conflict_shared`` / ``update_cosine_shared`` for the non-expert
    tensors. Only the tensors every reply carries and the global state holds are compared."""
    names = [n for n in global_state if all(n in t for t in tensors)]
    if len(tensors) < 2 or not names:
        return {}
    layer_of = {n: layer_of[n] for n in names if n in layer_of}
    num_experts = {layer: int(global_state[next(n for n in names if layer_of.get(n) == layer)].shape[0])
                   for layer in set(layer_of.values())}
    g = {n: global_state[n].to(torch.float64) for n in names}
    deltas = [{n: t[n].to(torch.float64) - g[n] for n in names} for t in tensors]
    by_layer: dict = {}
    for key, members in expert_groups(names, layer_of, num_experts):
        flat = [v for v in (flat_group(d, members) for d in deltas) if bool(v.any())]
        if len(flat) < 2:
            continue
        m = torch.stack(flat)
        m = m / torch.linalg.vector_norm(m, dim=1, keepdim=True)
        cos = m @ m.T
        i, k = torch.triu_indices(len(flat), len(flat), offset=1)
        pairs = cos[i, k]
        layer = None if key is None else key[0]
        neg, total, cs = by_layer.get(layer, (0, 0, 0.0))
        by_layer[layer] = (neg + int((pairs < 0).sum()), total + pairs.numel(), cs + float(pairs.sum()))
    out: dict = {}
    expert_layers = sorted(k for k in by_layer if k is not None)
    if expert_layers:
        neg = sum(by_layer[k][0] for k in expert_layers)
        total = sum(by_layer[k][1] for k in expert_layers)
        out["update_conflict_experts"] = neg / total
        out["update_cosine_experts"] = sum(by_layer[k][2] for k in expert_layers) / total
        out["update_conflict_by_layer"] = [by_layer[k][0] / by_layer[k][1] if k in by_layer else None
                                           for k in range(max(expert_layers) + 1)]
    if None in by_layer:
        neg, total, cs = by_layer[None]
        out["update_conflict_shared"] = neg / total
        out["update_cosine_shared"] = cs / total
    return out


NOTES = {
    "update_conflict_experts": "the fraction of client pairs whose updates of the same expert have a negative "
                               "cosine (over every expert of every MoE layer; eval.update_conflict)",
    "update_cosine_experts": "the mean cosine between two clients' updates of the same expert",
    "update_conflict_by_layer": "per MoE layer, the fraction of client pairs whose expert updates conflict",
    "update_conflict_shared": "the fraction of client pairs whose updates of the shared (non-expert) tensors conflict",
    "update_cosine_shared": "the mean cosine between two clients' updates of the shared (non-expert) tensors",
}
