"""Multiple-choice scoring by option log-likelihood: the one scorer of ``eval.task: choice`` and MMLU.

Each example is a prompt (token ids) and a list of options (each a list of token ids). The score of
option o after prompt p is its log-likelihood under the model,

    log P(o | p) = Σ_j log P(o_j | p, o_<j),

and the model's answer is the option with the highest score, either as it is (``normalize="sum"``)
or divided by the option's number of tokens (``normalize="mean"``, the default of ``eval.task:
choice``: otherwise a long label such as "information_extraction" loses to a short one merely for
having more tokens to pay for). With one-token options (MMLU's " A" .. " D") the two coincide and
the score is the next-token log-probability of the option's token at the prompt's last position.

How it is computed (``option_logprobs``): the prompts are batched longest first and right-padded;
one forward pass over the prompts gives every option's first token; when some option has more
tokens, the prompt's key/value cache is reused for the rest (each option's remaining tokens as a
row that attends to its prompt, positions continuing from the prompt's length), so a prompt is
encoded once, not once per option. Those rows go through at most as many at a time as the batch has
prompts, each pass over its own copy of its rows' caches: the option scoring holds about two batches
of prompt caches whatever the number of options (all rows at once held a copy per option: with 8
options, 2.7 times the test loss's pass on OLMoE-1B-7B at 512 tokens).

A model without the Hugging Face ``model`` + ``lm_head`` structure is scored the plain way, one full
sequence per (prompt, option) pair (``reference=True`` forces that path: the tests compare the two),
and so are options of more than one token on a hybrid model (linear attention: Qwen3-Next, Qwen3.5;
short convolutions: LFM2-MoE), whose recurrent state cannot be continued from a right-padded prompt,
and on Llama-4's chunked attention and temperature tuning where the padded prompt and the option
pass its window, which counts positions over the cache, padding included. That path too goes a batch
of pairs at a time, the logits taken only where an option's tokens are predicted. Past a sliding
window (gpt-oss's 128 tokens every other layer) the prompts are padded on the left instead: every
row's prompt then ends at the same cache position, and the window sees the tokens it sees alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fedmoe.eval._modes import eval_mode
from fedmoe.moe.loss import lm_logits

NORMALIZE = ("mean", "sum")


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, lengths): padded on the right, so the default position ids
    0..L-1 of a plain forward are right for every row and causal attention never sees the pad."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = max(len(p) for p in prompts)  # (from the lists: no tensor read, so the memory plan runs it on fake tensors)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, lengths


def unwrap(model):
    """The Hugging Face module of a :class:`~fedmoe.moe.model.MoEModel` (any other module as it is)."""
    from fedmoe.moe.model import MoEModel

    return model.model if isinstance(model, MoEModel) else model


def _structured(model) -> bool:
    return hasattr(model, "model") and hasattr(model, "lm_head")


def _recurrent(model) -> bool:
    """Does the model carry a recurrent state (linear attention: Qwen3-Next, Qwen3.5; a short convolution's last
    tokens: LFM2-MoE)? Its state after a right-padded prompt has run through the padding, so no option may
    continue from it."""
    from fedmoe.moe.arch import HYBRID_ARCHITECTURES

    return getattr(getattr(model, "config", None), "model_type", None) in HYBRID_ARCHITECTURES


def attention_window(model) -> int | None:
    """The most positions over which an attention layer of the model treats every row alike whatever its padding (a
    sliding window: gpt-oss's 128 every other layer; Llama-4's chunks of 8,192 and its temperature tuning's
    floor_scale − 1), or None where every layer sees all before it the same way. Read from the config as
    transformers' cache reads it (``layer_types``, else ``sliding_window`` / ``attention_chunk_size``)."""
    sizes = [x for x in _windows(model) if x is not None]
    return min(sizes) if sizes else None


def _windows(model) -> tuple[int | None, int | None]:
    """(the smallest sliding window, the smallest other window: chunks, Llama-4's temperature tuning) of
    :func:`attention_window`. A sliding window sees the same tokens in a left-padded row as in the row alone (the
    distances are the same); chunks and the temperature count from the sequence's first position."""
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    sliding, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if sliding is not None else "chunked_attention" if chunk is not None else "full"]
    slides = [int(sliding) for t in types if t in ("sliding_attention", "hybrid_sliding") and sliding]
    others = [int(chunk) for t in types if t == "chunked_attention" and chunk]
    floor = getattr(config, "floor_scale", None)
    if getattr(config, "attn_temperature_tuning", False) and floor:
        # Llama-4's layers without RoPE scale a query by log1p(floor((p + 1) / floor_scale)), p counted over the
        # cache, padding included: the same for every row while p + 1 < floor_scale
        others.append(int(floor) - 1)
    return (min(slides) if slides else None), (min(others) if others else None)


