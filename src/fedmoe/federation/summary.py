"""What the runtime records about each client as the run goes (bytes, rounds, expert activation,
evaluations), and the summary.json built from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..config import config_to_dict
from ..eval import paired_bootstrap
from ..report import build_summary
from ..report.method import method_info
from ..seeds import Stream, derive_seed


NONFINITE = "non-finite"  # failure stage: a client's loss or update was NaN/inf and was left out
EXIT_NONFINITE = 3  # `fedmoe run`'s exit status when a finished run left such an update out
COLLAPSE_TOLERANCE = 0.02  # a test loss within 2% of ln V (uniform output over V tokens) is flagged


@dataclass
class ClientRecord:
    """The runtime's ledger of one client (checkpointed)."""

    bytes_up: int = 0  # every reply it sent, those left out of the aggregation (invalid, non-finite) included
    bytes_down: int = 0  # every message sent to it, those of rounds it failed included
    rounds_trained: int = 0  # the rounds whose update was aggregated
    replies_received: int = 0  # the training replies its bytes_up counts (a checkpoint before it: 0)
    # the training requests it was sent, answered or not (each one a possible release under federation.dp.where:
    # client; the name is that of earlier checkpoints)
    replies_sent: int = 0
    activation_counts: torch.Tensor | None = None  # cumulative (L, E) over local training
    last_eval: dict = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)
    # per-example answer scores (ROUGE-L, or 100/0 for a right/wrong choice): round 0 and the latest evaluation
    zero_shot_scores: list[float] | None = None
    last_scores: list[float] | None = None
    # what the client reported of itself: its data (n_train, n_test, n_generated, category_counts,
    # skipped_rows) and what it runs (k, rank)
    data: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    evaluated_round: int | None = None  # the round of last_eval (older than the last round if it failed since)
    # the method's own metrics from the client's latest reply (e.g. a learned value per MoE layer)
    reported: dict = field(default_factory=dict)
    reported_round: int | None = None

    def state(self) -> dict:
        return asdict(self)

    def add_counts(self, counts: torch.Tensor) -> None:
        self.activation_counts = counts.clone() if self.activation_counts is None else self.activation_counts + counts


def expert_load_std(counts: list) -> list[float] | None:
    """Per MoE layer, the standard deviation over experts of their share of the routed tokens
    (pooled over the given clients' local training): 0 = perfectly balanced."""
    counts = [c for c in counts if c is not None]
    if not counts:
        return None
    pooled = torch.stack(counts).sum(dim=0).double()  # (L, E)
    share = pooled / pooled.sum(dim=1, keepdim=True).clamp_min(1)
    return share.std(dim=1, unbiased=False).tolist()


def answer_change(records: list[ClientRecord], seed: int) -> dict | None:
    """The change of the answer metric (ROUGE-L, or accuracy in points) from zero-shot to the final
    evaluation of each client's own model, paired over every answered test example of every client,
    with a bootstrap confidence interval."""
    after, before = [], []
    for r in records:
        if r.zero_shot_scores is None or r.last_scores is None:
            return None
        after += r.last_scores
        before += r.zero_shot_scores
    if not after:
        return None
    return paired_bootstrap(after, before, seed=derive_seed(seed, Stream.BOOTSTRAP))


def skipped_rows(records: list[ClientRecord]) -> int:
    """Bad rows dropped while loading: once for a source all clients share, summed over own files."""
    own = [r.data.get("skipped_rows", 0) for r in records if not r.data.get("shared_source", True)]
    shared = [r.data.get("skipped_rows", 0) for r in records if r.data.get("shared_source", True)]
    return sum(own) + (shared[0] if shared else 0)


def loss_verdict(loss, uniform: float) -> str | None:
    """What is wrong with a test loss, judged against ln V (``uniform``), or None."""
    if loss is None:
        return None
    if not math.isfinite(loss):
        return "non-finite"
    if abs(loss - uniform) <= COLLAPSE_TOLERANCE * uniform:
        return "uniform output"
    if loss > uniform:
        return "worse than uniform output"
    return None


