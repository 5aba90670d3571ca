"""Secure aggregation (Flower's SecAgg+) for fedmoe's own federation loop over a Flower ``Grid``.

Flower 1.42 offers SecAgg+ only as a legacy workflow: ``flwr.server.workflow.SecAggPlusWorkflow``
under a ``LegacyContext`` whose Strategy's ``configure_fit`` names the nodes and ``aggregate_fit``
receives the result, and ``flwr.client.mod.secaggplus_mod`` on the ClientApp, which masks the
legacy ``FitRes`` the train handler returns. :func:`secure_weighted_sum` drives that workflow with
a private Strategy and a private Context, so a ServerApp that otherwise runs its own loop can call it
in any round: the run's ``context.state`` is not touched and the grid is used only through
``push_messages`` / ``pull_messages`` of this call's own messages (a late reply of a timed-out
message is never pulled by anyone else's ``pull_messages(ids)``).

What travels (all ``message_type="train"``, ``group_id=str(round_idx)``; the workflow cannot use
another type: the mod only acts on exactly ``"train"``):

* four round trips per call: ``setup`` (protocol parameters -> two public keys), ``share_keys``
  (neighbours' public keys -> encrypted key shares), ``collect_masked_vectors`` (the fit
  instruction + forwarded shares -> the masked, quantised vector) and ``unmask`` (active/dead
  lists -> key shares). Each message carries the ConfigRecord ``"secaggplus_configs"`` (key
  ``"stage"``). The mod answers setup, share_keys and unmask itself; only the
  ``collect_masked_vectors`` message reaches the ``@client_app.train()`` handler;
* that message's content is the legacy FitIns: ``"fitins.parameters"`` (an empty ArrayRecord) and
  ``"fitins.config"`` (a ConfigRecord with :data:`SECAGG_FLAG` = True and the ``fedmoe.secagg.*``
  keys below, plus a payload dict's entries), plus the records of a RecordDict payload, plus
  ``"secaggplus_configs"``;
* the handler must answer with the legacy FitRes content (:func:`secagg_reply_content`):
  ``"fitres.parameters"`` (one float64 array, the client's vector), ``"fitres.num_examples"``
  (MetricRecord ``{"num_examples": weight}``), ``"fitres.metrics"`` and ``"fitres.status"``
  (ConfigRecords). The mod quantises and masks the vector and clears every ArrayRecord of the reply;
  ConfigRecords and MetricRecords go to the server AS THEY ARE: the weight and the metrics of each
  client are not secret.

Client side wiring (the train handler must tell SecAgg+ fits from fedmoe's own ``train``)::

    @client_app.train(mods=[secaggplus_mod_if_marked])
    def _train(message, context):
        if is_secagg_message(message):
            ins = read_secagg_instruction(message)
            vec = ...  # this client's flat vector for ins.round_idx (length ins.vector_len)
            return secagg_reply(message, vec, weight)
        ...  # fedmoe's normal train message

``secaggplus_mod`` itself must not see fedmoe's plain ``train`` messages (it raises a KeyError on a
message without ``"secaggplus_configs"``): hence :func:`secaggplus_mod_if_marked`.

The result (see :func:`unmask_formula` below and ``secaggplus_workflow.py`` lines 639-650 in flwr):
with ``r_i = round(w_i / max_weight * Q) / Q`` (Q = quantization_range), the server gets
``mean = sum_i clip(r_i * x_i, +-clipping_range) / sum_i r_i``, i.e. the weighted mean with weights
quantised to 1/Q, up to stochastic rounding of each client's ``r_i * x_i`` to a grid of
``2 * clipping_range / Q``; :func:`error_bound` gives the bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SECAGG_FLAG = "fedmoe.secagg"  # True in "fitins.config" of every SecAgg+ fit instruction of this module
CFG_ROUND = "fedmoe.secagg.round"
CFG_VECTOR_LEN = "fedmoe.secagg.vector_len"
CFG_MAX_WEIGHT = "fedmoe.secagg.max_weight"
CFG_CLIPPING_RANGE = "fedmoe.secagg.clipping_range"
CFG_QUANTIZATION_RANGE = "fedmoe.secagg.quantization_range"
FIT_CONFIG = "fitins.config"  # the legacy FitIns config record (flwr recorddict_compat)
SECAGG_CONFIGS = "secaggplus_configs"  # flwr's RECORD_KEY_CONFIGS
_RESERVED = {"fitins.parameters", FIT_CONFIG, SECAGG_CONFIGS}
MAX_QUANTIZATION_RANGE = 2**30  # the mod stochastically rounds into int32


# ============================================================================ flat vectors
def flatten_tensors(tensors: Mapping[str, Any], dtype=np.float64) -> tuple[np.ndarray, list[tuple[str, tuple, str]]]:
    """(one flat numpy vector of ``dtype``, the spec to undo it): the tensors (torch or numpy) in
    sorted name order, each flattened; the spec lists ``(name, shape, dtype name)``."""
    import torch

    spec, parts = [], []
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            spec.append((name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
            parts.append(t.detach().to("cpu", torch.float64).reshape(-1).numpy())
        else:
            a = np.asarray(t)
            spec.append((name, tuple(a.shape), "numpy." + a.dtype.name))
            parts.append(a.astype(np.float64).reshape(-1))
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return flat.astype(dtype, copy=False), spec


def unflatten_tensors(vector: np.ndarray, spec: list[tuple[str, tuple, str]]) -> dict[str, Any]:
    """The named tensors of :func:`flatten_tensors` back, each in its recorded shape and dtype
    (torch tensors, or numpy arrays for those recorded as ``numpy.*``)."""
    import torch

    vector = np.asarray(vector)
    need = sum(math.prod(shape) for _, shape, _ in spec)
    if vector.ndim != 1 or vector.size != need:
        raise ValueError(f"a vector of {need} values expected for this spec, got shape {vector.shape}")
    out, at = {}, 0
    for name, shape, dt in spec:
        n = math.prod(shape)
        part = vector[at : at + n].reshape(shape)
        at += n
        if dt.startswith("numpy."):
            out[name] = part.astype(dt.removeprefix("numpy."))
        else:
            out[name] = torch.from_numpy(np.array(part, dtype=np.float64)).to(getattr(torch, dt))
    return out


# ============================================================================ precision
def quantized_ratio(weight: float, max_weight: float, quantization_range: int) -> float:
    """``r = round(weight / max_weight * Q) / Q``: the weight as the mod uses it (secaggplus_mod.py:443-453)."""
    return round(weight / max_weight * quantization_range) / quantization_range


def unmask_formula(vectors, weights, *, max_weight: float, clipping_range: float, quantization_range: int) -> np.ndarray:
    """What SecAgg+ computes without its stochastic rounding: ``sum_i clip(r_i x_i) / sum_i r_i``."""
    r = np.array([quantized_ratio(w, max_weight, quantization_range) for w in weights])
    xs = np.stack([np.asarray(v, np.float64) for v in vectors])
    return np.clip(r[:, None] * xs, -clipping_range, clipping_range).sum(0) / r.sum()


def error_bound(weights, *, max_weight: float, clipping_range: float, quantization_range: int,
                max_abs: float) -> float:
    """A per-coordinate bound on ``|SecAgg+ mean - sum_i w_i x_i / sum_i w_i|`` when no ``w_i x_i /
    max_weight`` is clipped and ``|x_i| <= max_abs``. Each client's ``r_i x_i`` is stochastically
    rounded to a grid of ``2c/Q`` (error < one step), the sum is divided by ``S = sum_i r_i``, and
    each ``r_i`` is off ``w_i / max_weight`` by at most ``1/(2Q)``:
    ``N * 2c / (Q S) + N * max_abs / (Q S)``. Best with ``max_weight`` close to the largest weight
    (then ``S >= 1``) and Q as large as :func:`default_quantization_range` allows."""
    n, q = len(weights), quantization_range
    s = sum(quantized_ratio(w, max_weight, q) for w in weights)
    return n * (2 * clipping_range + max_abs) / (q * s)


def default_quantization_range(num_nodes: int, modulus_range: int = 2**32) -> int:
    """The largest power of two Q with ``num_nodes * Q < modulus_range`` (the sum of every client's
    quantised values, each in [0, Q], and of their quantised weights must not wrap), at most 2**30."""
    q = 1
    while q * 2 * max(num_nodes, 1) < modulus_range and q * 2 <= MAX_QUANTIZATION_RANGE:
        q *= 2
    return q


# ============================================================================ client side
@dataclass
class SecAggInstruction:
    """The fit instruction of a SecAgg+ round as the train handler sees it."""

    round_idx: int
    vector_len: int
    max_weight: float
    clipping_range: float
    quantization_range: int
    config: dict  # the whole "fitins.config" (a dict payload's entries included)
    content: Any  # the message's RecordDict (a RecordDict payload's records included)


def is_secagg_message(message) -> bool:
    """Whether a ``train`` message is this module's SecAgg+ fit instruction (not fedmoe's own train)."""
    if message.metadata.message_type != "train":
        return False
    cfg = message.content.config_records.get(FIT_CONFIG)
    return cfg is not None and cfg.get(SECAGG_FLAG) is True


def read_secagg_instruction(message) -> SecAggInstruction:
    """The instruction out of a SecAgg+ fit message (see :func:`is_secagg_message`)."""
    if not is_secagg_message(message):
        raise ValueError("not a SecAgg+ fit message of fedmoe.federation.flower.secagg")
    cfg = dict(message.content.config_records[FIT_CONFIG])
    return SecAggInstruction(int(cfg[CFG_ROUND]), int(cfg[CFG_VECTOR_LEN]), float(cfg[CFG_MAX_WEIGHT]),
                             float(cfg[CFG_CLIPPING_RANGE]), int(cfg[CFG_QUANTIZATION_RANGE]), cfg, message.content)


def secagg_reply_content(vector, weight: float, instruction: SecAggInstruction, *, metrics: dict | None = None,
                         allow_clipping: bool = False):
    """The legacy FitRes RecordDict that ``secaggplus_mod`` masks: ``vector`` (1-D, float64) with
    ``weight`` (> 0, at most ``max_weight``). Raises ValueError on a vector of the wrong length, a
    non-finite entry (the mod would silently turn a NaN into a huge finite value in that coordinate
    of the SUM), or (unless ``allow_clipping``) an entry whose ``r * x`` exceeds ``clipping_range``
    (silently clipped by the mod). A handler that raises counts as a dropped client; SecAgg+
    recovers the others' sum without it. ``metrics`` (str/int/float/bool/bytes) reach the server in
    plaintext."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    vec = np.asarray(vector, dtype=np.float64).reshape(-1)
    ins = instruction
    if vec.size != ins.vector_len:
        raise ValueError(f"SecAgg+ round {ins.round_idx}: a vector of {ins.vector_len} values expected, got {vec.size}")
    # the server reads what is raised here (Flower sends a ClientApp's error text): a statistic of this client's
    # own update (how many values are not finite, how large the largest is) stays in the node's output
    if not np.all(np.isfinite(vec)):
        _here(f"SecAgg+ round {ins.round_idx}: {int((~np.isfinite(vec)).sum())} non-finite values")
        raise ValueError(f"SecAgg+ round {ins.round_idx}: this client's update holds non-finite values, so it is not "
                         "sent (the count is in the node's output)")
    weight = float(weight)
    if not (math.isfinite(weight) and 0 < weight <= ins.max_weight):
        raise ValueError(f"SecAgg+ round {ins.round_idx}: the weight {weight} must be in (0, max_weight = {ins.max_weight}]")
    if not allow_clipping and vec.size:
        r = quantized_ratio(weight, ins.max_weight, ins.quantization_range)
        top = float(np.abs(vec).max()) * r
        if top > ins.clipping_range:
            _here(f"SecAgg+ round {ins.round_idx}: weight/max_weight * |x| reaches {top:g} > clipping_range "
                  f"{ins.clipping_range:g}")
            raise ValueError(f"SecAgg+ round {ins.round_idx}: this client's update exceeds federation.secagg."
                             f"clipping_range = {ins.clipping_range:g} (the mod would clip it), so it is not sent: "
                             "raise clipping_range, or bound the updates (federation.dp's clip_norm)")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), weight, dict(metrics or {}))  # type: ignore[arg-type]
    return fitres_to_recorddict(res, keep_input=True)


