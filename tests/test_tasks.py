"""Label tasks and the situations of the evidence runs: Dolly category prediction and a user file with a
label field, the label set, the choice prompt, the shards partition, concept shift (same inputs,
permuted labels only where configured, deterministic), the shared held-out set and the pooled
(centralised) training sets; and the evaluator's accuracy and confusion matrix against a recount."""

import json
from collections import Counter

import pytest
import torch

from fedmoe.config import ConfigError, DataConfig, load_config
from fedmoe.data import DataError, load_examples, partition, prepare_federated_data
from fedmoe.data.tasks import as_choice, concept_shift, label_set

DOLLY_LABELS = ["brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                "information_extraction", "open_qa", "summarization"]


def _cfg(**kw) -> DataConfig:
    base = {"source": "dolly", "field_map": {"label": "category"}, "max_examples": 1200,
            "partition": {"scheme": "iid", "num_clients": 4}}
    base.update(kw)
    return DataConfig.model_validate(base)


@pytest.fixture(scope="module")
def dolly_labelled():
    return load_examples("dolly", field_map={"label": "category"}).examples


def test_dolly_category_prediction(dolly_labelled):
    plain = load_examples("dolly").examples
    assert len(dolly_labelled) == len(plain) == 15011
    for a, b in zip(dolly_labelled[:200], plain[:200]):
        assert a.label == a.output == a.category == b.category
        assert (a.instruction, a.input) == (b.instruction, b.input)
    labels = label_set(dolly_labelled)
    assert labels == DOLLY_LABELS
    ex = as_choice(dolly_labelled[:3], labels, "Pick one of: {labels}.", 40)
    for new, old in zip(ex, dolly_labelled[:3]):
        assert new.instruction == "Pick one of: " + ", ".join(DOLLY_LABELS) + "."
        assert new.output == old.label and new.options == tuple(DOLLY_LABELS)
        assert new.input.startswith(old.instruction.strip()[:20])
        assert len(new.input) <= 40 + len(" ...")


def test_user_label_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"review {i}", "stars": "good" if i % 3 else "bad"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = load_examples(str(path), field_map={"instruction": "text", "label": "stars"}).examples
    assert [e.label for e in exs] == [r["stars"] for r in rows] and all(e.output == e.label for e in exs)
    assert label_set(exs) == ["bad", "good"]
    with pytest.raises(DataError, match=r"data.labels does not list: \['good'\]"):
        label_set(exs, ["bad", "neutral"])
    path.write_text(json.dumps({"text": "x", "stars": "good"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"line 2: has no field 'stars' \(needed for label"):
        load_examples(str(path), field_map={"instruction": "text", "label": "stars"})


def test_label_set_is_fixed_and_every_example_gets_it():
    data = prepare_federated_data(_cfg(), seed=0)
    assert data.labels == DOLLY_LABELS
    for c in data.clients:
        for ex in c.train + c.test:
            assert ex.options == tuple(DOLLY_LABELS) and ex.output in DOLLY_LABELS and ex.category == ex.output


def test_choice_config_needs_a_label_or_options():
    with pytest.raises(ConfigError, match="eval.task: choice scores answer options"):
        load_config(None, ["eval.task=choice"])
    with pytest.raises(ConfigError, match="data.concept_shift permutes labels"):
        load_config(None, ["data.concept_shift={groups: 2}"])
    cfg = load_config(None, ["eval.task=choice", "data.field_map={label: category}"])
    assert cfg.eval.task == "choice"


def test_shards_partition(dolly_labelled):
    exs = dolly_labelled[::7][:2000]
    parts = partition(exs, "shards", 10, seed=3, shards_per_client=2)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(2000))
    assert parts == partition(exs, "shards", 10, seed=3, shards_per_client=2)
    assert parts != partition(exs, "shards", 10, seed=4, shards_per_client=2)
    per_client = [len({exs[i].category for i in p}) for p in parts]
    # 20 shards of 100 cut from the label-sorted order: a shard holds one label, or two where it straddles one of
    # the 7 boundaries between the 8 labels, so the clients hold at most 20 + 7 (client, label) pairs
    assert sum(per_client) <= 20 + 7 and max(per_client) <= 4 and min(per_client) >= 1
    iid = [len({exs[i].category for i in p}) for p in partition(exs, "iid", 10, seed=3)]
    assert min(iid) == 8


def test_concept_shift_same_inputs_permuted_labels_only_where_configured():
    plain = prepare_federated_data(_cfg(), seed=1)
    shifted = prepare_federated_data(_cfg(concept_shift={"groups": 2, "labels": ["open_qa", "general_qa"]}), seed=1)
    assert shifted.groups == [0, 1, 0, 1]
    assert shifted.label_maps[1]["open_qa"] == "general_qa" and shifted.label_maps[1]["general_qa"] == "open_qa"
    changed = 0
    for a, b in zip(plain.clients, shifted.clients):
        assert len(a.train) == len(b.train) and len(a.test) == len(b.test)
        for x, y in zip(a.train + a.test, b.train + b.test):
            assert (x.instruction, x.input) == (y.instruction, y.input)  # the same inputs
            if shifted.groups[a.id] == 0 or x.label not in ("open_qa", "general_qa"):
                assert y.output == x.output
            else:
                assert y.output == {"open_qa": "general_qa", "general_qa": "open_qa"}[x.output]
                assert y.category == y.label == y.output
                changed += 1
    assert changed > 50
    again = prepare_federated_data(_cfg(concept_shift={"groups": 2, "labels": ["open_qa", "general_qa"]}), seed=1)
    assert [c.train for c in again.clients] == [c.train for c in shifted.clients]


def test_concept_shift_drawn_labels_and_group_sizes():
    from fedmoe.config import ConceptShiftConfig

    cs = ConceptShiftConfig(groups=[3, 1], num_labels=3)
    groups, maps = concept_shift(cs, DOLLY_LABELS, 4, seed=5)
    assert groups == [0, 0, 0, 1]
    moved = {a: b for a, b in maps[1].items() if a != b}
    assert len(moved) == 3 and sorted(moved) == sorted(moved.values())  # a derangement of 3 labels
    assert all(a == b for a, b in maps[0].items())
    assert concept_shift(cs, DOLLY_LABELS, 4, seed=5) == (groups, maps)
    drawn = {tuple(sorted(a for a, b in concept_shift(cs, DOLLY_LABELS, 4, seed=s)[1][1].items() if a != b))
             for s in range(6)}
    assert len(drawn) > 1  # the seed chooses the labels
    with pytest.raises(DataError, match="do not sum"):
        concept_shift(ConceptShiftConfig(groups=[2, 1]), DOLLY_LABELS, 4, seed=0)


def test_heldout_is_balanced_disjoint_and_shared():
    data = prepare_federated_data(_cfg(heldout=80), seed=2)
    counts = Counter(ex.label for ex in data.heldout)
    assert sum(counts.values()) == 80 and set(counts) == set(DOLLY_LABELS) and set(counts.values()) == {10}
    held = {(ex.instruction, ex.input) for ex in data.heldout}
    client = {(ex.instruction, ex.input) for c in data.clients for ex in c.train + c.val + c.test}
    assert not held & client
    assert sum(len(c.train) + len(c.val) + len(c.test) for c in data.clients) == 1200 - 80


def test_pool_train_gives_every_client_every_training_example():
    plain = prepare_federated_data(_cfg(), seed=0)
    pooled = prepare_federated_data(_cfg(pool_train=True), seed=0)
    union = [ex for c in plain.clients for ex in c.train]
    for a, b in zip(plain.clients, pooled.clients):
        assert b.train == union and b.test == a.test


def test_accuracy_and_confusion_match_a_recount():
    """The evaluator's accuracy and confusion matrix equal a recount from option_logprobs' plain path."""
    from fedmoe.config import RunConfig
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.federation.clients import client_set
    from fedmoe.federation.evaluation import ModelEvaluator, pooled
    from fedmoe.moe.model import MoEModel, load_tokenizer

    cfg = RunConfig.model_validate({"data": {"field_map": {"label": "category"}, "max_length": 96},
                                    "eval": {"task": "choice"}})
    data = prepare_federated_data(_cfg(max_examples=400, max_test_per_client=12), seed=0)
    mm, tok = MoEModel.from_pretrained("builtin:tiny-moe"), load_tokenizer("builtin:tiny-moe")
    sets = [client_set(c, tok, 96, None, data.labels) for c in data.clients[:2]]
    ev = ModelEvaluator(cfg, mm, tok, sets[0].pad_id)
    results = [ev.evaluate_sets([s], True, False) for s in sets]
    for s, r in zip(sets, results):
        scores = option_logprobs(mm, s.test_prompts, s.test_options, reference=True)
        picks = [int(torch.argmax(sc / torch.tensor([len(o) for o in opts], dtype=torch.float64)))
                 for sc, opts in zip(scores, s.test_options)]
        right = [p == a for p, a in zip(picks, s.test_answers)]
        assert r["accuracy"] == pytest.approx(100 * sum(right) / len(right))
        assert r["scores"] == [100.0 * x for x in right]
        m = [[0] * 8 for _ in range(8)]
        for a, p in zip(s.test_answers, picks):
            m[a][p] += 1
        assert r["confusion"] == m and r["labels"] == DOLLY_LABELS
    both = pooled(results)
    n = [len(s.test_answers) for s in sets]
    assert both["accuracy"] == pytest.approx((results[0]["accuracy"] * n[0] + results[1]["accuracy"] * n[1]) / sum(n))
    assert both["confusion"] == (torch.tensor(results[0]["confusion"]) + torch.tensor(results[1]["confusion"])).tolist()


def test_per_example_options_file(tmp_path):
    """MMLU-like data: each row has its own options and the answer is one of them."""
    from fedmoe.federation.clients import client_set
    from fedmoe.moe.model import load_tokenizer

    path = tmp_path / "quiz.jsonl"
    rows = [{"instruction": f"2 + {i} = ?", "output": str(2 + i), "options": [str(2 + i), str(3 + i), "no"]}
            for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = load_examples(str(path), field_map={"options": "options"}).examples
    assert all(e.options == tuple(r["options"]) and e.output == r["output"] for e, r in zip(exs, rows))
    cfg = DataConfig.model_validate({"source": str(path), "field_map": {"options": "options"},
                                     "partition": {"scheme": "iid", "num_clients": 1}, "split": [0.5, 0.0, 0.5]})
    data = prepare_federated_data(cfg, seed=0)
    tok = load_tokenizer("builtin:tiny-moe")
    s = client_set(data.clients[0], tok, 64, None, data.labels)
    assert data.labels is None and s.labels is None
    assert s.test_answers == [ex.options.index(ex.output) for ex in data.clients[0].test] == [0] * 6
    assert all(len(o) == 3 and all(ids[-1] == tok.eos_token_id for ids in o) for o in s.test_options)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "7", "options": ["1", "2"]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: the output '7' .* is not one of its options"):
        load_examples(str(bad), field_map={"options": "options"})


@pytest.mark.parametrize("max_length, max_generated", [(256, None), (112, 8)])
def test_choice_round_loss_from_the_option_scores_equals_the_plain_loss(max_length, max_generated):
    """In a round with answers, the test loss is taken from the right options' scores wherever the test
    example is its prompt followed by its right option, and run through the model otherwise: with
    max_length 112 some prompts are truncated (differently for the loss and for the prompt), and with 8
    scored examples of 12 the rest go the plain way. Every case equals evaluate_loss over the test set.
    The held-out loss likewise."""
    from fedmoe.config import RunConfig
    from fedmoe.federation.clients import client_set, heldout_set
    from fedmoe.federation.evaluation import ModelEvaluator
    from fedmoe.moe.model import MoEModel, load_tokenizer

    cfg = RunConfig.model_validate({"data": {"field_map": {"label": "category"}, "max_length": max_length},
                                    "eval": {"task": "choice"}})
    data = prepare_federated_data(_cfg(max_examples=400, max_test_per_client=12, heldout=16), seed=0)
    mm, tok = MoEModel.from_pretrained("builtin:tiny-moe"), load_tokenizer("builtin:tiny-moe")
    mm.add_attention_lora(4, 8.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sets = [client_set(c, tok, max_length, max_generated, data.labels) for c in data.clients[:2]]
    held = heldout_set(data, tok, max_length)
    ev = ModelEvaluator(cfg, mm, tok, sets[0].pad_id, heldout=held)
    both = ev.evaluate_sets(sets, True, True)
    plain = ev._loss([t for s in sets for t in s.test])
    assert both["tokens"] == plain["tokens"]
    assert both["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert both["heldout_loss"] == pytest.approx(ev._loss(held.test)["loss"], rel=1e-6)
    taken = sum(ex["input_ids"] == p + o[a] for s in sets
                for ex, p, o, a in zip(s.test, s.test_prompts, s.test_options, s.test_answers))
    if max_length == 256:
        assert taken == sum(len(s.test) for s in sets)  # nothing run twice
    else:
        assert 0 < taken < sum(len(s.test) for s in sets)
    assert "option_logprobs" not in both
