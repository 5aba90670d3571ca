"""The federation loop, the same on every runtime: the method's server half, and a transport that
carries its messages to the clients and their replies back.

    setup: each client's one-shot setup
    round: sample → downlink message per client → [transport: clients train] → aggregate → evaluate → checkpoint

Transports: :class:`~fedmoe.federation.local.LocalTransport` (in-process, the default) and the Flower
runtimes (:mod:`fedmoe.federation.flower`). The methods' math lives in ``fedmoe.algorithms``; this
module moves messages and keeps the books.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time

import numpy as np
import torch

from ..algorithms import get_method, model_spec
from ..config import ConfigError, RunConfig
from ..data import format_histogram_table
from ..algorithms.base import N_TRAIN
from ..messages import ACTIVATION_COUNTS, EVALUATE, TOKENS_PER_LAYER, TRAIN, Message, Reply
from ..report import write_report
from ..rundir import RunDir, resume_command
from .checkpoint import (CHECKPOINT_FILE, Checkpoint, RunDirError, config_fingerprint, data_fingerprint,
                         remove_stale_temporaries, restore_rng_states, rng_states, write_checkpoint,
                         write_data_fingerprint)
from .conflict import NOTES as CONFLICT_NOTES
from .dp import WITHHELD_DATA, WITHHELD_TRAINING
from .evaluation import (GENERAL_PARTS, WITHHELD_EVALUATION, WITHHELD_WITH_EVALUATION, EvalPolicy, first_evaluating,
                         has_general, screened)
from .progress import Progress
from .transport import Transport, is_number
from .sampling import sample_clients
from .summary import NONFINITE, ClientRecord, lowest_val_loss, run_summary

RUNTIME_TRAIN_KEYS = ("round", "client", "kind", "loss", "steps", "lr", "tokens", "bytes_up", "bytes_down",
                      "load_s", "train_s", "tokens_per_s")



class RoundFailed(RuntimeError):
    """Too few clients replied with a usable update for a round to be aggregated."""


def nonfinite(loss, message) -> str | None:
    """Why a client's round is unusable (its training loss or a reply tensor or scalar is NaN or
    infinite), or None."""
    why = []
    if isinstance(loss, float) and not math.isfinite(loss):
        why.append(f"training loss {loss}")
    for name, t in message.tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                why.append(f"{bad} of {t.numel()} values of {name}")
    why += [f"{name} = {v}" for name, v in message.scalars.items() if isinstance(v, float) and not math.isfinite(v)]
    if not why:
        return None
    more = f" (and {len(why) - 3} more tensors)" if len(why) > 3 else ""
    return "non-finite " + "; ".join(why[:3]) + more + ": the update is left out of the aggregation"


INVALID = "invalid"  # failure stage: a reply that does not fit what the client was sent


def invalid_counts(counts, shape: tuple[int, int], top_k: int, tokens=None) -> str | None:
    """Why a client's expert activation counts cannot be used (FLAME and FC-MoE weigh experts by them, the
    report shows them), or None: an (L, E) tensor of non-negative integers, a layer routing at most k
    experts per token it processed (``tokens``: the reply's tokens per layer, where it sends them)."""
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != tuple(shape):
        return f"activation counts of shape {tuple(getattr(counts, 'shape', ()))}, the model's are {tuple(shape)}"
    if counts.is_floating_point() or counts.dtype == torch.bool or bool((counts < 0).any()):
        return "activation counts that are not non-negative integers"
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (shape[0],) or bool((tokens < 0).any()):
            return f"tokens per layer of shape {tuple(getattr(tokens, 'shape', ()))}, the model has {shape[0]} MoE layers"
        over = (counts.sum(1) > top_k * tokens).nonzero().flatten().tolist()
        if over:
            return f"MoE layer {over[0]} routed more than k = {top_k} experts per token it processed"
    return None


def _dtype(d) -> str:
    return str(d).removeprefix("torch.")


def _metric_value(v) -> bool:
    """A client metric's value: a finite number or a list of at most 100 000 of them (FLAME's rescaler per layer)."""
    return is_number(v) or (isinstance(v, list) and len(v) <= 100_000 and all(is_number(x) for x in v))


def invalid_reply(sent: Message, reply: Message, global_state, declared_n: int | None, metrics: dict,
                  server=None, client_metrics=(), secure: bool = False, withheld: bool = False) -> str | None:
    """Why a client's reply cannot touch the aggregate, or None. Its tensors must be the global ones (all of
    them; none only where the method aggregates no update, ``local_only``, or under SecAgg+) or the extras its
    method declares (``server.reply_extras``: SCAFFOLD's control change, FLAME's counts) — not any other tensor
    it was sent (SCAFFOLD's server control variate echoed back was aggregated into the global state) —, each
    with the shape and dtype it was sent (a rank-heterogeneous client's truncated shape) or declared (a (1,)-shaped
    tensor would broadcast over a matrix, int64 zeros turn the global state into integers); its scalars
    the method's (``server.reply_scalars``); n_train a positive integer no larger than what the client
    declared at setup (one client's 1e15 would make the global model its own); its metrics from the
    method's namespace (``Method.client_metrics``), each a finite number or a list of them. ``secure``
    (``federation.secagg``): the update goes masked through SecAgg+, the reply carries no tensor. ``withheld``
    (``federation.dp.reports: withhold``): n_train must be 1."""
    why = []
    extras = {} if server is None else server.reply_extras(global_state)
    if secure:
        extras = {}
        if reply.tensors:
            why.append(f"tensors in a SecAgg+ round, which must go masked ({sorted(reply.tensors)[:3]})")
    allowed = set(global_state) | set(extras)
    for name, t in reply.tensors.items():
        if name not in allowed:
            why.append(f"a tensor {name!r} the method does not expect")
            continue
        ref = sent.tensors.get(name, global_state.get(name))
        want = (tuple(ref.shape), ref.dtype) if ref is not None else extras.get(name)
        if want is not None and (tuple(t.shape) != tuple(want[0]) or t.dtype != want[1]):
            why.append(f"{name} is {tuple(t.shape)} {_dtype(t.dtype)}, the method expects {tuple(want[0])} "
                       f"{_dtype(want[1])}")
    present = [n for n in global_state if n in reply.tensors]
    # none of them: only a method whose server reads no update (local_only), or a SecAgg+ round (masked)
    none_allowed = secure or (server is not None and not server.trains_global_model)
    if (present or not none_allowed) and len(present) < len(global_state):
        missing = [n for n in global_state if n not in reply.tensors]
        why.append(f"{len(missing)} of the model's {len(global_state)} tensors are missing ({missing[0]}, ...)")
    lacking = [n for n in extras if n not in reply.tensors]
    if lacking:
        why.append(f"no {lacking[0]}" + (f" (and {len(lacking) - 1} more the method needs)" if len(lacking) > 1 else ""))
    scalars = (N_TRAIN,) if server is None else server.reply_scalars
    strange = sorted(set(reply.scalars) - set(scalars))
    if strange:
        why.append(f"scalars the method does not expect: {strange}")
    n = reply.scalars.get(N_TRAIN)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n != int(n) or n < 1:
        why.append(f"n_train = {n!r} is not a positive integer")
    elif withheld and n != 1:
        why.append(f"n_train = {n:g}, where under federation.dp.reports: withhold every reply carries 1")
    elif declared_n is not None and n > declared_n:
        why.append(f"n_train = {n:g} is more than the {declared_n} training examples it declared at setup")
    clash = sorted(set(metrics) & set(RUNTIME_TRAIN_KEYS))
    if clash:
        why.append(f"its metrics use the runtime's names {clash}")
    foreign = sorted(set(metrics) - set(client_metrics) - set(clash))
    if foreign:
        why.append(f"metrics outside the method's namespace {sorted(client_metrics)}: {foreign[:3]}")
    odd = sorted(k for k in set(metrics) & set(client_metrics) if not _metric_value(metrics[k]))
    if odd:
        why.append(f"metrics {odd} that are not finite numbers (or lists of them)")
    if not why:
        return None
    return "an invalid reply: " + "; ".join(why[:3]) + ": the update is left out of the aggregation"


def invalid_profile(profile, top_k: int, max_rank: int) -> list[str]:
    """Why what a client says it runs cannot be taken (empty: it can): an integer k in 1..top_k and rank in
    0..max_rank."""
    if not isinstance(profile, dict):
        return ["no profile"]
    why = []
    for key, low, top in (("k", 1, top_k), ("rank", 0, max_rank)):
        v = profile.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= top:
            why.append(f"profile {key} = {repr(v)[:40]}, not an integer in {low}..{top}")
    return why


def invalid_setup(info: dict, top_k: int, max_rank: int, withheld: tuple[str, ...] = ()) -> str | None:
    """Why a client's one-shot setup report cannot be taken, or None: its profile an integer k in 1..top_k and
    rank in 0..max_rank (they set the FLOPs the summary reports), what it says of its data counts (non-negative
    integers, categories by name; n_train, n_test and n_generated there unless ``withheld``, what ``withheld``
    names absent) and its setup metrics finite numbers or lists of them."""
    profile, data, setup = info.get("profile"), info.get("data"), info.get("setup")
    why = invalid_profile(profile, top_k, max_rank)
    if not isinstance(data, dict):
        why.append("no data description")
    else:
        lacking = [k for k in ("n_train", "n_test", "n_generated") if k not in data and k not in withheld]
        if lacking:
            why.append(f"no data {lacking[0]}")
        sent = [k for k in withheld if k in data]
        if sent:
            why.append(f"data {sent[0]} sent under federation.dp.reports: withhold")
        for key, v in data.items():
            if key == "shared_source":
                ok = isinstance(v, bool)
            elif key == "category_counts":
                ok = v is None or (isinstance(v, dict) and all(isinstance(c, str) and isinstance(n, int) and
                                                               not isinstance(n, bool) and n >= 0 for c, n in v.items()))
            else:
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
            if not ok:
                why.append(f"data {key} = {repr(v)[:40]}")
    if not isinstance(setup, dict) or not all(_metric_value(v) for v in setup.values()):
        why.append("setup metrics that are not finite numbers")
    return "; ".join(why[:3]) or None


def _serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def make_transport(cfg: RunConfig, method, spec, observe=None, **options):
    """The transport of ``cfg.federation.runtime``."""
    if cfg.federation.runtime == "local":
        from .local import LocalTransport

        return LocalTransport(cfg, method, spec, observe=observe)
    raise ConfigError(f"federation.runtime = {cfg.federation.runtime!r} runs through `fedmoe run --runtime ...`, "
                      "which starts Flower")


class Federation:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, transport: Transport | None = None, show_progress: bool = False,
                 log=print, resuming: bool = False, observe=None, round_lines: bool = False):
        """``transport`` None: the one of ``cfg.federation.runtime`` (in-process by default).
        ``observe(kind, client, message)``, if given, sees every message the in-process transport passes
        (kind "downlink", "reply" or "evaluate") — for logging and for tests."""
        self.cfg, self.rd, self.show_progress, self.log = cfg, run_dir, show_progress, log
        seed = cfg.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        # the server half: from the model's config and the method's adapters, no model
        self.method = get_method(cfg.algorithm.name)
        self.spec = model_spec(cfg, self.method)
        self.server = self.method.server(cfg, self.spec)
        self.global_state = self.server.initial_global()
        self.server_state = self.server.initial_server_state(self.global_state)
        self.transport = transport or make_transport(cfg, self.method, self.spec, observe=observe)
        self.policy = EvalPolicy(cfg, self.rd.log_metrics)
        self.records = {cid: ClientRecord() for cid in range(cfg.data.partition.num_clients)}
        self.completed_rounds = 0
        self._uncredited: dict[int, tuple] = {}  # under SecAgg+: valid replies of the round, credited by _secure_aggregate
        self.central_releases = 0  # central DP: the noised aggregates computed, each one a release (RELEASES_FILE)
        self.wall_before = 0.0
        self.global_eval: dict = {}
        self.zero_shot: dict | None = None  # round-0 evaluation of the initial model
        self.client_setup: dict = {}
        self.failures: list[dict] = []  # clients that failed to train or evaluate: round, client, stage, error
        self.resuming = resuming
        # the data files as the run starts (a resume takes its checkpoint's, checked against them: open_run_dir)
        self.data_fingerprint = None if resuming else data_fingerprint(cfg)
        self.round_lines = round_lines  # a line per round through ``log`` (a Flower ServerApp: its run's log)
        # what the runtime checks replies against and aggregates with: the method's server half or, under local DP
        # with withheld reports, that half with replies of the global tensors and n_train = 1, averaged uniformly
        self.receiver = self.server
        if cfg.federation.dp is not None:
            from .dp import WithheldReports, require_dp_accounting, withholds

            require_dp_accounting()
            if cfg.federation.dp.noise_multiplier is None:
                raise ConfigError("federation.dp.target_epsilon: σ is computed from it when a run starts "
                                  "(fedmoe run, fedmoe.federation.run_federated or start_run), which this config did "
                                  "not go through: start it so, or give federation.dp.noise_multiplier")
            if withholds(cfg):
                self.receiver = WithheldReports(self.server, cfg)

    # ------------------------------------------------------------------ checkpointing
    def checkpoint_state(self) -> dict:
        return {
            "round": self.completed_rounds,
            "global_state": self.global_state,
            "server_state": self.server_state,
            "clients": {cid: r.state() for cid, r in self.records.items()},
            "transport": self.transport.state(),
            "global_eval": self.global_eval,
            "zero_shot": self.zero_shot,
            "wall_s": self.wall_before + (time.time() - self._t0),
            "client_setup": self.client_setup,
            "failures": self.failures,
            "rng": rng_states(),
            "config_fingerprint": config_fingerprint(self.cfg),
            "data_fingerprint": self.data_fingerprint,
        }

    def save(self) -> None:
        write_checkpoint(self.rd.checkpoint_dir, _serialize(self.checkpoint_state()))
        write_data_fingerprint(self.rd.checkpoint_dir, self.data_fingerprint)

    def restore(self, ck: dict) -> None:
        self.completed_rounds = ck["round"]
        self.global_state = ck["global_state"]
        self.server_state = ck["server_state"]
        self.records = {cid: ClientRecord(**v) for cid, v in ck["clients"].items()}
        self.transport.restore(ck["transport"])
        self.global_eval = ck["global_eval"]
        self.zero_shot = ck["zero_shot"]
        self.wall_before = ck["wall_s"]
        self.client_setup = ck.get("client_setup", {})
        self.failures = ck.get("failures", [])
        # a checkpoint written before data fingerprints: the data as the run goes on from here
        self.data_fingerprint = ck.get("data_fingerprint") or data_fingerprint(self.cfg)
        restore_rng_states(ck["rng"])

    # ------------------------------------------------------------------ steps
    def _downlink(self, cid: int | None, kind: str, round_idx: int):
        msg = self.server.downlink(self.global_state, self.server_state, cid,
                                   round_idx=round_idx).with_header(kind=kind, round=round_idx)
        if kind == TRAIN and self.cfg.federation.secagg is not None:  # keep the update for SecAgg+, send none
            msg = msg.with_header(secagg=self.server.secagg_weights(self.cfg))
        return msg

    def secagg_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors of a client's masked update under ``federation.secagg``, in the order its vector holds
        them: every global tensor (θ_i − θ) and every extra its method declares (as sent), by name."""
        extras = self.receiver.reply_extras(self.global_state)
        shapes = {**{n: tuple(t.shape) for n, t in self.global_state.items()}, **{n: tuple(s[0]) for n, s in extras.items()}}
        return sorted(shapes.items())

    def _max_rank(self) -> int:
        """The largest LoRA rank a client of this run may train (lora.rank, or a budget level's)."""
        budgets = getattr(self.cfg.algorithm, "budgets", None)
        return max([self.cfg.lora.rank, *((budgets.ranks or []) if budgets is not None else [])])

    def _setup(self, prog: Progress) -> None:
        for cid, info in self.transport.setup(prog).items():
            withheld = WITHHELD_DATA if self.receiver is not self.server else ()
            if WITHHELD_EVALUATION in (info.get("withheld") or ()):  # its node keeps its evaluation, and its test set's size
                withheld = (*withheld, *WITHHELD_WITH_EVALUATION)
            why = invalid_setup(info, self.spec.top_k, self._max_rank(), withheld)
            if why:
                raise RuntimeError(f"client {cid}'s setup is not one fedmoe's client sends ({why}): the run was not "
                                   "started; check that every SuperNode runs this fedmoe version, and whose node "
                                   "answers as that client")
            self.client_setup[cid] = info["setup"]
            self.records[cid].data = info["data"]
            self.records[cid].profile = info["profile"]

    def _log_starts(self, round_idx: int) -> None:
        """metrics.jsonl rows (kind ``start``) of the client processes that started for round ``round_idx``: the
        run's start or resume, a node that came back; what each loaded, in how long, and its device."""
        for s in self.transport.started():
            self.rd.log_metrics({"round": round_idx, "client": s["client"], "kind": "start", "load_s": s["load_s"],
                                 **{k: s[k] for k in ("model_s", "device") if k in s}})

    REQUESTS_FILE = "dp-requests.json"  # local DP: every training request each client was sent, failed rounds too

    def _count_requests(self, sampled: list[int]) -> None:
        """A training request may make its client release an update — also one that never comes back (late,
        lost) or whose round fails and runs again after a resume: under local DP each counts toward the client's
        ε, and the counts are written to the run directory before the requests go out (a checkpoint holds only
        applied rounds)."""
        for cid in sampled:
            self.records[cid].replies_sent += 1
        dp = self.cfg.federation.dp
        if dp is not None and dp.where == "client":
            from ..rundir import atomic_write_text

            counts = {str(cid): rec.replies_sent for cid, rec in sorted(self.records.items())}
            atomic_write_text(self.rd.path / self.REQUESTS_FILE, json.dumps(counts) + "\n")

    def _counted_requests(self) -> None:
        """After a restore: each client's requests as the run directory counted them, where more than the
        checkpoint's (the rounds sent after it)."""
        path = self.rd.path / self.REQUESTS_FILE
        if not path.is_file():
            return
        try:
            counts = json.loads(path.read_text())
            for cid, rec in self.records.items():
                n = counts.get(str(cid), 0)
                if isinstance(n, int) and not isinstance(n, bool) and n > rec.replies_sent:
                    rec.replies_sent = n
        except (ValueError, AttributeError) as e:
            raise RunDirError(f"{path} is not readable ({e}): it counts the training requests each client was sent "
                              "under local DP; restore it, or start a new run") from None

    def _train(self, round_idx: int, sampled: list[int], prog: Progress) -> list[Reply]:
        messages = {cid: self._downlink(cid, TRAIN, round_idx) for cid in sampled}
        self._uncredited = {}  # (a round that failed before its secure mean credits no one later)
        self._count_requests(sampled)
        replies, failures = self.transport.train(round_idx, messages, prog)
        for cid, why in failures.items():
            if cid in messages:  # the message went out: its bytes count as sent, whatever became of the reply
                self.records[cid].bytes_down += messages[cid].nbytes()
            self._failed(round_idx, cid, "train", why)
        out, unusable = [], {}
        shape = (self.spec.num_moe_layers, self.spec.num_experts)  # of the activation counts
        secure = self.cfg.federation.secagg is not None
        for cid in sampled:
            if cid not in replies:
                continue
            reply, report = replies[cid]
            rec, down, up = self.records[cid], messages[cid].nbytes(), reply.nbytes()
            rec.bytes_down += down
            rec.bytes_up += up
            rec.replies_received += 1
            withheld = self.receiver is not self.server
            declared = 1 if withheld else (rec.data or {}).get("n_train")
            bad = invalid_reply(messages[cid], reply, self.global_state, declared, report.metrics, self.receiver,
                                self.method.client_metrics, secure=secure, withheld=withheld)
            if bad is None and bool(report.withheld) != withheld:
                bad = ("an invalid reply: " + ("its training report withheld, which the run did not ask for" if
                       report.withheld else "its training report sent under federation.dp.reports: withhold") +
                       ": the update is left out of the aggregation")
            if bad is None and not withheld:
                why = invalid_counts(report.activation_counts, shape, self.spec.top_k, reply.tensors.get(TOKENS_PER_LAYER))
                sent_counts = reply.tensors.get(ACTIVATION_COUNTS)  # what the method aggregates by (FLAME, FC-MoE)
                if why is None and sent_counts is not None:
                    # in-process the report is the transport's and the reply the client half's: both are checked,
                    # and must agree (on Flower the report's counts are the reply's)
                    why = invalid_counts(sent_counts, shape, self.spec.top_k, reply.tensors.get(TOKENS_PER_LAYER))
                    if why is None and not torch.equal(sent_counts, report.activation_counts):
                        why = "activation counts in its reply that are not those of its training report"
                bad = None if why is None else f"an invalid reply: {why}: the update is left out of the aggregation"
            bad = bad or nonfinite(report.loss, reply)
            if bad is None:
                # under SecAgg+ credited once the secure mean says which clients it holds (a dropout is not)
                credit = (report.activation_counts, dict(report.metrics), round_idx)
                if secure:
                    self._uncredited[cid] = credit
                else:
                    self._credit(cid, *credit)
            timing = dict(report.overhead)
            if timing.get("train_s"):
                if report.tokens is not None and not withheld:
                    timing["tokens_per_s"] = report.tokens / timing["train_s"]
                self._clients_s += timing["train_s"]
            # under withheld reports nothing a client's report says is logged, also from a client that sent it
            metrics = {} if withheld else {k: v for k, v in report.metrics.items() if k not in RUNTIME_TRAIN_KEYS}
            told = ({"withheld": list(WITHHELD_TRAINING)} if withheld else
                    {"loss": report.loss, "steps": report.steps, "tokens": report.tokens})
            self.rd.log_metrics({"round": round_idx, "client": cid, "kind": "train", **told, "lr": report.lr,
                                 "bytes_up": up, "bytes_down": down, **timing, **metrics})
            if bad is not None:
                self._failed(round_idx, cid, INVALID if bad.startswith("an invalid reply") else NONFINITE, bad)
                unusable[cid] = bad
                continue
            out.append(Reply(cid, reply))
        need = self.min_replies(len(sampled))
        if len(out) < need:
            if unusable:
                raise RoundFailed(
                    f"round {round_idx}: {len(unusable)} of {len(sampled)} sampled clients sent non-finite or invalid updates "
                    f"({'; '.join(f'client {c}: {w}' for c, w in unusable.items())})"
                    + (f", {len(failures)} failed ({failures})" if failures else "")
                    + f", leaving {len(out)} usable updates, fewer than federation.min_replies ({need}). The round "
                    f"was not applied; {self._intact()}. Non-finite training usually means the learning rate is "
                    f"too high or there is no gradient clipping: {self._start_again()}")
            raise RoundFailed(f"round {round_idx}: {len(out)} of {len(sampled)} sampled clients replied, fewer than "
                              f"federation.min_replies ({need}); failed: {failures}. The last checkpoint "
                              f"(round {self.completed_rounds}) is intact: resume with "
                              f"`{resume_command(self.rd.path)}`")
        return out

    def _credit(self, cid: int, counts, metrics: dict, round_idx: int) -> None:
        """Client ``cid``'s update of ``round_idx`` went into the aggregate: its ledger says so."""
        rec = self.records[cid]
        rec.rounds_trained += 1
        if counts is not None:  # (None when withheld: then nothing else is used)
            rec.add_counts(counts)
        rec.reported, rec.reported_round = metrics, round_idx

    def _aggregate(self, round_idx: int, sampled: int, replies: list[Reply]) -> tuple[dict, dict, dict]:
        """The method's aggregation, or under ``federation.dp`` its private form (clipped updates, Gaussian
        noise, the number of sampled clients as the denominator); a result that is not finite is not applied."""
        conflict = {}
        if self.cfg.eval.update_conflict:
            from .conflict import update_conflict

            layer_of = {n: layer for n, layer in self.spec.inventory.expert_layers().items() if n in self.global_state}
            conflict = update_conflict(self.global_state, [r.message.tensors for r in replies], layer_of)
        if self.cfg.federation.secagg is not None:
            new, server_state, metrics = self._secure_aggregate(round_idx, sampled, replies)
        elif self.cfg.federation.robust is not None:
            from .robust import TooFewForTheRule, robust_aggregate

            try:
                new, server_state, metrics = robust_aggregate(self.receiver, self.cfg, self.global_state,
                                                              self.server_state, replies, round_idx)
            except TooFewForTheRule as e:
                raise RoundFailed(f"{e}; {self._intact()}") from None
        elif self.cfg.federation.dp is None or self.cfg.federation.dp.where == "client":
            new, server_state, metrics = self.receiver.aggregate(self.global_state, self.server_state, replies,
                                                                 round_idx=round_idx)
        else:
            from .dp import private_aggregate

            new, server_state, metrics = private_aggregate(self.server, self.cfg, self.global_state, self.server_state,
                                                           replies, sampled, round_idx)
        metrics = {**conflict, **metrics}
        bad = [n for n, t in new.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise RoundFailed(f"round {round_idx}: the aggregate of {len(replies)} finite client updates is not finite "
                              f"in {len(bad)} tensors ({', '.join(bad[:3])}): the round was not applied; "
                              f"{self._intact()}")
        if self.cfg.federation.dp is not None:
            from .dp import round_metrics

            if self.cfg.federation.dp.where == "server":
                self._count_release()  # before the noised model first leaves (its evaluation, the next round)
            # local DP: every reply a client sent is a release, also one left out here (invalid, non-finite)
            trained = [rec.replies_sent for rec in self.records.values()]
            metrics = {**metrics, **round_metrics(self.cfg, self.central_releases, trained)}
        return new, server_state, metrics

    RELEASES_FILE = "dp-releases.json"  # central DP: every noised aggregate computed, a round run again included

    def _count_release(self) -> None:
        """Central DP: a noised aggregate is a release once it leaves the server (the evaluation that sends it to the
        clients, the next round's training). A round whose model left but that was not checkpointed (its evaluation
        failed, the server was killed) runs again after a resume with fresh secret noise on the same clipped sum: a
        second release of it, which averaged with the first halves its noise. So every aggregate is counted, written
        to the run directory before the model leaves, and ε is over them all (a checkpoint holds only applied
        rounds)."""
        from ..rundir import atomic_write_text

        self.central_releases += 1
        atomic_write_text(self.rd.path / self.RELEASES_FILE, json.dumps({"releases": self.central_releases}) + "\n")

    def _counted_releases(self) -> None:
        """After a restore: the noised aggregates the run directory counted, where more than the rounds applied."""
        self.central_releases = self.completed_rounds
        path = self.rd.path / self.RELEASES_FILE
        if not path.is_file():
            return
        try:
            n = json.loads(path.read_text())["releases"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunDirError(f"{path} is not readable ({e}): it counts the noised aggregates this central-DP run "
                              "released; restore it, or start a new run") from None
        if isinstance(n, int) and not isinstance(n, bool) and n > self.central_releases:
            self.central_releases = n

    def _secure_aggregate(self, round_idx: int, sampled: int, replies: list[Reply]) -> tuple[dict, dict, dict]:
        """SecAgg+ over the clients that trained: the server gets the weighted mean of their masked updates
        (:meth:`secagg_spec`), never one of them, and the method aggregates from it."""
        uniform = self.server.secagg_weights(self.cfg) == "uniform"
        weights = {r.client: 1.0 if uniform else float(r.message.scalars[N_TRAIN]) for r in replies}
        spec = self.secagg_spec()
        mean, included, failed, metrics = self.transport.secure_mean(round_idx, weights, spec)
        for cid, why in sorted(failed.items()):
            self._failed(round_idx, cid, "secure aggregation", why)
        uncredited, self._uncredited = self._uncredited, {}
        sent = metrics.pop("bytes", {})  # what each client sent and received in SecAgg+'s four stages, measured
        for cid, (up, down) in sent.items():
            self.records[cid].bytes_up += up
            self.records[cid].bytes_down += down
        need = self.min_replies(sampled)
        if mean is None or len(included) < need:
            raise RoundFailed(f"round {round_idx}: secure aggregation gave no mean ({metrics.get('halted') or ''}): "
                              f"{len(included)} of {sampled} sampled clients took part, federation.min_replies is "
                              f"{need}; failed: {failed}. The round was not applied; {self._intact()}")
        for cid in sorted(included):  # the clients the mean holds (a dropout's trained update is not in it)
            if cid in uncredited:
                self._credit(cid, *uncredited[cid])
        new, server_state, own = self.server.secure_aggregate(self.global_state, self.server_state, mean, len(included),
                                                              round_idx=round_idx)
        return new, server_state, {**own, **{k: v for k, v in metrics.items() if k != "halted"},
                                   "secagg_clients": sorted(included),
                                   "secagg_bytes_up": {c: up for c, (up, _) in sorted(sent.items())}}

    def _start_again(self) -> str:
        """How to start this run again with other settings (a new run: this directory keeps the stopped one)."""
        return ("start a new run with a lower train.lr or with train.grad_clip set (this directory keeps the stopped "
                "run: give the new one another name with --set name=..., or replace it with --overwrite)")

    def _intact(self) -> str:
        """What a round that stops the run leaves behind."""
        path = self.rd.checkpoint_dir / CHECKPOINT_FILE
        if not path.is_file():
            return "no checkpoint had been written yet"
        return f"the checkpoint of round {self.completed_rounds} ({path}) is intact"

    def _failed(self, round_idx: int, cid: int, stage: str, why) -> None:
        self.log(f"round {round_idx}: client {cid} " + (f"sent {why}" if stage == NONFINITE else f"failed to {stage}: {why}"))
        self.failures.append({"round": round_idx, "client": cid, "stage": stage, "error": str(why)})
        self.rd.log_metrics({"round": round_idx, "client": cid, "kind": "failure", "stage": stage, "error": str(why)})

    def min_replies(self, sampled: int) -> int:
        m = self.cfg.federation.min_replies
        # (a new run asking more than a round samples is refused, config.refuse_for_a_new_run; an older run's config
        # that asks it is lowered to them, as the fedmoe that started it did)
        return max(1, (sampled + 1) // 2) if m is None else min(m, sampled)

    def _general_wanted(self) -> bool:
        """Whether an evaluation with ``general`` computes anything: the general text, MMLU or the held-out set."""
        return bool(self.cfg.eval.general_blocks or self.cfg.eval.mmlu or self.cfg.data.heldout)

    def _general_again(self, round_idx: int, msgs: dict[int, Message], global_msg: Message | None,
                       into: dict, failed: dict[int, str], prog: Progress) -> None:
        """The numbers on shared data (general text, MMLU, the held-out set) of the global model, asked again of
        one more client when the client chosen for them (:func:`~.evaluation.first_evaluating`) did not give them
        (it failed, or its reply lacked them): the next client whose evaluation came back, in a message of its own
        (``global_msg``: evaluated beside its own model, as in the round's message; None: its own model is the global
        one). Its general numbers go into ``into`` (the results that should have held them: that client's own, or
        the pooled global ones); if it fails as well, it is named, and the round's global numbers lack them."""
        chosen = first_evaluating([(cid, self.records[cid].data) for cid in sorted(msgs)])  # it did not give them
        alt = first_evaluating([(cid, self.records[cid].data) for cid in sorted(msgs) if cid not in failed
                                and cid != chosen and (global_msg is not None or cid in into)])
        if alt is None or (self.records[alt].data is not None and "n_test" not in self.records[alt].data):
            return  # no client that sends its evaluation is left to ask
        data = {alt: self.records[alt].data}
        if global_msg is None:
            got, why = self.transport.evaluate(round_idx, {alt: msgs[alt]}, False, {alt: True}, prog)
            got, bad = screened({c: r for c, r in got.items() if r != WITHHELD_EVALUATION}, data,
                                self.cfg.data.max_length)
            res = got.get(alt)
        else:
            _, why, res, bad = self.transport.evaluate_with_global(round_idx, {alt: msgs[alt]}, global_msg, False,
                                                                   {alt: False}, True, prog)
        if res is None or not has_general(res):
            self._failed(round_idx, alt, "evaluate the general text and MMLU on the global model",
                         {**why, **bad}.get(alt, "its reply held no general numbers"))
            return
        target = into[alt] if global_msg is None else into
        target.update({k: res[k] for k in GENERAL_PARTS if k in res})
        target["eval_s"] = target.get("eval_s", 0.0) + res.get("eval_s", 0.0)  # the clients' evaluation time
        self.log(f"round {round_idx}: the general text and MMLU on the global model came from client {alt}")

    def _evaluate(self, round_idx: int, final: bool, prog: Progress) -> dict:
        personalized = self.method.client.personalized
        all_global = not personalized and all(r.profile["k"] == self.spec.top_k for r in self.records.values())

        global_part = {}  # the global model's results and failures, evaluated beside the clients' own (one message each)

        def clients(with_answers, general_for, general):
            msgs = {cid: self._downlink(cid, EVALUATE, round_idx) for cid in sorted(self.records)}
            global_msg = None if all_global else self._downlink(None, EVALUATE, round_idx)
            if all_global:
                results, failed = self.transport.evaluate(round_idx, msgs, with_answers, general_for, prog)
            else:
                results, failed, global_part["results"], global_part["failed"] = self.transport.evaluate_with_global(
                    round_idx, msgs, global_msg, with_answers, general_for, general, prog)
                global_part.update(msgs=msgs, message=global_msg, general=general)
            held = {cid: r for cid, r in results.items() if r == WITHHELD_EVALUATION}  # kept by the client's node
            results = {cid: r for cid, r in results.items() if cid not in held}
            results, bad = screened(results, {cid: self.records[cid].data for cid in results}, self.cfg.data.max_length)
            failed = global_part["own_failed"] = {**failed, **bad}
            for cid, r in results.items():
                # what the client runs (k, rank): kept unless it says otherwise, in the run's bounds
                profile = r.pop("profile", None)
                if profile is not None and not invalid_profile(profile, self.spec.top_k, self._max_rank()):
                    self.records[cid].profile = profile
                self.records[cid].evaluated_round = round_idx
            for cid in sorted(set(msgs) - set(results) - set(held)):
                self._failed(round_idx, cid, "evaluate", failed.get(cid, "no evaluation came back"))
            if all_global and general and self._general_wanted() and not any(map(has_general, results.values())):
                self._general_again(round_idx, msgs, None, results, failed, prog)
            return {**results, **held}

        def global_model():
            res, failed = global_part["results"], global_part["failed"]
            for cid, why in sorted(failed.items()):  # the global numbers leave this client's test data out
                self._failed(round_idx, cid, "evaluate the global model", why)
            if res is None:
                raise RuntimeError(f"round {round_idx}: no client could evaluate the global model: {failed}")
            if global_part["general"] and self._general_wanted() and not has_general(res):
                self._general_again(round_idx, global_part["msgs"], global_part["message"], res,
                                    {**global_part["own_failed"], **failed}, prog)
            if failed:
                res["clients_missing"] = sorted(failed)
            return res

        return self.policy.evaluate_round(round_idx, final, self.records, clients, global_model, all_global, personalized)

    # ------------------------------------------------------------------ the loop
    def resume(self, ck: Checkpoint, stop_after_round: int | None = None) -> dict | None:
        """Continue from a checkpoint (:func:`~fedmoe.federation.directories.open_run_dir`): its state
        restored, the metrics rows written after it dropped (those rounds are run again), a newer
        checkpoint file that could not be read set aside (the next checkpoint must not keep it as the
        previous one); a run whose rounds were all done only writes its summary again."""
        if ck.unreadable is not None:
            os.replace(ck.unreadable, f"{ck.unreadable}.unreadable")
        stale = remove_stale_temporaries(self.rd.checkpoint_dir)  # a checkpoint write killed midway
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) an interrupted checkpoint write left in "
                     f"{self.rd.checkpoint_dir}: {', '.join(f.name for f in stale)}")
        self.restore(ck.state)
        self._counted_requests()
        self._counted_releases()
        self.rd.truncate_metrics(after_round=self.completed_rounds)
        if self.completed_rounds >= self.cfg.federation.rounds:
            self._t0 = time.time()
            return self.finish()
        return self.run(stop_after_round=stop_after_round)

    def run(self, stop_after_round: int | None = None) -> dict | None:
        cfg = self.cfg
        self._t0 = time.time()
        rounds = cfg.federation.rounds
        if cfg.report.tensorboard:
            from ..report.tensorboard import require_tensorboard

            require_tensorboard()
        if hasattr(self.transport, "reply_spec"):  # a transport that decodes replies checks their names first
            # (the global tensors' shapes and the method's extras do not change over a run)
            extras = self.receiver.reply_extras(self.global_state)
            self.transport.reply_spec = {**{n: tuple(t.shape) for n, t in self.global_state.items()},
                                         **{n: None if s is None else tuple(s[0]) for n, s in extras.items()}}
        with Progress(self.show_progress) as prog:
            self.transport.wait_for_clients()
            self._log_starts(self.completed_rounds + 1)
            if not self.resuming:
                self._setup(prog)
                self.rd.finish_replacement()  # data, model and clients are ready: a run this one replaces goes
            rounds_task = prog.task("rounds", rounds)
            prog.update(rounds_task, completed=self.completed_rounds)
            if cfg.eval.zero_shot and self.completed_rounds == 0 and self.zero_shot is None:
                self.zero_shot = self._evaluate(0, final=False, prog=prog)
                self.save()
            for round_idx in range(self.completed_rounds + 1, rounds + 1):
                t_round, self._clients_s, self.policy.clients_s = time.perf_counter(), 0.0, 0.0
                sampled = sample_clients(len(self.records), cfg.federation.fraction, cfg.seed, round_idx)
                replies = self._train(round_idx, sampled, prog)
                t_agg = time.perf_counter()
                self.global_state, self.server_state, metrics = self._aggregate(round_idx, len(sampled), replies)
                aggregate_s = time.perf_counter() - t_agg
                self.rd.log_metrics({"round": round_idx, "client": None, "kind": "server", "aggregate_s": aggregate_s,
                                     # the clients whose updates the aggregate holds (under SecAgg+, secagg_clients)
                                     "clients": metrics.get("secagg_clients", [r.client for r in replies]), **metrics})
                final = round_idx == rounds
                if final or cfg.eval.loss_every_round or cfg.eval.every_round:  # else the round is not evaluated
                    self.global_eval = self._evaluate(round_idx, final=final, prog=prog)
                loss = self.global_eval.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    raise RoundFailed(f"round {round_idx}: the aggregated model's test loss is {loss} (its weights are "
                                      "finite, but the clients' training diverged): the round was not saved; "
                                      f"{self._intact()}. {self._start_again().capitalize()}")
                self._log_starts(round_idx)  # a client whose node came back in this round
                wall = time.perf_counter() - t_round
                clients_s = self._clients_s + self.policy.clients_s
                # the round's time that is neither the clients' training and evaluation nor aggregation
                # (negative when clients work in parallel)
                self.rd.log_metrics({"round": round_idx, "client": None, "kind": "round", "wall_s": wall,
                                     "clients_s": clients_s, "aggregate_s": aggregate_s,
                                     "overhead_s": wall - clients_s - aggregate_s})
                self.completed_rounds = round_idx
                self.save()
                if self.round_lines:
                    failed = sum(f["round"] == round_idx for f in self.failures)
                    loss = self.global_eval.get("loss") if self.global_eval else None
                    self.log(f"round {round_idx}/{rounds}: {len(replies)} of {len(sampled)} sampled clients aggregated, "
                             f"{failed} failures, " + (f"test loss {loss:.4f}, " if isinstance(loss, float) else "")
                             + f"{wall:.1f} s")
                self._tensorboard()
                prog.update(rounds_task, completed=round_idx,
                            info=f"test loss {self.global_eval['loss']:.3f}" if self.global_eval.get("loss") else "")
                if stop_after_round is not None and round_idx >= stop_after_round and round_idx < rounds:
                    return None
        return self.finish()

    def finish(self) -> dict:
        wall = self.wall_before + (time.time() - self._t0)
        trainable = self.spec.initial
        withheld = self.transport.withheld_by_clients() if hasattr(self.transport, "withheld_by_clients") else {}
        metrics = self.rd.read_metrics()
        summary = run_summary(
            self.cfg, self.spec, self.records, {**self.global_eval, "val_loss_lowest": lowest_val_loss(metrics)},
            self.zero_shot, wall,
            extra={"runtime": self.cfg.federation.runtime, "trainable_tensors": len(trainable),
                   **({"run_id": self.transport.run_id} if isinstance(getattr(self.transport, "run_id", None), str) else {}),
                   "trainable_params": int(sum(t.numel() for t in trainable.values())),
                   "shared_params": int(sum(t.numel() for t in self.global_state.values())),
                   "client_setup": {cid: m for cid, m in self.client_setup.items() if len(m) > 1},
                   "client_setup_seconds": {cid: m["seconds"] for cid, m in self.client_setup.items()},
                   "metric_notes": {**(CONFLICT_NOTES if self.cfg.eval.update_conflict else {}), **self.method.notes},
                   "failures": self.failures,
                   **({"withheld_by_clients": withheld} if withheld else {}),
                   **({} if self.cfg.federation.robust is None else {"robust": self.cfg.federation.robust.model_dump()}),
                   **({} if self.cfg.federation.dp is None else {"privacy": self._privacy()})})
        counts = {cid: r.data["category_counts"] for cid, r in self.records.items() if r.data.get("category_counts") is not None}
        histogram = format_histogram_table(counts) if counts else None
        write_report(self.rd, summary, metrics, histogram, figures=self.cfg.report.figures)
        # summary.json last: it marks the run finished (for a resume, and for `fedmoe run` on Flower, which returns
        # when it sees it: a ServerApp that outlived its SuperLink's restart may still be writing)
        self.rd.write_summary(summary)
        self._tensorboard()
        return summary

    def _privacy(self) -> dict:
        from .dp import privacy_summary

        sampled = len(sample_clients(len(self.records), self.cfg.federation.fraction, self.cfg.seed, 1))
        return privacy_summary(self.cfg, self.completed_rounds, sampled,
                               {cid: r.replies_sent for cid, r in self.records.items()},
                               releases=self.central_releases)

    def _tensorboard(self) -> None:
        """``report.tensorboard``: the scalars of metrics.jsonl so far, rebuilt after every round."""
        if self.cfg.report.tensorboard:
            from ..report.tensorboard import write_tensorboard

            write_tensorboard(self.rd.read_metrics(), self.rd.path)


__all__ = ["Federation", "RoundFailed", "make_transport", "nonfinite"]
