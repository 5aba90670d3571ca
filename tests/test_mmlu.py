"""MMLU: bundled data counts, the exact k-shot prompt, letter scoring, batching, truncation, CLI."""

import collections
import json

import pytest
import torch

from fedmoe.eval._modes import eval_mode
from fedmoe.eval.mmlu import (
    LETTERS,
    MMLU_SUBJECTS,
    MMLU_SUBSETS,
    Question,
    aggregate_accuracy,
    build_prompt,
    encode,
    evaluate_mmlu,
    fit_prompt,
    format_example,
    letter_token_ids,
    load_mmlu,
    resolve_subjects,
    score_letters,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls

SUBJECTS = ["abstract_algebra", "anatomy"]


@pytest.fixture(scope="module")
def lm():
    from fedmoe.moe.model import MoEModel, load_tokenizer

    return MoEModel.from_pretrained("builtin:tiny-olmoe").model, load_tokenizer("builtin:tiny-olmoe")


@pytest.fixture(scope="module")
def dev():
    return load_mmlu("dev")


@pytest.fixture(scope="module")
def test_set():
    return load_mmlu("test")


# ------------------------------------------------------------------------------------------ data
def test_counts(dev, test_set):
    assert len(MMLU_SUBJECTS) == 57 and list(test_set) == list(MMLU_SUBJECTS) == list(dev)
    assert sum(len(v) for v in test_set.values()) == 14042
    assert sum(len(v) for v in dev.values()) == 285
    assert all(len(v) == 5 for v in dev.values())
    assert sum(len(v) for v in load_mmlu("val").values()) == 1531
    sizes = {s: len(v) for s, v in test_set.items()}
    assert sizes["abstract_algebra"] == 100 and sizes["professional_law"] == 1534
    assert sizes["high_school_european_history"] == 165 and sizes["miscellaneous"] == 783
    assert min(sizes.values()) == 100 and max(sizes.values()) == 1534
    answers = collections.Counter(q.answer for v in test_set.values() for q in v)
    assert answers == {0: 3222, 1: 3462, 2: 3582, 3: 3776}
    for s, qs in test_set.items():
        for q in qs:
            assert q.subject == s and len(q.choices) == 4 and 0 <= q.answer <= 3
    q = test_set["abstract_algebra"][0]
    assert q == Question("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
                         ["0", "4", "2", "6"], 1, "abstract_algebra")
    assert q.answer_letter == "B"


def test_subject_selection():
    assert list(load_mmlu("dev", ["anatomy", "abstract_algebra"])) == ["anatomy", "abstract_algebra"]
    quick = resolve_subjects("quick")
    assert len(quick) == 10 and quick == list(MMLU_SUBSETS["quick"])
    assert resolve_subjects(None) == list(MMLU_SUBJECTS) == resolve_subjects("all")
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        resolve_subjects(["anatomy", "astrology"])
    with pytest.raises(ValueError):
        load_mmlu("train")


# ---------------------------------------------------------------------------------------- prompt
# The lm-evaluation-harness `mmlu` (default) format, = Hendrycks et al. evaluate.py with a single
# space in the subject and the question stripped; written out by hand from the dev/test CSV rows.
EXPECTED_PROMPT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
    "A. 0\nB. 1\nC. 2\nD. 3\n"
    "Answer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
    "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. "
    "Statement 2 | The symmetric group S_10 has 10 elements.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. "
    "Statement 2 | Every subgroup of an abelian group is abelian.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: A\n\n"
    "Find the characteristic of the ring 2Z.\n"
    "A. 0\nB. 3\nC. 12\nD. 30\n"
    "Answer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\n"
    "Answer:"
)


def test_exact_prompt(dev, test_set):
    s = "abstract_algebra"
    assert build_prompt(s, dev[s], test_set[s][0], k=5) == EXPECTED_PROMPT
    assert build_prompt(s, dev[s], test_set[s][0], k=0) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    # the question is stripped, the choices are verbatim; the subject's underscores become spaces
    q = Question("  Which? \n", ["x ", " y", "z", "w"], 3, "high_school_us_history")
    assert format_example(q) == "Which?\nA. x \nB.  y\nC. z\nD. w\nAnswer: D\n\n"
    assert build_prompt(q.subject, [], q, k=0).startswith("The following are multiple choice questions "
                                                          "(with answers) about high school us history.\n\n")
    with pytest.raises(ValueError):
        build_prompt(s, dev[s], test_set[s][0], k=6)


