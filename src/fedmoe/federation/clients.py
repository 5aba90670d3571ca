"""The client side of a federation: each client's data, its private store, and what it does with a
message. Nothing here sees the global state: a client acts on the message it was given, its own
data and its own private store, through the method's client half.

The in-process runtime runs every :class:`ClientNode` on one shared frozen model, one after another;
the model holds only what the current client's message and private store put in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..algorithms.base import Client, Private, State
from ..data.tokenize import tokenize_examples, tokenize_prompt
from ..messages import REPLY, Message
from ..moe import MoEModel
from ..seeds import Stream, derive_seed
from ..train import Parallel, round_lr, train_local
from .transport import TrainReport


@dataclass
class ClientSet:
    """One client's tokenised data: training and test examples, and the test examples it answers."""

    id: int
    train: list[dict]
    test: list[dict]
    test_prompts: list[list[int]]
    test_references: list[str]
    test_categories: list[str]
    category_counts: dict[str, int]
    pad_id: int
    # a choice task: per answered test example, its options (token ids: the option's text and eos, as
    # a training target ends) and the index of the right one; the run's label set where there is one
    test_options: list[list[list[int]]] | None = None
    test_answers: list[int] | None = None
    labels: list[str] | None = None
    # the validation examples whose loss eval.val_loss measures; None: not measured (not even tokenised)
    val: list[dict] | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    def info(self, skipped_rows: int = 0, shared_source: bool = True) -> dict:
        """What the client reports of its data (sizes and categories; never the examples)."""
        info = {"n_train": self.n_train, "n_test": len(self.test), "n_generated": len(self.test_prompts),
                "category_counts": self.category_counts, "skipped_rows": skipped_rows, "shared_source": shared_source}
        return info if self.val is None else {**info, "n_val": len(self.val)}


def client_set(c, tokenizer, max_length: int, max_generated: int | None, labels: list[str] | None = None,
               val: bool = False, prompt_limit: int | None = None) -> ClientSet:
    """One client's examples tokenised (``c``: its ``ClientData``; ``labels``: a label task's label set; ``val``:
    its validation examples too, ``eval.val_loss``; ``prompt_limit``: the longest prompt to generate from,
    ``eval.generate.generation_prompt_limit``, else ``max_length``)."""
    from ..data.tokenize import option_ids, pad_token_id, special_prefix

    gen = c.test if max_generated is None else c.test[:max_generated]
    options = answers = None
    prompt_len = max_length if prompt_limit is None else min(max_length, prompt_limit)
    if any(ex.options is not None for ex in gen):
        cache: dict[tuple[str, ...], list[list[int]]] = {}
        options, answers = [], []
        for ex in gen:
            if ex.options is None:
                raise ValueError(f"client {c.id}: a test example has no answer options, others have (a choice task "
                                 "needs options on every example)")
            if ex.options not in cache:
                cache[ex.options] = option_ids(tokenizer, ex.options)
            options.append(cache[ex.options])
            answers.append(ex.options.index(ex.output))
        # prompt + the longest option within max_length (the model's context is checked against it)
        prompt_len = max(1, max_length - max(len(o) for opts in options for o in opts))
    prefix = special_prefix(tokenizer)  # once for every prompt
    return ClientSet(
        id=c.id,
        train=tokenize_examples(tokenizer, c.train, max_length),
        test=tokenize_examples(tokenizer, c.test, max_length),
        test_prompts=[tokenize_prompt(tokenizer, ex, prompt_len, prefix) for ex in gen],
        test_references=[ex.output for ex in gen],
        test_categories=[ex.category for ex in gen],
        category_counts=c.category_counts,
        pad_id=pad_token_id(tokenizer),
        test_options=options,
        test_answers=answers,
        labels=labels,
        val=tokenize_examples(tokenizer, c.val, max_length) if val else None,
    )


def client_sets(data, tokenizer, max_length: int, max_generated: int | None, val: bool = False,
                prompt_limit: int | None = None) -> list[ClientSet]:
    """The data pool: every client's examples tokenised (``data``: a ``FederatedData``; ``val``: with their
    validation examples; ``prompt_limit``: :func:`client_set`'s)."""
    return [client_set(c, tokenizer, max_length, max_generated, data.labels, val, prompt_limit) for c in data.clients]


