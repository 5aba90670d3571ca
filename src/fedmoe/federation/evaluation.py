"""The evaluation policy of a run: which model is evaluated on what, and when.

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


class Evaluator:
    def __init__(self, cfg, mm, tokenizer, sets, log_metrics: Callable[[dict], None]):
        self.cfg, self.mm, self.tokenizer, self.sets, self.log_metrics = cfg, mm, tokenizer, sets, log_metrics
        self.pad_id = sets[0].pad_id
        self.eos_id = tokenizer.eos_token_id
        self._general: list[dict] | None = None

    def general(self) -> list[dict]:
        if self._general is None:
            self._general = general_blocks(self.tokenizer, self.cfg.data.max_length, self.cfg.eval.general_blocks)
        return self._general

    def evaluate_model(self, test: list[dict], prompts: list[list[int]], refs: list[str], with_rouge: bool,
                       prog: Progress, label: str, general: bool = False) -> dict:
        """Loss (and ROUGE-L, general text, MMLU when asked) of the model now in place."""
        ec, mm = self.cfg.eval, self.mm
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
            res["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]]
        return res

    def evaluate_round(self, round_idx: int, final: bool, records: list[ClientRecord], load: Callable,
                       all_global: bool, personalized: bool, prog: Progress) -> dict:
        """Evaluate every client's model (``load(cid)`` puts it in place; ``load(None)`` the global
        model) and the global model; round 0 is the zero-shot evaluation. Returns the global metrics
        (with personalised clients, MMLU also as the mean over the clients' own models)."""
        with_rouge = self.cfg.eval.rouge and (final or round_idx == 0 or self.cfg.eval.every_round)
        with_general = final or round_idx == 0
        task = prog.task(f"round {round_idx} eval", len(self.sets))
        per_client = {}
        for s, rec in zip(self.sets, records):
            load(s.id)
            r = self.evaluate_model(s.test, s.test_prompts, s.test_references, with_rouge, prog, f"client {s.id}",
                                    general=with_general and (not all_global or s is self.sets[0]))
            per_client[s.id] = r
            if round_idx == 0:
                rec.zero_shot = {k: v for k, v in r.items() if k in ZERO_SHOT_KEYS}
                rec.zero_shot_scores = r.get("rouge_scores")
            else:
                rec.last_eval = {k: v for k, v in r.items() if k != "rouge_scores"}
                rec.last_scores = r.get("rouge_scores")
            self.log_metrics({"round": round_idx, "client": s.id, "split": "test", "loss": r["loss"],
                              "perplexity": r["perplexity"],
                              **{k: r[k] for k in ("rouge_l", *GENERAL_KEYS) if k in r}})
            prog.update(task, advance=1)
        prog.remove(task)
        if all_global:
            g = self._pooled(per_client)
        else:
            load(None)
            g = self.evaluate_model([t for s in self.sets for t in s.test], [p for s in self.sets for p in s.test_prompts],
                                    [r for s in self.sets for r in s.test_references], with_rouge, prog, "global",
                                    general=with_general)
        if personalized and any("mmlu" in r for r in per_client.values()):
            g["mmlu_clients_mean"] = float(np.mean([r["mmlu"] for r in per_client.values() if "mmlu" in r]))
        if "rouge_scores" in g:
            by_cat: dict[str, list[float]] = {}
            categories = [cat for s in self.sets for cat in s.test_categories]
            for cat, score in zip(categories, g["rouge_scores"]):
                by_cat.setdefault(cat, []).append(score)
            g["rouge_l_by_category"] = {cat: float(np.mean(v)) for cat, v in sorted(by_cat.items())}
            g["examples_by_category"] = {cat: len(v) for cat, v in sorted(by_cat.items())}
        g = {k: v for k, v in g.items() if k not in ("rouge_scores", "examples")}
        self.log_metrics({"round": round_idx, "client": None, "split": "test", "loss": g["loss"],
                          "perplexity": g["perplexity"],
                          **{k: g[k] for k in ("rouge_l", "rouge_l_by_category", "examples_by_category", *GENERAL_KEYS,
                                               "mmlu_clients_mean") if k in g}})
        return g

    @staticmethod
    def _pooled(per_client: dict) -> dict:
        """The global metrics when every client's model is the global model: token-weighted loss,
        example-weighted ROUGE-L, and any client's general-text numbers."""
        tok = sum(r["tokens"] for r in per_client.values())
        loss = sum(r["loss"] * r["tokens"] for r in per_client.values() if r["loss"] is not None) / max(tok, 1)
        g = {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": tok}
        scores = [s for r in per_client.values() for s in r.get("rouge_scores", [])]
        if scores:
            g["rouge_l"] = float(np.mean(scores))
            g["rouge_scores"] = scores
        first = next(iter(per_client.values()))
        for key in GENERAL_KEYS:
            if key in first:
                g[key] = first[key]
        return g