def test_letter_tokens_match_shot_answers(lm, dev, test_set):
    _, tok = lm
    ids = letter_token_ids(tok)
    assert ids == [tok.encode(" " + x, add_special_tokens=False)[0] for x in LETTERS]
    assert all(len(tok.encode(" " + x, add_special_tokens=False)) == 1 for x in LETTERS)
    # in the shots, the token after "Answer:" is exactly the scored letter token
    s = "abstract_algebra"
    prompt = encode(tok, build_prompt(s, dev[s], test_set[s][0]))
    colon = tok.encode("Answer:", add_special_tokens=False)
    after = [prompt[i + len(colon)] for i in range(len(prompt) - len(colon))
             if prompt[i : i + len(colon)] == colon]
    assert after == [ids[q.answer] for q in dev[s]]
    assert prompt[-len(colon):] == colon


# --------------------------------------------------------------------------------------- scoring
def test_scoring_matches_hand_computation(lm, dev, test_set):
    model, tok = lm
    s = "anatomy"
    ids = encode(tok, build_prompt(s, dev[s], test_set[s][0]))
    letters = letter_token_ids(tok)
    with eval_mode(model), torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    hand = torch.log_softmax(logits.double(), dim=-1)[letters].float()
    got = score_letters(model, [ids], letters)[0]
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)
    assert int(got.argmax()) == int(hand.argmax())


def test_batched_equals_unbatched(lm, dev, test_set):
    model, tok = lm
    letters = letter_token_ids(tok)
    prompts = [encode(tok, build_prompt(s, dev[s], q, k)) for s in SUBJECTS for q in test_set[s][:2]
               for k in (5, 0)]
    assert len({len(p) for p in prompts}) == len(prompts)  # all different lengths
    single = torch.cat([score_letters(model, [p], letters, batch_size=1) for p in prompts])
    for bs in (3, 8):
        batched = score_letters(model, prompts, letters, batch_size=bs)
        # Not bit-identical: float32 expert/attention kernels over other shapes round differently
        # (~1e-6); a wrong gather position or position ids would be off by far more.
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
        top2 = single.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(batched.argmax(-1)[clear], single.argmax(-1)[clear])


def test_macro_and_micro_by_hand():
    r = aggregate_accuracy({"a": (3, 4), "b": (1, 10), "c": (0, 2)})
    assert r["macro_accuracy"] == pytest.approx((3 / 4 + 1 / 10 + 0 / 2) / 3)
    assert r["micro_accuracy"] == pytest.approx(4 / 16)
    assert r["n"] == 16 and r["per_subject"]["a"] == (3, 4, 0.75)


def test_a_long_prompt_keeps_its_first_shots(lm, dev, test_set):
    """As Hendrycks et al.'s evaluate.py shortens a prompt: k -= 1 with the first k dev examples (fedmoe dropped the
    first shots and kept the last ones)."""
    _, tok = lm
    s = "abstract_algebra"
    q = test_set[s][3]
    full = encode(tok, build_prompt(s, dev[s], q, 5))
    two = encode(tok, build_prompt(s, dev[s][:2], q, 2))  # the first 2 shots
    assert len(two) < len(full)
    ids, kept = fit_prompt(tok, s, dev[s], q, k=5, max_length=len(two))
    assert kept == 2 and ids == two
    text = tok.decode(ids)
    assert text.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert dev[s][0].question in text and dev[s][1].question in text
    assert dev[s][2].question not in text and dev[s][4].question not in text
    assert text.endswith(format_example(q, include_answer=False))
    assert fit_prompt(tok, s, dev[s], q, k=5, max_length=len(full)) == (full, 5)
    # shorter than the 0-shot prompt: tokens cut from the left, the end stays
    zero = encode(tok, build_prompt(s, dev[s], q, 0))
    ids, kept = fit_prompt(tok, s, dev[s], q, k=5, max_length=len(zero) - 3)
    assert kept == 0 and ids == zero[3:]


def test_evaluate_mmlu_deterministic(lm, dev, test_set):
    model, tok = lm
    was_training = model.training
    model.train()
    r1 = evaluate_mmlu(model, tok, SUBJECTS, max_per_subject=2, batch_size=3, return_predictions=True)
    assert model.training  # the mode is restored
    model.train(was_training)
    r2 = evaluate_mmlu(model, tok, SUBJECTS, max_per_subject=2, batch_size=3, return_predictions=True)
    assert r1 == r2
    assert r1["n"] == 4 and r1["k_shot"] == 5 and r1["max_length"] == 1024 and r1["truncated"] == 0
    assert set(r1["per_subject"]) == set(SUBJECTS) and all(t == 2 for _, t, _ in r1["per_subject"].values())
    # the counts agree with the predictions and the answers
    for s in SUBJECTS:
        correct = sum(p == q.answer for p, q in zip(r1["predictions"][s], test_set[s][:2]))
        assert r1["per_subject"][s][:2] == (correct, 2)
    assert r1["macro_accuracy"] == pytest.approx(sum(a for *_, a in r1["per_subject"].values()) / 2)
    # a token limit below the 5-shot length truncates
    r3 = evaluate_mmlu(model, tok, ["abstract_algebra"], max_per_subject=1, k_shot=5, max_length=120)
    assert r3["truncated"] == 1


