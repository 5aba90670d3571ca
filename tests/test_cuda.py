"""The checks that need an accelerator (marker ``cuda``; ``pytest -m cuda``, run by benchmarks/gpu_check.sh).

They run on the CUDA device when there is one and are skipped otherwise. ``FEDMOE_TEST_DEVICE=cpu``
(or ``cuda:1``, ...) runs the same checks on that device instead, which is how the CPU-only test
suite keeps them alive (``bash benchmarks/gpu_check.sh --dry``).

* expert LoRA on the device, through the grouped_mm path, equals PEFT ``target_parameters`` in
  fp32 (1e-5, as on the CPU: tests/test_moe.py) and in bf16 (see ``BF16_TOL``), gradients included;
* activation counts equal a recount of the routers' choices by hand;
* every MoE block's forward and backward runs without a host sync (``set_sync_debug_mode("error")``),
  and with fp32 weights under bf16 autocast the grouped matmuls get bf16 operands;
* the adapters a client builds on the device equal the server's CPU skeleton (what every
  federated run checks first), and FLEx's expert scoring runs on the device;
* the option scorer of ``eval.task: choice`` (prompt once, options over its key/value cache) equals
  one full sequence per option on the device, and the CPU's scores;
* a 2-round FedIT and FLAME run on a tiny model on the device resumes exactly (stop after round
  1, resume, same final numbers and global state), in deterministic mode; FedIT also in the
  default (non-deterministic) mode, where the difference is recorded and bounded;
* Flower's simulation gives its clients the GPU (``model.device: auto``, half a GPU each: both clients'
  models on one GPU at once): every client process starts on CUDA.
"""

from __future__ import annotations

import copy
import math
import os

# cuBLAS needs this before its first handle to be deterministic (torch.use_deterministic_algorithms)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import peft_wrappers as _peft_wrappers  # noqa: E402


def _device() -> str | None:
    env = os.environ.get("FEDMOE_TEST_DEVICE", "").strip()
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _device()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (FEDMOE_TEST_DEVICE=cpu runs these checks on the CPU)"),
]

RANK, ALPHA = 8, 16.0  # rank 8: 16-byte aligned rows in bf16 too, so grouped_mm is used in both dtypes
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# bf16 tolerance, norm-wise relative difference ||a - b|| / ||b|| of the logits and of every LoRA
# gradient. bf16 keeps 8 significant bits (unit roundoff u = 2^-8 ~ 3.9e-3). Ours and PEFT round at
# different places: ours rounds x·W and the LoRA term (x·A)·B separately and adds them; PEFT rounds
# W + ΔW to bf16 once and multiplies. Each of the O(10) roundings on a logit's path (more for a
# gradient, which goes back through every layer above) moves it by O(u), so the two differ by a
# few u per layer, not by 1e-5. Measured on the CPU (torch 2.13, this test's model): logits 1.3e-2,
# gradients <= 2.3e-2. The bound is 5e-2 (~13 u), with room for GPU kernels that sum in another
# order. And ours must be as accurate as PEFT: against the same bf16 weights evaluated in fp32 its
# error may exceed PEFT's by at most 25% (+1e-3).
BF16_TOL = 5e-2
BF16_NOT_WORSE = 1.25
# The tiny model's random router (std 0.02 on 64 inputs) makes near-ties between experts, which bf16
# rounding flips (a discrete change no tolerance bounds: bf16 vs fp32 then differ by ~20%). Scaling
# the router weights makes routing decisive, so what is compared is the arithmetic.
ROUTER_SCALE = 20.0


