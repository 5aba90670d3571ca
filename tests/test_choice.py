"""The option scorer of ``eval.task: choice`` and MMLU: a hand computation on a toy model whose
log-probabilities are known, the prompt-once (cached) path against one full sequence per option on
real tiny MoE models, and MMLU's numbers as they were before the scorer was shared."""

import math

import pytest
import torch

from fedmoe.eval.choice import choose, confusion_matrix, option_logprobs
from fedmoe.moe.arch import HYBRID_ARCHITECTURES, SUPPORTED_ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(torch.nn.Module):
    """logits at position t = W[token_t]: log P(next | prefix) depends on the last token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.W = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return torch.nn.functional.embedding(input_ids, self.W)[None] if input_ids.dim() == 1 else \
            (torch.nn.functional.embedding(input_ids, self.W),)


def _logp(table, prev, tok):
    row = table[prev]
    return float(row[tok] - torch.logsumexp(row, 0))


def test_three_options_by_hand():
    """Prompt [1, 2]; options "3" (one token), "4 5" and "6 7 8". The table makes "6 7 8" the most
    likely per token but not in total: sum picks "3", mean picks "6 7 8"."""
    V = 9
    table = torch.zeros(V, V)
    table[2, 3], table[2, 4], table[2, 6] = 2.0, 0.5, 1.0   # first token after the prompt's last (2)
    table[4, 5] = 0.0                                         # "4 5": a flat second step
    table[6, 7], table[7, 8] = 8.0, 8.0                       # "6 7 8": near-certain continuation
    model = Bigram(table)
    prompt, options = [1, 2], [[3], [4, 5], [6, 7, 8]]
    got = option_logprobs(model, [prompt], [options])[0]
    hand = [_logp(table, 2, 3), _logp(table, 2, 4) + _logp(table, 4, 5),
            _logp(table, 2, 6) + _logp(table, 6, 7) + _logp(table, 7, 8)]
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(hand, abs=1e-6)
    assert max(range(3), key=lambda j: hand[j]) == 0
    assert max(range(3), key=lambda j: hand[j] / len(options[j])) == 2
    assert choose([got], [options], "sum") == [0]
    assert choose([got], [options], "mean") == [2]
    # a second prompt ending in another token moves every score (the prompt is really read)
    other = option_logprobs(model, [[1, 4]], [options])[0]
    assert other[0] == pytest.approx(_logp(table, 4, 3), abs=1e-6)


def test_confusion_matrix_counts():
    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert m == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert sum(m[i][i] for i in range(3)) == 4


@pytest.mark.parametrize("arch", [a for a in SUPPORTED_ARCHITECTURES if a not in HYBRID_ARCHITECTURES])
def test_cached_path_equals_one_sequence_per_option(arch):
    """Prompts of different lengths in one batch (right padding), options of 1-4 tokens and a
    different number of options per example: the prompt-once path equals scoring every
    (prompt, option) pair as its own sequence, on every family but the hybrids (their own test below; on two
    families, olmoe and qwen2_moe, this test missed gpt-oss's and Llama-4's windows, 0.16 nat off)."""
    from tests.helpers import tiny_hf

    from fedmoe.moe.model import MoEModel

    mm = MoEModel(tiny_hf(arch))
    mm.add_expert_lora(4, 8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    V = mm.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 3, 11, 5, 9)]
    options = [[torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
               for lens in ([1, 2, 4], [3, 1], [2, 2, 2, 1], [4], [1, 3, 2])]
    ref = option_logprobs(mm, prompts, options, batch_size=5, reference=True)
    for bs in (1, 2, 5):
        got = option_logprobs(mm, prompts, options, batch_size=bs)
        for r, o in zip(ref, got):
            torch.testing.assert_close(o, r, rtol=0, atol=2e-5)
    # not a constant: options of the same prompt differ
    assert len({round(float(x), 4) for x in ref[0]}) == 3


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe_text"])
def test_hybrid_models_score_each_option_as_one_unpadded_sequence(arch):
    """Linear attention carries a recurrent state, and a right-padded prompt's state has run through its
    padding: the scorer gives every option the log-likelihood of prompt + option run alone, unpadded."""
    from tests.helpers import tiny_hf

    from fedmoe.moe.model import MoEModel

    mm = MoEModel(tiny_hf(arch))
    g = torch.Generator().manual_seed(4)
    V = mm.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 3, 10)]
    options = [[torch.randint(3, V, (n,), generator=g).tolist() for n in lens] for lens in ([1, 3], [2, 1, 4], [3])]
    letters = [[[5], [6], [7]]] * 3  # one-token options (MMLU's letters): the prompts' one forward, no cache
    for opts_of, got in ((options, option_logprobs(mm, prompts, options, batch_size=3)),
                         (letters, option_logprobs(mm, prompts, letters, batch_size=3))):
        _assert_alone(mm, prompts, opts_of, got)


def _assert_alone(mm, prompts, options, got):
    """Each option's score is the log-likelihood of prompt + option run alone."""
    import torch.nn.functional as F

    with torch.no_grad():
        for p, opts, scores in zip(prompts, options, got):
            for o, score in zip(opts, scores):
                logp = F.log_softmax(mm.model(torch.tensor([p + o])).logits[0].double(), dim=-1)
                alone = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(o))
                assert float(score) == pytest.approx(alone, abs=2e-5)


