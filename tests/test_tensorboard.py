"""report.tensorboard: every number of metrics.jsonl as a TensorBoard scalar, read back with
TensorBoard's own reader; a resumed run's redone rounds appear once."""

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fedmoe.report.tensorboard import scalars, write_tensorboard  # noqa: E402


def _read(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


ROWS = [
    {"round": 0, "client": None, "kind": "test", "loss": 4.5, "rouge_l": None,
     "rouge_l_by_category": {"open_qa": 11.25, "summarization": 9.5}},
    {"round": 1, "client": 3, "kind": "train", "loss": 4.25, "steps": 40, "tokens_per_s": 1234.5},
    {"round": 1, "client": None, "kind": "server", "aggregate_s": 0.5, "clients": [0, 3],
     "mean_cosine_by_layer": [0.25, None, -0.5], "krum_selected": [3], "secagg_clients": [0, 3],
     "secagg_bytes_up": {"0": 100, "3": 200}, "weights": [0.25, 0.75]},
    {"round": 1, "client": 2, "kind": "failure", "stage": "train", "error": "gone"},
]


def test_every_number_becomes_a_scalar_with_its_round(tmp_path):
    n = write_tensorboard(ROWS, tmp_path)
    got = _read(tmp_path / "tensorboard")
    want = {
        "test/loss/global": [(0, 4.5)],
        "test/rouge_l_by_category/global/open_qa": [(0, 11.25)],
        "test/rouge_l_by_category/global/summarization": [(0, 9.5)],
        "train/loss/client_3": [(1, 4.25)], "train/steps/client_3": [(1, 40.0)],
        "train/tokens_per_s/client_3": [(1, 1234.5)],
        "server/aggregate_s/global": [(1, 0.5)],
        "server/mean_cosine_by_layer/global/layer_0": [(1, 0.25)],
        "server/mean_cosine_by_layer/global/layer_2": [(1, -0.5)],
        # bytes by client under the client's id, a list that is not per layer by its index; client ids make none
        "server/secagg_bytes_up/global/0": [(1, 100.0)], "server/secagg_bytes_up/global/3": [(1, 200.0)],
        "server/weights/global/0": [(1, 0.25)], "server/weights/global/1": [(1, 0.75)],
    }
    assert got == want and n == len(want)  # None (not measured) and text are not scalars


def test_a_run_writes_them_and_a_resumed_run_shows_each_round_once(tmp_path):
    import json

    from fedmoe.config import load_config
    from fedmoe.federation import resume_federated, run_federated

    sets = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32",
            "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2", "eval.rouge=false",
            "data.max_test_per_client=2", "lora.rank=2", "federation.rounds=2", "report.tensorboard=true",
            f"output_dir={tmp_path}"]
    _, rd = run_federated(load_config(None, sets + ["name=cut"]), stop_after_round=1)
    assert [s for s, _ in _read(rd.path / "tensorboard")["test/loss/global"]] == [0, 1]  # after round 1 already
    _, rd = resume_federated(rd.path)
    rows = [json.loads(x) for x in rd.metrics_path.read_text().splitlines()]
    want = [(r["round"], pytest.approx(r["loss"])) for r in rows if r["kind"] == "test" and r["client"] is None]
    got = _read(rd.path / "tensorboard")
    assert got["test/loss/global"] == want and [s for s, _ in want] == [0, 1, 2]
    assert len(got) == len({t for t, _, _ in scalars(rows)})
