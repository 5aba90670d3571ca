"""The in-process runtime: one frozen base model, clients simulated one after another.

server: sample → downlink → [client: load state → local train → payload] → aggregate → eval → checkpoint

Method-specific math lives in ``fedmoe.algorithms``; this module only moves named tensors.
"""

from __future__ import annotations

import io
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..algorithms import Algorithm, Payload, build_algorithm
from ..config import ConfigError, RunConfig, config_to_dict, load_config
from ..data import prepare_federated_data
from ..data.tokenize import collate_sft, pad_token_id, tokenize_examples, tokenize_prompt
from ..eval import count_flops, evaluate_loss, greedy_generate, paired_bootstrap, rouge_l_per_example, state_bytes
from ..moe import MoEModel, TopKError, load_tokenizer
from ..report import RunDir, build_summary, format_results_table, write_report
from ..report.rundir import atomic_write_bytes
from ..train import round_lr, train_local
from .checkpoint import CHECKPOINT_FILE, restore_rng_states, rng_states
from .sampling import derive_seed, sample_clients


class RunDirError(ConfigError):
    pass


@dataclass
class ClientRuntime:
    """What the runtime keeps per client besides its private state."""

    id: int
    train: list[dict]
    test: list[dict]
    test_prompts: list[list[int]]
    test_references: list[str]
    test_categories: list[str]
    n_train: int
    bytes_up: int = 0
    bytes_down: int = 0
    rounds_trained: int = 0
    activation_counts: torch.Tensor | None = None  # cumulative (L, E) over local training
    last_eval: dict = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)
    # per-example ROUGE-L of the generated test examples: round 0 and the latest evaluation
    zero_shot_scores: list[float] | None = None
    last_scores: list[float] | None = None


