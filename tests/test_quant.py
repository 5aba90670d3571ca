"""Quantized frozen bases (model.quantization): the codes by hand, the fused expert tensors really
stored in 4 / 8 bits, experts dequantized one at a time, logits near the full-precision model's,
training through the quantized base, and a federated run that resumes exactly."""

import json

import pytest
import torch

from helpers import tiny_hf, whole_and_resumed

from fedmoe.config import load_config
from fedmoe.moe import MoEModel, find_moe_layers
from fedmoe.moe.quant import (FP4_LEVELS, NF4_LEVELS, QuantizedLinear, QuantizedWeight, block_size, dequantize,
                              quantize_model, quantize_tensor, stored_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nf4_codes_by_hand():
    """One block of 4: absmax 2, values / 2 = 1, 0.3, -0.1, 0 -> the nearest NF4 levels 15, 11 (0.3379),
    6 (-0.0911), 7 (0); packed high nibble first."""
    w = torch.tensor([[2.0, 0.6, -0.2, 0.0]])
    codes, absmax, block = quantize_tensor(w, "nf4")
    assert block == 4 and absmax.tolist() == [[2.0]]
    assert codes.dtype == torch.uint8 and codes.tolist() == [[15 << 4 | 11, 6 << 4 | 7]]
    back = dequantize(codes, absmax, block, "nf4", torch.float32)
    assert back[0].tolist() == pytest.approx([2.0, 2 * NF4_LEVELS[11], 2 * NF4_LEVELS[6], 0.0])


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_levels_are_exact_and_the_error_is_bounded(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 128, generator=g)
    codes, absmax, block = quantize_tensor(w, scheme)
    back = dequantize(codes, absmax, block, scheme, torch.float32)
    assert back.shape == w.shape
    blocks = w.reshape(3, 8, -1, block).abs().amax(-1, keepdim=True)
    err = (back - w).reshape(3, 8, -1, block).abs()
    if scheme == "int8":
        assert codes.dtype == torch.int8 and codes.shape == w.shape and block == 128
        assert bool((err <= blocks / 254 + 1e-6).all())
    else:
        levels = torch.tensor(NF4_LEVELS if scheme == "nf4" else FP4_LEVELS)
        half_gap = float((levels[1:] - levels[:-1]).max()) / 2
        assert codes.dtype == torch.uint8 and codes.shape == (3, 8, 64) and block == 64
        assert bool((err <= blocks * half_gap + 1e-6).all())
        # a tensor made of the levels themselves (times each block's absmax) comes back exactly
        exact = levels[torch.randint(0, 16, (4, 64), generator=g)] * torch.tensor([[3.0], [0.5], [1.0], [2.0]])
        exact[:, 0] = torch.tensor([3.0, 0.5, 1.0, 2.0])  # the absmax is in the block
        c, a, b = quantize_tensor(exact, scheme)
        torch.testing.assert_close(dequantize(c, a, b, scheme, torch.float32), exact, rtol=0, atol=1e-6)


def test_nf4_is_bitsandbytes_nf4_bit_for_bit():
    """fedmoe's NF4 of a fused expert stack is bitsandbytes' ``quantize_4bit(quant_type="nf4",
    blocksize=64)`` of it, the reference QLoRA implementation: the same packed codes (high nibble
    first), the same float32 absmax per block, the same dequantized tensor — through
    :class:`QuantizedWeight` too, expert by expert. (fedmoe's ``fp4`` is not bitsandbytes' fp4: it
    takes the OCP e2m1 levels, see ``fedmoe.moe.quant``; their codes differ by design.)"""
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(11)
    stack = torch.randn(4, 128, 256, generator=g) * torch.rand(4, 128, 1, generator=g)  # rows of other scales
    stack[1, 3, :64] = 0.0  # an all-zero block
    ref_codes, state = bnbf.quantize_4bit(stack.reshape(-1, 256).contiguous(), blocksize=64, quant_type="nf4")
    codes, absmax, block = quantize_tensor(stack, "nf4")
    assert block == 64 and codes.shape == (4, 128, 128)
    assert torch.equal(codes.reshape(-1), ref_codes.reshape(-1))
    assert torch.equal(absmax.reshape(-1), state.absmax.reshape(-1))
    ref = bnbf.dequantize_4bit(ref_codes, state).reshape(stack.shape)
    assert torch.equal(dequantize(codes, absmax, block, "nf4", torch.float32), ref)
    qw = QuantizedWeight(stack, "nf4")
    for e in range(4):
        assert torch.equal(qw[e].float(), ref[e])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantization_through_bitsandbytes_is_the_plain_one(monkeypatch, dtype):
    """Where bitsandbytes is installed, NF4 is dequantized by its kernel: the very tensor fedmoe's plain
    PyTorch path gives (levels times absmax in float32, rounded to the dtype once), for blocks it
    supports (32, 64) and through the plain path for one it does not (16); FP4 (other levels than
    bitsandbytes' fp4) always takes the plain path."""
    from fedmoe.moe import quant

    calls = []
    kernel = quant._bnb_dequant()
    assert kernel is not None  # bitsandbytes is a dev dependency: this test compares the two paths
    monkeypatch.setattr(quant, "_BNB_DEQUANT", lambda *a: calls.append(a[2]) or kernel(*a))
    g = torch.Generator().manual_seed(5)
    for shape in [(3, 40, 128), (2, 6, 32), (5, 16)]:
        w = torch.randn(*shape, generator=g) * 0.05
        for scheme in ("nf4", "fp4"):
            codes, absmax, block = quantize_tensor(w, scheme)
            monkeypatch.setattr(quant, "USE_BITSANDBYTES", True)
            fast = dequantize(codes, absmax, block, scheme, dtype)
            monkeypatch.setattr(quant, "USE_BITSANDBYTES", False)
            plain = dequantize(codes, absmax, block, scheme, dtype)
            assert fast.dtype == plain.dtype == dtype and fast.shape == w.shape
            assert torch.equal(fast, plain), (shape, scheme)
    assert calls == [64, 32]  # nf4 at blocks 64 and 32 went through bitsandbytes; block 16 and fp4 did not


def test_block_size():
    assert block_size(2048) == 64 and block_size(32) == 32 and block_size(16) == 16 and block_size(96) == 48
    with pytest.raises(ValueError, match="odd"):
        block_size(7)


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "qwen3_5_moe_text", "gpt_oss", "granitemoe", "lfm2_moe",
                                  "phimoe", "llama4_text"])