def test_cli_json(lm):
    from typer.testing import CliRunner

    from fedmoe.cli import app

    res = CliRunner().invoke(app, ["mmlu", "builtin:tiny-olmoe", "--subjects", "abstract_algebra", "anatomy",
                                   "--max-per-subject", "1", "--k-shot", "1", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 2 and list(out["per_subject"]) == SUBJECTS and out["k_shot"] == 1
    bad = CliRunner().invoke(app, ["mmlu", "builtin:tiny-olmoe", "--subjects", "astrology"])
    assert bad.exit_code == 2


def test_non_finite_letter_scores_are_an_error_not_answer_a():
    """A model that outputs NaN scored as the share of questions whose answer is A (argmax of all-NaN rows is 0):
    an ordinary-looking accuracy. Non-finite letter scores are an error naming how many."""
    from fedmoe.moe.model import MoEModel, load_tokenizer

    model, tok = MoEModel.from_pretrained("builtin:tiny-olmoe").model, load_tokenizer("builtin:tiny-olmoe")
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) for 3 of 3 MMLU questions"):
        evaluate_mmlu(model, tok, subjects=["anatomy"], max_per_subject=3, k_shot=0)


def test_a_question_cut_to_fit_is_counted(lm):
    """``truncated`` counts prompts that lost shots; a prompt whose question itself was cut from the left (every
    shot gone, 0-shot included) is counted in ``questions_cut``, which a 0-shot run's ``truncated`` never showed."""
    model, tok = lm
    s = "high_school_european_history"  # long passages
    short = evaluate_mmlu(model, tok, subjects=[s], max_per_subject=4, k_shot=0, max_length=64)
    assert (short["truncated"], short["questions_cut"]) == (0, 4)
    whole = evaluate_mmlu(model, tok, subjects=[s], max_per_subject=4, k_shot=0, max_length=4096)
    assert (whole["truncated"], whole["questions_cut"]) == (0, 0)
    q = load_mmlu("test", [s])[s][0]
    n = len(encode(tok, build_prompt(s, [], q, 0)))
    exact = evaluate_mmlu(model, tok, subjects=[s], max_per_subject=1, k_shot=0, max_length=n)
    assert exact["questions_cut"] == 0  # a question that fits exactly is not cut
    assert evaluate_mmlu(model, tok, subjects=[s], max_per_subject=1, k_shot=0, max_length=n - 1)["questions_cut"] == 1


def test_a_runs_mmlu_prompts_stay_within_the_models_positions(tmp_path, monkeypatch):
    """A run gives MMLU prompts of up to 4 × data.max_length tokens; the shipped FLEx configs (max_length 512 on the
    built-in model's 1024 positions) let 5-shot prompts of up to 1489 tokens run past the model's positions. The limit
    is now the smaller of the two, in the run's evaluation and in `fedmoe mmlu RUN`."""
    import fedmoe.eval.mmlu as mmlu
    from fedmoe.config import load_config
    from fedmoe.federation import run_federated
    from fedmoe.moe.model import load_model_config

    assert mmlu.run_prompt_limit(load_model_config("builtin:tiny-moe"), 512) == 1024
    assert mmlu.run_prompt_limit(load_model_config("builtin:tiny-moe"), 128) == 512
    seen = []
    real = mmlu.evaluate_mmlu

    def spy(*args, **kwargs):
        seen.append(kwargs["max_length"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mmlu, "evaluate_mmlu", spy)
    cfg = load_config(None, ["model.name=builtin:tiny-moe", "data.max_examples=60", "data.max_length=512",
                             "data.partition.num_clients=2", "train.max_steps=1", "train.batch_size=2",
                             "eval.rouge=false", "data.max_test_per_client=2", "eval.mmlu=[anatomy]",
                             "eval.mmlu_max_per_subject=2", "federation.rounds=1", "eval.zero_shot=false",
                             f"output_dir={tmp_path}", "name=m"])
    run_federated(cfg, log=lambda *a: None)
    assert seen and set(seen) == {1024}
