"""LFM2-MoE (``lfm2_moe``): what is particular to it, each part against transformers' own forward, PEFT or a hand
computation (the arch-parametrized tests run it through discovery, expert and router LoRA, counts, FLOPs and
parameters against FlopCounterMode and the meta model, quantization and a federated round with its exports):

* its MoE block is the decoder layer's ``feed_forward``; the first ``num_dense_layers`` hold a dense MLP there
  (w1/w3/w2), skipped; its router ``feed_forward.gate`` is called as ``gate(hidden, expert_bias)``: sigmoid scores
  plus the block's load-balancing bias choose the experts, which router LoRA must pass on;
* a hybrid: gated short convolutions (``conv``: in_proj, a depthwise causal convolution, out_proj) in most layers,
  attention (q/k/v/out_proj, per-head q/k norms) in the others: attention LoRA on both mixers' linears by default,
  FLEx's on their input projections; the convolution's FLOPs and parameters exactly; a padded prompt's convolution
  state cannot be continued, so multi-token options are scored whole; left-padded generation is each prompt's own;
* the hub checkpoints' per-expert w1/w3/w2 keys loaded into the fused stacks, and written back by an export;
* exports: a PEFT adapter PEFT loads to fedmoe's logits, a merged model with every kind of adapter, the vllm form's
  per-expert keys as vLLM's Lfm2MoeForCausalLM names them (feed_forward.experts.{e}.w1 / w3 / w2);
* FC-MoE (under activation checkpointing) and FLEx (on an NF4 base) through a federated round; no load-balancing
  loss in transformers (train.aux_loss refused by name).
"""

import copy
import json

import pytest
import torch
from helpers import hf_folder, loaded_model, one_small_round, randomise_, tiny_hf, token_batch

from fedmoe.moe import MoEModel

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 8.0
IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 1200, 3, 8, 11, 4], [8, 8, 15, 16, 23, 42, 99, 4, 4, 5, 6]])
MIXER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"]


def test_router_lora_passes_the_routing_bias_on():
    """The block calls gate(hidden, expert_bias); under router LoRA (B = 0) the model is transformers' own, and the
    bias decides (the same model without it gives other logits). With a random router LoRA the experts counted for
    layer 0 at k = 1 are argmax(sigmoid(x·W'ᵀ) + expert_bias), W' the adapted weight."""
    ref = tiny_hf("lfm2_moe")
    mm = MoEModel(copy.deepcopy(ref))
    mm.add_router_lora(RANK, ALPHA)
    mm.tracker.skip_padding = False
    ids, mask = token_batch()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits, want, rtol=0, atol=1e-5)
        unbiased = copy.deepcopy(ref)
        for layer in unbiased.model.layers[1:]:
            layer.feed_forward.expert_bias.zero_()
        assert (unbiased(ids, attention_mask=mask).logits - want).abs().max() > 1e-4
    randomise_(mm, scale=0.5)
    block = mm.layers[0].block
    captured = []
    hook = block.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    mm.set_top_k(1)
    mm.reset_activation_counts()
    with torch.no_grad(), mm.tracking(mask):
        mm.model(ids, attention_mask=mask)
    hook.remove()
    x = captured[0].reshape(-1, 32)[mask.reshape(-1).bool()]
    choice = (torch.sigmoid(x @ block.gate.weight.T) + block.expert_bias).argmax(dim=-1)
    assert mm.activation_counts()[0][0].tolist() == torch.bincount(choice, minlength=8).tolist()


