"""Find the sparse MoE blocks of a Hugging Face (transformers v5) MoE causal LM.

In transformers v5 every supported architecture has the same shape inside a decoder layer's MoE block
(``mlp``; Granite-MoE: ``block_sparse_moe``, LFM2-MoE, Llama-4: ``feed_forward``): a router (``gate``; gpt-oss and
Granite-MoE, Phi-3.5-MoE, Llama-4: ``router``) with ``top_k`` and a fused ``experts`` module holding ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I), called as ``experts(hidden_states, top_k_index, top_k_weights)``. Shared
experts differ per family. gpt-oss holds its stacks transposed, gate and up interleaved, with biases and a clamped
SwiGLU (:mod:`fedmoe.moe.experts`). Phi-3.5-MoE's router (``PhimoeTopKRouter``) chooses by sparsemixer, which always
picks two experts whatever its ``top_k`` (:data:`SPARSEMIXER_ARCHITECTURES`). Llama-4's block
(``Llama4TextMoe``) is the exception to the call: its experts take every token, each scaled by its sigmoid routing
score, through all E experts at once (:data:`SCALES_EXPERT_INPUT_ARCHITECTURES`; fedmoe routes them instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .experts import ExpertForm, expert_form

SUPPORTED_ARCHITECTURES = ("olmoe", "flex_olmo", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "mixtral",
                           "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "ernie4_5_moe", "gpt_oss",
                           "granitemoe", "lfm2_moe", "phimoe", "llama4_text")

# the decoder layer's attribute that holds its MoE block, where it is not ``mlp`` (LFM2-MoE's first
# ``num_dense_layers`` hold a dense MLP there, skipped as DeepSeek's dense layers are; so do Llama-4's layers not in
# its config's ``moe_layers``: Maverick's every other layer, whose MLP is ``intermediate_size_mlp`` wide)
_MOE_BLOCK_ATTRS = {"granitemoe": "block_sparse_moe", "lfm2_moe": "feed_forward", "llama4_text": "feed_forward"}
# the MoE block's attribute that holds its router, where it is not ``gate``
_ROUTER_ATTRS = {"gpt_oss": "router", "granitemoe": "router", "phimoe": "router", "llama4_text": "router"}
# the families whose fused experts are not held as the others' (fedmoe.moe.experts): the form each must have
# (Llama-4's Llama4TextExperts: (E, H, 2I) and (E, I, H), multiplied as torch.bmm(x, W); gate | up halves, no biases)
_EXPERT_FORMS = {"gpt_oss": dict(transposed=True, interleaved=True, bias=True),
                 "llama4_text": dict(transposed=True, interleaved=False, bias=False)}
# the families transformers has no SDPA attention for (gpt-oss: its attention sinks): they run eager attention
EAGER_ONLY_ARCHITECTURES = ("gpt_oss",)

# hybrid models: most decoder layers mix tokens by a recurrent mixer, every few by softmax attention (``self_attn``):
# Qwen3-Next and Qwen3.5 by linear attention (a gated delta rule, ``linear_attn``), LFM2-MoE by a gated short
# convolution (``conv``: in_proj to B, C, x; a depthwise causal convolution of B·x; C times it through out_proj). Each
# carries a state along the sequence, which a right-padded prompt runs through its padding (fedmoe.eval.choice)
LINEAR_ATTENTION_ARCHITECTURES = ("qwen3_next", "qwen3_5_moe_text")
HYBRID_ARCHITECTURES = LINEAR_ATTENTION_ARCHITECTURES + ("lfm2_moe",)
# the decoder layer's token mixers, by the attribute that holds them
TOKEN_MIXERS = ("self_attn", "linear_attn", "conv")
# the projections that write a token mixer's output back to the residual stream (FLEx adapts only the others)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj")

# multi-head latent attention (DeepSeek-V2, -V2-Lite, -V3, Moonlight, GLM-4.7-Flash): no k/v projections, and a
# low-rank query (q_a_proj, q_b_proj) where the config sets q_lora_rank
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")

# model_type -> (attribute of the shared expert, attribute of its gate) inside the MoE block
_SHARED_EXPERT_ATTRS = {
    "olmoe": (None, None),
    "flex_olmo": (None, None),
    "qwen2_moe": ("shared_expert", "shared_expert_gate"),
    "qwen3_moe": (None, None),
    "qwen3_next": ("shared_expert", "shared_expert_gate"),
    "qwen3_5_moe_text": ("shared_expert", "shared_expert_gate"),
    "mixtral": (None, None),
    "deepseek_v2": ("shared_experts", None),
    "deepseek_v3": ("shared_experts", None),
    "glm4_moe": ("shared_experts", None),
    "glm4_moe_lite": ("shared_experts", None),
    "ernie4_5_moe": ("shared_experts", None),
    "gpt_oss": (None, None),
    "granitemoe": (None, None),
    "lfm2_moe": (None, None),
    "phimoe": (None, None),
    "llama4_text": ("shared_expert", None),  # Llama4TextMLP, intermediate_size wide, no gate: always added
}


# Attention projections that get LoRA when the config names none. DeepSeek-V3's multi-head latent
# attention has no k/v projections: its query and its latent key/value up-projection stand in. A hybrid
# model's linear-attention layers have projections of their own.
DEFAULT_ATTENTION_TARGETS = {
    "olmoe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "flex_olmo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # hybrid: every linear of both token mixers (a layer takes those it has)
    "qwen3_next": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"),
    "qwen3_5_moe_text": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                         "out_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "deepseek_v2": ("q_proj", "kv_b_proj", "o_proj"),
    "deepseek_v3": ("q_proj", "kv_b_proj", "o_proj"),
    "glm4_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "glm4_moe_lite": ("q_proj", "kv_b_proj", "o_proj"),
    "ernie4_5_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "granitemoe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # hybrid: every linear of both token mixers, as for Qwen3-Next (attention's q/k/v/out_proj; the short
    # convolution's in_proj and out_proj, not its depthwise kernel)
    "lfm2_moe": ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj"),
    "phimoe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "llama4_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def default_attention_targets(model_type: str, config) -> tuple[str, ...]:
    """The attention projections that get LoRA when the config names none, for this model's config: with
    a low-rank query (MLA with ``q_lora_rank``) its up-projection ``q_b_proj`` stands in for ``q_proj``."""
    if model_type in MLA_ARCHITECTURES and getattr(config, "q_lora_rank", None):
        return ("q_b_proj", "kv_b_proj", "o_proj")
    return DEFAULT_ATTENTION_TARGETS[model_type]


class UnsupportedModelError(ValueError):
    """The model is not a supported sparse MoE."""


@dataclass
class MoELayer:
    """One sparse MoE block of the model."""

    index: int  # position among the MoE blocks (0..L-1)
    decoder_layer: int  # index of the decoder layer that holds it
    block: nn.Module
    router: nn.Module
    experts: nn.Module  # the original fused experts module (base weights)
    shared_expert: nn.Module | None  # the always-on shared expert(s) of the block (Qwen2-MoE, DeepSeek), untouched
    shared_expert_gate: nn.Module | None
    router_attr: str = "gate"  # the block's attribute that holds the router (gpt-oss, Granite-MoE, Phi-3.5-MoE: router)
    block_attr: str = "mlp"  # the decoder layer's attribute that holds the block (moe_block_attr)
    form: ExpertForm = ExpertForm()  # how the experts hold and compute their weights (fedmoe.moe.experts)
    scales_input: bool = False  # the routing weight scales the expert's input, not its output (scales_expert_input)

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.form.hidden(self.experts.gate_up_proj)

    @property
    def intermediate_size(self) -> int:
        return self.form.inter(self.experts.down_proj)


# the families whose router always gives its top-k weights a fixed sum, whatever k (a softmax over the top-k
# logits alone — Granite-MoE, gpt-oss —, or renormalised after the top-k — Mixtral, Qwen3.5, ERNIE-4.5); the others
# do so where their config's norm_topk_prob says (DeepSeek-V3 and GLM also times routed_scaling_factor), but
# DeepSeek-V2, whose router (transformers 5.23) never renormalises, whatever its config's flag, Phi-3.5-MoE, whose
# sparsemixer weighs each of its two selections on its own (below), and Llama-4, whose router (Llama4Router) gives
# each of its top-k logits its own sigmoid (the weights of k experts sum to anything in (0, k))
_RENORMALISED_TOP_K = ("mixtral", "qwen3_5_moe_text", "ernie4_5_moe", "gpt_oss", "granitemoe")
_NEVER_RENORMALISED_TOP_K = ("deepseek_v2", "phimoe", "llama4_text")

# the families whose routing weight scales the routed expert's input instead of its output: transformers' Llama-4
# block (Llama4TextMoe, 5.23) multiplies each token by its score before the experts, so a token's routed output is
# Σ_e expert_e(s_e · x), not Σ_e s_e · expert_e(x) (a SwiGLU expert is not linear in its input: the two differ). Its
# block runs every token through every expert (a score of 0 where not chosen, sigmoid(-inf)); fedmoe's block forward
# (MoEModel) routes the chosen (token, expert) pairs to its expert path instead, which scales their input
# (ExpertsWithLoRA.scale_input); FLEx's grafted expert does the same with its gate (fedmoe.algorithms.flex)
SCALES_EXPERT_INPUT_ARCHITECTURES = ("llama4_text",)


def scales_expert_input(model_type: str) -> bool:
    """Whether this family's routing weight multiplies the routed expert's input (Llama-4: expert(w·x)) rather than
    its output (every other family: w·expert(x))."""
    return model_type in SCALES_EXPERT_INPUT_ARCHITECTURES

# the families whose router chooses by sparsemixer (Phi-3.5-MoE's PhimoeTopKRouter, transformers 5.23): two
# selections in turn, each the largest logit among those not yet chosen (in training a Gumbel draw among the logits
# within a relative 2·router_jitter_noise of it), weighted by its own softmax over those near logits (about 1 each
# at inference, so the two weights sum to about 2, not to a fixed value: not renormalised; in training a choice that
# was not the largest logit is weighed by about 1/3 three times in four, sparsemixer's midpoint mask). It reads no
# ``top_k``: it always returns two. fedmoe's k = 1 keeps the first selection and its weight (a forward hook on each
# router, registered by MoEModel: model._first_selections), which is sparsemixer's first step exactly; its config
# must route to two (num_experts_per_tok: 2)
SPARSEMIXER_ARCHITECTURES = ("phimoe",)


def renormalises_top_k(config) -> bool:
    """Whether this model's top-k routing weights have the same sum at any k: with fewer experts a token's
    routed output then keeps its scale (each expert weighs more) instead of shrinking as it does where the
    weights are the full softmax's probabilities (OLMoE, Qwen2-MoE, DeepSeek-V2-Lite: norm_topk_prob false) or each
    selection's own (Phi-3.5-MoE's sparsemixer: at k = 1 the first of its two weights, about half the sum; Llama-4's
    sigmoid of each chosen logit)."""
    model_type = getattr(config, "model_type", None)
    if model_type in _NEVER_RENORMALISED_TOP_K:
        return False
    return model_type in _RENORMALISED_TOP_K or bool(getattr(config, "norm_topk_prob", False))


def router_attr(model_type: str) -> str:
    """The MoE block's attribute that holds the router: ``gate``, or gpt-oss's, Granite-MoE's, Phi-3.5-MoE's and
    Llama-4's ``router``."""
    return _ROUTER_ATTRS.get(model_type, "gate")


