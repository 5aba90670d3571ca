"""fedmoe compare: the table carries each run's own numbers, an unfinished run is compared on what it
has (and marked), the curves hold one line per run, and a folder that is not a run is a clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.report.compare import compare_runs, load_run, plot_comparison
from helpers import once_per_session

TINY = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2",
        "train.max_steps=1", "train.batch_size=2", "eval.rouge=false", "data.max_test_per_client=2", "lora.rank=2",
        "federation.rounds=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return once_per_session(tmp_path_factory, "compare-runs", _runs)  # one set for every worker


def _runs(root):
    out = {}
    for name, sets in (("fedit", ["algorithm.name=fedit"]),
                       ("flame", ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]"])):
        summary, rd = run_federated(load_config(None, TINY + sets + [f"output_dir={root}", f"name={name}"]))
        out[name] = (summary, rd.path)
    _, rd = run_federated(load_config(None, TINY + [f"output_dir={root}", "name=cut"]), stop_after_round=1)
    out["cut"] = (None, rd.path)
    return out


def test_the_table_holds_each_runs_numbers(runs, tmp_path):
    paths = [runs[n][1] for n in ("fedit", "flame", "cut")]
    table, png = compare_runs(paths, tmp_path / "cmp")
    lines = table.splitlines()
    assert lines[0] == "|  | fedit | flame | cut |"
    row = dict((line.split(" | ")[0].lstrip("| "), line.split(" | ")[1:]) for line in lines[2:])
    fedit, flame = runs["fedit"][0], runs["flame"][0]
    assert row["method"][:2] == ["fedit", "flame"]
    assert row["rounds done"][0] == "2 of 2" and row["rounds done"][2].rstrip(" |") == "1 of 2 (unfinished)"
    zs = [json.loads(x) for x in (runs["fedit"][1] / "metrics.jsonl").read_text().splitlines()]
    zero = next(r["loss"] for r in zs if r["kind"] == "test" and r["client"] is None and r["round"] == 0)
    assert row["global test loss (zero-shot)"][0] == f"{fedit['global']['loss']:.4f} ({zero:.4f})"
    assert row["global test loss (zero-shot)"][1].startswith(f"{flame['global']['loss']:.4f} (")
    # flame is personalised: the mean of its clients' own models
    flame_mean = sum(c["loss"] for c in flame["clients"]) / 2
    assert row["client test loss, mean"][1] == f"{flame_mean:.4f}"
    # and its answers: each client's own model scored on its own test set, averaged (the headline the paper reports)
    key = "accuracy" if "client accuracy, mean (each client's own model)" in row else "rouge_l"
    own = [c[key] for c in flame["clients"] if c.get(key) is not None]
    want = sum(own) / len(own) if own else flame["global"].get(key)
    assert row[f"client {'accuracy' if key == 'accuracy' else 'ROUGE-L'}, mean (each client's own model)"][1] == \
        ("–" if want is None else f"{want:.2f}")
    assert row["wall"][2].rstrip(" |") == "–"  # unfinished: no wall time yet
    assert png is not None and png.stat().st_size > 0 and (tmp_path / "cmp" / "compare.md").read_text().count("|") > 20


def test_curves_have_one_line_per_run(runs, tmp_path):
    from matplotlib.figure import Figure

    loaded = [load_run(runs[n][1]) for n in ("fedit", "flame", "cut")]
    seen = {}
    orig = Figure.savefig

    def capture(self, *a, **k):
        seen["axes"] = [[(line.get_label(), list(line.get_xdata())) for line in ax.get_lines()] for ax in self.axes]
        return orig(self, *a, **k)

    Figure.savefig = capture
    try:
        assert plot_comparison(loaded, tmp_path / "c.png")
    finally:
        Figure.savefig = orig
    test_loss = seen["axes"][0]
    assert [label for label, _ in test_loss] == ["fedit", "flame", "cut"]
    assert test_loss[0][1] == [0, 1, 2] and test_loss[2][1] == [0, 1]


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "compare", str(tmp_path / "empty"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "empty is not a fedmoe run directory" in r.stderr.replace("\n", "")


def test_a_run_given_by_its_bare_folder_name_is_labelled_by_it(tmp_path, monkeypatch):
    """`fedmoe compare fedit runs/fedit` from inside a folder: the one-component path's parent is empty as written,
    so its label comes from the absolute path (`<cwd>/fedit`), never `/fedit`; `.` is labelled by its folder."""
    from fedmoe.report.compare import _labels

    (tmp_path / "mine" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "mine")
    assert _labels([Path("fedit"), Path("runs/fedit")]) == ["mine/fedit", "runs/fedit"]
    assert _labels([Path("fedit/"), Path("flame")]) == ["fedit", "flame"]
    monkeypatch.chdir(tmp_path / "mine" / "runs")
    assert _labels([Path("."), Path("../fedit")]) == ["runs", "fedit"]


def test_the_change_row_says_it_measures_the_clients_own_models():
    """summary.global.rouge_l_change pairs each client's own model (final vs zero-shot), not the global model: the
    row that sits under the global ROUGE-L says so, as the report does; the summary key is read as before."""
    from fedmoe.eval import format_change, paired_bootstrap
    from fedmoe.report.compare import Run, format_comparison

    ch = paired_bootstrap([30.0, 40.0, 50.0, 10.0], [20.0, 40.0, 45.0, 12.0], seed=0)
    summary = {"global": {"rouge_l": 11.0, "rouge_l_change": ch}, "clients": [], "wall_s": 60.0}
    table = format_comparison([Run("flame", Path("flame"), {"algorithm": {"name": "flame"}}, [], summary)])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |") for line in table.splitlines()[2:]}
    assert rows["ROUGE-L change of the clients' own models (final vs zero-shot), 95% interval"] == format_change(ch)
    assert not any(k.startswith("ROUGE-L change,") for k in rows)


def test_runs_scored_on_different_test_data_are_said_to_differ(runs, tmp_path):
    """Runs whose test examples or scoring differ (here data.max_test_per_client and eval.max_new_tokens) are
    compared with a line naming each such setting and its values; runs that differ only in the method get none."""
    from fedmoe.report.compare import Run, format_comparison, scoring_differences

    root = tmp_path / "other"
    run_federated(load_config(None, TINY + ["data.max_test_per_client=3", "eval.max_new_tokens=5", "federation.rounds=1",
                                            f"output_dir={root}", "name=more"]))
    same = [load_run(runs[n][1]) for n in ("fedit", "flame")]
    assert scoring_differences(same) == []
    assert "Not like for like" not in compare_runs([runs["fedit"][1], runs["flame"][1]], tmp_path / "a")[0]
    table, _ = compare_runs([runs["fedit"][1], root / "more"], tmp_path / "b")
    assert ("Not like for like: these runs were scored on different test data or scoring (data.max_test_per_client: "
            "2 | 3; eval.max_new_tokens: 32 | 5)") in table
    # runs that differ only in their seed (a seed study): said so, as the draw of the test split, not as a mismatch
    seeds = [Run(f"s{i}", Path(f"s{i}"), {"seed": i, "data": {"source": "dolly"}}, [], None) for i in (0, 1)]
    table = format_comparison(seeds)
    assert "Seeds differ (seed: 0 | 1): each run's seed also drew its partition and test split" in table
    assert "Not like for like" not in table
    seeds[1].config["data"]["source"] = "alpaca"  # a seed and another setting: not like for like, both named
    assert "Not like for like: these runs were scored on different test data or scoring (data.source: \"dolly\" | " \
           "\"alpaca\"; seed: 0 | 1)" in format_comparison(seeds)


# ------------------------------------------------------------------ what ran and what was scored, said where shown
ADAM = ["algorithm.server_optimizer.name=fedadam", "algorithm.fedit.proximal_mu=0.01"]
# data.max_examples=30 over 2 clients: one test example each, the case a reader took for a measured ROUGE-L
SCORED = [s for s in TINY if not s.startswith(("eval.rouge", "data.max_examples"))] + [
    "data.max_examples=30", "eval.max_new_tokens=3"]


@pytest.fixture(scope="module")
def adam_runs(tmp_path_factory):
    """A FedIT run and a FedAdam + FedProx run of the same config, ROUGE-L scored on one example per client."""
    return once_per_session(tmp_path_factory, "compare-adam", _adam_runs)


def _adam_runs(root):
    out = {}
    for name, sets in (("fedit", []), ("fedadam", ADAM)):
        cfg = load_config(None, SCORED + sets + [f"output_dir={root}", f"name={name}"])
        summary, rd = run_federated(cfg)
        out[name] = (cfg, summary, rd.path)
    return out


def test_the_server_optimizer_and_mu_are_named_wherever_the_method_is(adam_runs, tmp_path):
    """A FedIT vs FedAdam (+ FedProx) comparison read "method fedit" twice and the report's header named neither:
    summary.json's method, the report's header and compare's method row now name the optimizer with η as resolved
    (lr: null -> FedAdam's 1e-2, the η its update used) and its β, τ, and μ; plain FedIT stays "fedit"."""
    from fedmoe.algorithms.server_opt import server_lr

    cfg, summary, path = adam_runs["fedadam"]
    assert cfg.algorithm.server_optimizer.lr is None  # config.yaml keeps null (README: resolved at the start)
    assert summary["method"] == {"name": "fedit", "proximal_mu": 0.01, "server_optimizer": {
        "name": "fedadam", "lr": server_lr(cfg.algorithm.server_optimizer), "beta1": 0.9, "beta2": 0.99, "tau": 0.001,
        "convention": "reddi"}}
    assert json.loads((path / "summary.json").read_text())["method"] == summary["method"]
    assert adam_runs["fedit"][1]["method"] == {"name": "fedit", "server_optimizer": None, "proximal_mu": None}
    said = "server optimizer fedadam (η = 0.01, β1 = 0.9, β2 = 0.99, τ = 0.001) · FedProx μ = 0.01"
    header = (path / "report.md").read_text().splitlines()[2]
    assert header.startswith("rounds: 2 · seed: 0 · wall time:") and header.endswith(" · " + said)
    assert "server optimizer" not in (adam_runs["fedit"][2] / "report.md").read_text().splitlines()[2]
    table, _ = compare_runs([adam_runs["fedit"][2], path], tmp_path / "cmp")
    row = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert row == f"| method | fedit | fedit · {said} |"


def test_the_method_row_of_a_run_without_summary_method_is_read_from_its_config():
    """Runs written before summary.json had "method" (or unfinished: no summary) are named from config.yaml: the
    optimizer's η resolved by its default where config.yaml says null, μ also where an older config.yaml keeps it
    under train.proximal_mu; a summary's own method (η as the run resolved it) wins over its config."""
    from fedmoe.report.compare import Run, format_comparison

    def method_row(*runs):
        return next(line for line in format_comparison(list(runs)).splitlines() if line.startswith("| method |"))

    old = {"algorithm": {"name": "scaffold", "server_optimizer": {"name": "fedyogi", "lr": None, "beta1": 0.8,
                                                                   "convention": "flower"}},
           "train": {"proximal_mu": 0.1}, "federation": {"robust": {"rule": "median", "norm_bound": 2.0}}}
    finished = {"global": {}, "clients": [], "wall_s": 1.0, "algorithm": "scaffold"}
    assert method_row(Run("old", Path("old"), old, [], finished), Run("cut", Path("cut"), old, [], None)) == (
        "| method | " + " | ".join(["scaffold · server optimizer fedyogi (η = 0.01, β1 = 0.8, β2 = 0.99, τ = 0.001, "
                                    "Flower's convention) · FedProx μ = 0.1 · robust aggregation: median, each update's "
                                    "norm bounded to 2"] * 2) + " |")
    plain = {"algorithm": {"name": "fedit", "server_optimizer": {"name": "none", "lr": None},
                           "fedit": {"proximal_mu": 0.0}}}
    assert method_row(Run("fedit", Path("fedit"), plain, [], finished)) == "| method | fedit |"
    avgm = {"algorithm": {"name": "fedit", "server_optimizer": {"name": "fedavgm", "lr": 0.5}}}
    recorded = {**finished, "method": {"name": "fedit", "server_optimizer": {"name": "fedavgm", "lr": 0.7,
                                                                            "momentum": 0.9}, "proximal_mu": None}}
    assert method_row(Run("a", Path("a"), avgm, [], finished), Run("b", Path("b"), avgm, [], recorded)) == (
        "| method | fedit · server optimizer fedavgm (η = 0.5, momentum = 0.9) | fedit · server optimizer fedavgm "
        "(η = 0.7, momentum = 0.9) |")


def test_each_score_has_its_n_and_bytes_say_total_or_per_round(adam_runs, tmp_path):
    """The results table (fedmoe run's and report.md's) gives each ROUGE-L the number of test examples it is the mean
    over; its bytes are each client's total over the run (the sum of its train rows in metrics.jsonl), compare's are
    that total per round trained; the last row is the global model's, its summed cells marked Σ and said so."""
    from fedmoe.report import format_results_table, human_bytes
    from fedmoe.report.compare import BYTES_PER_ROUND

    cfg, summary, path = adam_runs["fedadam"]
    lines = format_results_table(summary, cfg.eval.flops_seq_len).splitlines()
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    assert head[4:9] == ["ROUGE-L", "n scored", "loss", "bytes up (total, all rounds)", "bytes down (total, all rounds)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]]
    train = [r for r in load_run(path).metrics if r["kind"] == "train"]
    for c, row in zip(summary["clients"], rows):
        assert c["n_scored"] == len(c["scores"]) == 1 and row[4] == f"{c['rouge_l']:.2f}" and row[5] == "1"
        assert c["bytes_up"] == sum(r["bytes_up"] for r in train if r["client"] == c["id"])
        assert row[7] == human_bytes(c["bytes_up"]) and row[8] == human_bytes(c["bytes_down"])
        assert c["rounds_trained"] == 2
    g = rows[2]
    assert g[0] == "global model" and g[3] == f"Σ {sum(c['n_train'] for c in summary['clients'])}"
    assert g[4] == f"{summary['global']['rouge_l']:.2f}" and g[5] == "2" == str(summary["global"]["n_scored"])
    assert g[7] == "Σ " + human_bytes(sum(c["bytes_up"] for c in summary["clients"]))
    assert "Σ marks a sum over the clients above (n_train, bytes); ROUGE-L, n scored and loss are the global model's own" \
        in lines[6]
    assert "\n".join(lines) in (path / "report.md").read_text()
    table, _ = compare_runs([path], tmp_path / "cmp")
    per_round = next(line for line in table.splitlines() if line.startswith(f"| {BYTES_PER_ROUND} |"))
    mean = sum(c["bytes_up"] / c["rounds_trained"] for c in summary["clients"]) / 2
    assert per_round == f"| {BYTES_PER_ROUND} | {mean / 1e6:.2f} MB |" and "total" in BYTES_PER_ROUND


def test_fedprox_is_named_for_every_method_that_honours_it():
    """flame, scaffold, fcmoe and the rank methods train with FedIT's algorithm.fedit.proximal_mu (Method.reads),
    but the method's description looked only in their own section: a FLAME run with μ = 50 was described, and
    compared, as plain FLAME."""
    from fedmoe.algorithms.registry import METHODS
    from fedmoe.report.method import method_info

    for name, method in METHODS.items():
        info = method_info({"algorithm": {"name": name, "fedit": {"proximal_mu": 0.5}}})
        honours = name == "fedit" or "fedit" in method.reads
        assert info["proximal_mu"] == (0.5 if honours else None), name
    assert {n for n, m in METHODS.items() if "fedit" in m.reads} >= {"flame", "scaffold", "fcmoe", "hetlora"}


def test_a_method_that_trains_no_global_model_shows_none_in_the_global_rows(runs, tmp_path):
    """local_only's global model is the initial one: its "final" global numbers were the zero-shot ones, shown as if
    trained. They are "–" with a note; the zero-shot value stays in brackets."""
    _, rd = run_federated(load_config(None, TINY + ["algorithm.name=local_only", f"output_dir={tmp_path}",
                                                    "name=local"]))
    table, _ = compare_runs([runs["fedit"][1], rd.path], tmp_path / "cmp")
    row = dict((line.split(" | ")[0].lstrip("| "), line.split(" | ")[1:]) for line in table.splitlines()[2:]
               if line.startswith("| "))
    assert row["global test loss (zero-shot)"][1].startswith("– ¹ (")
    assert not row["global test loss (zero-shot)"][0].startswith("–")
    assert "¹ local: the method trains no global model" in table


def test_changed_data_files_and_what_the_numbers_leave_out_are_said(runs, tmp_path):
    """Compare looked at the config's text only: the same data.source whose file's contents changed between two runs
    went unmentioned, and so did the clients a run's global numbers leave out, the clients scored at an earlier round
    and the client failures, which the sweep table shows."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(runs["fedit"][1], a)
    shutil.copytree(runs["fedit"][1], b)
    table, _ = compare_runs([a, b], tmp_path / "same")
    assert "Not like for like" not in table and "clients missing" not in table and "client failures" not in table
    fp = b / "checkpoints" / "data-fingerprint.json"
    got = json.loads(fp.read_text())
    files = got["data_fingerprint"]["sources"][0]["files"]
    name = next(iter(files))
    files[name] = [files[name][0], "0" * 64]  # the same file name, other contents
    fp.write_text(json.dumps(got))
    summary = json.loads((b / "summary.json").read_text())
    summary["global"]["clients_missing"] = [1]
    summary["failures"] = [{"round": 2, "client": 1, "stage": "evaluate", "error": "OutOfMemoryError"}]
    summary["clients"][1]["evaluated_round"] = 1
    (b / "summary.json").write_text(json.dumps(summary))
    table, _ = compare_runs([a, b], tmp_path / "changed")
    assert "Not like for like: these runs were scored on different test data or scoring (the data files' contents " \
           "(size and SHA-256): a | b)" in table
    assert "| clients missing from the global numbers (their evaluation failed) | – | 1 |" in table
    assert "| clients scored at an earlier round (their last evaluation failed) | – | 1 |" in table
    assert "| client failures (see each run's report) | 0 | 1 |" in table
