"""Batched greedy decoding with left padding (for ROUGE-L)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from fedmoe.eval._modes import eval_mode


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists on the left to one length: (input_ids, attention_mask), both long."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generation_prompt_limit(model_config, max_length: int, max_new_tokens: int) -> int:
    """The longest prompt greedy generation gives a model: ``max_length`` tokens (``data.max_length``), fewer where
    the prompt and ``max_new_tokens`` new tokens would run past the model's ``max_position_embeddings`` (positions it
    was never trained at: transformers only warns, and the answer is not the model's). A prompt is cut to it from
    the left, as ``data.max_length`` cuts it (``data.tokenize.tokenize_prompt``: the special prefix kept). A
    ``max_new_tokens`` that leaves no position for a prompt is an error."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return int(max_length)
    if max_new_tokens >= positions:
        raise ValueError(f"{max_new_tokens} new tokens leave no position for a prompt in the model's "
                         f"{positions} (max_position_embeddings): generate at most {positions - 1} new tokens "
                         "(eval.max_new_tokens)")
    return min(int(max_length), positions - int(max_new_tokens))


def _cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    try:
        return tokens[: tokens.index(eos_id)]
    except ValueError:
        return tokens


class AnswerNoRepeat:
    """Hugging Face's ``no_repeat_ngram_size`` over the answer alone: no n-gram of the generated tokens is
    generated twice. Hugging Face's own option counts every n-gram of ``input_ids``, prompt included, so an answer
    could never copy n tokens of its instruction or context (most closed_qa, information_extraction and
    summarization references do: "The Eiffel Tower was completed in 1889." from a context that says so), and in a
    left-padded batch the padding's n-grams counted too. ``start``: the column where the answers begin (the
    prompts' padded width: every row's answer starts there)."""

    def __init__(self, n: int, start: int):
        from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

        self.inner, self.start = NoRepeatNGramLogitsProcessor(n), start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids[:, self.start :], scores)


@contextmanager
def _own_decoding(model):
    """The model's ``generation_config`` (a checkpoint's ``generation_config.json``) set aside while fedmoe decodes:
    ``generate`` fills every setting its caller leaves unset from it, so a checkpoint that sets ``num_beams``,
    ``suppress_tokens``, ``bad_words_ids``, ``min_new_tokens`` or Hugging Face's prompt-inclusive
    ``no_repeat_ngram_size`` would change the answers a run scores. Greedy decoding with the run's ``eval`` settings
    alone is what is measured."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    if own is None:
        yield
        return
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def greedy_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    progress: Callable[[int], None] | None = None,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """Greedy-decode each prompt; return only the new tokens, cut before the first ``eos_id``.

    Prompts are batched by length (longest first, so an out-of-memory shows up at once) and the
    results come back in the input order. ``progress(n)`` is called with the number of prompts
    finished in each batch. ``no_repeat_ngram_size``: no n-gram of an answer is generated twice in it
    (:class:`AnswerNoRepeat`: the prompt's n-grams may be copied); ``repetition_penalty`` is Hugging Face's
    (0 / 1.0 = plain greedy).
    """
    from transformers import LogitsProcessorList

    if batch_size < 1:
        raise ValueError(f"greedy_generate: batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"greedy_generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"greedy_generate: prompt {i} is empty; every prompt needs at least one token")
    outputs: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    with eval_mode(model), torch.inference_mode(), _own_decoding(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in idx], pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                logits_processor=LogitsProcessorList(
                    [AnswerNoRepeat(no_repeat_ngram_size, input_ids.shape[1])] if no_repeat_ngram_size else []),
                no_repeat_ngram_size=0,  # never Hugging Face's (prompt-inclusive): eval.no_repeat_ngram_size decides
                repetition_penalty=repetition_penalty,
            )
            new_tokens = generated[:, input_ids.shape[1] :].tolist()
            for i, toks in zip(idx, new_tokens):
                outputs[i] = _cut_at_eos(toks, eos_id)
            if progress is not None:
                progress(len(idx))
    return outputs  # type: ignore[return-value]