# a hybrid's linear attention; gpt-oss's transposed, biased stacks; Granite-MoE's multipliers; LFM2-MoE's short
# convolutions and dense MLP; Phi-3.5-MoE's biased attention and sparsemixer router; Llama-4's transposed stacks, its
# shared expert and dense MLPs, its router (an nn.Linear subclass, kept) and its input-scaled experts
@pytest.mark.parametrize("scheme,rel", [("nf4", 0.12), ("fp4", 0.12), ("int8", 0.01)])
def test_quantized_model_stores_the_experts_in_4_or_8_bits_and_stays_close(arch, scheme, rel):
    """The fused expert tensors and the attention linears become codes (uint8 / int8) + float32 scales;
    the logits move by less than ``rel`` of their RMS (measured 2026-12-04: nf4 0.076 / 0.082, fp4 0.085 /
    0.087, int8 0.0046 / 0.0049 on the tiny OLMoE / Qwen3-MoE, whose 32-wide rows make 32-weight blocks).
    gpt-oss's stacks, stored (in, out), are quantized as their transposes: blocks along the input features
    as the others', the codes (E, out, in / 2).

    The quantized model routes each token as the full-precision one did (each router's output replaced by
    the reference's; the same numbers for the other families): a random tiny router's near ties, flipped by
    a 4-bit perturbation of the attention, would otherwise decide the number for gpt-oss, whose experts are
    near-linear in x at this scale ((up + 1) * glu), so their output is a large part of its residual stream:
    a flipped tie moved its logits by 0.26 of their RMS with NF4; with the routing pinned, 0.043 (fp4 0.045,
    int8 0.0024). Llama-4's tiny model has four decoder layers (a dense one before each MoE one, as Maverick), twice the
    quantized linears of the others: its logits move by 0.127 (nf4), 0.136 (fp4), 0.0069 (int8), each expert stack by
    0.088 / 0.10 / 0.0054 of its norm as the others' (its two-layer variant's logits: 0.088 / 0.097 / 0.0052); its
    bound is 1.25 times theirs."""
    rel = rel * 1.25 if arch == "llama4_text" else rel
    ref = tiny_hf(arch)
    mm = MoEModel(tiny_hf(arch))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, mm.config.vocab_size, (3, 12), generator=g)
    routed = {}
    hooks = [layer.router.register_forward_hook(lambda m, a, o, i=layer.index: routed.__setitem__(i, o))
             for layer in find_moe_layers(ref)]
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    for h in hooks:
        h.remove()
    for layer in mm.layers:
        layer.router.register_forward_hook(lambda m, a, o, i=layer.index: routed[i])
    before = stored_bytes(mm.model)
    stats = quantize_model(mm, scheme)
    after = stored_bytes(mm.model)
    for layer in mm.layers:
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(layer.experts, name)
            assert isinstance(w, QuantizedWeight) and w.scheme == scheme
            assert w.codes.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
            full = w.shape[0] * w.shape[1] * w.shape[2]
            assert w.codes.numel() == (full if scheme == "int8" else full // 2)
            fan_in = w.shape[1] if arch in ("gpt_oss", "llama4_text") else w.shape[2]  # stored (in, out)
            assert w.codes.shape[-1] == (fan_in if scheme == "int8" else fan_in // 2)
    from fedmoe.moe.arch import decoder_layers, token_mixers

    # every linear of the decoder layers (attention, a hybrid's other mixer, shared experts, dense MLPs; no router is
    # a linear here) but a 1-wide one (Qwen's shared-expert gate)
    attn = [m for m in mm.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(attn) == sum(type(m) is torch.nn.Linear and m.out_features > 1 for layer in decoder_layers(ref)
                            for m in layer.modules())

    mixers = [m for layer in decoder_layers(mm.model) for m in token_mixers(layer)]
    assert not [n for m in mixers for n, c in m.named_children() if type(c) is torch.nn.Linear]  # linear attention too
    assert stats["bytes_before"] - stats["bytes_after"] == before - after > 0
    assert stats["bytes_after"] < stats["bytes_before"] * (0.3 if scheme == "int8" else 0.2)
    with torch.no_grad():
        got = mm.model(input_ids=ids).logits
    rms = float(want.pow(2).mean().sqrt())
    drift = float((got - want).pow(2).mean().sqrt()) / rms
    assert 0 < drift < rel, f"{scheme} on {arch}: logits move by {drift:.4f} of their RMS"


def test_experts_are_dequantized_one_at_a_time(monkeypatch):
    """The expert forward dequantizes single experts of a quantized stack (by index, inside the
    projection), never the whole stack, and only experts that have routed tokens."""
    import fedmoe.moe.quant as quant

    mm = MoEModel(tiny_hf("olmoe"))
    quantize_model(mm, "nf4")
    mm.add_expert_lora(4, 8.0)
    experts, shapes = [], []
    orig_proj, orig_deq = quant.quantized_proj, quant.dequantize

    def proj(a, w):
        experts.append(w[1])
        return orig_proj(a, w)

    def deq(codes, *args):
        shapes.append(tuple(codes.shape))
        return orig_deq(codes, *args)

    monkeypatch.setattr(quant, "quantized_proj", proj)
    monkeypatch.setattr(quant, "dequantize", deq)
    mm.set_top_k(1)
    mm.model(input_ids=torch.full((1, 1), 5))  # one token, k = 1: one expert per layer
    assert len(experts) == 2 * len(mm.layers) and all(isinstance(e, int) for e in experts)  # gate_up, down
    assert all(len(s) == 2 for s in shapes)  # every dequantized tensor is one matrix, never an expert stack


def test_training_through_a_quantized_base_reduces_the_loss():
    """The same adapters trained the same way on the full-precision and on the NF4 base: both lower the
    loss, by comparable amounts, and the quantized codes never change."""
    from fedmoe.data.tokenize import collate_sft
    from fedmoe.eval import evaluate_loss
    from fedmoe.train import train_local

    cfg = load_config(None, ["train.max_steps=30", "train.batch_size=4", "train.lr=0.02", "train.grad_clip=null"])
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(2, 128, (8, 16), generator=g).tolist()
    examples = [{"input_ids": s, "labels": [-100] * 4 + s[4:]} for s in seq]
    drops = {}
    for scheme in ("none", "nf4"):
        mm = MoEModel(tiny_hf("olmoe"))
        quantize_model(mm, scheme)
        torch.manual_seed(0)
        mm.add_expert_lora(4, 8.0)
        mm.add_attention_lora(4, 8.0)
        frozen = {n: b.clone() for n, b in mm.model.named_buffers() if n.endswith("codes")}

        def loss():
            return evaluate_loss(mm.model, [collate_sft(examples, 0)], "cpu")["loss"]

        before = loss()
        train_local(mm, examples, cfg.train, pad_id=0, lr=cfg.train.lr, seed=0)
        drops[scheme] = before - loss()
        assert all(torch.equal(b, frozen[n]) for n, b in mm.model.named_buffers() if n in frozen)
        assert len(frozen) == (0 if scheme == "none" else 2 * len(mm.layers) + 4 * mm.config.num_hidden_layers)
    assert drops["none"] > 0.2 and 0.5 * drops["none"] < drops["nf4"] < 2 * drops["none"], drops


@pytest.mark.parametrize("method", ["fedit", "flex", "flame"])
def test_a_federated_nf4_run_is_finite_and_resumes_exactly(tmp_path, method):
    """FedIT, FLEx (grafts taken from the dequantized pretrained experts) and FLAME (k_i, rescaler) on an
    NF4 base: finite, and a run stopped after round 1 and resumed equals the uninterrupted one."""
    sets = [f"algorithm.name={method}", "model.name=builtin:tiny-olmoe", "model.quantization=nf4", "data.max_examples=160", "data.max_length=32",
            "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2", "federation.rounds=2",
            "eval.rouge=false", "data.max_test_per_client=3", "lora.rank=2"]
    _, resumed, rd = whole_and_resumed(tmp_path, sets)
    # the checkpoint holds the adapters, not the quantized base
    state = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
    assert not any("codes" in n for n in state["global_state"])
    assert json.loads((rd.path / "summary.json").read_text())["global"]["loss"] == resumed["global"]["loss"]


def test_the_backward_does_not_keep_dequantized_weights():
    """The live tensors of a training step (fedmoe.plan's count, on real tensors): with an NF4 base the
    activations are those of the full-precision base, not those plus every used expert's dequantized
    weights (which saving W for the backward of x @ W.T would keep: 25 MB here)."""
    from fedmoe.algorithms import get_method
    from fedmoe.plan import training_step_bytes

    sets = ["model.name=builtin:tiny-moe", "data.max_length=48", "train.batch_size=2"]
    full = training_step_bytes(load_config(None, sets), get_method("fedit"), 4, fake=False)
    nf4 = training_step_bytes(load_config(None, [*sets, "model.quantization=nf4"]), get_method("fedit"), 4, fake=False)
    mm = MoEModel.from_pretrained("builtin:tiny-moe")
    experts = sum(getattr(layer.experts, n).numel() * 4 for layer in mm.layers for n in ("gate_up_proj", "down_proj"))
    assert experts > 20 * 2**20
    assert nf4["weights"] < full["weights"] - 0.8 * experts
    assert nf4["activations"] < full["activations"] + 0.1 * experts, (nf4, full, experts)
