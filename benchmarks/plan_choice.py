#!/usr/bin/env python
"""The memory plan's option scoring (``eval.task: choice``) against the evaluator's own pass on real tensors, and its
size beside the test loss's pass on published model shapes (benchmarks/RESULTS.md, "A choice task's option scoring
in the memory plan").

    python benchmarks/plan_choice.py            # tiny OLMoE: plan / real at three shapes; then three model shapes
    python benchmarks/plan_choice.py --tiny     # the first table only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from gpu_common import Device  # noqa: E402
from gpu_plan import measure_choice  # noqa: E402

from fedmoe.config import load_config  # noqa: E402
from fedmoe.plan import choice_shape, memory_plan  # noqa: E402

CHOICE = ["eval.task=choice", "data.field_map={label: category}"]
MODELS = ["allenai--OLMoE-1B-7B-0924", "mistralai--Mixtral-8x7B-v0.1", "Qwen--Qwen3-30B-A3B"]


def tiny(L: int, B: int) -> float:
    """plan / real of the option scoring, tiny OLMoE, prompts of L minus the longest option, batch B (the real pass:
    gpu_check step f's measurement, on the CPU every tensor counted)."""
    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", f"data.max_length={L}", f"eval.batch_size={B}", *CHOICE])
    (plan,) = memory_plan(cfg)
    return plan.passes["choice"] / measure_choice(cfg, Device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="only the tiny model's plan / real")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| L, eval batch | plan / real |\n|---|---:|")
    for L, B in [(48, 8), (64, 16), (96, 4)]:
        print(f"| {L}, {B} | {tiny(L, B):.5f} |", flush=True)
    if args.tiny:
        return
    print("\n| model | options, longest, least longest | test loss GiB | choice GiB | training step GiB |\n|---|---|---:|---:|---:|")
    for name in MODELS:
        cfg = load_config(None, [f"model.name={ROOT}/benchmarks/model-configs/{name}.json",
                                 "model.tokenizer=builtin:tiny-moe", "model.dtype=bfloat16", "model.device=cuda",
                                 "data.max_length=512", "eval.batch_size=8", "train.batch_size=4", "lora.rank=8", *CHOICE])
        p = memory_plan(cfg)[0]
        gib = {k: v / 2**30 for k, v in p.passes.items()}
        print(f"| {name} | {tuple(choice_shape(cfg)[:3])} | {gib['test loss']:.2f} | {gib['choice']:.2f} | "
              f"{p.training / 2**30:.1f} |", flush=True)


if __name__ == "__main__":
    main()
