

import copy
import os
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedmoe.eval import evaluate_loss, greedy_generate, rouge_l, rouge_l_per_example
from fedmoe.eval.generate import left_pad
from fedmoe.report import RunDir, atomic_write_text, build_summary, format_results_table, human_bytes, write_report

# ---------------------------------------------------------------------------------------------
# ROUGE-L


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 tokens; P = R = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(500 / 6)
    # Different lengths: LCS = 2 ("a c"), P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3.
    assert rouge_l(["a c"], ["a b c d"]) == pytest.approx(200 / 3)


def test_rouge_l_stemming_and_mean():
    assert rouge_l(["running dogs"], ["run dog"]) == pytest.approx(100.0)
    per = rouge_l_per_example(["running dogs", "xyz"], ["run dog", "abc"])
    assert per == pytest.approx([100.0, 0.0])
    assert rouge_l(["running dogs", "xyz"], ["run dog", "abc"]) == pytest.approx(50.0)


def test_rouge_l_of_text_in_other_scripts():
    """rouge_score's tokenizer keeps a-z and 0-9 only: a Chinese or Russian reference scored 0 against itself. The
    unicode tokenizer scores by the words of every script (a Han character each) and gives rouge_score's scores on
    a-z text; the latin one refuses references mostly in another script instead of scoring them 0."""
    import random

    from fedmoe.eval.rouge import UnicodeTokenizer

    zh, ru = "北京是中国的首都", "Привет, мир"
    assert rouge_l_per_example([zh, ru], [zh, ru], "unicode") == [100.0, 100.0]
    # LCS of 北京是首都 in 北京是中国的首都: 5 of 5 and 5 of 8 characters
    assert rouge_l(["北京是首都"], [zh], "unicode") == pytest.approx(100 * 2 * (5 / 5) * (5 / 8) / (5 / 5 + 5 / 8))
    assert UnicodeTokenizer().tokenize("Running x_y café 3D東京") == ["run", "x", "y", "café", "3d", "東", "京"]
    rng = random.Random(0)
    words = "the cat sat on mat running quickly dogs jumped over 12 3d don't".split()
    preds = [" ".join(rng.choices(words, k=8)) for _ in range(100)]
    refs = [" ".join(rng.choices(words, k=8)) for _ in range(100)]
    assert rouge_l_per_example(preds, refs, "unicode") == rouge_l_per_example(preds, refs)
    with pytest.raises(ValueError, match=r"2 of 3 references have no word in a-z or 0-9 .* eval.rouge_tokenizer: unicode"):
        rouge_l_per_example(["a", "b", "c"], [zh, ru, "the cat"])
    with pytest.warns(UserWarning, match=r"1 of 3 references have no word in a-z or 0-9 .* score 0 whatever the answer"):
        assert rouge_l_per_example(["a", "b", "the cat"], [zh, "ok", "the cat"]) == [0.0, 0.0, 100.0]  # 1 of 3: scored


def test_rouge_l_rejects_empty_and_mismatch():
    with pytest.raises(ValueError):
        rouge_l([], [])
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# a tiny real MoE model

VOCAB = 64
EOS = 63


@pytest.fixture(scope="module")
def tiny_model():
    import transformers

    config = transformers.OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        eos_token_id=EOS,
        bos_token_id=None,
        initializer_range=0.5,  # sharper logits, so that float noise does not flip an argmax
    )
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config).float().eval()
    return model


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _generate_alone(model, prompt, n):
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=EOS,
    )
    toks = out[0, len(prompt) :].tolist()
    return toks[: toks.index(EOS)] if EOS in toks else toks


def test_greedy_generate_batched_matches_unpadded(tiny_model):
    g = torch.Generator().manual_seed(1)
    lengths = [3, 9, 1, 6, 12, 4, 7]
    prompts = [torch.randint(1, EOS, (n,), generator=g).tolist() for n in lengths]
    tiny_model.train()  # must be put in eval mode inside, and restored after
    done = []
    with torch.inference_mode():
        expected = [_generate_alone(tiny_model.eval(), p, 8) for p in prompts]
    tiny_model.train()
    got = greedy_generate(tiny_model, prompts, pad_id=0, eos_id=EOS, max_new_tokens=8, batch_size=3,
                          device="cpu", progress=done.append)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    tiny_model.eval()
    assert got == expected
    assert all(len(t) <= 8 for t in got)
    assert sum(done) == len(prompts) and len(done) == 3
    assert any(len(t) == 8 for t in got)  # not everything cut at once: the comparison means something