def _dev() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture
def fp32_exact():
    """No TF32 in fp32 matmuls (the 1e-5 comparison is of true fp32 arithmetic)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _hf(arch="olmoe", dtype=torch.float32, router_scale=1.0):
    from transformers import AutoModelForCausalLM

    from fedmoe.moe.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size=64, intermediate_size=32, vocab_size=256))
    if router_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.mul_(router_scale)
    return model.to(dtype=dtype, device=_dev())


def _batch(seed=1, batch=3, seq=11, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    mask[2, -1:] = 0
    return ids.to(_dev()), mask.to(_dev())




def _ours_and_peft(ref):
    """Ours (MoEModel + expert LoRA) and PEFT target_parameters on copies of ``ref``, with the same
    random non-zero A and B (drawn in fp32 on the CPU, rounded to the model's dtype)."""
    from peft import LoraConfig, get_peft_model

    from fedmoe.moe import ExpertsWithLoRA, MoEModel

    ours = MoEModel(copy.deepcopy(ref))
    ours.add_expert_lora(RANK, ALPHA)
    peft_model = get_peft_model(copy.deepcopy(ref), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                                               target_parameters=EXPERT_TARGETS))
    wrappers = _peft_wrappers(peft_model)
    assert len(wrappers) == 2 * len(ours.layers)
    g = torch.Generator().manual_seed(3)
    for layer in ours.layers:
        ex = ours.experts_module(layer.index)
        assert ex.gate_up_lora_A.device.type == _dev().type  # adapters live beside their experts
        for ours_name, peft_name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            A, B = getattr(ex, f"{ours_name}_lora_A"), getattr(ex, f"{ours_name}_lora_B")
            with torch.no_grad():
                A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)
            pa, pb = ExpertsWithLoRA.to_peft_layout(A.detach(), B.detach())
            w = wrappers[(layer.decoder_layer, peft_name)]
            with torch.no_grad():
                w.lora_A["default"].weight.copy_(pa)
                w.lora_B["default"].weight.copy_(pb)
    return ours, peft_model, wrappers


def _spy_paths(mm):
    """Count which path every ExpertsWithLoRA takes (grouped_mm or the per-expert loop)."""
    calls = {"grouped": 0, "loop": 0}
    for layer in mm.layers:
        ex = mm.experts_module(layer.index)
        for path, attr in (("grouped", "_experts_grouped"), ("loop", "_experts_loop")):
            orig = getattr(ex, attr)

            def counted(*a, _orig=orig, _path=path, **kw):
                calls[_path] += 1
                return _orig(*a, **kw)

            setattr(ex, attr, counted)
    return calls


def _forward_backward(ours, peft_model, wrappers):
    from fedmoe.moe import ExpertsWithLoRA

    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out_ours = ours.model(ids, attention_mask=mask, labels=labels)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out_ours.loss.backward()
    out_peft.loss.backward()
    grads_ours, grads_peft = {}, {}
    for layer in ours.layers:
        ex = ours.experts_module(layer.index)
        for ours_name, peft_name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            w = wrappers[(layer.decoder_layer, peft_name)]
            gA, gB = ExpertsWithLoRA.from_peft_layout(w.lora_A["default"].weight.grad,
                                                      w.lora_B["default"].weight.grad, ours.num_experts)
            for ab, g in (("A", gA), ("B", gB)):
                key = f"layer{layer.index}.{ours_name}_lora_{ab}"
                grads_ours[key] = getattr(ex, f"{ours_name}_lora_{ab}").grad.float()
                grads_peft[key] = g.float()
    real = mask.bool()  # padding never reaches fedmoe's experts (model.skip_padding): the real tokens compare
    return out_ours.logits.detach().float()[real], out_peft.logits.detach().float()[real], grads_ours, grads_peft


