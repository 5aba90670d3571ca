"""The memory plan (fedmoe plan): estimated on fake tensors, within 15% of the same training step run
on real tensors, per budget level, with the weights and adapters counted exactly; a run on a GPU
whose plan exceeds the free memory is refused before anything is loaded, naming the keys to change."""

import subprocess
import sys

import pytest

from fedmoe.algorithms import get_method
from fedmoe.config import ConfigError, load_config
from fedmoe.plan import check_fits, format_plan, memory_plan, training_step_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.name=builtin:tiny-olmoe", "data.max_length=48", "train.batch_size=2", "eval.batch_size=2"]


@pytest.mark.parametrize("sets", [["algorithm.name=fedit"], ["algorithm.name=fedit", "model.quantization=nf4"],
                                  ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]"],
                                  ["algorithm.name=flex", "lora.experts=false"]],
                         ids=["fedit", "fedit-nf4", "flame", "flex"])
def test_plan_is_within_15_percent_of_the_real_step(sets):
    cfg = load_config(None, [*SMALL, *sets])
    plans = memory_plan(cfg)
    method = get_method(cfg.algorithm.name)
    for p in plans:
        real = training_step_bytes(cfg, method, p.k, fake=False)
        assert abs(p.training - sum(real.values())) <= 0.15 * sum(real.values()), (p.peak, real)
        assert p.peak["weights"] == real["weights"] and p.peak["adapters"] == real["adapters"]
        assert p.peak["optimizer"] == 2 * p.peak["adapters"] == 2 * p.peak["gradients"]  # AdamW: m and v
        assert p.peak["activations"] > 0


@pytest.mark.parametrize("arch", ["granitemoe", "lfm2_moe"])
def test_plan_of_a_granite_or_lfm2_model_is_within_15_percent_of_the_real_step(arch, tmp_path):
    """The plan of a saved tiny Granite-MoE (its multipliers) and LFM2-MoE (short convolutions, a dense layer), what
    README's will-it-fit rows for them rest on, against the same step on real tensors."""
    from helpers import hf_folder

    cfg = load_config(None, [f"model.name={hf_folder(tmp_path, arch)}", "data.max_length=48", "train.batch_size=2"])
    (plan,) = memory_plan(cfg)
    real = training_step_bytes(cfg, get_method("fedit"), plan.k, fake=False)
    assert abs(plan.training - sum(real.values())) <= 0.15 * sum(real.values()), (plan.peak, real)
    assert plan.peak["weights"] == real["weights"] and plan.peak["activations"] > 0


def test_plan_counts_what_the_model_holds():
    """Weights: every frozen tensor's bytes (an NF4 base: its codes and scales); adapters: the
    trainables the method builds; FLAME's lower k keeps fewer activations."""
    from fedmoe.federation.local import load_client_model
    from fedmoe.moe.quant import stored_bytes

    planned = {}
    for name, sets in (("full", ["algorithm.name=fedit"]), ("nf4", ["algorithm.name=fedit", "model.quantization=nf4"])):
        cfg = load_config(None, [*SMALL, *sets])
        mm = load_client_model(cfg, get_method("fedit"))
        trainable = sum(p.numel() * p.element_size() for p in mm.trainable_parameters().values())
        (planned[name],) = memory_plan(cfg)
        assert planned[name].peak["adapters"] == trainable
        assert planned[name].peak["weights"] + planned[name].peak["adapters"] == stored_bytes(mm.model)
    flame = memory_plan(load_config(None, [*SMALL, "algorithm.name=flame", "algorithm.budgets.top_k=[2,1]"]))
    assert [p.k for p in flame] == [2, 1] and flame[0].clients == [0, 2] and flame[1].clients == [1, 3]
    assert flame[0].peak["activations"] > flame[1].peak["activations"]
    assert planned["nf4"].peak["weights"] < planned["full"].peak["weights"]


