

import gzip  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedmoe.config import DataConfig, PartitionConfig  # noqa: E402
from fedmoe.data import (  # noqa: E402
    IGNORE_INDEX,
    DataError,
    Example,
    category_histogram,
    collate_sft,
    format_histogram_table,
    format_prompt,
    load_examples,
    partition,
    prepare_federated_data,
    split_client,
    split_sizes,
    tokenize_example,
    tokenize_examples,
    tokenize_prompt,
    truncation_lengths,
)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "src/fedmoe/assets/tokenizers/olmoe"

DOLLY_COUNTS = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


@pytest.fixture(scope="module")
def dolly():
    return load_examples("dolly").examples


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(i, **kw):
    r = {"instruction": f"do {i}", "input": "", "output": f"done {i}"}
    r.update(kw)
    return json.dumps(r)


# ----------------------------------------------------------------------------------------------
# sources


def test_dolly_loads_exact_counts(dolly):
    res = load_examples("dolly")
    assert res.skipped == 0 and res.skipped_reasons == {}
    assert len(dolly) == 15011
    assert dict(Counter(ex.category for ex in dolly)) == DOLLY_COUNTS
    assert {ex.source for ex in dolly} == {"dolly"}
    # context -> input: 4467 Dolly rows have a non-blank context
    assert sum(bool(ex.input.strip()) for ex in dolly) == 4467
    assert all(ex.output.strip() and ex.instruction.strip() for ex in dolly)
    assert load_examples("builtin:dolly").examples == dolly


def test_jsonl_bad_line_error_names_file_and_line(tmp_path):
    p = _write_jsonl(tmp_path / "mydata.jsonl", [_row(1), _row(2), '{"instruction": "x", "output": ', _row(4)])
    with pytest.raises(DataError) as e:
        load_examples(str(p))
    msg = str(e.value)
    assert "mydata.jsonl" in msg and "line 3" in msg and "not valid JSON" in msg
    assert "on_bad_row: skip" in msg


def test_missing_field_error_names_field(tmp_path):
    p = _write_jsonl(tmp_path / "resp.jsonl", [_row(1), json.dumps({"instruction": "a", "response": "b"})])
    with pytest.raises(DataError) as e:
        load_examples(str(p))
    msg = str(e.value)
    assert "resp.jsonl" in msg and "line 2" in msg and "'output'" in msg
    assert "field_map" in msg and "response" in msg  # hint at the field that is there


def test_json_list_error_names_record(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}]))
    with pytest.raises(DataError) as e:
        load_examples(str(p))
    assert "list.json" in str(e.value) and "record 2" in str(e.value) and "empty" in str(e.value)  # the 2nd, from 1


def test_skip_mode_counts_bad_rows(tmp_path):
    lines = [
        _row(1),
        "not json",
        json.dumps({"instruction": "no output"}),
        _row(4, output="   "),
        _row(5),
        "[1, 2]",
        "",  # blank line: not a row
        "{broken",
        _row(8, input="ctx"),
    ]
    p = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    res = load_examples(str(p), on_bad_row="skip")
    assert res.skipped == 5
    assert res.skipped_reasons == {
        "invalid JSON": 2,
        "missing field 'output'": 1,
        "empty output": 1,
        "not an object": 1,
    }
    assert [ex.instruction for ex in res.examples] == ["do 1", "do 5", "do 8"]
    assert res.examples[2] == Example("do 8", "ctx", "done 8", "mixed", "mixed")


def test_alpaca_format_and_field_map(tmp_path):
    alp = tmp_path / "alpaca_small.json"
    alp.write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}, {"instruction": "Hi", "output": "Hello"}]))
    res = load_examples(str(alp))
    assert res.examples == [
        Example("Add", "1+1", "2", "alpaca_small", "alpaca_small"),
        Example("Hi", "", "Hello", "alpaca_small", "alpaca_small"),
    ]
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"q": "Why?", "ctx": "sky", "a": "Rayleigh", "kind": "science"}) + "\n")
    fm = {"instruction": "q", "input": "ctx", "output": "a", "category": "kind"}
    assert load_examples(str(other), field_map=fm).examples == [Example("Why?", "sky", "Rayleigh", "science", "other")]
    # a user entry overrides one default entry, the rest stay identity
    alp2 = tmp_path / "alp2.json"
    alp2.write_text(json.dumps([{"instruction": "x", "input": "y", "answer": "z"}]))
    assert load_examples(str(alp2), field_map={"output": "answer"}).examples == [Example("x", "y", "z", "alp2", "alp2")]
    with pytest.raises(DataError, match="unknown key 'outptu'"):
        load_examples(str(alp2), field_map={"outptu": "answer"})


