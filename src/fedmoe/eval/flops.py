"""Analytic forward FLOPs and parameter counts of a sparse-MoE causal LM (FLAME Table 1 columns).

Everything is computed from the model config alone: no weights, no model instance.

Conventions (as FLAME, Table 1, counts them; docs/methods.md):

* **FLOPs** = 2 × multiply–accumulates of every matrix product of one forward pass over one
  sequence of T tokens (batch 1, no KV cache): attention projections, attention scores, router,
  routed experts (× k tokens-per-expert assignments per token), shared experts, dense MLPs, LoRA,
  LM head. Element-wise work (norms, activations, softmax, RoPE, residual adds, LoRA scaling) is
  not counted, nor is the embedding lookup (a gather, not a product).
* **Attention scores** count the *full* T×T square for QKᵀ and for A·V
  (2·T²·(heads·qk_head_dim) + 2·T²·(heads·v_head_dim) per layer), although the mask is causal:
  eager attention and the SDPA math/flash kernels compute the whole square (the causal half is
  masked, not skipped), and ``torch.utils.flop_counter`` counts it that way too. A causal-aware
  kernel would do about half of this part. Sliding windows are ignored for the same reason.
* **LoRA** on a linear (in → out) of rank r costs 2·T·r·(in + out) (the A then the B product). The
  expert LoRA runs only on the tokens routed to that expert (``ExpertsWithLoRA``), so it costs
  k·T·2·r·(in + out) per MoE layer. Router LoRA (``RouterWithLoRA``) is merged into the router
  weight once per forward: B·A, 2·E·r·H per MoE layer whatever T (the router product itself is
  counted under "router"). ``lora_alpha`` changes no count (the scaling is element-wise).
* **Parameters**: total P = every weight of the model (embeddings, untied LM head, norms, biases,
  router, all experts, shared experts, dense MLPs; buffers such as DeepSeek-V3's
  ``e_score_correction_bias`` are not parameters). Active P_a (FLAME style) = every non-routed-expert
  parameter, embeddings and LM head included, plus the k routed experts of each MoE layer.
  Trainable P̂ = the LoRA parameters: attention LoRA on every decoder layer, router LoRA (A (r, H),
  B (E, r)) on every MoE layer if asked for, plus expert LoRA on every routed expert, per expert
  r·(H + 2I) + r·(I + H) in the ``fused`` layout (``gate_up_proj`` A (r, H), B (2I, r); ``down_proj``
  A (r, I), B (H, r)) and 3·r·(H + I) in the ``split`` layout (gate, up: A (r, H), B (I, r); down:
  A (r, I), B (H, r)). Active trainable P̂_a = every non-expert trainable (attention and router
  LoRA) + the expert LoRA of k experts per MoE layer, i.e. k/E of the expert LoRA. FLAME's Table 1
  (OLMoE, r = 20: P̂ 198M, P̂_a 30M at k = 8 and 9M at k = 1) matches the split layout with q, k,
  v, o and router LoRA (PEFT's "all-linear" on the pre-v5 checkpoint): 194.7M, 29.5M, 8.87M.

Architectures: olmoe, flex_olmo, qwen2_moe, qwen3_moe, mixtral, deepseek_v2 and deepseek_v3 (multi-head latent
attention, shared experts, ``first_k_dense_replace`` dense layers), glm4_moe (DeepSeek-V3's MoE with grouped-query
attention), glm4_moe_lite (GLM's MoE with DeepSeek-V3's latent attention; dense layers by ``mlp_layer_types``),
ernie4_5_moe (shared experts; MoE layers from ``moe_layer_start_index`` to ``moe_layer_end_index`` every
``moe_layer_interval``), qwen3_next and qwen3_5_moe_text (hybrid: linear attention in most layers), gpt_oss
(q/k/v/o with biases and one attention sink per head, a sliding window every other layer, which the count ignores
as above; a router with a bias; experts with biases, gate_up (H -> 2I) and down (I -> H) as the others', the
bias adds not counted as FLOPs; no dense layer, no shared expert), granitemoe (Mixtral's layout; its scalar
multipliers of the embeddings, the residual branches, the attention scores and the logits are element-wise, not
counted), lfm2_moe (hybrid: a gated short convolution — in_proj H -> 3H, a depthwise causal convolution of
``conv_L_cache`` taps, out_proj H -> H — in most layers, attention with q/k/v/out_proj and per-head q/k norms in the
others; ``num_dense_layers`` dense MLPs first; a sigmoid router whose load-balancing bias is a buffer, not a
parameter), phimoe (Phi-3.5-MoE: Mixtral's layout with q/k/v/o biases (``attention_bias``), LayerNorms with a
bias where the others have RMSNorms, a biased LM head (``lm_head_bias``); its sparsemixer router is one linear, as the
others', its masked softmaxes element-wise), llama4_text (Llama-4's language model: q/k/v/o without biases, its L2
q/k norm without parameters, chunked attention on its RoPE layers counted over the full square as sliding windows
are, temperature tuning element-wise; a sparse block where ``moe_layers`` says — Scout every layer, Maverick every
other — with a shared expert as wide as a routed one (``intermediate_size``) and a linear router, a dense MLP of
``intermediate_size_mlp`` elsewhere; the routing weight scales the expert's input, element-wise; of a vision-language
checkpoint its language model, which fedmoe loads: the vision tower and projector are not counted), and DeepSeekMoE
v1 (``model_type``
"deepseek", which transformers does not ship: plain multi-head attention q/k/v/o with the
DeepSeek shared-expert MoE and ``first_k_dense_replace`` / ``moe_layer_freq`` dense layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmoe.moe.arch import (
    DEFAULT_ATTENTION_TARGETS,
    HYBRID_ARCHITECTURES,
    LINEAR_ATTENTION_ARCHITECTURES,
    MLA_ARCHITECTURES,
    UnsupportedModelError,
    default_attention_targets,
)
from fedmoe.moe.model import CONFIG_ARCHITECTURES, load_model_config  # noqa: F401  (re-exported)

FLOP_PARTS = ("attention_proj", "attention_scores", "router", "experts", "shared_experts", "dense_mlp", "lora",
              "lm_head")
FLOPS_ARCHITECTURES = CONFIG_ARCHITECTURES
EXPERT_LORA_TARGETS = ("gate_up_proj", "down_proj")
EXPERT_LORA_LAYOUTS = ("fused", "split")


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class _Linear:
    name: str
    fan_in: int
    fan_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass
class _Shape:
    model_type: str
    hidden: int
    vocab: int
    num_layers: int
    tie: bool
    attn: list[_Linear]
    attn_norm_params: int  # q/k norms etc. inside self_attn, per layer
    qk_width: int  # heads × qk head dim (scores QKᵀ contract over this)
    v_width: int  # heads × v head dim
    moe_layers: list[bool]  # per decoder layer: sparse MoE block (True) or dense MLP (False)
    num_experts: int
    default_k: int
    expert_inter: int
    dense_inter: int
    shared_inter: int = 0
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate Linear(hidden, 1)
    default_attention_targets: tuple[str, ...] = field(default_factory=tuple)
    # hybrid models: the decoder layers that mix tokens by a recurrent mixer (a gated delta rule; LFM2-MoE's short
    # convolution) instead of attention, and that mixer
    linear_layers: list[bool] = field(default_factory=list)
    linear: "_LinearAttention | _ShortConv | None" = None
    mlp_bias: bool = False  # biases on the shared experts', dense MLPs' and LM head's linears (ERNIE-4.5's use_bias)
    router_extra: int = 0  # router parameters beside its weight (ERNIE-4.5's selection bias, a Parameter there)
    expert_bias: bool = False  # each routed expert's gate_up (2I) and down (H) biases (gpt-oss)
    norm_bias: bool = False  # the layer norms (two per layer, the final one) hold a bias beside their weight (Phi-3.5-MoE)
    head_bias: bool = False  # the LM head has a bias (Phi-3.5-MoE's lm_head_bias)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def num_linear_layers(self) -> int:
        return sum(self.linear_layers)


@dataclass(frozen=True)
class _LinearAttention:
    """A gated-delta-rule layer (Qwen3-Next, Qwen3.5): its projections, its other parameters, and the sizes
    its short convolution and chunked delta rule multiply with."""

    proj: list[_Linear]
    other_params: int  # the depthwise convolution, dt_bias, A_log, the gated norm
    v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_dim: int
    conv_kernel: int
    chunk: int = 64  # transformers' chunk_size of torch_chunk_gated_delta_rule (and the fla kernels')

    def mixer_flops(self, T: int) -> int:
        """The convolution and the delta rule's matrix products over one sequence of T tokens, as
        transformers' reference path (``torch_chunk_gated_delta_rule``) computes them: the sequence padded to
        whole chunks of c; per chunk and value head, K_β·Kᵀ and Q·Kᵀ (c×d_k×c each), then the scan's reads
        and write of the (d_k × d_v) state and the intra-chunk product (3·c·d_k·d_v + c²·d_v). The two
        unitriangular solves per chunk are not matrix products and are not counted."""
        c, dk, dv = self.chunk, self.k_head_dim, self.v_head_dim
        padded = -(-T // c) * c
        rule = 2 * self.v_heads * padded * (2 * c * dk + 3 * dk * dv + c * dv)
        conv = 2 * self.conv_dim * self.conv_kernel * (T + self.conv_kernel - 1)  # padded both sides, cut after
        return rule + conv


@dataclass(frozen=True)
class _ShortConv:
    """LFM2's gated short convolution: in_proj (H -> 3H: B, C, x), a depthwise causal convolution of B·x with
    ``kernel`` taps per channel, C times its output through out_proj (H -> H)."""

    proj: list[_Linear]
    other_params: int  # the depthwise kernel (and its bias)
    channels: int
    kernel: int

    def mixer_flops(self, T: int) -> int:
        """The depthwise convolution over T tokens, as transformers' reference path runs it (padded by kernel - 1
        on both sides, the extra outputs cut after): 2 · channels · kernel · (T + kernel - 1). The causal_conv1d
        kernel on a GPU computes only the T outputs kept, 2 · channels · kernel · T: K - 1 positions fewer."""
        return 2 * self.channels * self.kernel * (T + self.kernel - 1)


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _shape(config) -> _Shape:
    mt = getattr(config, "model_type", None)
    if mt not in FLOPS_ARCHITECTURES:
        raise UnsupportedModelError(f"model type '{mt}' is not supported by the FLOPs accounting; supported: "
                                    f"{', '.join(FLOPS_ARCHITECTURES)}")
    H = int(config.hidden_size)
    V = int(config.vocab_size)
    L = int(config.num_hidden_layers)
    nh = int(config.num_attention_heads)
    nkv = int(_get(config, "num_key_value_heads", default=nh))
    tie = bool(getattr(config, "tie_word_embeddings", False))
    E = int(_get(config, "n_routed_experts", "num_local_experts", "num_experts", default=0))
    k = int(config.num_experts_per_tok)
    if E <= 0:
        raise UnsupportedModelError(f"this {mt} config has no routed experts: not a sparse MoE")

    # ---- attention
    if mt in MLA_ARCHITECTURES:
        nope, rope, vd = int(config.qk_nope_head_dim), int(config.qk_rope_head_dim), int(config.v_head_dim)
        qlr, kvlr = config.q_lora_rank, int(config.kv_lora_rank)
        ab = bool(getattr(config, "attention_bias", False))
        attn, norms = [], kvlr
        if qlr:
            attn += [_Linear("q_a_proj", H, int(qlr), ab), _Linear("q_b_proj", int(qlr), nh * (nope + rope))]
            norms += int(qlr)
        else:
            attn.append(_Linear("q_proj", H, nh * (nope + rope)))
        attn += [_Linear("kv_a_proj_with_mqa", H, kvlr + rope, ab),
                 _Linear("kv_b_proj", kvlr, nh * (nope + vd)),
                 _Linear("o_proj", nh * vd, H, ab)]
        qk_width, v_width = nh * (nope + rope), nh * vd
        targets = default_attention_targets(mt, config)
    else:
        hd = int(_get(config, "head_dim", default=H // nh))
        if mt == "qwen2_moe":
            qkv_bias, o_bias = bool(getattr(config, "qkv_bias", True)), False
        elif mt == "mixtral":
            qkv_bias = o_bias = False
        elif mt == "glm4_moe":  # GLM-4.5: attention_bias is q/k/v's; o_proj has none
            qkv_bias, o_bias = bool(getattr(config, "attention_bias", False)), False
        elif mt == "ernie4_5_moe":  # ERNIE-4.5: use_bias for every linear but the experts and the router
            qkv_bias = o_bias = bool(getattr(config, "use_bias", False))
        elif mt == "gpt_oss":  # gpt-oss: attention_bias (True in its configs) on q, k, v and o
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", True))
        elif mt == "lfm2_moe":  # no attention biases
            qkv_bias = o_bias = False
        else:  # olmoe, flex_olmo, qwen3_moe, granitemoe, phimoe (q/k/v/o), deepseek (v1)
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        gated = mt in LINEAR_ATTENTION_ARCHITECTURES  # Qwen3-Next, Qwen3.5: q_proj also gives the output gate
        out_name = "out_proj" if mt == "lfm2_moe" else "o_proj"
        attn = [_Linear("q_proj", H, nh * hd * (2 if gated else 1), qkv_bias), _Linear("k_proj", H, nkv * hd, qkv_bias),
                _Linear("v_proj", H, nkv * hd, qkv_bias), _Linear(out_name, nh * hd, H, o_bias)]
        if mt in ("olmoe", "flex_olmo"):  # q and k norms over the projections' whole width
            norms = (nh + nkv) * hd
        elif mt in ("qwen3_moe", *HYBRID_ARCHITECTURES) or (mt == "glm4_moe" and getattr(config, "use_qk_norm", False)):
            norms = 2 * hd  # per-head q and k norms (LFM2-MoE's q_layernorm, k_layernorm)
        elif mt == "gpt_oss":
            norms = nh  # no q/k norms: one attention sink (a learned logit) per head
        else:
            norms = 0
        qk_width = v_width = nh * hd
        targets = DEFAULT_ATTENTION_TARGETS.get(mt, ("q_proj", "k_proj", "v_proj", "o_proj"))

    # ---- which layers are sparse, expert sizes
    shared_inter, shared_gate, mlp_bias, router_extra, expert_bias = 0, False, False, 0, False
    dense_inter = int(_get(config, "intermediate_size", default=0))
    if mt in ("olmoe", "flex_olmo", "mixtral", "gpt_oss", "granitemoe", "phimoe"):
        moe = [True] * L
        expert_inter = int(config.intermediate_size)
        if mt == "gpt_oss":  # a linear router with a bias; biased experts
            router_extra, expert_bias = E, True
    elif mt == "lfm2_moe":  # the first num_dense_layers are dense (intermediate_size), the rest MoE
        moe = [i >= int(config.num_dense_layers) for i in range(L)]
        expert_inter = int(config.moe_intermediate_size)
    elif mt in ("qwen2_moe", "qwen3_moe", *LINEAR_ATTENTION_ARCHITECTURES):
        only = set(getattr(config, "mlp_only_layers", None) or [])
        step = int(_get(config, "decoder_sparse_step", default=1))
        moe = [(i not in only) and (i + 1) % step == 0 for i in range(L)]
        expert_inter = int(config.moe_intermediate_size)
        if mt != "qwen3_moe":  # Qwen2-MoE, Qwen3-Next, Qwen3.5: a gated shared expert
            shared_inter = int(_get(config, "shared_expert_intermediate_size", default=0))
            shared_gate = True
    elif mt == "llama4_text":  # the layers moe_layers names are sparse (derived from interleave_moe_layer_step), each
        # with a shared expert of intermediate_size; the others a dense MLP of intermediate_size_mlp
        sparse = set(config.moe_layers)
        moe = [i in sparse for i in range(L)]
        expert_inter = shared_inter = int(config.intermediate_size)
        dense_inter = int(config.intermediate_size_mlp)
    elif mt == "ernie4_5_moe":
        start, end, step = (int(config.moe_layer_start_index), int(config.moe_layer_end_index),
                            int(config.moe_layer_interval))
        moe = [(i + 1) % step == 0 and start <= i <= end for i in range(L)]
        expert_inter = int(config.moe_intermediate_size)
        shared_inter = expert_inter * int(_get(config, "moe_num_shared_experts", default=0))
        mlp_bias = bool(getattr(config, "use_bias", False))
        router_extra = E  # moe_statics.e_score_correction_bias: a frozen nn.Parameter, not a buffer
    else:  # deepseek_v2, deepseek_v3, glm4_moe, glm4_moe_lite, deepseek (v1)
        first = int(_get(config, "first_k_dense_replace", default=0))
        freq = int(_get(config, "moe_layer_freq", default=1)) if mt == "deepseek" else 1
        moe = [i >= first and i % freq == 0 for i in range(L)]
        if getattr(config, "mlp_layer_types", None) is not None:  # GLM-4.7-Flash names each layer's kind
            moe = [t == "sparse" for t in config.mlp_layer_types]
        expert_inter = int(config.moe_intermediate_size)
        shared_inter = expert_inter * int(_get(config, "n_shared_experts", default=0))
        for key in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"):
            if getattr(config, key, None) is None:
                raise UnsupportedModelError(f"this {mt} config lacks '{key}': cannot count its MoE layers")
    linear_layers, linear = [False] * L, None
    if mt == "lfm2_moe":  # the short-convolution layers (in_proj, out_proj and the kernel biased by conv_bias)
        linear_layers = [t == "conv" for t in config.layer_types]
        K, cb = int(config.conv_L_cache), bool(getattr(config, "conv_bias", False))
        linear = _ShortConv([_Linear("in_proj", H, 3 * H, cb), _Linear("out_proj", H, H, cb)], H * K + (H if cb else 0),
                            H, K)
    elif mt in LINEAR_ATTENTION_ARCHITECTURES:
        linear_layers = [t == "linear_attention" for t in config.layer_types]
        nkh, nvh = int(config.linear_num_key_heads), int(config.linear_num_value_heads)
        dk, dv = int(config.linear_key_head_dim), int(config.linear_value_head_dim)
        kd, vd, K = nkh * dk, nvh * dv, int(config.linear_conv_kernel_dim)
        if mt == "qwen3_next":
            proj = [_Linear("in_proj_qkvz", H, 2 * kd + 2 * vd), _Linear("in_proj_ba", H, 2 * nvh)]
        else:
            proj = [_Linear("in_proj_qkv", H, 2 * kd + vd), _Linear("in_proj_z", H, vd), _Linear("in_proj_b", H, nvh),
                    _Linear("in_proj_a", H, nvh)]
        proj.append(_Linear("out_proj", vd, H))
        conv_dim = 2 * kd + vd
        linear = _LinearAttention(proj, conv_dim * K + 2 * nvh + dv, nvh, dk, dv, conv_dim, K)
    norm_bias = head_bias = False
    if mt == "phimoe":  # nn.LayerNorm (weight and bias) in place of RMSNorm; the LM head biased by lm_head_bias
        norm_bias, head_bias = True, bool(getattr(config, "lm_head_bias", False))
    return _Shape(mt, H, V, L, tie, attn, norms, qk_width, v_width, moe, E, k, expert_inter, dense_inter,
                  shared_inter, shared_gate, tuple(targets), linear_layers, linear, mlp_bias, router_extra, expert_bias,
                  norm_bias, head_bias)


# ---------------------------------------------------------------------------------------- counting
def count_flops(config, seq_len: int, k: int | None = None, lora_rank: int = 0, lora_alpha: float | None = None,
                expert_lora: bool = True, attention_lora_targets: list[str] | tuple[str, ...] | None = None,
                expert_lora_rank: int | None = None,
                expert_lora_targets: tuple[str, ...] = EXPERT_LORA_TARGETS, expert_lora_layout: str = "fused",
                router_lora: bool = False) -> dict[str, Any]:
    """Forward FLOPs of one sequence of ``seq_len`` tokens with ``k`` routed experts per token (default:
    the config's), and the FLAME Table 1 parameter columns. See the module docstring for conventions.

    ``lora_rank`` is the attention LoRA rank and, unless ``expert_lora_rank`` is given, the expert
    LoRA rank; 0 = no LoRA. ``attention_lora_targets``: None = the architecture's default set
    (``DEFAULT_ATTENTION_TARGETS``), [] = no attention LoRA. ``expert_lora=False``: no expert LoRA.
    ``expert_lora_layout``: ``fused`` or ``split`` (``lora.expert_layout``). ``router_lora``: LoRA of
    rank ``lora_rank`` on every MoE layer's router (``lora.router``).
    ``lora_alpha`` is accepted for symmetry with the adapters and changes nothing.
    """
    del lora_alpha  # scaling is element-wise: no matmul FLOPs, no parameters
    s = _shape(config)
    T = int(seq_len)
    if T < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    k = s.default_k if k is None else int(k)
    if not 1 <= k <= s.default_k:  # as MoEModel.set_top_k: a client runs at most the model's own top-k
        raise ValueError(f"k = {k} is out of range: this {s.model_type} model routes each token to {s.default_k} of "
                         f"its {s.num_experts} experts (its top-k), so give k in 1..{s.default_k}")
    H, E, I, Lm = s.hidden, s.num_experts, s.expert_inter, s.num_moe_layers
    Ld = s.num_layers - Lm
    Ll = s.num_linear_layers  # linear-attention layers (hybrid models); the others have softmax attention
    La = s.num_layers - Ll
    linear_proj = s.linear.proj if s.linear else []

    # ---- base FLOPs (2 × MACs)
    proj_macs = sum(lin.fan_in * lin.fan_out for lin in s.attn)
    parts = dict.fromkeys(FLOP_PARTS, 0)
    parts["attention_proj"] = 2 * T * (proj_macs * La + sum(lin.fan_in * lin.fan_out for lin in linear_proj) * Ll)
    parts["attention_scores"] = 2 * T * T * (s.qk_width + s.v_width) * La + (s.linear.mixer_flops(T) * Ll if Ll else 0)
    parts["router"] = 2 * T * H * E * Lm
    parts["experts"] = 2 * T * k * 3 * H * I * Lm
    parts["shared_experts"] = 2 * T * (3 * H * s.shared_inter + (H if s.shared_gate else 0)) * Lm
    parts["dense_mlp"] = 2 * T * 3 * H * s.dense_inter * Ld
    parts["lm_head"] = 2 * T * H * s.vocab

    # ---- LoRA
    r_attn = int(lora_rank)
    r_exp = int(lora_rank if expert_lora_rank is None else expert_lora_rank)
    if r_attn < 0 or r_exp < 0:
        raise ValueError("LoRA ranks must be >= 0")
    targets = s.default_attention_targets if attention_lora_targets is None else tuple(attention_lora_targets)
    by_name = {lin.name: lin for lin in s.attn}
    linear_by_name = {lin.name: lin for lin in linear_proj}
    unknown = [t for t in targets if t not in by_name and t not in linear_by_name]
    if unknown:
        raise UnsupportedModelError(f"attention LoRA targets {unknown} are not projections of {s.model_type}; "
                                    f"its projections are: {sorted(by_name | linear_by_name)}")
    # each layer adapts the targets its token mixer has
    attn_lora = r_attn * (sum(by_name[t].fan_in + by_name[t].fan_out for t in targets if t in by_name) * La
                          + sum(linear_by_name[t].fan_in + linear_by_name[t].fan_out
                                for t in targets if t in linear_by_name) * Ll)
    bad = [t for t in expert_lora_targets if t not in EXPERT_LORA_TARGETS]
    if bad:
        raise ValueError(f"expert LoRA targets {bad} unknown; choose from {EXPERT_LORA_TARGETS}")
    if expert_lora_layout not in EXPERT_LORA_LAYOUTS:
        raise ValueError(f"expert LoRA layout {expert_lora_layout!r} unknown; choose from {EXPERT_LORA_LAYOUTS}")
    # in + out of each adapted expert projection (split: gate_up_proj = a gate and an up adapter)
    exp_dims = {"gate_up_proj": H + 2 * I if expert_lora_layout == "fused" else 2 * (H + I), "down_proj": I + H}
    expert_lora_per_expert = (r_exp * sum(exp_dims[t] for t in expert_lora_targets)) if expert_lora else 0
    router_lora_params = r_attn * (H + E) * Lm if router_lora else 0
    parts["lora"] = (2 * T * attn_lora + 2 * T * k * expert_lora_per_expert * Lm
                     + (2 * E * r_attn * H * Lm if router_lora else 0))
    non_expert_trainable = attn_lora + router_lora_params

    # ---- parameters
    attn_params = sum(lin.params for lin in s.attn) + s.attn_norm_params
    linear_params = sum(lin.params for lin in linear_proj) + (s.linear.other_params if s.linear else 0)
    expert_params = 3 * H * I + (2 * I + H if s.expert_bias else 0)
    shared_params = 3 * H * s.shared_inter + (H if s.shared_gate else 0) + (
        2 * s.shared_inter + H if s.mlp_bias and s.shared_inter else 0)
    norm = 2 * H if s.norm_bias else H  # one layer norm: its weight (and bias)
    non_expert = (
        s.vocab * H * (1 if s.tie else 2) + norm  # embeddings, LM head, final norm
        + (s.vocab if s.mlp_bias or s.head_bias else 0)  # ERNIE-4.5's use_bias also gives the LM head a bias
        + La * attn_params + Ll * linear_params + s.num_layers * 2 * norm  # token mixers + the two layer norms
        + Lm * (E * H + s.router_extra + shared_params)  # router + shared experts
        + Ld * (3 * H * s.dense_inter + (2 * s.dense_inter + H if s.mlp_bias else 0))
    )
    return {
        "k": k,
        "seq_len": T,
        "flops_per_seq": sum(parts.values()),
        "flops_by_part": parts,
        "active_params": non_expert + Lm * k * expert_params,
        "total_params": non_expert + Lm * E * expert_params,
        "active_trainable": non_expert_trainable + Lm * k * expert_lora_per_expert,
        "total_trainable": non_expert_trainable + Lm * E * expert_lora_per_expert,
    }


def default_k_list(config) -> list[int]:
    """FLAME's budget ladder: the config's k, halved down to 1 (8, 4, 2, 1 for OLMoE)."""
    k = _shape(config).default_k
    out = []
    while k >= 1:
        out.append(k)
        k //= 2
    return out


# ---------------------------------------------------------------------------------------- display
def human(n: float, digits: int = 1) -> str:
    """332_800_000_000 -> '332.8B'."""
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{suf}"
    return str(int(n))


def format_flops_table(rows: list[dict], title: str | None = None) -> str:
    """A markdown table with FLAME's Table 1 columns plus the per-part FLOPs split."""
    levels = all("clients" in r for r in rows)  # a run's rows: each with its LoRA rank and the clients at it
    head = (["k"] + (["rank", "clients"] if levels else []) + ["FLOPs/seq", "P_a", "P", "P̂_a", "P̂"]
            + [p.replace("_", " ") for p in FLOP_PARTS])
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["k"])] + ([str(r["rank"]), ", ".join(map(str, r["clients"])) or "–"] if levels else [])
        cells += [human(r["flops_per_seq"]), human(r["active_params"], 2), human(r["total_params"], 2),
                  human(r["active_trainable"], 2), human(r["total_trainable"], 2)]
        cells += [human(r["flops_by_part"][p]) for p in FLOP_PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
