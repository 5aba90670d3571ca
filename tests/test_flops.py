"""Analytic FLOPs / parameter accounting (fedmoe.eval.flops) against torch's FlopCounterMode, meta-device
models, and the trainables of MoEModel's adapters; the `fedmoe flops` CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from fedmoe.eval.flops import FLOP_PARTS, count_flops, default_k_list, load_model_config
from fedmoe.moe import SUPPORTED_ARCHITECTURES, ExpertsWithLoRA, MoEModel, UnsupportedModelError
from fedmoe.moe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls

ARCHS = list(SUPPORTED_ARCHITECTURES)
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs"  # ../shared beside the repo
OLMOE = CONFIGS / "allenai--OLMoE-1B-7B-0924.json"
QWEN15 = CONFIGS / "Qwen--Qwen1.5-MoE-A2.7B.json"
DEEPSEEK_V1 = CONFIGS / "deepseek-ai--deepseek-moe-16b-base.json"
RANK = 4
needs_configs = pytest.mark.skipif(not OLMOE.is_file(), reason="shared model configs not available")


def _adapted(arch, attn_implementation="eager", layout="fused", router=False):
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    mm = MoEModel(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation))
    mm.add_expert_lora(RANK, 8.0, layout=layout)
    mm.add_attention_lora(RANK, 8.0)
    if router:
        mm.add_router_lora(RANK, 8.0)
    return cfg, mm


def _attention(name: str) -> bool:
    """A parameter of a token mixer: attention, or a hybrid model's linear attention or short convolution."""
    from fedmoe.moe.arch import TOKEN_MIXERS

    return any(f".{mixer}." in name for mixer in TOKEN_MIXERS)


def _meta_params(cfg) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ FLOPs vs FlopCounterMode
@pytest.mark.parametrize("arch,layout,router",
                         [(a, "fused", False) for a in ARCHS] + [(a, "split", True) for a in ARCHS])