def test_hybrid_attention_lora_equals_peft_and_flex_takes_the_input_projections():
    """Default attention LoRA: q/k/v/out_proj on the attention layer, in_proj/out_proj on the short-convolution
    layers (not the depthwise kernel, not the dense MLP), equal to PEFT's LoRA on those names (random B); FLEx's
    default leaves both out_proj's out; the FLOPs count's default targets are the model's."""
    from peft import LoraConfig, get_peft_model

    from fedmoe.algorithms.flex import FlexClient
    from fedmoe.config import load_config
    from fedmoe.eval.flops import _shape
    from fedmoe.moe.lora import LoRALinear

    ref = tiny_hf("lfm2_moe")
    ours = MoEModel(copy.deepcopy(ref))
    ours.add_attention_lora(RANK, ALPHA)
    adapted = sorted(n for n, m in ours.model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == ["model.layers.0.conv.in_proj", "model.layers.0.conv.out_proj", "model.layers.1.conv.in_proj",
                       "model.layers.1.conv.out_proj", "model.layers.2.self_attn.k_proj",
                       "model.layers.2.self_attn.out_proj", "model.layers.2.self_attn.q_proj",
                       "model.layers.2.self_attn.v_proj"]
    ids, mask = token_batch()
    real = mask.bool()
    with torch.no_grad():
        plain = ref(ids, attention_mask=mask).logits
    peft_model = get_peft_model(ref, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MIXER_TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in adapted:
            mod = ours.model.get_submodule(name)
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.2)
            pm = peft_model.get_submodule("base_model.model." + name)
            pm.lora_A["default"].weight.copy_(mod.lora_A)
            pm.lora_B["default"].weight.copy_(mod.lora_B)
    with torch.no_grad():
        got, want = ours.model(ids, attention_mask=mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert (got - plain)[real].abs().max() > 1e-3  # the adapters matter
    assert FlexClient.attention_targets(load_config(None, []), ours) == ["q_proj", "k_proj", "v_proj", "in_proj"]
    assert list(_shape(ours.config).default_attention_targets) == MIXER_TARGETS


@pytest.mark.parametrize("kernel,bias", [(3, False), (4, True)])
def test_short_convolution_flops_and_parameters_exactly(kernel, bias):
    """One short-convolution mixer against FlopCounterMode, exactly (the whole-model test's 1% would let the
    depthwise convolution go uncounted), at lengths 1, 5 and 40; its parameters (in_proj, out_proj, the kernel and,
    with conv_bias, their biases)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from fedmoe.eval.flops import _shape
    from fedmoe.moe.tiny import tiny_config

    cfg = tiny_config("lfm2_moe")
    cfg.conv_L_cache, cfg.conv_bias = kernel, bias
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    mixer = model.model.layers[0].conv
    conv = _shape(cfg).linear
    assert sum(p.numel() for p in mixer.parameters()) == sum(lin.params for lin in conv.proj) + conv.other_params
    for T in (1, 5, 40):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mixer(torch.randn(1, T, cfg.hidden_size))
        proj = 2 * T * sum(lin.fan_in * lin.fan_out for lin in conv.proj)
        assert counter.get_total_flops() == proj + conv.mixer_flops(T), (kernel, bias, T)


def test_multi_token_options_are_scored_whole():
    """A right-padded prompt's convolution state holds padding: the prompt-once scorer would continue an option from
    it. Options of more than one token are scored as whole sequences (the reference scorer's numbers). The prompt-
    once path, forced, cannot take them: transformers 5.23's cache of a convolution layer cannot select rows
    (AttributeError); a cache that could would give other numbers for the padded prompts."""
    import fedmoe.eval.choice as choice

    mm = MoEModel(tiny_hf("lfm2_moe"))
    prompts = [[5, 17, 30, 42, 7, 9, 3], [8, 8, 15], [9, 4, 4, 5, 6]]
    options = [[[3, 4], [9]], [[11, 12, 13], [14]], [[7], [70, 71]]]
    got = choice.option_logprobs(mm, prompts, options)
    want = choice.option_logprobs(mm, prompts, options, reference=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    try:
        forced = choice.cached_batch(mm.model, prompts, options, "cpu", 0)
    except AttributeError as e:
        assert "batch_select_indices" in str(e)
    else:
        assert max(float((a - b).abs().max()) for a, b in zip(forced, want)) > 1e-3


def test_batched_generation_equals_one_prompt_at_a_time():
    """ROUGE-L's answers: greedy decoding of left-padded prompts of different lengths, with trained adapters, gives each
    prompt's own tokens (the convolutions see zeros for the padding, the experts route none of it)."""
    from fedmoe.eval.generate import greedy_generate

    mm = MoEModel(tiny_hf("lfm2_moe"))
    mm.add_expert_lora(RANK, ALPHA)
    mm.add_attention_lora(RANK, ALPHA)
    randomise_(mm)
    prompts = [[5, 17, 30, 42, 7, 9, 3, 4], [8, 8, 15], [9, 4, 4, 5, 6]]
    batched = greedy_generate(mm.model, prompts, 0, 1, 6, 8, "cpu")
    assert batched == [greedy_generate(mm.model, [p], 0, 1, 6, 1, "cpu")[0] for p in prompts]


def test_hub_layout_and_exports(tmp_path):
    """The hub's per-expert w1/w3/w2 keys (what transformers writes) load into the fused stacks. PEFT: target_parameters
    under feed_forward.experts and the mixers' linears, loaded by PEFT to fedmoe's logits. Merged (split expert LoRA,
    router LoRA into feed_forward.gate, a rescaler, k_i = 1): transformers' reload gives fedmoe's logits and keeps the
    routing bias. vllm: every expert's w1/w3/w2 under feed_forward.experts, attention and convolution LoRA under their
    own names."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedmoe.export import export_notes, vllm_tensors, write_merged, write_peft

    folder = hf_folder(tmp_path, "lfm2_moe")
    keys = set(load_file(str(folder / "model.safetensors")))
    assert {"model.layers.1.feed_forward.experts.7.w1.weight", "model.layers.1.feed_forward.experts.7.w3.weight",
            "model.layers.1.feed_forward.experts.7.w2.weight", "model.layers.1.feed_forward.expert_bias",
            "model.layers.0.feed_forward.w1.weight"} <= keys
    loaded = loaded_model(folder)
    loaded.mm.tracker.skip_padding = False
    plain = AutoModelForCausalLM.from_pretrained(folder)
    for layer in loaded.mm.layers:
        block = plain.model.layers[layer.decoder_layer].feed_forward
        assert torch.equal(layer.experts.gate_up_proj, block.experts.gate_up_proj)
    write_peft(loaded, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["feed_forward.experts.down_proj", "feed_forward.experts.gate_up_proj"]
    assert sorted(cfg["target_modules"]) == sorted(MIXER_TARGETS)
    with torch.no_grad():
        ours = loaded.mm.model(IDS).logits
        assert (plain(IDS).logits - ours).abs().max() > 1e-3  # the adapters matter
        peft = PeftModel.from_pretrained(plain, tmp_path / "a")
        torch.testing.assert_close(peft(IDS).logits, ours, rtol=0, atol=2e-5)
    tensors, targets, _, _ = vllm_tensors(loaded.mm)
    stem = "base_model.model.model.layers.1"
    assert {f"{stem}.feed_forward.experts.7.{p}.lora_A.weight" for p in ("w1", "w3", "w2")} <= set(tensors)
    assert {f"{stem}.conv.in_proj.lora_B.weight", "base_model.model.model.layers.2.self_attn.out_proj.lora_B.weight"} \
        <= set(tensors)
    assert targets == sorted(["down_proj", "gate_proj", "up_proj", *MIXER_TARGETS])
    assert any("feed_forward.experts.{e}.w1" in n for n in export_notes(loaded.cfg, "vllm", loaded.mm))
    full = loaded_model(folder, layout="split", router=True, scale=0.7, top_k=1)
    full.mm.tracker.skip_padding = False
    write_merged(full, tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.config.num_experts_per_tok == 1
    assert torch.equal(merged.model.layers[1].feed_forward.expert_bias, plain.model.layers[1].feed_forward.expert_bias)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, full.mm.model(IDS).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", [
    ["algorithm.name=fcmoe", "train.activation_checkpointing=true"],
    ["algorithm.name=flex", "lora.experts=false", "algorithm.flex.calibration_size=4", "model.quantization=nf4"],
], ids=["fcmoe", "flex"])
def test_federated_rounds(tmp_path, method):
    """One federated round of FC-MoE (under activation checkpointing: the convolution layers recomputed) and FLEx
    (grafts on an NF4 base, its in_proj/out_proj quantized) on a tiny LFM2-MoE: finite losses; FLEx grafts an expert
    per MoE layer. The load-balancing loss is refused by name (transformers has none for LFM2-MoE)."""
    from fedmoe.moe.loss import labelled_token_loss

    folder = hf_folder(tmp_path, "lfm2_moe")
    _, rd = one_small_round(folder, tmp_path, *method)
    if method[0] == "algorithm.name=flex":
        ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
        assert ck["transport"]["private"][0]["graft_index"].shape == (2, 1)
    else:
        mm = MoEModel.from_pretrained(str(folder))
        with pytest.raises(ValueError, match="LFM2-MoE ship none"):
            labelled_token_loss(mm.model, IDS, torch.ones_like(IDS), IDS, output_router_logits=True)


def test_the_plan_scores_a_hybrid_models_options_as_the_evaluator_does(tmp_path):
    """A hybrid model scores options of more than one token (every option: it ends with eos) as whole sequences, so
    the plan's option scoring must too: it ran the prompt-once path, which a convolution's cache cannot take, and
    `fedmoe plan` (and a GPU run's check) ended in an AttributeError. Planned on fake tensors, the evaluator's own
    option_logprobs is within 1% of the same on real tensors (a label task: its options as they are). It was eight
    times the test loss's pass here (every pair at once, logits at every position); a batch of pairs at a time with
    the logits where an option's tokens are predicted, it is below it."""
    from fedmoe.algorithms import get_method
    from fedmoe.config import load_config
    from fedmoe.data.prepare import answer_options
    from fedmoe.data.tokenize import option_ids
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.moe.model import load_tokenizer
    from fedmoe.plan import _LiveBytes, _planned_model, memory_plan

    L, B = 64, 8
    folder = hf_folder(tmp_path, "lfm2_moe")
    cfg = load_config(None, [f"model.name={folder}", f"data.max_length={L}", f"eval.batch_size={B}", "eval.task=choice",
                             "data.field_map={label: category}"])
    (plan,) = memory_plan(cfg)
    options = option_ids(load_tokenizer(str(folder)), answer_options(cfg)[0])
    mm, config = _planned_model(cfg, get_method("fedit"), plan.k)
    mm.model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, config.vocab_size, (L - max(len(o) for o in options),), generator=g).tolist()
               for _ in range(B)]
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])
    with torch.no_grad(), live:
        option_logprobs(mm.model, prompts, [options] * B, B, "cpu")
    assert abs(plan.passes["choice"] - live.peak) <= 0.01 * live.peak, (plan.passes, live.peak)
    assert plan.passes["choice"] < plan.passes["test loss"]