class Progress:
    """Rich progress bars for rounds, clients and evaluation (a no-op when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, description: str, total: int):
        if self._p is None:
            return None
        return self._p.add_task(description, total=total, info="")

    def update(self, task, advance: int = 0, completed: int | None = None, info: str = ""):
        if self._p is not None and task is not None:
            self._p.update(task, advance=advance, completed=completed, info=info)

    def remove(self, task):
        if self._p is not None and task is not None:
            self._p.remove_task(task)

    def print(self, msg: str):
        if self._p is not None:
            self._p.console.print(msg)


def expert_load_std(counts: list) -> list[float] | None:
    """Per MoE layer, the standard deviation over experts of their share of the routed tokens
    (pooled over the given clients' local training): 0 = perfectly balanced."""
    counts = [c for c in counts if c is not None]
    if not counts:
        return None
    pooled = torch.stack(counts).sum(dim=0).double()  # (L, E)
    share = pooled / pooled.sum(dim=1, keepdim=True).clamp_min(1)
    return share.std(dim=1, unbiased=False).tolist()


def _serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class FederatedRun:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, show_progress: bool = False, log=print, resuming: bool = False):
        self.cfg = cfg
        self.rd = run_dir
        self.show_progress = show_progress
        self.log = log
        seed = cfg.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        # data
        self.data = prepare_federated_data(cfg.data, seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.pad_id = pad_token_id(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        max_len = cfg.data.max_length
        self.clients: list[ClientRuntime] = []
        for c in self.data.clients:
            gen_test = c.test if cfg.eval.max_examples is None else c.test[: cfg.eval.max_examples]
            self.clients.append(ClientRuntime(
                id=c.id,
                train=tokenize_examples(self.tokenizer, c.train, max_len),
                test=tokenize_examples(self.tokenizer, c.test, max_len),
                test_prompts=[tokenize_prompt(self.tokenizer, ex, max_len) for ex in gen_test],
                test_references=[ex.output for ex in gen_test],
                test_categories=[ex.category for ex in gen_test],
                n_train=len(c.train),
            ))

        # model and method
        mc = cfg.model
        self.mm = MoEModel.from_pretrained(mc.name, dtype=mc.dtype, device=mc.device,
                                           attn_implementation=mc.attn_implementation, seed=seed)
        if len(self.tokenizer) > self.mm.config.vocab_size:
            raise ConfigError(f"tokenizer '{mc.tokenizer or mc.name}' has {len(self.tokenizer)} tokens but the model's "
                              f"vocabulary has {self.mm.config.vocab_size}; set model.tokenizer to the model's tokenizer")
        self.alg: Algorithm = build_algorithm(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0))  # adapter initialisation
            self.alg.setup(self.mm)
        for cid in range(len(self.clients)):
            k = self.alg.client_top_k(cid)
            if k is not None and not 1 <= k <= self.mm.default_top_k:
                raise TopKError(f"algorithm.client_top_k[{cid}] = {k}, but {mc.name} routes each token to "
                                f"{self.mm.default_top_k} experts: use 1..{self.mm.default_top_k}")
        self.global_state = self.mm.get_state()
        self.server_state = self.alg.init_server_state(self.global_state)
        self.private = {}
        self.setup_seconds = {}
        self.setup_stats: dict = {}
        cuda = self.mm.device.type == "cuda"
        for c in ([] if resuming else self.clients):  # a resumed run restores private state instead
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, 4, c.id))
                self.private[c.id] = self.alg.init_private(c.id, self.mm, c.train)
            self.setup_seconds[c.id] = time.perf_counter() - t
            st = dict(self.alg.setup_stats.get(c.id, {}))
            if cuda:
                st["cuda_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
            if st:
                self.setup_stats[c.id] = {"seconds": self.setup_seconds[c.id], **st}
        self.completed_rounds = 0
        self.wall_before = 0.0
        self.global_eval: dict = {}
        self.zero_shot: dict | None = None  # round-0 evaluation of the initial model

    # ------------------------------------------------------------------ checkpointing
    def checkpoint_state(self) -> dict:
        return {
            "round": self.completed_rounds,
            "global_state": self.global_state,
            "server_state": self.server_state,
            "private": self.private,
            "clients": {c.id: {"bytes_up": c.bytes_up, "bytes_down": c.bytes_down, "rounds_trained": c.rounds_trained,
                               "activation_counts": c.activation_counts, "last_eval": c.last_eval,
                               "zero_shot": c.zero_shot, "zero_shot_scores": c.zero_shot_scores,
                               "last_scores": c.last_scores}
                        for c in self.clients},
            "global_eval": self.global_eval,
            "zero_shot": self.zero_shot,
            "wall_s": self.wall_before + (time.time() - self._t0),
            "setup_seconds": self.setup_seconds,
            "setup_stats": self.setup_stats,
            "rng": rng_states(),
        }

    def save(self) -> None:
        atomic_write_bytes(self.rd.checkpoint_dir / CHECKPOINT_FILE, _serialize(self.checkpoint_state()))

    def restore(self, ck: dict) -> None:
        self.completed_rounds = ck["round"]
        self.global_state = ck["global_state"]
        self.server_state = ck["server_state"]
        self.private = ck["private"]
        for c in self.clients:
            for k, v in ck["clients"][c.id].items():
                setattr(c, k, v)
        self.global_eval = ck["global_eval"]
        self.zero_shot = ck["zero_shot"]
        self.wall_before = ck["wall_s"]
        self.setup_seconds = ck.get("setup_seconds", {})
        self.setup_stats = ck.get("setup_stats", {})
        restore_rng_states(ck["rng"])

    # ------------------------------------------------------------------ one client
    def _load_client(self, cid: int | None) -> None:
        """Put client ``cid``'s model in place (None: the global model at the model's k)."""
        private = self.private[cid] if cid is not None else {}
        self.mm.load_state(self.alg.client_model_state(self.global_state, private, cid))
        k = self.alg.client_top_k(cid)
        self.mm.set_top_k(k if k is not None else self.mm.default_top_k)
        self.alg.prepare_client(self.mm, cid, private)

    def _train_client(self, cid: int, round_idx: int, lr: float, prog: Progress) -> Payload:
        c = self.clients[cid]
        down = self.alg.downlink(self.global_state, cid)
        c.bytes_down += state_bytes(down)
        self._load_client(cid)
        task = prog.task(f"  client {cid} train", self.cfg.train.max_steps or 0)
        res = train_local(self.mm, c.train, self.cfg.train, self.pad_id, lr,
                          seed=derive_seed(self.cfg.seed, 2, round_idx, cid), reference_state=down,
                          progress=lambda s, loss: prog.update(task, completed=s, info=f"loss {loss:.3f}"),
                          grad_correction=self.alg.grad_correction(cid, self.private[cid], down),
                          regularizer=self.alg.local_regularizer(cid, self.private[cid]))
        prog.remove(task)
        trained = self.mm.get_state()
        self.private[cid] = self.alg.private_after_training(cid, trained, self.private[cid], downlink=down,
                                                            steps=res.steps, lr=lr)
        payload = self.alg.payload(cid, trained, c.n_train, res.activation_counts, res.tokens_per_layer)
        up = state_bytes(payload.tensors)
        if payload.activation_counts is not None:
            up += state_bytes({"a": payload.activation_counts, "s": payload.tokens_per_layer})
        c.bytes_up += up
        c.rounds_trained += 1
        c.activation_counts = res.activation_counts if c.activation_counts is None else c.activation_counts + res.activation_counts
        self.rd.log_metrics({"round": round_idx, "client": cid, "split": "train", "loss": res.loss, "steps": res.steps,
                             "lr": lr, "tokens": res.tokens, "bytes_up": up, "bytes_down": state_bytes(down)})
        return payload

    # ------------------------------------------------------------------ evaluation
    def _general_blocks(self) -> list[dict]:
        """Held-out general text (the built-in model's pretraining held-out split), tokenised with the
        run's tokenizer and packed into data.max_length blocks, loss on every token."""
        if not hasattr(self, "_general"):
            from ..pretrain import PretrainConfig, load_corpus, pack

            _, held = load_corpus(PretrainConfig())
            blocks = pack(self.tokenizer, held, self.cfg.data.max_length)[: self.cfg.eval.general_blocks]
            self._general = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
        return self._general

    def _eval_model(self, test: list[dict], prompts: list[list[int]], refs: list[str], with_rouge: bool, prog: Progress,
                    label: str, general: bool = False) -> dict:
        bs = self.cfg.eval.batch_size
        general_res = {}
        if general and self.cfg.eval.general_blocks:
            blocks = self._general_blocks()
            g = evaluate_loss(self.mm.model, (collate_sft(blocks[i : i + bs], self.pad_id)
                                              for i in range(0, len(blocks), bs)), self.mm.device)
            general_res = {"general_loss": g["loss"], "general_perplexity": g["perplexity"]}
        if general and self.cfg.eval.mmlu:
            from ..eval.mmlu import evaluate_mmlu

            m = evaluate_mmlu(self.mm.model, self.tokenizer, subjects=self.cfg.eval.mmlu,
                              max_per_subject=self.cfg.eval.mmlu_max_per_subject, batch_size=bs,
                              max_length=self.cfg.data.max_length * 4, device=self.mm.device)
            general_res["mmlu"] = 100.0 * m["macro_accuracy"]
        batches = (collate_sft(test[i : i + bs], self.pad_id) for i in range(0, len(test), bs))
        out = evaluate_loss(self.mm.model, batches, self.mm.device) if test else {"loss": None, "perplexity": None, "tokens": 0}
        res = {"loss": out["loss"], "perplexity": out["perplexity"], "tokens": out["tokens"], **general_res}
        if with_rouge and prompts:
            task = prog.task(f"  {label} generate", len(prompts))
            gen = greedy_generate(self.mm.model, prompts, self.pad_id, self.eos_id, self.cfg.eval.max_new_tokens, bs,
                                  self.mm.device, progress=lambda n: prog.update(task, advance=n),
                                  no_repeat_ngram_size=self.cfg.eval.no_repeat_ngram_size)
            prog.remove(task)
            preds = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            res["rouge_scores"] = rouge_l_per_example(preds, refs)
            res["rouge_l"] = float(np.mean(res["rouge_scores"]))
            res["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]]
        return res

    def _evaluate(self, round_idx: int, final: bool, prog: Progress) -> None:
        """Evaluate every client's model on its test set, and the global model; round 0 is the
        zero-shot evaluation of the initial model (with ROUGE-L whenever the final round has it)."""
        with_rouge = self.cfg.eval.rouge and (final or round_idx == 0 or self.cfg.eval.every_round)
        task = prog.task(f"round {round_idx} eval", len(self.clients))
        # A client's model equals the global one when the method keeps nothing private and the
        # client uses the model's k: then the global metrics are pooled from the clients' ones.
        all_global = not self.alg.personalized and all(
            self.alg.client_top_k(c.id) in (None, self.mm.default_top_k) for c in self.clients)
        per_client = {}
        for c in self.clients:
            self._load_client(c.id)
            r = self._eval_model(c.test, c.test_prompts, c.test_references, with_rouge, prog, f"client {c.id}",
                                 general=(final or round_idx == 0) and (not all_global or c is self.clients[0]))
            per_client[c.id] = r
            if round_idx == 0:
                c.zero_shot = {k: v for k, v in r.items()
                               if k in ("loss", "rouge_l", "perplexity", "general_loss", "general_perplexity", "mmlu")}
                c.zero_shot_scores = r.get("rouge_scores")
            else:
                c.last_eval = {k: v for k, v in r.items() if k != "rouge_scores"}
                c.last_scores = r.get("rouge_scores")
            self.rd.log_metrics({"round": round_idx, "client": c.id, "split": "test", "loss": r["loss"],
                                 "perplexity": r["perplexity"],
                                 **{k: r[k] for k in ("rouge_l", "general_loss", "general_perplexity", "mmlu") if k in r}})
            prog.update(task, advance=1)
        prog.remove(task)
        categories = [cat for c in self.clients for cat in c.test_categories]
        if all_global:
            tok = sum(r["tokens"] for r in per_client.values())
            loss = sum(r["loss"] * r["tokens"] for r in per_client.values() if r["loss"] is not None) / max(tok, 1)
            g = {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": tok}
            scores = [s for r in per_client.values() for s in r.get("rouge_scores", [])]
            if scores:
                g["rouge_l"] = float(np.mean(scores))
                g["rouge_scores"] = scores
            first = next(iter(per_client.values()))
            for key in ("general_loss", "general_perplexity", "mmlu"):
                if key in first:  # every client model is the global model: any client's value
                    g[key] = first[key]
        else:
            self._load_client(None)
            test = [t for c in self.clients for t in c.test]
            prompts = [p for c in self.clients for p in c.test_prompts]
            refs = [r for c in self.clients for r in c.test_references]
            g = self._eval_model(test, prompts, refs, with_rouge, prog, "global", general=final or round_idx == 0)
        if self.alg.personalized and any("mmlu" in r for r in per_client.values()):
            g["mmlu_clients_mean"] = float(np.mean([r["mmlu"] for r in per_client.values() if "mmlu" in r]))
        if "rouge_scores" in g:
            by_cat: dict[str, list[float]] = {}
            for cat, score in zip(categories, g["rouge_scores"]):
                by_cat.setdefault(cat, []).append(score)
            g["rouge_l_by_category"] = {cat: float(np.mean(v)) for cat, v in sorted(by_cat.items())}
            g["examples_by_category"] = {cat: len(v) for cat, v in sorted(by_cat.items())}
        g = {k: v for k, v in g.items() if k not in ("rouge_scores", "examples")}
        if round_idx == 0:
            self.zero_shot = g
        else:
            self.global_eval = g
        self.rd.log_metrics({"round": round_idx, "client": None, "split": "test", "loss": g["loss"],
                             "perplexity": g["perplexity"],
                             **{k: g[k] for k in ("rouge_l", "rouge_l_by_category", "examples_by_category",
                                                  "general_loss", "general_perplexity", "mmlu", "mmlu_clients_mean")
                                 if k in g}})

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after_round: int | None = None) -> dict | None:
        cfg = self.cfg
        self._t0 = time.time()
        rounds = cfg.federation.rounds
        with Progress(self.show_progress) as prog:
            rounds_task = prog.task("rounds", rounds)
            prog.update(rounds_task, completed=self.completed_rounds)
            if cfg.eval.zero_shot and self.completed_rounds == 0 and self.zero_shot is None:
                self._evaluate(0, final=False, prog=prog)
                self.save()
            for round_idx in range(self.completed_rounds + 1, rounds + 1):
                sampled = sample_clients(len(self.clients), cfg.federation.fraction, cfg.seed, round_idx)
                lr = round_lr(cfg.train, round_idx, rounds)
                clients_task = prog.task(f"round {round_idx} clients", len(sampled))
                payloads = []
                for cid in sampled:
                    payloads.append(self._train_client(cid, round_idx, lr, prog))
                    prog.update(clients_task, advance=1)
                prog.remove(clients_task)
                t_agg = time.perf_counter()
                self.global_state, self.server_state = self.alg.aggregate(self.global_state, payloads, self.server_state)
                server_row = {"round": round_idx, "client": None, "split": "server",
                              "aggregate_s": time.perf_counter() - t_agg, "clients": sampled}
                if "svd_seconds" in self.server_state:
                    server_row["svd_s"] = self.server_state["svd_seconds"]
                self.rd.log_metrics(server_row)
                self._evaluate(round_idx, final=round_idx == rounds, prog=prog)
                self.completed_rounds = round_idx
                self.save()
                prog.update(rounds_task, completed=round_idx,
                            info=f"test loss {self.global_eval['loss']:.3f}" if self.global_eval.get("loss") else "")
                if stop_after_round is not None and round_idx >= stop_after_round and round_idx < rounds:
                    return None
        return self.finish()

    def client_flops(self, k: int, rank: int) -> dict:
        """Analytic forward FLOPs per sequence and FLAME Table 1 parameter columns at this k and rank."""
        lc = self.cfg.lora
        return count_flops(self.mm.config, self.cfg.eval.flops_seq_len, k=k, lora_rank=rank,
                           expert_lora=lc.experts, attention_lora_targets=lc.attention_targets)

    def rouge_l_change(self) -> dict | None:
        """The change of ROUGE-L from zero-shot to the final evaluation of each client's own model, paired
        over every generated test example of every client, with a bootstrap confidence interval."""
        after, before = [], []
        for c in self.clients:
            if c.zero_shot_scores is None or c.last_scores is None:
                return None
            after += c.last_scores
            before += c.zero_shot_scores
        if not after:
            return None
        return paired_bootstrap(after, before, seed=derive_seed(self.cfg.seed, 9))

    def finish(self) -> dict:
        cfg = self.cfg
        wall = self.wall_before + (time.time() - self._t0)
        clients = []
        for c in self.clients:
            k = self.alg.client_top_k(c.id)
            k = k if k is not None else self.mm.default_top_k
            rank = self.alg.current_rank(c.id, self.global_state)
            fl = self.client_flops(k, rank)
            clients.append({
                "id": c.id, "k": k, "rank": rank,
                "n_train": c.n_train, "rouge_l": c.last_eval.get("rouge_l"), "loss": c.last_eval.get("loss"),
                "bytes_up": c.bytes_up, "bytes_down": c.bytes_down, "flops_per_seq": fl["flops_per_seq"],
                "active_params": fl["active_params"], "active_trainable": fl["active_trainable"],
                "perplexity": c.last_eval.get("perplexity"), "rounds_trained": c.rounds_trained,
                "general_perplexity": c.last_eval.get("general_perplexity"), "mmlu": c.last_eval.get("mmlu"),
                "expert_load_std": expert_load_std([c.activation_counts]),
                "zero_shot": c.zero_shot or None,
                "n_test": len(c.test), "n_generated": len(c.test_prompts),
                "category_counts": self.data.clients[c.id].category_counts,
                "expert_activation": None if c.activation_counts is None else c.activation_counts.tolist(),
                "examples": c.last_eval.get("examples", []),
            })
        g = self.global_eval
        summary = build_summary(
            algorithm=cfg.algorithm.name, model=cfg.model.name, rounds=cfg.federation.rounds, seed=cfg.seed,
            wall_s=round(wall, 2), clients=clients,
            global_metrics={"rouge_l": g.get("rouge_l"), "loss": g.get("loss"),
                            "mmlu": g.get("mmlu_clients_mean", g.get("mmlu")), "mmlu_global_model": g.get("mmlu"),
                            "general_perplexity": g.get("general_perplexity"),
                            "expert_load_std": expert_load_std([c.activation_counts for c in self.clients]),
                            "perplexity": g.get("perplexity"), "rouge_l_by_category": g.get("rouge_l_by_category"),
                            "examples_by_category": g.get("examples_by_category"),
                            "rouge_l_change": self.rouge_l_change()},
            extra={"num_clients": len(self.clients), "fraction": cfg.federation.fraction,
                   "num_moe_layers": len(self.mm.layers), "num_experts": self.mm.num_experts,
                   "top_k": self.mm.default_top_k, "trainable_tensors": len(self.global_state),
                   "trainable_params": int(sum(t.numel() for t in self.global_state.values())),
                   "data_skipped_rows": self.data.skipped, "zero_shot": self.zero_shot,
                   "client_setup_seconds": self.setup_seconds, "client_setup": self.setup_stats},
        )
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
                  log=print) -> tuple[dict | None, RunDir]:
    """Run a configured federated experiment from scratch; returns (summary, run dir)."""
    rd = _prepare_run_dir(cfg)
    run = FederatedRun(cfg, rd, show_progress=show_progress, log=log)
    return run.run(stop_after_round=stop_after_round), rd


def resume_federated(path: str | Path, show_progress: bool = False, stop_after_round: int | None = None,
                     log=print) -> tuple[dict | None, RunDir]:
    """Continue the run in ``path`` from its last checkpoint (its own config.yaml is used)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"{path} is not a fedmoe run directory (no config.yaml)")
    ck_path = path / "checkpoints" / CHECKPOINT_FILE
    if not ck_path.is_file():
        raise RunDirError(f"{path} has no checkpoint to resume from ({ck_path} is missing); start it again instead")
    cfg = load_config(path / "config.yaml")
    rd = RunDir(path)
    run = FederatedRun(cfg, rd, show_progress=show_progress, log=log, resuming=True)
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    run.restore(ck)
    rd.truncate_metrics(after_round=run.completed_rounds)  # rows written after the checkpoint are redone
    if run.completed_rounds >= cfg.federation.rounds:
        run._t0 = time.time()
        return run.finish(), rd
    return run.run(stop_after_round=stop_after_round), rd


__all__ = ["FederatedRun", "RunDirError", "format_results_table", "resume_federated", "run_federated"]
