"""gpt-oss (``gpt_oss``): what is particular to it, each part against transformers' own forward or a hand
computation, so that getting one wrong fails a test here (and the arch-parametrized tests elsewhere run it too):

* experts stored transposed ((E, H, 2I), (E, I, H)), gate and up interleaved in gate_up's outputs, biases on
  both projections, the clamped SwiGLU ``(clamp(up, ±7) + 1) · g·σ(1.702·g)`` with ``g = min(gate, 7)``: the
  expert path against transformers' per-expert loop where the clamp acts (weights scaled so that it does),
  against PEFT's ``target_parameters`` LoRA there (outputs and gradients), and one expert by hand in both
  LoRA layouts on both paths;
* FLEx's grafted expert (its biases, its activation, a gate with the router's bias) by hand;
* the merged export folding every kind of adapter into the transposed stacks (and a rescaler into the down
  bias too), reloaded by transformers; the vllm form (vLLM's fused 3-D form for gpt-oss: PEFT's keys, which
  PEFT itself loads to fedmoe's logits), and its refusal of the split layout;
* the hub checkpoint's MXFP4 experts dequantized while loading (a tiny MXFP4 checkpoint written here), eager
  attention for ``sdpa``, and ``fedmoe plan`` of its config.json;
* FLAME (k_i = 1), FC-MoE and FLEx through a federated round (FedIT: tests/test_export.py), with the aux loss,
  activation checkpointing and an NF4 base on the way.
"""

import copy
import json
import shutil

import pytest
import torch
from helpers import hf_folder, loaded_model, one_small_round, peft_wrappers, randomise_, tiny_hf, token_batch

import fedmoe.moe.lora as lora_mod
from fedmoe.moe import ExpertsWithLoRA, MoEModel

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 8.0
LIMIT, GAIN = 7.0, 1.702  # gpt-oss's swiglu_limit and swiglu_alpha (transformers' GptOssConfig defaults)
PATHS = (True, False) if lora_mod._HAS_GROUPED_MM else (False,)


def _scaled(scale=60.0, **kw):
    """A tiny gpt-oss whose gate_up weights are scaled so that the clamp acts: gate and up outputs of
    N(0, 1) rows have a standard deviation of ~7 (transformers' init: 0.02 · √32 ≈ 0.11, never near 7)."""
    ref = tiny_hf("gpt_oss", **kw)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(scale)
    return ref


def _assert_the_clamp_acts(gate, up):
    """Enough of each side of each clamp in ``gate`` and ``up`` for a test through them to notice a change."""
    for what, frac in (("gate > limit", (gate > LIMIT)), ("gate < -limit", (gate < -LIMIT)),
                       ("up > limit", (up > LIMIT)), ("up < -limit", (up < -LIMIT))):
        assert frac.float().mean() > 0.03, what


_randomise = randomise_


# ------------------------------------------------------------------------ the expert path
def test_clamped_experts_equal_transformers_where_the_clamp_acts():
    """fedmoe's experts (grouped and per-expert) against transformers' own per-expert loop
    (``GptOssExperts.forward``, experts_implementation eager) on rows where every side of the clamp acts."""
    ref = _scaled()
    ref.set_experts_implementation("eager")
    experts = ref.model.layers[0].mlp.experts
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, weights, index = ref.model.layers[0].mlp.router(x)
        gu = torch.einsum("th,ehj->tej", x, experts.gate_up_proj) + experts.gate_up_proj_bias
        _assert_the_clamp_acts(gu[..., 0::2], gu[..., 1::2])
        want = experts(x, index, weights)
        ours = ExpertsWithLoRA(experts, 0, None)
        for grouped in PATHS:
            ours.grouped = grouped
            torch.testing.assert_close(ours(x, index, weights), want, rtol=0, atol=2e-5)


