"""The in-process runtime: the server half, and every client simulated one after another on one
frozen base model, meeting only through messages.

    setup: each client's one-shot setup on the freshly built model
    round: sample → downlink message per client → client: load, train, reply → aggregate → evaluate → checkpoint

The methods' math lives in ``fedmoe.algorithms``; this module moves messages and keeps the books.
"""

from __future__ import annotations

import io
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..algorithms import get_method, model_spec
from ..config import ConfigError, RunConfig, config_to_dict, load_config
from ..data import prepare_federated_data
from ..messages import EVALUATE, TRAIN, Message, Reply
from ..moe import MoEModel, load_tokenizer
from ..report import RunDir, format_results_table, write_report
from ..report.rundir import atomic_write_bytes
from ..seeds import Stream, derive_seed
from .checkpoint import CHECKPOINT_FILE, restore_rng_states, rng_states
from .clients import ClientNode, client_sets
from .evaluation import Evaluator
from .progress import Progress
from .sampling import sample_clients
from .summary import ClientRecord, run_summary

RUNTIME_TRAIN_KEYS = ("round", "client", "split", "loss", "steps", "lr", "tokens", "bytes_up", "bytes_down")


class RunDirError(ConfigError):
    pass


def _serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class FederatedRun:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, show_progress: bool = False, log=print, resuming: bool = False,
                 observe=None):
        """``observe(kind, client, message)``, if given, sees every message the runtime passes (kind
        "downlink", "reply" or "evaluate") — for logging and for tests."""
        self.cfg, self.rd, self.show_progress, self.log = cfg, run_dir, show_progress, log
        self.observe = observe or (lambda kind, client, message: None)
        seed = cfg.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        # data: each client's own, tokenised
        self.data = prepare_federated_data(cfg.data, seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.sets = client_sets(self.data, self.tokenizer, cfg.data.max_length, cfg.eval.max_examples)

        # the server half: from the model's config and the method's adapters, no model
        self.method = get_method(cfg.algorithm.name)
        self.spec = model_spec(cfg, self.method)
        self.server = self.method.server(cfg, self.spec)
        self.global_state = self.server.initial_global()
        self.server_state = self.server.initial_server_state(self.global_state)

        # the clients' side: one frozen model serving every client in turn
        mc = cfg.model
        self.mm = MoEModel.from_pretrained(mc.name, dtype=mc.dtype, device=mc.device,
                                           attn_implementation=mc.attn_implementation, seed=seed)
        if len(self.tokenizer) > self.mm.config.vocab_size:
            raise ConfigError(f"tokenizer '{mc.tokenizer or mc.name}' has {len(self.tokenizer)} tokens but the model's "
                              f"vocabulary has {self.mm.config.vocab_size}; set model.tokenizer to the model's tokenizer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, Stream.ADAPTER_INIT))
            self.method.client.build(cfg, self.mm)
        self.spec.check(self.mm)
        self.half = self.method.client(cfg)
        self.half.validate(self.mm, len(self.sets))
        self.nodes = [ClientNode(s) for s in self.sets]

        self.records = [ClientRecord() for _ in self.sets]
        self.evaluator = Evaluator(cfg, self.mm, self.tokenizer, self.sets, self.rd.log_metrics)
        self.completed_rounds = 0
        self.wall_before = 0.0
        self.global_eval: dict = {}
        self.zero_shot: dict | None = None  # round-0 evaluation of the initial model
        self.client_setup: dict = {}
        if not resuming:  # a resumed run restores the private stores instead
            for node in self.nodes:
                self.client_setup[node.id] = node.setup(self.half, self.mm, self.spec.initial, seed)

    # ------------------------------------------------------------------ checkpointing
    def checkpoint_state(self) -> dict:
        return {
            "round": self.completed_rounds,
            "global_state": self.global_state,
            "server_state": self.server_state,
            "private": {n.id: n.private for n in self.nodes},
            "clients": {s.id: r.state() for s, r in zip(self.sets, self.records)},
            "global_eval": self.global_eval,
            "zero_shot": self.zero_shot,
            "wall_s": self.wall_before + (time.time() - self._t0),
            "client_setup": self.client_setup,
            "rng": rng_states(),
        }

    def save(self) -> None:
        atomic_write_bytes(self.rd.checkpoint_dir / CHECKPOINT_FILE, _serialize(self.checkpoint_state()))

    def restore(self, ck: dict) -> None:
        self.completed_rounds = ck["round"]
        self.global_state = ck["global_state"]
        self.server_state = ck["server_state"]
        for node in self.nodes:
            node.private = ck["private"][node.id]
        self.records = [ClientRecord(**ck["clients"][s.id]) for s in self.sets]
        self.global_eval = ck["global_eval"]
        self.zero_shot = ck["zero_shot"]
        self.wall_before = ck["wall_s"]
        self.client_setup = ck.get("client_setup", {})
        restore_rng_states(ck["rng"])

    # ------------------------------------------------------------------ messages
    def downlink(self, cid: int | None, kind: str, round_idx: int) -> Message:
        msg = self.server.downlink(self.global_state, self.server_state, cid).with_header(kind=kind, round=round_idx)
        self.observe("downlink" if kind == TRAIN else "evaluate", cid, msg)
        return msg

    def _load(self, cid: int | None, round_idx: int) -> None:
        """Put a client's model (its evaluate message + its private store) or the global model in place."""
        msg = self.downlink(cid, EVALUATE, round_idx)
        if cid is None:
            self.half.load(self.mm, None, msg, {})
        else:
            self.nodes[cid].load(self.half, self.mm, msg)

    def _train_client(self, cid: int, round_idx: int, prog: Progress) -> Reply:
        node, rec = self.nodes[cid], self.records[cid]
        msg = self.downlink(cid, TRAIN, round_idx)
        task = prog.task(f"  client {cid} train", self.cfg.train.max_steps or 0)
        reply, res, metrics = node.train(self.half, self.mm, msg, self.cfg,
                                         progress=lambda s, loss: prog.update(task, completed=s, info=f"loss {loss:.3f}"))
        prog.remove(task)
        self.observe("reply", cid, reply)
        down, up = msg.nbytes(), reply.nbytes()
        rec.bytes_down += down
        rec.bytes_up += up
        rec.rounds_trained += 1
        rec.add_counts(res.activation_counts)
        clash = set(metrics) & set(RUNTIME_TRAIN_KEYS)
        if clash:
            raise ValueError(f"{self.method.name}'s client metrics use the runtime's keys {sorted(clash)}")
        self.rd.log_metrics({"round": round_idx, "client": cid, "split": "train", "loss": res.loss, "steps": res.steps,
                             "lr": res.lr, "tokens": res.tokens, "bytes_up": up, "bytes_down": down, **metrics})
        return Reply(cid, reply)

    def _evaluate(self, round_idx: int, final: bool, prog: Progress) -> dict:
        all_global = not self.half.personalized and all(
            self.half.top_k(s.id, self.mm) == self.mm.default_top_k for s in self.sets)
        return self.evaluator.evaluate_round(round_idx, final, self.records, lambda cid: self._load(cid, round_idx),
                                             all_global, self.half.personalized, prog)

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after_round: int | None = None) -> dict | None:
        cfg = self.cfg
        self._t0 = time.time()
        rounds = cfg.federation.rounds
        with Progress(self.show_progress) as prog:
            rounds_task = prog.task("rounds", rounds)
            prog.update(rounds_task, completed=self.completed_rounds)
            if cfg.eval.zero_shot and self.completed_rounds == 0 and self.zero_shot is None:
                self.zero_shot = self._evaluate(0, final=False, prog=prog)
                self.save()
            for round_idx in range(self.completed_rounds + 1, rounds + 1):
                sampled = sample_clients(len(self.nodes), cfg.federation.fraction, cfg.seed, round_idx)
                clients_task = prog.task(f"round {round_idx} clients", len(sampled))
                replies = []
                for cid in sampled:
                    replies.append(self._train_client(cid, round_idx, prog))
                    prog.update(clients_task, advance=1)
                prog.remove(clients_task)
                t_agg = time.perf_counter()
                self.global_state, self.server_state, metrics = self.server.aggregate(
                    self.global_state, self.server_state, replies)
                self.rd.log_metrics({"round": round_idx, "client": None, "split": "server",
                                     "aggregate_s": time.perf_counter() - t_agg, "clients": sampled, **metrics})
                self.global_eval = self._evaluate(round_idx, final=round_idx == rounds, prog=prog)
                self.completed_rounds = round_idx
                self.save()
                prog.update(rounds_task, completed=round_idx,
                            info=f"test loss {self.global_eval['loss']:.3f}" if self.global_eval.get("loss") else "")
                if stop_after_round is not None and round_idx >= stop_after_round and round_idx < rounds:
                    return None
        return self.finish()

    def finish(self) -> dict:
        wall = self.wall_before + (time.time() - self._t0)
        profiles = [self.half.profile(n.id, self.mm, n.private) for n in self.nodes]
        trainable = self.spec.initial
        summary = run_summary(
            self.cfg, self.mm, self.sets, self.records, profiles, self.global_eval, self.zero_shot, wall,
            extra={"trainable_tensors": len(trainable), "trainable_params": int(sum(t.numel() for t in trainable.values())),
                   "shared_params": int(sum(t.numel() for t in self.global_state.values())),
                   "data_skipped_rows": self.data.skipped,
                   "client_setup": {cid: m for cid, m in self.client_setup.items() if len(m) > 1},
                   "client_setup_seconds": {cid: m["seconds"] for cid, m in self.client_setup.items()},
                   "metric_notes": self.method.notes})
        self.rd.write_summary(summary)
        write_report(self.rd, summary, self.rd.read_metrics(), self.data.histogram_markdown)
        return summary


# ---------------------------------------------------------------------- entry points
def _prepare_run_dir(cfg: RunConfig) -> RunDir:
    path = Path(cfg.output_dir) / cfg.run_name()
    if (path / "checkpoints" / CHECKPOINT_FILE).exists() and not (path / "summary.json").exists():
        raise RunDirError(f"{path} holds an unfinished run: continue it with `fedmoe run --resume {path}`, "
                          f"or choose another name with --set name=...")
    if path.exists():
        shutil.rmtree(path)  # a finished run of the same name is replaced
    rd = RunDir(path)
    rd.write_config(config_to_dict(cfg))
    return rd


def run_federated(cfg: RunConfig, show_progress: bool = False, stop_after_round: int | None = None,
                  log=print, observe=None) -> tuple[dict | None, RunDir]:
    """Run a configured federated experiment from scratch; returns (summary, run dir)."""
    rd = _prepare_run_dir(cfg)
    run = FederatedRun(cfg, rd, show_progress=show_progress, log=log, observe=observe)
    return run.run(stop_after_round=stop_after_round), rd


def resume_federated(path: str | Path, show_progress: bool = False, stop_after_round: int | None = None,
                     log=print, observe=None) -> tuple[dict | None, RunDir]:
    """Continue the run in ``path`` from its last checkpoint (its own config.yaml is used)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"{path} is not a fedmoe run directory (no config.yaml)")
    ck_path = path / "checkpoints" / CHECKPOINT_FILE
    if not ck_path.is_file():
        raise RunDirError(f"{path} has no checkpoint to resume from ({ck_path} is missing); start it again instead")
    cfg = load_config(path / "config.yaml")
    rd = RunDir(path)
    run = FederatedRun(cfg, rd, show_progress=show_progress, log=log, resuming=True, observe=observe)
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    run.restore(ck)
    rd.truncate_metrics(after_round=run.completed_rounds)  # rows written after the checkpoint are redone
    if run.completed_rounds >= cfg.federation.rounds:
        run._t0 = time.time()
        return run.finish(), rd
    return run.run(stop_after_round=stop_after_round), rd


__all__ = ["FederatedRun", "RunDirError", "format_results_table", "resume_federated", "run_federated"]