def test_plan_follows_the_precision_the_run_trains_in():
    """Under bf16 autocast (`train.bf16: on`, or auto on CUDA) the plan's step runs under autocast too:
    other activations (bf16 matmul outputs, the frozen dense weights' bf16 copies kept for the
    backward), the same weights; the experts take the grouped path as the run does, so the plan is the
    real step's count. `auto` on the CPU trains in fp32, and so does its plan."""
    off = memory_plan(load_config(None, [*SMALL, "train.bf16=off"]))[0]
    on_cfg = load_config(None, [*SMALL, "train.bf16=on"])
    on = memory_plan(on_cfg)[0]
    auto_cpu = memory_plan(load_config(None, [*SMALL, "model.device=cpu"]))[0]
    assert on.peak["weights"] == off.peak["weights"] and on.peak["adapters"] == off.peak["adapters"]
    assert on.peak["activations"] != off.peak["activations"]
    assert auto_cpu.peak == off.peak
    # the evaluation is not under autocast (train.bf16 is training's): the same passes as without it
    assert on.passes == off.passes and auto_cpu.passes == off.passes
    real = training_step_bytes(on_cfg, get_method("fedit"), on.k, fake=False)
    assert abs(on.total - sum(real.values())) <= 0.01 * sum(real.values()), (on.peak, real)
    # planned here for a GPU run (`fedmoe plan --device cuda`): its precision, and no verdict without the GPU
    from fedmoe.plan import device_memory

    cuda_cfg = load_config(None, [*SMALL, "model.device=cuda"])
    cuda = memory_plan(cuda_cfg)
    assert cuda[0].peak == on.peak
    text = format_plan(cuda_cfg, cuda, *device_memory("cuda"))
    assert text.splitlines()[0].endswith("float32 on cuda with bf16 autocast")
    if not __import__("torch").cuda.is_available():
        assert text.splitlines()[-1].startswith("cuda: no CUDA device on this machine") and "fits" not in text
        check_fits(cuda_cfg, log=lambda *a: pytest.fail("nothing to check against"))


def test_a_gpu_run_that_does_not_fit_is_refused_naming_the_keys(monkeypatch):
    import fedmoe.plan as plan_mod
    import fedmoe.moe.model as model_mod

    cfg = load_config(None, [*SMALL, "model.device=cuda"])
    monkeypatch.setattr(model_mod, "resolve_device", lambda d: __import__("torch").device("cuda"))
    monkeypatch.setattr(plan_mod, "device_memory", lambda d: ("free memory of a test GPU", 10 * 2**20))
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, log=lambda *a: None)
    text = str(e.value)
    assert "does NOT fit" in text and "model.quantization=nf4" in text and "train.batch_size" in text
    # nothing of what was planned again fits 10 MiB: every change tried, then the other keys
    assert "train.activation_checkpointing=true: " in text and "train.batch_size=1 train.grad_accum=2: " in text
    assert " fits" not in text and "other keys that shrink it" in text
    monkeypatch.setattr(plan_mod, "device_memory", lambda d: ("free memory of a test GPU", 80 * 2**30))
    said = []
    check_fits(cfg, log=said.append)
    assert said and "memory plan: peak" in said[0] and "tight" not in said[0]
    peak = max(p.total for p in memory_plan(cfg))  # within 10% of the free memory: said to be tight
    monkeypatch.setattr(plan_mod, "device_memory", lambda d: ("free memory of a test GPU", int(peak / 0.95)))
    said.clear()
    check_fits(cfg, log=said.append)
    assert "tight (over 90%)" in said[0] and "train.activation_checkpointing=true would leave more room" in said[0]
    cpu = load_config(None, [*SMALL, "model.device=cpu"])
    monkeypatch.setattr(model_mod, "resolve_device", lambda d: __import__("torch").device("cpu"))
    check_fits(cpu, log=lambda *a: pytest.fail("a CPU run is not checked"))