def model_health(vocab_size: int, global_eval: dict, zero_shot: dict | None, records: dict[int, ClientRecord]) -> dict:
    """Models whose final test loss is non-finite, within 2% of ln V (the loss of a uniform
    distribution over the V tokens: the model predicts nothing, it collapsed or never learned) or
    above it; each flagged model with its zero-shot loss, which tells the two apart."""
    uniform = math.log(vocab_size)
    models = [("global", global_eval.get("loss"), (zero_shot or {}).get("loss"))]
    models += [(cid, records[cid].last_eval.get("loss"), records[cid].zero_shot.get("loss")) for cid in sorted(records)]
    flagged = [{"model": m, "loss": loss, "zero_shot_loss": z, "verdict": v}
               for m, loss, z in models if (v := loss_verdict(loss, uniform)) is not None]
    return {"uniform_loss": uniform, "tolerance": COLLAPSE_TOLERANCE, "flagged": flagged}


def nonfinite_exit_message(summary: dict) -> str | None:
    """Why `fedmoe run` exits with EXIT_NONFINITE after a finished run, or None."""
    bad = [f for f in summary.get("failures") or [] if f.get("stage") == NONFINITE]
    if not bad:
        return None
    where = ", ".join(f"client {f['client']} in round {f['round']}" for f in bad[:5]) + (" ..." if len(bad) > 5 else "")
    return (f"{len(bad)} client update(s) had non-finite values and were left out of the aggregation ({where}): "
            f"the results come from the other clients' updates (report: Failures); exit status {EXIT_NONFINITE}")


def label_groups(cfg) -> dict | None:
    """A label task's concept shift: each client's group and each group's shifted labels (from the
    config alone, as the data side draws them)."""
    cs = cfg.data.concept_shift
    if cs is None or cfg.data.labels is None:
        return None
    from ..data.tasks import concept_shift

    groups, maps = concept_shift(cs, cfg.data.labels, cfg.data.partition.num_clients, cfg.seed)
    return {"client_group": groups,
            "maps": [{a: b for a, b in m.items() if a != b} for m in maps]}


def lowest_val_loss(metrics: list[dict]) -> dict | None:
    """Of the global model's validation losses in metrics.jsonl's rows (round 0, the initial model, included), the
    lowest and its round (the earliest of equal ones): the round a run would have best stopped at, by data that is
    not the test set. None where no round measured one (``eval.val_loss`` off, no validation examples)."""
    by_round = {row["round"]: row["val_loss"] for row in metrics if row.get("kind") == "test" and row.get("client") is None
                and isinstance(row.get("val_loss"), float) and math.isfinite(row["val_loss"])}
    if not by_round:
        return None
    best = min(sorted(by_round), key=lambda r: by_round[r])
    return {"round": best, "val_loss": by_round[best], "rounds_measured": len(by_round)}


def n_scored(r: ClientRecord) -> int | None:
    """How many test examples a client's latest answer metric is the mean over (0: it has none to answer), or None
    where it has no such metric (``eval.rouge: false``, an evaluation its node kept)."""
    if r.last_scores is not None:
        return len(r.last_scores)
    return 0 if r.data.get("n_generated") == 0 else None


def _trains_global_model(cfg) -> bool:
    from ..algorithms.registry import METHODS

    return METHODS[cfg.algorithm.name].server.trains_global_model