def test_greedy_generate_cuts_at_eos(tiny_model):
    prompt = [5, 6, 7]
    full = _generate_alone(tiny_model, prompt, 6)
    assert len(full) == 6
    # Declare the 3rd generated token the eos: output must stop right before it.
    eos = full[2]
    got = greedy_generate(tiny_model, [prompt], pad_id=0, eos_id=eos, max_new_tokens=6, batch_size=4, device="cpu")
    assert got == [full[: full.index(eos)]]
    assert greedy_generate(tiny_model, [], pad_id=0, eos_id=EOS, max_new_tokens=4, batch_size=2, device="cpu") == []


def test_no_repeat_ngram_blocks_repeats_and_matches_hugging_face(tiny_model):
    prompts = [[5, 6, 7], [9, 9, 3, 4]]
    plain = greedy_generate(tiny_model, prompts, pad_id=0, eos_id=EOS, max_new_tokens=24, batch_size=2, device="cpu")
    blocked = greedy_generate(tiny_model, prompts, pad_id=0, eos_id=EOS, max_new_tokens=24, batch_size=2,
                              device="cpu", no_repeat_ngram_size=2)

    def repeats(prompt, toks):  # a bigram of prompt + output seen twice
        seq = prompt + toks
        grams = list(zip(seq, seq[1:]))
        return len(grams) - len(set(grams))

    assert any(repeats(p, t) > 0 for p, t in zip(prompts, plain))  # the random tiny model loops
    assert all(repeats(p, t) == 0 for p, t in zip(prompts, blocked))
    with torch.inference_mode():  # the same as Hugging Face's option on one unpadded prompt
        out = tiny_model.generate(input_ids=torch.tensor([prompts[0]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                                  max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=EOS,
                                  no_repeat_ngram_size=2)
    toks = out[0, 3:].tolist()
    assert blocked[0] == (toks[: toks.index(EOS)] if EOS in toks else toks)


def _answer_only_reference(model, prompt, n, steps):
    """Greedy decoding by full forwards of the unpadded sequence, no n-gram of the answer generated twice (the
    prompt's may be copied): written out, independent of Hugging Face's processor."""
    seq, answer = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].clone()
        if n and len(answer) >= n - 1:  # 0: plain greedy
            prefix = answer[len(answer) - (n - 1):]
            for i in range(len(answer) - n + 1):
                if answer[i:i + n - 1] == prefix:
                    logits[answer[i + n - 1]] = -float("inf")
        t = int(logits.argmax())
        if t == EOS:
            break
        seq.append(t)
        answer.append(t)
    return answer


def test_no_repeat_ngram_lets_an_answer_copy_its_prompt(tiny_model):
    """eval.no_repeat_ngram_size went to Hugging Face's option, which bans the prompt's n-grams too: an answer could
    not copy n tokens of its context (an extractive answer's ROUGE-L fell from 100 to 18). Only the answer's own
    n-grams are banned now. The prompt is the plain model's own text cut just before it repeats a bigram, so its
    answer begins with a bigram of the prompt; batched with a shorter prompt (left padding), both answers are the
    written-out reference's."""
    q = [5, 6, 7]
    seq = q + greedy_generate(tiny_model, [q], pad_id=0, eos_id=EOS, max_new_tokens=24, batch_size=1, device="cpu")[0]
    t = next(t for t in range(len(q), len(seq) - 1)
             if any(seq[s:s + 2] == seq[t:t + 2] for s in range(t - 1)))  # the first bigram seen before, whole
    prompts = [seq[:t], [9, 9, 3]]
    blocked = greedy_generate(tiny_model, prompts, pad_id=0, eos_id=EOS, max_new_tokens=12, batch_size=2,
                              device="cpu", no_repeat_ngram_size=2)
    assert blocked == [_answer_only_reference(tiny_model, p, 2, 12) for p in prompts]
    assert blocked[0][:2] == seq[t:t + 2]  # it copies a bigram of its prompt
    for answer in blocked:  # and repeats none of its own
        assert len(set(zip(answer, answer[1:]))) == len(answer) - 1, answer


@pytest.mark.parametrize("setting", ["no_repeat_ngram_size", "suppress_tokens", "bad_words_ids", "num_beams",
                                     "begin_suppress_tokens"])
def test_a_models_own_generation_config_changes_no_answer(tiny_model, setting):
    """A checkpoint's generation_config.json fills every setting generate's caller leaves unset: Hugging Face's
    no_repeat_ngram_size (prompt included), a token suppressed (at the first step or always) or banned, beam search. The run's
    eval settings decide alone: with eval.no_repeat_ngram_size 0 the answers are plain greedy, with 2 the answer-only
    reference's; the model's generation_config is as it was afterwards."""
    prompts = [[5, 6, 7], [9, 9, 3, 4]]
    plain = [_answer_only_reference(tiny_model, p, 0, 12) for p in prompts]
    first = plain[0][0]
    value = {"no_repeat_ngram_size": 2, "suppress_tokens": [first], "bad_words_ids": [[first]], "num_beams": 3,
             "begin_suppress_tokens": [first]}[setting]
    own = tiny_model.generation_config
    changed = copy.deepcopy(own)
    setattr(changed, setting, value)
    tiny_model.generation_config = changed
    try:
        hf = []  # the setting does change Hugging Face's answers
        for p in prompts:
            with torch.inference_mode():
                toks = tiny_model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                           attention_mask=torch.ones(1, len(p), dtype=torch.long), pad_token_id=0,
                                           eos_token_id=EOS)[0, len(p):].tolist()
            hf.append(toks[: toks.index(EOS)] if EOS in toks else toks)
        assert hf != plain, setting
        for n in (0, 2):
            got = greedy_generate(tiny_model, prompts, pad_id=0, eos_id=EOS, max_new_tokens=12, batch_size=2,
                                  device="cpu", no_repeat_ngram_size=n)
            assert got == [_answer_only_reference(tiny_model, p, n, 12) for p in prompts], n
        assert tiny_model.generation_config is changed
    finally:
        tiny_model.generation_config = own


