"""Expert LoRA layouts and router LoRA: the split layout (a pair each for gate, up and down) against
the fused layout with a shared A and against a hand computation (both layouts on both compute paths:
tests/test_moe.py; in FLEx's grafts: tests/test_flex.py; in a FLAME run: tests/test_flame.py);
router LoRA's logits against x·(W + (α/r)·B·A)ᵀ on every architecture; both on a meta skeleton and
in the methods' name parsing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_hf, token_batch

import fedmoe.moe.lora as lora_mod
from fedmoe.moe import SUPPORTED_ARCHITECTURES, MoEModel, RouterWithLoRA
from fedmoe.moe.lora import expert_lora_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls

ARCHS = list(SUPPORTED_ARCHITECTURES)
RANK, ALPHA = 4, 8.0
SPLIT = ("gate_lora_A", "gate_lora_B", "up_lora_A", "up_lora_B", "down_lora_A", "down_lora_B")


_hf = tiny_hf


def _batch(seed=1, batch=3, seq=11, vocab=128):
    return token_batch(seed, batch, seq, vocab, pad_last_row=False)


def _randomise(mm, seed=11, scale=0.3):
    """Non-zero B as well as A, so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _set_grouped(mm, grouped):
    for layer in mm.layers:
        mm.experts_module(layer.index).grouped = grouped


# ------------------------------------------------------------------------ split layout: structure
def test_split_tensors_shapes_order_and_init():
    mm = MoEModel(_hf("olmoe"))
    torch.manual_seed(3)
    mm.add_expert_lora(RANK, ALPHA, layout="split")
    E, H, I = 8, 32, 16
    ex = mm.experts_module(0)
    names = [n for n, _ in ex.named_parameters() if "lora" in n]
    assert names == list(SPLIT)  # creation order: gate, up, down; A before B
    shapes = {n: tuple(getattr(ex, n).shape) for n in names}
    assert shapes == {"gate_lora_A": (E, RANK, H), "gate_lora_B": (E, I, RANK), "up_lora_A": (E, RANK, H),
                      "up_lora_B": (E, I, RANK), "down_lora_A": (E, RANK, I), "down_lora_B": (E, H, RANK)}
    for n in names:
        t = getattr(ex, n)
        if n.endswith("_B"):
            assert not t.any()
        else:  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
            assert t.abs().max() <= 1 / t.shape[-1] ** 0.5 and t.std() > 0
    assert not hasattr(ex, "gate_up_lora_A")
    # deterministic: the same seed gives the same tensors, and a fresh split adapter changes nothing
    again = MoEModel(_hf("olmoe"))
    torch.manual_seed(3)
    again.add_expert_lora(RANK, ALPHA, layout="split")
    assert all(torch.equal(a, b) for a, b in zip(mm.get_state().values(), again.get_state().values()))
    ids, mask = _batch()
    plain = MoEModel(_hf("olmoe"))
    torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits, plain.model(ids, attention_mask=mask).logits,
                               rtol=0, atol=1e-6)
    # targets: gate_up_proj -> the gate and up pairs; down_proj -> the down pair
    only_gu = MoEModel(_hf("olmoe"))
    only_gu.add_expert_lora(RANK, ALPHA, targets=("gate_up_proj",), layout="split")
    assert {n.rsplit(".", 1)[1] for n in only_gu.trainable_names()} == set(SPLIT[:4])
    only_d = MoEModel(_hf("olmoe"))
    only_d.add_expert_lora(RANK, ALPHA, targets=("down_proj",), layout="split")
    assert {n.rsplit(".", 1)[1] for n in only_d.trainable_names()} == set(SPLIT[4:])
    with pytest.raises(ValueError, match="lora.expert_layout"):
        expert_lora_pairs("stacked", ("down_proj",), H, I)