def test_a_simulated_client_is_checked_against_its_share_of_the_gpu(monkeypatch):
    """flower-sim puts 1 / client_gpus clients, each with its model, on a GPU: each is planned against that share
    of the free memory; a deployment's clients train elsewhere (nothing checked here)."""
    import fedmoe.moe.model as model_mod
    import fedmoe.plan as plan_mod

    monkeypatch.setattr(model_mod, "resolve_device", lambda d: __import__("torch").device("cuda"))
    sim = [*SMALL, "model.device=cuda", "federation.runtime=flower-sim"]
    peak = max(p.total for p in memory_plan(load_config(None, sim)))
    monkeypatch.setattr(plan_mod, "device_memory", lambda d: ("free memory of a test GPU", int(peak * 1.5)))
    said = []
    check_fits(load_config(None, sim), log=said.append)  # a GPU per client (the default): fits
    assert said and "of the free memory of a test GPU" not in said[0]
    with pytest.raises(ConfigError) as e:  # half a GPU each: 0.75 of the peak
        check_fits(load_config(None, [*sim, "federation.simulation.client_gpus=0.5"]), log=lambda *a: None)
    assert "does NOT fit" in str(e.value) and "federation.simulation.client_gpus = 0.5 of the free memory" in str(e.value)
    check_fits(load_config(None, [*sim, "federation.simulation.client_gpus=0.7"]), log=said.append)
    assert f"of {int(peak * 1.5 * 0.7) / 2**30:.2f} GiB" in said[-1]
    check_fits(load_config(None, [*sim[:-1], "federation.runtime=flower", "federation.simulation.client_gpus=0.1"]),
               log=lambda *a: pytest.fail("a deployment is not checked here"))
    # `fedmoe plan --memory 1` (a card elsewhere) for a simulation at a quarter of a GPU per client: a quarter of it
    from fedmoe.plan import client_memory

    quarter = load_config(None, [*sim, "federation.simulation.client_gpus=0.25"])
    assert client_memory(quarter, ("--memory 1 GiB", 2**30)) == (
        "federation.simulation.client_gpus = 0.25 of the --memory 1 GiB (each simulated client's share; a larger one "
        "puts fewer clients on a GPU)", 2**28)
    assert client_memory(load_config(None, sim[:-1]), ("--memory 1 GiB", 2**30)) == ("--memory 1 GiB", 2**30)


def test_fedmoe_plan_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedmoe.cli", "plan", "--set", "model.name=builtin:tiny-olmoe",
                          "--set", "data.max_length=48", "--set", "train.batch_size=2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("| k | clients | weights | adapters | gradients | optimizer | method state | activations | training | "
            "evaluation | peak |") in out.stdout
    assert "this machine's memory" in out.stdout and "fits" in out.stdout
    cfg = load_config(None, SMALL)
    assert format_plan(cfg, memory_plan(cfg)).splitlines()[3].startswith("| 2 | 0, 1, 2, 3 |")


