"""Llama-4 (``llama4_text``; the hub's checkpoints are vision-language, ``llama4``, of which fedmoe loads the language
model): what is particular to it, each part against transformers' own forward or a hand computation (the
arch-parametrized tests run it through discovery, expert LoRA against PEFT, router LoRA, activation counts, FLOPs and
parameters against FlopCounterMode and the meta model, quantization, the split layout, and a federated round with its
merged export and the vllm refusal):

* its block (``Llama4TextMoe``) runs every token through every expert, the token scaled by the expert's routing score
  (the sigmoid of its logit where the router chose it, 0 elsewhere): fedmoe's routed path, which scales the routed
  rows' input, equals it — outputs, router logits and input gradients, with expert and router LoRA by ΔW added to
  transformers' own weights;
* its stacks are held (E, in, out) without transformers saying so: PEFT's target_parameters misreads them;
* FLEx's graft gated on its input, FLAME's k_i and rescaler (on the routed output), their refusals;
* the published sizes of Scout and Maverick from their config.json;
* a vision-language checkpoint saved by transformers loads as its language model (a config value transformers 4.51
  wrote and 5.23 refuses read as 4.51 did), exports merged to its logits, and a federated run on it resumes exactly.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import loaded_model, randomise_, tiny_hf, token_batch, whole_and_resumed

from fedmoe.eval.flops import count_flops
from fedmoe.moe import MoEModel, TopKError
from fedmoe.moe.arch import UnsupportedModelError
from fedmoe.moe.arch import renormalises_top_k, scales_expert_input
from fedmoe.moe.model import load_model_config, load_tokenizer, vision_language_type
from fedmoe.moe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 8.0
CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "model-configs"


def _strong(model):
    """``model`` with experts and routers large enough that the routing weights spread over (0, 1) and an expert's
    output is not near-linear in its input: weighing its input or its output then differs by far more than the
    tolerances (at transformers' init, std 0.02, the two readings of the model differ by 0.005 in the logits)."""
    text = getattr(model, "language_model", model)  # a vision-language model's language model
    with torch.no_grad():
        for layer in text.model.layers:
            block = layer.feed_forward
            if hasattr(block, "experts"):
                block.experts.gate_up_proj.mul_(15)
                block.experts.down_proj.mul_(15)
                block.router.weight.mul_(40)
    return model


def _pair(top_k: int = 2):
    ref = _strong(tiny_hf("llama4_text", top_k=top_k))
    return ref, MoEModel(copy.deepcopy(ref))


def _x(seed: int = 6):
    return torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(seed))


def _run_block(block, x):
    """(output, router logits, input gradient) of an MoE block on ``x`` (3, 9, H), a fixed linear loss."""
    leaf = x.clone().requires_grad_(True)
    y, logits = block(leaf)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), logits.detach(), leaf.grad


def _with_deltas(theirs, ours):
    """A copy of transformers' block ``theirs`` holding fedmoe's adapters ``ours`` merged into its own weights: each
    expert's ΔW = s·B·A added to its stored (in, out) stacks, transposed, and the router's to its weight."""
    ref = copy.deepcopy(theirs)
    with torch.no_grad():
        for name, delta in ours.experts.delta_weights().items():
            getattr(ref.experts, name).add_(delta.transpose(-2, -1))
        if hasattr(ours.router, "delta_weight"):
            ref.router.weight.add_(ours.router.delta_weight())
    return ref


