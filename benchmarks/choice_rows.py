#!/usr/bin/env python
"""The option scoring of ``eval.task: choice`` (``fedmoe.eval.choice.option_logprobs``) on the built-in model: the
time of scoring Dolly's 8 category labels after 40 prompts of 20-150 tokens at eval batch 8, one torch thread, and
the log-likelihoods it gives (benchmarks/RESULTS.md, "The option rows a batch at a time").

    python benchmarks/choice_rows.py [--reps 5] [--save scores.pt]

It imports fedmoe as installed (or from PYTHONPATH), so two versions compare side by side:

    farm-bench -n 5 --vs "env PYTHONPATH=/old/src python benchmarks/choice_rows.py" -- python benchmarks/choice_rows.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fedmoe.data.tokenize import option_ids
from fedmoe.eval.choice import option_logprobs
from fedmoe.moe.model import MoEModel, load_tokenizer

LABELS = ["open_qa", "general_qa", "classification", "closed_qa", "brainstorming", "information_extraction",
          "summarization", "creative_writing"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="how many times the 40 examples are scored")
    ap.add_argument("--save", help="write the scores (40 x 8, float64) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("builtin:tiny-moe")
    mm = MoEModel.from_pretrained("builtin:tiny-moe")
    options = option_ids(tok, LABELS)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 5000, (int(n),), generator=g).tolist() for n in torch.randint(20, 150, (40,), generator=g)]
    t0 = time.perf_counter()
    for _ in range(args.reps):
        scores = option_logprobs(mm, prompts, [options] * len(prompts), 8, "cpu")
    print(f"{(time.perf_counter() - t0) / args.reps:.3f} s per scoring of {len(prompts)} examples x {len(options)} options")
    if args.save:
        torch.save(torch.stack(scores), args.save)


if __name__ == "__main__":
    main()
