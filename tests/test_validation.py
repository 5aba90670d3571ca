"""eval.val_loss: the loss on each client's validation split (data.split's middle share, capped by
data.max_val_per_client), of each client's model and of the global model, whenever the test loss is measured.
Checked against a recomputation outside fedmoe's evaluator, against the token-weighted pooling by hand, for changing
no other number of a run, and for what a lying client may claim."""

import json
import math

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.federation import run_federated
from helpers import once_per_session

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.name=builtin:tiny-olmoe", "data.max_examples=200", "data.max_length=48", "data.partition.num_clients=2",
        "train.max_steps=2", "train.batch_size=2", "train.lr=0.05", "eval.max_examples=2", "eval.max_new_tokens=3",
        "data.max_test_per_client=3", "lora.rank=4", "federation.rounds=2"]
VAL = ["eval.val_loss=true", "data.max_val_per_client=4"]


def _rows(run_dir, kind):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same FedIT run with and without eval.val_loss (one pair for every worker)."""
    return once_per_session(tmp_path_factory, "validation-runs", _runs)


def _runs(root):
    out = {}
    for name, extra in (("val", VAL), ("plain", [])):
        cfg = load_config(None, TINY + extra + [f"output_dir={root}", f"name={name}"])
        summary, rd = run_federated(cfg, show_progress=False, log=lambda *a: None)
        out[name] = (cfg, summary, rd.path)
    return out


def _independent_loss(model, examples, pad_id) -> tuple[float, int]:
    """Mean next-token cross-entropy over the response tokens of ``examples``, one example at a time (no padding,
    no fedmoe evaluator): (loss, tokens)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"])
            logits = model(input_ids=ids).logits[0, :-1].double()
            target = labels[1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            tokens += int(keep.sum())
    return total / tokens, tokens


def test_the_validation_loss_is_each_clients_own_validation_examples(runs):
    from fedmoe.data import prepare_federated_data
    from fedmoe.data.tokenize import tokenize_examples
    from fedmoe.moe import MoEModel
    from fedmoe.moe.model import load_tokenizer

    cfg, summary, run_dir = runs["val"]
    data = prepare_federated_data(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    base = MoEModel.from_pretrained(cfg.model.name, seed=cfg.seed)  # the initial model: every LoRA B is zero
    zero_shot = {r["client"]: r for r in _rows(run_dir, "test") if r["round"] == 0}
    for c in data.clients:
        assert len(c.val) == 4  # data.max_val_per_client of the client's 10 validation examples
        assert not {id(x) for x in c.val} & {id(x) for x in c.train + c.test}
        loss, tokens = _independent_loss(base.model, tokenize_examples(tok, c.val, cfg.data.max_length),
                                         base.model.config.pad_token_id or 0)
        assert zero_shot[c.id]["val_tokens"] == tokens
        assert zero_shot[c.id]["val_loss"] == pytest.approx(loss, rel=1e-5)
        assert abs(zero_shot[c.id]["val_loss"] - zero_shot[c.id]["loss"]) > 1e-3  # not the test loss
    assert [c["n_val"] for c in summary["clients"]] == [4, 4]


def test_the_global_validation_loss_pools_the_clients_by_tokens(runs):
    _, summary, run_dir = runs["val"]
    rows = _rows(run_dir, "test")
    for rnd in (0, 1, 2):
        clients = [r for r in rows if r["round"] == rnd and r["client"] is not None]
        g = next(r for r in rows if r["round"] == rnd and r["client"] is None)
        assert len(clients) == 2 and clients[0]["val_tokens"] != clients[1]["val_tokens"]  # weights that matter
        by_hand = sum(r["val_loss"] * r["val_tokens"] for r in clients) / sum(r["val_tokens"] for r in clients)
        assert g["val_loss"] == pytest.approx(by_hand, rel=1e-12) and g["val_tokens"] == sum(r["val_tokens"] for r in clients)
    final = {r["client"]: r for r in rows if r["round"] == 2}
    assert [c["val_loss"] for c in summary["clients"]] == [final[0]["val_loss"], final[1]["val_loss"]]
    assert summary["global"]["val_loss"] == final[None]["val_loss"]
    assert summary["zero_shot"]["val_loss"] == next(r["val_loss"] for r in rows if r["round"] == 0 and r["client"] is None)
    by_round = {r["round"]: r["val_loss"] for r in rows if r["client"] is None}
    best = min(by_round, key=by_round.get)
    assert summary["global"]["val_loss_lowest"] == {"round": best, "val_loss": by_round[best], "rounds_measured": 3}


def test_measuring_it_changes_no_other_number(runs):
    """The validation examples only add an evaluation: every training and test number, and the model, are those of
    the run without it; a run without it has no validation key anywhere."""
    from fedmoe.federation.checkpoint import load_checkpoint

    _, with_val, val_dir = runs["val"]
    _, plain, plain_dir = runs["plain"]
    drop = ("val_loss", "val_tokens", "train_s", "eval_s", "seconds", "wall_s", "aggregate_s", "clients_s", "overhead_s",
            "tokens_per_s")
    for kind in ("train", "test", "server"):
        a = [{k: v for k, v in r.items() if k not in drop} for r in _rows(val_dir, kind)]
        b = [{k: v for k, v in r.items() if k not in drop} for r in _rows(plain_dir, kind)]
        assert a == b, kind
    assert not any("val_loss" in r for r in _rows(plain_dir, "test"))
    assert "val_loss" not in plain["global"] and "n_val" not in plain["clients"][0]
    a = load_checkpoint(val_dir, log=lambda *x: None).state["global_state"]
    b = load_checkpoint(plain_dir, log=lambda *x: None).state["global_state"]
    assert all(torch.equal(a[n], b[n]) for n in b)
    assert [c["loss"] for c in with_val["clients"]] == [c["loss"] for c in plain["clients"]]


def test_report_sweep_and_compare_show_it(runs, tmp_path):
    from fedmoe.federation.sweep import format_sweep_report
    from fedmoe.report.compare import format_comparison, load_run

    _, summary, run_dir = runs["val"]
    _, plain, plain_dir = runs["plain"]
    low = summary["global"]["val_loss_lowest"]
    report = (run_dir / "report.md").read_text()
    assert f"validation loss {summary['global']['val_loss']:.4f}" in report
    assert f"its lowest, {low['val_loss']:.4f}, at round {low['round']}" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in format_sweep_report("x.yaml", [("v", summary), ("p", plain)]).splitlines() if line.startswith("| ")}
    assert rows["global validation loss"] == [f"{summary['global']['val_loss']:.4f}", "–"]
    assert rows["lowest global validation loss, at round"] == [f"{low['val_loss']:.4f} at {low['round']}", "–"]
    table = format_comparison([load_run(run_dir), load_run(plain_dir)])
    row = next(line for line in table.splitlines() if line.startswith("| lowest global validation loss"))
    assert [c.strip() for c in row.split("|")[2:-1]] == [f"{low['val_loss']:.4f} at {low['round']}", "–"]
    assert "Not like for like" not in table  # the validation settings do not touch the test data


def test_a_validation_loss_needs_a_validation_split():
    with pytest.raises(ValueError, match=r"eval.val_loss .* data.split = \[0.9, 0.0, 0.1\] holds none"):
        load_config(None, ["eval.val_loss=true", "data.split=[0.9,0,0.1]"])
    load_config(None, ["data.split=[0.9,0,0.1]"])  # without it, no validation share is needed


def test_no_validation_examples_is_no_loss_and_pools_as_nothing():
    """A client whose validation split is empty reports no loss over 0 tokens (never 0 or a perplexity of 1), and
    the pooled loss is the other clients'; all empty: None."""
    from fedmoe.federation.evaluation import pooled

    a = {"loss": 2.0, "tokens": 10, "val_loss": 3.0, "val_tokens": 30}
    b = {"loss": 4.0, "tokens": 30, "val_loss": 1.0, "val_tokens": 10}
    empty = {"loss": 2.0, "tokens": 10, "val_loss": None, "val_tokens": 0}
    assert pooled([a, b])["val_loss"] == pytest.approx((3.0 * 30 + 1.0 * 10) / 40)  # not the plain mean, 2.0
    assert pooled([a, empty])["val_loss"] == 3.0 and pooled([a, empty])["val_tokens"] == 30
    assert pooled([empty, empty])["val_loss"] is None
    assert "val_loss" not in pooled([{"loss": 2.0, "tokens": 10}])


def test_an_evaluator_with_no_validation_examples():
    from types import SimpleNamespace

    from fedmoe.federation.evaluation import ModelEvaluator

    ev = ModelEvaluator.__new__(ModelEvaluator)
    ev._loss = lambda examples: {"loss": None, "perplexity": None, "tokens": 0} if not examples else pytest.fail()
    assert ev._val([SimpleNamespace(val=[]), SimpleNamespace(val=None)]) == {"val_loss": None, "val_tokens": 0}
    assert ev._val([SimpleNamespace(val=None)]) == {}  # not measured: no key at all


@pytest.mark.parametrize("bad, why", [
    ({"val_loss": -0.5, "val_tokens": 10}, "validation loss of -0.5"),
    ({"val_loss": float("nan"), "val_tokens": 10}, "non-finite validation loss"),
    ({"val_loss": 2.0, "val_tokens": 0}, "validation loss of 2.0 over 0 tokens"),
    ({"val_loss": None, "val_tokens": 5}, "no validation loss over 5"),
    ({"val_loss": 2.0}, "validation tokens = None"),
    ({"val_loss": 2.0, "val_tokens": 4 * 48 + 1}, "193 validation tokens, more than the 192"),
    ({"val_loss": 2.0, "val_tokens": True}, "validation tokens = True"),
])
def test_a_lying_clients_validation_loss_is_left_out(bad, why):
    """What a client claims of its validation loss must be possible, as its test loss: a cross-entropy over at most
    the tokens its declared validation examples hold (n_val x data.max_length)."""
    from fedmoe.federation.evaluation import screened

    good = {"loss": 2.0, "tokens": 20, "val_loss": 2.5, "val_tokens": 40}
    declared = {0: {"n_test": 3, "n_generated": 2, "n_val": 4}, 1: {"n_test": 3, "n_generated": 2, "n_val": 4}}
    kept, left = screened({0: good, 1: {"loss": 2.0, "tokens": 20, **bad}}, declared, max_length=48)
    assert list(kept) == [0] and why in left[1], left
    assert math.isclose(kept[0]["val_loss"], 2.5)


def test_validation_numbers_a_run_did_not_ask_for_are_refused():
    """A client that declared no validation set (the run measures none) cannot put validation rows into it."""
    from fedmoe.federation.evaluation import screened

    declared = {0: {"n_test": 3, "n_generated": 2}, 1: {"n_test": 3, "n_generated": 2}}
    plain = {"loss": 2.0, "tokens": 20}
    kept, left = screened({0: plain, 1: {**plain, "val_loss": 0.1, "val_tokens": 5}}, declared, max_length=48)
    assert list(kept) == [0] and "5 validation tokens, more than the 0" in left[1]