def test_evaluate_loss_token_weighted(tiny_model):
    g = torch.Generator().manual_seed(2)
    batches = []
    for bsz, seq, n_prompt in [(2, 10, 4), (3, 6, 1), (1, 15, 12)]:
        ids = torch.randint(1, VOCAB, (bsz, seq), generator=g)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        mask = torch.ones_like(ids)
        # right padding on the first row
        ids[0, -2:] = 0
        labels[0, -2:] = -100
        mask[0, -2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "category": ["x"] * bsz})

    logits_all, targets_all = [], []
    with torch.no_grad():
        for b in batches:
            logits = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits_all.append(logits[:, :-1].reshape(-1, VOCAB))
            targets_all.append(b["labels"][:, 1:].reshape(-1))
    expected = F.cross_entropy(torch.cat(logits_all), torch.cat(targets_all), ignore_index=-100).item()
    n_tokens = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
    batch_means = [F.cross_entropy(l, t, ignore_index=-100).item() for l, t in zip(logits_all, targets_all)]

    tiny_model.train()
    out = evaluate_loss(tiny_model, iter(batches), "cpu")
    assert tiny_model.training
    tiny_model.eval()
    assert out["tokens"] == n_tokens
    assert out["loss"] == pytest.approx(expected, abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # the batch sizes differ, so the mean of batch means is a different number
    assert abs(sum(batch_means) / len(batch_means) - expected) > 1e-3


def test_evaluate_loss_no_labelled_tokens(tiny_model):
    ids = torch.randint(1, VOCAB, (1, 5))
    out = evaluate_loss(tiny_model, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], "cpu")
    assert out == {"loss": None, "perplexity": None, "tokens": 0}


# ---------------------------------------------------------------------------------------------
# run directory


