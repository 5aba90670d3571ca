"""Non-finite values: a client whose loss or update is NaN/inf is left out of the round (and reported);
a round with no usable update, or whose model diverged, is not applied and the run stops with the last
good checkpoint intact; NaN is written as "NaN", never as null, and read back as a number."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.federation.clients import ClientNode
from fedmoe.federation.runtime import RoundFailed
from fedmoe.federation.summary import EXIT_NONFINITE, loss_verdict, model_health
from fedmoe.report import RunDir, write_report
from fedmoe.rundir import dumps, loads, to_jsonable

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "train.max_steps=1",
        "train.batch_size=2", "eval.rouge=false", "eval.batch_size=8", "data.max_test_per_client=4", "lora.rank=2"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *extra])


def _checkpoint(rd):
    return torch.load(rd / "checkpoints" / "state.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------- JSON
def test_nan_and_infinities_round_trip_as_strings_through_metrics_jsonl(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.log_metrics({"round": 1, "client": 0, "kind": "train", "loss": math.nan, "up": math.inf,
                    "down": -math.inf, "t": torch.tensor(float("nan")), "per_layer": [1.0, math.nan],
                    "error": "NaN"})
    line = rd.metrics_path.read_text()
    assert '"loss": "NaN"' in line and '"up": "Infinity"' in line and '"down": "-Infinity"' in line
    assert '"t": "NaN"' in line and '"per_layer": [1.0, "NaN"]' in line and "null" not in line
    [row] = rd.read_metrics()
    assert math.isnan(row["loss"]) and row["up"] == math.inf and row["down"] == -math.inf
    assert math.isnan(row["t"]) and row["per_layer"][0] == 1.0 and math.isnan(row["per_layer"][1])
    assert row["error"] == "NaN"  # text stays text
    # summary.json: the same, and a generated answer "NaN" is not a number
    summary = {"global": {"loss": math.nan}, "clients": [{"loss": math.inf, "examples": [{"prediction": "NaN"}]}]}
    rd.write_summary(summary)
    back = rd.read_summary()
    assert math.isnan(back["global"]["loss"]) and back["clients"][0]["loss"] == math.inf
    assert back["clients"][0]["examples"][0]["prediction"] == "NaN"
    assert to_jsonable(math.nan) == "NaN" and loads(dumps({"x": -math.inf})) == {"x": -math.inf}


def test_results_tables_and_the_report_read_non_finite_numbers(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "results_tables", Path(__file__).parent.parent / "benchmarks" / "results_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    rd = RunDir(tmp_path / "name=flame,alpha=0.5")
    rd.write_summary({"clients": [{"rouge_l": math.nan, "loss": 2.0}, {"rouge_l": 0.5, "loss": math.inf}],
                      "global": {"loss": math.nan}})
    [(name, s)] = tables.load(tmp_path).items()
    assert math.isnan(tables.client_mean(s, "rouge_l")) and tables.client_mean(s, "loss") == math.inf
    assert tables.fmt(s["global"]["loss"]) == "nan"
    rd.log_metrics({"round": 1, "client": None, "kind": "test", "loss": math.nan})
    assert tables.rounds_to(rd.path, 1.0) == "not reached"
    # the report: NaN in tables, not drawn in the curve
    summary = {"algorithm": "x", "model": "m", "rounds": 1, "clients": [{"id": 0, "loss": math.nan}],
               "global": {"loss": math.nan},
               "health": model_health(100, {"loss": math.nan}, {"loss": 4.6}, {})}
    write_report(rd, summary, rd.read_metrics())
    text = rd.report_path.read_text()
    assert "| global model | – | – | – | – | – | nan |" in text and "non-finite" in text


def test_a_loss_at_ln_v_is_flagged_as_uniform_output():
    ln_v = math.log(50304)
    assert loss_verdict(ln_v * 1.019, ln_v) == "uniform output" and loss_verdict(ln_v * 0.981, ln_v) == "uniform output"
    assert loss_verdict(ln_v * 0.97, ln_v) is None and loss_verdict(None, ln_v) is None
    assert loss_verdict(ln_v * 1.5, ln_v) == "worse than uniform output"
    assert loss_verdict(math.nan, ln_v) == "non-finite"


# ---------------------------------------------------------------------------- real runs
def test_one_nan_element_in_one_reply_is_left_out_and_reported(tmp_path):
    """Client 1's reply gets one NaN element: the global model is FedIT's average of clients 0 and 2 only
    (by hand), finite; a failure row, the report and the summary say so."""
    cfg = _cfg(tmp_path, "nan", "data.partition.num_clients=3", "federation.rounds=1")
    seen = {}

    def observe(kind, cid, msg):
        if kind != "reply":
            return
        seen[cid] = ({n: t.clone() for n, t in msg.tensors.items()}, msg.scalars["n_train"])
        if cid == 1:
            name = next(iter(msg.tensors))
            poisoned = msg.tensors[name].clone()
            poisoned.view(-1)[3] = math.nan
            msg.tensors[name] = poisoned

    summary, rd = run_federated(cfg, observe=observe, log=lambda *a: None)
    ck = _checkpoint(rd.path)
    assert ck["round"] == 1
    (t0, n0), (t2, n2) = seen[0], seen[2]
    for name, g in ck["global_state"].items():
        by_hand = (n0 * t0[name].double() + n2 * t2[name].double()) / (n0 + n2)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), by_hand, rtol=1e-6, atol=1e-7)
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "non-finite")]
    assert "1 of" in summary["failures"][0]["error"] and "left out" in summary["failures"][0]["error"]
    rows = rd.read_metrics()
    assert [r for r in rows if r["kind"] == "failure"][0]["stage"] == "non-finite"
    [server] = [r for r in rows if r["kind"] == "server"]
    assert server["clients"] == [0, 2]
    assert [c["rounds_trained"] for c in summary["clients"]] == [1, 0, 1]
    # its bytes were sent: counted, with the reply they came in, so that bytes per round stays per reply (before,
    # client 1's uplink was divided by its 0 aggregated rounds and left out of the mean)
    assert [c["replies_received"] for c in summary["clients"]] == [1, 1, 1]
    assert summary["clients"][1]["bytes_up"] == summary["clients"][0]["bytes_up"] > 0
    from fedmoe.report.compare import bytes_per_round

    assert bytes_per_round(summary) == f"{summary['clients'][0]['bytes_up'] / 1e6:.2f} MB"
    report = rd.report_path.read_text()
    assert "## Failures" in report and "| 1 | 1 | non-finite |" in report and "status 3" in report
    # the built-in tiny OLMoE has random weights: its test loss is that of a uniform output, flagged
    health = json.loads(rd.summary_path.read_text())["health"]
    assert health["uniform_loss"] == pytest.approx(math.log(50304))
    assert {"model": "global", "verdict": "uniform output"}.items() <= health["flagged"][0].items()
    assert "## Warning: models that predict nothing" in report


def test_every_update_non_finite_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "allnan", "data.partition.num_clients=2", "federation.rounds=2", "eval.zero_shot=false")
    sent = {}

    def observe(kind, cid, msg):
        if kind == "downlink":
            sent[msg.header["round"]] = {n: t.clone() for n, t in msg.tensors.items()}
        if kind == "reply" and msg.header["round"] == 2:
            name = next(iter(msg.tensors))
            msg.tensors[name] = torch.full_like(msg.tensors[name], math.inf)

    with pytest.raises(RoundFailed, match=r"round 2: 2 of 2 sampled clients sent non-finite.*not applied.*"
                                          r"checkpoint of round 1 .* is intact.*train.lr"):
        run_federated(cfg, observe=observe, log=lambda *a: None)
    ck = _checkpoint(tmp_path / "allnan")
    assert ck["round"] == 1
    for name, t in ck["global_state"].items():  # the state round 2 started from
        assert torch.equal(t, sent[2][name])
    assert not (tmp_path / "allnan" / "summary.json").exists()


def test_a_learning_rate_of_1e30_stops_with_a_clear_error_and_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "lr", "data.partition.num_clients=2", "federation.rounds=3", "train.lr=1e30",
               "train.grad_clip=null")
    sent = {}

    def observe(kind, cid, msg):
        if kind == "downlink":
            sent[msg.header["round"]] = {n: t.clone() for n, t in msg.tensors.items()}

    with pytest.raises(RoundFailed, match=r"diverged.*not saved.*checkpoint of round 0 .* intact.*train.lr.*"
                                          r"--set name=\.\.\., or replace it with --overwrite"):
        run_federated(cfg, observe=observe, log=lambda *a: None)
    ck = _checkpoint(tmp_path / "lr")
    assert ck["round"] == 0  # the zero-shot round: the initial model, as round 1 received it
    for name, t in ck["global_state"].items():
        assert torch.isfinite(t).all() and torch.equal(t, sent[1][name])
    rows = RunDir(tmp_path / "lr").read_metrics()
    assert any(r["kind"] == "test" and r["round"] == 1 and math.isnan(r["loss"]) for r in rows)


def _poison_client_0(monkeypatch):
    """fedmoe's own client, with client 0 replying one infinite value."""
    train = ClientNode.train

    def poisoned(self, *args, **kwargs):
        reply, report = train(self, *args, **kwargs)
        if self.id == 0:
            name = next(iter(reply.tensors))
            reply.tensors[name] = reply.tensors[name].clone()
            reply.tensors[name].view(-1)[0] = math.inf
        return reply, report

    monkeypatch.setattr(ClientNode, "train", poisoned)


