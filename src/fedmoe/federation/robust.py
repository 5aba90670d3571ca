"""Robust aggregation (``federation.robust``): what one poisoning client can do to the global model, bounded.

For the methods whose aggregation is a weighted sum of client updates (``Server.supports_dp``: FedIT and its
server optimizers, FedProx, FLAME, FLEx's shared part), with θ the global state and Δ_i = θ_i − θ over the
global tensors of reply i:

    norm bounding (``norm_bound`` B):  Δ_i ← Δ_i · min(1, B / ‖Δ_i‖₂)   (one L2 norm over all tensors; Sun et
                                       al. 2019, "Can You Really Backdoor Federated Learning?")
    rule mean:          the method's own aggregation of θ + Δ_i (its weights, its server optimizer)
    rule median:        θ + the coordinate-wise median of the Δ_i (the mean of the two middle values for an
                        even count; Yin et al. 2018)
    rule trimmed_mean:  θ + per coordinate, the mean of the Δ_i without the ⌊trim·n⌋ largest and smallest
    rule krum:          each update scored by the sum of its squared distances to its n − f − 2 nearest
                        others (Blanchard et al. 2017); θ + the best one (``krum_keep`` 0), or the
                        n_i-weighted mean of the ``krum_keep`` best (multi-Krum)

then the server optimizer (``algorithm.server_optimizer``) on the result, as for the plain mean. Median,
trimmed mean and Krum are unweighted over the clients (as Flower's FedMedian, FedTrimmedAvg and Krum; tests
compare with them): they replace the method's weights (n_i, FLAME's activation weights) by a statistic a
minority of clients cannot move far. What they cost: with heterogeneous data the median of honest clients
is not their mean, so a robust run converges to a different point than FedAvg; the report's server rows
name the rule and the share of bounded updates (``robust_bounded_fraction``) and, for Krum, the chosen
clients.
"""

from __future__ import annotations

import math

import torch

from ..algorithms.base import N_TRAIN
from ..algorithms.server_opt import server_update
from ..messages import Message, Reply
from .dp import clip_update

State = dict[str, torch.Tensor]


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median over dim 0, the mean of the two middle values for an even count (numpy's)."""
    s = stacked.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    """The mean over dim 0 without the ⌊trim·n⌋ largest and smallest values of each coordinate."""
    n = stacked.shape[0]
    cut = int(trim * n)
    return stacked.sort(dim=0).values[cut : n - cut].mean(dim=0)


def krum_scores(updates: list[State], malicious: int) -> list[float]:
    """Each update's Krum score: the sum of its squared L2 distances to its n − f − 2 nearest others (at least 1)."""
    names = list(updates[0])
    flat = torch.stack([torch.cat([u[n].reshape(-1) for n in names]) for u in updates])
    dist = torch.cdist(flat, flat).pow(2)
    near = max(1, len(updates) - malicious - 2)
    scores = []
    for i in range(len(updates)):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:near].sum()))
    return scores


class TooFewForTheRule(RuntimeError):
    """Fewer updates than the rule bounds a poisoned one over (``RobustConfig.minimum_clients``): the runtime fails
    the round (``RoundFailed``) rather than take what would be their plain mean."""


def robust_aggregate(server, cfg, global_state: State, server_state: dict, replies: list[Reply],
                     round_idx: int) -> tuple[State, dict, dict]:
    """The round's aggregation under ``cfg.federation.robust``: (new global state, server state, metrics)."""
    rc = cfg.federation.robust
    need = rc.minimum_clients()
    if len(replies) < need:  # the rule would bound nothing: with fewer, it is the plain mean of what came
        raise TooFewForTheRule(f"round {round_idx}: {len(replies)} clients replied, and federation.robust.rule = {rc.rule}"
                          f"{f' (trim {rc.trim})' if rc.rule == 'trimmed_mean' else ''} bounds a poisoned update only over "
                          f"at least {need}: with fewer it is the plain mean, so the round was not aggregated; resume "
                          "when more clients answer, or sample more (federation.fraction)")
    deltas, bounded = [], 0
    for r in replies:
        d = {n: r.message.tensors[n].to(torch.float64) - t.to(torch.float64) for n, t in global_state.items()}
        if rc.norm_bound is not None:
            d, norm = clip_update(d, rc.norm_bound)
            bounded += norm > rc.norm_bound
        deltas.append(d)
    metrics: dict = {"robust_rule": rc.rule}
    if rc.norm_bound is not None:
        metrics["robust_bounded_fraction"] = bounded / max(1, len(replies))
    if rc.rule == "mean":  # the method's own aggregation, of the bounded updates
        kept = [Reply(r.client, Message({**r.message.tensors, **{n: (global_state[n].to(torch.float64) + d[n])
                                                                  .to(global_state[n].dtype) for n in d}},
                                        r.message.scalars, r.message.header)) for r, d in zip(replies, deltas)]
        new, server_state, own = server.aggregate(global_state, server_state, kept, round_idx=round_idx)
        return new, server_state, {**own, **metrics}
    if rc.rule == "krum":
        scores = krum_scores(deltas, rc.krum_malicious)
        order = sorted(range(len(replies)), key=lambda i: (scores[i], i))
        chosen = order[: max(1, rc.krum_keep)]
        weights = [float(replies[i].message.scalars[N_TRAIN]) if rc.krum_keep else 1.0 for i in chosen]
        total = math.fsum(weights)
        step = {n: sum(w * deltas[i][n] for w, i in zip(weights, chosen)) / total for n in global_state}
        metrics["krum_selected"] = [replies[i].client for i in chosen]
    else:
        stat = coordinate_median if rc.rule == "median" else (lambda s: trimmed_mean(s, rc.trim))
        step = {n: stat(torch.stack([d[n] for d in deltas])) for n in global_state}
    averaged = {n: (t.to(torch.float64) + step[n]).to(t.dtype) for n, t in global_state.items()}
    new, server_state = server_update(cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                      round_idx=round_idx)
    return new, server_state, metrics


__all__ = ["TooFewForTheRule", "coordinate_median", "krum_scores", "robust_aggregate", "trimmed_mean"]
