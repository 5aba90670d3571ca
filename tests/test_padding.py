"""Padding never reaches the experts (``model.skip_padding``): with it on, the routed experts and
FLEx's grafted experts run only the rows the attention mask keeps, and every real token's output is
the one it had with padding run through (up to float rounding), for right padding, left-padded
generation and the key/value-cached continuation of the option scorer."""

import pytest
import torch

from fedmoe.algorithms.flex import GraftedExperts
from fedmoe.moe.model import MoEModel
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, grafts: bool = False) -> MoEModel:
    mm = MoEModel(tiny_hf(arch))
    mm.add_expert_lora(4, 8.0)
    mm.add_attention_lora(4, 8.0)
    if grafts:
        mods = mm.attach_to_blocks("grafted", lambda layer: GraftedExperts(layer, 1, 4, 8.0))
        for m in mods:
            m.init_from([1])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return mm


def _batch(V: int):
    g = torch.Generator().manual_seed(2)
    lens = [13, 6, 9, 2]
    ids = torch.randint(3, V, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lens):
        mask[row, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def _run(mm, skip: bool, ids, mask, labels):
    """(logits, loss sum, gradients, activation counts, rows that reached each layer's experts)."""
    mm.tracker.skip_padding = skip
    rows: list[int] = []
    params = mm.trainable_parameters()
    for p in params.values():
        p.grad = None
    mm.reset_activation_counts()
    orig = type(mm.layers[0].block.experts)._experts_grouped

    def counting(self, x, counts):
        rows.append(x.shape[0])
        return orig(self, x, counts)

    type(mm.layers[0].block.experts)._experts_grouped = counting
    try:
        with mm.tracking(mask):
            out = mm.model(input_ids=ids, attention_mask=mask)
        logits = out.logits
        keep = labels[:, 1:] != -100
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum")
        loss.backward()
    finally:
        type(mm.layers[0].block.experts)._experts_grouped = orig
    grads = {k: p.grad.clone() for k, p in params.items()}
    return logits.detach(), float(loss.detach()), grads, mm.activation_counts(), rows


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("grafts", [False, True], ids=["experts", "flex-grafts"])
def test_real_tokens_unchanged_and_padding_not_routed(arch, grafts):
    mm = _model(arch, grafts)
    mm.model.train()
    ids, mask, labels = _batch(mm.config.vocab_size)
    on = _run(mm, True, ids, mask, labels)
    off = _run(mm, False, ids, mask, labels)
    real = mask.bool()
    # the same up to float rounding (the matmuls run over fewer rows; on the built-in model's shapes
    # the forward is bit for bit the same: benchmarks/skip_padding.py)
    torch.testing.assert_close(on[0][real], off[0][real], rtol=1e-5, atol=1e-6)
    assert on[1] == pytest.approx(off[1], rel=1e-6)
    for k in off[2]:
        torch.testing.assert_close(on[2][k], off[2][k], rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in on[2].values())
    assert torch.equal(on[3][0], off[3][0]) and torch.equal(on[3][1], off[3][1])  # activation counts
    k = mm.top_k
    n_real, n_all = int(mask.sum()), mask.numel()
    assert on[4] == [n_real * k] * len(mm.layers)  # every expert slot routed belongs to a real token
    assert off[4] == [n_all * k] * len(mm.layers)


def test_pad_rows_get_no_expert_output():
    mm = _model("olmoe")
    ids, mask, _ = _batch(mm.config.vocab_size)
    outs = []
    hook = mm.layers[0].block.experts.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        mm.model(input_ids=ids, attention_mask=mask)
    hook.remove()
    flat_mask = mask.reshape(-1).bool()
    assert float(outs[0][~flat_mask].abs().max()) == 0.0
    assert float(outs[0][flat_mask].abs().min(dim=-1).values.max()) > 0


def test_left_padded_generation_and_cached_continuation_unchanged():
    """Greedy generation with left padding (the decode steps pass one new token over a cache: the mask's
    last column) and the option scorer's cached continuation give the same tokens and scores with
    padding skipped as without."""
    from fedmoe.eval.choice import option_logprobs
    from fedmoe.eval.generate import greedy_generate

    mm = _model("olmoe", grafts=True)
    V = mm.config.vocab_size
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (9, 3, 6)]
    options = [[torch.randint(3, V, (n,), generator=g).tolist() for n in (1, 3, 4)] for _ in prompts]
    got = {}
    for skip in (True, False):
        mm.tracker.skip_padding = skip
        gen = greedy_generate(mm.model, prompts, 0, 1, 6, 3, "cpu")
        scores = option_logprobs(mm, prompts, options, batch_size=3)
        got[skip] = (gen, scores)
    assert got[True][0] == got[False][0]
    for a, b in zip(got[True][1], got[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_rows_are_the_query_positions_of_the_mask():
    """The tracker's rows for a forward of ``q`` new tokens per sequence are the mask's last ``q`` columns."""
    from fedmoe.moe.lora import ActivationTracker

    t = ActivationTracker(1, 4)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    t.set_forward_mask(mask)
    assert t.real_rows(8).tolist() == [1, 2, 3, 4, 5]       # every position
    assert t.real_rows(2).tolist() == [0]                   # one new token each: the last column
    assert t.real_rows(4).tolist() == [0, 1]                # two new tokens each
    assert t.real_rows(6).tolist() == [0, 1, 2, 3]          # three new tokens each
    assert t.real_rows(5) is None and t.real_rows(10) is None  # not this mask's rows: all of them
    t.set_forward_mask(torch.ones(2, 4, dtype=torch.long))
    assert t.real_rows(8) is None                           # nothing to skip
    t.skip_padding = False
    t.set_forward_mask(mask)
    assert t.real_rows(8) is None
