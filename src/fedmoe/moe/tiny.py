"""Tiny configs of every supported architecture, for tests and quick benchmarks (random init)."""

from __future__ import annotations


def tiny_config(arch: str, vocab_size: int = 128, num_experts: int = 8, top_k: int = 2,
                hidden_size: int = 32, intermediate_size: int = 16, num_layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=intermediate_size, num_experts=num_experts,
                              num_experts_per_tok=top_k, norm_topk_prob=False)
    if arch == "flex_olmo":  # FlexOlmo: OLMoE's block, OLMo-2's attention (q/k norms over the whole width)
        return tf.FlexOlmoConfig(**common, intermediate_size=intermediate_size, num_experts=num_experts,
                                 num_experts_per_tok=top_k, norm_topk_prob=False)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=2 * intermediate_size,
                                 moe_intermediate_size=intermediate_size,
                                 shared_expert_intermediate_size=2 * intermediate_size,
                                 num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=2 * intermediate_size, head_dim=8,
                                 moe_intermediate_size=intermediate_size, num_experts=num_experts,
                                 num_experts_per_tok=top_k, norm_topk_prob=True,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if arch in ("qwen3_next", "qwen3_5_moe_text"):  # hybrid: a linear-attention layer, then a softmax one
        hybrid = dict(common, intermediate_size=2 * intermediate_size, head_dim=8, moe_intermediate_size=intermediate_size,
                      shared_expert_intermediate_size=2 * intermediate_size, num_experts=num_experts,
                      num_experts_per_tok=top_k, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                      layer_types=["linear_attention", "full_attention"] * (num_layers // 2)
                      + ["linear_attention"] * (num_layers % 2))
        if arch == "qwen3_next":
            return tf.Qwen3NextConfig(**hybrid, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return tf.Qwen3_5MoeTextConfig(**hybrid)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=intermediate_size,
                                num_local_experts=num_experts, num_experts_per_tok=top_k)
    if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "ernie4_5_moe"):
        common["num_hidden_layers"] = num_layers + 1  # the first layer is dense, like the real model
    if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite"):
        common["num_key_value_heads"] = common["num_attention_heads"]  # MLA: one kv head per head
    if arch == "deepseek_v2":  # DeepSeek-V2-Lite's routing: greedy softmax top-k, no renormalisation
        return tf.DeepseekV2Config(**common, intermediate_size=2 * intermediate_size,
                                   moe_intermediate_size=intermediate_size, n_routed_experts=num_experts,
                                   num_experts_per_tok=top_k, n_shared_experts=2, topk_method="greedy",
                                   first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                   qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                                   routed_scaling_factor=1.0)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**common, intermediate_size=2 * intermediate_size,
                                   moe_intermediate_size=intermediate_size, n_routed_experts=num_experts,
                                   num_experts_per_tok=top_k, n_shared_experts=1, n_group=2, topk_group=2,
                                   first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                   qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                                   norm_topk_prob=True, routed_scaling_factor=1.0)
    if arch == "glm4_moe":  # GLM-4.5's layout: biased q/k/v, per-head q/k norms, sigmoid routing in groups
        return tf.Glm4MoeConfig(**common, intermediate_size=2 * intermediate_size,
                                moe_intermediate_size=intermediate_size, n_routed_experts=num_experts,
                                num_experts_per_tok=top_k, n_shared_experts=1, n_group=2, topk_group=2,
                                first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, head_dim=16,
                                norm_topk_prob=True, routed_scaling_factor=1.0)
    if arch == "glm4_moe_lite":  # GLM-4.7-Flash: DeepSeek-V3's latent attention with a low-rank query, GLM's MoE
        return tf.Glm4MoeLiteConfig(**common, intermediate_size=2 * intermediate_size,
                                    moe_intermediate_size=intermediate_size, n_routed_experts=num_experts,
                                    num_experts_per_tok=top_k, n_shared_experts=1, q_lora_rank=12, kv_lora_rank=16,
                                    qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, norm_topk_prob=True,
                                    routed_scaling_factor=1.8)
    if arch == "ernie4_5_moe":  # ERNIE-4.5: softmax routing with a selection bias, shared experts, layer 0 dense
        return tf.Ernie4_5_MoeConfig(**common, intermediate_size=2 * intermediate_size,
                                     moe_intermediate_size=intermediate_size, moe_num_experts=num_experts,
                                     moe_k=top_k, moe_num_shared_experts=2, moe_layer_start_index=1)
    if arch == "gpt_oss":  # gpt-oss: transposed, interleaved, biased experts with a clamped SwiGLU; a biased
        # router; attention with q/k/v/o biases and sinks, a sliding window (4 here) every other layer; YaRN RoPE
        # as the real model's (its factor 32 over an original context of max_position_embeddings / 32)
        rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": common["max_position_embeddings"] // 32}
        return tf.GptOssConfig(**common, head_dim=hidden_size // common["num_attention_heads"],
                               intermediate_size=intermediate_size, num_local_experts=num_experts,
                               num_experts_per_tok=top_k, sliding_window=4, rope_parameters=rope)
    if arch == "granitemoe":  # Granite-MoE: Mixtral's layout with scalar multipliers (as granite-3.1-1b-a400m's: the
        # embeddings times 12, each residual branch times 0.22, attention scores times 1/head_dim, logits / 6) and
        # tied embeddings
        return tf.GraniteMoeConfig(**dict(common, tie_word_embeddings=True), intermediate_size=intermediate_size,
                                   num_local_experts=num_experts, num_experts_per_tok=top_k, embedding_multiplier=12.0,
                                   residual_multiplier=0.22,
                                   attention_multiplier=common["num_attention_heads"] / hidden_size, logits_scaling=6.0)
    if arch == "lfm2_moe":  # LFM2-MoE: a dense first layer, then MoE blocks; gated short convolutions and attention
        # (conv, conv, attention: LFM2-8B-A1B's first three layers); sigmoid routing with a load-balancing bias; tied
        # embeddings
        layers = num_layers + 1
        types = ["conv"] + ["conv", "full_attention"] * (num_layers // 2) + ["conv"] * (num_layers % 2)
        return tf.Lfm2MoeConfig(**dict(common, num_hidden_layers=layers, tie_word_embeddings=True),
                                intermediate_size=2 * intermediate_size, moe_intermediate_size=intermediate_size,
                                num_experts=num_experts, num_experts_per_tok=top_k, num_dense_layers=1,
                                layer_types=types, conv_L_cache=3, use_expert_bias=True, norm_topk_prob=True)
    if arch == "phimoe":  # Phi-3.5-MoE: Mixtral's layout with q/k/v/o biases, LayerNorms, a biased LM head and the
        # sparsemixer router (two experts whatever top_k: a phimoe config routes to 2). Training-time jitter on:
        # the block's input times U(0.99, 1.01), and a router_jitter_noise wide enough (0.2: logits within 40% of the
        # largest are candidates) that a tiny random router's tokens often have several candidates, so that the masked
        # softmax weights are not all 1 and training draws among them
        return tf.PhimoeConfig(**common, intermediate_size=intermediate_size, num_local_experts=num_experts,
                               num_experts_per_tok=top_k, attention_bias=True, lm_head_bias=True,
                               input_jitter_noise=0.01, router_jitter_noise=0.2)
    if arch == "llama4_text":  # Llama-4 (its language model): as Maverick, a dense layer (intermediate_size_mlp wide)
        # before each MoE one (interleave_moe_layer_step 2: twice num_layers decoder layers); a shared expert beside
        # the routed ones; the sigmoid top-k router scaling the experts' input; RoPE layers with chunked attention
        # (chunks of 4 tokens) and L2 q/k norms, every fourth layer NoPE with attention temperature tuning acting
        # from position 2 (floor_scale 2, where the real models' 8192 would leave a short sequence alone)
        return tf.Llama4TextConfig(**dict(common, num_hidden_layers=2 * num_layers), head_dim=8,
                                   intermediate_size=intermediate_size, intermediate_size_mlp=3 * intermediate_size,
                                   num_local_experts=num_experts, num_experts_per_tok=top_k, interleave_moe_layer_step=2,
                                   attention_chunk_size=4, use_qk_norm=True, attn_temperature_tuning=True,
                                   floor_scale=2, attn_scale=0.1)
    raise ValueError(f"no tiny config for '{arch}'")