def moe_block_attr(model_type: str) -> str:
    """The decoder layer's attribute that holds the MoE block: ``mlp``, Granite-MoE's ``block_sparse_moe``,
    LFM2-MoE's and Llama-4's ``feed_forward`` (also the names in their parameters and adapters: ``…layers.N.<attr>.experts``)."""
    return _MOE_BLOCK_ATTRS.get(model_type, "mlp")


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def check_supported(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not a supported MoE architecture; fedmoe supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (transformers v5 fused-expert layout)"
        )


def token_mixers(layer: nn.Module) -> list[nn.Module]:
    """The modules of a decoder layer that mix tokens: its attention, or its linear attention (hybrid models)."""
    return [m for m in (getattr(layer, a, None) for a in TOKEN_MIXERS) if m is not None]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no '.model.layers': not a decoder-only causal LM")
    return layers


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block in decoder order. Dense layers (DeepSeek's first_k_dense_replace,
    Qwen's mlp_only_layers, LFM2-MoE's num_dense_layers, the layers not in Llama-4's moe_layers) are skipped; a model with no MoE block at all is an
    error."""
    model_type = model_type_of(model)
    check_supported(model_type)
    shared_attr, shared_gate_attr = _SHARED_EXPERT_ATTRS[model_type]
    rattr, battr = router_attr(model_type), moe_block_attr(model_type)
    want_form = _EXPERT_FORMS.get(model_type, dict(transposed=False, interleaved=False, bias=False))
    found: list[MoELayer] = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, battr, None)
        experts = getattr(block, "experts", None)
        router = getattr(block, rattr, None)
        if experts is None or router is None:
            continue  # a dense MLP layer
        base = getattr(experts, "base", experts)  # already wrapped by fedmoe
        router = getattr(router, "base", router)  # the router itself, also under router LoRA
        if not (hasattr(base, "gate_up_proj") and hasattr(base, "down_proj")):
            raise UnsupportedModelError(
                f"layer {i} of {model_type}: experts module {type(base).__name__} has no fused "
                "gate_up_proj/down_proj tensors; fedmoe needs transformers>=5 (fused experts)"
            )
        if type(base).__name__.startswith("Mxfp4"):
            raise UnsupportedModelError(
                f"layer {i} of {model_type}: its experts are still in MXFP4 ({type(base).__name__}, transformers' "
                "inference-only kernels): load the checkpoint with quantization_config=Mxfp4Config(dequantize=True), "
                "as MoEModel.from_pretrained does"
            )
        form = expert_form(base)
        have = dict(transposed=form.transposed, interleaved=form.interleaved, bias=form.bias)
        if have != want_form or not getattr(base, "has_gate", True) or getattr(base, "has_post_expert_norm", False):
            raise UnsupportedModelError(
                f"layer {i} of {model_type}: its experts module {type(base).__name__} holds its weights as fedmoe "
                f"does not know for this family ({have}; expected {want_form}, a gate and no post-expert norm)"
            )
        found.append(
            MoELayer(
                index=len(found),
                decoder_layer=i,
                block=block,
                router=router,
                experts=base,
                shared_expert=getattr(block, shared_attr) if shared_attr else None,
                shared_expert_gate=getattr(block, shared_gate_attr) if shared_gate_attr else None,
                router_attr=rattr,
                block_attr=battr,
                form=form,
                scales_input=scales_expert_input(model_type),
            )
        )
    if not found:
        raise UnsupportedModelError(
            f"no sparse MoE block found in this {model_type} model (is it a dense model?); fedmoe's methods "
            f"need a Mixture-of-Experts model: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return found
