#!/usr/bin/env python
"""Why does FC-MoE's projection (not) fire under concept shift? A probe of the evidence scenario.

Runs FC-MoE on ``configs/evidence-concept-shift.yaml`` (one seed, in-process) and, at every
aggregation, recomputes FC-MoE's own test for every expert (l, j) and every client: the cosine of
the client's update Δ_i to the importance-weighted consensus d = Σ w_i Δ_i (w_i ∝ n_i · f_i · ‖Δ_i‖,
FC-MoE's default), which is what decides a projection (cosine < 0). It prints, per round and per
client group (group 0 keeps the labels, group 1 shifts four of them), the mean and the minimum of
that cosine, the share below 0, and the cosine between the two groups' mean updates of the same
expert — the direct measure of whether the groups pull the expert apart.

    python benchmarks/fcmoe_probe.py [--seed 0] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedmoe.algorithms import fcmoe  # noqa: E402
from fedmoe.algorithms.experts import expert_groups, flat_group  # noqa: E402
from fedmoe.algorithms.flame import COUNTS, TOKENS  # noqa: E402
from fedmoe.config import config_from_tree  # noqa: E402
from fedmoe.federation import run_federated  # noqa: E402
from fedmoe.federation.summary import label_groups  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return None if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def probe_round(server, global_state, replies, group_of: list[int]) -> dict:
    names = list(global_state)
    layer_of = server.layer_of
    num_experts = {layer: int(global_state[next(n for n in names if layer_of.get(n) == layer)].shape[0])
                   for layer in set(layer_of.values())}
    g = {n: t.to(torch.float64) for n, t in global_state.items()}
    deltas = [{n: r.message.tensors[n].to(torch.float64) - g[n] for n in names} for r in replies]
    n = [float(r.message.scalars["n_train"]) for r in replies]
    freq = [{layer: r.message.tensors[COUNTS][layer].to(torch.float64) / max(int(r.message.tensors[TOKENS][layer]), 1)
             for layer in num_experts} for r in replies]
    groups = [group_of[r.client] for r in replies]
    cos_by_group: dict[int, list[float]] = {0: [], 1: []}
    between: list[float] = []
    for key, members in expert_groups(names, layer_of, num_experts):
        if key is None:
            continue
        flat = [flat_group(d, members) for d in deltas]
        c = [ni * float(fr[key[0]][key[1]]) * float(torch.linalg.vector_norm(v)) for ni, fr, v in zip(n, freq, flat)]
        if sum(c) <= 0:
            continue
        d = sum((ci / sum(c)) * v for ci, v in zip(c, flat))
        for gi, ci, v in zip(groups, c, flat):
            cs = cosine(v, d)
            if ci > 0 and cs is not None:
                cos_by_group[gi].append(cs)
        means = [sum(v for gi, v in zip(groups, flat) if gi == k) for k in (0, 1)]
        cb = cosine(means[0], means[1])
        if cb is not None:
            between.append(cb)
    out = {}
    for k, vals in cos_by_group.items():
        if vals:
            out[f"group{k}"] = {"mean_cos_to_consensus": sum(vals) / len(vals), "min": min(vals),
                                "share_below_0": sum(v < 0 for v in vals) / len(vals), "n": len(vals)}
    if between:
        out["between_groups"] = {"mean_cos": sum(between) / len(between), "min": min(between),
                                 "share_below_0": sum(v < 0 for v in between) / len(between), "n": len(between)}
    return out


def main(argv=None) -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tree = yaml.safe_load((ROOT / "configs" / "evidence-concept-shift.yaml").read_text())
    tree.pop("sweep")
    tree.update(seed=args.seed, name="fcmoe-probe")
    tree["algorithm"] = {"name": "fcmoe"}
    tree["federation"]["rounds"] = args.rounds
    tree.setdefault("eval", {})["zero_shot"] = False
    with tempfile.TemporaryDirectory() as tmp:
        tree["output_dir"] = tmp
        cfg = config_from_tree(tree, "probe")
        from fedmoe.data import resolve_labels

        group_of = label_groups(resolve_labels(cfg))["client_group"]
        rows = []
        original = fcmoe.FCMoEServer.aggregate

        def aggregate(self, global_state, server_state, replies):
            rows.append({"round": len(rows) + 1, **probe_round(self, global_state, replies, group_of)})
            print(json.dumps(rows[-1]), flush=True)
            return original(self, global_state, server_state, replies)

        fcmoe.FCMoEServer.aggregate = aggregate
        try:
            run_federated(cfg)
        finally:
            fcmoe.FCMoEServer.aggregate = original
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
