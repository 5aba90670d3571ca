"""The federation loop inside a Flower ServerApp: :class:`FlowerTransport` carries the method's
messages to the SuperNodes over Flower's ``Grid`` and their replies back.

Flower's built-in strategies want identical keys from every client in one ArrayRecord; fedmoe's
methods do not send that (FLEx sends only the shared tensors, FLAME its activation counts, HetLoRA a
rank), so the loop is fedmoe's own, over ``grid.send_and_receive``, with the methods' server halves
unchanged.
"""

from __future__ import annotations

import threading
import time
import uuid

from ...messages import Message
from ..directories import with_memory_hint
from ..evaluation import WITHHELD_EVALUATION, first_evaluating, pooled, screened
from ..transport import TrainReport, count, seconds
from .records import from_records, to_records

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"


def _withholds_evaluation(info: dict) -> bool:
    """Whether a client's evaluation reply says its node keeps the result (its privacy budget) and has none."""
    kept = info.get("withheld")
    return (isinstance(kept, list) and WITHHELD_EVALUATION in kept and info.get("result") is None
            and info.get("global_result") is None)


def _message(content, kind: str, node: int, group: str):
    from flwr.app import Message as FlowerMessage

    return FlowerMessage(content, dst_node_id=node, message_type=kind, group_id=group)


# a connected SuperNode that stays silent (no answer, or the SuperLink's "Node Unavailable": no heartbeat)
# set when the process that runs a ServerApp in a thread of its own (Flower's simulation) was stopped (Ctrl-C,
# SIGTERM): the thread's loops that wait on the grid end (ServerStopped) instead of polling an engine that is gone,
# which kept the process alive after it had said it stopped
STOPPED = threading.Event()


class ServerStopped(RuntimeError):
    """The run was stopped while the server waited for its clients (:data:`STOPPED`)."""


def _check_stopped() -> None:
    if STOPPED.is_set():
        raise ServerStopped("the run was stopped (Ctrl-C or SIGTERM) while the server waited for its clients")


SILENT_NODE_HINT = (
    "a SuperNode that is connected but silent may be one message behind: Flower 1.42's SuperNode keeps a message "
    "of a run that stopped (or that a restarted SuperLink lost) while it was pulling it, and from then on sends "
    "each reply only when the next message arrives: restart that SuperNode (its state-dir keeps the client's "
    "private state), then resume")


