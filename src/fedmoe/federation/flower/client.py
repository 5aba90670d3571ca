"""A fedmoe client inside a Flower ClientApp (or a ``fedmoe worker``): one SuperNode's data, its
private store on its own disk, and the method's client half.

The client is identified by its SuperNode's ``partition-id``; its data is its own file
(``data-path`` in the node config, any format ``data.source`` accepts) or, without one, its
partition of the run's shared ``data.source``. Its private store lives under ``state-dir`` (node
config; in simulation the run directory's ``clients/``), one file per round it trained in, so it
survives a SuperNode restart and a resumed run starts each round from exactly the state the
interrupted one had. :class:`ClientCache` keeps the model and the clients while the process lives:
a simulation actor, or a ``fedmoe worker`` beside a SuperNode (which starts a new process per
message, so without a worker the model is loaded again for each, and the reply says how long that took).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
import yaml

from ...algorithms import get_method
from ...algorithms.base import N_TRAIN, check_top_k
from ...config import RunConfig, config_from_tree
from ...data import prepare_client_data, prepare_federated_data
from ...messages import Message
from ...moe import load_tokenizer
from ...moe.model import resolve_device
from ...rundir import atomic_write_bytes, atomic_write_text, load_tensor_file
from ...train import Parallel
from ..clients import ClientNode, answer_prompt_limit, client_set, heldout_set
from ..evaluation import WITHHELD_EVALUATION, WITHHELD_WITH_EVALUATION, ModelEvaluator
from ..local import load_client_model
from .budget import BudgetRefusal, NodeBudget, PrivacyLedger, budget_refusal, node_budget
from ..dp import withhold_setup
from .paths import (DEFAULT_STATE_DIR, NodeConfigError, RefusedMessage, node_error_text, node_flag, node_identity,  # noqa: F401
                    store_path)
from .records import also_from_records, from_records, jsonable, to_records

_KEEP = 3  # private-store files kept per client (the newest)
# what a client keeps to itself on Flower unless eval.share_examples (and its node config allow it):
# result key -> what it is, as the server's report names it
WITHHELD = {"examples": "sample answers with their references", "categories": "the category of each scored test "
            "example (per-category scores)", "confusion": "confusion matrices",
            "category_counts": "category histograms of its training data",
            WITHHELD_EVALUATION: "its evaluation results and the size of its test set (its node's privacy budget: node config "
                          "dp-epsilon without dp-evaluation=\"send\")"}


def kept_here(values: dict, share: bool) -> tuple[dict, list[str]]:
    """(what of ``values`` (an evaluation result, or the data a client describes at setup) leaves the client,
    the keys it kept): without ``share``, the keys of :data:`WITHHELD`."""
    if share:
        return values, []
    kept = [k for k in WITHHELD if k in values]
    return {k: v for k, v in values.items() if k not in WITHHELD}, kept


def node_shares(node_config, cfg) -> bool:
    """Whether this client sends its examples: the run asks (``eval.share_examples``) and its SuperNode does
    not refuse (node config ``share-examples=false``). A node with a privacy budget (``dp-epsilon``) shares them
    only where its node config says ``share-examples=true``: its answers and their references are its data
    verbatim, which no ε covers, also where it sends its evaluation numbers (``dp-evaluation="send"``)."""
    budget = (node_config or {}).get("dp-epsilon") not in (None, "")
    return bool(cfg.eval.share_examples) and node_flag(node_config, "share-examples", not budget)


class PrivateStore:
    """A client's private state on its own disk: ``private-r{round}.pt`` after its setup (round 0)
    and after every round it trained in, written atomically; the newest few are kept."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _files(self) -> dict[int, Path]:
        out = {}
        for p in self.root.glob("private-r*.pt") if self.root.is_dir() else []:
            m = re.fullmatch(r"private-r(\d+)\.pt", p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    def save(self, round_idx: int, private: dict) -> None:
        import io

        ident = self.root / "identity.json"  # whose state this is: fedmoe export --private checks it
        named = re.fullmatch(r"client-(\d+)", self.root.name)
        if named and not ident.is_file():
            atomic_write_text(ident, json.dumps({"run_id": self.root.parent.name, "client": int(named.group(1))}))
        buf = io.BytesIO()
        torch.save(private, buf)
        atomic_write_bytes(self.root / f"private-r{round_idx:05d}.pt", buf.getvalue())
        files = self._files()
        for r in sorted(files)[:-_KEEP]:
            if r != round_idx:
                files[r].unlink(missing_ok=True)

    def load(self, before: int) -> dict | None:
        """The newest private state saved at a round < ``before`` (None: no setup yet)."""
        rounds = [r for r in self._files() if r < before]
        if not rounds:
            return None
        return load_tensor_file(self._files()[max(rounds)], "private store")

    def setup_metrics(self) -> dict | None:
        p = self.root / "setup.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def save_setup_metrics(self, metrics: dict) -> None:
        atomic_write_text(self.root / "setup.json", json.dumps(metrics))


def keep_for_secagg(root: Path, round_idx: int, sent: Message, reply: Message, weights: str) -> Message:
    """Under ``federation.secagg``: this client's update of the round written to its own disk
    (``secagg-rNNNNN.npy``: float64, every reply tensor in name order, a tensor it was sent as θ_i − θ,
    the others as they are; its weight — n_i, or 1 for ``weights`` "uniform" — beside it), for the SecAgg+
    stage that masks it (:func:`fedmoe.federation.flower.apps.secagg_answer`). The reply keeps only its
    scalars: no tensor of this client reaches the server unmasked."""
    import io

    import numpy as np

    from .secagg import flatten_tensors

    vector, _ = flatten_tensors({n: t.double() - sent.tensors[n].double() if n in sent.tensors else t
                                 for n, t in reply.tensors.items()})
    buf = io.BytesIO()
    np.save(buf, vector, allow_pickle=False)
    base = root / f"secagg-r{round_idx:05d}"
    for old in root.glob("secagg-r*.*"):  # an earlier round's update that SecAgg+ never asked for
        old.unlink(missing_ok=True)
    weight = 1.0 if weights == "uniform" else float(reply.scalars[N_TRAIN])
    atomic_write_bytes(base.with_suffix(".npy"), buf.getvalue())
    atomic_write_text(base.with_suffix(".json"), json.dumps({"weight": weight}))
    return Message(tensors={}, scalars=dict(reply.scalars), header=dict(reply.header))


class ClientModel:
    """What every client of a run shares in one process: the method's client half and the frozen
    model with its adapters (loaded once; each message puts its client's state into it)."""

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.method = get_method(cfg.algorithm.name)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.mm = load_client_model(cfg, self.method, self.tokenizer)
        self.initial = self.mm.get_state()
        self.half = self.method.client(cfg)
        check_top_k(self.half, self.mm, cfg.data.partition.num_clients)
        self._shared = None
        self.load_s = time.perf_counter() - t0

    def shared_data(self):
        """The partition of the config's shared ``data.source`` (built once per process)."""
        if self._shared is None:
            self._shared = prepare_federated_data(self.cfg.data, self.cfg.seed)
        return self._shared


class FlowerClient:
    """One client in a process: its data, its private store, and the process's shared model."""

    def __init__(self, model: ClientModel, client: int, data_path: str | None, state_dir: Path,
                 parallel: Parallel | None = None, share: bool = False, budget: NodeBudget | None = None,
                 error_text=None):
        """``parallel``: this process's rank among the ranks that train this client together (a
        ``fedmoe worker --nproc N``); rank 0 answers, keeps the private store and evaluates. ``share``: send
        the server what :data:`WITHHELD` names (:func:`node_shares`). ``budget``: the node's own privacy budget
        (:mod:`.budget`), enforced here whatever the run's config says. ``error_text``: what of an error the server
        is told (:func:`.paths.node_error_text` on a node; default: all of it)."""
        t0 = time.perf_counter()
        cfg = model.cfg
        self.share, self.budget = share, budget
        self.error_text = error_text or (lambda e: f"{type(e).__name__}: {e}".strip())
        self.parallel = parallel
        self.cfg, self.id, self.state_dir = cfg, client, Path(state_dir)
        n = cfg.data.partition.num_clients
        if not 0 <= client < n:
            raise NodeConfigError(f"this SuperNode's partition-id is {client}, but the run has "
                              f"data.partition.num_clients = {n}: give it a partition-id in 0..{n - 1}")
        if data_path:
            data, skipped = prepare_client_data(cfg.data, cfg.seed, client, data_path)
        else:
            fd = model.shared_data()
            data, skipped = fd.clients[client], fd.skipped
        self.set = client_set(data, model.tokenizer, cfg.data.max_length, cfg.eval.max_examples, cfg.data.labels,
                              cfg.eval.val_loss, answer_prompt_limit(cfg, model.mm.model.config))
        self.data_info = self.set.info(skipped, shared_source=not data_path)
        self.mm, self.initial, self.half = model.mm, model.initial, model.half
        # the shared held-out test set comes from the shared source (data.source), also for a client with its own file
        held = heldout_set(model.shared_data(), model.tokenizer, cfg.data.max_length) if cfg.data.heldout else None
        self.evaluator = ModelEvaluator(cfg, self.mm, model.tokenizer, self.set.pad_id, heldout=held)
        self.load_s = time.perf_counter() - t0  # the caller adds the model's load when this process loaded it
        self.model_s = 0.0  # of which the model's load (the process's first client loads it)
        self.fresh = True  # the first message of this client in this process pays load_s

    @property
    def withholds_evaluation(self) -> bool:
        """Whether this node's privacy budget keeps its evaluation results here (no ``dp-evaluation=send``)."""
        return self.budget is not None and not self.budget.send_evaluation

    def _admit_release(self, lead: bool) -> None:
        """Refuse (:class:`BudgetRefusal`) a training whose release would take the node past its budget. With ranks
        training together (``--nproc N``) rank 0 reads the ledger and every rank follows its verdict: a rank that
        read it a moment later (another process of the node having recorded a release in between) would otherwise
        refuse while the others train, and they would wait for it in their first all-reduce."""
        refusal = None
        if lead:
            try:
                PrivacyLedger(self.state_dir).check(self.budget, self.cfg.federation.dp.noise_multiplier / 2)
            except BudgetRefusal as e:
                refusal = e
        if self.parallel is not None:
            verdict = torch.tensor([0.0 if refusal is None else 1.0], device=self.mm.device)
            if float(self.parallel.all_reduce(verdict)[0]) and refusal is None:
                raise BudgetRefusal(f"client {self.id}: rank 0 refused this release (this node's privacy budget)")
        if refusal is not None:
            raise refusal

    def store(self, run_id: str) -> PrivateStore:
        return PrivateStore(store_path(self.state_dir, run_id, self.id))

    def handle(self, kind: str, content) -> object:
        """A Flower message's content -> the reply's content."""
        msg, info = from_records(content)
        run_id, round_idx = msg.header["run_id"], int(msg.header["round"])
        store = self.store(run_id)
        lead = self.parallel is None or self.parallel.rank == 0
        if not lead and kind != "train":  # the other ranks only train (with rank 0); rank 0 answers the rest
            return None
        # (a run the node's budget does not admit was refused by ClientCache.reply, before its data was read)
        if self.budget is not None and kind == "train":  # refused before the work when this release would exceed it
            self._admit_release(lead)
        node = ClientNode(self.set, store.load(before=round_idx + (0 if kind == "train" else 1)))
        load_s, model_s = (self.load_s, self.model_s) if self.fresh else (0.0, 0.0)
        self.fresh = False
        t0 = time.perf_counter()
        out = {"client": self.id, "load_s": load_s}
        if kind == "query":  # the one-shot setup, once per run; later queries only report
            if node.private is None:
                metrics = node.setup(self.half, self.mm, self.initial, self.cfg.seed)
                store.save(0, node.private)
                store.save_setup_metrics(metrics)
            setup, data = withhold_setup(self.cfg, store.setup_metrics(), self.data_info)
            data, kept = kept_here(data, self.share)
            if self.withholds_evaluation:
                data = {k: v for k, v in data.items() if k not in WITHHELD_WITH_EVALUATION}
                kept.append(WITHHELD_EVALUATION)
            # what this process loaded for the client (the model's part of it) and where it runs: its start's record
            out.update(data=data, withheld=kept, setup=setup, model_s=model_s, device=str(self.mm.device),
                       profile=self.half.profile(self.id, self.mm, node.private))
            return to_records(None, out)
        if node.private is None:
            raise RuntimeError(f"client {self.id} has no private state for run {run_id} in {store.root}: its setup "
                               "did not run here (was its state directory removed?)")
        if kind == "train":
            reply, report = node.train(self.half, self.mm, msg, self.cfg, parallel=self.parallel)
            if not lead:
                return None
            if self.budget is not None:  # in the node's ledger before the reply leaves (and refused if over)
                PrivacyLedger(self.state_dir).record(self.budget, self.cfg.federation.dp.noise_multiplier / 2, run_id,
                                                     round_idx, self.id)
            store.save(round_idx, node.private)
            if msg.header.get("secagg"):
                reply = keep_for_secagg(store.root, round_idx, msg, reply, msg.header["secagg"])
            report.metrics = jsonable(report.metrics)
            out["report"] = report.to_info(reply)
            out["work_s"] = time.perf_counter() - t0
            return to_records(reply, out)
        if self.withholds_evaluation:  # nothing of it leaves this node: no result, and the server is told so
            out.update(result=None, withheld=[WITHHELD_EVALUATION], work_s=time.perf_counter() - t0)
            return to_records(None, out)
        global_msg = None
        if "global" in info:  # the global model too, on this client's test data, in the same message: read first
            asked = info["global"]
            if not isinstance(asked, dict) or not isinstance(asked.get("general"), bool):
                raise RefusedMessage(f"client {self.id}: an evaluate message's 'global' is {str(asked)[:80]!r}, not "
                                 "{'general': true or false}")
            global_msg = also_from_records(content, msg)
            if global_msg is None:
                raise RefusedMessage(f"client {self.id}: an evaluation of the global model that carries no global model")
        res = node.evaluate(self.half, self.mm, self.evaluator, msg, info["with_answers"], info["general"])
        out["result"], out["withheld"] = kept_here(jsonable(res), self.share)
        if global_msg is not None:
            t1 = time.perf_counter()
            try:
                try:
                    self.half.load(self.mm, None, global_msg, {})
                except (ValueError, KeyError) as e:  # the server's message: its text quotes no data of the node
                    raise RefusedMessage(f"the global model it was sent does not load: {e}") from None
                res = self.evaluator.evaluate_sets([self.set], info["with_answers"], info["global"]["general"])
            except Exception as e:  # noqa: BLE001 — its own evaluation stands; the server names this one's failure
                out["global_error"] = self.error_text(e)[:500]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            else:
                res["eval_s"] = time.perf_counter() - t1
                out["global_result"], kept = kept_here(jsonable(res), self.share)
                out["withheld"] = sorted(set(out["withheld"]) | set(kept))
        out["work_s"] = time.perf_counter() - t0
        return to_records(None, out)


def run_config(options: dict) -> RunConfig:
    """The run's config as the server sent it (Flower's run config ``fedmoe-config``). One this node cannot read
    (another fedmoe version on the server) is the server's message: :class:`RefusedMessage`, its reason told."""
    try:
        return config_from_tree(yaml.safe_load(options["fedmoe-config"]), "the Flower run config 'fedmoe-config'")
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise RefusedMessage(f"this node cannot read the run's config: {e} (does the server run the same fedmoe "
                             "version as this node?)") from None


class ClientCache:
    """The model of the run a process serves and every client it served, kept while the process lives
    (a simulation actor, a ``fedmoe worker``): a message of another run drops them and loads its own."""

    def __init__(self, parallel: Parallel | None = None, cuda_index: int | None = None, deployed: bool = True):
        """``cuda_index``: the GPU of this rank (a run on CUDA is put on it). ``deployed``: on a SuperNode (False: a
        simulated client in the server's process, which tells the server every error in full)."""
        self.parallel, self.cuda_index, self.deployed = parallel, cuda_index, deployed
        self.model: tuple[str, ClientModel] | None = None
        self.clients: dict[tuple, FlowerClient] = {}

    def client(self, options: dict, node_config) -> FlowerClient:
        text = options["fedmoe-config"]
        cid, data_path, state_dir = node_identity(node_config, options)
        budget = node_budget(node_config)
        key = (text, cid, data_path, state_dir, str(node_config.get("share-examples")),
               str(node_config.get("share-errors")), budget)
        if key not in self.clients:
            model_s = 0.0
            if self.model is None or self.model[0] != text:
                if self.model is not None:  # another run: the last one's model goes (and its GPU memory)
                    self.model, self.clients = None, {}
                    import gc

                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                cfg = run_config(options)
                if self.cuda_index is not None and resolve_device(cfg.model.device).type == "cuda":
                    cfg.model.device = f"cuda:{self.cuda_index}"
                self.model = (text, ClientModel(cfg))
                model_s = self.model[1].load_s
            client = FlowerClient(self.model[1], cid, data_path, Path(state_dir), self.parallel,
                                  share=node_shares(node_config, self.model[1].cfg), budget=budget,
                                  error_text=lambda e: node_error_text(e, node_config, self.deployed))
            client.load_s += model_s
            client.model_s = model_s
            self.clients[key] = client
        return self.clients[key]

    def reply(self, kind: str, content, options: dict, node_config):
        """A message's content -> its reply's content (None on a rank other than 0). A node's privacy budget refuses
        a run it does not admit before anything of the node's data is read for it."""
        budget = node_budget(node_config)
        if budget is not None and kind in ("query", "train"):
            loaded = self.model is not None and self.model[0] == options["fedmoe-config"]
            why = budget_refusal(self.model[1].cfg if loaded else run_config(options), budget)
            if why:
                raise PermissionError(f"client {node_identity(node_config, options)[0]}: {why}")
        return self.client(options, node_config).handle(kind, content)