def run_summary(cfg, spec, records: dict[int, ClientRecord], global_eval: dict, zero_shot: dict | None,
                wall_s: float, extra: dict) -> dict:
    """summary.json of a finished run (``spec``: the server's view of the model)."""
    metric = "accuracy" if cfg.eval.task == "choice" else "rouge_l"
    clients = []
    for cid in sorted(records):
        r = records[cid]
        k, rank = r.profile["k"], r.profile["rank"]
        fl = spec.counts(k, rank, cfg.eval.flops_seq_len)  # from the tensors the method built
        clients.append({
            "id": cid, "k": k, "rank": rank,
            "n_train": r.data.get("n_train"), "rouge_l": r.last_eval.get("rouge_l"), "accuracy": r.last_eval.get("accuracy"),
            "loss": r.last_eval.get("loss"),
            # eval.val_loss: its own model's loss on its validation examples (n_val of them), in the last evaluation
            **({"val_loss": r.last_eval.get("val_loss"), "n_val": r.data.get("n_val")} if cfg.eval.val_loss else {}),
            "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "flops_per_seq": fl["flops_per_seq"],
            "active_params": fl["active_params"], "active_trainable": fl["active_trainable"],
            "total_trainable": fl["total_trainable"],
            "perplexity": r.last_eval.get("perplexity"), "rounds_trained": r.rounds_trained,
            "replies_received": r.replies_received,
            "evaluated_round": r.evaluated_round,
            "general_perplexity": r.last_eval.get("general_perplexity"), "mmlu": r.last_eval.get("mmlu"),
            "heldout_accuracy": r.last_eval.get("heldout_accuracy"), "heldout_loss": r.last_eval.get("heldout_loss"),
            "confusion": r.last_eval.get("confusion"),
            # per answered test example (100 right / 0 wrong, or ROUGE-L), zero-shot and final: pairs across runs
            "scores": r.last_scores, "zero_shot_scores": r.zero_shot_scores,
            "heldout_scores": r.last_eval.get("heldout_scores"),
            # how many test examples its answer metric (rouge_l / accuracy) is the mean over: len(scores)
            "n_scored": n_scored(r),
            "expert_load_std": expert_load_std([r.activation_counts]),
            "zero_shot": r.zero_shot or None,
            "n_test": r.data.get("n_test"), "n_generated": r.data.get("n_generated"),
            "category_counts": r.data.get("category_counts"),
            "expert_activation": None if r.activation_counts is None else r.activation_counts.tolist(),
            "reported": r.reported or None, "reported_round": r.reported_round,
            "examples": r.last_eval.get("examples", []),
        })
    g = global_eval
    ordered = [records[c] for c in sorted(records)]
    return build_summary(
        algorithm=cfg.algorithm.name, model=cfg.model.name, rounds=cfg.federation.rounds, seed=cfg.seed,
        wall_s=round(wall_s, 2), clients=clients,
        global_metrics={"rouge_l": g.get("rouge_l"), "accuracy": g.get("accuracy"), "loss": g.get("loss"),
                        "mmlu": g.get("mmlu_clients_mean", g.get("mmlu")), "mmlu_global_model": g.get("mmlu"),
                        # over questions rather than subjects, and how the 5-shot prompts fitted the prompt limit
                        "mmlu_micro": g.get("mmlu_micro_clients_mean", g.get("mmlu_micro")),
                        **{k: g.get(k) for k in ("mmlu_questions", "mmlu_fewer_shots", "mmlu_questions_cut")},
                        "general_perplexity": g.get("general_perplexity"),
                        "expert_load_std": expert_load_std([r.activation_counts for r in ordered]),
                        "perplexity": g.get("perplexity"), "rouge_l_by_category": g.get("rouge_l_by_category"),
                        "accuracy_by_category": g.get("accuracy_by_category"),
                        "examples_by_category": g.get("examples_by_category"),
                        "heldout_accuracy": g.get("heldout_accuracy_clients_mean", g.get("heldout_accuracy")),
                        "heldout_accuracy_global_model": g.get("heldout_accuracy"),
                        "heldout_loss": g.get("heldout_loss_clients_mean", g.get("heldout_loss")),
                        "confusion": g.get("confusion"),
                        "heldout_scores": g.get("heldout_scores"),
                        # the test examples the global model's answer metric is the mean over
                        "n_scored": g.get("n_scored"),
                        # the clients whose test data the global numbers leave out: failed, or kept by their nodes
                        "clients_missing": g.get("clients_missing"), "clients_withheld": g.get("clients_withheld"),
                        **({"val_loss": g.get("val_loss"), "val_loss_lowest": g.get("val_loss_lowest")}
                           if cfg.eval.val_loss else {}),
                        f"{metric}_change": answer_change(ordered, cfg.seed)},
        extra={"method": method_info(config_to_dict(cfg)), "task": cfg.eval.task, "labels": cfg.data.labels, "label_groups": label_groups(cfg),
               # False (local_only): the "global" model numbers are the initial model's
               "global_model_trained": _trains_global_model(cfg),
               "num_clients": len(records), "fraction": cfg.federation.fraction, "num_moe_layers": spec.num_moe_layers,
               "num_experts": spec.num_experts, "top_k": spec.top_k, "zero_shot": zero_shot,
               "data_skipped_rows": skipped_rows(ordered),
               "health": model_health(spec.config.vocab_size, g, zero_shot, records), **extra},
    )
