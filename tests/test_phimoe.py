"""Phi-3.5-MoE (``phimoe``): what is particular to it, each part against transformers' own forward or a hand
computation (the arch-parametrized tests run it through discovery, expert and router LoRA, counts, FLOPs and
parameters against FlopCounterMode and the meta model, and a federated round with its exports):

* its router (``mlp.router``, transformers' ``PhimoeTopKRouter``) chooses by sparsemixer: two selections in turn,
  each weighed by a softmax over the logits near its own (within a relative 2·router_jitter_noise), whatever its
  ``top_k``. fedmoe's k = 1 (FLAME's k_i) keeps the first selection: checked by hand, in eval and in training;
* training-time randomness (the block input times uniform jitter, sparsemixer's Gumbel choice among near logits and
  its random midpoint mask): fedmoe's block equals transformers' in training given the same random stream, outputs
  and gradients, and a local training run gives the same numbers twice;
* a k = 1 client has no merged form (a plain model routes to two), and vLLM takes no expert LoRA for it.
"""

import copy

import pytest
import torch
from helpers import hf_folder, loaded_model, randomise_, tiny_hf

from fedmoe.moe import MoEModel, UnsupportedModelError
from fedmoe.moe.arch import renormalises_top_k
from fedmoe.moe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 8.0


def _by_hand(logits: torch.Tensor, eps: float):
    """sparsemixer's choice in eval mode, written out: the largest logit m, weighed by the softmax over the logits s
    with (m - s) / max(|s|, m) <= 2·eps at it; then the same among the logits left, the threshold measured against
    the second largest. Returns (weights (T, 2), experts (T, 2))."""
    weights, experts = [], []
    left = logits.clone()
    for _ in range(2):
        top, idx = left.max(dim=-1, keepdim=True)
        near = (top - logits) / logits.abs().clamp(min=top) <= 2 * eps
        near &= left > float("-inf")  # an expert already chosen is out
        w = torch.softmax(logits.masked_fill(~near, float("-inf")), dim=-1).gather(-1, idx)
        weights.append(w)
        experts.append(idx)
        left = left.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, -1), torch.cat(experts, -1)


def test_sparsemixer_routes_two_whatever_top_k_and_fedmoe_k1_is_its_first_choice():
    """transformers' router at top_k = 1 still returns two experts (hence fedmoe's own k = 1); both selections and
    their weights by hand, with router LoRA on the adapted weight; at k = 1 the experts receive the first one. The
    weights are not renormalised (their sum varies by token, each about 1): renormalises_top_k is false."""
    ref = tiny_hf("phimoe")
    mm = MoEModel(copy.deepcopy(ref))
    plain = ref.model.layers[0].mlp.router
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    plain.top_k = 1
    with torch.no_grad():
        assert plain(x)[2].shape == (64, 2)  # transformers reads no top_k
    mm.add_router_lora(RANK, ALPHA)
    randomise_(mm, scale=0.5)
    router = mm.layers[0].block.router
    eps = mm.config.router_jitter_noise
    with torch.no_grad():
        logits, weights, experts = router(x)
        want_w, want_e = _by_hand(x @ router.weight.T, eps)
        assert torch.equal(experts, want_e)
        torch.testing.assert_close(weights, want_w, rtol=0, atol=1e-6)
        assert (weights < 0.999).any(dim=0).all() and (weights == 1).any()  # near logits shared, and not
        sums = weights.sum(-1)
        assert sums.max() - sums.min() > 0.1 and not renormalises_top_k(mm.config)
        mm.set_top_k(1)
        _, w1, e1 = router(x)
    assert torch.equal(e1, want_e[:, :1]) and torch.equal(w1, weights[:, :1])
    # the experts receive the first choice alone: the model's activation counts say one expert per token
    seen = []
    mm.layers[0].block.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].shape[-1]))
    with torch.no_grad():
        mm.model(torch.randint(2, 100, (2, 7)))
    assert seen == [1]


def test_a_config_that_does_not_route_to_two_is_refused():
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok: 2"):
        MoEModel(tiny_hf("phimoe", top_k=3))


