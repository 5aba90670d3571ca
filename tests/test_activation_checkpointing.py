"""`train.activation_checkpointing`: each decoder layer keeps only its input in the forward and runs
again in the backward. It must change memory only: the same losses, adapters, expert counts and
tokens bit for bit on the CPU, for every method's model (FLEx's grafted experts behind their hook,
FLAME's rescaler at a client's lower k, a quantized base, shared experts, dropout, padding skipped,
accumulated micro-batches), and a run that ran out of memory says to switch it on and resume, and then
ends where the uninterrupted run ends."""

import itertools

import pytest
import torch

from fedmoe.algorithms import get_method
from fedmoe.config import ConfigError, load_config
from fedmoe.federation import resume_federated, run_federated
from fedmoe.federation.local import load_client_model
from fedmoe.moe.arch import token_mixers
from fedmoe.plan import memory_plan, training_step_bytes
from fedmoe.train import _steps, train_local

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.name=builtin:tiny-olmoe", "data.max_length=48", "train.batch_size=2", "lora.rank=4"]


def _examples(n=6):
    """Token sequences of different lengths (so batches carry padding), prompt masked out of the labels."""
    g = torch.Generator().manual_seed(9)
    out = []
    for i in range(n):
        length = 10 + 3 * i
        ids = torch.randint(3, 100, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def _train(sets, setting):
    """(result, trainable state, forward calls of the decoder layers' attention) of a client's local training."""
    cfg = load_config(None, [*SMALL, *sets, f"train.activation_checkpointing={setting}"])
    method = get_method(cfg.algorithm.name)
    mm = load_client_model(cfg, method)
    half = method.client(cfg)
    mm.set_top_k(half.top_k(1, mm))  # client 1: FLAME's lower budget level
    calls = []
    layers = mm.model.model.layers
    # on the attention inside each layer: transformers checkpoints a layer's forward, not its __call__
    hooks = [token_mixers(layer)[0].register_forward_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(layers)]
    result = train_local(mm, _examples(), cfg.train, pad_id=0, lr=cfg.train.lr, seed=4)
    for h in hooks:
        h.remove()
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in layers)  # off again afterwards
    assert not mm.model.get_input_embeddings()._forward_hooks  # no hook left behind (one more each round)
    return result, {n: p.detach().clone() for n, p in mm.trainable_parameters().items()}, calls


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A tiny Qwen3.5 (linear attention in layers 0 and 2, softmax attention in 1 and 3) as a model folder."""
    from helpers import tiny_hf

    folder = tmp_path_factory.mktemp("qwen35")
    tiny_hf("qwen3_5_moe_text", num_layers=4).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sets", [
    ["algorithm.name=fedit", "lora.dropout=0.1", "train.grad_accum=2"],
    ["algorithm.name=flex"],
    ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]"],
    ["algorithm.name=fedit", "model.quantization=nf4"],
    ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "model.name={hybrid}"],
], ids=["fedit-dropout-accum", "flex", "flame-k1", "fedit-nf4", "flame-k1-hybrid"])
def test_checkpointed_training_gives_the_same_numbers(sets, hybrid):
    sets = [s.format(hybrid=hybrid) for s in sets]  # the hybrid model's recurrent layers recompute their state
    plain, state, calls = _train(sets, "false")
    n_layers, steps = max(calls) + 1, plain.steps
    accum = 2 if "train.grad_accum=2" in sets else 1  # six examples in steps of 4: micro-batches 2, 1, 2, ...
    micro = sum(len(step) for step in itertools.islice(_steps(6, 2, accum, torch.Generator(), None), steps))
    assert len(calls) == micro * n_layers  # one forward per layer and micro-batch
    for setting, recomputed in (("true", n_layers), ("2", (n_layers + 1) // 2)):
        got, got_state, got_calls = _train(sets, setting)
        assert len(got_calls) == micro * (n_layers + recomputed), setting  # the checkpointed layers ran again
        assert got.loss == plain.loss and got.tokens == plain.tokens
        assert torch.equal(got.activation_counts, plain.activation_counts)  # the recompute counted nothing
        assert torch.equal(got.tokens_per_layer, plain.tokens_per_layer)
        assert got_state.keys() == state.keys()
        for name in state:
            assert torch.equal(got_state[name], state[name]), (setting, name)


def test_the_plan_counts_fewer_activations_with_checkpointing():
    """The plan runs its step with the run's setting: on the built-in model (4 layers, 128 tokens) the
    activations fall to under 60% with every layer checkpointed, and between the two with every 2nd;
    the same weights and adapters; still within 15% of the same step on real tensors."""
    method = get_method("fedit")
    base = ["model.name=builtin:tiny-moe", "data.max_length=128", "train.batch_size=4"]
    plans = {s: memory_plan(load_config(None, [*base, f"train.activation_checkpointing={s}"]))[0]
             for s in ("false", "true", "2")}
    plain, every, second = plans["false"].peak, plans["true"].peak, plans["2"].peak
    assert every["weights"] == plain["weights"] and every["adapters"] == plain["adapters"]
    # (under 0.6: the LM head's float32 logits at every labelled position are outside the decoder layers)
    assert every["activations"] < 0.6 * plain["activations"], (every, plain)
    assert every["activations"] < second["activations"] < plain["activations"]
    cfg = load_config(None, [*base, "train.activation_checkpointing=true"])
    real = training_step_bytes(cfg, method, plans["true"].k, fake=False)
    assert abs(plans["true"].training - sum(real.values())) <= 0.15 * sum(real.values()), (every, real)


def test_the_setting_is_checked():
    assert load_config(None, ["train.activation_checkpointing=on"]).train.activation_checkpointing is True
    assert load_config(None, ["train.activation_checkpointing=3"]).train.activation_checkpointing == 3
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing = 0: use true"):
        load_config(None, ["train.activation_checkpointing=0"])


def test_a_run_that_ran_out_of_memory_resumes_with_checkpointing_and_ends_as_the_uninterrupted_run(
        tmp_path, monkeypatch):
    """A client's training runs out of memory in round 2 (injected: torch.OutOfMemoryError from the
    second round's first local training). The run stops with one line that says what to do — resume
    with `--set train.activation_checkpointing=true` — and, done as said (the key written into its
    config.yaml), the resumed run ends with the uninterrupted run's metrics and adapters. A --set of a key
    that would make it another run is refused, naming it, and changes nothing."""
    import json

    import yaml

    import fedmoe.federation.clients as clients
    from fedmoe.federation.checkpoint import RunDirError

    tiny = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32",
            "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2", "eval.rouge=false",
            "eval.batch_size=4", "data.max_test_per_client=3", "lora.rank=4", "federation.rounds=2",
            f"output_dir={tmp_path}"]

    def quiet(*a):
        pass

    _, whole = run_federated(load_config(None, [*tiny, "name=whole"]), log=quiet)
    real, calls = clients.train_local, []

    def oom_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # round 1: clients 0 and 1; round 2: client 0
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(clients, "train_local", oom_in_round_2)
    run_dir = tmp_path / "resumed"
    with pytest.raises(RunDirError) as e:
        run_federated(load_config(None, [*tiny, "name=resumed"]), log=quiet)
    msg = str(e.value)
    assert msg.startswith("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert f"`fedmoe run --resume {run_dir} --set train.activation_checkpointing=true`" in msg
    monkeypatch.setattr(clients, "train_local", real)
    config = run_dir / "config.yaml"
    before = config.read_text()
    with pytest.raises(RunDirError, match=r"--resume --set lora.rank: .* only model.device, .*train.activation_checkp"):
        resume_federated(run_dir, log=quiet, overrides=["lora.rank=8", "train.activation_checkpointing=true"])
    assert config.read_text() == before  # refused: nothing written
    resume_federated(run_dir, log=quiet, overrides=["train.activation_checkpointing=true"])  # as the message says
    assert yaml.safe_load(config.read_text())["train"]["activation_checkpointing"] is True

    def rows(path):
        keep = ("round", "client", "split", "kind", "loss", "perplexity", "steps", "tokens")
        return [{k: r.get(k) for k in keep} for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]

    assert rows(run_dir) == rows(whole.path) and len(rows(whole.path)) > 4
    a = torch.load(whole.path / "checkpoints" / "state.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "state.pt", weights_only=True)
    assert a["round"] == b["round"] == 2
    ga, gb = a["global_state"], b["global_state"]
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    # with checkpointing on already, the advice is the plan and a new run, not a resume
    from fedmoe.federation.directories import out_of_memory_advice

    advice = out_of_memory_advice(run_dir, torch.OutOfMemoryError("CUDA out of memory"))
    assert "is on at every layer already" in advice and f"`fedmoe plan {config}`" in advice and "--resume" not in advice
    # on every 2nd layer only: at every layer it saves more and changes no number, so the run resumes with it
    config.write_text(config.read_text().replace("activation_checkpointing: true", "activation_checkpointing: 2"))
    advice = out_of_memory_advice(run_dir, torch.OutOfMemoryError("CUDA out of memory"))
    assert f"`fedmoe run --resume {run_dir} --set train.activation_checkpointing=true`" in advice