# ------------------------------------------------------------------------------- expert LoRA = PEFT
@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_expert_lora_matches_peft_fp32_on_device(arch, fp32_exact):
    ours, peft_model, wrappers = _ours_and_peft(_hf(arch))
    calls = _spy_paths(ours)
    lo, lp, go, gp = _forward_backward(ours, peft_model, wrappers)
    # the grouped_mm path ran on every MoE layer (forward), never the per-expert loop
    assert calls == {"grouped": len(ours.layers), "loop": 0}, calls
    torch.testing.assert_close(lo, lp, rtol=0, atol=1e-5)
    for key in go:
        torch.testing.assert_close(go[key], gp[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        assert go[key].abs().sum() > 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_expert_lora_matches_peft_bf16_on_device(record_property):
    ref = _hf("olmoe", dtype=torch.bfloat16, router_scale=ROUTER_SCALE)
    ours, peft_model, wrappers = _ours_and_peft(ref)
    # the reference: the same bf16 weights and adapter values, computed in fp32
    ref32 = copy.deepcopy(ours)
    ref32.model.float()
    calls = _spy_paths(ours)
    lo, lp, go, gp = _forward_backward(ours, peft_model, wrappers)
    assert calls == {"grouped": len(ours.layers), "loop": 0}, calls
    ids, mask = _batch()
    out = ref32.model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    l32 = out.logits.detach()[mask.bool()]
    g32 = {f"layer{layer.index}.{n}_lora_{ab}": getattr(ref32.experts_module(layer.index), f"{n}_lora_{ab}").grad
           for layer in ref32.layers for n in ("gate_up", "down") for ab in "AB"}
    rows = [("logits", lo, lp, l32)] + [(k, go[k], gp[k], g32[k]) for k in go]
    worst = 0.0
    for name, a, b, r in rows:
        d, ea, eb = _rel(a, b), _rel(a, r), _rel(b, r)
        worst = max(worst, d)
        assert d <= BF16_TOL, f"{name}: ours vs PEFT differ by {d:.3e} (norm-wise) > {BF16_TOL}"
        assert ea <= BF16_NOT_WORSE * eb + 1e-3, f"{name}: ours is {ea:.3e} from fp32, PEFT {eb:.3e}"
    record_property("bf16_max_rel_diff", round(worst, 6))


# ------------------------------------------------------------------------------- activation counts
def test_activation_counts_match_recount_on_device():
    from fedmoe.moe import MoEModel

    mm = MoEModel(_hf("olmoe"))
    mm.add_expert_lora(RANK, ALPHA)
    ids, mask = _batch()
    inputs = {}
    hooks = [layer.block.register_forward_pre_hook(
        lambda mod, args, i=layer.index: inputs.__setitem__(i, args[0].detach())) for layer in mm.layers]
    try:
        for k in (2, 1):
            mm.set_top_k(k)
            mm.reset_activation_counts()
            with torch.no_grad(), mm.tracking(mask):
                mm.model(ids, attention_mask=mask)
            counts, tokens = mm.activation_counts()
            real = mask.reshape(-1).bool()
            for layer in mm.layers:
                x = inputs[layer.index].reshape(-1, layer.hidden_size)
                with torch.no_grad():
                    _, _, idx = layer.router(x)
                assert idx.shape[1] == k
                expected = torch.bincount(idx[real].reshape(-1).cpu(), minlength=mm.num_experts)
                assert counts[layer.index].tolist() == expected.tolist(), (k, layer.index)
                assert int(tokens[layer.index]) == int(real.sum())
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("weights,autocast", [(torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16-weights", "fp32-weights-bf16-autocast"])
def test_moe_blocks_run_without_host_sync_on_device(weights, autocast):
    """Every MoE block's forward and backward (router, routing, counting, grouped experts with LoRA,
    scatter) under ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host read raises (a
    ``bincount``, ``int(counts.sum())``, a boolean-mask index, counts copied to the host per layer).
    The CPU test (tests/test_expert_path.py) reads the compiled graph; this one also sees what a
    fake tensor hides (bincount's size). Padding skipping is off: it reads the mask, once per forward.
    With fp32 weights under bf16 autocast the grouped matmuls get bf16 operands."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fedmoe.moe import MoEModel

    if _dev().type != "cuda":
        pytest.skip("the sync debug mode is CUDA's (tests/test_expert_path.py checks the graph on the CPU)")
    mm = MoEModel(_hf("olmoe", dtype=weights))
    mm.add_expert_lora(RANK, ALPHA)
    mm.tracker.skip_padding = False
    ids, mask = _batch()
    x = mm.model.model.embed_tokens(ids).detach()
    dtypes = set()

    class GroupedOperands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._grouped_mm:
                dtypes.add((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    blocks = [layer.block for layer in mm.layers]
    for b in blocks:  # warm up (first calls may allocate or query the device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), mm.tracking(mask):
            b(x.float() if autocast else x)[0].float().sum().backward()
    torch.cuda.synchronize()
    mm.reset_activation_counts()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in blocks:
            h = (x.float() if autocast else x).requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), mm.tracking(mask), GroupedOperands():
                y = b(h)
                y = y[0] if isinstance(y, tuple) else y
                y.float().pow(2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dtypes == {(torch.bfloat16, torch.bfloat16)}, dtypes
    counts, tokens = mm.activation_counts()
    real = int(mask.sum())
    assert tokens.tolist() == [real] * len(blocks)
    assert counts.sum(1).tolist() == [real * mm.default_top_k] * len(blocks)


# ------------------------------------------------------------------------------- federation on the device
def _fed_cfg(tmp_path, name, alg, extra=()):
    from fedmoe.config import load_config

    return load_config(None, [
        "model.name=builtin:tiny-olmoe", f"model.device={DEVICE}", f"algorithm.name={alg}",
        "data.max_examples=48", "data.max_length=48", "data.partition.num_clients=2",
        "train.max_steps=2", "train.batch_size=2", "eval.max_examples=2", "eval.max_new_tokens=4",
        "eval.batch_size=4", "data.max_test_per_client=3", "federation.rounds=2", "lora.rank=8",
        f"output_dir={tmp_path}", f"name={name}", *extra])


def test_adapters_built_on_device_match_the_server_skeleton(tmp_path):
    """What every federated run checks first (LocalTransport: spec.check): a client's adapters,
    built on its model on the device under the run's seed, equal the server's, built on a CPU skeleton."""
    from fedmoe.algorithms import get_method, model_spec
    from fedmoe.federation.local import load_client_model

    for alg in ("fedit", "flame"):
        cfg = _fed_cfg(tmp_path, "spec", alg)
        method = get_method(alg)
        spec = model_spec(cfg, method)
        mm = load_client_model(cfg, method)
        assert mm.device.type == _dev().type
        live = mm.get_state()
        differ = [n for n, t in spec.initial.items() if not torch.equal(live[n], t)]
        assert not differ, (f"{alg}: {len(differ)} of {len(live)} adapter tensors drawn on {DEVICE} differ from the "
                            f"CPU skeleton's (e.g. {differ[0]}): initial values must not depend on the device's RNG")


def _final(summary, rd):
    from fedmoe.federation.checkpoint import CHECKPOINT_FILE

    state = torch.load(rd.checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["global_state"]
    clients = [(c["loss"], c["rouge_l"], c["bytes_up"], c["bytes_down"], c["expert_activation"]) for c in summary["clients"]]
    return summary["global"]["loss"], summary["global"]["rouge_l"], clients, state


ON_CPU = DEVICE is not None and torch.device(DEVICE).type == "cpu"


@pytest.mark.parametrize("alg,mode", [
    ("fedit", "deterministic"), ("flame", "deterministic"),
    pytest.param("fedit", "default", marks=pytest.mark.skipif(
        ON_CPU, reason="the CPU kernels are deterministic: the same as the deterministic case")),
])
def test_two_rounds_on_device_resume_exactly(tmp_path, alg, mode, record_property):
    from fedmoe.federation import resume_federated, run_federated

    if mode == "deterministic":
        torch.use_deterministic_algorithms(True)
    try:
        full, rd_full = run_federated(_fed_cfg(tmp_path, "full", alg))
        partial, rd = run_federated(_fed_cfg(tmp_path, "cut", alg), stop_after_round=1)
        assert partial is None
        resumed, rd = resume_federated(rd.path)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = _final(full, rd_full), _final(resumed, rd)
    assert full["clients"][0]["rounds_trained"] == 2
    assert torch.isfinite(torch.tensor(a[0]))
    diff = max((a[3][n].float() - b[3][n].float()).abs().max().item() for n in a[3])
    record_property("global_state_max_abs_diff", diff)
    record_property("global_loss", [a[0], b[0]])
    if mode == "deterministic":
        assert a[:3] == b[:3]
        assert list(a[3]) == list(b[3]) and all(torch.equal(a[3][n], b[3][n]) for n in a[3])
    else:  # atomics (index_add_ on CUDA) may reorder sums: close, and the difference is recorded
        assert abs(a[0] - b[0]) <= 1e-3 * max(1.0, abs(a[0])), (a[0], b[0])
        assert diff <= 1e-3, diff


# ------------------------------------------------------------------------------- FLEx grafting on the device
def test_flex_expert_scoring_on_device():
    """FLEx's one-shot setup scores every expert on calibration batches; on the device it must run and
    choose what the CPU chooses for the same model."""
    from fedmoe.algorithms.flex import score_experts
    from fedmoe.moe import MoEModel

    ref = _hf("olmoe")
    on_dev = MoEModel(ref)
    on_cpu = MoEModel(copy.deepcopy(ref).to("cpu"))
    ids, mask = _batch(seq=16)
    batches = [{"input_ids": ids.cpu(), "attention_mask": mask.cpu()}]
    chosen_dev, scores_dev = score_experts(on_dev, batches, num_grafts=2)
    chosen_cpu, scores_cpu = score_experts(on_cpu, batches, num_grafts=2)
    assert chosen_dev == chosen_cpu
    torch.testing.assert_close(scores_dev, scores_cpu, rtol=1e-4, atol=1e-6)


def test_option_scoring_on_device(fp32_exact):
    """eval.task: choice on the device: the prompt-once path (its key/value cache, per-row positions and
    padding holes) equals one full sequence per option, and both equal the CPU's scores."""
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.moe import MoEModel

    ref = _hf("olmoe")
    on_dev = MoEModel(ref)
    on_dev.add_expert_lora(RANK, ALPHA)
    on_cpu = MoEModel(copy.deepcopy(ref).to("cpu"))
    on_cpu.add_expert_lora(RANK, ALPHA)
    on_cpu.load_state({n: t.cpu() for n, t in on_dev.get_state().items()})
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (9, 4, 13)]
    options = [[torch.randint(2, 256, (n,), generator=g).tolist() for n in lens] for lens in ([1, 3], [2, 2, 4], [5])]
    cached = option_logprobs(on_dev, prompts, options, batch_size=3)
    plain = option_logprobs(on_dev, prompts, options, batch_size=3, reference=True)
    cpu = option_logprobs(on_cpu, prompts, options, batch_size=3)
    for a, b, c in zip(cached, plain, cpu):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------- Flower's simulation on the GPU
@pytest.mark.skipif(ON_CPU, reason="a simulation on the CPU is tests/test_flower.py's")
def test_flower_simulation_gives_its_clients_the_gpu(tmp_path, record_property):
    """flower-sim with model.device auto and federation.simulation.client_gpus 0.5: Ray gives each client half a
    GPU (until fedmoe reserved none, Ray hid the GPU from every client, and they trained on the CPU); each client's
    process says it started on CUDA, and both clients trained both rounds to a finite loss."""
    import json
    import subprocess
    import sys
    import time

    sets = ["model.name=builtin:tiny-olmoe", "model.device=auto", "algorithm.name=fedit", "data.max_examples=48",
            "data.max_length=48", "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2",
            "eval.max_examples=2", "eval.max_new_tokens=4", "data.max_test_per_client=3", "federation.rounds=2",
            "lora.rank=8", "federation.simulation.client_gpus=0.5", f"output_dir={tmp_path}", "name=sim"]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--runtime", "flower-sim", "--quiet",
                        *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"})
    record_property("wall_s", time.time() - t0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "each client reserves 1 CPU(s) and 0.5 of a GPU" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    starts = [row for row in rows if row["kind"] == "start"]
    record_property("starts", starts)
    assert sorted(s["client"] for s in starts) == [0, 1] and all(s["device"].startswith("cuda") for s in starts)
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert [c["rounds_trained"] for c in summary["clients"]] == [2, 2]
    assert all(math.isfinite(c["loss"]) for c in summary["clients"])
