"""Evaluation: what a client measures on the model in place (:class:`ModelEvaluator`, client side),
and the policy of a run (:class:`EvalPolicy`, server side): which model is evaluated on what, when,
and how the results become the run's numbers.

Every round, each client's own model (the message the server would send it plus its private store)
is evaluated on that client's test set: loss every round; its answers — ROUGE-L of greedy answers
(``eval.task: generate``) or accuracy by option log-likelihood (``choice``) — in the zero-shot round 0
(the initial model), the final round, and every round with ``eval.every_round``; general-text
perplexity, MMLU and the shared held-out set (``data.heldout``) at round 0 and at the end. The global model is evaluated on the union of the
test sets; when every client's model is the global model (the method keeps nothing personal and
every client runs at the model's k) the global numbers are pooled from the clients' evaluations
instead of being computed again.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..data.general import general_blocks
from ..data.tokenize import collate_sft
from ..eval import evaluate_loss, greedy_generate, rouge_l_per_example
from .progress import Progress
from .summary import ClientRecord
from .transport import is_number

ZERO_SHOT_KEYS = ("loss", "rouge_l", "accuracy", "perplexity", "general_loss", "general_perplexity", "mmlu", "mmlu_micro",
                  "heldout_loss", "heldout_accuracy", "val_loss")
# eval.val_loss: a model's loss on validation examples and the tokens it is the mean over (beside its test loss)
VAL_KEYS = ("val_loss", "val_tokens")
# a client's evaluation that its node kept (its own privacy budget: fedmoe.federation.flower.budget): the name
# the client gives it among what it withheld, and what the transport hands the runtime in place of a result —
# neither a result nor a failure
WITHHELD_EVALUATION = "evaluation"
# what such a client keeps of its data's description besides: the size of its test and validation sets
WITHHELD_WITH_EVALUATION = ("n_test", "n_generated", "n_val")
# MMLU: ``mmlu`` is the macro accuracy (the mean over subjects, the papers' figure), ``mmlu_micro`` the accuracy over
# its ``mmlu_questions``; ``mmlu_fewer_shots`` of them kept fewer than five shots to fit the prompt limit
# (``eval.mmlu.run_prompt_limit``) and ``mmlu_questions_cut`` lost the start of the question itself (every shot gone)
MMLU_FACTS = ("mmlu_micro", "mmlu_questions", "mmlu_fewer_shots", "mmlu_questions_cut")
# the numbers on shared data a reply must hold to have evaluated it (MMLU's facts come only beside its accuracy)
GENERAL_HEADLINES = ("general_loss", "general_perplexity", "mmlu", "heldout_loss", "heldout_accuracy")
GENERAL_KEYS = (*GENERAL_HEADLINES[:3], *MMLU_FACTS, *GENERAL_HEADLINES[3:])
GENERAL_PARTS = (*GENERAL_KEYS, "heldout_scores")  # what an evaluation with ``general`` adds to its results


def has_general(result: dict) -> bool:
    """Whether an evaluation's results hold the numbers on shared data (general text, MMLU, held-out set)."""
    return any(k in result for k in GENERAL_HEADLINES)


def answer_metric(cfg) -> str:
    """The key of the run's per-example answer metric: ``rouge_l`` (generate) or ``accuracy`` (choice)."""
    return "accuracy" if cfg.eval.task == "choice" else "rouge_l"