def _here(text: str) -> None:
    """A detail for this node's own output only."""
    import sys

    print(f"fedmoe: {text}", file=sys.stderr, flush=True)


def secagg_reply(message, vector, weight: float, **kw):
    """The reply Message to a SecAgg+ fit message (see :func:`secagg_reply_content`)."""
    from flwr.app import Message

    return Message(secagg_reply_content(vector, weight, read_secagg_instruction(message), **kw), reply_to=message)


def secaggplus_mod_if_marked(message, context, call_next):
    """``secaggplus_mod`` for SecAgg+ messages only (those carrying ``"secaggplus_configs"``); every
    other message goes straight on. Put it on the train handler: ``@client_app.train(mods=[...])``.
    The mod keeps its protocol state in ``context.state.config_records["secaggplus_state"]``."""
    from flwr.client.mod import secaggplus_mod

    if SECAGG_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


# ============================================================================ server side
@dataclass
class SecAggResult:
    """The outcome of :func:`secure_weighted_sum`.

    ``mean``: ``sum_i clip(r_i x_i) / sum_i r_i`` over the ``included`` nodes (None when the
    protocol halted), ``r_i = round(w_i / max_weight * Q) / Q``; ``total_weight``: the sum of their
    weights (as each reported it, in plaintext); ``weighted_sum``: ``mean * total_weight``;
    ``weights`` / ``metrics``: each included node's plaintext weight and FitRes metrics;
    ``failures``: node id -> why (a stage's error or timeout; a node that failed only in ``unmask``
    is still included, its vector recovered from the others' shares); ``halted``: why no mean."""

    mean: np.ndarray | None
    total_weight: float
    included: list[int]
    weights: dict[int, float] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    halted: str | None = None
    seconds: float = 0.0
    bytes_up: dict[int, int] = field(default_factory=dict)  # per node: payload bytes it sent in the four stages
    bytes_down: dict[int, int] = field(default_factory=dict)  # and received

    @property
    def weighted_sum(self) -> np.ndarray | None:
        return None if self.mean is None else self.mean * self.total_weight