def test_the_plan_says_which_changes_make_it_fit():
    """A plan that does not fit is planned again with each change on top of the ones before —
    activation checkpointing (the same numbers), half the batch with twice the accumulation (the same
    step), then an NF4 base — until one fits; each peak is that config's own plan. With room between
    the checkpointed and the halved-batch peak, the list stops at the halved batch."""
    from fedmoe.plan import remedies

    cfg = load_config(None, [*SMALL, "train.batch_size=4"])
    plans = memory_plan(cfg)
    ckpt = memory_plan(load_config(None, [*SMALL, "train.batch_size=4", "train.activation_checkpointing=true"]))[0]
    half = memory_plan(load_config(None, [*SMALL, "train.batch_size=2", "train.grad_accum=2",
                                          "train.activation_checkpointing=true"]))[0]
    assert half.total < ckpt.total < plans[0].total
    tried = remedies(cfg, plans, available=(ckpt.total + half.total) // 2)
    assert tried == [(["train.activation_checkpointing=true"], ckpt.total),
                     (["train.batch_size=2", "train.grad_accum=2"], half.total)]
    text = format_plan(cfg, plans, "free memory of a test GPU", (ckpt.total + half.total) // 2)
    assert "train.batch_size=2 train.grad_accum=2: " in text and text.rstrip().endswith("fits")
    assert "other keys" not in text
    # checkpointing every 2nd layer is not every layer: that is tried first (it changes no number), not the batch
    every2 = load_config(None, [*SMALL, "train.batch_size=4", "train.activation_checkpointing=2"])
    partial = memory_plan(every2)
    assert partial[0].total > ckpt.total
    assert remedies(every2, partial, available=ckpt.total) == [(["train.activation_checkpointing=true"], ckpt.total)]
    # every change already made: nothing to try, the other keys are named
    done = load_config(None, [*SMALL, "train.batch_size=1", "train.activation_checkpointing=true",
                              "model.quantization=nf4", "eval.batch_size=1"])
    assert remedies(done, memory_plan(done), available=1) == []


def test_a_quantized_plan_runs_eight_experts_a_layer_and_counts_the_same(monkeypatch):
    """On fake tensors a quantized stack takes the per-expert loop, and a layer's routed slots go to the
    first 8 experts (of the built-in model's 16): the step keeps what depends on the slots, not on how
    many experts share them. Spread over all 16 (the mutation) the plan counts within 1% of it, with
    twice the loop."""
    import fedmoe.moe.lora as lora_mod
    import fedmoe.moe.quant as quant

    seen = []
    real = quant.quantized_proj
    monkeypatch.setattr(quant, "quantized_proj", lambda a, w: (seen.append(w[1]), real(a, w))[1])
    cfg = load_config(None, ["model.name=builtin:tiny-moe", "data.max_length=64", "train.batch_size=2",
                             "model.quantization=nf4"])
    (eight,) = memory_plan(cfg)
    assert seen and set(seen) == set(range(8))
    seen.clear()
    monkeypatch.setattr(lora_mod, "PLAN_EXPERT_GROUPS", 16)
    (sixteen,) = memory_plan(cfg)
    assert set(seen) == set(range(16))
    assert abs(eight.total - sixteen.total) <= 0.01 * sixteen.total, (eight.peak, sixteen.peak)



def test_fedmoe_plan_exits_1_when_it_does_not_fit(tmp_path):
    """A script can test the verdict: 0 when the plan fits, 1 when it does NOT fit, with the plan and what would
    shrink it still printed; --memory GiB compares with that much memory in place of the device's (a card on
    another machine)."""
    from typer.testing import CliRunner

    from fedmoe.cli import app
    from fedmoe.moe.tiny import tiny_config

    tiny_config("olmoe").save_pretrained(tmp_path)
    args = ["plan", "--set", f"model.name={tmp_path / 'config.json'}", "--set", "data.max_length=16", "--set",
            "train.batch_size=1", "--device", "cpu"]
    out = CliRunner().invoke(app, [*args, "--memory", "0.0001"])
    assert out.exit_code == 1, out.output
    assert "--memory 0.0001 GiB: 0.1 MiB" in out.output and "does NOT fit" in out.output
    assert "other keys that shrink it" in out.output
    out = CliRunner().invoke(app, [*args, "--memory", "1"])
    assert out.exit_code == 0 and "--memory 1 GiB: 1.00 GiB; the largest level's peak 0.5 MiB fits" in out.output, out.output


def _real_step_peak(cfg, examples) -> int:
    """The bytes of a real local training round (train_local, its own batching, loss and objective) on
    ``examples``: the weights, the adapters and the peak of what the round creates, counted as the plan counts."""
    import torch

    from fedmoe.federation.local import load_client_model
    from fedmoe.messages import Message
    from fedmoe.plan import _LiveBytes
    from fedmoe.train import train_local

    method = get_method(cfg.algorithm.name)
    mm = load_client_model(cfg, method)
    half = method.client(cfg)
    stored = sum(t.numel() * t.element_size() for t in [*mm.model.parameters(), *mm.model.buffers()])
    private, _ = half.setup(0, mm, examples)
    message = Message({n: t.detach().clone() for n, t in mm.get_state().items()})
    if cfg.algorithm.name == "scaffold":  # the server's control c (zeros at the start) rides in the message
        message = Message({**message.tensors, **{f"c/{n}": torch.zeros_like(t) for n, t in mm.get_state().items()}})
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])
    with live:
        objective = half.objective(0, mm, message, private)
        train_local(mm, examples, cfg.train, pad_id=0, lr=cfg.train.lr, seed=0, objective=objective)
    return stored + live.peak


@pytest.mark.parametrize("sets", [["algorithm.name=fedit"], ["algorithm.name=fedit", "train.activation_checkpointing=true"],
                                  ["algorithm.name=scaffold"], ["algorithm.name=fedit", "algorithm.fedit.proximal_mu=0.1"]],
                         ids=["fedit", "checkpointed", "scaffold", "fedprox"])
