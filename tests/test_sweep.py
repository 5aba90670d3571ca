"""A sweep expands to the Cartesian product of runs, tabulates them, and skips finished points."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import yaml

from fedmoe.config import ConfigError, load_config
from fedmoe.federation.sweep import run_sweep, sweep_points


def test_sweep_points_are_the_cartesian_product():
    pts = sweep_points({"algorithm.name": ["fedit", "flame"], "data.partition.alpha": [5.0, 0.5]})
    assert [p for p, _ in pts] == ["name=fedit,alpha=5.0", "name=fedit,alpha=0.5", "name=flame,alpha=5.0",
                                   "name=flame,alpha=0.5"]
    assert pts[3][1] == ["algorithm.name=flame", "data.partition.alpha=0.5"]
    with pytest.raises(ConfigError, match="non-empty list"):
        sweep_points({"seed": 3})
    named = sweep_points({"method": {"FedProx": {"algorithm.name": "fedit", "train.proximal_mu": 0.01},
                                     "FLEx": {"algorithm.name": "flex"}}, "seed": [0, 1]})
    assert [p for p, _ in named] == ["method=FedProx,seed=0", "method=FedProx,seed=1", "method=FLEx,seed=0",
                                     "method=FLEx,seed=1"]
    assert named[1][1] == ["algorithm.name=fedit", "train.proximal_mu=0.01", "seed=1"]


def test_a_config_with_a_sweep_is_not_a_single_run(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("sweep: {seed: [1, 2]}\n")
    with pytest.raises(ConfigError, match="sweep"):
        load_config(p)


def test_sweep_runs_tabulates_and_resumes(tmp_path):
    tree = {"name": "sw", "output_dir": str(tmp_path), "model": {"name": "builtin:tiny-olmoe"},
            "data": {"max_examples": 200, "max_length": 48, "partition": {"num_clients": 2}, "max_test_per_client": 3},
            "train": {"max_steps": 1, "batch_size": 2}, "lora": {"rank": 2},
            "eval": {"max_examples": 2, "max_new_tokens": 2}, "federation": {"rounds": 1},
            "algorithm": {"budgets": {"top_k": [2, 1]}},
            "sweep": {"algorithm.name": ["fedit", "flame"]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    logs = []
    report = run_sweep(path, log=logs.append)
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "name=fedit" in rows["client"] and "name=flame" in rows["client"]
    flame = json.loads((tmp_path / "sw" / "name=flame" / "summary.json").read_text())
    assert [c["k"] for c in flame["clients"]] == [2, 1]
    assert "(k=1, r=2" in rows["1"] and f"{flame['clients'][1]['rouge_l']:.2f} (k=1" in rows["1"]
    ch = flame["global"]["rouge_l_change"]
    assert f"{ch['mean']:+.2f} [{ch['low']:+.2f}, {ch['high']:+.2f}]" in rows["ROUGE-L change from zero-shot, 95% interval"]
    # started again, finished points are kept, not rerun
    logs.clear()
    run_sweep(path, log=logs.append)
    assert all("done before, kept" in line for line in logs)
    # one axis narrowed from the command line
    logs.clear()
    run_sweep(path, ["sweep.algorithm.name=[flame]"], log=logs.append)
    assert len(logs) == 1 and "name=flame" in logs[0]
    # a point killed mid-run (checkpoint, no summary) is resumed, not refused or restarted
    fedit_dir = tmp_path / "sw" / "name=fedit"
    before = json.loads((fedit_dir / "summary.json").read_text())
    (fedit_dir / "summary.json").unlink()
    logs.clear()
    run_sweep(path, log=logs.append)
    assert "continuing from its checkpoint" in logs[0] and "done before, kept" in logs[1]
    after = json.loads((fedit_dir / "summary.json").read_text())
    assert [c["loss"] for c in after["clients"]] == [c["loss"] for c in before["clients"]]


def test_every_shipped_config_and_sweep_point_validates():
    import json
    from pathlib import Path

    from fedmoe.config import apply_overrides, config_from_tree
    from fedmoe.federation.sweep import load_sweep

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    checked = 0
    for path in configs:
        if path.name.startswith("pretrain"):
            continue
        tree, sweep = load_sweep(path)
        points = sweep_points(sweep) if sweep else [("single", [])]
        for _, sets in points:
            config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets), str(path))
            checked += 1
    assert checked == 1 + 8 + 12 + 7 + 8 + 16 + 4  # default, flame-table2, -clients40, -ablations, flex-*