def test_forward_flops_match_flop_counter(arch, layout, router):
    """Eager attention: QKᵀ and A·V are bmm's over the full T×T square, which is what we count. Expert
    LoRA runs on routed tokens only, so the measured count falls with k like the analytic one; router
    LoRA is merged into the router weight once per forward (B·A)."""
    T = 24
    cfg, mm = _adapted(arch, layout=layout, router=router)
    # FlopCounterMode has no formula for grouped_mm, so count on the per-expert path (plain matmuls);
    # the two paths are numerically equal (tests/test_moe.py::test_grouped_and_per_expert_paths_agree)
    for layer in mm.layers:
        mm.experts_module(layer.index).grouped = False
    ids = torch.randint(2, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    measured = {}
    for k in (2, 1):
        mm.set_top_k(k)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mm.model(input_ids=ids)
        measured[k] = counter.get_total_flops()
        analytic = count_flops(cfg, T, k=k, lora_rank=RANK, expert_lora_layout=layout, router_lora=router)
        assert measured[k] == pytest.approx(analytic["flops_per_seq"], rel=0.01), (k, analytic["flops_by_part"])
        assert analytic["flops_by_part"]["lora"] > 0 and analytic["flops_by_part"]["attention_scores"] > 0
    assert measured[1] < measured[2]


# ------------------------------------------------------------------------ parameters vs meta models
@pytest.mark.parametrize("arch", ARCHS)
def test_total_params_match_meta_model_tiny(arch):
    cfg = tiny_config(arch)
    assert count_flops(cfg, 8)["total_params"] == _meta_params(cfg)


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe_text"])
def test_linear_attention_flops_and_parameters_exactly(arch):
    """One linear-attention layer against FlopCounterMode, exactly (the whole-model test's 1% tolerance would
    let its convolution go uncounted), at lengths within one chunk, on a chunk's edge and over three chunks,
    for head shapes where keys and values differ; and its parameters."""
    from fedmoe.eval.flops import _shape

    for nkh, nvh, dk, dv, K in ((2, 4, 8, 8, 4), (1, 4, 8, 16, 3)):
        cfg = tiny_config(arch)
        cfg.linear_num_key_heads, cfg.linear_num_value_heads = nkh, nvh
        cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim = dk, dv, K
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        mixer = next(layer.linear_attn for layer in model.model.layers if hasattr(layer, "linear_attn"))
        linear = _shape(cfg).linear
        assert sum(p.numel() for p in mixer.parameters()) == sum(lin.params for lin in linear.proj) + linear.other_params
        for T in (1, 5, 64, 65, 130):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                mixer(torch.randn(1, T, cfg.hidden_size))
            proj = 2 * T * sum(lin.fan_in * lin.fan_out for lin in linear.proj)
            assert counter.get_total_flops() == proj + linear.mixer_flops(T), (nkh, nvh, dk, dv, K, T)


@needs_configs
@pytest.mark.parametrize("path", [OLMOE, QWEN15], ids=["olmoe-1b-7b", "qwen1.5-moe-a2.7b"])
def test_total_params_match_meta_model_real(path):
    cfg = load_model_config(str(path))
    r = count_flops(cfg, 128)
    assert r["total_params"] == _meta_params(cfg)
    # active: everything but the routed experts, plus k of them per MoE layer
    assert r["active_params"] < r["total_params"]


@needs_configs
def test_published_sizes_and_deepseek_v1():
    olmoe = count_flops(load_model_config(str(OLMOE)), 128)
    assert round(olmoe["total_params"] / 1e9, 1) == 6.9 and round(olmoe["active_params"] / 1e9, 1) == 1.3
    qwen = count_flops(load_model_config(str(QWEN15)), 128)
    assert round(qwen["total_params"] / 1e9, 1) == 14.3 and round(qwen["active_params"] / 1e9, 1) == 2.7
    # DeepSeekMoE v1 (model_type "deepseek", not in transformers): MHA + shared experts + first dense layer
    ds_cfg = load_model_config(str(DEEPSEEK_V1))
    assert ds_cfg.model_type == "deepseek"
    ds = count_flops(ds_cfg, 128)
    assert round(ds["total_params"] / 1e9, 1) == 16.4 and round(ds["active_params"] / 1e9, 1) == 2.8
    assert ds["flops_by_part"]["shared_experts"] > 0 and ds["flops_by_part"]["dense_mlp"] > 0
    assert default_k_list(ds_cfg) == [6, 3, 1]




def test_published_sizes_of_glm_qwen3_next_qwen35_ernie_and_flexolmo():
    """GLM-4.5-Air (106B total, 12B active: zai-org's model card) is transformers' default Glm4MoeConfig with
    q/k/v biases and 128-wide heads (its config.json; Megatron's `--add-qkv-bias --kv-channels 128` for
    glm4.5-106B-A12B in THUDM/slime). The published active count leaves out the embeddings and LM head.
    FlexOlmo-7x7B-1T (transformers' default FlexOlmoConfig): 7 OLMo-2-7B feed-forwards per layer, 33.3B."""
    import transformers as tf

    glm = tf.Glm4MoeConfig(attention_bias=True, head_dim=128)
    r = count_flops(glm, 128)
    assert r["total_params"] == _meta_params(glm)
    embeddings = 2 * glm.vocab_size * glm.hidden_size  # untied
    assert int(r["total_params"] / 1e9) == 106 and round((r["active_params"] - embeddings) / 1e9) == 12
    assert r["flops_by_part"]["shared_experts"] > 0 and r["flops_by_part"]["dense_mlp"] > 0  # layer 0 is dense
    # GLM-4.7-Flash ("30B-A3B"; transformers' default Glm4MoeLiteConfig): latent attention, layer 0 dense
    flash = tf.Glm4MoeLiteConfig()
    r = count_flops(flash, 128)
    assert r["total_params"] == _meta_params(flash)
    embeddings = 2 * flash.vocab_size * flash.hidden_size
    assert round(r["total_params"] / 1e9) == 30 and round((r["active_params"] - embeddings) / 1e9) == 3
    assert r["flops_by_part"]["dense_mlp"] > 0
    # Qwen3-Next-80B-A3B and Qwen3.5-35B-A3B (transformers' defaults; the 35B counts a vision tower of ~0.4B
    # that the causal LM leaves out): three linear-attention layers to one softmax one
    for config, total in ((tf.Qwen3NextConfig(), 80), (tf.Qwen3_5MoeTextConfig(), 35)):
        r = count_flops(config, 128)
        assert r["total_params"] == _meta_params(config)
        assert round(r["total_params"] / 1e9) == total and 3e9 <= r["active_params"] < 4e9
    # ERNIE-4.5-21B-A3B (transformers' default Ernie4_5_MoeConfig; tied embeddings): 21B total, 3B active; and
    # with use_bias, whose biases sit on attention, shared experts and dense MLPs, not on the experts
    ernie = tf.Ernie4_5_MoeConfig()
    r = count_flops(ernie, 128)
    assert r["total_params"] == _meta_params(ernie) and int(r["total_params"] / 1e9) == 21
    assert round(r["active_params"] / 1e9) == 3
    biased = tiny_config("ernie4_5_moe")
    biased.use_bias = True
    assert count_flops(biased, 8)["total_params"] == _meta_params(biased)
    flex = tf.FlexOlmoConfig()
    r = count_flops(flex, 128)
    assert r["total_params"] == _meta_params(flex) and round(r["total_params"] / 1e9, 1) == 33.3


def test_published_sizes_of_gpt_oss():
    """gpt-oss-120b and gpt-oss-20b against OpenAI's model card ("gpt-oss-120b & gpt-oss-20b Model Card", 2025,
    Table 1: 116.83B total and 5.13B active parameters for the 120b, 20.91B and 3.61B for the 20b; 36 and 24
    layers, 128 and 32 experts, 4 active). transformers' default GptOssConfig is the 120b's config.json (hidden
    2880, intermediate 2880, 64 query and 8 key/value heads of 64, vocabulary 201088, sliding window 128); the
    20b's config.json differs in num_hidden_layers (24) and num_local_experts (32). The card's active count
    leaves out the embedding table (not the unembedding): it is the count here less vocab x hidden. Every
    parameter counted (attention biases and sinks, the router's bias, each expert's biases) equals the meta
    model's."""
    import transformers as tf

    for config, total, active in ((tf.GptOssConfig(), 116.83, 5.13),
                                  (tf.GptOssConfig(num_hidden_layers=24, num_local_experts=32), 20.91, 3.61)):
        r = count_flops(config, 128)
        assert r["total_params"] == _meta_params(config)
        assert round(r["total_params"] / 1e9, 2) == total
        assert round((r["active_params"] - config.vocab_size * config.hidden_size) / 1e9, 2) == active
        assert r["flops_by_part"]["shared_experts"] == r["flops_by_part"]["dense_mlp"] == 0
    # the card's parts of the 20b: MLP 19.12B (experts and routers), attention 0.64B, embedding and unembedding
    # 1.16B
    config = tf.GptOssConfig(num_hidden_layers=24, num_local_experts=32)
    H, I, E, L = 2880, 2880, 32, 24
    experts = L * E * (3 * H * I + 2 * I + H)
    assert round((experts + L * (E * H + E)) / 1e9, 2) == 19.12
    attention = L * (H * 64 * 64 + 64 * 64 + 2 * (H * 8 * 64 + 8 * 64) + 64 * 64 * H + H + 64)
    assert round(attention / 1e9, 2) == 0.64
    r = count_flops(config, 128)
    assert r["total_params"] == experts + L * (E * H + E) + attention + 2 * 201088 * H + (2 * L + 1) * H


def granite_moe_configs():
    """granite-3.1-1b-a400m and granite-3.1-3b-a800m (the 3.0 models have the same shapes). The 1b: its config.json
    (hidden 1024, 24 layers, 16 query and 8 key/value heads, 32 experts of intermediate 512, top-8, vocabulary 49155,
    tied embeddings, multipliers 12 / 0.22 / 1/64 and logits / 6; as copied in GitHub leok7v/nano-lamma,
    models/granite-3.1-1b-a400m-instruct). The 3b: the model card's architecture table (embedding size 1536, 32
    layers, 24 heads of 64, 8 key/value heads, MLP hidden size 512, 40 experts, top-8) with the 1b's vocabulary and
    tied embeddings."""
    import transformers as tf

    one = tf.GraniteMoeConfig(vocab_size=49155, hidden_size=1024, intermediate_size=512, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
                              tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                              attention_multiplier=0.015625, logits_scaling=6.0, max_position_embeddings=131072)
    three = tf.GraniteMoeConfig(vocab_size=49155, hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
                                num_attention_heads=24, num_key_value_heads=8, num_local_experts=40,
                                num_experts_per_tok=8, tie_word_embeddings=True, max_position_embeddings=131072)
    return one, three


def lfm2_8b_a1b_config():
    """LFM2-8B-A1B: transformers' Lfm2MoeConfig defaults (its docstring's checkpoint: hidden 2048, dense intermediate
    7168, 32 experts of 1792, top-4, 32 query and 8 key/value heads, vocabulary 65536, conv_L_cache 3, two dense
    layers, tied embeddings) with the checkpoint's 24 layers, attention at layers 2, 6, 10, 14, 18 and 21 and short
    convolutions in the other 18 (LiquidAI's model card: 18 convolution and 6 attention blocks)."""
    import transformers as tf

    attention = (2, 6, 10, 14, 18, 21)
    return tf.Lfm2MoeConfig(num_hidden_layers=24,
                            layer_types=["full_attention" if i in attention else "conv" for i in range(24)])


def test_published_sizes_of_granite_moe_and_lfm2_moe():
    """Granite-3.1 MoE against IBM's model card (ibm-granite/granite-3.1-1b-a400m-instruct, "Model Architecture":
    1.3B parameters with 400M active, 3.3B with 800M active): the card's active counts leave out the (tied)
    embedding table, 0.38B and 0.81B; with it they would be 0.43B and 0.88B. LFM2-8B-A1B against LiquidAI's model
    card and transformers' model page (8.3B total, 1.5B active): 8.34B, 1.56B active with the embedding table (1.42B
    without it; the card's 1.5B is 1.56B cut, not rounded). Every count equals the meta model's; the FLOPs of the
    convolutions, the routers and the dense layers are counted (LFM2) and the multipliers are not (Granite)."""
    for config, total, active in ((granite_moe_configs()[0], 1.3, 0.4), (granite_moe_configs()[1], 3.3, 0.8)):
        r = count_flops(config, 128)
        assert r["total_params"] == _meta_params(config)
        assert round(r["total_params"] / 1e9, 1) == total
        assert round((r["active_params"] - config.vocab_size * config.hidden_size) / 1e9, 1) == active
        assert r["flops_by_part"]["shared_experts"] == r["flops_by_part"]["dense_mlp"] == 0
    config = lfm2_8b_a1b_config()
    r = count_flops(config, 128)
    assert r["total_params"] == _meta_params(config) and round(r["total_params"] / 1e9, 2) == 8.34
    assert round(r["active_params"] / 1e9, 2) == 1.56
    assert round((r["active_params"] - config.vocab_size * config.hidden_size) / 1e9, 2) == 1.42
    H, I, E, L, V = 2048, 1792, 32, 24, 65536
    experts = 22 * E * 3 * H * I
    attention = 6 * (H * H + 2 * H * 512 + H * H + 2 * 64)  # q, k, v, out_proj, the per-head q/k norms
    conv = 18 * (H * 3 * H + H * H + 3 * H)  # in_proj, out_proj, the depthwise kernel
    assert r["total_params"] == experts + 22 * E * H + attention + conv + 2 * 3 * H * 7168 + V * H + (2 * L + 1) * H
    parts = r["flops_by_part"]
    assert parts["dense_mlp"] == 2 * 128 * 2 * 3 * H * 7168 and parts["router"] == 2 * 128 * 22 * E * H
    assert parts["attention_scores"] == 2 * 128 * 128 * 2 * H * 6 + 18 * 2 * H * 3 * (128 + 2)


def phi_3_5_moe_config():
    """Phi-3.5-MoE: Microsoft's model card (microsoft/Phi-3.5-MoE-instruct: 16 experts, 2 active, vocabulary 32064)
    and transformers' PhimoeConfig defaults (its docstring's checkpoint: hidden 4096, 32 layers, intermediate 6400, 32
    query and 8 key/value heads), with q/k/v/o and LM-head biases (vLLM's phimoe.py builds qkv_proj, o_proj and
    lm_head with bias=True for it)."""
    import transformers as tf

    return tf.PhimoeConfig(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
                           attention_bias=True, lm_head_bias=True, max_position_embeddings=131072)


def test_published_size_of_phi_3_5_moe():
    """The card's 41.9B total and 6.6B active parameters (with the embedding table and the LM head: 6.38B without):
    41.87B and 6.64B, equal to the meta model; by hand, the LayerNorms' biases (two per layer and the final norm)
    and the attention and LM-head biases counted."""
    config = phi_3_5_moe_config()
    r = count_flops(config, 128)
    assert r["total_params"] == _meta_params(config) == 41_873_153_344 and round(r["total_params"] / 1e9, 1) == 41.9
    assert r["active_params"] == 6_640_999_744 and round(r["active_params"] / 1e9, 1) == 6.6
    H, I, E, L, V = 4096, 6400, 16, 32, 32064
    attention = 2 * (H * H + H) + 2 * (H * 1024 + 1024)  # q and o, k and v, with biases
    per_layer = E * 3 * H * I + E * H + attention + 2 * 2 * H  # experts, router, attention, two LayerNorms
    assert r["total_params"] == L * per_layer + 2 * V * H + V + 2 * H
    assert r["flops_by_part"]["router"] == 2 * 128 * L * E * H and r["flops_by_part"]["experts"] == 2 * 128 * 2 * 3 * H * I * L


# ------------------------------------------------------------------------ trainables vs MoEModel
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trainable_counts_match_moemodel(arch):
    cfg, mm = _adapted(arch)
    params = mm.trainable_parameters()
    expert = sum(p.numel() for n, p in params.items() if ".experts." in n)
    attention = sum(p.numel() for n, p in params.items() if _attention(n))
    assert expert + attention == sum(p.numel() for p in params.values())
    E = mm.num_experts
    for k in (2, 1):
        r = count_flops(cfg, 8, k=k, lora_rank=RANK)
        assert r["total_trainable"] == expert + attention
        assert r["active_trainable"] * E == attention * E + expert * k
    # only expert LoRA / only attention LoRA
    assert count_flops(cfg, 8, lora_rank=RANK, attention_lora_targets=[])["total_trainable"] == expert
    assert count_flops(cfg, 8, lora_rank=RANK, expert_lora=False)["total_trainable"] == attention
    assert all(isinstance(layer.block.experts, ExpertsWithLoRA) for layer in mm.layers)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_counted_trainables_equal_the_built_model(arch, layout):
    """P̂ and P̂_a from the config alone equal the trainable parameters MoEModel actually creates
    (sum of numel), for both expert layouts, with and without router LoRA: the formula cannot drift
    from the code."""
    for router in (False, True):
        cfg, mm = _adapted(arch, layout=layout, router=router)
        params = mm.trainable_parameters()
        expert = sum(p.numel() for n, p in params.items() if ".experts." in n)
        shared = sum(p.numel() for n, p in params.items() if ".experts." not in n)  # attention + router
        assert (shared > sum(p.numel() for n, p in params.items() if _attention(n))) == router
        E = mm.num_experts
        for k in (2, 1):
            r = count_flops(cfg, 8, k=k, lora_rank=RANK, expert_lora_layout=layout, router_lora=router)
            assert r["total_trainable"] == expert + shared == sum(p.numel() for p in params.values())
            assert r["active_trainable"] * E == shared * E + expert * k
    # the split layout has r·(H + I) more per expert than the fused one (a second A on H)
    H = cfg.hidden_size
    fused, split = (count_flops(cfg, 8, lora_rank=RANK, expert_lora_layout=lay)["total_trainable"]
                    for lay in ("fused", "split"))
    assert split - fused == len(mm.layers) * mm.num_experts * RANK * H


@needs_configs
def test_flame_table1_trainable_counts():
    """FLAME Table 1 (OLMoE-1B-7B, r = 20): P̂ = 198M; P̂_a = 30M at k = 8, 9M at k = 1. Reproduced
    within 3% by the split expert layout with q, k, v, o and router LoRA (PEFT's "all-linear" on the
    pre-v5 checkpoint): P̂ = 194,662,400 (188,743,680 experts + 5,242,880 attention + 675,840 router),
    P̂_a = 29,511,680 (k = 8), 17,715,200 (4), 11,816,960 (2), 8,867,840 (1).
    Without the router: 193,986,560 / 28,835,840 (k = 8) / 8,192,000 (k = 1): 9% under at k = 1.
    The fused layout: 152,719,360 / 24,268,800 / 8,212,480 with the router, 152,043,520 /
    23,592,960 / 7,536,640 without (P̂ 23% under the paper)."""
    cmd = [sys.executable, "-m", "fedmoe.cli", "flops", str(OLMOE), "--k", "8", "4", "2", "1", "--lora-rank", "20",
           "--expert-layout", "split", "--attention-targets", "q_proj,k_proj,v_proj,o_proj", "--router-lora", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {row["k"]: row for row in json.loads(r.stdout)}
    assert rows[8]["total_trainable"] == pytest.approx(198e6, rel=0.03)
    for k, paper in ((8, 30e6), (4, 18e6), (2, 12e6), (1, 9e6)):
        assert rows[k]["active_trainable"] == pytest.approx(paper, rel=0.03), k
    assert rows[8]["total_trainable"] == 194_662_400 and rows[1]["active_trainable"] == 8_867_840
    cfg = load_model_config(str(OLMOE))

    def count(layout, router, k):
        return count_flops(cfg, 128, k=k, lora_rank=20, expert_lora_layout=layout, router_lora=router)

    assert all(count("split", True, k)["active_trainable"] == row["active_trainable"] for k, row in rows.items())
    assert count("split", False, 8)["total_trainable"] == 193_986_560
    assert count("split", False, 1)["active_trainable"] == 8_192_000
    assert [count("fused", True, k)["active_trainable"] for k in (8, 1)] == [24_268_800, 8_212_480]
    assert count("fused", True, 8)["total_trainable"] == 152_719_360
    assert [count("fused", False, k)["active_trainable"] for k in (8, 1)] == [23_592_960, 7_536_640]
    assert count("fused", False, 8)["total_trainable"] == 152_043_520
    # the rank baselines' column at k = 8 in the same layout: r = 12, 8, 6 -> 118M, 78M, 58M (within 3%)
    for rank, paper in ((12, 118e6), (8, 78e6), (6, 58e6)):
        got = count_flops(cfg, 128, lora_rank=rank, expert_lora_layout="split", router_lora=True)["total_trainable"]
        assert got == pytest.approx(paper, rel=0.03), rank


def test_options_and_errors():
    cfg = tiny_config("olmoe")
    base = count_flops(cfg, 16, k=2)
    assert base["flops_by_part"]["lora"] == 0 and base["total_trainable"] == 0
    assert set(base) == {"k", "seq_len", "flops_per_seq", "flops_by_part", "active_params", "total_params",
                         "active_trainable", "total_trainable"}
    assert tuple(base["flops_by_part"]) == FLOP_PARTS
    assert base["flops_per_seq"] == sum(base["flops_by_part"].values())
    # LoRA FLOPs: 2·T·r·(in+out) per adapted linear; experts × k routed assignments
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    only_q = count_flops(cfg, 16, k=2, lora_rank=3, expert_lora=False, attention_lora_targets=["q_proj"])
    assert only_q["flops_by_part"]["lora"] == 2 * 16 * 3 * (H + H) * L
    experts_only = count_flops(cfg, 16, k=2, lora_rank=0, expert_lora_rank=3, attention_lora_targets=[])
    assert experts_only["flops_by_part"]["lora"] == 2 * 16 * 2 * 3 * ((H + 2 * I) + (I + H)) * L
    with pytest.raises(UnsupportedModelError, match="not projections"):
        count_flops(cfg, 16, lora_rank=2, attention_lora_targets=["kv_b_proj"])
    with pytest.raises(ValueError, match="out of range"):
        count_flops(cfg, 16, k=0)
    with pytest.raises(ValueError, match=rf"k = {cfg.num_experts_per_tok + 1} is out of range: .* give k in "
                                         rf"1\.\.{cfg.num_experts_per_tok}$"):  # above the model's top-k
        count_flops(cfg, 16, k=cfg.num_experts_per_tok + 1)
    with pytest.raises(ValueError, match="layout"):
        count_flops(cfg, 16, lora_rank=2, expert_lora_layout="stacked")
    # split: gate and up adapters (H -> I each) in place of one gate_up adapter (H -> 2I); router LoRA
    # costs B·A once (2·E·r·H per MoE layer) and r·(H + E) parameters per MoE layer
    E = cfg.num_experts
    split = count_flops(cfg, 16, k=2, lora_rank=0, expert_lora_rank=3, attention_lora_targets=[],
                        expert_lora_layout="split")
    assert split["flops_by_part"]["lora"] == 2 * 16 * 2 * 3 * (2 * (H + I) + (I + H)) * L
    router = count_flops(cfg, 16, k=2, lora_rank=3, expert_lora=False, attention_lora_targets=[], router_lora=True)
    assert router["flops_by_part"]["lora"] == 2 * E * 3 * H * L
    assert router["total_trainable"] == router["active_trainable"] == 3 * (H + E) * L
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="not supported"):
        count_flops(LlamaConfig(), 16)


def test_load_model_config_sources(tmp_path):
    assert load_model_config("builtin:tiny-olmoe").model_type == "olmoe"
    cfg = tiny_config("mixtral")
    cfg.save_pretrained(tmp_path)
    for src in (tmp_path, tmp_path / "config.json"):
        assert count_flops(load_model_config(str(src)), 8) == count_flops(cfg, 8)
    with pytest.raises(FileNotFoundError, match="hub id"):
        load_model_config(str(tmp_path / "missing"))
    (tmp_path / "x.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(UnsupportedModelError, match="unknown to transformers"):
        load_model_config(str(tmp_path / "x.json"))


# ------------------------------------------------------------------------ CLI
@needs_configs
def test_cli_json_schema(tmp_path):
    cmd = [sys.executable, "-m", "fedmoe.cli", "flops", str(OLMOE), "--seq-len", "128", "--k", "8", "4", "2", "1",
           "--lora-rank", "20", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["k"] for row in rows] == [8, 4, 2, 1]
    for row in rows:
        assert set(row) == {"k", "flops_per_seq", "flops_by_part", "active_params", "total_params",
                            "active_trainable", "total_trainable"}
        assert set(row["flops_by_part"]) == set(FLOP_PARTS)
        assert row["flops_per_seq"] == sum(row["flops_by_part"].values())
        assert all(isinstance(v, int) for v in row["flops_by_part"].values())
    flops = [row["flops_per_seq"] for row in rows]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
    assert len({row["total_params"] for row in rows}) == 1 and len({row["total_trainable"] for row in rows}) == 1
    active = [row["active_params"] for row in rows]
    assert active == sorted(active, reverse=True)
    # the library gives the same numbers
    cfg = load_model_config(str(OLMOE))
    assert rows[0]["flops_per_seq"] == count_flops(cfg, 128, k=8, lora_rank=20)["flops_per_seq"]


def test_fedmoe_flops_refuses_k_above_the_models_top_k():
    """OLMoE routes each token to 8 of its 64 experts: --k 9 is refused naming its k (exit 2), as a client's k is."""
    from typer.testing import CliRunner

    from fedmoe.cli import app

    out = CliRunner().invoke(app, ["flops", str(OLMOE), "--k", "9"])
    assert out.exit_code == 2 and out.output.startswith("error: k = 9 is out of range"), out.output
    assert "routes each token to 8 of its 64 experts (its top-k), so give k in 1..8" in out.output
    assert CliRunner().invoke(app, ["flops", str(OLMOE), "--k", "8"]).exit_code == 0