def test_unknown_source_and_hub_id():
    with pytest.raises(DataError, match="no/such/file.jsonl"):
        load_examples("no/such/file.jsonl")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError) as e:
            load_examples("databricks/databricks-dolly-15k")
        assert "databricks/databricks-dolly-15k" in str(e.value) and "path" in str(e.value)
    else:  # offline, a hub id not in the cache is refused with what to do instead
        with pytest.raises(DataError, match=r"cannot load hub dataset 'someone/not-cached'.*save_to_disk"):
            load_examples("hf:someone/not-cached")
        # a bare ORG/NAME that is no local path: tried on the hub, and the error says both
        with pytest.raises(DataError, match=r"^data.source 'someone/not-cached': no such local file or folder .*"
                                            r"write hub datasets as hf:ORG/NAME\): cannot load hub dataset"):
            load_examples("someone/not-cached")


def test_a_mistyped_local_folder_is_not_taken_for_a_hub_dataset(tmp_path, monkeypatch):
    """data.source cfg/mydata where cfg/ is a folder here (or ./x, ../x, /x, ~/x, x.jsonl): a local path that does
    not exist, said so with how a hub dataset is named, not an offline-hub error."""
    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("cfg/mydata", "./mydata", str(tmp_path / "cfg" / "mydata"), "cfg/a/b"):
        with pytest.raises(DataError) as e:
            load_examples(source)
        msg = str(e.value)
        assert msg.startswith(f"data.source {source!r}: no such local file or folder (relative paths are read from "
                              f"{tmp_path})") and msg.endswith("name a Hugging Face hub dataset as hf:ORG/NAME"), msg
        assert "hub dataset" in msg and "cannot load hub" not in msg and "offline" not in msg


def test_a_dataset_the_hub_does_not_have_says_what_to_do():
    """The hub's "not found" (online: a misspelt or gated id) asks for the spelling or a login, not for a local copy."""
    datasets = pytest.importorskip("datasets")
    from fedmoe.data.sources import _hub_failure_advice

    advice = _hub_failure_advice("org/nme", datasets.exceptions.DatasetNotFoundError("Dataset 'org/nme' doesn't exist"))
    assert "check ORG/NAME" in advice and "https://huggingface.co/datasets/org/nme" in advice and "login" in advice
    offline = _hub_failure_advice("org/nme", ConnectionError("Couldn't reach 'org/nme' on the Hub (OfflineModeIsEnabled)"))
    assert "offline" in offline and "save_to_disk" in offline


