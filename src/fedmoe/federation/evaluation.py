"""Evaluation: what a client measures on the model in place (:class:`ModelEvaluator`, client side),
and the policy of a run (:class:`EvalPolicy`, server side): which model is evaluated on what, when,
and how the results become the run's numbers.

Every round, each client's own model (the message the server would send it plus its private store)
is evaluated on that client's test set: loss every round; ROUGE-L of greedy answers in the zero-shot
round 0 (the initial model), the final round, and every round with ``eval.every_round``; general-text
perplexity and MMLU at round 0 and at the end. The global model is evaluated on the union of the
test sets; when every client's model is the global model (the method keeps nothing personal and
every client runs at the model's k) the global numbers are pooled from the clients' evaluations
instead of being computed again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.general import general_blocks
from ..data.tokenize import collate_sft
from ..eval import evaluate_loss, greedy_generate, rouge_l_per_example
from .progress import Progress
from .summary import ClientRecord

ZERO_SHOT_KEYS = ("loss", "rouge_l", "perplexity", "general_loss", "general_perplexity", "mmlu")
GENERAL_KEYS = ("general_loss", "general_perplexity", "mmlu")


class ModelEvaluator:
    """Evaluates the model now in place (one client's, or the global one) on test data."""

    def __init__(self, cfg, mm, tokenizer, pad_id: int):
        self.cfg, self.mm, self.tokenizer, self.pad_id = cfg, mm, tokenizer, pad_id
        self.eos_id = tokenizer.eos_token_id
        self._general: list[dict] | None = None

    def general(self) -> list[dict]:
        if self._general is None:
            self._general = general_blocks(self.tokenizer, self.cfg.data.max_length, self.cfg.eval.general_blocks)
        return self._general

    def evaluate(self, test: list[dict], prompts: list[list[int]], refs: list[str], categories: list[str],
                 with_rouge: bool, general: bool = False, prog: Progress | None = None, label: str = "") -> dict:
        """Loss (and ROUGE-L per generated example, general text, MMLU when asked)."""
        ec, mm = self.cfg.eval, self.mm
        prog = prog or Progress(False)
        bs = ec.batch_size
        general_res = {}
        if general and ec.general_blocks:
            blocks = self.general()
            g = evaluate_loss(mm.model, (collate_sft(blocks[i : i + bs], self.pad_id)
                                         for i in range(0, len(blocks), bs)), mm.device)
            general_res = {"general_loss": g["loss"], "general_perplexity": g["perplexity"]}
        if general and ec.mmlu:
            from ..eval.mmlu import evaluate_mmlu

            m = evaluate_mmlu(mm.model, self.tokenizer, subjects=ec.mmlu, max_per_subject=ec.mmlu_max_per_subject,
                              batch_size=bs, max_length=self.cfg.data.max_length * 4, device=mm.device)
            general_res["mmlu"] = 100.0 * m["macro_accuracy"]
        batches = (collate_sft(test[i : i + bs], self.pad_id) for i in range(0, len(test), bs))
        out = evaluate_loss(mm.model, batches, mm.device) if test else {"loss": None, "perplexity": None, "tokens": 0}
        res = {"loss": out["loss"], "perplexity": out["perplexity"], "tokens": out["tokens"], **general_res}
        if with_rouge and prompts:
            task = prog.task(f"  {label} generate", len(prompts))
            gen = greedy_generate(mm.model, prompts, self.pad_id, self.eos_id, ec.max_new_tokens, bs, mm.device,
                                  progress=lambda n: prog.update(task, advance=n),
                                  no_repeat_ngram_size=ec.no_repeat_ngram_size)
            prog.remove(task)
            preds = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            res["rouge_scores"] = rouge_l_per_example(preds, refs)
            res["rouge_l"] = float(np.mean(res["rouge_scores"]))
            res["categories"] = list(categories)
            res["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]]
        return res

    def evaluate_sets(self, sets, with_rouge: bool, general: bool, prog: Progress | None = None,
                      label: str = "") -> dict:
        """The model on the union of these clients' test data (one client: its own)."""
        return self.evaluate([t for s in sets for t in s.test], [p for s in sets for p in s.test_prompts],
                             [r for s in sets for r in s.test_references], [c for s in sets for c in s.test_categories],
                             with_rouge, general, prog, label)


def pooled(results: list[dict]) -> dict:
    """One model's metrics from its evaluations on several test sets: token-weighted loss,
    example-weighted ROUGE-L (scores and categories concatenated in order), the first set's
    general-text numbers. A set with no test tokens adds nothing; with none at all, loss and
    perplexity are None ("no test data"), never 0 and 1."""
    counted = [r for r in results if r["loss"] is not None and r["tokens"]]
    tok = sum(r["tokens"] for r in counted)
    loss = sum(r["loss"] * r["tokens"] for r in counted) / tok if tok else None
    g = {"loss": loss, "perplexity": None if loss is None else float(np.exp(loss)), "tokens": tok}
    scores = [s for r in results for s in r.get("rouge_scores", [])]
    if scores:
        g["rouge_l"] = float(np.mean(scores))
        g["rouge_scores"] = scores
        g["categories"] = [c for r in results for c in r.get("categories", [])]
    for key in GENERAL_KEYS:
        if results and key in results[0]:
            g[key] = results[0][key]
    return g


class EvalPolicy:
    """The server side of evaluation: when, on which model, and the books."""

    def __init__(self, cfg, log_metrics: Callable[[dict], None]):
        self.cfg, self.log_metrics = cfg, log_metrics

    def flags(self, round_idx: int, final: bool) -> tuple[bool, bool]:
        """(ROUGE-L this round, general text and MMLU this round)."""
        ec = self.cfg.eval
        return ec.rouge and (final or round_idx == 0 or ec.every_round), final or round_idx == 0

    def evaluate_round(self, round_idx: int, final: bool, records: dict[int, ClientRecord], evaluate_clients: Callable,
                       evaluate_global: Callable, all_global: bool, personalized: bool) -> dict:
        """``evaluate_clients(with_rouge, general_for)`` -> {client: its own model's results};
        ``evaluate_global(with_rouge, general)`` -> the global model's results. Returns the global
        metrics (with personalised clients, MMLU also as the mean over the clients' own models)."""
        with_rouge, with_general = self.flags(round_idx, final)
        cids = sorted(records)
        general_for = {cid: with_general and (not all_global or cid == cids[0]) for cid in cids}
        per_client = evaluate_clients(with_rouge, general_for)  # a client that failed is missing
        for cid in cids:
            if cid not in per_client:
                continue
            r, rec = per_client[cid], records[cid]
            if round_idx == 0:
                rec.zero_shot = {k: v for k, v in r.items() if k in ZERO_SHOT_KEYS}
                rec.zero_shot_scores = r.get("rouge_scores")
            else:
                rec.last_eval = {k: v for k, v in r.items() if k not in ("rouge_scores", "categories")}
                rec.last_scores = r.get("rouge_scores")
            self.log_metrics({"round": round_idx, "client": cid, "split": "test", "loss": r["loss"],
                              "perplexity": r["perplexity"],
                              **{k: r[k] for k in ("rouge_l", *GENERAL_KEYS, "eval_s") if k in r}})
        self.clients_s = sum(r.get("eval_s", 0.0) for r in per_client.values())
        if all_global:
            g = pooled([per_client[c] for c in cids if c in per_client])
        else:
            g = evaluate_global(with_rouge, with_general)
            self.clients_s += g.get("eval_s", 0.0)
        if personalized and any("mmlu" in r for r in per_client.values()):
            g["mmlu_clients_mean"] = float(np.mean([r["mmlu"] for r in per_client.values() if "mmlu" in r]))
        if "rouge_scores" in g:
            by_cat: dict[str, list[float]] = {}
            for cat, score in zip(g["categories"], g["rouge_scores"]):
                by_cat.setdefault(cat, []).append(score)
            g["rouge_l_by_category"] = {cat: float(np.mean(v)) for cat, v in sorted(by_cat.items())}
            g["examples_by_category"] = {cat: len(v) for cat, v in sorted(by_cat.items())}
        g = {k: v for k, v in g.items() if k not in ("rouge_scores", "examples", "categories", "eval_s")}
        self.log_metrics({"round": round_idx, "client": None, "split": "test", "loss": g["loss"],
                          "perplexity": g["perplexity"],
                          **{k: g[k] for k in ("rouge_l", "rouge_l_by_category", "examples_by_category", *GENERAL_KEYS,
                                               "mmlu_clients_mean") if k in g}})
        return g