class ModelEvaluator:
    """Evaluates the model now in place (one client's, or the global one) on test data; ``heldout``:
    the shared held-out test set (``data.heldout``) as a ``ClientSet``."""

    def __init__(self, cfg, mm, tokenizer, pad_id: int, heldout=None):
        self.cfg, self.mm, self.tokenizer, self.pad_id = cfg, mm, tokenizer, pad_id
        self.eos_id = tokenizer.eos_token_id
        self.heldout = heldout
        self._general: list[dict] | None = None

    def general(self) -> list[dict]:
        if self._general is None:
            self._general = general_blocks(self.tokenizer, self.cfg.data.max_length, self.cfg.eval.general_blocks)
        return self._general

    def _loss_after_choices(self, sets, option_logprobs) -> dict:
        """The test loss of these sets, taken from the option scores where they already hold it: a test
        example that is its prompt followed by its right option (the usual case: the option ends with
        eos, as a training target does) has as loss sum minus its right option's log-likelihood, so
        its sequence is not run again; the others (a prompt truncated differently, examples past
        ``eval.max_examples``) go through the model. The same value as :meth:`_loss` up to float
        rounding (tests/test_choice.py)."""
        total, tokens, rest, first = 0.0, 0, [], 0
        for s in sets:
            for j, ex in enumerate(s.test):
                if j < len(s.test_prompts):
                    prompt, right = s.test_prompts[j], s.test_options[j][s.test_answers[j]]
                    if ex["prompt_len"] == len(prompt) and ex["input_ids"] == prompt + right:
                        total -= float(option_logprobs[first + j][s.test_answers[j]])
                        tokens += len(right)
                        continue
                rest.append(ex)
            first += len(s.test_prompts)
        if rest:
            r = self._loss(rest)
            if r["tokens"]:
                total += r["loss"] * r["tokens"]
                tokens += r["tokens"]
        if not tokens:
            return {"loss": None, "perplexity": None, "tokens": 0}
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens}

    def _loss(self, examples: list[dict]) -> dict:
        bs = self.cfg.eval.batch_size
        if not examples:
            return {"loss": None, "perplexity": None, "tokens": 0}
        return evaluate_loss(self.mm.model, (collate_sft(examples[i : i + bs], self.pad_id)
                                             for i in range(0, len(examples), bs)), self.mm.device)

    def _choices(self, sets, prog: Progress, label: str) -> dict:
        """Accuracy by option log-likelihood on the sets' answered test examples: per-example scores
        (100 right, 0 wrong), the accuracy in percent, the confusion matrix over a shared label set."""
        from ..eval.choice import choose, confusion_matrix, option_logprobs

        prompts = [p for s in sets for p in s.test_prompts]
        if not prompts:
            return {}
        options = [o for s in sets for o in s.test_options]
        answers = [a for s in sets for a in s.test_answers]
        task = prog.task(f"  {label} score options", len(prompts))
        scores = option_logprobs(self.mm.model, prompts, options, self.cfg.eval.batch_size, self.mm.device,
                                 self.pad_id, progress=lambda n: prog.update(task, advance=n))
        prog.remove(task)
        picks = choose(scores, options, self.cfg.eval.choice_normalize)
        per = [100.0 * (p == a) for p, a in zip(picks, answers)]
        out = {"scores": per, "accuracy": float(np.mean(per)), "categories": [c for s in sets for c in s.test_categories],
               "option_logprobs": scores}
        labels = sets[0].labels
        if labels is not None and all(s.labels == labels for s in sets):
            out["confusion"] = confusion_matrix(answers, picks, len(labels))
            out["labels"] = list(labels)
        return out

    def _val(self, sets) -> dict:
        """``eval.val_loss``: the loss on the union of the sets' validation examples and its token count (None
        and 0 where they hold none: no loss from zero tokens); {} where the sets carry none."""
        if all(s.val is None for s in sets):
            return {}
        out = self._loss([t for s in sets for t in s.val or ()])
        return {"val_loss": out["loss"], "val_tokens": out["tokens"]}

    def evaluate_sets(self, sets, with_answers: bool, general: bool, prog: Progress | None = None,
                      label: str = "") -> dict:
        """The model on the union of these clients' test data (one client: its own): loss; the answers
        when asked (ROUGE-L of greedy answers, or accuracy by option log-likelihood); general text,
        MMLU and the shared held-out set when ``general``; the loss on their validation examples where they carry
        them (``eval.val_loss``)."""
        ec, mm = self.cfg.eval, self.mm
        prog = prog or Progress(False)
        general_res = {}
        if general and ec.general_blocks:
            g = self._loss(self.general())
            general_res = {"general_loss": g["loss"], "general_perplexity": g["perplexity"]}
        if general and ec.mmlu:
            from ..eval.mmlu import evaluate_mmlu, run_prompt_limit

            m = evaluate_mmlu(mm.model, self.tokenizer, subjects=ec.mmlu, max_per_subject=ec.mmlu_max_per_subject,
                              batch_size=ec.batch_size, max_length=run_prompt_limit(mm.model.config,
                                                                                    self.cfg.data.max_length),
                              device=mm.device)
            general_res.update(mmlu=100.0 * m["macro_accuracy"], mmlu_micro=100.0 * m["micro_accuracy"],
                               mmlu_questions=m["n"], mmlu_fewer_shots=m["truncated"], mmlu_questions_cut=m["questions_cut"])
        if general and self.heldout is not None:
            if ec.task == "choice":
                held = self._choices([self.heldout], prog, f"{label} held-out")
                general_res["heldout_loss"] = self._loss_after_choices([self.heldout], held.get("option_logprobs"))["loss"]
                general_res["heldout_accuracy"] = held.get("accuracy")
                general_res["heldout_scores"] = held.get("scores")
            else:
                general_res["heldout_loss"] = self._loss(self.heldout.test)["loss"]
        general_res.update(self._val(sets))
        if with_answers and ec.task == "choice":
            ch = self._choices(sets, prog, label)
            out = self._loss_after_choices(sets, ch.pop("option_logprobs", None))
            return {"loss": out["loss"], "perplexity": out["perplexity"], "tokens": out["tokens"], **general_res, **ch}
        out = self._loss([t for s in sets for t in s.test])
        res = {"loss": out["loss"], "perplexity": out["perplexity"], "tokens": out["tokens"], **general_res}
        if not with_answers:
            return res
        prompts = [p for s in sets for p in s.test_prompts]
        if ec.rouge and prompts:
            refs = [r for s in sets for r in s.test_references]
            task = prog.task(f"  {label} generate", len(prompts))
            gen = greedy_generate(mm.model, prompts, self.pad_id, self.eos_id, ec.max_new_tokens, ec.batch_size,
                                  mm.device, progress=lambda n: prog.update(task, advance=n),
                                  no_repeat_ngram_size=ec.no_repeat_ngram_size)
            prog.remove(task)
            preds = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            res["scores"] = rouge_l_per_example(preds, refs, ec.rouge_tokenizer)
            res["rouge_l"] = float(np.mean(res["scores"]))
            res["categories"] = [c for s in sets for c in s.test_categories]
            res["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]]
        return res


def _number(v, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return is_number(v) and lo <= v <= hi  # (an integer of hundreds of digits is no number: is_number)


def invalid_evaluation(r, n_generated: int | None, max_tokens: int | None = None,
                       max_val_tokens: int | None = None) -> str | None:
    """Why a client's evaluation result cannot enter the run's numbers, or None. A client's word is all
    the server has of its test set, so what it says must at least be possible: a test loss that is a
    cross-entropy (finite, ≥ 0; a -5 would pull the pooled loss down), a token count that is a
    non-negative integer (no loss without tokens), per-example scores in [0, 100], no more than the
    ``n_generated`` answered examples it declared at setup, no more test tokens than ``max_tokens`` (the test
    examples it declared, each at most ``data.max_length`` tokens), an answer metric only with the per-example
    scores it is recomputed from, a non-negative ``eval_s``, one category per score, the general-text,
    MMLU and held-out numbers finite and in range, a validation loss held to the same rules as the test loss (its
    tokens within ``max_val_tokens``, from the validation examples it declared). The perplexity and the answer
    metric are not taken from the reply: :func:`recomputed` derives them from the loss and the scores."""
    if not isinstance(r, dict):
        return f"an evaluation result that is a {type(r).__name__}, not a mapping"
    why = _invalid_loss(r.get("loss"), r.get("tokens"), max_tokens, "test")
    if why:
        return why
    if any(k in r for k in VAL_KEYS):
        why = _invalid_loss(r.get("val_loss"), r.get("val_tokens"), max_val_tokens, "validation")
        if why:
            return why
    if "eval_s" in r and not _number(r["eval_s"], 0.0):
        return f"eval_s = {str(r['eval_s'])[:40]!r}, not a duration in seconds"
    scores = r.get("scores")
    claimed = [k for k in ("rouge_l", "accuracy") if r.get(k) is not None]
    if claimed and not scores:  # the answer metric is the mean of the scores, recomputed here: none, no metric
        return f"a {claimed[0]} without the per-example scores it is the mean of"
    if scores is not None:
        if not isinstance(scores, list) or not all(_number(s, 0.0, 100.0) for s in scores):
            return "per-example scores that are not numbers in [0, 100]"
        if n_generated is not None and len(scores) > n_generated:
            return f"{len(scores)} scored test examples, more than the {n_generated} it declared at setup"
        cats = r.get("categories", [""] * len(scores))  # a client that keeps them to itself sends none
        if not isinstance(cats, list) or len(cats) != len(scores) or not all(isinstance(c, str) for c in cats):
            return "categories that do not name one category per scored example"
    conf = r.get("confusion")
    if conf is not None:
        labels = r.get("labels")
        n = len(labels) if isinstance(labels, list) else -1
        if (not isinstance(conf, list) or len(conf) != n or any(not isinstance(row, list) or len(row) != n for row in conf)
                or not all(_count(v) for row in conf for v in row)
                or sum(map(sum, conf)) != len(scores or [])):
            return "a confusion matrix that is not labels × labels non-negative counts of its scored examples"
    for key in ("mmlu", "mmlu_micro", "heldout_accuracy"):
        if r.get(key) is not None and not _number(r[key], 0.0, 100.0):
            return f"{key} = {r[key]!r}, not a number in [0, 100]"
    why = _invalid_mmlu_counts(r)
    if why:
        return why
    for key in ("general_loss", "heldout_loss"):
        if r.get(key) is not None and not _number(r[key], 0.0):
            return f"{key} = {r[key]!r}, not a finite number ≥ 0"
    held = r.get("heldout_scores")
    if held is not None and (not isinstance(held, list) or not all(_number(s, 0.0, 100.0) for s in held)):
        return "held-out scores that are not numbers in [0, 100]"
    return None


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _invalid_mmlu_counts(r: dict) -> str | None:
    """Why a reply's MMLU prompt counts are impossible, or None: all three or none, with an accuracy; non-negative
    integers; the questions cut among the prompts with fewer shots, and those among the questions asked."""
    counts = [r.get(k) for k in ("mmlu_questions", "mmlu_fewer_shots", "mmlu_questions_cut")]
    if r.get("mmlu_micro") is not None and r.get("mmlu") is None:
        return "an MMLU accuracy over questions without the mean over subjects beside it"
    if all(v is None for v in counts):
        return None
    n, fewer, cut = counts
    if not all(_count(v) for v in counts) or r.get("mmlu") is None or not n or not cut <= fewer <= n:
        return (f"MMLU prompt counts (questions {n!r}, fewer shots {fewer!r}, questions cut {cut!r}) that are not "
                "0 ≤ cut ≤ fewer shots ≤ questions > 0 beside an accuracy")
    return None


def _invalid_loss(loss, tokens, max_tokens: int | None, what: str) -> str | None:
    """Why a reported (loss, tokens) on a client's ``what`` examples is impossible, or None."""
    if not _count(tokens):
        return f"{what} tokens = {tokens!r}, not a non-negative integer"
    if max_tokens is not None and tokens > max_tokens:
        return (f"{tokens} {what} tokens, more than the {max_tokens} its declared {what} examples hold at "
                "data.max_length tokens each")
    if loss is None:
        if tokens:
            return f"no {what} loss over {tokens} {what} tokens"
    elif not is_number(loss):
        return f"a non-finite {what} loss ({loss!r})"
    elif loss < 0 or not tokens:
        return f"a {what} loss of {loss!r} over {tokens} tokens (a cross-entropy is ≥ 0 and needs tokens)"
    return None


def recomputed(r: dict) -> dict:
    """A client's evaluation result with what follows from its loss and scores derived here, not taken
    from the reply: the perplexities and the answer metric (the mean of the scores)."""
    out = dict(r)
    for key, ppl in (("loss", "perplexity"), ("general_loss", "general_perplexity")):
        if key in out:
            out[ppl] = None if out[key] is None else (math.exp(out[key]) if out[key] < 700 else float("inf"))
    if out.get("scores"):
        metric = "accuracy" if "accuracy" in out else "rouge_l"
        out[metric] = float(np.mean(out["scores"]))
    return out


def screened(results: dict[int, dict], declared: dict[int, dict | None],
             max_length: int) -> tuple[dict[int, dict], dict[int, str]]:
    """(the usable evaluation results, {client: why its result was left out}), each checked against what its client
    declared of its test set at setup (``declared``: its data, n_test and n_generated unless its node keeps them) and
    ``data.max_length``. A result with a non-finite loss is left out while another client's is finite; when every
    client's is non-finite, they are kept (the model diverged: the loop's own check stops the run with that)."""
    def bounds(cid):
        data = declared.get(cid) or {}
        n_test = data.get("n_test")
        # no n_val beside its test set's size: it declared no validation set (the run measures none)
        n_val = data.get("n_val", 0 if isinstance(n_test, int) else None)
        return (data.get("n_generated"), n_test * max_length if isinstance(n_test, int) else None,
                n_val * max_length if isinstance(n_val, int) else None)

    why = {cid: invalid_evaluation(r, *bounds(cid)) for cid, r in results.items()}
    diverged = [cid for cid, w in why.items() if w is not None and w.startswith("a non-finite test loss")]
    if diverged and len(diverged) == len(results):
        return dict(results), {}
    bad = {cid: f"an invalid evaluation: {w}: it is left out of the round's numbers" for cid, w in why.items() if w}
    return {cid: recomputed(r) for cid, r in results.items() if cid not in bad}, bad


def pooled(results: list[dict]) -> dict:
    """One model's metrics from its evaluations on several test sets: token-weighted loss,
    example-weighted answer metric (ROUGE-L or accuracy: scores and categories concatenated in
    order; confusion matrices summed), the general-text numbers of the first set that has them. A set with no test
    tokens adds nothing; with none at all, loss and perplexity are None ("no test data"), never 0 and 1."""
    counted = [r for r in results if r["loss"] is not None and r["tokens"]]
    tok = sum(r["tokens"] for r in counted)
    loss = sum(r["loss"] * r["tokens"] for r in counted) / tok if tok else None
    g = {"loss": loss, "perplexity": None if loss is None else float(np.exp(loss)), "tokens": tok}
    if any("val_tokens" in r for r in results):  # the same token weighting over the validation examples
        val = [r for r in results if r.get("val_loss") is not None and r.get("val_tokens")]
        g["val_tokens"] = sum(r["val_tokens"] for r in val)
        g["val_loss"] = sum(r["val_loss"] * r["val_tokens"] for r in val) / g["val_tokens"] if g["val_tokens"] else None
    scores = [s for r in results for s in r.get("scores", [])]
    if scores:
        metric = "accuracy" if any("accuracy" in r for r in results) else "rouge_l"
        g[metric] = float(np.mean(scores))
        g["scores"] = scores
        cats = [c for r in results for c in r.get("categories", [])]
        if len(cats) == len(scores):  # else some client kept its categories (eval.share_examples)
            g["categories"] = cats
    mats = [r["confusion"] for r in results if r.get("confusion") is not None]
    if mats and len(mats) == len([r for r in results if r.get("scores")]):
        g["confusion"] = np.sum(np.asarray(mats, dtype=np.int64), axis=0).tolist()
        g["labels"] = next(r["labels"] for r in results if r.get("labels"))
    for key in GENERAL_PARTS:  # computed by one client (the first that evaluated them)
        with_key = [r for r in results if key in r]
        if with_key:
            g[key] = with_key[0][key]
    return g


def first_evaluating(clients: list[tuple[int, dict | None]]) -> int | None:
    """Of (client, what it said of its data at setup), in order, the first that sends its evaluation: it computes
    the numbers on shared data (general text, MMLU, the held-out set) once for all when they are the same for every
    client. A client whose node keeps its evaluation sent no test-set size (``WITHHELD_WITH_EVALUATION``)."""
    return next((cid for cid, data in clients if data is None or "n_test" in data), clients[0][0] if clients else None)


class EvalPolicy:
    """The server side of evaluation: when, on which model, and the books."""

    def __init__(self, cfg, log_metrics: Callable[[dict], None]):
        self.cfg, self.log_metrics = cfg, log_metrics
        self.clients_s = 0.0  # the clients' evaluation time of the latest evaluated round

    def flags(self, round_idx: int, final: bool) -> tuple[bool, bool]:
        """(the answers this round — ROUGE-L or accuracy —, general text, MMLU and held-out set this round)."""
        ec = self.cfg.eval
        answers = ec.task == "choice" or ec.rouge
        return answers and (final or round_idx == 0 or ec.every_round), final or round_idx == 0

    def evaluate_round(self, round_idx: int, final: bool, records: dict[int, ClientRecord], evaluate_clients: Callable,
                       evaluate_global: Callable, all_global: bool, personalized: bool) -> dict:
        """``evaluate_clients(with_answers, general_for, general)`` -> {client: its own model's results} (and, unless
        ``all_global``, the global model evaluated beside them, the general text and MMLU if ``general``);
        ``evaluate_global()`` -> the global model's results of that call. Returns the global
        metrics (with personalised clients, MMLU and the held-out numbers also as the mean over the
        clients' own models)."""
        with_answers, with_general = self.flags(round_idx, final)
        metric = answer_metric(self.cfg)
        cids = sorted(records)
        first = first_evaluating([(cid, records[cid].data) for cid in cids])
        general_for = {cid: with_general and (not all_global or cid == first) for cid in cids}
        per_client = evaluate_clients(with_answers, general_for, with_general)  # a client that failed is missing
        held = sorted(cid for cid, r in per_client.items() if r == WITHHELD_EVALUATION)  # its node kept it
        per_client = {cid: r for cid, r in per_client.items() if cid not in held}
        for cid in cids:
            if cid not in per_client:
                continue
            r, rec = per_client[cid], records[cid]
            if round_idx == 0:
                rec.zero_shot = {k: v for k, v in r.items() if k in ZERO_SHOT_KEYS}
                rec.zero_shot_scores = r.get("scores")
            else:
                rec.last_eval = {k: v for k, v in r.items() if k not in ("scores", "categories")}
                rec.last_scores = r.get("scores")
            self.log_metrics({"round": round_idx, "client": cid, "kind": "test", "loss": r["loss"],
                              "perplexity": r["perplexity"],  # tokens: the pooled loss weighs each client's by them
                              **{k: r[k] for k in ("tokens", *VAL_KEYS, metric, *GENERAL_KEYS, "eval_s") if k in r}})
        self.clients_s = sum(r.get("eval_s", 0.0) for r in per_client.values())
        if all_global:
            g = pooled([per_client[c] for c in cids if c in per_client])
            missing = [c for c in cids if c not in per_client and c not in held]  # failed: named, as the global evaluation names them
            g.update({k: v for k, v in (("clients_missing", missing), ("clients_withheld", held)) if v})
        else:
            g = evaluate_global()
            self.clients_s += g.get("eval_s", 0.0)
        if personalized:
            for key in ("mmlu", "mmlu_micro", "heldout_accuracy", "heldout_loss"):
                vals = [r[key] for r in per_client.values() if r.get(key) is not None]
                if vals:
                    g[f"{key}_clients_mean"] = float(np.mean(vals))
        if "scores" in g and "categories" in g:
            by_cat: dict[str, list[float]] = {}
            for cat, score in zip(g["categories"], g["scores"]):
                by_cat.setdefault(cat, []).append(score)
            g[f"{metric}_by_category"] = {cat: float(np.mean(v)) for cat, v in sorted(by_cat.items())}
            g["examples_by_category"] = {cat: len(v) for cat, v in sorted(by_cat.items())}
        if "scores" in g:  # the examples its answer metric is the mean over (summary.json's global.n_scored)
            g["n_scored"] = len(g["scores"])
        g = {k: v for k, v in g.items() if k not in ("scores", "examples", "categories", "eval_s")}
        self.log_metrics({"round": round_idx, "client": None, "kind": "test", "loss": g["loss"],
                          "perplexity": g["perplexity"],
                          **{k: g[k] for k in ("tokens", *VAL_KEYS, metric, f"{metric}_by_category", "examples_by_category",
                                               *GENERAL_KEYS,
                                               "mmlu_clients_mean", "mmlu_micro_clients_mean", "heldout_accuracy_clients_mean",
                                               "heldout_loss_clients_mean", "clients_missing", "clients_withheld") if k in g}})
        return g