def content_bytes(content) -> int:
    """The payload bytes of a message's records: every array's bytes, every bytes value (lists of them
    too: the masked vectors and key shares travel so), 8 per number, a string's UTF-8 length."""
    total = 0
    for record in content.values():
        for value in record.values():
            data = getattr(value, "data", None)
            for v in (value if isinstance(value, list) else [data if isinstance(data, bytes) else value]):
                if isinstance(v, bytes):
                    total += len(v)
                elif isinstance(v, str):
                    total += len(v.encode())
                elif isinstance(v, (int, float, bool)):
                    total += 8
    return total


class _TrackingGrid:
    """The grid for the workflow: ``send_and_receive`` over ``push_messages`` / ``pull_messages``,
    polling every ``poll_s`` (the deployment grid's own polls every 3 s, once per stage), noting
    each node's error or missing reply by stage and the payload bytes each node sent and received
    over the four stages (:func:`content_bytes`)."""

    def __init__(self, grid, poll_s: float, failures: dict[int, str], vector_len: int | None = None):
        self._grid, self._poll_s, self.failures = grid, poll_s, failures
        self.vector_len = vector_len  # the masked vector's length (None: not checked)
        self.bytes_up: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}
        self.nodes: set[int] = set()  # every node addressed (the protocol's sampled nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def malformed(self, m, stage: str) -> str | None:
        return _malformed_reply(m, stage, self.nodes, self.vector_len)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        stage = {}
        for m in messages:
            cfg = m.content.config_records.get(SECAGG_CONFIGS)
            stage[m.metadata.dst_node_id] = cfg.get("stage", "?") if cfg is not None else "?"
        for m in messages:
            nid = m.metadata.dst_node_id
            self.nodes.add(nid)
            self.bytes_down[nid] = self.bytes_down.get(nid, 0) + content_bytes(m.content)
        ids = list(self._grid.push_messages(messages))
        dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        waiting, replies = set(ids), []
        end = None if timeout is None else time.monotonic() + timeout
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self._poll_s)
        kept = []
        for m in replies:
            nid = m.metadata.src_node_id
            if m.has_content():
                self.bytes_up[nid] = self.bytes_up.get(nid, 0) + content_bytes(m.content)
            if m.has_error():
                self.failures.setdefault(nid, f"{stage.get(nid, '?')}: {m.error.reason}")
            elif (why := self.malformed(m, stage.get(nid, "?"))) is not None:
                # left out as a node that did not answer: the protocol's own dropout (Flower's workflow would
                # raise on it and stop the run)
                self.failures.setdefault(nid, f"{stage.get(nid, '?')}: a malformed reply ({why}): dropped out")
                continue
            kept.append(m)
        replies = kept
        for mid in waiting:
            nid = dst[mid]
            self.failures.setdefault(nid, f"{stage.get(nid, '?')}: no reply within {timeout} s")
        return replies


