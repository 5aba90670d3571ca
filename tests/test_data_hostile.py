"""Data files that are broken in the ways real files are: half an emoji, a numeric gap, a byte-order mark, a byte
that is not UTF-8, nesting or numbers json cannot read, two JSON documents joined, a field map naming a field no
row has. Each is a bad row that names its file and line (or a clear error), never a crash mid-run or a row that
trains on "nan"."""

import json

import pytest

from fedmoe.config import DataConfig, PartitionConfig, load_config
from fedmoe.data import DataError, load_examples, prepare_federated_data


def _rows(n, **extra):
    return [json.dumps({"instruction": f"do {i}", "output": f"done {i}", **extra}) for i in range(n)]


def _file(tmp_path, name, text: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(p)


def test_half_an_emoji_is_a_bad_row_not_a_crash_in_the_tokenizer(tmp_path):
    # valid JSON ("\ud83d" escapes half of a UTF-16 pair), but no character: the tokenizer raised a TypeError mid-run
    src = _file(tmp_path, "s.jsonl", "\n".join(_rows(3) + ['{"instruction": "broken \\ud83d here", "output": "b"}']))
    with pytest.raises(DataError, match=r"s.jsonl: line 4: field 'instruction' \(instruction\) holds '\\ud83d' at "
                                        r"character 7: half of a UTF-16 surrogate pair"):
        load_examples(src)
    res = load_examples(src, on_bad_row="skip")
    assert len(res.examples) == 3 and res.skipped_reasons == {"field 'instruction' not a value": 1}
    opts = _file(tmp_path, "o.jsonl", json.dumps({"instruction": "q", "output": "a", "options": ["a", "b\ud83d"]}))
    with pytest.raises(DataError, match="an option of field 'options'"):
        load_examples(opts, field_map={"options": "options"})


def test_a_nan_or_null_is_no_answer_and_no_class(tmp_path):
    """pandas writes a gap in a numeric column as NaN: it would have become the class "nan" (or the answer "nan").
    A null required field says it is null, not that the row lacks a field it lists."""
    src = _file(tmp_path, "n.jsonl", "\n".join(_rows(2) + ['{"instruction": "x", "output": NaN}']))
    with pytest.raises(DataError, match=r"line 3: field 'output' \(output\) is nan, not a value"):
        load_examples(src)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "stars.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "stars": [1.0, 2.0, float("nan"), None]}), path)
    res = load_examples(str(path), field_map={"instruction": "text", "label": "stars"}, on_bad_row="skip")
    assert sorted(ex.label for ex in res.examples) == ["1.0", "2.0"]
    assert res.skipped_reasons == {"field 'stars' not a value": 1, "field 'stars' null": 1}
    full = tmp_path / "full.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "stars": [1.0, 2.0, 3.0, None]}), full)
    with pytest.raises(DataError, match=r"record 4: field 'stars' \(label\) is null;"):
        load_examples(str(full), field_map={"instruction": "text", "label": "stars"})


def test_a_byte_order_mark_is_read_and_a_bad_byte_is_named_by_its_line(tmp_path):
    bom = _file(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + "\n".join(_rows(2)).encode())
    assert [ex.instruction for ex in load_examples(bom).examples] == ["do 0", "do 1"]
    bom_json = _file(tmp_path, "bom.json", b"\xef\xbb\xbf[" + _rows(1)[0].encode() + b"]")
    assert len(load_examples(bom_json).examples) == 1
    lines = [r.encode() for r in _rows(4)]
    lines[2] = lines[2].replace(b"do 2", b"do \xff2")
    bad = _file(tmp_path, "bad.jsonl", b"\n".join(lines))
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: byte 0xff at column 21 is not UTF-8"):
        load_examples(bad)
    assert len(load_examples(bad, on_bad_row="skip").examples) == 3  # the other rows are kept
    whole = _file(tmp_path, "bad.json", b"[\n" + b",\n".join(lines) + b"\n]")
    with pytest.raises(DataError, match=r"bad.json: byte 0xff at line 4, column 21 is not UTF-8"):
        load_examples(whole)


def test_json_python_cannot_read_is_a_bad_row(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    huge = '{"instruction": "x", "output": "y", "n": ' + "9" * 5000 + "}"
    src = _file(tmp_path, "h.jsonl", "\n".join(_rows(2) + [deep, huge]))
    with pytest.raises(DataError, match=r"h.jsonl: line 3: not valid JSON \(nested too deeply\)"):
        load_examples(src)
    res = load_examples(src, on_bad_row="skip")
    assert len(res.examples) == 2 and res.skipped_reasons == {"invalid JSON": 2}
    with pytest.raises(DataError, match=r"d.json: not valid JSON \(nested too deeply\)"):
        load_examples(_file(tmp_path, "d.json", deep))


def test_two_json_documents_joined_are_not_read_as_json_lines(tmp_path):
    one = "[\n" + ",\n".join(_rows(2)) + "\n]"
    with pytest.raises(DataError, match=r"j.json: not valid JSON \(Extra data at line 5, column 1 after the first "
                                        r"JSON value ended: the file holds more than one"):
        load_examples(_file(tmp_path, "j.json", one + "\n" + one))
    # a ".json" that is really JSON Lines still loads
    assert len(load_examples(_file(tmp_path, "l.json", "\n".join(_rows(3)))).examples) == 3


def test_a_field_map_naming_a_field_no_row_has_is_an_error(tmp_path):
    rows = [json.dumps({"instruction": "q", "context": "c", "output": "a", "task": "t"})] * 3
    src = _file(tmp_path, "m.jsonl", "\n".join(rows))
    with pytest.raises(DataError, match=r"m.jsonl: data.field_map.input = 'contxt', but no row has a field 'contxt'"):
        load_examples(src, field_map={"input": "contxt"})
    with pytest.raises(DataError, match=r"data.field_map.category = 'tsk'"):
        load_examples(src, field_map={"category": "tsk"})
    ex = load_examples(src, field_map={"input": "context", "category": "task"}).examples[0]
    assert (ex.input, ex.category) == ("c", "t")
    with pytest.raises(DataError, match=r"data.field_map.input = 'nope'"):  # the shipped Dolly too
        load_examples("dolly", field_map={"input": "nope"})


def test_one_field_map_for_several_sources_says_so(tmp_path):
    a = _file(tmp_path, "a.jsonl", "\n".join(json.dumps({"question": f"q{i}", "answer": "x"}) for i in range(4)))
    b = _file(tmp_path, "b.jsonl", "\n".join(_rows(4)))
    cfg = DataConfig(source=[a, b], field_map={"instruction": "question", "output": "answer"},
                     partition=PartitionConfig(scheme="source", num_clients=2))
    with pytest.raises(DataError, match=r"b.jsonl: line 1: has no field 'question'.*data.field_map applies to every "
                                        r"source in data.source: give this one its own entries, data.field_maps"):
        prepare_federated_data(cfg, 0)
    # each source with the names its file uses: the first source's own map, the second the defaults
    both = DataConfig(source=[a, b], field_maps={a: {"instruction": "question", "output": "answer"}},
                      partition=PartitionConfig(scheme="source", num_clients=2))
    data = prepare_federated_data(both, 0)
    firsts = sorted(ex.instruction for c in data.clients for ex in c.train + c.val + c.test)
    assert firsts == sorted([f"q{i}" for i in range(4)] + [f"do {i}" for i in range(4)])
    with pytest.raises(ValueError, match=r"data.field_maps names 'c.jsonl', which is not in data.source"):
        DataConfig(source=[a, b], field_maps={"c.jsonl": {"output": "answer"}})
    with pytest.raises(ValueError, match=r"data.field_maps\[.*\] sets label, but data.field_map lacks it"):
        DataConfig(source=[a, b], field_maps={a: {"label": "answer"}})
    assert DataConfig(source=[a, b], field_map={"label": "answer"}, field_maps={b: {"label": "output"}})


def test_a_partition_error_names_what_emptied_the_data_before_it(tmp_path):
    a = _file(tmp_path, "a.jsonl", "\n".join(_rows(40, category="c1")))
    b = _file(tmp_path, "b.jsonl", "\n".join(_rows(3, category="c3")))
    cfg = DataConfig(source=[a, b], categories=["c1"], partition=PartitionConfig(scheme="source", num_clients=2))
    with pytest.raises(DataError, match=r"num_clients is 2.* \(counted after data.categories = \['c1'\] took examples "
                                        r"away before partitioning"):
        prepare_federated_data(cfg, 0)


@pytest.mark.parametrize("text, why", [("Pick {labels.x}", "not {labels.x}"), ("x {0} y", "not {0}"),
                                       ("a } b", "a brace alone is none"), ("{label}", "not {label}")])
def test_a_label_instruction_has_one_placeholder(text, why):
    with pytest.raises(ValueError, match=f"data.label_instruction = .*{why.replace('{', '[{]').replace('}', '[}]')}"):
        load_config(None, [f"data.label_instruction={json.dumps(text)}"])
    assert load_config(None, ['data.label_instruction="Answer as {{x}}: one of {labels}"'])


def test_more_general_blocks_than_the_text_holds_is_refused_before_the_run():
    """The general text packs into fewer blocks the longer they are: asking for more is an error naming how many
    there are (it measured fewer than asked without a word), before any directory is written."""
    from fedmoe.configbase import ConfigError
    from fedmoe.data.general import general_blocks, pack, general_texts
    from fedmoe.federation.entry import check_model
    from fedmoe.moe.model import load_tokenizer

    tok = load_tokenizer("builtin:tiny-moe")
    held = len(pack(tok, general_texts(), 1024))
    assert 10 < held < 100 and len(general_blocks(tok, 1024, held)) == held
    with pytest.raises(DataError, match=f"eval.general_blocks = {held + 1}, but the general text holds {held} blocks "
                                        f"of data.max_length = 1024 tokens"):
        general_blocks(tok, 1024, held + 1)
    cfg = load_config(None, ["data.max_length=1024", f"eval.general_blocks={held + 1}"])
    with pytest.raises(ConfigError, match=f"set eval.general_blocks to {held} or fewer"):
        check_model(cfg, log=lambda *a: None)


def test_a_category_with_a_pipe_or_a_line_break_keeps_the_tables_whole():
    """Category (label) names come from the user's data: a "|" or a line break in one would add columns or break a
    row of the per-client category table, the report's per-category table and a sweep's client labels."""
    from fedmoe.data import format_histogram_table
    from fedmoe.federation.sweep import format_sweep_report
    from fedmoe.report.report import format_zero_shot_comparison

    def cells(line):  # a markdown row's cells: split at pipes that are not escaped
        import re

        return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    table = format_histogram_table({0: {"news|sports": 3, "tech\nscience": 1}, 1: {"news|sports": 0, "tech\nscience": 2}})
    rows = table.splitlines()
    assert len(rows) == 5 and {len(cells(r)) for r in rows} == {4}
    assert cells(rows[0]) == ["client", "news\\|sports", "tech science", "total"]
    zs = format_zero_shot_comparison({"zero_shot": {"rouge_l": 1.0, "loss": 2.0, "rouge_l_by_category": {"a|b": 1.0}},
                                      "global": {"rouge_l": 2.0, "loss": 1.9, "rouge_l_by_category": {"a|b": 2.0}},
                                      "clients": []})
    row = next(x for x in zs if x.startswith("| a"))
    assert len(cells(row)) == 5 and cells(row)[0] == "a\\|b"
    summary = {"clients": [{"id": 0, "rouge_l": 1.0, "category_counts": {"x|y": 4}}], "global": {"loss": 1.0}}
    row = next(x for x in format_sweep_report("s.yaml", [("p", summary)]).splitlines() if x.startswith("| 0 "))
    assert cells(row)[0] == "0 (x\\|y)" and len(cells(row)) == 2