def test_rundir_metrics_append_read_truncate(tmp_path):
    rd = RunDir(tmp_path / "runs" / "x")
    assert rd.path.is_dir()
    assert rd.metrics_path.name == "metrics.jsonl" and rd.summary_path.name == "summary.json"
    assert rd.config_path.name == "config.yaml" and rd.report_path.name == "report.md"
    assert rd.checkpoint_dir == rd.path / "checkpoints"
    assert rd.read_metrics() == []
    rows = [
        {"round": r, "client": c, "kind": "test", "loss": 2.0 - 0.1 * r}
        for r in (1, 2, 3) for c in (0, None)
    ]
    for row in rows:
        rd.log_metrics(row)
    assert rd.read_metrics() == rows
    rd.log_metrics({"round": 3, "client": 0, "kind": "train", "loss": torch.tensor(1.5), "bad": float("nan")})
    last = rd.read_metrics()[-1]  # NaN is written as "NaN" and read back as a float, never as null
    assert math.isnan(last.pop("bad")) and last == {"round": 3, "client": 0, "kind": "train", "loss": 1.5}
    with pytest.raises(ValueError):
        rd.log_metrics({"client": 0})
    assert rd.truncate_metrics(after_round=2) == 3
    assert rd.read_metrics() == rows[:4]
    # appending after truncate continues the same file
    rd.log_metrics({"round": 3, "client": None, "kind": "test", "loss": 1.0})
    assert len(rd.read_metrics()) == 5
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]


def test_rundir_torn_last_line_is_skipped(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.log_metrics({"round": 1, "loss": 1.0})
    with open(rd.metrics_path, "a") as f:
        f.write('{"round": 2, "lo')
    assert rd.read_metrics() == [{"round": 1, "loss": 1.0}]
    rd.metrics_path.write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        rd.read_metrics()


def test_atomic_summary_write(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "r")
    rd.write_summary({"algorithm": "fedit", "wall_s": 1.5})
    assert json.loads(rd.summary_path.read_text()) == {"algorithm": "fedit", "wall_s": 1.5}
    # a failure while replacing leaves the old file intact and no temp file behind
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rd.write_summary({"algorithm": "other"})
    monkeypatch.undo()
    assert rd.read_summary() == {"algorithm": "fedit", "wall_s": 1.5}
    assert sorted(p.name for p in rd.path.iterdir()) == ["summary.json"]
    atomic_write_text(rd.path / "note.txt", "héllo")
    assert (rd.path / "note.txt").read_text(encoding="utf-8") == "héllo"


# ---------------------------------------------------------------------------------------------
# summary + report


def _clients():
    return [
        {"id": 0, "k": 8, "rank": 20, "n_train": 900, "rouge_l": 31.2, "loss": 2.1,
         "bytes_up": 1_234_567, "bytes_down": 2_000_000, "flops_per_seq": 3.4e11},
        {"id": 1, "k": 4, "rank": 8, "n_train": 100, "rouge_l": None, "loss": 2.54321,
         "bytes_up": 999, "bytes_down": 12_345, "flops_per_seq": None, "note": "extra"},
    ]


def test_build_summary_schema_and_missing_key():
    s = build_summary("flame", "tiny", 2, 0, 12.5, _clients(), {"rouge_l": 30.0, "loss": 2.2}, extra={"runtime": "local"})
    assert list(s)[:7] == ["algorithm", "model", "rounds", "seed", "wall_s", "clients", "global"]
    assert s["global"] == {"rouge_l": 30.0, "loss": 2.2, "mmlu": None, "perplexity": None}
    assert s["clients"][1]["note"] == "extra" and s["runtime"] == "local"
    assert list(s["clients"][0]) == ["id", "k", "rank", "n_train", "rouge_l", "loss", "bytes_up", "bytes_down", "flops_per_seq"]
    bad = _clients()
    del bad[1]["bytes_down"]
    with pytest.raises(ValueError, match="bytes_down"):
        build_summary("flame", "tiny", 2, 0, 1.0, bad, {})
    with pytest.raises(ValueError, match="rounds"):
        build_summary("flame", "tiny", 2, 0, 1.0, _clients(), {}, extra={"rounds": 3})


def test_human_bytes():
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_234_567) == "1.23 MB"
    assert human_bytes(12_345) == "12.35 kB"
    assert human_bytes(None) == "–"