class FlowerTransport:
    def __init__(self, grid, cfg, log=print, poll_s: float = 1.0, reply_poll_s: float = 0.1, context=None):
        """``context``: the ServerApp's Flower Context (SecAgg+ takes the run's id from it)."""
        self.grid, self.cfg, self.log, self.poll_s, self.reply_poll_s = grid, cfg, log, poll_s, reply_poll_s
        self.context = context
        self.run_id = uuid.uuid4().hex[:12]
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.infos: dict[int, dict] = {}
        self.starts: list[dict] = []  # each client process's start (its load times), not yet taken by started()
        self.failed: tuple[int, set[int]] = (-1, set())  # (round, clients that failed in it): not asked again
        # clients whose node failed a message since it was taken (killed, hung, gone): another node may take them
        # over while Flower still lists the old one as connected (until two 30 s heartbeats are missed)
        self.unanswered: set[int] = set()
        self.withheld: dict[int, set[str]] = {}  # client -> what it kept to itself (flower.client.WITHHELD keys)
        # the tensors a train reply may hold besides those it was sent: name -> shape (None: any), set by the runtime
        # (the global tensors and the method's extras); None: not checked before decoding
        self.reply_spec: dict[str, tuple[int, ...] | None] | None = None

    @property
    def num_clients(self) -> int:
        return self.cfg.data.partition.num_clients

    # ------------------------------------------------------------------ nodes
    def wait_for_clients(self) -> None:
        """Wait (``federation.node_wait_s``) until every client's SuperNode is connected, then ask each
        which client it is (and have it run its one-shot setup, once per run)."""
        deadline = time.time() + self.cfg.federation.node_wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.num_clients:
                break
            if time.time() > deadline:
                raise TimeoutError(
                    f"{len(nodes)} of {self.num_clients} clients' SuperNodes connected within "
                    f"federation.node_wait_s = {self.cfg.federation.node_wait_s:g} s: start the missing ones "
                    f"(flower-supernode --superlink ... --node-config 'partition-id=N ...'), or lower "
                    f"data.partition.num_clients")
            _check_stopped()
            time.sleep(self.poll_s)
        # ask which client each node is; a node that has not answered (a slow machine, a ClientApp still
        # starting) is asked again until node_wait_s is over
        seen: dict[int, list[int]] = {}
        while True:
            asked = sorted(set(self.grid.get_node_ids()) - {n for ns in seen.values() for n in ns})
            left = deadline - time.time()
            for c, ns in self._query(asked, wait_s=max(left, self.poll_s)).items():
                seen.setdefault(c, []).extend(ns)
            if len(seen) >= self.num_clients or time.time() >= deadline:
                break
            _check_stopped()
            time.sleep(self.poll_s)
        dup = {c: n for c, n in seen.items() if len(n) > 1}
        missing = sorted(set(range(self.num_clients)) - set(seen))
        if not seen:
            raise TimeoutError(f"no SuperNode answered which client it is within federation.node_wait_s = "
                               f"{self.cfg.federation.node_wait_s:g} s ({len(nodes)} connected): see the SuperNodes' "
                               "logs (their ClientApps may fail to start), or raise federation.node_wait_s on a slow "
                               "machine")
        if dup or missing:
            late = "" if not missing else f"; {SILENT_NODE_HINT}"
            raise RuntimeError(f"the SuperNodes must be clients 0..{self.num_clients - 1}, each once (node config "
                               f"partition-id): nodes {dup} claim the same client; clients {missing} did not answer "
                               f"within federation.node_wait_s = {self.cfg.federation.node_wait_s:g} s{late}")
        self.node_of.update({c: n[0] for c, n in seen.items()})

    def _refresh(self) -> set[int]:
        """Ask SuperNodes that connected since (a restarted one has a new node id) which client they
        are; returns the clients whose node is not connected now."""
        nodes = set(self.grid.get_node_ids())
        new = sorted(nodes - set(self.node_of.values()))
        if new:
            seen = self._query(new, partial=True, connected=nodes)
            for c, n in seen.items():
                if len(n) > 1:  # two new nodes for one client: neither is taken (the client's node stays gone)
                    self.log(f"SuperNodes {n} all say they are client {c}: none of them is taken")
                    continue
                self.log(f"client {c} is back, on SuperNode {n[0]} (was {self.node_of.get(c)})")
                self.node_of[c] = n[0]
                self.unanswered.discard(c)
        return {cid for cid, nid in self.node_of.items() if nid not in nodes}

    def _query(self, nodes: list[int], partial: bool = False, wait_s: float | None = None,
               connected: set[int] | None = None) -> dict[int, list[int]]:
        """{client: the nodes that said they are it} of the ``nodes`` that answered (within ``wait_s``, else
        ``federation.round_timeout_s``); a node that fails its setup, or answers with no client id of this run, is an
        error unless ``partial`` (mid-run), where it is left out with a line in the log, as is a node that says it
        is a client whose node is still ``connected`` and has failed no message since it was taken (it would get
        that client's messages and answer for it; a node killed and restarted is taken at once: its old node failed
        the message it did not answer, though Flower lists it for up to a minute). A
        client that comes back keeps the data description it gave at the run's setup (what its results are held
        to), whatever the new node says."""
        header = Message(header={"kind": QUERY, "round": 0, "run_id": self.run_id})
        msgs = [_message(to_records(header), QUERY, nid, "setup") for nid in nodes]
        seen: dict[int, list[int]] = {}
        for reply in self._send_and_receive(msgs, timeout=wait_s):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                if partial:  # a node seen mid-run that does not answer (yet): it is asked again next time
                    self.log(f"a SuperNode that connected mid-run did not answer which client it is "
                             f"({reply.error.reason}); asking again before the next message")
                    continue
                stuck = f"; {SILENT_NODE_HINT}" if "Node Unavailable" in str(reply.error.reason) else ""
                raise RuntimeError(f"the SuperNode {nid} failed its setup: {reply.error.reason}{stuck}")
            try:
                _, info = from_records(reply.content, expect={})  # a setup reply holds no tensor: one is refused unread
                client = info.get("client") if isinstance(info, dict) else None
                if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < self.num_clients:
                    raise ValueError(f"it says it is client {str(client)[:40]!r}, not one of 0..{self.num_clients - 1}")
            except Exception as e:  # noqa: BLE001 - whatever a node sent
                why = f"the SuperNode {nid} answered which client it is unreadably ({type(e).__name__}: {str(e)[:200]})"
                if partial:
                    self.log(f"{why}: it is not taken")
                    continue
                raise RuntimeError(f"{why}: the run was not started; check that every SuperNode runs this fedmoe "
                                   "version") from None
            if partial:
                serving = self.node_of.get(client)
                if serving is not None and serving in (connected or ()) and client not in self.unanswered:
                    self.log(f"SuperNode {nid} says it is client {client}, whose SuperNode {serving} is still "
                             "connected and answering: it is not taken")
                    continue
                if client in self.infos:  # what its results are screened against stays what it declared at setup
                    info = {**info, "data": self.infos[client].get("data")}
            self._note_withheld(info)
            seen.setdefault(client, []).append(nid)
            self.infos[client] = info
            self._note_start(info)
        return seen

    def _note_withheld(self, info: dict, cid: int | None = None) -> None:
        kept = info.get("withheld")
        if isinstance(kept, list) and kept:
            self.withheld.setdefault(info.get("client") if cid is None else cid, set()).update(map(str, kept))

    def withheld_by_clients(self) -> dict[str, list[int]]:
        """What the server did not receive, and from which clients: {what: [client, ...]}."""
        from .client import WITHHELD

        out: dict[str, list[int]] = {}
        for cid, keys in sorted(self.withheld.items()):
            for k in sorted(keys & set(WITHHELD)):
                out.setdefault(WITHHELD[k], []).append(cid)
        return out

    def _note_start(self, info: dict) -> None:
        """A query's reply: the client's process loaded its data (``load_s``), and the model (``model_s``, part of
        it) when it was the process's first client; 0 when the process had them already; and the device it trains
        on. A timing that is not a duration is not recorded (a client that lies about it loses nothing but the
        row), nor a device that is not a device's name."""
        try:
            times = {k: seconds(info, k) for k in ("load_s", "model_s") if k in info}
            c = count(info, "client")
        except (KeyError, ValueError):
            return
        device = info.get("device")
        if "load_s" in times and c < self.num_clients:
            # the device it runs on, as torch names it (cpu, cuda:0, ...)
            ok = isinstance(device, str) and device.replace(":", "").isalnum() and len(device) <= 32
            self.starts.append({"client": c, **times, **({"device": device} if ok else {})})

    def started(self) -> list[dict]:
        """The client process starts since the last call: [{"client", "load_s", "model_s", "device"}]."""
        starts, self.starts = self.starts, []
        return starts

    def _send(self, round_idx: int, kind: str, messages: dict[int, Message], infos: dict[int, dict] | None = None,
              also: Message | None = None, timeout: float | None = None, expect: dict[int, dict] | None = None):
        """({client: (reply message, info)}, {client: why it failed}). A client that failed earlier in
        this round, or whose SuperNode is not connected, is not asked. ``also``: a second message sent to every
        client beside its own (:func:`~.records.to_records`); ``timeout``: in place of ``federation.round_timeout_s``;
        ``expect``: per client, the tensors its reply may hold (:func:`~.records.from_records`)."""
        if self.failed[0] != round_idx:
            self.failed = (round_idx, set())
        gone = self._refresh()
        failed = {cid: f"node {self.node_of[cid]}: not connected" for cid in messages if cid in gone}
        failed.update({cid: "failed earlier in this round" for cid in messages if cid in self.failed[1]})
        by_node = {}
        out = []
        for cid, msg in messages.items():
            if cid in failed:
                continue
            nid = self.node_of[cid]
            by_node[nid] = cid
            content = to_records(msg.with_header(run_id=self.run_id), None if infos is None else infos[cid],
                                 None if also is None else also.with_header(run_id=self.run_id))
            out.append(_message(content, kind, nid, str(round_idx)))
        got = {}
        for reply in self._send_and_receive(out, timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                failed[cid] = with_memory_hint(
                    f"node {reply.metadata.src_node_id}: {reply.error.reason} (code {reply.error.code})")
                continue
            try:
                msg, info = from_records(reply.content, None if expect is None else expect.get(cid))
                if not isinstance(info, dict):
                    raise ValueError(f"its info is a {type(info).__name__}")
            except Exception as e:  # noqa: BLE001 — whatever a client sent, it is that client's failure
                failed[cid] = f"node {reply.metadata.src_node_id}: an unreadable reply ({type(e).__name__}: {str(e)[:200]})"
                continue
            self._note_withheld(info, cid)
            got[cid] = (msg, info)
        for cid in messages:
            if cid not in got and cid not in failed:
                failed[cid] = (f"node {self.node_of[cid]}: no reply within "
                               + (f"{timeout:g} s (twice federation.round_timeout_s: the message holds two evaluations)"
                                  if timeout is not None else
                                  f"federation.round_timeout_s = {self.cfg.federation.round_timeout_s} s"))
        self.failed[1].update(failed)
        self.unanswered.update(failed)
        return got, failed

    def _send_and_receive(self, messages: list, timeout: float | None = None) -> list:
        """Every reply, at most ``federation.max_inflight`` messages out at once, waiting ``timeout`` s (None:
        ``federation.round_timeout_s``). Replies are pulled every ``reply_poll_s`` (Flower's own
        ``send_and_receive`` pulls every 3 s on a deployment, which a round pays once per message type)."""
        step = self.cfg.federation.max_inflight or max(1, len(messages))
        timeout = self.cfg.federation.round_timeout_s if timeout is None else timeout
        replies = []
        for i in range(0, len(messages), step):
            waiting = set(self.grid.push_messages(messages[i : i + step]))
            end = None if timeout is None else time.monotonic() + timeout
            while waiting:
                got = list(self.grid.pull_messages(waiting))
                replies += got
                waiting -= {m.metadata.reply_to_message_id for m in got}
                if waiting and end is not None and time.monotonic() >= end:
                    break
                if waiting:
                    _check_stopped()
                    time.sleep(self.reply_poll_s)
        return replies

    # ------------------------------------------------------------------ the transport
    def setup(self, prog) -> dict[int, dict]:
        return {cid: {"setup": info["setup"], "data": info["data"], "profile": info["profile"],
                      "withheld": info.get("withheld") if isinstance(info.get("withheld"), list) else []}
                for cid, info in sorted(self.infos.items())}

    def train(self, round_idx: int, messages: dict[int, Message], prog):
        # what a reply may hold (the runtime's rule, invalid_reply): the tensors it was sent, the global ones and the
        # method's extras; a tensor beyond them is refused before it is decoded
        expect = {cid: {**self.reply_spec, **{n: tuple(t.shape) for n, t in msg.tensors.items()}}
                  for cid, msg in messages.items()} if self.reply_spec is not None else None
        got, failed = self._send(round_idx, TRAIN, messages, expect=expect)
        replies = {}
        for cid, (msg, info) in got.items():
            if msg is None:  # a reply without its message's records: no update to read
                failed[cid] = f"node {self.node_of[cid]}: a training reply without its tensors record"
                continue
            # the client's time to load its model and data (0 while its process keeps them) and its work
            try:
                times = {k: seconds(info, k) for k in ("load_s", "work_s")}
                report = TrainReport.from_info(info["report"], msg, load_s=times["load_s"], train_s=times["work_s"])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # malformed: this client fails
                failed[cid] = f"node {self.node_of[cid]}: an unreadable training report ({type(e).__name__}: {e})"
                continue
            replies[cid] = (msg, report)
        return replies, failed

    def evaluate(self, round_idx: int, messages: dict[int, Message], with_answers: bool, general_for: dict[int, bool],
                 prog) -> tuple[dict[int, dict], dict[int, str]]:
        infos = {cid: {"with_answers": with_answers, "general": general_for[cid]} for cid in messages}
        got, failed = self._send(round_idx, EVALUATE, messages, infos, expect={cid: {} for cid in messages})
        return self._own_results(got), failed

    @staticmethod
    def _own_results(got: dict) -> dict[int, dict]:
        """{client: its own model's results}, the marker of a kept evaluation where its reply says its node keeps it;
        a reply that only sends the marker's text as its result is not taken for one (it is an invalid result)."""
        def own(info):
            if _withholds_evaluation(info):
                return WITHHELD_EVALUATION
            r = info.get("result")
            return [r] if r == WITHHELD_EVALUATION else r

        return {cid: own(info) for cid, (_, info) in got.items()}

    def evaluate_with_global(self, round_idx: int, messages: dict[int, Message], global_message: Message,
                             with_answers: bool, general_for: dict[int, bool], general: bool, prog):
        """Each client's own model and the global model on its own test data, in one message per client (the
        global model's tensors that equal the client's own downlink travel once): a round trip less than two
        messages, which on a SuperNode without a worker is a process start and a model load less. The message
        covers two evaluations, so it is given twice ``federation.round_timeout_s`` (as the two messages were). The
        global results are pooled in client order; the general text and MMLU on the global model are asked of one
        of the addressed clients, chosen before the message is sent (:func:`~fedmoe.federation.evaluation.
        first_evaluating`: if it fails, the loop asks the next one). A client whose message failed is missing from
        both results, named in each; one whose global evaluation alone failed keeps its own. The global results are
        None when no client gave any and none kept its evaluation."""
        first = first_evaluating([(cid, self.infos.get(cid, {}).get("data")) for cid in sorted(messages)])
        infos = {cid: {"with_answers": with_answers, "general": general_for[cid],
                       "global": {"general": general and cid == first}} for cid in messages}
        timeout = self.cfg.federation.round_timeout_s
        got, failed = self._send(round_idx, EVALUATE, messages, infos, expect={cid: {} for cid in messages},
                                 also=global_message,
                                 timeout=None if timeout is None else 2 * timeout)
        return self._both_results(got, failed)

    def _both_results(self, got: dict, failed: dict[int, str]):
        """:meth:`evaluate_with_global`'s four results from the replies that came back (``got``: {client: (message,
        info)}) and the clients whose message failed."""
        cids = sorted(self.node_of)
        own = self._own_results(got)
        held = [cid for cid in cids if cid in got and _withholds_evaluation(got[cid][1])]
        global_failed, given = dict(failed), {}
        for cid in cids:
            if cid not in got or cid in held:
                continue
            info = got[cid][1]
            if "global_error" in info:  # its own evaluation stands
                global_failed[cid] = with_memory_hint(f"node {self.node_of[cid]}: {str(info['global_error'])[:500]}")
            elif "global_result" not in info:
                global_failed[cid] = (f"node {self.node_of[cid]}: its reply carries no evaluation of the global model "
                                      "(does that SuperNode run this fedmoe version? every node must)")
            else:
                given[cid] = info["global_result"]
        results, bad = screened(given, {cid: self.infos.get(cid, {}).get("data") for cid in cids}, self.cfg.data.max_length)
        global_failed.update(bad)
        if not results and not held:  # the loop names the failures and stops
            return own, failed, None, global_failed
        res = [results[cid] for cid in cids if cid in results]
        # the clients whose nodes keep their evaluation (a node's privacy budget) are not in the numbers: named
        pooled_res = {**pooled(res), "eval_s": sum(r.get("eval_s", 0.0) for r in res),
                      **({"clients_withheld": held} if held else {})}
        return own, failed, pooled_res, global_failed

    def secure_mean(self, round_idx: int, weights: dict[int, float], spec: list[tuple[str, tuple[int, ...]]]):
        """(the weighted mean of the clients' masked updates as named float64 tensors, or None; the clients
        included; {client: why it failed}; metrics) through SecAgg+ (:mod:`.secagg`): each client in
        ``weights`` answers with the update it kept at its last train message, weighted by its weight."""
        import math

        from .secagg import secure_weighted_sum, unflatten_tensors

        sc = self.cfg.federation.secagg
        nodes = {self.node_of[cid]: cid for cid in sorted(weights)}
        payloads = {nid: {"fedmoe.run_id": self.run_id, "fedmoe.client": cid} for nid, cid in nodes.items()}
        length = sum(math.prod(shape) for _, shape in spec)
        res = secure_weighted_sum(self.grid, list(nodes), payloads, length, max_weight=max(weights.values()),
                                  round_idx=round_idx, num_shares=float(sc.share_fraction),
                                  reconstruction_threshold=float(sc.threshold_fraction),
                                  clipping_range=sc.clipping_range, quantization_range=sc.quantization_range,
                                  timeout=self.cfg.federation.round_timeout_s, poll_s=self.reply_poll_s,
                                  context=self.context)
        failed = {nodes[nid]: f"node {nid}: {why}" for nid, why in res.failures.items() if nid in nodes}
        included = [nodes[nid] for nid in res.included if nid in nodes]
        metrics = {"secagg_s": res.seconds, "halted": res.halted,
                   "bytes": {cid: (res.bytes_up.get(nid, 0), res.bytes_down.get(nid, 0)) for nid, cid in nodes.items()}}
        if res.mean is None:
            return None, included, failed, metrics
        return unflatten_tensors(res.mean, [(n, s, "float64") for n, s in spec]), included, failed, metrics

    def state(self) -> dict:
        return {"run_id": self.run_id, "withheld": {str(c): sorted(k) for c, k in self.withheld.items()}}

    def restore(self, state: dict) -> None:
        self.run_id = state["run_id"]
        self.withheld = {int(c): set(k) for c, k in state.get("withheld", {}).items()}
