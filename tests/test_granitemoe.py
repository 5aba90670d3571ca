"""Granite-MoE (``granitemoe``): what is particular to it, each part against transformers' own forward, PEFT or a
hand computation (the arch-parametrized tests run it through discovery, expert and router LoRA, counts, FLOPs and
parameters against FlopCounterMode and the meta model, quantization and a federated round with its exports):

* its MoE block is the decoder layer's ``block_sparse_moe``, its router ``block_sparse_moe.router`` (softmax over the
  top-k logits): the adapters are named there, and the PEFT export's ``target_parameters`` too;
* its scalar multipliers (the embeddings × 12, each residual branch × 0.22, the attention scores × 1/head_dim, the
  logits ÷ 6 in granite-3.1-1b-a400m): fedmoe's training and evaluation loss and its choice scores run the decoder
  and the LM head apart, and must divide by ``logits_scaling`` as the model's forward does;
* the hub checkpoints' layout (``input_linear``, ``output_linear``, ``router.layer``) loaded into the fused stacks;
* exports: a PEFT adapter PEFT loads to fedmoe's logits, a merged model with every kind of adapter, and the vllm
  form refused naming --merged (vLLM's GraniteMoeForCausalLM takes no LoRA: fedmoe.export.VLLM_NO_LORA);
* FLAME (a k_i = 1 client, Granite's load-balancing loss) and FLEx (on an NF4 base) through a federated round.
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


def test_loss_and_choice_scores_take_the_scaled_logits():
    """The tiny Granite-MoE scales as granite-3.1-1b-a400m does; fedmoe's labelled-token loss (training, evaluation)
    equals transformers' own loss of the model's forward (logits / logits_scaling), and the prompt-once choice
    scorer equals the reference scorer, which reads the forward's logits."""
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.moe.loss import labelled_token_loss

    ref = tiny_hf("granitemoe")
    c = ref.config
    assert (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling) == (
        12.0, 0.22, 0.125, 6.0)
    mm = MoEModel(copy.deepcopy(ref))
    mm.add_expert_lora(RANK, ALPHA)
    mm.add_attention_lora(RANK, ALPHA)  # B = 0: the model is transformers' own
    ids, mask = token_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, labels=labels).loss
        loss_sum, n, _ = labelled_token_loss(mm.model, ids, mask, labels)
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-6, atol=0)
    prompts = [[5, 17, 30, 42, 7], [8, 8, 15], [9, 4, 4, 5, 6, 61, 2]]
    options = [[[3, 4], [9]], [[11, 12, 13], [14]], [[7], [70, 71]]]
    cached = option_logprobs(mm.model, prompts, options)
    reference = option_logprobs(mm.model, prompts, options, reference=True)
    for a, b in zip(cached, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_hub_layout_loads_into_the_fused_stacks(tmp_path):
    """The hub's Granite checkpoints hold input_linear (E, 2I, H), output_linear (E, H, I) and router.layer; transformers
    writes a model in that layout and converts it on loading, which MoEModel.from_pretrained goes through (every test
    of a saved tiny Granite-MoE loads it so): the stacks and the router are the model's own."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = hf_folder(tmp_path, "granitemoe")
    keys = set(load_file(str(folder / "model.safetensors")))
    for name in ("input_linear.weight", "output_linear.weight", "router.layer.weight"):
        assert f"model.layers.1.block_sparse_moe.{name}" in keys
    assert not any("experts.gate_up_proj" in k for k in keys)
    mm = MoEModel.from_pretrained(str(folder))
    ref = AutoModelForCausalLM.from_pretrained(folder)
    for layer in mm.layers:
        block = ref.model.layers[layer.decoder_layer].block_sparse_moe
        assert torch.equal(layer.experts.gate_up_proj, block.experts.gate_up_proj)
        assert torch.equal(layer.experts.down_proj, block.experts.down_proj)
        assert torch.equal(layer.router.weight, block.router.weight)
    assert mm.layers[0].block_attr == "block_sparse_moe" and mm.layers[0].router_attr == "router"


def test_peft_merged_and_vllm_exports(tmp_path):
    """PEFT: target_parameters under block_sparse_moe.experts, loaded by PEFT onto transformers' model to fedmoe's
    logits. Merged (split expert LoRA, router LoRA into block_sparse_moe.router, a rescaler into down_proj, k_i = 1):
    transformers' reload gives fedmoe's logits. vllm: refused, naming --merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedmoe.export import export_notes, vllm_blockers, write_merged, write_peft

    folder = hf_folder(tmp_path, "granitemoe")
    loaded = loaded_model(folder)
    loaded.mm.tracker.skip_padding = False
    write_peft(loaded, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["block_sparse_moe.experts.down_proj", "block_sparse_moe.experts.gate_up_proj"]
    with torch.no_grad():
        ours = loaded.mm.model(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert (plain(IDS).logits - ours).abs().max() > 1e-3  # the adapters matter
        peft = PeftModel.from_pretrained(plain, tmp_path / "a")
        torch.testing.assert_close(peft(IDS).logits, ours, rtol=0, atol=2e-5)
    why = vllm_blockers(loaded.mm, loaded.cfg)
    assert len(why) == 1 and "--merged" in why[0] and "GraniteMoeForCausalLM" in why[0]
    assert any("--merged" in n for n in export_notes(loaded.cfg, "peft", loaded.mm))
    assert not any("vLLM" in n for n in export_notes(loaded.cfg, "merged", loaded.mm))
    full = loaded_model(folder, layout="split", router=True, scale=0.7, top_k=1)
    full.mm.tracker.skip_padding = False
    write_merged(full, tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.config.num_experts_per_tok == 1
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, full.mm.model(IDS).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", [
    ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]", "train.aux_loss=true"],
    ["algorithm.name=flex", "lora.experts=false", "algorithm.flex.calibration_size=4", "model.quantization=nf4"],
], ids=["flame", "flex"])
def test_federated_rounds(tmp_path, method):
    """One federated round of FLAME (a k_i = 1 client, Granite's own load-balancing loss on) and FLEx (grafts on an
    NF4 base) on a tiny Granite-MoE: finite losses; FLAME's k = 1 client's merged export gives the logits fedmoe
    evaluates it with; FLEx grafts an expert per MoE layer."""
    from transformers import AutoModelForCausalLM

    from fedmoe.export import export_model, load_run_model

    _, rd = one_small_round(hf_folder(tmp_path, "granitemoe"), tmp_path, *method)
    if method[0] == "algorithm.name=flame":
        loaded = load_run_model(rd.path, 1)
        assert loaded.mm.top_k == 1
        assert export_model(rd.path, tmp_path / "m", client=1, merged=True) == ("merged", [])
        with torch.no_grad():
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(IDS).logits,
                                       loaded.mm.model(IDS).logits, rtol=0, atol=2e-4)
    else:
        ck = torch.load(rd.checkpoint_dir / "state.pt", weights_only=False)
        assert ck["transport"]["private"][0]["graft_index"].shape == (2, 1)


def test_the_router_is_softmax_over_the_top_k_logits():
    """Granite's router (block_sparse_moe.router) takes the top-k logits and their softmax (not the top-k of a softmax
    over all experts, as OLMoE's): with router LoRA, by hand on the adapted weight."""
    mm = MoEModel(tiny_hf("granitemoe"))
    mm.add_router_lora(RANK, ALPHA)
    randomise_(mm, scale=0.5)
    router = mm.layers[0].block.router
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, weights, index = router(x)
        top, want_index = (x @ router.weight.T).topk(2, dim=-1)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1), rtol=0, atol=1e-6)
    assert "model.layers.0.block_sparse_moe.router.lora_A" in mm.trainable_names()