# ------------------------------------------------------------------------ the block, against transformers'
@pytest.mark.parametrize("grouped", [True, False])
def test_the_routed_block_equals_transformers_llama4_moe(grouped):
    """fedmoe's block (routed tokens only, their input times their sigmoid score) against transformers'
    Llama4TextMoe.forward (every token through every expert) on the same weights, at k = 2 and at k = 1 (the router's
    top_k, FLAME's k_i): outputs, router logits, input gradients; then with expert LoRA at zero, and with expert (fused
    and split) and router LoRA drawn, against transformers' block holding W + ΔW; on the grouped and per-expert
    paths."""
    import fedmoe.moe.lora as lora_mod

    if grouped and not lora_mod._HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    ref, mm = _pair()
    theirs, ours = ref.model.layers[1].feed_forward, mm.layers[0].block
    for layer in mm.layers:
        layer.block.experts.grouped = grouped
    x = _x()
    plain = {}
    for k in (2, 1):
        mm.set_top_k(k)
        theirs.router.top_k = k
        y, logits, g = _run_block(ours, x)
        want, want_logits, want_g = _run_block(theirs, x)
        plain[k] = want.reshape(y.shape)
        torch.testing.assert_close(y, plain[k], rtol=0, atol=1e-5)
        assert torch.equal(logits, want_logits)
        torch.testing.assert_close(g, want_g, rtol=0, atol=1e-5)
        assert y.abs().mean() > 0.1  # the routed experts matter
    for layout in ("fused", "split"):
        mm.add_expert_lora(RANK, ALPHA, layout=layout)
        mm.add_router_lora(RANK, ALPHA)
        for layer in mm.layers:
            layer.block.experts.grouped = grouped
        mm.set_top_k(2)
        torch.testing.assert_close(_run_block(ours, x)[0], plain[2], rtol=0, atol=1e-5)  # LoRA at zero
        randomise_(mm, scale=0.3)
        for k in (2, 1):
            mm.set_top_k(k)
            ref_block = _with_deltas(theirs, ours)
            ref_block.router.top_k = k
            y, logits, g = _run_block(ours, x)
            want, want_logits, want_g = _run_block(ref_block, x)
            torch.testing.assert_close(y, want.reshape(y.shape), rtol=0, atol=1e-4)
            torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(g, want_g, rtol=0, atol=1e-4)
            assert (y - plain[k]).abs().max() > 0.1  # the adapters matter


def test_the_router_gives_each_chosen_logit_its_sigmoid():
    """The experts receive the router's top-k experts, each weighed by the sigmoid of its own logit — no softmax, no
    renormalisation: the weights' sum varies by token and shrinks at k = 1 (renormalises_top_k false; FLAME's static
    k/k_i applies). The routing weight scales the expert's input (scales_expert_input)."""
    _, mm = _pair()
    router = mm.layers[0].router
    seen = []
    mm.layers[0].block.experts.register_forward_pre_hook(lambda m, a: seen.append((a[1], a[2])))
    x = _x().reshape(-1, 32)
    for k in (2, 1):
        mm.set_top_k(k)
        with torch.no_grad():
            mm.layers[0].block(x)
        index, weights = seen[-1]
        logits = x @ router.weight.T
        top = logits.topk(k, dim=-1)
        assert torch.equal(index, top.indices)
        torch.testing.assert_close(weights, torch.sigmoid(top.values), rtol=0, atol=1e-6)
    sums = seen[0][1].sum(-1)
    assert sums.max() - sums.min() > 0.2 and (seen[1][1].squeeze(1) < sums).all()
    assert not renormalises_top_k(mm.config) and scales_expert_input("llama4_text")
    assert not scales_expert_input("olmoe") and not mm.layers[0].form.interleaved and mm.layers[0].form.transposed


def test_the_model_equals_transformers_and_counts_k_per_token():
    """The whole model (dense layers with intermediate_size_mlp, chunked attention, a NoPE layer with temperature
    tuning, all left to transformers) gives transformers' logits with its experts made strong; the tracker counts k
    per real token in every MoE layer, each at the expert the router's top logit names (k = 1)."""
    ref, mm = _pair()
    ids, mask = token_batch()
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(mm.model(ids, attention_mask=mask).logits[real], want[real], rtol=0, atol=1e-4)
    captured = {}
    mm.layers[1].block.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach()))
    n = int(real.sum())
    for k in (2, 1):
        mm.set_top_k(k)
        mm.reset_activation_counts()
        with torch.no_grad(), mm.tracking(mask):
            mm.model(ids, attention_mask=mask)
        assert mm.activation_counts()[1].tolist() == [n, n] and mm.activation_counts()[0].sum(1).tolist() == [k * n] * 2
    counts = mm.activation_counts()[0]
    x = captured["x"].reshape(-1, 32)[real.reshape(-1)]
    top = (x @ mm.layers[1].router.weight.T).argmax(-1)
    assert counts[1].tolist() == torch.bincount(top, minlength=8).tolist()


