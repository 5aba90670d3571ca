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


def test_grouping_by_length_keeps_every_example_once_and_cuts_the_padding():
    """train.group_by_length on the shipped Dolly data tokenised as the default run does: each pass still
    yields every example exactly once in a seeded order, its batches are those of the chunks of 50 batches
    sorted longest first, in shuffled order (a round shorter than a pass is not biased to long examples: its
    first 20 batches are as long on average as any), and the padded share of the token slots falls from
    about a third to a few percent."""
    from fedmoe.config import load_config
    from fedmoe.data import prepare_federated_data
    from fedmoe.federation.clients import client_set
    from fedmoe.moe import load_tokenizer
    from fedmoe.train import _steps

    def _batches(n, bs, generator, lengths=None):  # one micro-batch a step (the default run's accumulation of 1)
        return (batch for [batch] in _steps(n, bs, 1, generator, lengths))

    cfg = load_config(None, [])
    data = prepare_federated_data(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    train = client_set(data.clients[0], tok, cfg.data.max_length, 1).train
    lengths = [len(ex["input_ids"]) for ex in train]
    bs, n = cfg.train.batch_size, len(lengths)
    passes = (n + bs - 1) // bs

    def padded_share(batches):
        slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / slots

    plain = _batches(n, bs, torch.Generator().manual_seed(0))
    grouped = _batches(n, bs, torch.Generator().manual_seed(0), lengths)
    first = [next(grouped) for _ in range(passes)]
    assert sorted(i for b in first for i in b) == list(range(n))
    mean = sum(lengths) / n
    early = [lengths[i] for b in first[:20] for i in b]  # a default round: 20 steps
    assert abs(sum(early) / len(early) - mean) < 0.2 * mean, (sum(early) / len(early), mean)
    again = _batches(n, bs, torch.Generator().manual_seed(0), lengths)
    assert [next(again) for _ in range(passes)] == first  # seeded
    before, after = padded_share([next(plain) for _ in range(passes)]), padded_share(first)
    assert before > 0.25 and after < before / 3, (before, after)


def test_scaling_the_rank_r_intermediate_gives_the_scaled_output():
    """lora_delta scales A x (r values per row) instead of B A x (out values): the same result to float
    rounding."""
    from fedmoe.moe.lora import lora_delta

    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(7, 32, generator=g), torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    torch.testing.assert_close(lora_delta(x, A, B, 2.5), (x @ A.T @ B.T) * 2.5, rtol=1e-5, atol=1e-5)