def test_write_report(tmp_path):
    rd = RunDir(tmp_path / "r")
    summary = build_summary("flame", "tiny-olmoe", 3, 7, 125.0, _clients(),
                            {"rouge_l": 30.0, "loss": 2.2, "perplexity": 9.025})
    metrics = []
    for r in (1, 2, 3):
        for c in (0, 1):
            metrics.append({"round": r, "client": c, "kind": "train", "loss": 3.0 - 0.2 * r, "bytes_up": 1, "steps": 10})
            metrics.append({"round": r, "client": c, "kind": "test", "loss": 2.8 - 0.2 * r, "rouge_l": 10.0 * r + c})
        metrics.append({"round": r, "client": None, "kind": "test", "loss": 2.7 - 0.2 * r})
    hist = "| client | qa |\n|---|---:|\n| 0 | 5 |"
    path = write_report(rd, summary, metrics, histogram_markdown=hist)
    assert path == rd.report_path
    text = path.read_text(encoding="utf-8")
    assert "flame" in text and "tiny-olmoe" in text and "rounds: 3" in text and "seed: 7" in text
    assert "2m 05s" in text
    assert "| 0 | 8 | 20 | 900 | 31.20 | – | 2.1000 | 1.23 MB | 2.00 MB | 3.40e+11 |" in text
    assert "| 1 | 4 | 8 | 100 | – | – | 2.5432 | 999 B | 12.35 kB | – |" in text
    assert "| global model | – | – | Σ 1000 | 30.00 | – | 2.2000 | Σ 1.24 MB | Σ 2.01 MB | – |" in text
    assert "perplexity 9.025" in text
    assert hist in text
    assert "![learning curve](learning_curve.png)" in text
    png = rd.path / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_results_table(summary) in text
    # report.figures: false: the same report up to its figures, which are not drawn, and it says so
    bare = RunDir(tmp_path / "bare")
    plain = write_report(bare, summary, metrics, histogram_markdown=hist, figures=False).read_text(encoding="utf-8")
    assert not list(bare.path.glob("*.png")) and sorted(p.name for p in rd.path.glob("*.png"))
    head = text.split("## Learning curve")[0]
    assert plain.startswith(head.split("## Expert activation")[0]) and "![" not in plain
    assert plain.endswith("None drawn (`report.figures: false`): the learning curve, expert activation, confusion "
                          "matrices and per-layer metrics are in metrics.jsonl and summary.json.\n")


def test_without_figures_the_report_keeps_what_they_carried_besides_the_picture(tmp_path):
    """report.figures: false dropped the per-layer metrics' sections, the only place report.md named those keys and
    printed their notes (what a metric measures), and the learning curve's "no loss" notice: both stay, the figure
    said not drawn; a per-layer metric never measured (all None) has no section either way."""
    from fedmoe.federation.conflict import NOTES

    summary = {"algorithm": "fedit", "model": "m", "rounds": 2, "seed": 0, "metric_notes": dict(NOTES)}
    metrics = [{"kind": "server", "round": r, "update_conflict_by_layer": [0.1 * r, 0.2], "unmeasured_by_layer": [None]}
               for r in (1, 2)]
    drawn = write_report(RunDir(tmp_path / "on"), summary, metrics).read_text()
    bare = write_report(RunDir(tmp_path / "off"), summary, metrics, figures=False).read_text()
    for text in (drawn, bare):
        assert "## update_conflict_by_layer per round and layer" in text and NOTES["update_conflict_by_layer"] in text
        assert "unmeasured_by_layer" not in text and "(no loss was logged in metrics.jsonl)" in text
    assert "![update_conflict_by_layer](" in drawn and "![" not in bare
    assert bare.count("(figure not drawn: `report.figures: false`; its numbers are in metrics.jsonl)") == 1
    with_loss = [*metrics, {"kind": "test", "round": 1, "client": None, "loss": 2.0}]
    bare = write_report(RunDir(tmp_path / "loss"), summary, with_loss, figures=False).read_text()
    assert "(no loss was logged" not in bare and bare.count("(figure not drawn") == 2


def test_the_flops_column_says_its_sequence_length(tmp_path):
    """FLOPs/seq is the forward FLOPs of one sequence of eval.flops_seq_len tokens: the report's header says how many
    (from the run's config.yaml); without a readable config it says what it has, no length."""
    rd = RunDir(tmp_path / "r")
    rd.write_config({"eval": {"flops_seq_len": 64}})
    summary = build_summary("flame", "tiny-olmoe", 3, 7, 125.0, _clients(), {"rouge_l": 30.0, "loss": 2.2})
    text = write_report(rd, summary, []).read_text(encoding="utf-8")
    assert "| bytes down (total, all rounds) | FLOPs/seq (64 tokens) |" in text.splitlines()[
        text.splitlines().index("## Results") + 2]
    assert format_results_table(summary, 64) in text
    rd.config_path.write_text("eval: [")
    assert "| bytes down (total, all rounds) | FLOPs/seq |" in write_report(rd, summary, []).read_text(encoding="utf-8")