def test_peft_reads_the_unmarked_stacks_transposed():
    """transformers' Llama4TextExperts holds (E, in, out) without ``is_transposed``: PEFT's target_parameters then
    takes each stack as (E, out, in). On the tiny model's square gate_up (H = 2I) it silently adds each expert's
    update transposed — another model than fedmoe's — and on down (I -> H) it builds A on the wrong side; marked, it
    gives fedmoe's logits. Hence a Llama-4 client with expert LoRA exports no PEFT form (the reason names --merged)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    from fedmoe.config import load_config
    from fedmoe.export import peft_blockers
    from fedmoe.moe.lora import ExpertsWithLoRA

    ref, mm = _pair()
    mm.add_expert_lora(RANK, ALPHA, targets=("gate_up_proj",))
    randomise_(mm, scale=0.3)
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = mm.model(ids).logits
    for marked in (True, False):
        base = copy.deepcopy(ref)
        for layer in mm.layers:
            base.model.layers[layer.decoder_layer].feed_forward.experts.is_transposed = marked
        peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                               target_parameters=["feed_forward.experts.gate_up_proj"]))
        wrappers = {int(n.split(".layers.")[1].split(".")[0]): m for n, m in peft.named_modules()
                    if isinstance(m, ParamWrapper)}
        for layer in mm.layers:
            ex = layer.block.experts
            pa, pb = ExpertsWithLoRA.to_peft_layout(ex.gate_up_lora_A.detach(), ex.gate_up_lora_B.detach())
            with torch.no_grad():
                wrappers[layer.decoder_layer].lora_A["default"].weight.copy_(pa)
                wrappers[layer.decoder_layer].lora_B["default"].weight.copy_(pb)
        with torch.no_grad():
            theirs = peft(input_ids=ids).logits
        if marked:
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
        else:
            assert (theirs - ours).abs().max() > 0.1
    down = get_peft_model(copy.deepcopy(ref), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                                         target_parameters=["feed_forward.experts.down_proj"]))
    A = next(m for m in down.modules() if isinstance(m, ParamWrapper)).lora_A["default"].weight
    assert A.shape == (RANK * 8, 32)  # fedmoe's down A reads I = 16 (E·r, I): PEFT's reads H
    mm.add_expert_lora(RANK, ALPHA)
    (why,) = peft_blockers(mm, load_config(None, []))
    assert "is_transposed" in why and "--merged" in why


# ------------------------------------------------------------------------ FLEx and FLAME on Llama-4
def test_flex_grafts_gated_on_their_input():
    """A Llama-4 graft computes G(σ(g(x))·x) (gate_on: auto = input where the family scales its experts' input): by
    hand in transformers' (in, out) layout with its LoRA ΔW, and, at its start (LoRA B zero, gate = the router row of
    its expert), the very output transformers' block gives a token routed to that expert alone (k = 1); gate_on:
    output gives σ(g(x))·G(x); another family's auto is output. The expert scores are finite and the same twice."""
    from fedmoe.algorithms.flex import GraftedExperts, score_experts

    ref, mm = _pair()
    layer = mm.layers[0]
    graft = GraftedExperts(layer, rank=RANK, alpha=ALPHA)
    assert graft.gate_input and not GraftedExperts(MoEModel(tiny_hf("olmoe")).layers[0]).gate_input
    graft.init_from([3])
    x = _x().reshape(-1, 32)
    theirs = ref.model.layers[1].feed_forward
    theirs.router.top_k = 1
    with torch.no_grad():
        routed = theirs(x)[0] - theirs.shared_expert(x)
        to_3 = (x @ layer.router.weight.T).argmax(-1) == 3
        assert to_3.sum() >= 3
        torch.testing.assert_close(graft(x)[to_3], routed[to_3], rtol=0, atol=1e-5)
    randomise_(mm, scale=0.3)  # no trainables in mm itself: the graft's own below
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in graft.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    s = ALPHA / RANK
    W_gu = layer.experts.gate_up_proj[3] + s * (graft.gate_up_lora_B[0] @ graft.gate_up_lora_A[0]).T
    W_d = layer.experts.down_proj[3] + s * (graft.down_lora_B[0] @ graft.down_lora_A[0]).T
    gate = torch.sigmoid(x @ graft.gate[0])[:, None]

    def expert(a):
        gu = a @ W_gu
        return (F.silu(gu[:, :16]) * gu[:, 16:]) @ W_d

    with torch.no_grad():
        torch.testing.assert_close(graft(x), expert(gate * x), rtol=0, atol=1e-5)
        graft.gate_input = False  # gate_on: output
        torch.testing.assert_close(graft(x), gate * expert(x), rtol=0, atol=1e-5)
    batches = [dict(zip(("input_ids", "attention_mask"), token_batch(seed=s))) for s in (1, 2)]
    chosen, scores = score_experts(mm, batches)
    again = score_experts(mm, batches)
    assert torch.isfinite(scores).all() and chosen == again[0] and torch.equal(scores, again[1])
    assert chosen == [[int(scores[i].argmin())] for i in range(2)]


