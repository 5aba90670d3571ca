"""A sweep expands to the Cartesian product of runs, tabulates them, and skips finished points."""

import json


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
    named = sweep_points({"method": {"FedProx": {"algorithm.name": "fedit", "algorithm.fedit.proximal_mu": 0.01},
                                     "FLEx": {"algorithm.name": "flex"}}, "seed": [0, 1]})
    assert [p for p, _ in named] == ["method=FedProx,seed=0", "method=FedProx,seed=1", "method=FLEx,seed=0",
                                     "method=FLEx,seed=1"]
    assert named[1][1] == ["algorithm.name=fedit", "algorithm.fedit.proximal_mu=0.01", "seed=1"]


def test_a_text_value_reaches_its_point_as_written():
    """A sweep's text value went into its override unquoted and was read again as YAML: "Pick one of {labels} #1
    rule" lost what follows " #" (a comment), "~" became null, "'x'" lost its quotes, "yes" became true; two points
    named apart ran one config."""
    from fedmoe.config import parse_override

    texts = ["Pick one of {labels} #1 rule: answer with the label only", "~", "'x'", "yes", " padded ", "a: b", "plain"]
    for point, sets in sweep_points({"data.instruction": texts}):
        (override,) = sets
        assert parse_override(override)[1] == texts[[p for p, _ in sweep_points({"data.instruction": texts})].index(point)]
    assert sweep_points({"data.instruction": ["plain"]})[0][1] == ["data.instruction=plain"]  # quoted only where needed
    named = sweep_points({"v": {"a": {"data.instruction": "x #y"}, "b": {"data.instruction": "x"}}})
    assert [parse_override(o)[1] for _, (o,) in named] == ["x #y", "x"]


def test_two_swept_keys_of_one_last_part_are_named_in_full():
    """A point was named by each key's last part: data.partition.alpha and lora.alpha gave alpha=0.1,alpha=16, two
    axes one name could not tell apart (the evidence tables read both as one)."""
    pts = sweep_points({"data.partition.alpha": [0.1], "lora.alpha": [16, 32], "lora.rank": [4]})
    assert [p for p, _ in pts] == ["data.partition.alpha=0.1,lora.alpha=16,rank=4",
                                   "data.partition.alpha=0.1,lora.alpha=32,rank=4"]


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
    # the base config's budget levels are FLAME's: the fedit point ignores them, and the sweep says so first
    assert logs[0].startswith("note: algorithm.budgets.top_k changes nothing in 1 of the 2 sweep points (name=fedit)")
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "name=fedit" in rows["client"] and "name=flame" in rows["client"]
    flame = json.loads((tmp_path / "sw" / "name=flame" / "summary.json").read_text())
    assert [c["k"] for c in flame["clients"]] == [2, 1]
    assert "(k=1, r=2" in rows["1"] and f"{flame['clients'][1]['rouge_l']:.2f} (k=1" in rows["1"]
    ch = flame["global"]["rouge_l_change"]
    assert f"{ch['mean']:+.2f} [{ch['low']:+.2f}, {ch['high']:+.2f}]" in rows["ROUGE-L change from zero-shot (each client's own model), 95% interval"]
    # started again, finished points are kept, not rerun
    logs.clear()
    run_sweep(path, log=logs.append)
    assert all("done before, kept" in line for line in logs[1:]) and len(logs) == 3
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
    assert "continuing from its checkpoint" in logs[1] and "done before, kept" in logs[2]
    after = json.loads((fedit_dir / "summary.json").read_text())
    assert [c["loss"] for c in after["clients"]] == [c["loss"] for c in before["clients"]]
    # the sweep's config changed since (the file or --set): its points ran with another config, so the sweep is
    # refused before any point runs, naming each point and key — never the old results reported as the new config's
    # (a key that does not define a run, e.g. a timeout, may change)
    logs.clear()
    with pytest.raises(ConfigError, match=r"name=fedit \(.*\): train\.lr: 0\.002 -> 0\.0001 \| name=flame .*train\.lr: "
                                          r"0\.002 -> 0\.0001.*--set name=NEW"):
        run_sweep(path, ["train.lr=1e-4"], log=logs.append)
    with pytest.raises(ConfigError, match=r"name=flame \(.*\): train\.max_steps: 1 -> 2"):
        run_sweep(path, ["sweep.algorithm.name=[flame]", "train.max_steps=2"], log=logs.append)
    assert logs == []  # nothing ran
    (fedit_dir / "summary.json").unlink()  # a point to continue is checked too
    with pytest.raises(ConfigError, match=r"name=fedit \(.*\): lora\.rank: 2 -> 4"):
        run_sweep(path, ["lora.rank=4", "sweep.algorithm.name=[fedit]"], log=logs.append)
    # a --set of an execution key reaches the point that is continued (as `fedmoe run --resume --set` would: e.g.
    # activation checkpointing after running out of memory); the finished point keeps its config as it ran
    run_sweep(path, ["train.activation_checkpointing=true"], log=logs.append)
    assert "continuing from its checkpoint" in logs[1] and "done before, kept" in logs[-1]
    assert yaml.safe_load((fedit_dir / "config.yaml").read_text())["train"]["activation_checkpointing"] is True
    flame_cfg = yaml.safe_load((tmp_path / "sw" / "name=flame" / "config.yaml").read_text())
    assert flame_cfg["train"]["activation_checkpointing"] is False
    # a finished point whose summary.json was damaged since is named, not kept (its table had said "Expecting ','
    # delimiter", naming no file)
    flame_summary = tmp_path / "sw" / "name=flame" / "summary.json"
    flame_summary.write_text(flame_summary.read_text()[:100])
    logs.clear()
    with pytest.raises(ValueError, match=rf"{flame_summary} is not valid JSON .*move the point's folder "
                                         rf"{tmp_path / 'sw' / 'name=flame'} away"):
        run_sweep(path, log=logs.append)
    assert not any("name=flame: done before, kept" in line for line in logs)


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
    # default, flame-table2, -clients40, -ablations, flex-*, fcmoe-dirichlet, evidence-concept-shift, -label-skew, -compute,
    # -fcmoe-paper
    assert checked == 1 + 8 + 12 + 7 + 8 + 16 + 4 + 18 + 27 + 30 + 24 + 6