def test_the_plan_holds_a_real_round_whose_response_fills_the_sequence(sets):
    """A one-token prompt and a response of the rest (the LM head on every position): the plan had labels on half
    the positions and no method state, and was 21% under such a round checkpointed and short of SCAFFOLD's
    correction and gradient sum. Now it is at least the round's real peak, and at most 20% over it (checkpointed: 15%
    over; the plan's own step on real tensors is within 15%, test above)."""
    L = 48
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", f"data.max_length={L}", "train.batch_size=2",
                             "train.max_steps=2", "eval.batch_size=1", *sets])
    examples = [{"input_ids": [7 + i] + list(range(100 + i, 100 + i + L - 1)),
                 "labels": [-100] + list(range(100 + i, 100 + i + L - 1))} for i in range(4)]
    real = _real_step_peak(cfg, examples)
    (plan,) = memory_plan(cfg)
    assert real <= plan.training <= 1.2 * real, (plan.peak, real)
    if cfg.algorithm.name == "scaffold":  # c − c_i and the float64 gradient sum: 3x the fp32 adapters
        assert plan.peak["method state"] == 3 * plan.peak["adapters"]
    elif "proximal_mu" in sets[-1]:
        assert plan.peak["method state"] == plan.peak["adapters"]
    else:
        assert plan.peak["method state"] == 0


def test_the_evaluation_pass_is_planned_and_can_be_the_peak():
    """At batch 1 for training and 16 for evaluation the test loss's forward (logits over the vocabulary at every
    position) holds more than the training step: the plan's peak is the evaluation's, within 15% of the same forward on
    real tensors, and its remedy is a smaller eval.batch_size first (it changes no trained number)."""
    from fedmoe.plan import evaluation_bytes, remedies

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "data.max_length=48", "train.batch_size=1",
                             "eval.batch_size=16"])
    (plan,) = memory_plan(cfg)
    assert plan.evaluating > plan.training and plan.total == plan.evaluating
    real = evaluation_bytes(cfg, get_method("fedit"), plan.k, fake=False)["test loss"]
    assert plan.largest_pass == "test loss" and abs(plan.evaluation - real) <= 0.15 * real, (plan.passes, real)
    tried = remedies(cfg, [plan], available=(plan.training + plan.evaluating) // 2)
    assert tried[0][0] == ["eval.batch_size=8"] and tried[-1][1] <= (plan.training + plan.evaluating) // 2


def test_an_odd_batch_is_split_by_its_smallest_factor_before_nf4():
    """Batch 6 was halved once to 3 and then the remedies jumped to NF4 (other numbers) though batch 1 x 6 keeps the
    step's examples and fits."""
    from fedmoe.plan import remedies

    cfg = load_config(None, [*SMALL, "train.batch_size=6", "train.activation_checkpointing=true"])
    plans = memory_plan(cfg)
    one = memory_plan(load_config(None, [*SMALL, "train.batch_size=1", "train.grad_accum=6",
                                         "train.activation_checkpointing=true"]))[0]
    tried = remedies(cfg, plans, available=one.total)
    assert [step for step, _ in tried] == [["train.batch_size=3", "train.grad_accum=2"],
                                           ["train.batch_size=1", "train.grad_accum=6"]]
    assert tried[-1][1] == one.total


@pytest.mark.parametrize("shape", [(48, 16, 4), (32, 8, 8)], ids=["prompt-peak", "last-step-peak"])
def test_generation_and_mmlu_are_planned_against_the_real_passes(shape):
    """Greedy generation (its key/value cache) and MMLU's long prompts were not planned; and without gradients the
    plan's expert path held an eighth of the experts' intermediate the real grouped path holds (MMLU: 0.38 of the
    real pass). Each pass is now within 5% of the run's own code on real tensors: greedy_generate on prompts of
    data.max_length tokens that never stop early, and MMLU's letter scoring on prompts of 4 x data.max_length."""
    import torch

    from fedmoe.eval.generate import greedy_generate
    from fedmoe.eval.mmlu import score_letters
    from fedmoe.plan import _LiveBytes, _planned_model, evaluation_bytes

    L, N, B = shape
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", f"data.max_length={L}", f"eval.batch_size={B}",
                             f"eval.max_new_tokens={N}", "eval.mmlu=quick", "eval.no_repeat_ngram_size=0"])
    (plan,) = memory_plan(cfg)
    assert set(plan.passes) == {"test loss", "generation", "MMLU"}
    assert plan.passes == evaluation_bytes(cfg, get_method("fedit"), plan.k)
    mm, config = _planned_model(cfg, get_method("fedit"), plan.k)
    mm.model.eval()
    g = torch.Generator().manual_seed(1)

    def real(run, length):
        prompts = [torch.randint(5, config.vocab_size, (length,), generator=g).tolist() for _ in range(B)]
        live = _LiveBytes()
        live.exclude([*mm.model.parameters(), *mm.model.buffers()])
        with live:
            out = run(prompts)
        return live.peak, out

    generated, out = real(lambda p: greedy_generate(mm.model, p, 0, config.vocab_size + 1, N, B, "cpu"), L)
    assert [len(o) for o in out] == [N] * B  # no eos: every step taken
    assert abs(plan.passes["generation"] - generated) <= 0.05 * generated, (plan.passes, generated)
    mmlu, _ = real(lambda p: score_letters(mm.model, p, [5, 6, 7, 8], batch_size=B, device="cpu"), 4 * L)
    assert abs(plan.passes["MMLU"] - mmlu) <= 0.05 * mmlu, (plan.passes, mmlu)
    without = memory_plan(load_config(None, ["model.name=builtin:tiny-olmoe", f"data.max_length={L}",
                                             f"eval.batch_size={B}", "eval.rouge=false"]))[0]
    assert list(without.passes) == ["test loss"]


