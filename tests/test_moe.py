"""The model layer on a tiny model of each supported architecture: discovery, expert LoRA (against
PEFT's target_parameters), attention LoRA (against PEFT), top-k control, activation counting."""

import copy


import pytest
import torch
from peft import LoraConfig, get_peft_model
from helpers import peft_wrappers, tiny_hf, token_batch
from transformers import AutoModelForCausalLM

from fedmoe.moe import SUPPORTED_ARCHITECTURES, ExpertsWithLoRA, LoRALinear, MoEModel, TopKError, UnsupportedModelError
from fedmoe.moe.tiny import tiny_config

ARCHS = list(SUPPORTED_ARCHITECTURES)
RANK, ALPHA = 4, 8.0
SHARED = {"olmoe": None, "flex_olmo": None, "qwen2_moe": "Qwen2MoeMLP", "qwen3_moe": None, "qwen3_next": "Qwen3NextMLP",
          "qwen3_5_moe_text": "Qwen3_5MoeMLP", "mixtral": None,
          "deepseek_v2": "DeepseekV2MLP", "deepseek_v3": "DeepseekV3MLP", "glm4_moe": "Glm4MoeMLP",
          "glm4_moe_lite": "Glm4MoeLiteMLP", "ernie4_5_moe": "Ernie4_5_MoeMLP", "gpt_oss": None, "granitemoe": None,
          "lfm2_moe": None, "phimoe": None, "llama4_text": "Llama4TextMLP"}
# the MoE block (decoder layer's attribute) and its router (block's attribute), where not mlp and gate
BLOCK = {"granitemoe": "block_sparse_moe", "lfm2_moe": "feed_forward", "llama4_text": "feed_forward"}
ROUTER = {"gpt_oss": "router", "granitemoe": "router", "phimoe": "router", "llama4_text": "router"}
# the families whose experts hold each weight (in, out): (E, H, 2I) and (E, I, H)
TRANSPOSED = ("gpt_oss", "llama4_text")


_hf = tiny_hf
_batch = token_batch


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery(arch):
    mm = MoEModel(_hf(arch))
    n_dense = 1 if arch.startswith(("deepseek", "glm4_moe", "ernie", "lfm2")) else 0
    assert len(mm.layers) == 2
    # Llama-4's tiny config interleaves a dense layer before each MoE one (as Maverick)
    assert [l.decoder_layer for l in mm.layers] == ([1, 3] if arch == "llama4_text" else [n_dense, n_dense + 1])
    assert mm.num_experts == 8 and mm.default_top_k == 2
    for l in mm.layers:
        assert l.hidden_size == 32 and l.intermediate_size == 16
        # gpt-oss and Llama-4 store each expert's weights (in, out): (E, H, 2I) and (E, I, H)
        down = (8, 16, 32) if arch in TRANSPOSED else (8, 32, 16)
        assert l.experts.gate_up_proj.shape == (8, 32, 32) and l.experts.down_proj.shape == down
        assert l.block is getattr(mm.model.model.layers[l.decoder_layer], BLOCK.get(arch, "mlp"))
        assert l.router is getattr(l.block, ROUTER.get(arch, "gate"))
        assert type(l.shared_expert).__name__ == SHARED[arch] if SHARED[arch] else l.shared_expert is None
    assert (mm.layers[0].shared_expert_gate is not None) == (arch in ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text"))
    # everything of the base model is frozen
    assert mm.trainable_parameters() == {}


def test_dense_and_unknown_models_are_rejected():
    import transformers as tf

    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="olmoe, flex_olmo, qwen2_moe, qwen3_moe, qwen3_next, qwen3_5_moe_text, mixtral, deepseek_v2, "
                       "deepseek_v3, glm4_moe, glm4_moe_lite, ernie4_5_moe, gpt_oss, granitemoe, lfm2_moe, phimoe, "
                       "llama4_text"):
        MoEModel(dense)
    # a supported MoE family whose config makes every layer dense
    cfg = tiny_config("qwen2_moe")
    cfg.mlp_only_layers = [0, 1]
    with pytest.raises(UnsupportedModelError, match="dense"):
        MoEModel(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_experts_equal_hf_forward(arch):
    ref = _hf(arch)
    mm = MoEModel(copy.deepcopy(ref))
    ids, mask = _batch()
    want = ref(ids, attention_mask=mask).logits
    real = mask.bool()  # padding skips the experts (model.skip_padding): the real tokens' logits are HF's
    torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits[real], want[real], rtol=0, atol=1e-5)
    mm.tracker.skip_padding = False  # every slot routed, as Hugging Face does: every position equal
    torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits, want, rtol=0, atol=1e-5)


