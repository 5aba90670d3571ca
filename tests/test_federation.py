"""Aggregation math against hand computations, client sampling, communication bytes, and exact
checkpoint/resume of a real (tiny) federated run."""

import json
import math


import pytest
import torch

from helpers import reply

from fedmoe.algorithms import METHODS, ModelSpec, server_update, weighted_average
from fedmoe.algorithms.server_opt import ServerOptimizerConfig
from fedmoe.config import RunConfig, load_config
from fedmoe.federation import resume_federated, run_federated, sample_clients
from fedmoe.federation.checkpoint import RunDirError


# ---------------------------------------------------------------------------- aggregation math
def test_fedit_averages_A_and_B_separately_by_n():
    g = {"a": torch.zeros(2, 2), "b": torch.zeros(2)}
    server = METHODS["fedit"].server(RunConfig(), ModelSpec(None, g, 0, 0, {}))
    p1 = reply(0, {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0, 0.0])}, n=1)
    p2 = reply(1, {"a": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([0.0, 4.0])}, n=3)
    new, _, _ = server.aggregate(g, {}, [p1, p2], round_idx=1)
    # p = (1/4, 3/4)
    assert torch.allclose(new["a"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.allclose(new["b"], torch.tensor([0.25, 3.0]))


def test_separate_averaging_is_not_product_averaging():
    """FedIT averages the factors: mean(B)·mean(A) != mean(B·A) in general (a known property)."""
    A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    A2, B2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    avg = weighted_average([{"A": A1, "B": B1}, {"A": A2, "B": B2}], [1, 1])
    assert torch.allclose(avg["B"] @ avg["A"], torch.full((2, 2), 0.25))
    assert not torch.allclose(avg["B"] @ avg["A"], (B1 @ A1 + B2 @ A2) / 2)


def test_weighted_average_rejects_zero_weights():
    with pytest.raises(ValueError, match="positive"):
        weighted_average([{"a": torch.ones(1)}], [0])


def _opt(name, **kw):
    return ServerOptimizerConfig(name=name, **kw)


def test_fedavgm_two_rounds_by_hand():
    cfg = _opt("fedavgm", lr=0.5, momentum=0.9)
    theta = {"w": torch.tensor([1.0])}
    new, st = server_update(cfg, theta, {"w": torch.tensor([3.0])}, {})  # Δ=2, m=2, θ=1+0.5·2=2
    assert new["w"].item() == pytest.approx(2.0)
    new, st = server_update(cfg, new, {"w": torch.tensor([1.0])}, st)  # Δ=-1, m=0.9·2-1=0.8, θ=2+0.4
    assert new["w"].item() == pytest.approx(2.4)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_server_optimizers_by_hand(name):
    b1, b2, tau, eta = 0.9, 0.99, 1e-3, 0.1
    cfg = _opt(name, lr=eta, beta1=b1, beta2=b2, tau=tau)
    theta = {"w": torch.tensor([0.0, 1.0])}
    deltas = [torch.tensor([0.5, -0.2]), torch.tensor([0.1, 0.3])]
    m = torch.zeros(2, dtype=torch.float64)
    v = torch.full((2,), tau**2, dtype=torch.float64)
    th = theta["w"].to(torch.float64).clone()
    st = {}
    cur = theta
    produced = []  # the code's θ after each round
    for d in deltas:
        d64 = d.to(torch.float64)
        m = b1 * m + (1 - b1) * d64
        if name == "fedadagrad":
            v = v + d64**2
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d64**2
        else:
            v = v - (1 - b2) * d64**2 * torch.sign(v - d64**2)
        th = th + eta * m / (v.sqrt() + tau)
        cur, st = server_update(cfg, cur, {"w": cur["w"] + d}, st)
        produced.append(cur["w"].clone())
        assert torch.allclose(cur["w"].to(torch.float64), th, atol=1e-6)
    # the first step FedAdam actually took on coordinate 0 (θ0 = 0, Δ = 0.5), against the numbers:
    # m = (1 − β1)·0.5 = 0.05, v = β2·τ² + (1 − β2)·0.25, step = η·m / (sqrt(v) + τ) (no bias correction)
    if name == "fedadam":
        v0 = 0.99 * tau**2 + 0.01 * 0.25
        assert produced[0][0].item() == pytest.approx(eta * 0.05 / (math.sqrt(v0) + tau), rel=1e-6)
        assert produced[0][0].item() == pytest.approx(0.1 * 0.05 / (0.05000989902 + 0.001), rel=1e-6)


def test_server_optimizer_keeps_the_methods_own_server_state():
    for name in ("none", "fedavgm", "fedadam"):
        _, st = server_update(_opt(name), {"w": torch.tensor([1.0])}, {"w": torch.tensor([5.0])}, {"c": 7, "m": {}})
        assert st["c"] == 7


def test_server_optimizer_none_is_fedavg():
    new, _ = server_update(_opt("none"), {"w": torch.tensor([1.0])}, {"w": torch.tensor([5.0])}, {})
    assert new["w"].item() == 5.0


# ---------------------------------------------------------------------------- sampling
def test_client_sampling_is_seeded_and_exact_in_size():
    a = [sample_clients(40, 0.25, seed=7, round_idx=r) for r in range(1, 6)]
    b = [sample_clients(40, 0.25, seed=7, round_idx=r) for r in range(1, 6)]
    c = [sample_clients(40, 0.25, seed=8, round_idx=r) for r in range(1, 6)]
    assert a == b and a != c
    assert all(len(s) == 10 and len(set(s)) == 10 and s == sorted(s) for s in a)
    assert len({tuple(s) for s in a}) > 1  # rounds differ
    assert sample_clients(4, 1.0, 0, 1) == [0, 1, 2, 3]
    assert len(sample_clients(3, 0.01, 0, 1)) == 1


# ---------------------------------------------------------------------------- real tiny runs
TINY = [
    "data.max_examples=240", "data.max_length=64", "data.partition.num_clients=3",
    "train.max_steps=2", "train.batch_size=2", "eval.max_examples=3", "eval.max_new_tokens=4",
    "eval.batch_size=4", "data.max_test_per_client=6", "federation.rounds=3", "lora.rank=4",
]


def _cfg(tmp_path, name, extra=()):
    """TINY in ``tmp_path``/``name``, without the report's figures unless ``extra`` asks (the contract does)."""
    return load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", "report.figures=false", *extra])


def test_run_directory_contract_and_bytes(tmp_path):
    summary, rd = run_federated(_cfg(tmp_path, "contract", ["federation.rounds=2", "model.name=builtin:tiny-olmoe",
                                                            "report.figures=true"]))
    on_disk = json.loads(rd.summary_path.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("algorithm", "model", "rounds", "seed", "wall_s", "clients", "global"):
        assert key in on_disk
    assert set(on_disk["global"]) >= {"rouge_l", "loss", "mmlu", "perplexity"}
    assert (rd.path / "config.yaml").is_file() and rd.report_path.is_file()
    assert (rd.path / "learning_curve.png").is_file()
    assert (rd.path / "expert_activation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![expert activation](expert_activation.png)" in rd.report_path.read_text()
    # exact bytes: every round each client receives and sends every LoRA tensor in fp32
    from fedmoe.moe import MoEModel

    mm = MoEModel.from_pretrained("builtin:tiny-olmoe")
    METHODS["fedit"].client.build(_cfg(tmp_path, "x", ["model.name=builtin:tiny-olmoe"]), mm)
    per_round = sum(t.numel() * 4 for t in mm.get_state().values())
    # 4 layers x (expert LoRA 8 experts x (r·128 + 512·r + r·256 + 128·r) + 4 attention x 2 x r·128), r=4
    r = 4
    assert per_round == 4 * 4 * (8 * (r * 128 + 512 * r + r * 256 + 128 * r) + 4 * 2 * r * 128)
    for c in on_disk["clients"]:  # and n_i goes up with the tensors: one 8-byte scalar
        assert c["bytes_up"] == 2 * (per_round + 8) and c["bytes_down"] == 2 * per_round
    # FLOPs per sequence of every client, from the analytic count at the client's k
    from fedmoe.eval import count_flops

    expected = count_flops(mm.config, 128, k=2, lora_rank=4)["flops_per_seq"]
    assert [c["flops_per_seq"] for c in on_disk["clients"]] == [expected] * 3
    rows = rd.read_metrics()
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 2 * 3 and all(r["bytes_up"] == per_round + 8 for r in train_rows)
    assert [r["round"] for r in rows if r["kind"] == "test" and r["client"] is None] == [0, 1, 2]
    # where each round's time went: the clients' training and evaluation, aggregation, the rest
    for rnd in (1, 2):
        [rr] = [r for r in rows if r["kind"] == "round" and r["round"] == rnd]
        work = sum(r["train_s"] for r in rows if r["kind"] == "train" and r["round"] == rnd) + sum(
            r["eval_s"] for r in rows if r["kind"] == "test" and r["round"] == rnd and r["client"] is not None)
        assert rr["clients_s"] == pytest.approx(work) and 0 < rr["clients_s"] < rr["wall_s"]
        assert rr["overhead_s"] == pytest.approx(rr["wall_s"] - rr["clients_s"] - rr["aggregate_s"])
        assert all(r["tokens_per_s"] == pytest.approx(r["tokens"] / r["train_s"]) for r in train_rows)
    assert "## Time per round" in rd.report_path.read_text()
    # ROUGE-L in the zero-shot round 0 and the final round only (eval.every_round is off)
    glob = {r["round"]: r for r in rows if r["client"] is None and r["kind"] == "test"}
    assert "rouge_l" in glob[0] and "rouge_l" in glob[2] and "rouge_l" not in glob[1]
    # the per-category breakdown averages the same per-example scores as the global number
    cats = glob[2]["rouge_l_by_category"]
    assert set(cats) <= {"brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                         "information_extraction", "open_qa", "summarization"}
    assert min(cats.values()) - 1e-9 <= glob[2]["rouge_l"] <= max(cats.values()) + 1e-9
    assert on_disk["zero_shot"]["loss"] == glob[0]["loss"]
    assert all(c["zero_shot"]["loss"] is not None for c in on_disk["clients"])
    assert "## Zero-shot vs federated fine-tuning" in rd.report_path.read_text()
    # the paired change pools the same examples as the global means (FedIT: every client's model is global)
    ch = on_disk["global"]["rouge_l_change"]
    assert ch["n"] == sum(c["n_generated"] for c in on_disk["clients"])
    assert ch["mean"] == pytest.approx(glob[2]["rouge_l"] - glob[0]["rouge_l"])
    assert ch["better"] + ch["worse"] + ch["equal"] == ch["n"]
    assert ch["low"] <= ch["mean"] <= ch["high"]
    assert f"paired over the {ch['n']} generated test examples" in rd.report_path.read_text()


def test_same_seed_same_numbers_and_exact_resume(tmp_path):
    full, _ = run_federated(_cfg(tmp_path, "full"))
    partial, rd = run_federated(_cfg(tmp_path, "killed"), stop_after_round=1)
    assert partial is None
    # starting it again without --resume would throw the checkpoint away: refused
    with pytest.raises(RunDirError, match="--resume"):
        run_federated(_cfg(tmp_path, "killed"))
    # a metrics row written after the checkpoint (a kill mid-round) is dropped on resume
    rd.log_metrics({"round": 2, "client": 0, "kind": "train", "loss": 123.0})
    resumed, _ = resume_federated(rd.path)
    for key in ("rouge_l", "loss", "perplexity", "rouge_l_change"):  # zero-shot scores survive the checkpoint
        assert resumed["global"][key] == full["global"][key]
    for a, b in zip(full["clients"], resumed["clients"]):
        assert (a["loss"], a["rouge_l"], a["bytes_up"], a["bytes_down"]) == (b["loss"], b["rouge_l"], b["bytes_up"], b["bytes_down"])
        assert a["expert_activation"] == b["expert_activation"]
    rows = rd.read_metrics()
    assert not any(r.get("loss") == 123.0 for r in rows)
    assert len([r for r in rows if r["kind"] == "train"]) == 3 * 3
    # and the same config again from scratch gives the same numbers (determinism on CPU)
    again, _ = run_federated(_cfg(tmp_path, "full"))
    assert again["global"]["loss"] == full["global"]["loss"]
    assert [c["loss"] for c in again["clients"]] == [c["loss"] for c in full["clients"]]


def test_partial_participation_trains_only_sampled_clients(tmp_path):
    summary, rd = run_federated(_cfg(tmp_path, "frac", ["federation.fraction=0.34", "federation.rounds=2",
                                                         "eval.rouge=false"]))
    rows = [r for r in rd.read_metrics() if r["kind"] == "train"]
    expected = [(r, c) for r in (1, 2) for c in sample_clients(3, 0.34, 0, r)]
    assert [(r["round"], r["client"]) for r in rows] == expected
    trained = {c["id"]: c["rounds_trained"] for c in summary["clients"]}
    assert sum(trained.values()) == 2


def test_fedprox_and_server_optimizer_change_the_result(tmp_path):
    base, _ = run_federated(_cfg(tmp_path, "b", ["federation.rounds=1", "eval.rouge=false"]))
    prox, _ = run_federated(_cfg(tmp_path, "p", ["federation.rounds=1", "eval.rouge=false", "algorithm.fedit.proximal_mu=10.0"]))
    adam, _ = run_federated(_cfg(tmp_path, "a", ["federation.rounds=1", "eval.rouge=false",
                                                 "algorithm.server_optimizer.name=fedadam"]))
    assert base["global"]["loss"] != prox["global"]["loss"]
    assert base["global"]["loss"] != adam["global"]["loss"]


def test_client_top_k_is_validated(tmp_path):
    from fedmoe.moe import TopKError

    with pytest.raises(TopKError, match="client 2 would activate k = 3 .* use 1..2"):
        run_federated(_cfg(tmp_path, "k", ["algorithm.client_top_k=[2,1,3]", "model.name=builtin:tiny-olmoe"]))


@pytest.mark.processes
def test_sigkill_then_cli_resume_matches_uninterrupted(tmp_path):
    """A real kill: the CLI run is SIGKILLed once its round-1 checkpoint exists, then resumed."""
    import signal
    import subprocess
    import sys
    import time

    sets = TINY + ["federation.rounds=3", f"output_dir={tmp_path}", "name=killed", "eval.zero_shot=false"]
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--quiet"] + [x for a in sets for x in ("--set", a)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoints" / "state.pt"
    deadline = time.time() + 300
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists() and not (tmp_path / "killed" / "summary.json").exists()
    done = torch.load(ck, weights_only=False)["round"]
    assert 1 <= done < 3
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--quiet", "--resume", str(tmp_path / "killed")],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    full, _ = run_federated(_cfg(tmp_path, "full", ["eval.zero_shot=false"]))
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert resumed["global"]["loss"] == full["global"]["loss"]
    assert [c["loss"] for c in resumed["clients"]] == [c["loss"] for c in full["clients"]]
    assert [c["rouge_l"] for c in resumed["clients"]] == [c["rouge_l"] for c in full["clients"]]


def test_general_perplexity_and_expert_load_std(tmp_path):
    summary, rd = run_federated(_cfg(tmp_path, "gen", ["federation.rounds=1", "eval.rouge=false", "eval.general_blocks=2",
                                                       "model.name=builtin:tiny-olmoe"]))
    rows = {r["round"]: r for r in rd.read_metrics() if r["client"] is None and r["kind"] == "test"}
    assert rows[0]["general_perplexity"] > 1 and rows[1]["general_perplexity"] > 1
    assert summary["zero_shot"]["general_perplexity"] == rows[0]["general_perplexity"]
    # load std by hand from the pooled activation counts
    counts = torch.tensor([c["expert_activation"] for c in summary["clients"]], dtype=torch.float64).sum(0)
    share = counts / counts.sum(1, keepdim=True)
    expected = share.std(1, unbiased=False).tolist()
    assert summary["global"]["expert_load_std"] == pytest.approx(expected)
    assert len(expected) == 4


def test_mmlu_in_a_run_equals_the_standalone_evaluation(tmp_path):
    from fedmoe.eval.mmlu import evaluate_mmlu
    from fedmoe.moe import MoEModel, load_tokenizer

    sets = ["federation.rounds=1", "eval.rouge=false", "eval.mmlu=[abstract_algebra,anatomy]",
            "eval.mmlu_max_per_subject=2", "model.name=builtin:tiny-olmoe"]
    summary, rd = run_federated(_cfg(tmp_path, "mmlu", sets))
    zs = [r for r in rd.read_metrics() if r["round"] == 0 and r["client"] is None][0]["mmlu"]
    mm = MoEModel.from_pretrained("builtin:tiny-olmoe")
    ref = evaluate_mmlu(mm.model, load_tokenizer("builtin:tiny-olmoe"), subjects=["abstract_algebra", "anatomy"],
                        max_per_subject=2, max_length=64 * 4)
    assert zs == pytest.approx(100 * ref["macro_accuracy"])  # round 0 = the untouched initial model
    assert summary["global"]["mmlu"] is not None and 0 <= summary["global"]["mmlu"] <= 100
    # the questions it is over and how the 5-shot prompts fitted 4 × data.max_length = 256 tokens: the same for every
    # model of the run (the tokenizer's and the limit's), into the rows, the summary and the report
    row = [r for r in rd.read_metrics() if r["round"] == 0 and r["client"] is None][0]
    assert row["mmlu_micro"] == pytest.approx(100 * ref["micro_accuracy"])
    facts = (ref["n"], ref["truncated"], ref["questions_cut"])
    assert facts[0] == 4 and facts[1] > 0  # these prompts lost shots
    for where in (row, summary["global"]):
        assert (where["mmlu_questions"], where["mmlu_fewer_shots"], where["mmlu_questions_cut"]) == facts
    assert 0 <= summary["global"]["mmlu_micro"] <= 100
    report = rd.report_path.read_text()
    assert f"MMLU (5-shot; {facts[1]} of 4 prompts kept fewer shots to fit the prompt limit, mean over subjects)" in report
    assert f", {summary['global']['mmlu_micro']:.2f} over its 4 questions" in report


def test_answers_and_their_prompts_stay_within_the_models_positions(tmp_path, monkeypatch):
    """A prompt cut to data.max_length tokens with eval.max_new_tokens generated after it ran past the model's
    positions (1024 + 32 on a 1024-position model: transformers only warns, and the answer is not the model's). The
    prompts are cut from the left to positions − max_new_tokens, in a run's evaluation and in `fedmoe generate`; new
    tokens that leave no position for a prompt are refused before the run starts."""
    import fedmoe.eval.generate as generate
    import fedmoe.federation.evaluation as evaluation
    from fedmoe.config import ConfigError
    from fedmoe.data.sources import Example
    from fedmoe.data.tokenize import tokenize_prompt
    from fedmoe.eval.generate import generation_prompt_limit
    from fedmoe.export import answer, load_for_answers
    from fedmoe.moe import load_tokenizer
    from helpers import hf_folder

    assert generation_prompt_limit(type("C", (), {"max_position_embeddings": 64})(), 64, 8) == 56
    assert generation_prompt_limit(type("C", (), {"max_position_embeddings": 64})(), 48, 8) == 48
    assert generation_prompt_limit(type("C", (), {})(), 64, 8) == 64  # no positions known: data.max_length's
    folder = hf_folder(tmp_path, "olmoe", "short")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    seen = []

    def spy(real):
        def inner(model, prompts, *args, **kwargs):
            new = kwargs["max_new_tokens"] if "max_new_tokens" in kwargs else args[2]
            seen.append((max(map(len, prompts)), new))
            return real(model, prompts, *args, **kwargs)
        return inner

    monkeypatch.setattr(evaluation, "greedy_generate", spy(evaluation.greedy_generate))
    sets = [f"model.name={folder}", "data.max_length=64", "eval.max_new_tokens=8", "eval.max_examples=6",
            "federation.rounds=1", "eval.zero_shot=false"]
    summary, rd = run_federated(_cfg(tmp_path, "short", sets))
    assert seen and max(n + new for n, new in seen) == 64  # the longest prompts cut to 56, the answers after them
    tok = load_tokenizer(str(folder))
    long = Example(instruction="Say it again. " * 40, input="", output="", category="", source="prompt")
    monkeypatch.setattr(generate, "greedy_generate", spy(generate.greedy_generate))
    seen.clear()
    answer(load_for_answers(rd.path), long.instruction, max_new_tokens=8)
    assert seen == [(56, 8)]
    assert len(tokenize_prompt(tok, long, 64)) == 64  # (data.max_length alone would have given it 64)
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens = 64: 64 new tokens leave no position for a prompt"):
        run_federated(_cfg(tmp_path, "none", [*sets[:2], "eval.max_new_tokens=64"]))
    assert not (tmp_path / "none").exists()


def test_the_evaluation_carries_mmlus_own_numbers_under_their_names(monkeypatch):
    """A run's MMLU prompts are as many per subject (eval.mmlu_max_per_subject), so there its mean over subjects and
    its accuracy over questions coincide: which is which, and which count is which, is checked here on numbers that
    differ."""
    import fedmoe.eval.mmlu as mmlu
    from fedmoe.federation.evaluation import ModelEvaluator
    from fedmoe.moe import MoEModel, load_tokenizer

    monkeypatch.setattr(mmlu, "evaluate_mmlu", lambda *a, **k: {"macro_accuracy": 0.5, "micro_accuracy": 0.25, "n": 9,
                                                                "truncated": 4, "questions_cut": 1})
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "eval.mmlu=[anatomy]"])
    ev = ModelEvaluator(cfg, MoEModel.from_pretrained("builtin:tiny-olmoe"), load_tokenizer("builtin:tiny-olmoe"), 0)
    got = ev.evaluate_sets([], with_answers=False, general=True)
    assert {k: got[k] for k in ("mmlu", "mmlu_micro", "mmlu_questions", "mmlu_fewer_shots", "mmlu_questions_cut")} == \
        {"mmlu": 50.0, "mmlu_micro": 25.0, "mmlu_questions": 9, "mmlu_fewer_shots": 4, "mmlu_questions_cut": 1}