# ------------------------------------------------------------------------ split layout: equivalences
@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "gpt_oss", "phimoe", "llama4_text"])
def test_split_with_a_shared_A_equals_the_fused_layout(arch):
    """gate_lora_A = up_lora_A = A_fused and cat(gate_lora_B, up_lora_B) = B_fused make the split
    adapters the fused one, on both compute paths (gpt-oss: B_fused's rows interleave the gate's and the
    up's, as its gate_up_proj's outputs do)."""
    fused = MoEModel(_hf(arch))
    fused.add_expert_lora(RANK, ALPHA)
    _randomise(fused)
    split = MoEModel(_hf(arch))
    split.add_expert_lora(RANK, ALPHA, layout="split")
    I = split.layers[0].intermediate_size
    gate_rows, up_rows = (slice(0, None, 2), slice(1, None, 2)) if arch == "gpt_oss" else (slice(0, I), slice(I, None))
    with torch.no_grad():
        for layer in fused.layers:
            f, s = fused.experts_module(layer.index), split.experts_module(layer.index)
            s.gate_lora_A.copy_(f.gate_up_lora_A)
            s.up_lora_A.copy_(f.gate_up_lora_A)
            s.gate_lora_B.copy_(f.gate_up_lora_B[:, gate_rows])
            s.up_lora_B.copy_(f.gate_up_lora_B[:, up_rows])
            s.down_lora_A.copy_(f.down_lora_A)
            s.down_lora_B.copy_(f.down_lora_B)
    ids, mask = _batch()
    for grouped in ((True, False) if lora_mod._HAS_GROUPED_MM else (False,)):
        _set_grouped(fused, grouped)
        _set_grouped(split, grouped)
        a = fused.model(ids, attention_mask=mask).logits
        b = split.model(ids, attention_mask=mask).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (a - MoEModel(_hf(arch)).model(ids, attention_mask=mask).logits).abs().max() > 1e-3  # LoRA matters


@pytest.mark.parametrize("grouped", [True, False])
def test_split_expert_output_by_hand(grouped):
    """One expert's output: y = W_d·h + s·B_d A_d h, h = act(W_g x + s·B_g A_g x) ⊙ (W_u x + s·B_u A_u x)."""
    if grouped and not lora_mod._HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    mm = MoEModel(_hf("olmoe"))
    mm.add_expert_lora(RANK, ALPHA, layout="split")
    _randomise(mm)
    ex = mm.experts_module(1)
    ex.grouped = grouped
    e, T = 5, 7
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(2))
    w = torch.rand(T, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = ex(x, torch.full((T, 1), e), w)
        s = ALPHA / RANK
        W_gu, W_d = ex.base.gate_up_proj[e], ex.base.down_proj[e]
        I = W_d.shape[1]
        gate = x @ W_gu[:I].T + s * (x @ ex.gate_lora_A[e].T) @ ex.gate_lora_B[e].T
        up = x @ W_gu[I:].T + s * (x @ ex.up_lora_A[e].T) @ ex.up_lora_B[e].T
        h = F.silu(gate) * up
        ref = (h @ W_d.T + s * (h @ ex.down_lora_A[e].T) @ ex.down_lora_B[e].T) * w
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ router LoRA
def _route(arch, router, x, *extra):
    """(logits, scores, chosen experts) of a router's output. Llama-4's router returns (scores, logits): the sigmoid
    of its top-k logits scattered over all experts (0 elsewhere), and the logits; its choice is their top-k."""
    out = router(x, *extra)
    if arch != "llama4_text":
        return out
    scores, logits = out
    return logits, scores, torch.topk(logits, router.top_k, dim=-1).indices


@pytest.mark.parametrize("arch", ARCHS)
def test_router_lora_logits_by_hand(arch):
    """Router logits = x·(W + (α/r)·B·A)ᵀ (+ b: gpt-oss's router is a linear with a bias, which stays as it
    is); the rest of the routing is the architecture's own, on that weight (LFM2-MoE's block passes its routing
    bias along: gate(x, expert_bias)); the base weight stays frozen; the logits the model records (aux loss) are
    these."""
    from fedmoe.moe.arch import moe_block_attr, router_attr

    mm = MoEModel(_hf(arch))
    layer = mm.layers[0]
    base = layer.router
    mm.add_router_lora(RANK, ALPHA)
    attr = router_attr(arch)  # gpt-oss's, Granite-MoE's, Phi-3.5-MoE's and Llama-4's MoE block holds it as router
    assert attr == ("router" if arch in ("gpt_oss", "granitemoe", "phimoe", "llama4_text") else "gate")
    router = getattr(layer.block, attr)
    assert isinstance(router, RouterWithLoRA) and router.base is base
    names = [n for n in mm.trainable_names()]
    d, block = layer.decoder_layer, moe_block_attr(arch)
    assert names[:2] == [f"model.layers.{d}.{block}.{attr}.lora_A", f"model.layers.{d}.{block}.{attr}.lora_B"]
    extra = (layer.block.expert_bias,) if arch == "lfm2_moe" else ()  # what the block passes its router
    bias = getattr(base, "bias", None)
    assert (bias is not None) == (arch == "gpt_oss")
    bias = 0 if bias is None else bias
    E, H = base.weight.shape
    assert router.lora_A.shape == (RANK, H) and router.lora_B.shape == (E, RANK) and not router.lora_B.any()
    _randomise(mm, scale=0.5)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(5))
    logits, scores, index = _route(arch, router, x, *extra)
    merged = base.weight + (ALPHA / RANK) * router.lora_B @ router.lora_A
    torch.testing.assert_close(logits, (x @ merged.T + bias).to(logits.dtype), rtol=0, atol=1e-5)
    # the same scores and choice as the architecture's router holding the merged weight
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.weight.copy_(merged)
        ref_logits, ref_scores, ref_index = _route(arch, ref, x, *extra)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)
    assert torch.equal(index, ref_index)
    assert not torch.equal(index, _route(arch, base, x, *extra)[2])  # the adapter changes the routing
    # gradients reach A and B, not the frozen base weight
    logits.sum().backward()
    assert router.lora_A.grad.abs().sum() > 0 and router.lora_B.grad.abs().sum() > 0 and base.weight.grad is None
    # top-k control reaches the wrapped router; the model records the adapted logits
    mm.set_top_k(1)
    assert router.top_k == 1 and base.top_k == 1
    ids, mask = _batch()
    captured = []
    hook = mm.layers[0].block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    out = mm.model(ids, attention_mask=mask, output_router_logits=True)
    hook.remove()
    h = captured[0].reshape(-1, H)
    torch.testing.assert_close(out.router_logits[0], (h @ router.weight.T + bias).to(out.router_logits[0].dtype),
                               rtol=0, atol=1e-5)