@pytest.mark.parametrize("k", [2, 1])
def test_the_block_in_training_equals_transformers_given_the_same_random_stream(k):
    """In training the block multiplies its input by U(1 - j, 1 + j) (and the router again, in place: the experts
    see both), and sparsemixer draws its choice (Gumbel) and a midpoint mask. With the random stream seeded alike,
    fedmoe's block (its own expert path, zero-init expert and router LoRA: the router's in-place jitter must reach
    the experts through RouterWithLoRA too) gives transformers' output and input gradient exactly; at k = 1 transformers' experts given the first choice alone. Another seed gives other numbers (the
    randomness is there); eval mode gives transformers' eval output."""
    ref = tiny_hf("phimoe").train()
    mm = MoEModel(copy.deepcopy(ref))
    mm.add_expert_lora(RANK, ALPHA)
    mm.add_router_lora(RANK, ALPHA)
    mm.model.train()
    mm.set_top_k(k)
    ours, theirs = mm.layers[0].block, ref.model.layers[0].mlp
    x0 = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(6)) * 4

    def run(block, seed, grad=True):
        leaf = x0.clone().requires_grad_(grad)
        seen = {}
        hook = theirs.experts.register_forward_pre_hook(lambda m, a: seen.update(args=a))
        torch.manual_seed(seed)
        y = block(leaf * 1.0)  # the jitter is in place: on a copy, as the layer norm's output is
        hook.remove()
        if grad:
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), (leaf.grad if grad else None), seen

    y, g, _ = run(ours, 3)
    if k == 2:
        want, want_g, _ = run(theirs, 3)
    else:  # transformers' own experts on its jittered input, given the first choice alone
        _, _, seen = run(theirs, 3, grad=False)
        h, index, weights = seen["args"]
        want = theirs.experts(h, index[:, :1], weights[:, :1]).reshape(y.shape).detach()
        want_g = None
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    if want_g is not None:
        torch.testing.assert_close(g, want_g, rtol=0, atol=1e-6)
    assert (run(ours, 4)[0] - y).abs().max() > 1e-3
    mm.model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x0.clone()), theirs.experts(*_eval_route(theirs, x0, k)).reshape(x0.shape),
                                   rtol=0, atol=1e-6)


def _eval_route(block, x, k):
    h = x.reshape(-1, x.shape[-1])
    _, weights, index = block.router(h.clone())
    return h, index[:, :k], weights[:, :k]


def test_local_training_gives_the_same_numbers_twice():
    """A local run in training mode (jitter and sparsemixer's draws on, k = 1 and k = 2) on the CPU: the same seed
    gives the same losses, trained tensors and activation counts (k per token); another seed other ones; activation
    checkpointing (the layers recomputed in the backward, their random draws replayed) the same ones."""
    from fedmoe.config import TrainConfig
    from fedmoe.train import train_local

    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
                for ids in (torch.randint(2, 120, (10,), generator=g).tolist() for _ in range(8))]
    cfg = TrainConfig(batch_size=2, max_steps=3, lr=0.05)

    def run(seed, k, cfg=cfg):
        mm = MoEModel(tiny_hf("phimoe"))
        torch.manual_seed(0)
        mm.add_expert_lora(RANK, ALPHA)
        mm.add_router_lora(RANK, ALPHA)
        mm.set_top_k(k)
        result = train_local(mm, examples, cfg, pad_id=0, lr=0.05, seed=seed)
        assert result.activation_counts.sum(dim=1).tolist() == (k * result.tokens_per_layer).tolist()
        return result.loss, mm.get_state(), result.activation_counts

    def same(a, b):
        return a[0] == b[0] and all(torch.equal(a[1][n], b[1][n]) for n in a[1]) and torch.equal(a[2], b[2])

    for k in (1, 2):
        a = run(7, k)
        assert same(a, run(7, k)) and run(8, k)[0] != a[0]
    assert same(a, run(7, 2, cfg.model_copy(update={"activation_checkpointing": True})))


def test_a_k1_client_has_no_merged_form(tmp_path):
    """A plain Phi-3.5-MoE routes to two experts whatever num_experts_per_tok says, so a k = 1 client's model is not
    written merged, nor as a PEFT or vllm adapter (why names sparsemixer); at k = 2 it is, to fedmoe's logits."""
    from transformers import AutoModelForCausalLM

    from fedmoe.export import merge_blockers, vllm_blockers, write_merged

    folder = hf_folder(tmp_path, "phimoe")
    one = loaded_model(folder, router=True, top_k=1)
    (why,) = merge_blockers(one.mm)
    assert "sparsemixer" in why and "k = 1" in why
    full = loaded_model(folder, layout="split", router=True, scale=0.7)
    assert merge_blockers(full.mm) == []
    full.mm.tracker.skip_padding = False
    write_merged(full, tmp_path / "m")
    ids = torch.randint(2, 8000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits,
                                   full.mm.model(ids).logits, rtol=0, atol=2e-5)
    assert any("sparsemixer" in w for w in vllm_blockers(one.mm, one.cfg))


def test_tiny_config_is_phi_3_5_moe_shaped():
    config = tiny_config("phimoe")
    assert config.attention_bias and config.lm_head_bias and config.num_experts_per_tok == 2
