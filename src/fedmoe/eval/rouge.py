"""ROUGE-L F-measure (``rouge_score``, Porter stemming) on the 0-100 scale the papers report.

``rouge_score``'s tokenizer (``tokenizer="latin"``, the papers' ROUGE-L) keeps only the words made of a–z and
0–9: a reference in Chinese, Russian or Greek has no token and scores 0 against any answer, the right one
included. ``tokenizer="unicode"`` (``eval.rouge_tokenizer``) keeps the words of every script, each Han, kana or
Hangul character a token of its own (those scripts write no spaces between words), lowercased, and stems the a–z
words as ``rouge_score`` does: on text in a–z and 0–9 alone both give the same score."""

from __future__ import annotations

import re
from functools import lru_cache

# the scripts written without spaces between words: each character is one token (Han, kana, Hangul)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNICODE_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_LATIN_WORD = re.compile(r"[a-z0-9]")
_ANY_WORD = re.compile(r"[^\W_]")


class UnicodeTokenizer:
    """Words of every script for ``rouge_score``: lowercase; runs of letters and digits (``_`` and punctuation
    split them); a Han, kana or Hangul character alone; Porter stemming of a–z words longer than 3 letters, as
    ``rouge_score``'s own tokenizer stems."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        out = []
        for tok in _UNICODE_TOKEN.findall(text.lower()):
            out.append(self._stemmer.stem(tok) if len(tok) > 3 and tok.isascii() else tok)
        return out


@lru_cache(maxsize=2)
def _scorer(tokenizer: str = "latin"):
    # Imported lazily: rouge_score pulls in nltk, which costs ~0.7 s at import time.
    from rouge_score import rouge_scorer

    if tokenizer == "unicode":
        return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def unscorable(references: list[str]) -> int:
    """How many references have words, but none that ``rouge_score``'s a–z / 0–9 tokenizer keeps."""
    return sum(bool(_ANY_WORD.search(r)) and not _LATIN_WORD.search(r.lower()) for r in references)


def rouge_l_per_example(predictions: list[str], references: list[str], tokenizer: str = "latin") -> list[float]:
    """ROUGE-L F-measure (0-100) of each prediction against its reference. With the ``latin`` tokenizer, references
    of which more than half have words but none in a–z / 0–9 (text in another script) are an error naming
    ``eval.rouge_tokenizer``: every one of them would score 0, a right answer too."""
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge_l: got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference per prediction"
        )
    if tokenizer not in ("latin", "unicode"):
        raise ValueError(f"rouge_l: tokenizer {tokenizer!r}: use latin or unicode")
    if tokenizer == "latin" and references and 2 * (bad := unscorable(references)) > len(references):
        raise ValueError(f"ROUGE-L: {bad} of {len(references)} references have no word in a-z or 0-9 (text in another "
                         "script), which rouge_score's tokenizer drops: each would score 0, a right answer too; set "
                         "eval.rouge_tokenizer: unicode (words of every script, a Han, kana or Hangul character each)")
    if tokenizer == "latin" and references and bad:  # fewer than half: scored, but said (each scores 0)
        import warnings

        warnings.warn(f"ROUGE-L: {bad} of {len(references)} references have no word in a-z or 0-9 (text in another "
                      "script) and score 0 whatever the answer; eval.rouge_tokenizer: unicode scores them",
                      UserWarning, stacklevel=2)
    scorer = _scorer(tokenizer)
    # rouge_score's signature is score(target, prediction).
    return [100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str], tokenizer: str = "latin") -> float:
    """Mean ROUGE-L F-measure over examples, 0-100. Raises ValueError on an empty list."""
    if len(predictions) == 0 and len(references) == 0:
        raise ValueError("rouge_l: no predictions to score (empty list)")
    scores = rouge_l_per_example(predictions, references, tokenizer)
    return sum(scores) / len(scores)