def _peft_expert_model(ref):
    block = BLOCK.get(ref.config.model_type, "mlp")
    if ref.config.model_type == "llama4_text":
        # PEFT's target_parameters reads a 3-D stack as (E, out, in) unless its module says is_transposed, which
        # transformers' Llama4TextExperts does not (tests/test_llama4.py): marked here, so that PEFT adds each
        # expert's ΔW in the stacks' own (E, in, out) orientation, the reference fedmoe's expert LoRA is held to
        for layer in ref.model.layers:
            if hasattr(layer.feed_forward, "experts"):
                layer.feed_forward.experts.is_transposed = True
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                     target_parameters=[f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"])
    return get_peft_model(ref, cfg)


_peft_wrappers = peft_wrappers


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_matches_peft_outputs_and_grads(arch):
    ref = _hf(arch)
    base = copy.deepcopy(ref)
    ours = MoEModel(copy.deepcopy(ref))
    ours.add_expert_lora(RANK, ALPHA)
    peft_model = _peft_expert_model(ref)
    wrappers = _peft_wrappers(peft_model)
    assert len(wrappers) == 2 * len(ours.layers)

    # random non-zero A and B, written into both models
    g = torch.Generator().manual_seed(3)
    for layer in ours.layers:
        ex = ours.experts_module(layer.index)
        for ours_name, peft_name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            A, B = getattr(ex, f"{ours_name}_lora_A"), getattr(ex, f"{ours_name}_lora_B")
            with torch.no_grad():
                A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)
            pa, pb = ExpertsWithLoRA.to_peft_layout(A.detach(), B.detach())
            w = wrappers[(layer.decoder_layer, peft_name)]
            assert w.lora_A["default"].weight.shape == pa.shape and w.lora_B["default"].weight.shape == pb.shape
            with torch.no_grad():
                w.lora_A["default"].weight.copy_(pa)
                w.lora_B["default"].weight.copy_(pb)

    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out_ours = ours.model(ids, attention_mask=mask, labels=labels)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()  # padding never reaches fedmoe's experts (model.skip_padding): compare the real tokens
    torch.testing.assert_close(out_ours.logits[real], out_peft.logits[real], rtol=0, atol=1e-5)
    # the LoRA changes the output (so the comparison above is not vacuous)
    assert (out_ours.logits - base(ids, attention_mask=mask).logits).abs().max() > 1e-3
    out_ours.loss.backward()
    out_peft.loss.backward()
    for layer in ours.layers:
        ex = ours.experts_module(layer.index)
        for ours_name, peft_name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            w = wrappers[(layer.decoder_layer, peft_name)]
            gA, gB = ExpertsWithLoRA.from_peft_layout(w.lora_A["default"].weight.grad,
                                                      w.lora_B["default"].weight.grad, ours.num_experts)
            torch.testing.assert_close(getattr(ex, f"{ours_name}_lora_A").grad, gA, rtol=0, atol=1e-5)
            torch.testing.assert_close(getattr(ex, f"{ours_name}_lora_B").grad, gB, rtol=0, atol=1e-5)
            assert getattr(ex, f"{ours_name}_lora_B").grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "gpt_oss",
                                  "granitemoe"])  # LFM2-MoE's mixers: tests/test_lfm2_moe.py
def test_attention_lora_matches_peft(arch):
    ref = _hf(arch)
    ours = MoEModel(copy.deepcopy(ref))
    targets = ["q_b_proj" if getattr(ref.config, "q_lora_rank", None) else "q_proj", "o_proj"]  # GLM-4.7-Flash: q_b
    ours.add_attention_lora(RANK, ALPHA, targets)
    peft_model = get_peft_model(ref, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    peft_mods = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), torch.nn.ModuleDict)}
    n_set = 0
    for name, mod in ours.model.named_modules():
        if isinstance(mod, LoRALinear):
            with torch.no_grad():
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.2)
            pm = peft_mods["base_model.model." + name]
            with torch.no_grad():
                pm.lora_A["default"].weight.copy_(mod.lora_A)
                pm.lora_B["default"].weight.copy_(mod.lora_B)
            n_set += 1
    assert n_set == len(targets) * tiny_config(arch).num_hidden_layers
    ids, mask = _batch()
    real = mask.bool()
    torch.testing.assert_close(ours.model(ids, attention_mask=mask).logits[real],
                               peft_model(input_ids=ids, attention_mask=mask).logits[real], rtol=0, atol=1e-5)


