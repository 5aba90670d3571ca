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
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..algorithms import get_method, model_spec
from ..config import ConfigError, RunConfig, config_to_dict, load_config
from ..data import format_histogram_table
from ..messages import EVALUATE, TRAIN, Reply
from ..report import RunDir, format_results_table, write_report
from ..report.rundir import atomic_write_bytes
from .checkpoint import CHECKPOINT_FILE, restore_rng_states, rng_states
from .evaluation import EvalPolicy
from .progress import Progress
from .sampling import sample_clients
from .summary import ClientRecord, run_summary

RUNTIME_TRAIN_KEYS = ("round", "client", "split", "loss", "steps", "lr", "tokens", "bytes_up", "bytes_down",
                      "load_s", "train_s", "tokens_per_s")


class RunDirError(ConfigError):
    pass


class RoundFailed(RuntimeError):
    """Too few clients replied for a round to be aggregated."""


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
    def __init__(self, cfg: RunConfig, run_dir: RunDir, transport=None, show_progress: bool = False, log=print,
                 resuming: bool = False, observe=None):
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
        self.wall_before = 0.0
        self.global_eval: dict = {}
        self.zero_shot: dict | None = None  # round-0 evaluation of the initial model
        self.client_setup: dict = {}
        self.failures: list[dict] = []  # clients that failed to train or evaluate: round, client, stage, error
        self.resuming = resuming

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
        }

    def save(self) -> None:
        atomic_write_bytes(self.rd.checkpoint_dir / CHECKPOINT_FILE, _serialize(self.checkpoint_state()))

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
        restore_rng_states(ck["rng"])

    # ------------------------------------------------------------------ steps
    def _downlink(self, cid: int | None, kind: str, round_idx: int):
        return self.server.downlink(self.global_state, self.server_state, cid).with_header(kind=kind, round=round_idx)

    def _setup(self, prog: Progress) -> None:
        for cid, info in self.transport.setup(prog).items():
            self.client_setup[cid] = info["setup"]
            self.records[cid].data = info["data"]
            self.records[cid].profile = info["profile"]

    def _train(self, round_idx: int, sampled: list[int], prog: Progress) -> list[Reply]:
        messages = {cid: self._downlink(cid, TRAIN, round_idx) for cid in sampled}
        replies, failures = self.transport.train(round_idx, messages, prog)
        for cid, why in failures.items():
            self._failed(round_idx, cid, "train", why)
        out = []
        for cid in sampled:
            if cid not in replies:
                continue
            reply, report = replies[cid]
            rec, down, up = self.records[cid], messages[cid].nbytes(), reply.nbytes()
            rec.bytes_down += down
            rec.bytes_up += up
            rec.rounds_trained += 1
            rec.add_counts(report["activation_counts"])
            rec.reported, rec.reported_round = dict(report["metrics"]), round_idx
            clash = set(report["metrics"]) & set(RUNTIME_TRAIN_KEYS)
            if clash:
                raise ValueError(f"{self.method.name}'s client metrics use the runtime's keys {sorted(clash)}")
            timing = dict(report.get("overhead", {}))
            if timing.get("train_s"):
                timing["tokens_per_s"] = report["tokens"] / timing["train_s"]
                self._clients_s += timing["train_s"]
            self.rd.log_metrics({"round": round_idx, "client": cid, "split": "train", "loss": report["loss"],
                                 "steps": report["steps"], "lr": report["lr"], "tokens": report["tokens"],
                                 "bytes_up": up, "bytes_down": down, **timing, **report["metrics"]})
            out.append(Reply(cid, reply))
        need = self.min_replies(len(sampled))
        if len(out) < need:
            raise RoundFailed(f"round {round_idx}: {len(out)} of {len(sampled)} sampled clients replied, fewer than "
                              f"federation.min_replies ({need}); failed: {failures}. The last checkpoint "
                              f"(round {self.completed_rounds}) is intact: resume with `fedmoe run --resume {self.rd.path}`")
        return out

    def _failed(self, round_idx: int, cid: int, stage: str, why) -> None:
        self.log(f"round {round_idx}: client {cid} failed to {stage}: {why}")
        self.failures.append({"round": round_idx, "client": cid, "stage": stage, "error": str(why)})
        self.rd.log_metrics({"round": round_idx, "client": cid, "split": "failure", "stage": stage, "error": str(why)})

    def min_replies(self, sampled: int) -> int:
        m = self.cfg.federation.min_replies
        return max(1, (sampled + 1) // 2) if m is None else min(m, sampled)

    def _evaluate(self, round_idx: int, final: bool, prog: Progress) -> dict:
        personalized = self.method.client.personalized
        all_global = not personalized and all(r.profile["k"] == self.spec.top_k for r in self.records.values())

        def clients(with_rouge, general_for):
            msgs = {cid: self._downlink(cid, EVALUATE, round_idx) for cid in sorted(self.records)}
            results = self.transport.evaluate(round_idx, msgs, with_rouge, general_for, prog)
            for cid, r in results.items():
                self.records[cid].profile = r.pop("profile")
                self.records[cid].evaluated_round = round_idx
            for cid in sorted(set(msgs) - set(results)):
                self._failed(round_idx, cid, "evaluate", "no evaluation came back")
            return results

        def global_model(with_rouge, general):
            return self.transport.evaluate_global(round_idx, self._downlink(None, EVALUATE, round_idx), with_rouge,
                                                  general, prog)

        return self.policy.evaluate_round(round_idx, final, self.records, clients, global_model, all_global, personalized)

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after_round: int | None = None) -> dict | None:
        cfg = self.cfg
        self._t0 = time.time()
        rounds = cfg.federation.rounds
        if cfg.report.tensorboard:
            from ..report.tensorboard import require_tensorboard

            require_tensorboard()
        with Progress(self.show_progress) as prog:
            self.transport.wait_for_clients()
            if not self.resuming:
                self._setup(prog)
            rounds_task = prog.task("rounds", rounds)
            prog.update(rounds_task, completed=self.completed_rounds)
            if cfg.eval.zero_shot and self.completed_rounds == 0 and self.zero_shot is None:
                self.zero_shot = self._evaluate(0, final=False, prog=prog)
                self.save()
            for round_idx in range(self.completed_rounds + 1, rounds + 1):
                t_round, self._clients_s = time.perf_counter(), 0.0
                sampled = sample_clients(len(self.records), cfg.federation.fraction, cfg.seed, round_idx)
                replies = self._train(round_idx, sampled, prog)
                t_agg = time.perf_counter()
                self.global_state, self.server_state, metrics = self.server.aggregate(
                    self.global_state, self.server_state, replies)
                aggregate_s = time.perf_counter() - t_agg
                self.rd.log_metrics({"round": round_idx, "client": None, "split": "server", "aggregate_s": aggregate_s,
                                     "clients": [r.client for r in replies], **metrics})
                self.global_eval = self._evaluate(round_idx, final=round_idx == rounds, prog=prog)
                wall = time.perf_counter() - t_round
                clients_s = self._clients_s + self.policy.clients_s
                # the round's time that is neither the clients' training and evaluation nor aggregation
                # (negative when clients work in parallel)
                self.rd.log_metrics({"round": round_idx, "client": None, "split": "round", "wall_s": wall,
                                     "clients_s": clients_s, "aggregate_s": aggregate_s,
                                     "overhead_s": wall - clients_s - aggregate_s})
                self.completed_rounds = round_idx
                self.save()
                self._tensorboard()
                prog.update(rounds_task, completed=round_idx,
                            info=f"test loss {self.global_eval['loss']:.3f}" if self.global_eval.get("loss") else "")
                if stop_after_round is not None and round_idx >= stop_after_round and round_idx < rounds:
                    return None
        return self.finish()

    def finish(self) -> dict:
        wall = self.wall_before + (time.time() - self._t0)
        trainable = self.spec.initial
        summary = run_summary(
            self.cfg, self.spec, self.records, self.global_eval, self.zero_shot, wall,
            extra={"runtime": self.cfg.federation.runtime, "trainable_tensors": len(trainable),
                   "trainable_params": int(sum(t.numel() for t in trainable.values())),
                   "shared_params": int(sum(t.numel() for t in self.global_state.values())),
                   "client_setup": {cid: m for cid, m in self.client_setup.items() if len(m) > 1},
                   "client_setup_seconds": {cid: m["seconds"] for cid, m in self.client_setup.items()},
                   "metric_notes": self.method.notes, "failures": self.failures})
        self.rd.write_summary(summary)
        histogram = format_histogram_table({cid: r.data["category_counts"] for cid, r in self.records.items()})
        write_report(self.rd, summary, self.rd.read_metrics(), histogram)
        self._tensorboard()
        return summary

    def _tensorboard(self) -> None:
        """``report.tensorboard``: the scalars of metrics.jsonl so far, rebuilt after every round."""
        if self.cfg.report.tensorboard:
            from ..report.tensorboard import write_tensorboard

            write_tensorboard(self.rd.read_metrics(), self.rd.path)


