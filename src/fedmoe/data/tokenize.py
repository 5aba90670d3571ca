"""Tokenisation for supervised fine-tuning (loss on the response only) and for generation.

A training sequence is ``prompt ids + response ids + [eos]``. Prompt and response are tokenised
separately (``add_special_tokens=False``) and concatenated, which makes the prompt/response boundary
exact; the prompt then gets the ids the tokenizer puts before a text by default (:func:`special_prefix`:
Llama's and Mixtral's BOS ``<s>``, nothing for OLMoE's or Qwen's tokenizer), as the model saw every
sequence begin in pretraining. A truncated prompt keeps them. ``labels`` is ``-100`` on every prompt position and equals the
token id on every response position (the model shifts labels itself).

Truncation rule (when ``len(prompt) + len(response) + 1 > max_length``), with ``R`` the response
ids plus eos and ``L = max_length``:

* the prompt keeps its *tail*, ``p = min(len(prompt), max(L - len(R), L // 2), L - 1)`` tokens:
  everything the full response leaves over, but at least half of the budget when it needs it,
  and never the whole budget. The tail, as generation keeps it: the prompt ends with ``### Response:``
  there, and a trained prompt ends the same way (its head, kept before, cut the marker off long
  contexts, and the model learned to answer prompts it is never given);
* the response keeps its head in the remaining ``L - p`` positions (the eos is dropped when the
  response itself is cut, because the text did not end there).

So a sequence never exceeds ``L`` and always keeps at least one labelled token (for any
``L >= 1``; a long response gets at least ``L - L // 2`` labelled tokens).

For generation the prompt is *left*-truncated, so that its end (``### Response:``) survives, and a
batch is *left*-padded so that every row ends where generation starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sources import DataError, Example
from .template import format_prompt

__all__ = [
    "IGNORE_INDEX",
    "option_ids",
    "collate_sft",
    "pad_token_id",
    "special_prefix",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_prompt",
    "truncation_lengths",
]

IGNORE_INDEX = -100


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos token; set one (tokenizer.eos_token) before tokenising")
    return int(eos)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to its eos id when it has no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


def truncation_lengths(prompt_len: int, target_len: int, max_length: int) -> tuple[int, int]:
    """How many prompt and target (response + eos) tokens survive; see the module docstring."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if prompt_len + target_len <= max_length:
        return prompt_len, target_len
    p = min(prompt_len, max(max_length - target_len, max_length // 2), max_length - 1)
    return p, min(target_len, max_length - p)


def special_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before a text when it adds its special tokens (its default): a BOS for Llama-style
    tokenizers (Mixtral, Llama-4, DeepSeek), none for OLMoE's and Qwen's."""
    plain = _ids(tokenizer, ["a"])[0]
    full = list(tokenizer(["a"])["input_ids"][0])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _keep_tail(ids: Sequence[int], n: int, prefix: Sequence[int]) -> list[int]:
    """``prefix`` and the last ``n − len(prefix)`` of ``ids`` (n tokens in all; the prefix's own tail when n is
    shorter than the prefix)."""
    if n <= len(prefix):
        return list(prefix)[len(prefix) - n:]
    rest = n - len(prefix)
    return list(prefix) + list(ids[len(ids) - rest:])


def _assemble(prompt_ids: Sequence[int], resp_ids: Sequence[int], eos: int, max_length: int,
              prefix: Sequence[int] = ()) -> dict:
    target = list(resp_ids) + [eos]
    p, r = truncation_lengths(len(prefix) + len(prompt_ids), len(target), max_length)
    prompt = _keep_tail(prompt_ids, p, prefix)
    target = target[:r]
    return {
        "input_ids": prompt + target,
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "prompt_len": len(prompt),
    }


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize_example(tokenizer, ex: Example, max_length: int) -> dict:
    """``{"input_ids", "labels", "prompt_len"}`` for one example (lists of ints / an int)."""
    eos = _eos_id(tokenizer)
    prompt_ids, resp_ids = _ids(tokenizer, [format_prompt(ex), ex.output])
    return _assemble(prompt_ids, resp_ids, eos, max_length, special_prefix(tokenizer))


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[dict]:
    """:func:`tokenize_example` for many examples, tokenising in one batch call (fast tokenizers)."""
    if not examples:
        return []
    eos = _eos_id(tokenizer)
    prompts = _ids(tokenizer, [format_prompt(ex) for ex in examples])
    resps = _ids(tokenizer, [ex.output for ex in examples])
    prefix = special_prefix(tokenizer)
    return [_assemble(p, r, eos, max_length, prefix) for p, r in zip(prompts, resps)]


def option_ids(tokenizer, options: Sequence[str]) -> list[list[int]]:
    """Each answer option as the model would produce it after the prompt: its text tokenised alone
    (as a training response is) followed by eos, so that a label that is a prefix of another is told
    apart by where the answer ends."""
    eos = _eos_id(tokenizer)
    return [ids + [eos] for ids in _ids(tokenizer, list(options))]


def tokenize_prompt(tokenizer, ex: Example, max_length: int, prefix: Sequence[int] | None = None) -> list[int]:
    """Prompt ids for generation (after :func:`special_prefix`, or ``prefix`` where the caller has it), left-truncated
    to ``max_length`` tokens in all: the prefix kept, then the prompt's last tokens."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    ids = _ids(tokenizer, [format_prompt(ex)])[0]
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    return _keep_tail(ids, min(max_length, len(prefix) + len(ids)), prefix)


def collate_sft(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of tokenised examples (dicts with ``input_ids`` and ``labels``).

    Returns LongTensors ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (1 on real tokens)
    and ``labels`` (-100 on padding).
    """
    if not batch:
        raise DataError("collate_sft got an empty batch")
    width = max(len(it["input_ids"]) for it in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(batch):
        n = len(it["input_ids"])
        if len(it["labels"]) != n:
            raise DataError(f"batch item {row}: input_ids and labels differ in length ({n} vs {len(it['labels'])})")
        ids[row, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(it["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