def test_expert_lora_equals_peft_where_the_clamp_acts():
    """Per-expert LoRA on the transposed, interleaved, biased stacks against PEFT's target_parameters LoRA (which
    adds ΔW to transformers' own stacks), outputs and gradients, on a model where the clamp acts: a gradient
    through the clamp (zero beyond the limit) must be the same too."""
    from peft import LoraConfig, get_peft_model

    ref = _scaled()
    ours = MoEModel(copy.deepcopy(ref))
    ours.add_expert_lora(RANK, ALPHA)
    _randomise(ours, scale=0.1)
    peft_model = get_peft_model(ref, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    wrappers = peft_wrappers(peft_model)
    with torch.no_grad():
        for layer in ours.layers:
            ex = ours.experts_module(layer.index)
            for prefix, proj in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                pa, pb = ExpertsWithLoRA.to_peft_layout(getattr(ex, f"{prefix}_lora_A"), getattr(ex, f"{prefix}_lora_B"))
                w = wrappers[(layer.decoder_layer, proj)]
                w.lora_A["default"].weight.copy_(pa)
                w.lora_B["default"].weight.copy_(pb)
    ids, mask = token_batch()
    labels = ids.masked_fill(mask == 0, -100)
    captured = []
    hook = ours.layers[0].block.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    out_ours = ours.model(ids, attention_mask=mask, labels=labels)
    hook.remove()
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    x = captured[0].reshape(-1, 32)[mask.reshape(-1).bool()]
    e = ours.layers[0].experts
    gu = torch.einsum("th,ehj->tej", x, e.gate_up_proj) + e.gate_up_proj_bias
    _assert_the_clamp_acts(gu[..., 0::2], gu[..., 1::2])
    real = mask.bool()
    torch.testing.assert_close(out_ours.logits[real], out_peft.logits[real], rtol=0, atol=2e-5)
    out_ours.loss.backward()
    out_peft.loss.backward()
    for layer in ours.layers:
        ex = ours.experts_module(layer.index)
        for prefix, proj in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            w = wrappers[(layer.decoder_layer, proj)]
            gA, gB = ExpertsWithLoRA.from_peft_layout(w.lora_A["default"].weight.grad, w.lora_B["default"].weight.grad, 8)
            torch.testing.assert_close(getattr(ex, f"{prefix}_lora_A").grad, gA, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(getattr(ex, f"{prefix}_lora_B").grad, gB, rtol=1e-4, atol=1e-5)
            assert getattr(ex, f"{prefix}_lora_B").grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("grouped", PATHS)
def test_one_expert_by_hand(layout, grouped):
    """One expert, written out: W_gu (H, 2I) and W_d (I, H) as stored; gate = columns 0, 2, 4, … and up =
    columns 1, 3, 5, … of x·W_gu + b_gu (+ the gate_up LoRA, or the gate's and the up's own); h =
    (clamp(up, -7, 7) + 1) · g·σ(1.702·g) with g = min(gate, 7); y = h·W_d + b_d + s·B_d·A_d·h, times the
    routing weight."""
    mm = MoEModel(_scaled())
    mm.add_expert_lora(RANK, ALPHA, layout=layout)
    _randomise(mm, scale=0.1)
    ex = mm.experts_module(1)
    ex.grouped = grouped
    e, T, s = 5, 40, ALPHA / RANK
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(2))
    w = torch.rand(T, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = ex(x, torch.full((T, 1), e), w)
        W_gu, W_d = ex.base.gate_up_proj[e], ex.base.down_proj[e]
        b_gu, b_d = ex.base.gate_up_proj_bias[e], ex.base.down_proj_bias[e]
        assert W_gu.shape == (32, 32) and W_d.shape == (16, 32)
        gu = x @ W_gu + b_gu
        if layout == "fused":
            gu = gu + s * (x @ ex.gate_up_lora_A[e].T) @ ex.gate_up_lora_B[e].T
            gate, up = gu[:, 0::2], gu[:, 1::2]
        else:
            gate = gu[:, 0::2] + s * (x @ ex.gate_lora_A[e].T) @ ex.gate_lora_B[e].T
            up = gu[:, 1::2] + s * (x @ ex.up_lora_A[e].T) @ ex.up_lora_B[e].T
        _assert_the_clamp_acts(gate, up)
        g = gate.clamp(max=LIMIT)
        h = (up.clamp(-LIMIT, LIMIT) + 1) * g * torch.sigmoid(GAIN * g)
        want = (h @ W_d + b_d + s * (h @ ex.down_lora_A[e].T) @ ex.down_lora_B[e].T) * w
    torch.testing.assert_close(y, want, rtol=0, atol=2e-5)


def _expert_drift(make):
    """RMS drift of layer 0's routed output (64 N(0, 1) rows, 2 experts each) under an NF4 base, relative to its RMS."""
    from fedmoe.moe.quant import quantize_model

    full, mm = MoEModel(make()), MoEModel(make())
    quantize_model(mm, "nf4")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    index = torch.randint(0, 8, (64, 2), generator=torch.Generator().manual_seed(5))
    w = torch.full((64, 2), 0.5)
    with torch.no_grad():
        want, got = full.experts_module(0)(x, index, w), mm.experts_module(0)(x, index, w)
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()), mm


def test_quantized_experts_take_the_per_expert_path_and_stay_close():
    """An NF4 base: the transposed stacks held as their transposes' codes, dequantized one expert at a time
    (the per-expert path); on rows where the clamp acts the routed output drifts as OLMoE's does under the same
    measurement (2026-12-06: gpt-oss 0.146, OLMoE 0.143 of the RMS; GLU experts multiply two 4-bit products)."""
    from fedmoe.moe.quant import QuantizedWeight

    drift, mm = _expert_drift(_scaled)
    olmoe, _ = _expert_drift(lambda: tiny_hf("olmoe"))
    ex = mm.experts_module(0)
    assert isinstance(ex.base.gate_up_proj, QuantizedWeight) and ex.base.gate_up_proj.transposed
    assert ex.base.gate_up_proj.shape == (8, 32, 32) and ex.base.down_proj.shape == (8, 16, 32)
    assert not ex._grouped_ok(torch.float32)
    torch.testing.assert_close(ex.base.down_proj[3], _scaled().model.layers[0].mlp.experts.down_proj[3], rtol=0,
                               atol=0.02)  # w[e] as stored, (I, H)
    assert 0 < drift < 1.25 * olmoe and drift < 0.2, (drift, olmoe)


# ------------------------------------------------------------------------ FLEx
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_grafted_gpt_oss_expert_by_hand(layout):
    """A graft of pretrained expert 6 with LoRA: σ(g·x + g_b) · E'(x), E' expert 6 computed as gpt-oss computes
    (biases, interleaved gate and up, clamped SwiGLU) with W + s·B·A; its gate starts at the router's row and
    bias for expert 6. A full copy (train_full) equals the pretrained expert, biases included."""
    from fedmoe.algorithms.flex import GraftedExperts

    mm = MoEModel(_scaled())
    layer = mm.layers[1]
    graft = GraftedExperts(layer, 1, rank=RANK, alpha=ALPHA, layout=layout)
    graft.init_from([6])
    assert torch.equal(graft.gate[0], layer.router.weight[6]) and graft.gate_bias[0] == layer.router.bias[6]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in graft.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora" in n else 0.3))
    x = torch.randn(30, 32, generator=torch.Generator().manual_seed(8))
    base, s = layer.experts, ALPHA / RANK
    with torch.no_grad():
        gu = x @ base.gate_up_proj[6] + base.gate_up_proj_bias[6]
        if layout == "fused":
            gu = gu + s * (x @ graft.gate_up_lora_A[0].T) @ graft.gate_up_lora_B[0].T
            gate, up = gu[:, 0::2], gu[:, 1::2]
        else:
            gate = gu[:, 0::2] + s * (x @ graft.gate_lora_A[0].T) @ graft.gate_lora_B[0].T
            up = gu[:, 1::2] + s * (x @ graft.up_lora_A[0].T) @ graft.up_lora_B[0].T
        _assert_the_clamp_acts(gate, up)
        gc = gate.clamp(max=LIMIT)
        h = (up.clamp(-LIMIT, LIMIT) + 1) * gc * torch.sigmoid(GAIN * gc)
        y = h @ base.down_proj[6] + base.down_proj_bias[6] + s * (h @ graft.down_lora_A[0].T) @ graft.down_lora_B[0].T
        want = torch.sigmoid(x @ graft.gate[0] + graft.gate_bias[0])[:, None] * y
        torch.testing.assert_close(graft(x), want, rtol=0, atol=2e-5)
    full = GraftedExperts(layer, 1, train_full=True, gate="none")
    full.init_from([6])
    assert [n for n, _ in full.named_parameters()] == ["gate", "gate_bias", "gate_up_proj", "down_proj",
                                                       "gate_up_proj_bias", "down_proj_bias"]
    assert full.gate_up_proj.shape == (1, 32, 32) and full.down_proj.shape == (1, 16, 32)
    from fedmoe.algorithms.flex import _expert_forward

    with torch.no_grad():
        torch.testing.assert_close(full(x), _expert_forward(base, 6, x), rtol=0, atol=1e-5)
        ex = ExpertsWithLoRA(base, 1, None)
        torch.testing.assert_close(full(x), ex(x, torch.full((30, 1), 6), torch.ones(30, 1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_full", [False, True])
def test_flex_counts_on_gpt_oss_equal_the_model(train_full):
    """FLEx on a tiny gpt-oss: the trainables counted from the inventory are the parameters built (the gate's
    bias; a full copy's biases), the FLOPs of a sequence equal torch's FlopCounterMode (the biases, added, cost
    none), and the active parameters count the grafted expert's biases as part of its frozen FFN."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedmoe.algorithms import METHODS
    from fedmoe.config import load_config
    from helpers import built

    cfg = load_config(None, ["algorithm.name=flex", "lora.rank=4", f"algorithm.flex.train_full={str(train_full).lower()}"])
    mm = MoEModel(tiny_hf("gpt_oss"))
    _, _, spec = built(METHODS["flex"], cfg, mm)
    for g in [layer.block.grafted for layer in mm.layers]:
        g.init_from([3])
    for layer in mm.layers:
        mm.experts_module(layer.index).grouped = False
    T = 12
    c = spec.counts(k=2, seq_len=T)
    assert c["total_trainable"] == sum(p.numel() for p in mm.trainable_parameters().values())
    assert any(n.endswith("grafted.gate_bias") for n in mm.trainable_names())
    ids = torch.randint(2, 128, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mm.model(input_ids=ids)
    assert c["flops_per_seq"] == counter.get_total_flops()
    H, I = 32, 16
    from fedmoe.eval.flops import count_flops

    frozen = 0 if train_full else len(mm.layers) * (3 * H * I + 2 * I + H)
    assert c["active_params"] == count_flops(mm.config, T, k=2)["active_params"] + frozen


# ------------------------------------------------------------------------ exports
def _base_folder(tmp_path, **kw):
    """A tiny gpt-oss (nonzero expert biases) saved as a Hugging Face folder, with the built-in tokenizer."""
    return hf_folder(tmp_path, "gpt_oss", **kw)


_loaded = loaded_model  # a LoadedModel of the tiny base with random adapters (as the export writers take one)


IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 1200, 3, 8, 11, 4], [8, 8, 15, 16, 23, 42, 99, 4, 4, 5, 6]])


@pytest.mark.parametrize("layout,router,scale,top_k", [("fused", False, None, None), ("split", True, 0.7, 1)])
def test_merged_export_folds_into_the_transposed_stacks(tmp_path, layout, router, scale, top_k):
    """W + ΔW in every adapted weight, ΔW transposed into gpt-oss's (in, out) stacks (gate and up rows of a split
    layout interleaved as its outputs are), router LoRA into mlp.router.weight, a rescaler into down_proj and
    down_proj_bias, k_i into the config: transformers' reload gives fedmoe's logits (every position)."""
    from transformers import AutoModelForCausalLM

    from fedmoe.export import write_merged

    loaded = _loaded(_base_folder(tmp_path), layout, router, scale, top_k)
    loaded.mm.tracker.skip_padding = False
    with torch.no_grad():
        ours = loaded.mm.model(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(IDS).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters matter
    write_merged(loaded, tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.config.num_experts_per_tok == (top_k or 2) and merged.config.model_type == "gpt_oss"
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, rtol=0, atol=2e-5)


def test_vllm_form_is_the_fused_3d_form_peft_reads(tmp_path):
    """For gpt-oss the vllm form holds the expert LoRA as vLLM's GptOssForCausalLM reads it (is_3d_moe_weight):
    PEFT's target_parameters keys, experts.base_layer = gate_up_proj (A (E·r, H), B (2I, r·E), B's rows in the
    stored, interleaved order) and experts = down_proj. PEFT loads the folder onto transformers' model and gives
    fedmoe's logits; with LoRA on down_proj only, gate_up's pair is written as zeros (vLLM asserts both); the
    split layout (two A's on gate_up) has no such form and is refused, naming --merged."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedmoe.export import export_notes, vllm_blockers, vllm_tensors, write_vllm

    folder = _base_folder(tmp_path)
    loaded = _loaded(folder)
    (tmp_path / "v").mkdir()
    write_vllm(loaded, tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    t = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    stem = "base_model.model.model.layers.0.mlp.experts"
    assert t[f"{stem}.base_layer.lora_A.weight"].shape == (8 * RANK, 32)
    assert t[f"{stem}.base_layer.lora_B.weight"].shape == (32, RANK * 8)
    assert t[f"{stem}.lora_A.weight"].shape == (8 * RANK, 16) and t[f"{stem}.lora_B.weight"].shape == (32, RANK * 8)
    assert not any(".experts.0." in k for k in t)  # nothing per expert
    loaded.mm.tracker.skip_padding = False
    with torch.no_grad():
        ours = loaded.mm.model(IDS).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "v")
        torch.testing.assert_close(peft(IDS).logits, ours, rtol=0, atol=2e-5)
    assert any("3-D" in n for n in export_notes(loaded.cfg, "vllm", loaded.mm))
    down_only = MoEModel.from_pretrained(str(folder))
    down_only.add_expert_lora(RANK, ALPHA, targets=("down_proj",))
    _randomise(down_only)
    tensors, _, _, _ = vllm_tensors(down_only)
    assert not tensors[f"{stem}.base_layer.lora_B.weight"].any() and tensors[f"{stem}.lora_B.weight"].any()
    split = _loaded(folder, layout="split")
    why = vllm_blockers(split.mm, split.cfg)
    assert len(why) == 1 and "fused 3-D expert LoRA vLLM reads for gpt_oss" in why[0]


# ------------------------------------------------------------------------ loading: MXFP4, attention, plan
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _to_mxfp4(w: torch.Tensor):
    """A stored stack (E, in, out) in the hub checkpoints' MXFP4 (as transformers 5.23's
    ``convert_moe_packed_tensors`` reads it): blocks (E, out, in/32, 16) of e2m1 codes, two a byte, the lower
    nibble first; scales (E, out, in/32) of power-of-two exponents + 127. Returns (blocks, scales, the stack
    the codes hold)."""
    t = w.detach().transpose(1, 2)
    E, O, I = t.shape
    b = t.reshape(E, O, I // 32, 32)
    exp = torch.floor(torch.log2(b.abs().amax(-1).clamp_min(2.0**-100) / 6.0)).clamp(-100, 100)
    idx = (b[..., None] / torch.exp2(exp)[..., None, None] - _FP4).abs().argmin(-1)
    held = (_FP4[idx] * torch.exp2(exp)[..., None]).reshape(E, O, I).transpose(1, 2).contiguous()
    return (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8), (exp + 127).to(torch.uint8), held


def _mxfp4_checkpoint(tmp_path):
    """(a tiny gpt-oss folder, the same model with its experts stored in the hub's MXFP4 layout — blocks, scales
    and a quantization_config —, transformers' model of the first holding exactly the values the codes encode)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = _base_folder(tmp_path, intermediate_size=32)  # MXFP4 blocks of 32 along the input features
    reference = AutoModelForCausalLM.from_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales, held = _to_mxfp4(state.pop(key))
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        with torch.no_grad():
            reference.get_parameter(key).copy_(held)
    mx = tmp_path / "mxfp4"
    shutil.copytree(folder, mx)
    save_file(state, str(mx / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((mx / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx / "config.json").write_text(json.dumps(config))
    return folder, mx, reference


def test_a_merged_export_of_an_mxfp4_base_is_a_plain_model(tmp_path):
    """fedmoe export --merged from a hub-style MXFP4 base: the saved folder holds the fused stacks under their
    own names (transformers would write them back under *_blocks, with no scales, and a reload would leave
    the experts random with a warning), and transformers' reload gives fedmoe's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedmoe.export import write_merged

    _, mx, _ = _mxfp4_checkpoint(tmp_path)
    loaded = _loaded(mx)
    loaded.mm.tracker.skip_padding = False
    with torch.no_grad():
        ours = loaded.mm.model(IDS).logits
    write_merged(loaded, tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert not [k for k in keys if k.endswith(("_blocks", "_scales"))]
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.1.mlp.experts.down_proj" in keys
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, rtol=0, atol=2e-5)
    from fedmoe.export import export_notes

    # a PEFT adapter on this base needs the base dequantized as fedmoe loaded it; a base stored plainly does not
    assert any("Mxfp4Config(dequantize=True)" in n for n in export_notes(loaded.cfg, "peft", loaded.mm))
    plain = loaded.cfg.model_copy(update={"model": loaded.cfg.model.model_copy(update={"name": str(tmp_path / "m")})})
    assert not any("MXFP4" in n for n in export_notes(plain, "peft", loaded.mm))
    assert any("vLLM issue 22380" in n for n in export_notes(loaded.cfg, "merged", loaded.mm))


def test_an_mxfp4_checkpoint_loads_dequantized_and_plans(tmp_path):
    """The hub's gpt-oss checkpoints store the experts as MXFP4 blocks and scales with a quantization_config
    (quant_method mxfp4): fedmoe loads them with Mxfp4Config(dequantize=True), so the experts are the fused
    stacks in the run's dtype, holding exactly the values the codes encode, and the config keeps no
    quantization_config (a merged export is a plain model). sdpa, fedmoe's default, becomes eager (transformers
    has no SDPA for gpt-oss's sinks). fedmoe plan takes the checkpoint's config.json."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    folder, mx, reference = _mxfp4_checkpoint(tmp_path)

    from transformers import Mxfp4Config

    from fedmoe.moe.model import pretrained_kwargs

    # asked for, not left to transformers' choice (on a GPU with the kernels package and Triton it would keep
    # the MXFP4 experts: packed uint8 stacks, for inference only); on this CPU it dequantizes anyway
    kw = pretrained_kwargs(str(mx))
    assert isinstance(kw["quantization_config"], Mxfp4Config) and kw["quantization_config"].dequantize
    assert "quantization_config" not in pretrained_kwargs(str(folder)) and kw["attn_implementation"] == "eager"
    mm = MoEModel.from_pretrained(str(mx))  # model.dtype float32, attn_implementation sdpa: fedmoe's defaults
    assert mm.config._attn_implementation == "eager" and getattr(mm.config, "quantization_config", None) is None
    for layer, ref_layer in zip(mm.layers, reference.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            got, want = getattr(layer.experts, name), getattr(ref_layer.mlp.experts, name)
            assert got.dtype == torch.float32 and torch.equal(got, want), name
    mm.tracker.skip_padding = False
    with torch.no_grad():
        torch.testing.assert_close(mm.model(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-6)
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    from fedmoe.moe import UnsupportedModelError

    kept = AutoModelForCausalLM.from_pretrained(folder)  # as transformers leaves it where its MXFP4 kernels run
    kept.model.layers[1].mlp.experts = Mxfp4GptOssExperts(kept.config)
    with pytest.raises(UnsupportedModelError, match=r"layer 1 .*still in MXFP4.*Mxfp4Config\(dequantize=True\)"):
        MoEModel(kept)
    bf16 = MoEModel.from_pretrained(str(mx), dtype="bfloat16")
    assert bf16.layers[0].experts.gate_up_proj.dtype == torch.bfloat16
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "plan", "--set", f"model.name={mx / 'config.json'}",
                        "--set", "data.max_length=32", "--set", "train.batch_size=2", "--set", "model.quantization=nf4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "GiB" in r.stdout or "MiB" in r.stdout


# ------------------------------------------------------------------------ federated rounds
@pytest.mark.parametrize("method", [
    ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "train.aux_loss=true"],
    ["algorithm.name=fcmoe", "train.activation_checkpointing=true"],
    ["algorithm.name=flex", "lora.experts=false", "algorithm.flex.calibration_size=4", "model.quantization=nf4"],
], ids=["flame", "fcmoe", "flex"])
def test_federated_rounds(tmp_path, method):
    """One federated round of FLAME (a k_i = 1 client, the load-balancing loss of gpt-oss's module on), FC-MoE
    (under activation checkpointing) and FLEx (on an NF4 base) on a tiny gpt-oss: finite losses; FLAME's k = 1
    client exports merged to the logits fedmoe evaluates it with; FLEx grafts an expert per layer."""
    from transformers import AutoModelForCausalLM

    from fedmoe.export import export_model, load_run_model

    _, rd = one_small_round(_base_folder(tmp_path), tmp_path, *method)
    name = method[0].split("=")[1]
    if name == "flame":
        loaded = load_run_model(rd.path, 1)
        assert loaded.mm.top_k == 1
        assert export_model(rd.path, tmp_path / "m", client=1, merged=True) == ("merged", [])
        with torch.no_grad():
            ours = loaded.mm.model(IDS).logits
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(IDS).logits, ours,
                                       rtol=0, atol=2e-4)
    if name == "flex":
        ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
        assert ck["transport"]["private"][0]["graft_index"].shape == (2, 1)
        assert any(n.endswith("grafted.gate_bias") for n in ck["transport"]["private"][0])