def test_sweep_points_that_differ_in_their_evaluation_passes_get_plans_of_their_own():
    """A sweep's points with and without MMLU (or generation) were planned once together, the first point's
    evaluation standing for both: a point whose MMLU pass did not fit was said to fit."""
    from fedmoe.plan import distinct_plans

    base = ["model.name=builtin:tiny-olmoe", "data.max_length=48", "train.batch_size=1"]
    points = [(name, load_config(None, [*base, *sets])) for name, sets in (
        ("plain", []), ("mmlu", ["eval.mmlu=quick"]), ("choice", ["eval.task=choice", "data.field_map={label: category}"]),
        ("long answers", ["eval.max_new_tokens=200"]), ("plain again", ["eval.every_round=true"]))]
    assert sorted(sorted(names) for _, names in distinct_plans(points)) == [
        ["choice"], ["long answers"], ["mmlu"], ["plain", "plain again"]]


def test_tied_embeddings_are_weights_once():
    """A model whose output head is its input embedding (tie_word_embeddings: Granite-MoE's checkpoints) holds that
    matrix once: the plan's weights count every tensor once (they counted it twice: 12 MiB too many at 50k × 64)."""
    from fedmoe.moe.model import hf_from_config
    from fedmoe.moe.quant import stored_bytes
    from fedmoe.moe.tiny import tiny_config

    config = tiny_config("qwen3_moe", vocab_size=5000)
    config.tie_word_embeddings = True
    hf = hf_from_config(config)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    unique = {id(t): t.numel() * t.element_size() for t in [*hf.parameters(), *hf.buffers()]}
    assert stored_bytes(hf) == sum(unique.values())
    assert stored_bytes(hf) < sum(t.numel() * t.element_size() for m in hf.modules() for t in m.parameters(recurse=False))