def test_flame_k_i_and_the_rescaler_on_the_routed_output():
    """FLAME's rescaler multiplies the routed output, not the shared expert's (fedmoe's reading of the paper's
    h = s_i · Σ p_j E_j(x) for a family whose weights scale the input); with weights that are not renormalised the
    static k/k_i is allowed at k_i = 1; on a top-1 model (Scout, Maverick) every client runs k = 1, the static ratio
    is 1, and a k_i of 2 is refused naming the key."""
    from fedmoe.algorithms import get_method
    from fedmoe.algorithms.base import check_top_k
    from fedmoe.config import load_config

    ref, mm = _pair()
    theirs, ours = ref.model.layers[1].feed_forward, mm.layers[0].block
    mm.add_output_scale(2.5)
    x = _x().reshape(-1, 32)
    with torch.no_grad():
        shared = theirs.shared_expert(x)
        torch.testing.assert_close(ours(x)[0], shared + 2.5 * (theirs(x)[0] - shared), rtol=0, atol=1e-5)
    flame = get_method("flame").client
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.flame.rescaler=static", "algorithm.budgets.top_k=[2,1]",
                             "data.partition.num_clients=2"])
    client = flame(cfg)
    check_top_k(client, mm, 2)  # not renormalised: static k/k_i allowed
    assert [client.top_k(c, mm) for c in (0, 1)] == [2, 1] and client._ratio(1, mm) == 2.0
    top1 = MoEModel(tiny_hf("llama4_text", top_k=1))
    default = flame(load_config(None, ["algorithm.name=flame", "algorithm.flame.rescaler=static"]))
    check_top_k(default, top1, 3)
    assert {default.top_k(c, top1) for c in range(3)} == {1} and default._ratio(0, top1) == 1.0
    with pytest.raises(ValueError, match=r"algorithm.budgets.top_k has \[2\]"):
        flame(cfg).top_k(0, top1)
    with pytest.raises(TopKError, match=r"algorithm.client_top_k.*use 1..1"):
        check_top_k(flame(load_config(None, ["algorithm.name=flame", "algorithm.client_top_k=[1,2]",
                                             "data.partition.num_clients=2"])), top1, 2)


def test_aux_loss_is_refused_by_name():
    from fedmoe.moe.loss import load_balancing_loss, no_aux_loss

    assert load_balancing_loss(tiny_config("llama4_text")) is None
    assert "train.aux_loss: false" in no_aux_loss("llama4_text") and "Llama-4" in no_aux_loss("llama4_text")