def test_mmlu_numbers_unchanged_by_the_shared_scorer():
    """The letter log-probabilities of the built-in model on six 5-shot anatomy questions, as the
    MMLU scorer computed them before it became a case of the option scorer (2026-12-04)."""
    from fedmoe.eval.mmlu import fit_prompt, letter_token_ids, load_mmlu, score_letters
    from fedmoe.moe.model import MoEModel, load_tokenizer

    mm, tok = MoEModel.from_pretrained("builtin:tiny-moe"), load_tokenizer("builtin:tiny-moe")
    dev, test = load_mmlu("dev", ["anatomy"])["anatomy"], load_mmlu("test", ["anatomy"])["anatomy"]
    prompts = [fit_prompt(tok, "anatomy", dev, q, 5, 1024)[0] for q in test[:6]]
    got = score_letters(mm.model, prompts, letter_token_ids(tok), batch_size=4)
    before = [[-3.21657395362854, -3.571556329727173, -4.655499458312988, -4.361575126647949],
              [-2.4138479232788086, -3.5454273223876953, -4.387351989746094, -4.180110931396484],
              [-2.9776594638824463, -3.6960675716400146, -4.151020050048828, -3.8803374767303467],
              [-3.329411745071411, -2.8374574184417725, -3.9559342861175537, -3.5895321369171143],
              [-2.8737785816192627, -3.0662686824798584, -3.946878671646118, -3.793910264968872],
              [-2.9886093139648438, -3.787257671356201, -3.566923141479492, -3.6897993087768555]]
    torch.testing.assert_close(got, torch.tensor(before), rtol=0, atol=1e-5)
    assert got.argmax(-1).tolist() == [0, 0, 0, 1, 0, 0]
    assert all(math.isfinite(x) for row in got.tolist() for x in row)


def test_the_option_rows_hold_a_batch_of_caches_whatever_the_number_of_options():
    """Every option of more than one token continues its prompt's key/value cache on a row of its own. All rows at
    once held a copy of the cache per option (on OLMoE-1B-7B at 512 tokens and 8 options, 2.7 times the test loss's
    pass); at most a batch's number of rows at a time, the peak with 8 options is that with 2 (each score the same:
    an option's score does not depend on the others)."""
    from tests.helpers import tiny_hf

    from fedmoe.moe.model import MoEModel
    from fedmoe.plan import _LiveBytes

    mm = MoEModel(tiny_hf("olmoe"))
    g = torch.Generator().manual_seed(5)
    V, B = mm.config.vocab_size, 8
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in range(40, 40 + B)]
    options = [torch.randint(3, V, (3,), generator=g).tolist() for _ in range(8)]

    def peak(n):
        live = _LiveBytes()
        live.exclude([*mm.model.parameters(), *mm.model.buffers()])
        with live:
            got = option_logprobs(mm, prompts, [options[:n]] * B, B, "cpu")
        return live.peak, got

    (p2, two), (p8, eight) = peak(2), peak(8)
    for a, b in zip(two, eight):
        torch.testing.assert_close(a, b[:2], rtol=0, atol=2e-5)
    assert p8 <= 1.15 * p2, (p8, p2)


