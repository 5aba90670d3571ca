"""Small builders shared by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess

import torch

from fedmoe.algorithms.base import N_TRAIN, ModelSpec
from fedmoe.messages import Message, Reply


def reply(client: int, tensors: dict, n: int, **scalars) -> Reply:
    """A client's reply as the server receives it."""
    return Reply(client, Message(tensors=dict(tensors), scalars={N_TRAIN: n, **scalars}))


def built(method, cfg, mm, seed: int = 0):
    """Build ``method``'s adapters on ``mm`` (seeded) and return (server half, client half, spec)."""
    torch.manual_seed(seed)
    method.client.build(cfg, mm)
    spec = ModelSpec.of(mm, method.client.private_roles)
    return method.server(cfg, spec), method.client(cfg), spec


def tiny_hf(arch: str, **kw):
    """A tiny Hugging Face model of ``arch`` (``fedmoe.moe.tiny``), seeded, in fp32."""
    from transformers import AutoModelForCausalLM

    from fedmoe.moe.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).float()
    random_zero_inits_(model)
    if arch == "phimoe":  # its router draws random numbers in training mode (the input jitter, sparsemixer's Gumbel
        # choice): the shared tests compare the forwards of two copies, which must make the same choices, so it is
        # built in eval mode (tests/test_phimoe.py checks training mode, the random stream seeded alike)
        model.eval()
    return model


def random_zero_inits_(model) -> None:
    """The family's tensors that transformers starts at zero and a trained checkpoint does not hold at zero, drawn
    (the global generator), so that every test of a tiny model runs them: gpt-oss's expert and attention biases,
    LFM2-MoE's routing bias (``expert_bias``, a buffer added to the sigmoid scores to choose the experts)."""
    model_type = model.config.model_type
    if model_type == "gpt_oss":
        random_expert_biases_(model)
    elif model_type == "lfm2_moe":
        with torch.no_grad():
            for layer in model.model.layers:
                bias = getattr(layer.feed_forward, "expert_bias", None)
                if bias is not None:
                    bias.normal_(0, 0.05)  # the sigmoid scores of a tiny random router are 0.5 +- ~0.05


