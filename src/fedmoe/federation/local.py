"""The in-process transport: every client in this process, one after another, on one frozen model.

It is the fastest runtime and the default (``federation.runtime: local``). The federation loop
(:mod:`fedmoe.federation.runtime`) hands it messages; it runs each addressed client's
:class:`~fedmoe.federation.clients.ClientNode` and hands back what a remote client would send.
"""

from __future__ import annotations

import time

import torch

from ..algorithms.base import check_top_k
from ..config import ConfigError
from ..data import prepare_federated_data
from ..messages import Message
from ..moe import MoEModel, load_tokenizer
from ..seeds import Stream, derive_seed
from .clients import ClientNode, answer_prompt_limit, client_sets, heldout_set
from .directories import with_memory_hint
from .evaluation import ModelEvaluator
from .progress import Progress
from .dp import withhold_setup


def load_client_model(cfg, method, tokenizer=None) -> MoEModel:
    """A client's model: the frozen pretrained MoE with the method's adapters at their initial values
    (the run's adapter seed: the same values the server's spec has)."""
    mc = cfg.model
    mm = MoEModel.from_pretrained(mc.name, dtype=mc.dtype, device=mc.device,
                                  attn_implementation=mc.attn_implementation, seed=cfg.seed)
    mm.tracker.skip_padding = mc.skip_padding
    if mc.quantization != "none":
        from ..moe.quant import quantize_model

        quantize_model(mm, mc.quantization)
    if tokenizer is not None and len(tokenizer) > mm.config.vocab_size:
        raise ConfigError(f"tokenizer '{mc.tokenizer or mc.name}' has {len(tokenizer)} tokens but the model's "
                          f"vocabulary has {mm.config.vocab_size}; set model.tokenizer to the model's tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Stream.ADAPTER_INIT))
        method.client.build(cfg, mm)
    return mm


class LocalTransport:
    def __init__(self, cfg, method, spec, observe=None):
        self.cfg = cfg
        self.observe = observe or (lambda kind, client, message: None)
        self.data = prepare_federated_data(cfg.data, cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.mm = load_client_model(cfg, method, self.tokenizer)
        self.sets = client_sets(self.data, self.tokenizer, cfg.data.max_length, cfg.eval.max_examples,
                                cfg.eval.val_loss, answer_prompt_limit(cfg, self.mm.model.config))
        self.initial = spec.initial
        spec.check(self.mm)
        self.half = method.client(cfg)
        check_top_k(self.half, self.mm, len(self.sets))
        self.nodes = {s.id: ClientNode(s) for s in self.sets}
        self.evaluator = ModelEvaluator(cfg, self.mm, self.tokenizer, self.sets[0].pad_id,
                                        heldout=heldout_set(self.data, self.tokenizer, cfg.data.max_length))

    def wait_for_clients(self) -> None:
        """Every client is here."""

    # ------------------------------------------------------------------ the client side, per message
    def setup(self, prog: Progress) -> dict[int, dict]:
        """Every client's one-shot setup: {client: {"setup": metrics, "data": its data, "profile": k, rank}}."""
        out = {}
        for cid, node in self.nodes.items():
            metrics, data = withhold_setup(self.cfg, node.setup(self.half, self.mm, self.initial, self.cfg.seed),
                                           node.data.info(self.data.skipped))
            out[cid] = {"setup": metrics, "data": data, "profile": self.half.profile(cid, self.mm, node.private)}
        return out

    def started(self) -> list[dict]:
        return []  # the clients run in this process, on the model the runtime loaded once

    def train(self, round_idx: int, messages: dict[int, Message], prog: Progress):
        """({client: (reply, report)}, {client: failure}) for this round's train messages. A client whose
        training raises stops the run (``federation.on_client_error: stop``, the exception propagates) or
        is a failure of this round (``skip``; its private store stays as it was before the round)."""
        replies, failures = {}, {}
        for cid, msg in messages.items():
            self.observe("downlink", cid, msg)
            task = prog.task(f"  client {cid} train", self.cfg.train.max_steps or 0)
            t0 = time.perf_counter()
            try:
                reply, report = self.nodes[cid].train(
                    self.half, self.mm, msg.copy(), self.cfg,
                    progress=lambda s, loss: prog.update(task, completed=s, info=f"loss {loss:.3f}"))
            except Exception as e:  # noqa: BLE001 -- any error of one client's training (out of memory, its data)
                if self.cfg.federation.on_client_error != "skip":
                    raise
                failures[cid] = with_memory_hint(f"{type(e).__name__}: {e}".strip())
                self._after_failure()
                continue
            finally:
                prog.remove(task)
            self.observe("reply", cid, reply)
            report.overhead["train_s"] = time.perf_counter() - t0
            replies[cid] = (reply, report)
        return replies, failures

    def _after_failure(self) -> None:
        """Free what a failed client's training held (gradients; cached CUDA memory after an out-of-memory
        error). The next client loads its own state into the model, so nothing else of it remains."""
        for p in self.mm.model.parameters():
            p.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def evaluate(self, round_idx: int, messages: dict[int, Message], with_answers: bool, general_for: dict[int, bool],
                 prog: Progress) -> tuple[dict[int, dict], dict[int, str]]:
        """Each addressed client's own model on its test data (in-process, a failure is an exception)."""
        out = {}
        for cid, msg in messages.items():
            self.observe("evaluate", cid, msg)
            out[cid] = self.nodes[cid].evaluate(self.half, self.mm, self.evaluator, msg.copy(), with_answers,
                                                general_for[cid], prog)
        return out, {}

    def evaluate_with_global(self, round_idx: int, messages: dict[int, Message], global_message: Message,
                             with_answers: bool, general_for: dict[int, bool], general: bool, prog: Progress):
        """The clients' own models (:meth:`evaluate`), then the global model on the union of their test data (all
        here, in client order, in one pass)."""
        own, failed = self.evaluate(round_idx, messages, with_answers, general_for, prog)
        self.observe("evaluate", None, global_message)
        t0 = time.perf_counter()
        self.half.load(self.mm, None, global_message.copy(), {})
        res = self.evaluator.evaluate_sets(self.sets, with_answers, general, prog, "global")
        return own, failed, {**res, "eval_s": time.perf_counter() - t0}, {}

    # ------------------------------------------------------------------ what the clients keep
    def state(self) -> dict:
        return {"private": {cid: n.private for cid, n in self.nodes.items()}}

    def restore(self, state: dict) -> None:
        for cid, node in self.nodes.items():
            node.private = state["private"][cid]