def test_default_attention_targets_per_architecture():
    """Multi-head latent attention (DeepSeek-V2, -V3, GLM-4.7-Flash) has no k/v projections: q_proj, kv_b_proj and o_proj
    get LoRA, and with a low-rank query (q_lora_rank, as DeepSeek-V2 and V3 have; V2-Lite has none) its
    up-projection q_b_proj stands in for q_proj — in the model, FLEx's targets and the FLOPs count."""
    from fedmoe.algorithms.flex import FlexClient
    from fedmoe.config import load_config
    from fedmoe.eval.flops import _shape

    for arch in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite"):
        for q_lora_rank, q in ((None, "q_proj"), (8, "q_b_proj")):
            config = tiny_config(arch)
            config.q_lora_rank = q_lora_rank
            mm = MoEModel(AutoModelForCausalLM.from_config(config))
            mm.add_attention_lora(RANK, ALPHA)
            got = sorted({n.split(".")[-2] for n in mm.trainable_names()})
            assert got == sorted([q, "kv_b_proj", "o_proj"]), (arch, q_lora_rank)
            assert FlexClient.attention_targets(load_config(None, []), mm) == [q, "kv_b_proj"]
            assert _shape(config).default_attention_targets == (q, "kv_b_proj", "o_proj")
    # a hybrid model: FLEx adapts both mixers' input projections, neither output projection
    mm = MoEModel(_hf("qwen3_5_moe_text"))
    assert FlexClient.attention_targets(load_config(None, []), mm) == [
        "q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
    mm = MoEModel(_hf("mixtral"))
    with pytest.raises(UnsupportedModelError, match="query_key"):
        mm.add_attention_lora(RANK, ALPHA, ["query_key"])


def test_fresh_adapters_change_nothing():
    ref = _hf("olmoe")
    mm = MoEModel(copy.deepcopy(ref))
    mm.add_expert_lora(RANK, ALPHA)
    mm.add_attention_lora(RANK, ALPHA)
    ids, mask = _batch()
    real = mask.bool()
    torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits[real],
                               ref(ids, attention_mask=mask).logits[real], rtol=0, atol=1e-6)
    # 2 layers x (gate_up A,B + down A,B) + 2 layers x 4 projections x (A,B)
    assert len(mm.trainable_names()) == 2 * 4 + 2 * 4 * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_control_and_activation_counts(arch):
    mm = MoEModel(_hf(arch))
    mm.add_expert_lora(RANK, ALPHA)
    ids, mask = _batch()
    n_real = int(mask.sum())
    layer0 = mm.layers[0]
    captured = {}
    hook = layer0.block.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    for k in (2, 1):
        mm.set_top_k(k)
        assert all(l.router.top_k == k for l in mm.layers)
        mm.reset_activation_counts()
        with mm.tracking(mask):
            mm.model(ids, attention_mask=mask)
        counts, tokens = mm.activation_counts()
        assert counts.shape == (2, 8)
        assert tokens.tolist() == [n_real, n_real]
        assert counts.sum(dim=1).tolist() == [k * n_real, k * n_real]
    hook.remove()
    # counts are exact: recompute layer 0's routing by hand for k=1 (catches counts of the wrong
    # tokens or experts that still sum right): each non-padding token goes to its top-scoring expert
    x = captured["x"].reshape(-1, layer0.hidden_size)[mask.reshape(-1).bool()]
    scores = x @ layer0.router.weight.T  # softmax routers: the top probability is the top logit
    if getattr(layer0.router, "bias", None) is not None:  # gpt-oss's router is a linear with a bias
        scores = scores + layer0.router.bias
    if arch == "deepseek_v3":  # sigmoid scores + bias; every group is kept (topk_group = n_group)
        assert mm.config.topk_group == mm.config.n_group
        scores = torch.sigmoid(scores) + layer0.router.e_score_correction_bias
    if arch == "lfm2_moe":  # sigmoid scores + the block's load-balancing bias (drawn in the tiny model: helpers)
        assert layer0.block.expert_bias.abs().min() > 0
        scores = torch.sigmoid(scores) + layer0.block.expert_bias
    assert counts[0].tolist() == torch.bincount(scores.argmax(dim=-1), minlength=8).tolist()
    mm.set_top_k(2)
    with pytest.raises(TopKError, match="1..2"):
        mm.set_top_k(3)
    with pytest.raises(TopKError):
        mm.set_top_k(0)