# ------------------------------------------------------------------------ the published sizes
def test_published_sizes_of_scout_and_maverick():
    """Meta's cards: Scout 109B total / 17B active, Maverick 400B / 17B. From their config.json (benchmarks/
    model-configs) fedmoe counts the language model it loads: Scout 107.77B / 17.17B, Maverick 400.71B / 17.18B, equal
    to the meta model and to a hand count; the vision tower and projector (0.87B, the vision-language model on the
    meta device) make the whole checkpoint 108.64B and 401.58B: the cards' 109B and (their round) 400B."""
    from transformers import AutoConfig, AutoModelForCausalLM, Llama4ForConditionalGeneration

    H, I, I_mlp, V, L = 5120, 8192, 16384, 202048, 48
    attention = 2 * H * 40 * 128 + 2 * H * 8 * 128  # q, o; k, v (no biases; the L2 q/k norm has no weights)
    ffn = 3 * H * I
    for name, E, sparse, total, active in (
            ("meta-llama--Llama-4-Scout-17B-16E.json", 16, 48, 107_769_861_120, 17_172_894_720),
            ("meta-llama--Llama-4-Maverick-17B-128E.json", 128, 24, 400_711_848_960, 17_184_691_200)):
        path = CONFIGS / name
        config = load_model_config(str(path))
        assert config.model_type == "llama4_text" and vision_language_type(str(path)) == "llama4"
        r = count_flops(config, 128)
        with torch.device("meta"):
            text = AutoModelForCausalLM.from_config(config)
            d = json.loads(path.read_text())
            d.pop("model_type")
            whole = Llama4ForConditionalGeneration(AutoConfig.for_model("llama4", **d))
        n_text = sum(p.numel() for p in text.parameters())
        assert r["total_params"] == n_text == total and r["active_params"] == active
        dense = L - sparse
        # per MoE layer: E experts, the router, the shared expert; per dense layer a wider MLP; two norms a layer
        assert total == sparse * (E * ffn + E * H + ffn) + dense * 3 * H * I_mlp + L * (attention + 2 * H) + 2 * V * H + H
        assert active == total - sparse * (E - 1) * ffn
        assert sum(p.numel() for p in whole.parameters()) - n_text == 871_932_416
        assert round(active / 1e9) == 17 and round((n_text + 871_932_416) / 1e9) == (109 if E == 16 else 402)
        assert r["flops_by_part"]["dense_mlp"] == 2 * 128 * 3 * H * I_mlp * dense
        assert r["flops_by_part"]["shared_experts"] == 2 * 128 * ffn * sparse