def random_expert_biases_(model, std: float = 0.02) -> None:
    """gpt-oss's expert biases (gate_up_proj_bias, down_proj_bias) and attention biases (q/k/v/o), which
    transformers starts at zero, drawn from N(0, std²) (the global generator), so that every test of a tiny
    gpt-oss runs them (a LoRA wrapper, a quantized linear or an export that dropped one would show)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, std)
            layer.mlp.experts.down_proj_bias.normal_(0, std)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0, std)


def token_batch(seed: int = 1, batch: int = 3, seq: int = 11, vocab: int = 128, pad_last_row: bool = True):
    """(ids, mask): random token ids with right padding on row 1 (4 positions) and, with
    ``pad_last_row``, on row 2 (1 position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    if pad_last_row:
        mask[2, -1:] = 0
    return ids, mask


def peft_wrappers(peft_model) -> dict:
    """(decoder layer index, parameter name) -> PEFT's ParamWrapper (``target_parameters`` LoRA)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, ParamWrapper):
            out[(int(name.split(".layers.")[1].split(".")[0]), mod.parameter_name)] = mod
    return out


def hf_folder(tmp_path, arch: str, name: str = "base", **kw):
    """A tiny model of ``arch`` saved as a Hugging Face folder (``tmp_path / name``), as a user's model is: the
    built-in tokenizer's vocabulary (8192) and its pad and eos ids, the family's zero-initialised tensors drawn
    (:func:`random_zero_inits_`), the tokenizer beside it. ``kw`` go to ``tiny_config``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmoe.moe.model import builtin_model_path
    from fedmoe.moe.tiny import tiny_config

    config = tiny_config(arch, vocab_size=8192, **kw)
    config.pad_token_id, config.eos_token_id = 1, 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    random_zero_inits_(model)
    model.save_pretrained(tmp_path / name)
    AutoTokenizer.from_pretrained(builtin_model_path("builtin:tiny-moe")).save_pretrained(tmp_path / name)
    return tmp_path / name


def randomise_(mm, seed: int = 11, scale: float = 0.3) -> None:
    """Every trainable tensor of ``mm`` drawn from N(0, scale²) (a seeded generator of its own)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def loaded_model(folder, layout: str = "fused", router: bool = False, scale: float | None = None,
                 top_k: int | None = None, rank: int = 4, alpha: float = 8.0):
    """A ``LoadedModel`` of the base in ``folder`` with random expert and attention adapters (and router LoRA, a
    rescaler, a lower k), evaluation mode: what fedmoe.export's writers take."""
    from fedmoe.config import load_config
    from fedmoe.export import LoadedModel
    from fedmoe.messages import Message
    from fedmoe.moe import MoEModel

    cfg = load_config(None, [f"model.name={folder}", f"lora.expert_layout={layout}"])
    mm = MoEModel.from_pretrained(str(folder))
    mm.add_expert_lora(rank, alpha, layout=layout)
    mm.add_attention_lora(rank, alpha)
    if router:
        mm.add_router_lora(rank, alpha)
    if scale is not None:
        mm.add_output_scale(scale)
    randomise_(mm, scale=0.1)
    if top_k is not None:
        mm.set_top_k(top_k)
    mm.model.eval()
    return LoadedModel(cfg, mm, None, Message(), {}, "a test's model")


def one_small_round(folder, tmp_path, *sets: str):
    """(summary, run dir) of one federated round of two clients on the model in ``folder``, two local steps of
    batch 2 at 32 tokens, no ROUGE and no zero-shot round, with ``sets`` on top: how the family tests run a
    method through the federation."""
    from fedmoe.config import load_config
    from fedmoe.federation import run_federated

    base = ["data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2", "train.max_steps=2",
            "train.batch_size=2", "train.lr=0.02", "eval.rouge=false", "eval.zero_shot=false",
            "data.max_test_per_client=2", "lora.rank=4", "federation.rounds=1", f"model.name={folder}",
            f"output_dir={tmp_path}", "name=r"]
    summary, rd = run_federated(load_config(None, [*base, *sets]))
    assert all(torch.isfinite(torch.tensor(float(c["loss"]))) for c in summary["clients"])
    return summary, rd


def whole_and_resumed(tmp_path, sets: list[str]):
    """(summary of the uninterrupted run, summary of the resumed one, the stopped run's RunDir) of a federated run of
    config ``sets`` run whole, then again stopped after round 1 and resumed: the two give the same losses, each finite."""
    from fedmoe.config import load_config
    from fedmoe.federation import resume_federated, run_federated

    whole, _ = run_federated(load_config(None, [*sets, f"output_dir={tmp_path}", "name=whole"]), log=lambda *a: None)
    _, rd = run_federated(load_config(None, [*sets, f"output_dir={tmp_path}", "name=cut"]), stop_after_round=1,
                          log=lambda *a: None)
    resumed, _ = resume_federated(rd.path, log=lambda *a: None)
    assert whole["global"]["loss"] == resumed["global"]["loss"]
    assert [c["loss"] for c in whole["clients"]] == [c["loss"] for c in resumed["clients"]]
    assert all(isinstance(c["loss"], float) and c["loss"] == c["loss"] for c in whole["clients"])
    return whole, resumed, rd


def interruptible() -> None:
    """A ``preexec_fn`` for a child process a test sends SIGINT: it starts with SIGINT unblocked and not ignored, as
    from a terminal. A test runner started in the background (``cmd &`` in a script, some CI wrappers) ignores
    SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt handler: the signal would be
    dropped and the interrupted run would go on to its end."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def once_per_session(tmp_path_factory, name: str, compute):
    """``compute(folder)``'s result, computed once per test session. Under pytest-xdist a module fixture is
    computed by every worker that runs one of the module's tests (three times, for a Flower simulation of 28 s):
    here the first worker to ask computes it in a folder all workers share, while the others wait on a file lock,
    and they read the result back (pickled) with that folder. Its tests must only read the folder. A worker whose
    computation failed leaves no result: the next one to ask computes it again (and fails with its own error)."""
    import fcntl
    import pickle

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above the workers' own
    folder, done = base / f"once-{name}", base / f"once-{name}" / "result.pkl"
    with open(base / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        result = compute(folder)
        partial = done.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(result))
        partial.replace(done)
        return result


def cli(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``fedmoe ARGS`` in this process (no interpreter start: these cases run many commands), as the
    subprocess helper returns it; an exception that escaped the command is its traceback on stderr."""
    import traceback

    from typer.testing import CliRunner

    from fedmoe.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], input=stdin)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(res.exception))
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, err)