def test_a_choice_tasks_option_scoring_is_planned_against_the_real_pass(tmp_path):
    """A choice task's option scoring was left out of the plan ("below the test loss's"), but the evaluator copied
    its prompts' key/value cache for every option (each ends with eos, so each has a row) and takes the options'
    logits twice in float32: on OLMoE-1B-7B's shape at eval.batch_size 8 and 512 tokens it was 4.2 GiB against the
    test loss's 1.6 (1.2 since the option rows go a batch at a time). The plan runs the evaluator's own batch
    (eval.choice.option_logprobs) on fake tensors: within 1% of option_logprobs on real tensors, with the label set's
    options; a per-example options field plans its largest count and longest option."""
    import json

    import torch

    from fedmoe.data.prepare import answer_options
    from fedmoe.data.tokenize import option_ids
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.moe.model import load_tokenizer
    from fedmoe.plan import _LiveBytes, _planned_model, choice_shape

    L, B = 64, 16
    cfg = load_config(None, ["model.name=builtin:tiny-moe", f"data.max_length={L}", f"eval.batch_size={B}",
                             "eval.task=choice", "data.field_map={label: category}"])
    (plan,) = memory_plan(cfg)
    assert set(plan.passes) == {"test loss", "choice"}
    tok = load_tokenizer(cfg.model.name)
    (labels,) = answer_options(cfg)
    assert len(labels) == 8 and "information_extraction" in labels
    options = option_ids(tok, labels)
    longest = max(len(o) for o in options)
    assert choice_shape(cfg) == (8, longest, longest, tuple(len(o) for o in options))
    assert min(len(o) for o in options) >= 2
    mm, config = _planned_model(cfg, get_method("fedit"), plan.k)
    mm.model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, config.vocab_size, (L - longest,), generator=g).tolist() for _ in range(B)]
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])
    with torch.no_grad(), live:
        option_logprobs(mm.model, prompts, [options] * B, B, "cpu")
    assert abs(plan.passes["choice"] - live.peak) <= 0.01 * live.peak, (plan.passes, live.peak)
    # (a batch of option rows at a time: about twice the prompts' cache, below the test loss's logits here)
    assert plan.largest_pass == ("choice" if plan.passes["choice"] > plan.passes["test loss"] else "test loss")
    assert "the scoring of 8 options of up to" in format_plan(cfg, [plan], "", None)

    quiz = tmp_path / "quiz.jsonl"
    rows = [{"instruction": f"2 + {i} = ?", "output": str(2 + i),
             "options": [str(2 + i), "no"] if i % 2 else [str(2 + i), "maybe so, or perhaps not at all", "no"]}
            for i in range(12)]
    quiz.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    def per_sets(path):
        return ["model.name=builtin:tiny-moe", f"data.source={path}", "data.field_map={options: options}",
                "eval.task=choice"]

    per = load_config(None, per_sets(quiz))
    # each example's options: its longest in tokens; the plan takes the most options, the longest option and
    # prompts cut for the example whose longest option is shortest (a client's prompts are cut to L minus its longest)
    tops = [max(len(o) for o in option_ids(tok, r["options"])) for r in rows]
    assert choice_shape(per) == (3, max(tops), min(tops), None) and min(tops) < max(tops)  # options differ
    # the plan bounds a batch of the short-option examples (the longest prompts) and of the long-option ones (the most rows)
    per = load_config(None, [*per_sets(quiz), f"data.max_length={L}", "eval.batch_size=4"])
    (planned,) = memory_plan(per)
    for opts in (option_ids(tok, rows[1]["options"]) + [option_ids(tok, ["no"])[0]], option_ids(tok, rows[0]["options"])):
        prompts = [torch.randint(5, config.vocab_size, (L - max(len(o) for o in opts),), generator=g).tolist()
                   for _ in range(4)]
        live = _LiveBytes()
        live.exclude([*mm.model.parameters(), *mm.model.buffers()])
        with torch.no_grad(), live:
            option_logprobs(mm.model, prompts, [opts] * 4, 4, "cpu")
        assert planned.passes["choice"] >= live.peak, (planned.passes, live.peak, opts)


def test_a_sliding_window_models_option_scoring_is_planned_as_it_runs(tmp_path, monkeypatch):
    """Past gpt-oss's sliding window the evaluator encodes the prompts once padded on the left (right padding had
    the window counted over the padding); the plan runs that same path on fake tensors, within 1% of the real pass
    with prompts of three lengths."""
    import torch
    from helpers import hf_folder

    import fedmoe.eval.choice as choice
    from fedmoe.data.prepare import answer_options
    from fedmoe.data.tokenize import option_ids
    from fedmoe.moe.model import load_tokenizer
    from fedmoe.plan import _LiveBytes, _planned_model

    L, B = 64, 8
    folder = hf_folder(tmp_path, "gpt_oss")
    cfg = load_config(None, [f"model.name={folder}", f"data.max_length={L}", f"eval.batch_size={B}",
                             "eval.task=choice", "data.field_map={label: category}"])
    lefts = []
    once = choice.cached_batch
    monkeypatch.setattr(choice, "cached_batch", lambda *a, left=False: lefts.append(left) or once(*a, left=left))
    (plan,) = memory_plan(cfg)
    assert lefts == [True]  # the plan's batch: prompts of L - 5 tokens, past the window of 4
    options = option_ids(load_tokenizer(str(folder)), answer_options(cfg)[0])
    mm, config = _planned_model(cfg, get_method("fedit"), plan.k)
    mm.model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, config.vocab_size, (L - max(len(o) for o in options) - i % 3,), generator=g).tolist()
               for i in range(B)]
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])
    with torch.no_grad(), live:
        choice.option_logprobs(mm.model, prompts, [options] * B, B, "cpu")
    assert lefts == [True, True]
    assert abs(plan.passes["choice"] - live.peak) <= 0.01 * live.peak, (plan.passes, live.peak)