def answer_prompt_limit(cfg, model_config) -> int | None:
    """The longest prompt a run's evaluation generates from (``eval.generate.generation_prompt_limit``: within the
    model's positions with ``eval.max_new_tokens`` after it), or None where it generates nothing."""
    from ..eval.generate import generation_prompt_limit

    if cfg.eval.task != "generate" or not cfg.eval.rouge:
        return None
    return generation_prompt_limit(model_config, cfg.data.max_length, cfg.eval.max_new_tokens)


def heldout_set(data, tokenizer, max_length: int) -> ClientSet | None:
    """``data.heldout`` (the shared test examples) tokenised as a client's test data, or None."""
    from .. import data as data_mod

    if not data.heldout:
        return None
    held = data_mod.ClientData(id=-1, train=[], val=[], test=list(data.heldout))
    return client_set(held, tokenizer, max_length, None, data.labels)


@dataclass
class ClientNode:
    """One client: its data and its private store (None before its one-shot setup)."""

    data: ClientSet
    private: Private | None = None

    @property
    def id(self) -> int:
        return self.data.id

    def setup(self, half: Client, mm: MoEModel, initial: State, seed: int) -> dict:
        """The one-shot setup, on the freshly built model (``initial``: its adapters' initial values).
        Returns the metrics: the method's, its wall time and, on CUDA, the extra peak memory."""
        cuda = mm.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        mm.load_state(initial)
        mm.set_top_k(mm.default_top_k)
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, Stream.CLIENT_SETUP, self.id))
            self.private, metrics = half.setup(self.id, mm, self.data.train)
        metrics = {"seconds": time.perf_counter() - t, **metrics}
        if cuda:
            metrics["cuda_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        return metrics

    def load(self, half: Client, mm: MoEModel, message: Message) -> None:
        """Put this client's model in place: the message plus its private store."""
        half.load(mm, self.id, message, self.private)

    def train(self, half: Client, mm: MoEModel, message: Message, cfg,
              progress: Callable[[int, float], None] | None = None,
              parallel: Parallel | None = None) -> tuple[Message, TrainReport]:
        """One round of local training on ``message`` (its header names the round): (reply, what the
        client reports of its training). The private store is replaced by the method's new one.
        ``parallel``: this process's rank among the ranks that train this client together. Under local DP
        the reply is privatised here, and with withheld reports the report says only what it withheld."""
        round_idx = int(message.header["round"])
        lr = round_lr(cfg.train, round_idx, cfg.federation.rounds)
        self.load(half, mm, message)
        result = train_local(mm, self.data.train, cfg.train, self.data.pad_id, lr,
                             seed=derive_seed(cfg.seed, Stream.LOCAL_TRAINING, round_idx, self.id),
                             progress=progress, objective=half.objective(self.id, mm, message, self.private),
                             parallel=parallel)
        reply, self.private, metrics = half.reply(self.id, mm, message, self.private, result)
        dp = cfg.federation.dp
        withhold = False
        if dp is not None and dp.where == "client":  # clipped and noised here: no raw update leaves this client
            from .dp import privatize_reply, withholds

            withhold = withholds(cfg)
            weights = half.dp_weights(mm, reply) if withhold else None  # from what the reply is about to lose
            reply, _ = privatize_reply(cfg, reply, message, self.id, round_idx, weights)
        return reply.with_header(kind=REPLY, round=round_idx), TrainReport.of(result, metrics, withhold=withhold)

    def evaluate(self, half: Client, mm: MoEModel, evaluator, message: Message, with_answers: bool, general: bool,
                 prog=None) -> dict:
        """This client's model (the message plus its private store) on its own test data, with what
        it runs (``profile``: k and LoRA rank)."""
        t0 = time.perf_counter()
        self.load(half, mm, message)
        res = evaluator.evaluate_sets([self.data], with_answers, general, prog, f"client {self.id}")
        return {**res, "eval_s": time.perf_counter() - t0, "profile": half.profile(self.id, mm, self.private)}


__all__ = ["ClientNode", "ClientSet", "client_set", "client_sets", "heldout_set"]