def _check(prompts, options) -> None:
    if len(prompts) != len(options):
        raise ValueError(f"option_logprobs: {len(prompts)} prompts but {len(options)} option lists")
    for i, (p, opts) in enumerate(zip(prompts, options)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(opts) == 0:
            raise ValueError(f"example {i} has no options")
        for j, o in enumerate(opts):
            if len(o) == 0:
                raise ValueError(f"example {i}, option {j} has no tokens")


def cached_batch(model, prompts, options, device, pad_id, left: bool = False) -> list[torch.Tensor]:
    """One batch through the prompt-once path: per example, a float64 tensor of option log-likelihoods. ``left``:
    the prompts padded on the left (their positions from the mask), so that every row's prompt ends at the same
    cache position: a sliding window then sees the same tokens in every row as the row alone."""
    if left:
        from fedmoe.eval.generate import left_pad

        input_ids, attention_mask = left_pad([list(p) for p in prompts], pad_id)
        lengths = attention_mask.sum(dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        last = torch.full((len(prompts),), input_ids.shape[1] - 1, dtype=torch.long)
        extra = {"position_ids": position_ids.to(device)}
    else:
        input_ids, attention_mask, lengths = right_pad(prompts, pad_id)
        last, extra = lengths - 1, {}
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows = torch.arange(len(prompts), device=device)
    last = last.to(device)
    longer = any(len(o) > 1 for opts in options for o in opts)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=longer, **extra)
    first = F.log_softmax(lm_logits(model, out.last_hidden_state[rows, last]).float(), dim=-1).cpu()  # (B, V)
    scores = [first[b, torch.tensor([o[0] for o in opts])].double() for b, opts in enumerate(options)]
    if not longer:
        return scores
    # the rest of every option with more than one token: one row each, over its prompt's cache, at most a batch's
    # number of rows at a time (all at once held a copy of the cache per option: 9 prompts' worth with 8 options)
    owner = [(b, j) for b, opts in enumerate(options) for j, o in enumerate(opts) if len(o) > 1]
    # transformers 5.24 renamed the key/value cache `cache` (output field and forward argument; the old
    # name warns and goes in 5.40); 5.23 knows only `past_key_values`
    cache_name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    cache = getattr(out, cache_name)
    step = len(prompts)
    for lo in range(0, len(owner), step):
        part = owner[lo : lo + step]
        rest = _continue(model, cache, cache_name, [options[b][j] for b, j in part], [b for b, _ in part],
                         attention_mask, lengths, device, pad_id)
        for r, (b, j) in enumerate(part):
            scores[b][j] += rest[r]
    return scores


def _rows_of(cache, rows: torch.Tensor):
    """A cache of ``rows`` of ``cache``, which is left as it is: each layer a shallow copy whose key/value tensors
    are selected (selection makes new tensors, and the continuation appends to the copy's by concatenation)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # a cache kept some other way
        sub = copy.deepcopy(cache)
    else:
        sub = copy.copy(cache)
        sub.layers = [copy.copy(layer) for layer in layers]
    sub.batch_select_indices(rows)
    return sub


def _continue(model, cache, cache_name, rests, which, attention_mask, lengths, device, pad_id) -> torch.Tensor:
    """Σ_j≥1 log P(o_j | p, o_<j) of each option in ``rests`` (each of more than one token), the row of prompt
    ``which[r]`` of ``cache`` continued by the option's tokens but its last."""
    width = max(len(o) - 1 for o in rests)
    cont = torch.full((len(rests), width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(rests), width), dtype=torch.long)
    targets = torch.zeros((len(rests), width), dtype=torch.long)
    for r, o in enumerate(rests):
        cont[r, : len(o) - 1] = torch.tensor(o[:-1], dtype=torch.long)
        targets[r, : len(o) - 1] = torch.tensor(o[1:], dtype=torch.long)
        cont_mask[r, : len(o) - 1] = 1
    which = torch.tensor(which, dtype=torch.long)
    on_device = which.to(device)
    sub = _rows_of(cache, on_device)
    mask = torch.cat([attention_mask[on_device], cont_mask.to(device)], dim=1)
    position_ids = lengths[which][:, None] + torch.arange(width)[None, :]
    hidden = model.model(input_ids=cont.to(device), attention_mask=mask, position_ids=position_ids.to(device),
                         use_cache=True, **{cache_name: sub}).last_hidden_state
    logp = F.log_softmax(lm_logits(model, hidden).float(), dim=-1)  # (R, T, V)
    picked = logp.gather(-1, targets.to(device)[..., None]).squeeze(-1) * cont_mask.to(device)
    return picked.sum(dim=1).double().cpu()


def _reference_batch(model, prompts, options, device, pad_id) -> list[torch.Tensor]:
    """One batch the plain way: every (prompt, option) pair as its own full sequence, as many at a time as the batch
    has prompts, the logits taken only where an option's tokens are predicted (on a model with the ``model`` +
    ``lm_head`` structure; another's forward gives them at every position, of which those are read)."""
    pairs = [(b, j) for b, opts in enumerate(options) for j in range(len(opts))]
    scores = [torch.zeros(len(opts), dtype=torch.float64) for opts in options]
    structured = _structured(model)
    step = len(prompts)
    for lo in range(0, len(pairs), step):
        part = pairs[lo : lo + step]
        input_ids, attention_mask, _ = right_pad([list(prompts[b]) + list(options[b][j]) for b, j in part], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # (row, position, token) of every option token: the position before it predicts it
        rows = torch.tensor([r for r, (b, j) in enumerate(part) for _ in options[b][j]], dtype=torch.long)
        pos = torch.tensor([len(prompts[b]) - 1 + t for b, j in part for t in range(len(options[b][j]))],
                           dtype=torch.long)
        toks = torch.tensor([t for b, j in part for t in options[b][j]], dtype=torch.long)
        if structured:
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = lm_logits(model, hidden[rows.to(device), pos.to(device)])  # (option tokens, V)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            logits = (out.logits if hasattr(out, "logits") else out[0])[rows.to(device), pos.to(device)]
        picked = F.log_softmax(logits.float(), dim=-1).gather(-1, toks.to(device)[:, None]).squeeze(-1)
        per = torch.zeros(len(part), dtype=torch.float64).index_add_(0, rows, picked.double().cpu())
        for r, (b, j) in enumerate(part):
            scores[b][j] = per[r]  # (no float(): the memory plan runs this on fake tensors)
    return scores


def option_logprobs(model, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                    batch_size: int = 8, device: torch.device | str | None = None, pad_id: int = 0,
                    progress: Callable[[int], None] | None = None, reference: bool = False) -> list[torch.Tensor]:
    """log P(option | prompt) of every option of every example: one float64 tensor per example, in
    input order. ``model``: a causal LM (``nn.Module`` or ``MoEModel``). ``progress(n)`` after each batch."""
    model = unwrap(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check(prompts, options)
    if device is None:
        device = next(model.parameters()).device
    plain = reference or not _structured(model)
    recurrent = _recurrent(model)
    sliding, other = _windows(model)

    def score(model, prompts, options, device, pad_id):
        longest = max(len(o) for opts in options for o in opts)
        need = max(len(p) for p in prompts) + longest - 1  # the cache positions the longest continuation reaches
        # a recurrent model continues no prompt, and a windowed layer continues a right-padded prompt only while the
        # padded prompt and the option fit its window (past it the window is counted over the padding): a sliding
        # window then takes the prompts padded on the left, chunks and Llama-4's temperature the whole sequences;
        # one-token options (MMLU's letters) still take the one forward
        if plain or (longest > 1 and (recurrent or (other is not None and need > other))):
            return _reference_batch(model, prompts, options, device, pad_id)
        left = longest > 1 and sliding is not None and need > sliding
        return cached_batch(model, prompts, options, device, pad_id, left=left)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, s in zip(idx, score(model, [prompts[i] for i in idx], [options[i] for i in idx], device, pad_id)):
                out[i] = s
            if progress is not None:
                progress(len(idx))
    return out  # type: ignore[return-value]


def choose(scores: Sequence[torch.Tensor], options: Sequence[Sequence[Sequence[int]]],
           normalize: str = "mean") -> list[int]:
    """The index of each example's answer: the highest log-likelihood, per token with ``mean``
    (ties: the first option)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    picks = []
    for s, opts in zip(scores, options):
        if normalize == "mean":
            s = s / torch.tensor([len(o) for o in opts], dtype=torch.float64)
        picks.append(int(torch.argmax(s)))
    return picks


def confusion_matrix(answers: Sequence[int], predictions: Sequence[int], num_options: int) -> list[list[int]]:
    """``m[true][predicted]`` counts (rows: the right option, columns: the model's)."""
    m = [[0] * num_options for _ in range(num_options)]
    for a, p in zip(answers, predictions):
        m[a][p] += 1
    return m


__all__ = ["NORMALIZE", "choose", "confusion_matrix", "option_logprobs", "right_pad", "unwrap"]
