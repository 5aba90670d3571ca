"""General text: the instruction corpus the built-in model was pretrained on (shipped, not Dolly).

Its held-out split is fedmoe's "general text": knowledge retention is measured as perplexity on it
(``eval.general_blocks``) and FLEx's non-personalised ablation calibrates on it. The split is the
pretraining recipe's (``fedmoe.pretrain`` builds its train/held-out texts with :func:`corpus_split`).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .sources import DataError, load_examples
from .template import format_prompt

PRETRAIN_DIR = "assets/data/pretrain"
DEFAULT_CORPUS = (
    "alpaca_5000.json.gz", "alpaca_random_9k.json.gz", "alpaca_gpt4_en_demo_1k.json.gz",
    "claude_t45.json.gz", "helpfulness_t45.json.gz", "medical_meadow_wikidoc_patient_information.json.gz",
)
DEFAULT_SEED = 0  # the built-in model's recipe: seed and held-out fraction of its split
DEFAULT_HELDOUT_FRACTION = 0.02


def corpus_path(name: str) -> str:
    """A shipped corpus file by name, or the name itself (a path)."""
    shipped = Path(str(resources.files("fedmoe") / PRETRAIN_DIR / name))
    return str(shipped) if shipped.is_file() else name


def corpus_split(corpus, seed: int, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): each example formatted with the Alpaca template + response,
    exact duplicates removed, split by a seeded permutation."""
    seen, texts = set(), []
    for name in corpus:
        for ex in load_examples(corpus_path(name), on_bad_row="skip").examples:
            text = format_prompt(ex) + ex.output
            if text not in seen:
                seen.add(text)
                texts.append(text)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_held = max(1, int(round(heldout_fraction * len(texts))))
    held = [texts[i] for i in order[:n_held]]
    train = [texts[i] for i in order[n_held:]]
    return train, held


@lru_cache(maxsize=1)
def general_texts() -> tuple[str, ...]:
    """The held-out texts of the built-in model's pretraining corpus."""
    return tuple(corpus_split(DEFAULT_CORPUS, DEFAULT_SEED, DEFAULT_HELDOUT_FRACTION)[1])


def pack(tokenizer, texts, seq_len: int) -> torch.Tensor:
    """Concatenate texts (each followed by eos) and cut into (n_blocks, seq_len) blocks."""
    ids: list[int] = []
    # verbose=False: texts longer than model_max_length are fine here, they are cut into blocks
    for enc in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def general_blocks(tokenizer, seq_len: int, n: int) -> list[dict]:
    """The first ``n`` blocks of ``seq_len`` tokens of general text, loss on every token. The text holds a
    number of blocks that shrinks with ``seq_len``: asking for more is an error (``eval.general_blocks``), never a
    perplexity over fewer blocks than the config says."""
    blocks = pack(tokenizer, general_texts(), seq_len)
    if n > len(blocks):
        raise DataError(f"eval.general_blocks = {n}, but the general text holds {len(blocks)} blocks of "
                        f"data.max_length = {seq_len} tokens (with this tokenizer): set eval.general_blocks to "
                        f"{len(blocks)} or fewer")
    return [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks[:n]]


def general_examples(tokenizer, max_length: int, n: int) -> list[dict]:
    """The first ``n`` general texts, each tokenised and cut to ``max_length`` (loss on every token)."""
    out = []
    for text in general_texts()[:n]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        out.append({"input_ids": ids, "labels": ids})
    return out


__all__ = ["DEFAULT_CORPUS", "corpus_path", "corpus_split", "general_blocks", "general_examples", "general_texts", "pack"]