def _is_list_of(v, kind) -> bool:
    return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _malformed_reply(m, stage: str, nodes: set[int], vector_len: int | None) -> str | None:
    """Why a node's SecAgg+ reply of ``stage`` is not what Flower's workflow reads (it indexes it without
    checking: a missing record, a list of the wrong type or length, a share for a node that is not in the round or
    a masked vector of another shape raise inside the workflow), or None."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key  # as the workflow reads them

    cfg = m.content.config_records.get(SECAGG_CONFIGS)
    if cfg is None:
        return f"no {SECAGG_CONFIGS} record"
    if stage == Stage.SETUP:
        keys = [cfg.get(Key.PUBLIC_KEY_1), cfg.get(Key.PUBLIC_KEY_2)]
        if not all(isinstance(k, bytes) for k in keys):
            return "public keys that are not bytes"
        try:
            for k in keys:
                bytes_to_public_key(k)
        except Exception:  # noqa: BLE001
            return "public keys that are not keys"
    elif stage == Stage.SHARE_KEYS:
        dsts, ctxts = cfg.get(Key.DESTINATION_LIST), cfg.get(Key.CIPHERTEXT_LIST)
        if not _is_list_of(dsts, int) or not _is_list_of(ctxts, bytes) or len(dsts) != len(ctxts):
            return "destinations and ciphertexts that are not two lists of node ids and bytes of one length"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        masked = cfg.get(Key.MASKED_PARAMETERS)
        if not _is_list_of(masked, bytes):
            return "masked parameters that are not a list of bytes"
        try:
            shapes = [bytes_to_ndarray(b).shape for b in masked]
            from flwr.compat.common.recorddict_compat import recorddict_to_fitres

            recorddict_to_fitres(m.content, True)
        except Exception as e:  # noqa: BLE001
            return f"unreadable masked parameters or fit records ({type(e).__name__})"
        if vector_len is not None and shapes != [(1,), (vector_len,)]:
            return f"a masked vector of shapes {shapes[:3]}, not [(1,), ({vector_len},)]"
    elif stage == Stage.UNMASK:
        nids, shares = cfg.get(Key.NODE_ID_LIST), cfg.get(Key.SHARE_LIST)
        if not _is_list_of(nids, int) or not _is_list_of(shares, bytes) or len(nids) != len(shares):
            return "node ids and shares that are not two lists of ints and bytes of one length"
        if not set(nids) <= nodes:
            return f"shares of nodes that are not in the round ({sorted(set(nids) - nodes)[:3]})"
    return None


class TamperedWeightTotal(RuntimeError):
    """SecAgg+'s unmasked weight total is not the one the clients' reported weights give (:meth:`Workflow.unmask_stage`)."""


def _workflow_class():
    from flwr.server.workflow import SecAggPlusWorkflow

    class Workflow(SecAggPlusWorkflow):
        """Flower's workflow, with two changes: the payload records join the fit instruction (sent
        once, in ``collect_masked_vectors``), and nodes that dropped out before they shared their
        key shares are forgotten. Flower 1.42 keeps them as "dead", asks their neighbours for
        shares of their keys, which no one ever got (KeyError in secaggplus_mod.py:510), and the
        round halts; only a dropout in ``collect_masked_vectors`` or later is recovered there. A
        node forgotten this way never received a neighbour's share nor masked with anyone."""

        def __init__(self, *a, records: dict[int, Any], **kw):
            super().__init__(*a, **kw)
            self._records = records

        @staticmethod
        def _forget_early_dropouts(state) -> None:
            gone = state.sampled_node_ids - state.active_node_ids
            if not gone:
                return
            state.sampled_node_ids = set(state.active_node_ids)
            for nid in gone:
                state.nid_to_neighbours.pop(nid, None)
            for nid in state.nid_to_neighbours:
                state.nid_to_neighbours[nid] = state.nid_to_neighbours[nid] - gone

        def setup_stage(self, grid, context, state) -> bool:
            ok = super().setup_stage(grid, context, state)
            if not state.nid_to_neighbours:  # halted before sending anything
                return ok
            self._forget_early_dropouts(state)
            return bool(state.sampled_node_ids) and self._check_threshold(state)

        def share_keys_stage(self, grid, context, state) -> bool:
            super().share_keys_stage(grid, context, state)
            self._forget_early_dropouts(state)
            return self._check_threshold(state)

        def collect_masked_vectors_stage(self, grid, context, state) -> bool:
            for nid, rd in state.nid_to_fitins.items():
                for name, record in (self._records.get(nid) or {}).items():
                    rd[name] = record
            return super().collect_masked_vectors_stage(grid, context, state)

        def unmask_stage(self, grid, context, state) -> bool:
            """Flower divides the unmasked sum by the weight total in its first element, which each client adds its
            own share to: one client could make it near 0 and scale the mean a billion times (or divide by 0). The
            total is checked against the one the clients' weights give (each round(w / max_weight · Q), as the mod
            computes it) before anything is divided by it; a mismatch halts the round."""
            import flwr.server.workflow.secure_aggregation.secaggplus_workflow as workflow

            # a weight outside (0, max_weight] (what an honest mod refuses to send) could cancel the others' in the total
            bad = [res.num_examples for _, res in state.legacy_results
                   if not (isinstance(res.num_examples, (int, float)) and 0 < res.num_examples <= state.max_weight)]
            if bad:
                raise TamperedWeightTotal(f"a client reported the weight {str(bad[0])[:40]}, outside (0, max_weight = "
                                          f"{state.max_weight:g}]; the round has no mean")
            expected = sum(round(float(res.num_examples) / state.max_weight * state.quantization_range)
                           for _, res in state.legacy_results) % state.mod_range
            real = workflow.factor_extract

            def checked(parameters):
                total, rest = real(parameters)
                if int(total) != expected:
                    raise TamperedWeightTotal(f"the masked sum's weight total is {int(total)}, the weights the "
                                              f"clients reported give {expected}: a client altered its share of it "
                                              "(its mean would be scaled); the round has no mean")
                return total, rest

            workflow.factor_extract = checked
            try:
                return super().unmask_stage(grid, context, state)
            finally:
                workflow.factor_extract = real

    return Workflow