@pytest.mark.parametrize("arch, window, past", [("gpt_oss", 4, "left"), ("llama4_text", 3, "whole")])
def test_a_windowed_attention_continues_a_prompt_only_within_its_window(arch, window, past, monkeypatch):
    """gpt-oss's sliding window (every other layer) and Llama-4's chunked attention count their window over the
    cache's positions, and a right-padded prompt's continuation starts after its padding: past the window an
    option's tokens saw the wrong keys (the tiny models' window is 4: scores off by 0.16). Llama-4's temperature
    tuning (its layers without RoPE scale a query by log1p(floor((p + 1) / floor_scale))) also takes p from the
    cache, so its floor_scale − 1 is a window too (here floor_scale 4 below the chunk of 4, and attn_scale 2 so that a
    wrong p shows; a review finding). Where the padded prompt and the longest option fit the window, the right-padded
    prompt-once path is taken; past it, a sliding window takes the prompts padded on the left (every row's distances
    as alone) and chunks or the temperature the pairs as sequences of their own. Each gives each option's score run
    alone, with prompts of different lengths in a batch."""
    from transformers import AutoModelForCausalLM

    import fedmoe.eval.choice as choice
    from tests.helpers import random_zero_inits_, tiny_hf

    from fedmoe.moe.model import MoEModel
    from fedmoe.moe.tiny import tiny_config

    if arch == "llama4_text":
        config = tiny_config(arch)
        config.floor_scale, config.attn_scale = 4, 2.0
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config).float()
        random_zero_inits_(hf)
    else:
        hf = tiny_hf(arch)
    mm = MoEModel(hf)
    assert choice.attention_window(mm.model) == window
    calls = []
    whole, once = choice._reference_batch, choice.cached_batch
    monkeypatch.setattr(choice, "_reference_batch", lambda *a: calls.append("whole") or whole(*a))
    monkeypatch.setattr(choice, "cached_batch",
                        lambda *a, left=False: calls.append("left" if left else "right") or once(*a, left=left))
    g = torch.Generator().manual_seed(4)
    V = mm.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    options = [[torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
               for lens in ([1, 2, 4], [3, 1], [2, 2, 1], [4])]
    _assert_alone(mm, prompts, options, option_logprobs(mm, prompts, options, batch_size=4))
    assert calls == [past]  # 11 + 4 - 1 > window
    short = [prompts[0][: window - 1], prompts[1][:1], prompts[2][: window - 1]]
    fits = [[o[:2] for o in opts] for opts in options[:3]]  # (window - 1) + 2 - 1 <= window
    _assert_alone(mm, short, fits, option_logprobs(mm, short, fits, batch_size=3))
    assert calls == [past, "right"]
    over = [prompts[0][: window - 1], prompts[1][: window - 2]]  # (window - 1) + 3 - 1 > window, by one
    three = [[options[0][2][:3]], [options[1][0]]]
    _assert_alone(mm, over, three, option_logprobs(mm, over, three, batch_size=2))
    assert calls == [past, "right", past]
    letters = [[[5], [6]]] * 4  # one-token options: the prompts' one forward, right-padded, whatever their length
    _assert_alone(mm, prompts, letters, option_logprobs(mm, prompts, letters, batch_size=4))
    assert calls == [past, "right", past, "right"]
