"""Fingerprint every shipped config at a tiny scale: run each config (every sweep point) with small
data, 2 steps and 2 rounds, and write the final numbers of each run to a JSON file.

Used to show that a refactoring keeps every shipped config's results digit for digit:

    python tools/config_fingerprints.py --out before.json      # on the old code
    python tools/config_fingerprints.py --out after.json       # on the new code
    python tools/config_fingerprints.py --compare before.json after.json

Runs are written under a temporary directory and deleted (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_examples=480", "data.max_length=64", "train.max_steps=2", "train.batch_size=2",
    "federation.rounds=2", "eval.max_examples=2", "eval.max_new_tokens=4", "eval.batch_size=4",
    "data.max_test_per_client=4", "eval.mmlu_max_per_subject=1",
]
# code paths no shipped config takes (old key names; translated for the new config layout)
EXTRA = {
    "extra/hetlora-prune": ["algorithm.name=hetlora", "algorithm.hetlora.prune_lambda=0.1",
                            "algorithm.budgets.ranks=[8,6,4,2]", "federation.rounds=3"],
    "extra/flame-ratio-static": ["algorithm.name=flame", "algorithm.rescaler=static", "algorithm.temperature=1",
                                 "algorithm.budgets.top_k=[4,2]", "algorithm.budgets.assign=uniform"],
    "extra/flame-ratio-init": ["algorithm.name=flame", "algorithm.rescaler_init=ratio", "lora.attention_targets=[q_proj]"],
    "extra/scaffold-fedadam": ["algorithm.name=scaffold", "algorithm.server_optimizer.name=fedadam",
                               "algorithm.server_optimizer.lr=0.01", "federation.rounds=3"],
    "extra/fedprox-fraction": ["algorithm.name=fedit", "train.proximal_mu=0.5", "federation.fraction=0.5",
                               "data.partition.num_clients=4", "federation.rounds=3", "lora.dropout=0.1"],
    "extra/flex-full-2grafts": ["algorithm.name=flex", "lora.experts=false", "algorithm.flex.train_full=true",
                                "algorithm.flex.num_grafts=2", "lora.attention_targets=[q_proj,v_proj]"],
    "extra/flexlora-tiny-olmoe": ["algorithm.name=flexlora", "model.name=builtin:tiny-olmoe", "lora.rank=4"],
    "extra/fedit-client-topk": ["algorithm.name=fedit", "algorithm.client_top_k=[1,2,3,4]", "eval.general_blocks=2"],
}
NEW_KEYS = {  # old key -> new key (applied when the code has the new config layout)
    "algorithm.rescaler_init": "algorithm.flame.rescaler_init",
    "algorithm.rescaler": "algorithm.flame.rescaler",
    "algorithm.temperature": "algorithm.flame.temperature",
    "train.proximal_mu": "algorithm.fedit.proximal_mu",
}


def _translate(items: list[str]) -> list[str]:
    from fedmoe.config import RunConfig

    if not hasattr(RunConfig().algorithm, "flame"):
        return items
    out = []
    for it in items:
        key, value = it.split("=", 1)
        out.append(f"{NEW_KEYS.get(key, key)}={value}")
    return out


def _translate_tree(tree: dict) -> dict:
    from fedmoe.config import RunConfig

    if not hasattr(RunConfig().algorithm, "flame"):
        return tree
    for old, new in NEW_KEYS.items():
        *path, last = old.split(".")
        node = tree
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            value = node.pop(last)
            *npath, nlast = new.split(".")
            dst = tree
            for p in npath:
                dst = dst.setdefault(p, {})
            dst[nlast] = value
    return tree


def fingerprint(summary: dict) -> dict:
    g = summary["global"]
    keep_g = ("rouge_l", "loss", "perplexity", "mmlu", "general_perplexity", "expert_load_std", "rouge_l_change")
    keep_c = ("id", "k", "rank", "n_train", "rouge_l", "loss", "perplexity", "bytes_up", "bytes_down",
              "flops_per_seq", "general_perplexity", "mmlu", "rounds_trained", "expert_activation", "zero_shot")
    return {"global": {k: g.get(k) for k in keep_g},
            "zero_shot": summary.get("zero_shot"),
            "clients": [{k: c.get(k) for k in keep_c} for c in summary["clients"]]}


def compare(a: dict, b: dict) -> int:
    """Print every difference; bytes-up differences are listed apart, per client and round (a change
    in what a reply carries besides its tensors, e.g. a scalar, shows there). Returns the exit status."""
    bad = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            print(f"ONLY IN ONE: {name}")
            bad += 1
            continue
        diffs = [f"{part}: {x[part]} vs {y[part]}" for part in ("global", "zero_shot") if x[part] != y[part]]
        extra_up = set()
        for cx, cy in zip(x["clients"], y["clients"]):
            for k in cx:
                if k == "bytes_up" and cx[k] != cy[k] and cy["rounds_trained"]:
                    extra_up.add((cy[k] - cx[k]) / cy["rounds_trained"])
                elif cx[k] != cy[k]:
                    diffs.append(f"client {cx['id']} {k}: {cx[k]} vs {cy[k]}")
        if diffs:
            bad += 1
            print(f"DIFFERENT: {name}\n  " + "\n  ".join(diffs))
        elif extra_up:
            print(f"same numbers, uplink bytes per client and round changed by {sorted(extra_up)}: {name}")
    print(f"{len(set(a) | set(b)) - bad} of {len(set(a) | set(b))} runs give the same numbers")
    return 1 if bad else 0


def runs(only: str | None, skip: str | None = None):
    import yaml

    from fedmoe.federation.sweep import sweep_points

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("pretrain"):
            continue
        tree = yaml.safe_load(path.read_text())
        sweep = tree.pop("sweep", None)
        points = sweep_points(sweep) if sweep else [("", [])]
        for point, sets in points:
            name = f"{path.stem}/{point}" if point else path.stem
            if (only and only not in name) or (skip and skip in name):
                continue
            yield name, _translate_tree(json.loads(json.dumps(tree))), _translate(sets)
    for name, sets in EXTRA.items():
        if only and only not in name:
            continue
        tree = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
        yield name, _translate_tree(tree), _translate(sets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only")
    ap.add_argument("--skip", help="leave out the runs whose name contains this (e.g. evidence)")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="an override for every run (e.g. model.skip_padding=false on code that has the key)")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
    import torch

    from fedmoe.config import apply_overrides, config_from_tree
    from fedmoe.federation import run_federated

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree, sets in runs(args.only, args.skip):
            tiny = list(TINY)
            if (tree.get("eval") or {}).get("general_blocks"):
                tiny.append("eval.general_blocks=2")
            if (tree.get("eval") or {}).get("mmlu"):
                tiny.append("eval.mmlu=[abstract_algebra,anatomy]")
            cfg = config_from_tree(apply_overrides(tree, sets + tiny + args.overrides
                                                   + [f"output_dir={tmp}", f"name={name.replace('/', '_')}"]), name)
            summary, _ = run_federated(cfg, log=lambda *a, **k: None)
            out[name] = fingerprint(summary)
            print(name, "global loss", out[name]["global"]["loss"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