def _strategy(grid, run_id: int, configs: dict[int, dict], out: dict):
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class Capture(Strategy):
        """configure_fit: one FitIns per given node; aggregate_fit: keep what the workflow unmasked."""

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(nid, grid, run_id), FitIns(Parameters([], "numpy.ndarray"), cfg))
                    for nid, cfg in configs.items()]

        def aggregate_fit(self, server_round, results, failures):
            if results:  # every FitRes holds the same, already unmasked, parameters
                out["arrays"] = parameters_to_ndarrays(results[0][1].parameters)
            out["weights"] = {p.node_id: float(r.num_examples) for p, r in results}
            out["metrics"] = {p.node_id: dict(r.metrics) for p, r in results}
            return None, {}  # None: the workflow writes nothing back to its (private) context

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return Capture()


def secure_weighted_sum(grid, node_ids: list[int], payloads: Mapping[int, Any] | None, vector_len: int, *,
                        max_weight: float, round_idx: int = 0, num_shares: int | float = 1.0,  # noqa: PYI041 (int and float differ)
                        reconstruction_threshold: int | float = 0.5, clipping_range: float = 8.0,  # noqa: PYI041
                        quantization_range: int | None = None, modulus_range: int = 2**32,
                        timeout: float | None = None, poll_s: float = 0.1, context=None) -> SecAggResult:
    """One SecAgg+ round over ``node_ids``: each node's train handler replies a vector ``x_i`` of
    ``vector_len`` values with a weight ``w_i`` (:func:`secagg_reply`); the server learns only
    ``mean = sum_i clip(r_i x_i) / sum_i r_i`` (``r_i = round(w_i / max_weight * Q) / Q``), close to
    ``sum_i w_i x_i / sum_i w_i`` (:func:`error_bound`), plus each ``w_i`` and the metrics in plaintext.

    ``payloads[nid]``: a ``RecordDict`` whose records join that node's fit message (not the names
    ``fitins.parameters``, ``fitins.config``, ``secaggplus_configs``), or a dict of config values
    (ConfigRecord types) merged into its ``"fitins.config"``, or None. ``max_weight``: an upper bound
    on any ``w_i`` (a client with a larger weight refuses, :func:`secagg_reply_content`); precision is
    best when it is close to the largest weight. ``num_shares`` / ``reconstruction_threshold``: as
    in ``SecAggPlusWorkflow`` (float: a fraction of the nodes / of the shares; 1.0 and 0.5: every node
    is every node's neighbour and half of them must stay). ``quantization_range`` None: the largest
    safe one (:func:`default_quantization_range`). ``timeout``: seconds to wait for replies in each
    of the four stages (None: until all reply). ``context``: the ServerApp's Context, for its run id
    only; the workflow runs on a private copy with its own state, so any round may call this.

    Needs at least 2 nodes (and at least ``reconstruction_threshold`` staying); otherwise, or when
    too many drop out, the result has ``mean`` None and ``halted`` says why.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext

    nodes = list(dict.fromkeys(int(n) for n in node_ids))
    q = quantization_range or default_quantization_range(len(nodes), modulus_range)
    if len(nodes) * q >= modulus_range:
        raise ValueError(f"{len(nodes)} nodes * quantization_range {q} must stay below modulus_range {modulus_range}")
    if q > MAX_QUANTIZATION_RANGE:
        raise ValueError(f"quantization_range must be at most 2**30 (the mod rounds into int32), got {q}")
    base = {SECAGG_FLAG: True, CFG_ROUND: int(round_idx), CFG_VECTOR_LEN: int(vector_len),
            CFG_MAX_WEIGHT: float(max_weight), CFG_CLIPPING_RANGE: float(clipping_range), CFG_QUANTIZATION_RANGE: int(q)}
    configs, records = {}, {}
    for nid in nodes:
        p = (payloads or {}).get(nid)
        configs[nid] = dict(base)
        if isinstance(p, RecordDict):
            bad = _RESERVED & set(p.keys())
            if bad:
                raise ValueError(f"payload record names {sorted(bad)} are reserved for SecAgg+")
            records[nid] = dict(p.items())
        elif p is not None:
            configs[nid] = {**dict(p), **base}
    failures: dict[int, str] = {}
    out: dict = {}
    if context is not None:
        private = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                          state=RecordDict(), run_config=dict(context.run_config))
    else:
        private = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    lctx = LegacyContext(private, config=ServerConfig(num_rounds=1),
                         strategy=_strategy(grid, private.run_id, configs, out))
    lctx.state.config_records["config"] = ConfigRecord({"current_round": int(round_idx)})
    lctx.state.array_records["parameters"] = ArrayRecord()
    workflow = _workflow_class()(num_shares, reconstruction_threshold, max_weight=float(max_weight),
                                 clipping_range=float(clipping_range), quantization_range=q,
                                 modulus_range=modulus_range, timeout=timeout, records=records)
    t0 = time.monotonic()
    tracking = _TrackingGrid(grid, poll_s, failures, vector_len)
    crashed = None
    try:
        workflow(tracking, lctx)
    except Exception as e:  # noqa: BLE001 - a reply the checks above did not foresee: the round has no mean
        crashed, out = f"the protocol stopped ({type(e).__name__}: {str(e)[:200]})", {}
    seconds = time.monotonic() - t0
    weights = out.get("weights", {})
    arrays = out.get("arrays")
    halted = None
    mean = None
    if arrays is None:
        halted = crashed or ("fewer than 2 nodes" if len(nodes) < 2 else
                             "too few nodes stayed for the reconstruction threshold (see failures)")
    else:
        mean = np.asarray(arrays[0], dtype=np.float64).reshape(-1)
        if len(arrays) != 1 or mean.size != vector_len:
            raise RuntimeError(f"SecAgg+ returned {[a.shape for a in arrays]}, one vector of {vector_len} expected")
    return SecAggResult(mean=mean, total_weight=float(sum(weights.values())), included=sorted(weights),
                        weights=weights, metrics=out.get("metrics", {}), failures=failures, halted=halted,
                        seconds=seconds, bytes_up=tracking.bytes_up, bytes_down=tracking.bytes_down)