def test_a_saved_hugging_face_dataset_folder(tmp_path):
    """data.source: a folder written by the datasets library (a DatasetDict: data.hf_split picks the split),
    with a field map; a folder of parquet files; a missing split named with the ones there are."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "topic": "math"} for i in range(6)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                               "test": datasets.Dataset.from_list(rows[4:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    fm = {"instruction": "question", "output": "answer", "category": "topic"}
    got = load_examples(str(tmp_path / "saved"), field_map=fm).examples
    assert [(e.instruction, e.output, e.category) for e in got] == [(r["question"], r["answer"], "math") for r in rows[:4]]
    test = load_examples(str(tmp_path / "saved"), field_map=fm, hf_split="test").examples
    assert [e.output for e in test] == ["5", "6"]
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'validation'"):
        load_examples(str(tmp_path / "saved"), field_map=fm, hf_split="validation")
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    assert len(load_examples(str(tmp_path / "pq"), field_map=fm).examples) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without a saved dataset"):
        load_examples(str(tmp_path / "empty"), field_map=fm)
    # through a run's data config
    cfg = DataConfig.model_validate({"source": str(tmp_path / "saved"), "field_map": fm, "hf_split": "train",
                                     "partition": {"scheme": "iid", "num_clients": 2}, "split": [0.5, 0.0, 0.5]})
    data = prepare_federated_data(cfg, seed=0)
    assert sum(len(c.train) + len(c.test) for c in data.clients) == 4


# ----------------------------------------------------------------------------------------------
# template and tokenisation

WITH_INPUT = Example("Summarize the text.", "Cats sleep a lot.", "Cats are sleepy.", "summarization", "t")
NO_INPUT = Example("Name a color.", "  ", "Blue.", "open_qa", "t")


def test_template_literals():
    assert format_prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize the text.\n\n### Input:\nCats sleep a lot.\n\n### Response:\n"
    )
    assert format_prompt(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:\n"
    )


def test_tokenize_labels_on_response_only(tok):
    for ex in (WITH_INPUT, NO_INPUT):
        out = tokenize_example(tok, ex, max_length=512)
        prompt_ids = tok(format_prompt(ex), add_special_tokens=False).input_ids
        resp_ids = tok(ex.output, add_special_tokens=False).input_ids
        assert out["input_ids"] == prompt_ids + resp_ids + [tok.eos_token_id]
        assert out["prompt_len"] == len(prompt_ids)
        masked = [i for i, label in enumerate(out["labels"]) if label == IGNORE_INDEX]
        assert masked == list(range(len(prompt_ids)))
        labelled = [label for label in out["labels"] if label != IGNORE_INDEX]
        assert labelled == out["input_ids"][len(prompt_ids) :]
        assert tok.decode(labelled) == ex.output + "<|endoftext|>"


def test_truncation_rule_exact():
    assert truncation_lengths(10, 5, 64) == (10, 5)  # fits
    assert truncation_lengths(100, 50, 64) == (32, 32)  # both long: half each
    assert truncation_lengths(10, 100, 64) == (10, 54)  # short prompt: response gets the rest
    assert truncation_lengths(100, 5, 64) == (59, 5)  # short response survives whole
    assert truncation_lengths(3, 3, 1) == (0, 1)
    assert truncation_lengths(3, 3, 2) == (1, 1)


def test_truncation_bounds(tok):
    long_in = Example("Explain. " * 30, "word " * 200, "answer " * 100, "c", "t")
    long_out = Example("Hi", "", "token " * 300, "c", "t")
    for ex in (long_in, long_out, WITH_INPUT):
        prompt_ids = tok(format_prompt(ex), add_special_tokens=False).input_ids
        resp_ids = tok(ex.output, add_special_tokens=False).input_ids + [tok.eos_token_id]
        for L in (1, 2, 3, 8, 17, 64, 100, 256):
            out = tokenize_example(tok, ex, L)
            n_lab = sum(label != IGNORE_INDEX for label in out["labels"])
            assert len(out["input_ids"]) == len(out["labels"]) <= L
            assert n_lab >= 1
            p = out["prompt_len"]
            assert out["input_ids"][:p] == prompt_ids[len(prompt_ids) - p:]  # prompt tail kept, as generation's
            assert out["input_ids"][p:] == resp_ids[: len(out["input_ids"]) - p]  # response head kept
            if len(prompt_ids) + len(resp_ids) > L:
                assert len(out["input_ids"]) == L
    out = tokenize_example(tok, long_in, 64)  # both long: the prompt gets half of the budget
    assert out["prompt_len"] == 32 and len(out["input_ids"]) == 64
    # a cut training prompt ends as the prompt generation is given: with the response marker, the same tokens
    assert tok.decode(out["input_ids"][:32]).endswith("### Response:\n")
    assert out["input_ids"][:32] == tokenize_prompt(tok, long_in, 32)


def test_tokenize_prompt_left_truncates(tok):
    full = tok(format_prompt(WITH_INPUT), add_special_tokens=False).input_ids
    assert tokenize_prompt(tok, WITH_INPUT, 1000) == full
    cut = tokenize_prompt(tok, WITH_INPUT, 10)
    assert cut == full[-10:]
    assert tok.decode(cut).endswith("### Response:\n")


def test_tokenize_and_collate(tok):
    items = [tokenize_example(tok, ex, 128) for ex in (WITH_INPUT, NO_INPUT)]
    batch = collate_sft(items, pad_id=1)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert n0 > n1
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, n0)
    assert batch["input_ids"][1, n1:].tolist() == [1] * (n0 - n1)
    assert batch["attention_mask"].tolist() == [[1] * n0, [1] * n1 + [0] * (n0 - n1)]
    assert batch["labels"][1].tolist() == items[1]["labels"] + [IGNORE_INDEX] * (n0 - n1)

    small = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert small["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert small["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert small["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------------------------
# partitions


def _assert_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def _mean_tv(examples, parts):
    cats = sorted({ex.category for ex in examples})
    glob = Counter(ex.category for ex in examples)
    g = np.array([glob[c] for c in cats], dtype=float) / len(examples)
    tvs = []
    for p in parts:
        cnt = Counter(examples[i].category for i in p)
        q = np.array([cnt[c] for c in cats], dtype=float) / len(p)
        tvs.append(0.5 * np.abs(q - g).sum())
    return float(np.mean(tvs))


def test_iid_partition(dolly):
    parts = partition(dolly, "iid", 4, seed=0)
    _assert_exact_cover(parts, 15011)
    assert [len(p) for p in parts] == [3753, 3753, 3753, 3752]
    assert parts == partition(dolly, "iid", 4, seed=0)
    assert parts != partition(dolly, "iid", 4, seed=1)
    assert _mean_tv(dolly, parts) < 0.03


@pytest.mark.parametrize("mode", ["client", "category"])
def test_dirichlet_partition_deterministic_and_covering(dolly, mode):
    parts = partition(dolly, "dirichlet", 10, seed=3, alpha=0.5, dirichlet_mode=mode)
    _assert_exact_cover(parts, 15011)
    assert all(len(p) >= 1 for p in parts)
    assert parts == partition(dolly, "dirichlet", 10, seed=3, alpha=0.5, dirichlet_mode=mode)
    assert parts != partition(dolly, "dirichlet", 10, seed=4, alpha=0.5, dirichlet_mode=mode)
    if mode == "client":
        assert sorted(len(p) for p in parts) == [1501] * 9 + [1502]


def test_dirichlet_every_client_nonempty_when_tiny():
    exs = [Example(f"i{i}", "", f"o{i}", "ab"[i % 2], "s") for i in range(6)]
    for mode in ("client", "category"):
        for seed in range(5):
            parts = partition(exs, "dirichlet", 6, seed=seed, alpha=0.01, dirichlet_mode=mode)
            _assert_exact_cover(parts, 6)
            assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize("mode", ["client", "category"])
def test_dirichlet_refuses_one_category(tmp_path, mode):
    """Dir(alpha) over one category is [1.0] for every client: the split would silently be an even random one."""
    exs = [Example(f"i{i}", "", f"o{i}", "alpaca", "alpaca") for i in range(8)]
    with pytest.raises(DataError) as err:
        partition(exs, "dirichlet", 2, seed=0, alpha=0.5, dirichlet_mode=mode)
    msg = str(err.value)
    assert "data.partition.scheme: dirichlet" in msg and "one category ('alpaca')" in msg
    assert "data.field_map" in msg and "data.partition.scheme: iid" in msg
    # a category-less file through the run's data preparation: the same refusal, before any training
    src = tmp_path / "alpaca.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    with pytest.raises(DataError, match=r"one category \('alpaca'\)"):
        prepare_federated_data(DataConfig(source=str(src), partition=PartitionConfig(scheme="dirichlet", num_clients=2)), seed=0)
    assert len(prepare_federated_data(DataConfig(source=str(src), partition=PartitionConfig(scheme="iid", num_clients=2)),
                                      seed=0).clients) == 2


def test_dirichlet_alpha_controls_heterogeneity(dolly):
    for mode in ("client", "category"):
        tv_small = np.mean([_mean_tv(dolly, partition(dolly, "dirichlet", 4, s, alpha=0.1, dirichlet_mode=mode)) for s in range(3)])
        tv_large = np.mean([_mean_tv(dolly, partition(dolly, "dirichlet", 4, s, alpha=100.0, dirichlet_mode=mode)) for s in range(3)])
        assert tv_large < 0.08 < 0.3 < tv_small, (mode, tv_small, tv_large)


def test_pathological_partition(dolly):
    parts = partition(dolly, "pathological", 8, seed=0)
    _assert_exact_cover(parts, 15011)
    cats = [{dolly[i].category for i in p} for p in parts]
    assert all(len(c) == 1 for c in cats)
    order = sorted(DOLLY_COUNTS, key=lambda c: (-DOLLY_COUNTS[c], c))
    assert [c.pop() for c in cats] == order
    three = partition(dolly, "pathological", 3, seed=0)
    assert [len(p) for p in three] == [3742, 2191, 2136]
    given = partition(dolly, "pathological", 2, seed=0, categories=["creative_writing", "summarization"])
    assert [len(p) for p in given] == [709, 1188]
    assert {dolly[i].category for i in given[0]} == {"creative_writing"}
    with pytest.raises(DataError) as e:
        partition(dolly, "pathological", 2, seed=0, categories=["poetry", "open_qa"])
    assert "poetry" in str(e.value) and "creative_writing" in str(e.value)
    with pytest.raises(DataError, match="9 clients but only 8 categories"):
        partition(dolly, "pathological", 9, seed=0)


def test_source_partition():
    exs = [Example(f"i{i}", "", f"o{i}", "c", ["b", "a", "c"][i % 3]) for i in range(30)]
    parts = partition(exs, "source", 3, seed=0)
    _assert_exact_cover(parts, 30)
    assert [{exs[i].source for i in p} for p in parts] == [{"a"}, {"b"}, {"c"}]
    with pytest.raises(DataError, match="3 sources"):
        partition(exs, "source", 2, seed=0)


def test_partition_errors():
    exs = [Example("i", "", "o", "c", "s")] * 3
    with pytest.raises(DataError, match="only 3 examples"):
        partition(exs, "iid", 4, seed=0)
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition(exs, "random", 2, seed=0)


def test_split_client_exact():
    idx = list(range(1000, 1100))
    tr, va, te = split_client(idx, (0.8, 0.1, 0.1), seed=0, client=0)
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert sorted(tr + va + te) == idx
    assert (tr, va, te) == split_client(idx, (0.8, 0.1, 0.1), seed=0, client=0)
    assert tr != split_client(idx, (0.8, 0.1, 0.1), seed=0, client=1)[0]
    assert tr != split_client(idx, (0.8, 0.1, 0.1), seed=1, client=0)[0]
    assert [split_sizes(n) for n in (0, 1, 2, 5, 9, 10, 11)] == [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (4, 1, 0), (7, 1, 1), (8, 1, 1), (9, 1, 1)
    ]
    assert split_sizes(2, (0.0, 0.5, 0.5)) == (1, 0, 1)  # train taken from val on a tie
    assert split_sizes(1, (0.0, 0.0, 1.0)) == (1, 0, 0)


def test_histogram_table():
    exs = [Example("i", "", "o", c, "s") for c in ["x", "y", "x", "y", "y"]]
    hist = category_histogram(exs, [[0, 2], [1, 3, 4]])
    assert hist == {0: {"x": 2, "y": 0}, 1: {"x": 0, "y": 3}}
    assert format_histogram_table(hist) == (
        "| client | x | y | total |\n|---|---:|---:|---:|\n| 0 | 2 | 0 | 2 |\n| 1 | 0 | 3 | 3 |\n| total | 2 | 3 | 5 |"
    )


# ----------------------------------------------------------------------------------------------
# prepare_federated_data


def test_prepare_federated_data(tmp_path):
    cfg = DataConfig(
        max_examples=400,
        partition=PartitionConfig(scheme="iid", num_clients=4),
        max_train_per_client=50,
        max_test_per_client=7,
    )
    fd = prepare_federated_data(cfg, seed=0)
    assert fd.num_examples == 400 and fd.skipped == 0 and fd.unassigned == 0
    assert [(len(c.train), len(c.val), len(c.test)) for c in fd.clients] == [(50, 10, 7)] * 4
    assert [c.id for c in fd.clients] == [0, 1, 2, 3]
    assert all(sum(c.category_counts.values()) == 50 for c in fd.clients)
    assert fd.histogram_markdown.splitlines()[-1].endswith("| 200 |")
    again = prepare_federated_data(cfg, seed=0)
    assert [c.train for c in again.clients] == [c.train for c in fd.clients]
    assert [c.train for c in prepare_federated_data(cfg, seed=1).clients] != [c.train for c in fd.clients]

    # two sources, one per client, with a category filter on one of them
    alp = tmp_path / "alp.json"
    alp.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]))
    cfg2 = DataConfig(
        source=["dolly", str(alp)],
        categories=["alp", "creative_writing"],
        partition=PartitionConfig(scheme="source", num_clients=2),
    )
    fd2 = prepare_federated_data(cfg2, seed=0)
    assert fd2.sources == ["dolly", "alp"]
    assert fd2.num_examples == 709 + 20
    sizes = [(len(c.train), len(c.val), len(c.test)) for c in fd2.clients]
    assert sizes == [(16, 2, 2), (567, 71, 71)]  # sources sorted: alp, dolly
    with pytest.raises(DataError) as e:
        prepare_federated_data(DataConfig(categories=["poetry"]), seed=0)
    assert "poetry" in str(e.value) and "open_qa" in str(e.value)


def test_the_field_map_hint_names_every_field_the_template_uses(tmp_path):
    """A Dolly-shaped file read with the default field names: the hint maps output AND input (its context would
    otherwise be dropped without a word), not only the field that is missing."""
    import json

    from fedmoe.data.sources import DataError, load_examples

    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"instruction": "Name it.", "context": "It is KLM.", "response": "KLM",
                                "category": "closed_qa"}) + "\n")
    with pytest.raises(DataError, match=r"set data.field_map: \{input: context, output: response\}"):
        load_examples(str(path))


def test_the_dirichlet_mode_is_a_config_key():
    """data.partition.dirichlet_mode reaches the partition: `client` (default) gives near-equal client sizes,
    `category` (Hsu et al.) the sizes its per-category draw gives — those of partition(..., "category")."""
    def sizes(mode):
        cfg = DataConfig.model_validate({"max_examples": 600, "partition": {
            "scheme": "dirichlet", "num_clients": 4, "alpha": 0.3, **({"dirichlet_mode": mode} if mode else {})}})
        return [len(c.train) + len(c.val) + len(c.test) for c in prepare_federated_data(cfg, seed=3).clients]

    client, default, category = sizes("client"), sizes(None), sizes("category")
    assert client == default and max(client) - min(client) <= 1
    assert max(category) - min(category) > 20
    from fedmoe.data import load_examples, partition
    from fedmoe.data.prepare import _filter_and_subsample

    examples = _filter_and_subsample(DataConfig(max_examples=600), load_examples("dolly").examples, 3)
    assert sorted(category) == sorted(len(p) for p in partition(examples, "dirichlet", 4, 3, alpha=0.3,
                                                                dirichlet_mode="category"))


def _llama_style_tokenizer():
    """A real fast tokenizer whose post-processor puts a BOS before every text, as Llama's, Mixtral's and Llama-4's
    do (built in code: no such tokenizer ships with fedmoe)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "#", "##", "###", "Instruction", "Response", "Input", ":", "hello", "world",
             "the", "answer", "Below", "is", "an"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_a_tokenizer_that_adds_a_bos_gets_it_before_every_prompt_truncated_or_not(tok):
    """Training, test-loss and generation prompts began without the BOS a Llama-style tokenizer adds (every sequence
    the model saw in pretraining began with it); a cut prompt keeps it and then its tail. OLMoE's adds none: unchanged."""
    from fedmoe.data.tokenize import special_prefix

    llama = _llama_style_tokenizer()
    assert special_prefix(llama) == [1] and special_prefix(tok) == []
    ex = Example("hello world " * 20, "the answer " * 10, "answer " * 30, "c", "t")
    plain = llama(format_prompt(ex), add_special_tokens=False)["input_ids"]
    full = tokenize_example(llama, ex, 1000)
    assert full["input_ids"][: full["prompt_len"]] == [1] + plain
    cut = tokenize_example(llama, ex, 40)
    p = cut["prompt_len"]
    assert len(cut["input_ids"]) == 40 and cut["input_ids"][:p] == [1] + plain[len(plain) - (p - 1):]
    assert tokenize_examples(llama, [ex], 40) == [cut]
    assert tokenize_prompt(llama, ex, 10) == [1] + plain[-9:]
    assert tokenize_prompt(llama, ex, 1000) == [1] + plain
    assert tokenize_prompt(llama, ex, 1) == [1]
    olmoe = tokenize_example(tok, ex, 1000)
    assert olmoe["input_ids"][: olmoe["prompt_len"]] == tok(format_prompt(ex), add_special_tokens=False)["input_ids"]


def test_dedupe_keeps_every_test_prompt_out_of_the_training_sets():
    """Dolly repeats 187 rows' instruction and input (15 rows exactly): in a 4-client split 26 of 1,500 test prompts
    also sat in some client's training set. data.dedupe drops each repeat (its first occurrence kept): none does."""
    from fedmoe.config import load_config
    from fedmoe.data import prepare_federated_data

    def key(ex):
        return ex.instruction.strip(), ex.input.strip()

    out = {}
    for dedupe in (False, True):
        cfg = load_config(None, [f"data.dedupe={str(dedupe).lower()}", "data.max_test_per_client=null"])
        fd = prepare_federated_data(cfg.data, cfg.seed)
        train = {key(ex) for c in fd.clients for ex in c.train}
        out[dedupe] = (fd.num_examples, sum(key(ex) in train for c in fd.clients for ex in c.test))
    assert out[False] == (15011, 26)
    assert out[True] == (15011 - 187, 0)