# ------------------------------------------------------------------------ a vision-language checkpoint
def _vision_language_folder(tmp_path):
    """A tiny Llama4ForConditionalGeneration saved by transformers (the hub's layout: language_model.model.*,
    language_model.lm_head, vision_model.*, multi_modal_projector.*), its text config the tiny Llama-4's with the
    built-in tokenizer's vocabulary, its config.json holding attn_temperature_tuning: 4 as transformers 4.51 saved
    it, the tokenizer beside it. Returns (folder, the model)."""
    from transformers import AutoTokenizer, Llama4Config, Llama4ForConditionalGeneration

    from fedmoe.moe.model import builtin_model_path

    text = tiny_config("llama4_text", vocab_size=8192).to_dict()
    text.update(pad_token_id=1, eos_token_id=0)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    model = _strong(Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval())
    folder = tmp_path / "scout-like"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin_model_path("builtin:tiny-moe")).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["attn_temperature_tuning"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


def test_a_vision_language_checkpoint_loads_its_language_model_and_exports_merged(tmp_path):
    """transformers 5.23 refuses the config as saved (attn_temperature_tuning: 4, a number in 4.51); fedmoe reads it
    as 4.51 did (a quantized checkpoint's quantization_config carried to the text config, as AutoModelForCausalLM
    carries it) and loads the language model (Llama4ForCausalLM, the weights under language_model.*), nothing of the
    vision tower: its logits are the vision-language model's on text; the tokenizer loads; the FLOPs count is of that
    model. A client's model (split expert LoRA, router LoRA, a rescaler, k = 1) exports merged: a plain Llama-4
    language model that gives its logits (no vision tower, which the export's notes say), and no vllm form."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmoe.export import export_notes, vllm_blockers, write_merged

    folder, whole = _vision_language_folder(tmp_path)
    with pytest.raises(StrictDataclassError, match="attn_temperature_tuning"):
        AutoConfig.from_pretrained(folder)
    config = load_model_config(str(folder))
    assert config.model_type == "llama4_text" and config.attn_temperature_tuning is True
    assert vision_language_type(str(folder)) == "llama4" and vision_language_type("builtin:tiny-moe") is None
    quantized = tmp_path / "fp8" / "config.json"  # a quantized checkpoint's: its text config carries it, as transformers'
    quantized.parent.mkdir()
    quantized.write_text(json.dumps(dict(json.loads((folder / "config.json").read_text()),
                                         quantization_config={"quant_method": "fbgemm_fp8"})))
    assert load_model_config(str(quantized)).quantization_config == {"quant_method": "fbgemm_fp8"}
    mm = MoEModel.from_pretrained(str(folder))
    assert type(mm.model).__name__ == "Llama4ForCausalLM" and mm.model.config.attn_temperature_tuning is True
    assert not [n for n, _ in mm.model.named_parameters() if "vision" in n or "projector" in n]
    assert count_flops(config, 8)["total_params"] == sum(p.numel() for p in mm.model.parameters())
    ids = torch.randint(2, 8000, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = whole(input_ids=ids).logits
        torch.testing.assert_close(mm.model(ids).logits, want, rtol=0, atol=1e-5)
    assert load_tokenizer(str(folder))("hello")["input_ids"]

    client = loaded_model(folder, layout="split", router=True, scale=0.7, top_k=1)
    client.mm.tracker.skip_padding = False
    write_merged(client, tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(merged).__name__ == "Llama4ForCausalLM" and merged.config.num_experts_per_tok == 1
    with torch.no_grad():
        ours = client.mm.model(ids).logits
        torch.testing.assert_close(merged(ids).logits, ours, rtol=0, atol=5e-5)
        assert (ours - want).abs().max() > 0.1  # the adapters and k = 1 matter
    notes = export_notes(client.cfg, "merged", client.mm)
    assert any("vision-language checkpoint (llama4)" in n and "not images" in n for n in notes)
    assert any("--merged" in w and "get_expert_mapping" in w for w in vllm_blockers(client.mm, client.cfg))
    # an attention-only client has a PEFT form: written (PEFT's embedding check would re-read the stored config with
    # transformers' strict reader, which refuses it), and applied to the base read with fedmoe's config it gives the
    # client's logits; the note says to read the base that way
    import peft

    from fedmoe.export import LoadedModel, write_peft

    attention = MoEModel.from_pretrained(str(folder))
    attention.add_attention_lora(4, 8.0)
    randomise_(attention, scale=0.1)
    attention.model.eval()
    write_peft(LoadedModel(client.cfg, attention, None, client.message, {}, "a test's model"), tmp_path / "p")
    base = AutoModelForCausalLM.from_pretrained(folder, config=load_model_config(str(folder)))
    applied = peft.PeftModel.from_pretrained(base, tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, attention.model(ids).logits, rtol=0, atol=1e-5)
    peft_notes = export_notes(client.cfg, "peft", attention)
    assert any("attn_temperature_tuning" in n and "config=fedmoe.moe.model.load_model_config(base)" in n
               for n in peft_notes)
    assert not any("attn_temperature_tuning" in n for n in notes)  # said of the PEFT form, which loads the base
    # a checkpoint stored quantized (here FP8) is refused before transformers builds other expert modules from it
    (tmp_path / "fp8" / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="stored quantized .*fbgemm_fp8.*model.quantization"):
        MoEModel.from_pretrained(str(tmp_path / "fp8"))


def test_a_federated_run_on_the_checkpoint_resumes_exactly(tmp_path):
    """FLAME (clients at k_i = 2 and 1, their learned rescalers, activation-aware aggregation) for two rounds on the
    vision-language checkpoint: finite; stopped after round 1 and resumed, the same losses and expert counts as
    uninterrupted (each MoE layer of a client counts the same tokens)."""
    folder, _ = _vision_language_folder(tmp_path)
    sets = ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", f"model.name={folder}", "data.max_examples=60",
            "data.max_length=24", "data.partition.num_clients=2", "train.max_steps=2", "train.batch_size=2",
            "federation.rounds=2", "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=1",
            "lora.rank=2"]
    whole, resumed, _ = whole_and_resumed(tmp_path, sets)
    assert [c["k"] for c in whole["clients"]] == [2, 1]
    for a, b in zip(whole["clients"], resumed["clients"]):
        assert a["expert_activation"] == b["expert_activation"]
        sums = {sum(row) for row in a["expert_activation"]}
        assert len(sums) == 1 and sums.pop() % a["k"] == 0