def test_client_time_shows_each_process_start_before_its_round():
    """A start row (a client process that started for a round: its load, the model's share of it) comes before
    that round's training rows; a process that served two clients loaded the model once, and says so."""
    from fedmoe.report.report import format_client_time

    metrics = [{"round": 1, "client": 0, "kind": "start", "load_s": 3.0, "model_s": 2.5},
               {"round": 1, "client": 1, "kind": "start", "load_s": 0.5, "model_s": 0.0}]
    metrics += [{"round": r, "client": c, "kind": "train", "load_s": 0.0, "train_s": 1.0 + 2 * c}
                for r in (1, 2) for c in (0, 1)]
    metrics += [{"round": 3, "client": 1, "kind": "start", "load_s": 4.0, "model_s": 3.5},  # its node came back
                {"round": 3, "client": 1, "kind": "train", "load_s": 0.0, "train_s": 2.0},
                {"round": 3, "client": 0, "kind": "train", "load_s": 0.0, "train_s": 1.0}]
    lines = format_client_time(metrics)
    table = lines[lines.index("| round | clients | load (mean) | load (max) | model load (at start) | training (mean) |"):]
    assert table[2:8] == ["| 1, start | 2 | 1.750 s | 3.000 s | 2.500 s (1 load) | – |",
                          "| 1 | 2 | 0.000 s | 0.000 s | – | 2.000 s |",
                          "| 2 | 2 | 0.000 s | 0.000 s | – | 2.000 s |",
                          "| 3, start | 1 | 4.000 s | 4.000 s | 3.500 s (1 load) | – |",
                          "| 3 | 2 | 0.000 s | 0.000 s | – | 1.500 s |", ""]
    # a client of an older fedmoe sends no model_s; an in-process run has no start rows and no load times
    assert "| 1, start | 1 | 3.000 s | 3.000 s | – | – |" in format_client_time(
        [{"round": 1, "client": 0, "kind": "start", "load_s": 3.0}])
    assert format_client_time([{"round": 1, "client": 0, "kind": "train", "train_s": 1.0}]) == []


def test_write_report_without_metrics(tmp_path):
    rd = RunDir(tmp_path / "r")
    summary = build_summary("fedit", "m", 1, 0, 3.0, [], {})
    text = write_report(rd, summary, []).read_text()
    assert "| global model | – | – | – | – | – | – | – | – | – |" in text
    assert not (rd.path / "learning_curve.png").exists()


@pytest.mark.parametrize("clients,layers,experts", [(10, 16, 64), (40, 4, 16), (2, 1, 8)])
def test_expert_heatmap_labels_never_overlap_a_neighbouring_panel(clients, layers, experts):
    """Every panel's box with its title, ticks and labels is clear of every other panel's; the client
    labels are drawn once per panel row (left column), and the saved figure is cropped to its content."""
    import itertools

    from fedmoe.report.report import expert_heatmap_figure

    gen = torch.Generator().manual_seed(0)
    summary = {"clients": [{"id": c, "k": 2, "expert_activation": torch.randint(0, 50, (layers, experts), generator=gen).tolist()}
                           for c in range(clients)]}
    fig = expert_heatmap_figure(summary)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [a for a in fig.axes if a.axison and a.get_label() != "<colorbar>"]
    assert len(panels) == layers
    boxes = [a.get_tightbbox(renderer) for a in panels]
    assert not [(i, j) for i, j in itertools.combinations(range(len(boxes)), 2) if boxes[i].overlaps(boxes[j])]
    cols = min(layers, 4)
    for i, ax in enumerate(panels):
        left = ax.yaxis.get_tick_params()["labelleft"]
        assert left == (i % cols == 0)
        if left:
            assert [t.get_text() for t in ax.get_yticklabels()] == [f"c{c} (k=2)" for c in range(clients)]
    content = fig.get_tightbbox(renderer)  # inches
    w, h = fig.get_size_inches()
    assert content.width > 0.85 * w and content.height > 0.85 * h  # no wide empty margin


def test_a_small_metric_is_not_printed_as_zero():
    """A server row's dp_delta of 1e-05 printed as 0.0000 read as no δ at all; small values keep 3 digits."""
    from fedmoe.report.report import format_metric

    assert format_metric("dp_delta", 1e-5) == "1e-05" and format_metric("dp_delta", -2.5e-7) == "-2.5e-07"
    assert format_metric("loss", 0.12345) == "0.1235" and format_metric("loss", 0.0) == "0.0000"
    assert format_metric("loss", float("nan")) == "nan"