def test_activation_counts_match_router_by_hand():
    mm = MoEModel(_hf("olmoe"))
    ids, mask = _batch()
    captured = {}
    layer0 = mm.layers[0]
    h = layer0.block.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    mm.reset_activation_counts()
    with mm.tracking(mask):
        mm.model(ids, attention_mask=mask)
    h.remove()
    x = captured["x"].reshape(-1, 32)
    _, _, idx = layer0.router(x)
    idx = idx[mask.reshape(-1).bool()]
    expected = torch.bincount(idx.reshape(-1), minlength=8)
    assert mm.activation_counts()[0][0].tolist() == expected.tolist()


def test_expert_lora_cost_scales_with_k(monkeypatch):
    """Lower k -> fewer routed (token, expert) pairs reach the LoRA; count LoRA matmul rows."""
    import fedmoe.moe.lora as lora_mod

    mm = MoEModel(_hf("olmoe"))
    mm.add_expert_lora(RANK, ALPHA)
    rows = []
    # count the first layer's LoRA rows on the per-expert path (the others take the grouped path, which
    # is checked equal below)
    mm.experts_module(mm.layers[0].index).grouped = False
    orig = lora_mod.lora_delta

    def counting_lora(x, *args, **kw):
        rows.append(x.shape[0])
        return orig(x, *args, **kw)

    monkeypatch.setattr(lora_mod, "lora_delta", counting_lora)
    ids = _batch(seq=8)[0][:2]
    for k in (2, 1):
        rows.clear()
        mm.set_top_k(k)
        mm.model(ids)
        # gate_up and down LoRA each see every routed pair once
        assert sum(rows) == 2 * k * ids.numel()


def test_state_get_set_zero_roundtrip():
    mm = MoEModel(_hf("qwen2_moe"))
    mm.add_expert_lora(RANK, ALPHA)
    mm.add_attention_lora(RANK, ALPHA)
    s0 = mm.get_state()
    assert all(t.device.type == "cpu" for t in s0.values())
    s1 = {n: torch.randn_like(t) for n, t in s0.items()}
    mm.load_state(s1)
    got = mm.get_state()
    assert all(torch.equal(got[n], s1[n]) for n in s1)
    got[next(iter(got))].add_(1.0)  # a copy: editing it leaves the model alone
    assert torch.equal(mm.get_state()[next(iter(got))], s1[next(iter(got))])
    with pytest.raises(KeyError):
        mm.load_state({"nope": torch.zeros(1)})
    bad = dict(s1)
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        mm.load_state(bad)


def _set_grouped(mm, grouped: bool) -> None:
    for layer in mm.layers:
        mm.experts_module(layer.index).grouped = grouped


@pytest.mark.parametrize("arch,rank,layout", [("olmoe", RANK, "fused"), ("qwen2_moe", RANK, "fused"), ("olmoe", 3, "fused"),
                                              ("olmoe", RANK, "split"), ("qwen2_moe", RANK, "split"),
                                              ("deepseek_v3", RANK, "split"), ("gpt_oss", RANK, "fused"),
                                              ("gpt_oss", RANK, "split")])