# ---------------------------------------------------------------------- entry points
def prepare_run_dir(cfg: RunConfig) -> RunDir:
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
    """Run a configured federated experiment from scratch in this process; returns (summary, run dir)."""
    rd = prepare_run_dir(cfg)
    run = Federation(cfg, rd, show_progress=show_progress, log=log, observe=observe)
    return run.run(stop_after_round=stop_after_round), rd


def open_run_dir(path: str | Path) -> tuple[RunConfig, RunDir, dict]:
    """(config, run dir, checkpoint) of a run to resume."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"{path} is not a fedmoe run directory (no config.yaml)")
    ck_path = path / "checkpoints" / CHECKPOINT_FILE
    if not ck_path.is_file():
        raise RunDirError(f"{path} has no checkpoint to resume from ({ck_path} is missing); start it again instead")
    return load_config(path / "config.yaml"), RunDir(path), torch.load(ck_path, map_location="cpu", weights_only=False)


def resume(run: Federation, ck: dict, stop_after_round: int | None = None) -> dict | None:
    run.restore(ck)
    run.rd.truncate_metrics(after_round=run.completed_rounds)  # rows written after the checkpoint are redone
    if run.completed_rounds >= run.cfg.federation.rounds:
        run._t0 = time.time()
        return run.finish()
    return run.run(stop_after_round=stop_after_round)


def resume_federated(path: str | Path, show_progress: bool = False, stop_after_round: int | None = None,
                     log=print, observe=None) -> tuple[dict | None, RunDir]:
    """Continue the in-process run in ``path`` from its last checkpoint (its own config.yaml is used)."""
    cfg, rd, ck = open_run_dir(path)
    run = Federation(cfg, rd, show_progress=show_progress, log=log, resuming=True, observe=observe)
    return resume(run, ck, stop_after_round), rd


def start_run(cfg: RunConfig, show_progress: bool = False, federation: str | None = None, log=print):
    """A run from scratch on ``cfg.federation.runtime``; returns (summary, run dir). ``federation``:
    the SuperLink's name in $FLWR_HOME/config.toml (runtime ``flower``)."""
    if cfg.federation.runtime == "local":
        return run_federated(cfg, show_progress=show_progress, log=log)
    from .flower.launch import require_flower, run_deployment, run_simulation

    require_flower()
    rd = prepare_run_dir(cfg)
    if cfg.federation.runtime == "flower-sim":
        return run_simulation(cfg, rd), rd
    return run_deployment(cfg, rd, _federation(federation)), rd


def continue_run(path: str | Path, show_progress: bool = False, federation: str | None = None, log=print):
    """Continue the run in ``path`` from its last checkpoint, on the runtime it ran on."""
    cfg, rd, _ = open_run_dir(path)
    if cfg.federation.runtime == "local":
        return resume_federated(path, show_progress=show_progress, log=log)
    from .flower.launch import run_deployment, run_simulation

    if cfg.federation.runtime == "flower-sim":
        return run_simulation(cfg, rd, resume=True), rd
    return run_deployment(cfg, rd, _federation(federation), resume=True), rd


def _federation(name: str | None) -> str:
    if not name:
        raise ConfigError("--runtime flower needs --federation NAME: the SuperLink's entry in $FLWR_HOME/config.toml "
                          "(README, \"Running on Flower\")")
    return name


__all__ = ["Federation", "continue_run", "start_run", "RoundFailed", "RunDirError", "format_results_table", "resume_federated",
           "run_federated"]