def test_router_lora_scaling_and_replacement():
    mm = MoEModel(_hf("olmoe"))
    mm.add_router_lora(RANK, ALPHA)
    mm.set_lora_scaling(0.5)
    assert all(layer.block.gate.scaling == 0.5 for layer in mm.layers)
    mm.add_router_lora(2, ALPHA)  # replaces, never stacks
    assert all(layer.block.gate.base is layer.router for layer in mm.layers)
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for t in mm.get_state().values())
    assert len(mm.trainable_names()) == 2 * len(mm.layers)


# ------------------------------------------------------------------------ skeleton, methods, names
def _cfg(*sets):
    from fedmoe.config import load_config

    return load_config(None, ["model.name=builtin:tiny-olmoe", "lora.rank=4", *sets])


@pytest.mark.parametrize("method", ["fedit", "flame", "hetlora", "flex"])
def test_skeleton_and_live_model_build_the_same_split_and_router_adapters(method):
    from fedmoe.algorithms import METHODS, model_spec
    from fedmoe.seeds import Stream, derive_seed

    router = method != "flex"  # FLEx trains no router (refused)
    cfg = _cfg(f"algorithm.name={method}", "lora.expert_layout=split", *(["lora.router=true"] if router else []))
    spec = model_spec(cfg, METHODS[method])
    names = list(spec.initial)
    assert all(any(n.endswith(s) for n in names) for s in SPLIT)
    assert ("model.layers.0.mlp.gate.lora_A" in names) == router and not any("gate_up_lora" in n for n in names)
    live = MoEModel.from_pretrained(cfg.model.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Stream.ADAPTER_INIT))
        METHODS[method].client.build(cfg, live)
    spec.check(live)  # same names, shapes and seeded initial values
    # the router LoRA comes last: turning it on leaves the other adapters' initial values as they were
    without = model_spec(_cfg(f"algorithm.name={method}", "lora.expert_layout=split"), METHODS[method])
    assert all(torch.equal(t, spec.initial[n]) for n, t in without.initial.items())


def test_methods_parse_split_and_router_names():
    """FLAME (and FC-MoE) aggregate the split expert tensors per expert and the router LoRA as a shared
    tensor; the rank methods pair every A with its B."""
    from fedmoe.algorithms.rank_hetero import lora_pairs

    cfg = _cfg("algorithm.name=flame", "lora.expert_layout=split", "lora.router=true")
    from fedmoe.algorithms import METHODS, model_spec

    spec = model_spec(cfg, METHODS["flame"])
    layer_of = spec.inventory.expert_layers()
    experts = [n for n in spec.initial if ".experts." in n and "lora" in n]
    assert sorted(layer_of) == sorted(experts) and len(experts) == 6 * 4
    assert not any(".mlp.gate." in n for n in layer_of)
    pairs = lora_pairs(spec.inventory)
    assert len(pairs) == 3 * 4 + 4 * 4 + 4  # expert gate/up/down, q/k/v/o, router, per layer
    assert ("model.layers.2.mlp.experts.up_lora_A", "model.layers.2.mlp.experts.up_lora_B") in pairs
    assert ("model.layers.2.mlp.gate.lora_A", "model.layers.2.mlp.gate.lora_B") in pairs


# ------------------------------------------------------------------------ config
def test_config_keys():
    from fedmoe.config import ConfigError, load_config

    lc = load_config(None, []).lora
    assert lc.expert_layout == "fused" and lc.router is False  # existing runs keep their numbers
    with pytest.raises(ConfigError, match="expert_layout"):
        load_config(None, ["lora.expert_layout=stacked"])