def test_grouped_and_per_expert_paths_agree(arch, rank, layout):
    """Both LoRA layouts: logits and every gradient the same on the grouped path and the per-expert
    loop. Rank 3 in fp32 (12-byte rows) is not 16-byte aligned: the grouped path pads it with zero rank
    components (as rank 20 in bf16, FLAME's, on a GPU) and must still equal the loop."""
    import fedmoe.moe.lora as lora_mod

    if not lora_mod._HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    mm = MoEModel(_hf(arch))
    mm.add_expert_lora(rank, ALPHA, layout=layout)
    assert all(mm.experts_module(layer.index)._grouped_ok(torch.float32) for layer in mm.layers)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in mm.trainable_parameters().items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask = _batch()
    results = []
    for grouped in (True, False):
        _set_grouped(mm, grouped)
        mm.model.zero_grad()
        out = mm.model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in mm.trainable_parameters().items()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    assert set(results[0][1]) == set(results[1][1])
    for n in results[0][1]:
        assert results[0][1][n].abs().sum() > 0 or n.endswith("_A")  # every B gets a gradient
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_lora_on_a_subset_of_experts_equals_full_lora_with_zeros_elsewhere(layout):
    """MoE + X baseline: LoRA on expert 3 of layer 0 and expert 5 of layer 1 only, in both layouts and
    on both expert paths."""
    import fedmoe.moe.lora as lora_mod

    full = MoEModel(_hf("olmoe"))
    full.add_expert_lora(RANK, ALPHA, layout=layout)
    sub = MoEModel(_hf("olmoe"))
    sub.add_expert_lora(RANK, ALPHA, experts={0: [3], 1: [5]}, layout=layout)
    names = [n for n, _ in sub.experts_module(0).named_parameters() if "lora" in n]
    assert len(names) == (4 if layout == "fused" else 6)
    g = torch.Generator().manual_seed(4)
    sel = {0: 3, 1: 5}
    with torch.no_grad():
        for layer in (0, 1):
            fe, se = full.experts_module(layer), sub.experts_module(layer)
            for name in names:
                fp, sp = getattr(fe, name), getattr(se, name)
                assert sp.shape[0] == 1 and fp.shape[0] == 8
                fp.zero_()
                sp.copy_(torch.randn(sp.shape, generator=g) * 0.3)
                fp[sel[layer]] = sp[0]
    ids, mask = _batch()
    for grouped in ((True, False) if lora_mod._HAS_GROUPED_MM else (False,)):
        _set_grouped(full, grouped)
        _set_grouped(sub, grouped)
        torch.testing.assert_close(sub.model(ids, attention_mask=mask).logits,
                                   full.model(ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    assert sum(t.numel() for t in sub.get_state().values()) * 8 == sum(t.numel() for t in full.get_state().values())


def test_backward_is_bitwise_deterministic_with_threads():
    """Same inputs, same gradients to the bit, with 2 threads and other allocations in between (the
    token gather must not backpropagate through CPU atomic scatter-adds)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # many repeated token indices (800 tokens x top-8): enough for a racy scatter-add to show
        mm = MoEModel(_hf("olmoe", hidden_size=256, intermediate_size=64, num_experts=32, top_k=8))
        mm.add_expert_lora(RANK, ALPHA)
        x = torch.randn(4, 200, 256, generator=torch.Generator().manual_seed(0))
        grads = []
        for junk in (0, 5, 13):
            garbage = [torch.empty(junk * 7 + i) for i in range(junk)]  # shift later allocations
            xi = x.clone().requires_grad_(True)
            out = mm.layers[0].block(xi)
            (out * out).sum().backward()
            grads.append(xi.grad.clone())
            del garbage
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("arch", ARCHS)
def test_renormalises_top_k_says_what_the_router_does(arch):
    """fedmoe.moe.arch.renormalises_top_k (which FLAME's static rescaler reads) against each family's router as
    transformers runs it: the top-k weights the experts receive have the same sum at k and at k = 1 exactly when it
    says so; a norm_topk_prob family is checked with the flag both ways."""
    from fedmoe.moe.arch import renormalises_top_k
    from fedmoe.moe.tiny import tiny_config

    configs = [tiny_config(arch)]
    if hasattr(configs[0], "norm_topk_prob") and arch not in ("qwen3_5_moe_text", "ernie4_5_moe"):
        flipped = tiny_config(arch)
        flipped.norm_topk_prob = not flipped.norm_topk_prob
        configs.append(flipped)
    for config in configs:
        torch.manual_seed(0)
        mm = MoEModel.from_config(config)
        mm.model.eval()  # routing as at inference: Phi-3.5-MoE's router draws random numbers in training
        sums = {}
        def keep(module, args):  # the top-k weights the experts receive, by k (returns None: args unchanged)
            sums.setdefault(mm.top_k, args[2].float().sum(-1))
        mm.layers[0].block.experts.register_forward_pre_hook(keep)
        ids = torch.randint(2, 100, (2, 9))
        for k in (2, 1):
            mm.set_top_k(k)
            with torch.no_grad():
                mm.model(ids)
        same = torch.allclose(sums[1], sums[2], rtol=1e-5)
        assert same == renormalises_top_k(config), (arch, getattr(config, "norm_topk_prob", None))


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_a_model_folder_without_a_tokenizer_names_the_folder_and_model_tokenizer(tmp_path, arch):
    """A model folder without tokenizer files: transformers either fails ("Couldn't instantiate the backend
    tokenizer ... install sentencepiece": Mixtral's) or builds an empty tokenizer that encodes text to nothing
    (OLMoE's). Both are fedmoe's error naming the folder and model.tokenizer; the folder with the tokenizer loads."""
    from transformers import AutoTokenizer

    from fedmoe.moe.model import ModelLoadError, builtin_model_path, load_tokenizer

    folder = tmp_path / arch
    tiny_config(arch).save_pretrained(folder)
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(str(folder))
    msg = str(e.value)
    assert msg.startswith(f"no usable tokenizer in {str(folder)!r}") and "model.tokenizer" in msg
    assert "sentencepiece" not in msg
    AutoTokenizer.from_pretrained(builtin_model_path("builtin:tiny-moe")).save_pretrained(folder)
    assert load_tokenizer(str(folder))("hello")["input_ids"]