def test_sweep_report_rows_for_retention_balance_and_bytes():
    from fedmoe.federation.sweep import BYTES_PER_ROUND, format_sweep_report

    def client(cid, cat, rouge, mmlu=None, ppl=None):
        return {"id": cid, "k": 4, "rank": 8, "flops_per_seq": 1e9, "rouge_l": rouge, "mmlu": mmlu,
                "general_perplexity": ppl, "bytes_up": 3_000_000, "rounds_trained": 3,
                "category_counts": {cat: 10} if cat else {"a": 5, "b": 5}}

    personal = {"clients": [client(0, "closed_qa", 10.0, 30.0, 20.0), client(1, "summarization", 12.0, 40.0, 30.0)],
                "global": {"rouge_l": 11.5, "loss": 5.0, "mmlu": 99.0, "expert_load_std": [0.01, 0.03]}}
    shared = {"clients": [client(0, "closed_qa", 9.0), client(1, "summarization", 11.0)],
              "global": {"rouge_l": 10.0, "loss": 5.1, "mmlu": 25.0, "general_perplexity": 22.0,
                         "expert_load_std": [0.02, 0.02]}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in format_sweep_report("x.yaml", [("p", personal), ("s", shared)]).splitlines()
            if line.startswith("| ")}
    assert rows["0 (closed_qa)"][0].startswith("10.00") and "1 (summarization)" in rows
    assert rows["mean over clients"] == ["11.00", "10.00"]
    # personalised: the mean of the clients' own models; otherwise the global model's value
    assert rows["MMLU, 5-shot, mean over subjects (%)"] == ["35.0", "25.0"]
    assert rows["general-text perplexity"] == ["25.00", "22.00"]
    assert rows["expert load std (mean over layers)"] == ["0.0200", "0.0200"]
    assert rows[BYTES_PER_ROUND] == ["1.00 MB", "1.00 MB"]  # 3 MB over 3 rounds trained
    # a method that trains no global model: its global cells are not the initial model's numbers shown as trained
    local = {**shared, "global_model_trained": False}
    text = format_sweep_report("x.yaml", [("s", shared), ("local", local)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["global model"] == ["10.00", "– ¹"] and rows["global test loss"] == ["5.1000", "– ¹"]
    assert "¹ local: the method trains no global model" in text
    # a client whose last evaluation failed: its older score is marked, and the global numbers say it is missing
    stale = {**shared, "rounds": 3, "clients": [{**shared["clients"][0], "evaluated_round": 3},
                                                {**shared["clients"][1], "evaluated_round": 2}],
             "global": {**shared["global"], "clients_missing": [1]}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in format_sweep_report("x.yaml", [("s", stale)]).splitlines() if line.startswith("| ")}
    assert rows["1 (summarization)"][0].endswith("from round 2") and not rows["0 (closed_qa)"][0].endswith("round 3")
    assert rows["clients missing from the global numbers (their evaluation failed)"] == ["1"]


def test_a_mean_over_no_client_is_a_dash_not_zero():
    """A sweep point whose clients report no answer metric (eval.rouge: false, or every client's evaluation kept
    on its node) has no mean over clients: a dash, never 0.00 from dividing an empty sum by one."""
    from fedmoe.federation.sweep import format_sweep_report

    scored = {"clients": [{"id": 0, "rouge_l": 8.0}, {"id": 1, "rouge_l": None}], "global": {"rouge_l": 8.0, "loss": 5.0}}
    unscored = {"clients": [{"id": 0}, {"id": 1}], "global": {"loss": 5.2}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in format_sweep_report("x.yaml", [("a", scored), ("b", unscored)]).splitlines()
            if line.startswith("| ")}
    assert rows["mean over clients"] == ["8.00", "–"]  # the one client that has it; none
    assert rows["global model"] == ["8.00", "–"]
    # a point named by a text value holding a pipe: its header cell is escaped (it shifted every column after it)
    header = format_sweep_report("x.yaml", [("prompt=a|b", scored), ("b", unscored)]).splitlines()[4]
    assert header == "| client | prompt=a\\|b | b |"


def test_the_mean_over_categories_compares_the_same_categories():
    """The zero-shot and final means over categories are taken over the categories both have (a client that failed
    in the final round takes its categories' final scores away): each side's mean over the same set, and no row
    when no category has both."""
    from fedmoe.report.report import format_zero_shot_comparison

    def summary(before, after):
        return {"zero_shot": {"rouge_l": 10.0, "loss": 5.0, "rouge_l_by_category": before},
                "global": {"rouge_l": 11.0, "loss": 4.9, "rouge_l_by_category": after}, "clients": []}

    row = [x for x in format_zero_shot_comparison(summary({"a": 10.0, "b": 20.0, "c": 90.0}, {"a": 12.0, "b": 21.0}))
           if "mean over categories" in x]
    assert [c.strip() for c in row[0].split("|")[3:6]] == ["15.00", "16.50", "1.50"]
    assert not [x for x in format_zero_shot_comparison(summary({"a": 10.0}, {"b": 12.0})) if "mean over categories" in x]


def test_a_clients_category_label_holds_for_every_point_and_failures_are_counted():
    """A seed axis over a pathological split gives client 1 another category in each point: the row was labelled
    with the first point's category for every column. A point's failures (non-finite updates left out) are counted
    in the table, and `fedmoe run` of the sweep exits 3 as one such run does (nonfinite_points)."""
    from fedmoe.federation.sweep import format_sweep_report, nonfinite_points

    def point(cat1, failures=()):
        return {"clients": [{"id": 0, "rouge_l": 5.0, "category_counts": {"closed_qa": 9}},
                            {"id": 1, "rouge_l": 6.0, "category_counts": {cat1: 9}}],
                "global": {"loss": 1.0}, "failures": list(failures)}

    bad = [{"round": 1, "client": 1, "stage": "non-finite"}, {"round": 2, "client": 0, "stage": "train"}]
    results = [("seed=0", point("closed_qa")), ("seed=1", point("brainstorming", bad))]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in format_sweep_report("s.yaml", results).splitlines() if line.startswith("| ")}
    assert "0 (closed_qa)" in rows and "1" in rows and not any(k.startswith("1 (") for k in rows)
    assert rows["client failures (of them non-finite updates left out)"] == ["0 (0)", "2 (1)"]
    assert nonfinite_points(results) == ["seed=1"]
    clean = format_sweep_report("s.yaml", [("seed=0", point("closed_qa"))])
    assert "client failures" not in clean


def test_a_sweep_refuses_points_whose_names_would_not_say_what_they_run():
    """A named variant setting a swept key made every point run its value while the names claimed the swept ones; two
    values that name one folder (a '/' read as '_') made the second point keep the first's results as its own."""
    from fedmoe.config import ConfigError
    from fedmoe.federation.sweep import sweep_points

    with pytest.raises(ConfigError, match=r"sweep.variant and sweep.lora.rank both set lora.rank"):
        sweep_points({"lora.rank": [2, 4], "variant": {"big": {"lora.rank": 8, "train.lr": 0.1}}})
    with pytest.raises(ConfigError, match=r"both named 'source=w_d.jsonl'"):
        sweep_points({"data.source": ["w/d.jsonl", "w_d.jsonl"]})
    assert [n for n, _ in sweep_points({"lora.rank": [2, 4], "v": {"a": {"train.lr": 0.1}, "b": {"train.lr": 0.2}}})] \
        == ["rank=2,v=a", "rank=2,v=b", "rank=4,v=a", "rank=4,v=b"]


def test_an_axis_of_named_variants_is_narrowed_by_its_labels(tmp_path):
    from fedmoe.config import ConfigError
    from fedmoe.federation.sweep import expand_sweep

    cfg = tmp_path / "s.yaml"
    cfg.write_text("sweep:\n  method:\n    FedIT: {algorithm.name: fedit}\n    FLEx: {algorithm.name: flex}\n"
                   "    local: {algorithm.name: local_only}\n")
    _, points, _, _ = expand_sweep(cfg, ["sweep.method=[FLEx,local]"])
    assert [p for p, _ in points] == ["method=FLEx", "method=local"]
    with pytest.raises(ConfigError, match=r"sweep.method is an axis of named variants \(FedIT, FLEx, local\), and "
                                          r"FLAME is not one"):
        expand_sweep(cfg, ["sweep.method=[FLAME]"])


def test_a_point_another_sweep_wrote_meanwhile_is_refused_not_kept(tmp_path):
    """The sweep checked every point's folder before it began; a second sweep into the same folder (other values, or
    started at once) could then finish a point, which the first kept as its own. The point is checked again as it
    comes."""
    from fedmoe.config import ConfigError, config_to_dict, load_config
    from fedmoe.federation import run_federated
    from fedmoe.federation.sweep import _run_point

    tiny = ["model.name=builtin:tiny-olmoe", "data.max_examples=60", "data.max_length=32", "data.partition.num_clients=2",
            "train.max_steps=1", "train.batch_size=2", "eval.rouge=false", "data.max_test_per_client=2",
            "federation.rounds=1", "eval.zero_shot=false", "lora.rank=2"]
    run_federated(load_config(None, tiny + ["train.lr=0.05", f"output_dir={tmp_path}", "name=rank=2"]),
                  log=lambda *a: None)  # what the other sweep wrote: lr 0.05
    tree = config_to_dict(load_config(None, tiny + ["train.lr=0.002"]))
    with pytest.raises(ConfigError, match=r"sweep point rank=2 .*train.lr: 0.05 -> 0.002.*its folder now holds a run "
                                          r"of another config"):
        _run_point("rank=2", tree, ["lora.rank=2"], str(tmp_path), "s.yaml", False, lambda *a: None, None)
    tree = config_to_dict(load_config(None, tiny + ["train.lr=0.05"]))  # the same config: kept
    assert _run_point("rank=2", tree, ["lora.rank=2"], str(tmp_path), "s.yaml", False, lambda *a: None, None) == \
        str(tmp_path / "rank=2" / "summary.json")


def test_a_section_valued_axis_sets_its_keys_and_keeps_the_sections_others(tmp_path):
    """An axis whose values are sections (lora: [{rank: 2}]) replaced the whole section: the base config's
    lora.alpha: 32 became the default 16, and the point's name did not say so. Each key it gives is set, the others
    kept."""
    from fedmoe.config import apply_overrides, config_from_tree

    pts = sweep_points({"lora": [{"rank": 2}, {"rank": 4, "dropout": 0.1}]})
    assert [sets for _, sets in pts] == [["lora.rank=2"], ["lora.rank=4", "lora.dropout=0.1"]]
    tree = {"lora": {"rank": 8, "alpha": 32}}
    cfgs = [config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets), "t") for _, sets in pts]
    assert [(c.lora.rank, c.lora.alpha, c.lora.dropout) for c in cfgs] == [(2, 32, cfgs[0].lora.dropout), (4, 32, 0.1)]
