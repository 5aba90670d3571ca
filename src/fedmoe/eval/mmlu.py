"""MMLU (Hendrycks et al., ICLR 2021): bundled data, the standard k-shot prompt, letter scoring.

Data: the 57-subject dev/val/test CSVs ship inside the package, one ``<split>.tar.xz`` per split
under ``fedmoe/assets/data/mmlu`` (byte-identical files; see SOURCE.md there).

Prompt: the format of EleutherAI lm-evaluation-harness' ``mmlu`` task (the default, "original"
MMLU format; ``lm_eval/tasks/mmlu/default``), which is the Hendrycks et al. ``evaluate.py`` /
``evaluate_hf.py`` format (hendrycks/test) with two small clean-ups, both followed here:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n     <- each of the k dev shots
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:                  <- the test question

* ``{subject}`` is the subject with underscores replaced by spaces ("abstract algebra"); the
  Hendrycks code builds it as " " + each word, which leaves a double space after "about".
* the question text is ``.strip()``-ed (963 test questions carry a leading space or a trailing
  newline); the choices are kept verbatim. Hendrycks' code does not strip.
* the k shots are the first k rows of the subject's dev file, in file order.

Scoring: the prediction is the letter whose token has the highest next-token log-likelihood at
the last prompt position (log-softmax over the whole vocabulary). In the shots the answer follows
"Answer:" as " B", so for byte-level BPE the continuation after "Answer:" is the token of " B"
(leading space), exactly what Hendrycks' GPT-3 ``evaluate.py`` reads (``top_logprobs[-1][" B"]``)
and what the harness scores (target delimiter " " + "B"). The letter's token is therefore the
single token of " X" when the tokenizer has one, else the last token of the encoding of " X"
(e.g. SentencePiece tokenizers that split off a bare "▁"). ``evaluate_hf.py`` instead takes the
last token of "A" (no space), which for GPT-2-style BPE is a token the model never sees after
"Answer:" in the shots.
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterable, Sequence

import torch

from fedmoe.eval.choice import option_logprobs, right_pad, unwrap  # noqa: F401  (right_pad: re-exported)

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
DEFAULT_MAX_LENGTH = 2048


def run_prompt_limit(model_config, max_length: int) -> int:
    """The longest MMLU prompt a run's evaluation gives its model: 4 × ``data.max_length`` (five shots and a question
    are longer than a training sequence), never past the model's ``max_position_embeddings`` (positions beyond it are
    out of the model's range: transformers warns of indexing errors, and the answer is not the model's)."""
    limit = 4 * int(max_length)
    positions = getattr(model_config, "max_position_embeddings", None)
    return min(limit, int(positions)) if positions else limit

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)

# Named subject selections (``--subset``). "quick": 10 short subjects (1,113 test questions),
# spread over STEM, humanities, social sciences and other.
MMLU_SUBSETS: dict[str, tuple[str, ...]] = {
    "all": MMLU_SUBJECTS,
    "quick": (
        "abstract_algebra", "college_physics", "high_school_computer_science",  # STEM
        "formal_logic", "world_religions",  # humanities
        "econometrics", "us_foreign_policy",  # social sciences
        "business_ethics", "global_facts", "medical_genetics",  # other
    ),
}


@dataclass(frozen=True)
class Question:
    question: str
    choices: list[str]  # the four options A..D, verbatim
    answer: int  # 0..3
    subject: str

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


# ---------------------------------------------------------------------------------------- data
def _archive(split: str):
    return resources.files("fedmoe") / "assets" / "data" / "mmlu" / f"{split}.tar.xz"


@lru_cache(maxsize=None)
def _load_split(split: str) -> dict[str, tuple[Question, ...]]:
    out: dict[str, tuple[Question, ...]] = {}
    suffix = f"_{split}.csv"
    with _archive(split).open("rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            if not name.endswith(suffix):
                continue
            subject = name[: -len(suffix)]
            text = io.TextIOWrapper(tar.extractfile(member), encoding="utf-8", newline="")
            rows = []
            for i, row in enumerate(csv.reader(text), start=1):
                if len(row) != 6 or row[5] not in LETTERS:
                    raise ValueError(f"MMLU {split}/{name} row {i}: expected question,A,B,C,D,answer-letter, "
                                     f"got {len(row)} columns")
                rows.append(Question(row[0], list(row[1:5]), LETTERS.index(row[5]), subject))
            out[subject] = tuple(rows)
    if sorted(out) != sorted(MMLU_SUBJECTS):
        raise ValueError(f"MMLU {split}: the bundled archive holds {len(out)} subjects, expected the 57")
    return {s: out[s] for s in MMLU_SUBJECTS}


def resolve_subjects(subjects: str | Iterable[str] | None = None) -> list[str]:
    """None -> all 57; a preset name from MMLU_SUBSETS ("quick", "all"); or subject names
    (each may also be a preset). Order kept, duplicates dropped."""
    if subjects is None:
        return list(MMLU_SUBJECTS)
    words = [subjects] if isinstance(subjects, str) else list(subjects)
    out: list[str] = []
    unknown = []
    for w in words:
        names = MMLU_SUBSETS.get(w, (w,))
        for n in names:
            if n not in MMLU_SUBJECTS:
                unknown.append(n)
            elif n not in out:
                out.append(n)
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {unknown}; presets: {sorted(MMLU_SUBSETS)}; "
                         f"subjects: {', '.join(MMLU_SUBJECTS)}")
    if not out:
        raise ValueError("no MMLU subject selected")
    return out


def load_mmlu(split: str = "test", subjects: str | Iterable[str] | None = None) -> dict[str, list[Question]]:
    """``{subject: [Question, ...]}`` in file order, for ``split`` in dev/val/test.

    ``subjects``: None (all 57), a preset name ("quick") or a list of subject names.
    """
    if split not in SPLITS:
        raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
    data = _load_split(split)
    return {s: list(data[s]) for s in resolve_subjects(subjects)}


# -------------------------------------------------------------------------------------- prompt
def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def prompt_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_example(q: Question, include_answer: bool = True) -> str:
    """``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` plus `` {letter}\\n\\n`` for a shot."""
    text = q.question.strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    if include_answer:
        text += f" {LETTERS[q.answer]}\n\n"
    return text


def build_prompt(subject: str, dev_examples: Sequence[Question], question: Question, k: int = 5) -> str:
    """Header, the first ``k`` of ``dev_examples`` with answers, then ``question`` ending in "Answer:"."""
    if k < 0 or k > len(dev_examples):
        raise ValueError(f"k={k} shots requested but {len(dev_examples)} dev examples given")
    return prompt_header(subject) + "".join(format_example(d) for d in dev_examples[:k]) + format_example(
        question, include_answer=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's own leading special tokens (a BOS where it adds
    one, as Hendrycks' ``evaluate_hf.py`` does), but never a trailing EOS (the prompt goes on)."""
    ids = list(tokenizer(text)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) > 1 and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def fit_prompt(tokenizer, subject: str, dev_examples: Sequence[Question], question: Question, k: int = 5,
               max_length: int | None = None) -> tuple[list[int], int]:
    """The tokenized k-shot prompt, shortened to ``max_length`` tokens: returns (ids, shots kept).

    Too long -> fewer shots, the first ones kept (the last shot goes first), the header and the test question
    whole: Hendrycks et al.'s evaluation (``evaluate.py``: k -= 1 with the first k dev examples until the prompt
    fits). If even the 0-shot prompt is too long, its tokens are cut from the left (the prompt's end, "Answer:",
    always stays).
    """
    ids = encode(tokenizer, build_prompt(subject, dev_examples, question, k))
    if max_length is None or len(ids) <= max_length:
        return ids, k
    for kept in range(k - 1, -1, -1):
        ids = encode(tokenizer, build_prompt(subject, dev_examples[:kept], question, kept))
        if len(ids) <= max_length:
            return ids, kept
    return ids[-max_length:], 0


def letter_token_ids(tokenizer) -> list[int]:
    """The token of " A", " B", " C", " D" (the last token where " X" is several)."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer.encode(" " + letter, add_special_tokens=False)
        if not toks:
            raise ValueError(f"the tokenizer encodes ' {letter}' to no tokens")
        ids.append(int(toks[-1]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer maps the answer letters to non-distinct tokens {ids}")
    return ids


# ------------------------------------------------------------------------------------- scoring
def _pad_id(model, tokenizer) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def score_letters(model, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int], batch_size: int = 8,
                  device: torch.device | str | None = None, pad_id: int = 0,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, 4) float32 next-token log-probabilities of the letter tokens after each prompt: the
    option scorer of :mod:`fedmoe.eval.choice` with the four one-token options " A" .. " D" (prompts
    batched longest first, right-padded, the LM head read at each row's last real token; results in
    input order). ``progress(n)`` is called after each batch.
    """
    options = [[[int(t)] for t in letter_ids]] * len(prompts)
    scores = option_logprobs(model, prompts, options, batch_size=batch_size, device=device, pad_id=pad_id,
                             progress=progress)
    if not scores:
        return torch.empty((0, len(letter_ids)), dtype=torch.float32)
    return torch.stack(scores).float()


# ---------------------------------------------------------------------------------- evaluation
def aggregate_accuracy(per_subject: dict[str, tuple[int, int]]) -> dict:
    """From ``{subject: (correct, total)}``: macro (mean of per-subject accuracies), micro
    (pooled over questions), ``per_subject`` ``{subject: (correct, total, accuracy)}`` and n."""
    rows = {s: (int(c), int(t), c / t) for s, (c, t) in per_subject.items() if t > 0}
    n = sum(t for _, t, _ in rows.values())
    if not rows:
        return {"macro_accuracy": None, "micro_accuracy": None, "per_subject": {}, "n": 0}
    return {
        "macro_accuracy": sum(a for _, _, a in rows.values()) / len(rows),
        "micro_accuracy": sum(c for c, _, _ in rows.values()) / n,
        "per_subject": rows,
        "n": n,
    }


def evaluate_mmlu(model, tokenizer, subjects: str | Iterable[str] | None = None,
                  max_per_subject: int | None = None, k_shot: int = 5, batch_size: int = 8,
                  max_length: int | None = None, device: torch.device | str | None = None,
                  split: str = "test", progress: Callable[[int], None] | None = None,
                  return_predictions: bool = False) -> dict:
    """k-shot MMLU accuracy of a causal LM (an ``nn.Module`` or a ``MoEModel``).

    ``subjects``: None (all 57), a preset ("quick") or names; ``max_per_subject``: the first N
    questions of each subject (file order). ``max_length``: token limit of a prompt (default: the
    model's ``max_position_embeddings``, else 2048); longer prompts lose their last shots (Hendrycks' rule).
    Returns ``macro_accuracy`` (mean over subjects), ``micro_accuracy`` (over questions),
    ``per_subject`` ``{subject: (correct, total, accuracy)}``, ``n``, plus ``k_shot``,
    ``max_length``, ``truncated`` (prompts that lost shots) and ``questions_cut`` (prompts whose question itself
    was cut from the left, every shot gone); with ``return_predictions`` also ``predictions``
    ``{subject: [predicted index, ...]}``. Letter scores that are not finite (a model whose weights or dtype
    overflowed) are an error: argmax would read them as answer A.
    """
    model = unwrap(model)
    if max_per_subject is not None and max_per_subject < 1:
        raise ValueError(f"max_per_subject must be >= 1, got {max_per_subject}")
    if not 0 <= k_shot <= 5:
        raise ValueError(f"k_shot must be in 0..5 (the dev set has 5 examples per subject), got {k_shot}")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    names = resolve_subjects(subjects)
    tests = load_mmlu(split, names)
    dev = load_mmlu("dev", names)
    letter_ids = letter_token_ids(tokenizer)

    prompts: list[list[int]] = []
    owners: list[tuple[str, int]] = []
    truncated = cut = 0
    for s in names:
        for q in tests[s][:max_per_subject]:
            ids, kept = fit_prompt(tokenizer, s, dev[s], q, k_shot, max_length)
            truncated += kept < k_shot
            cut += kept == 0 and len(ids) == max_length and len(encode(tokenizer, build_prompt(s, [], q, 0))) > max_length
            prompts.append(ids)
            owners.append((s, q.answer))
    scores = score_letters(model, prompts, letter_ids, batch_size=batch_size, device=device,
                           pad_id=_pad_id(model, tokenizer), progress=progress)
    bad = int((~torch.isfinite(scores).all(dim=-1)).sum())
    if bad:
        raise ValueError(f"the model's answer-letter scores are not finite (NaN or inf) for {bad} of {len(prompts)} "
                         "MMLU questions: its weights hold non-finite values, or its dtype overflowed (try --dtype "
                         "float32); no accuracy is computed from them")
    preds = scores.argmax(dim=-1).tolist()

    counts = {s: [0, 0] for s in names}
    predictions: dict[str, list[int]] = {s: [] for s in names}
    for (s, answer), pred in zip(owners, preds):
        counts[s][0] += int(pred == answer)
        counts[s][1] += 1
        predictions[s].append(pred)
    result = aggregate_accuracy({s: (c, t) for s, (c, t) in counts.items()})
    result.update(k_shot=k_shot, max_length=max_length, truncated=truncated, questions_cut=cut)
    if return_predictions:
        result["predictions"] = predictions
    return result


def format_mmlu_table(result: dict) -> str:
    """Plain-text per-subject table with the macro and micro averages."""
    width = max([len("subject")] + [len(s) for s in result["per_subject"]])
    lines = [f"{'subject':<{width}}  {'correct':>7}  {'total':>5}  {'acc':>6}"]
    lines.append("-" * len(lines[0]))
    for s, (c, t, a) in result["per_subject"].items():
        lines.append(f"{s:<{width}}  {c:>7}  {t:>5}  {a:>6.4f}")
    lines.append("-" * len(lines[0]))
    n, k = result["n"], len(result["per_subject"])
    lines.append(f"macro accuracy ({k} subjects): {result['macro_accuracy']:.4f}")
    lines.append(f"micro accuracy ({n} questions): {result['micro_accuracy']:.4f}")
    return "\n".join(lines)