def test_fedmoe_run_exits_3_when_an_update_was_left_out(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedmoe.cli import app

    _poison_client_0(monkeypatch)
    args = TINY + ["data.partition.num_clients=2", "federation.rounds=1", "eval.zero_shot=false",
                   f"output_dir={tmp_path}", "name=cli"]
    r = CliRunner().invoke(app, ["run", "--quiet", *[x for a in args for x in ("--set", a)]])
    assert r.exit_code == EXIT_NONFINITE == 3, r.output
    out = " ".join(r.output.split())  # rich wraps long lines
    assert "non-finite" in out and "client 0 in round 1" in out and "exit status 3" in out
    assert (tmp_path / "cli" / "summary.json").is_file()


def test_a_sweep_whose_points_left_updates_out_exits_3(tmp_path, monkeypatch):
    """A sweep exited 0 and its table said nothing when its points left non-finite updates out; each point's run
    alone exits 3."""
    import yaml
    from typer.testing import CliRunner

    from fedmoe.cli import app

    _poison_client_0(monkeypatch)
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump({"name": "sw", "output_dir": str(tmp_path), "sweep": {"lora.rank": [2, 4]}}))
    args = [a for a in TINY if not a.startswith("lora.rank")] + ["data.partition.num_clients=2", "federation.rounds=1",
                                                                  "eval.zero_shot=false"]
    r = CliRunner().invoke(app, ["run", str(path), "--quiet", *[x for a in args for x in ("--set", a)]])
    assert r.exit_code == EXIT_NONFINITE, r.output
    out = " ".join(r.output.split())
    assert "points rank=2, rank=4 left non-finite client updates out" in out and "exit status 3" in out
    assert "| client failures (of them non-finite updates left out) | 1 (1) | 1 (1) |" in r.output