def test_a_score_says_how_many_examples_it_is_the_mean_of():
    """A ROUGE-L of 28.57 from one test example read like a measurement: each score has its n beside it
    (summary.json's n_scored; in a summary written before that field, the length of its per-example scores); a client
    with no test data shows "no test data" and 0 scored, never a score of 0."""
    clients = [
        {"id": 0, "k": 2, "rank": 4, "n_train": 9, "rouge_l": 28.57, "loss": 2.0, "bytes_up": 10, "bytes_down": 10,
         "flops_per_seq": None, "n_test": 1, "n_scored": 1, "scores": [28.57]},
        {"id": 1, "k": 2, "rank": 4, "n_train": 9, "rouge_l": None, "loss": None, "bytes_up": 10, "bytes_down": 10,
         "flops_per_seq": None, "n_test": 0, "n_scored": 0, "scores": None},
        {"id": 2, "k": 2, "rank": 4, "n_train": 9, "rouge_l": 0.0, "loss": 2.5, "bytes_up": 10, "bytes_down": 10,
         "flops_per_seq": None, "n_test": 5, "scores": [0.0, 0.0, 0.0]},  # an older summary: no n_scored; 3 of its 5
        # test examples answered (eval.max_examples=3), all 5 in its loss
    ]
    table = format_results_table(build_summary("fedit", "m", 1, 0, 1.0, clients,
                                               {"rouge_l": 7.14, "loss": 2.3, "n_scored": 4}))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:6]}
    assert rows["0"][3:6] == ["28.57", "1", "2.0000"]
    assert rows["1"][3:6] == ["no test data", "0", "no test data"]
    assert rows["2"][3:6] == ["0.00", "3", "2.5000"]
    assert rows["global model"][3:5] == ["7.14", "4"]
    del clients[1]["n_scored"]  # an older summary's client without test data: none scored all the same
    assert format_results_table(build_summary("fedit", "m", 1, 0, 1.0, clients, {})).splitlines()[3].split(
        " | ")[4:7] == ["no test data", "0", "no test data"]
    old = format_results_table(build_summary("fedit", "m", 1, 0, 1.0, clients[:1], {"rouge_l": 1.0, "scores": None}))
    assert old.splitlines()[3].split(" | ")[4:6] == ["1.00", "–"]  # no count known: said as unknown, not guessed


def test_a_personalised_runs_mmlu_says_whose_it_is():
    """A personalised method's MMLU in the summary is the mean over the clients' own models; the report's Global line
    said "MMLU 15.62" as if it were the global model's (16.25), unlike the held-out accuracy beside it."""
    from fedmoe.report.report import format_results_table

    summary = {"clients": [], "global": {"loss": 2.0, "mmlu": 15.625, "mmlu_global_model": 16.25}}
    assert "MMLU (5-shot, mean over subjects) 15.62 (clients' own models, mean; the global model 16.25)" in \
        format_results_table(summary)
    summary["global"]["mmlu_global_model"] = 15.625
    assert "MMLU (5-shot, mean over subjects) 15.62" in format_results_table(summary) and "clients' own" not in format_results_table(summary)


def test_mmlus_line_says_which_prompts_lost_shots():
    """MMLU's line said "5-shot" while prompts too long for the limit had kept fewer shots (at the default
    data.max_length, every prompt of two history subjects): it says how many, and the accuracy over questions."""
    from fedmoe.report.report import format_results_table

    g = {"loss": 2.0, "mmlu": 31.25, "mmlu_micro": 30.5, "mmlu_questions": 2850, "mmlu_fewer_shots": 0,
         "mmlu_questions_cut": 0}
    assert "MMLU (5-shot, mean over subjects) 31.25, 30.50 over its 2,850 questions" in format_results_table({"clients": [], "global": g})
    g.update(mmlu_fewer_shots=1240, mmlu_questions_cut=3)
    assert ("MMLU (5-shot; 1,240 of 2,850 prompts kept fewer shots to fit the prompt limit, 3 lost the start of the "
            "question itself, mean over subjects) 31.25, 30.50 over its 2,850 questions") in format_results_table({"clients": [], "global": g})
