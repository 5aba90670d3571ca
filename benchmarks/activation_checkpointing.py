"""`train.activation_checkpointing` side by side with plain training, in one process: for one client
model (FedIT: expert LoRA + q/k/v/o LoRA), `fedmoe.train.train_local` runs with checkpointing off and
on in interleaved repetitions (the same model, data and seed, so the ratios share the machine's state),
and once each under the memory plan's live-tensor counter (every tensor alive, real tensors: the peak
of the step's activations and temporaries, the frozen weights excluded). Shapes: the default run's
(builtin:tiny-moe, its batch and `data.max_length`) and the OLMoE-1B-7B shape cut to `--layers` layers
(random weights, fp32, `--batch` x `--seq` tokens). Also checked: both settings give the same loss.

    python benchmarks/activation_checkpointing.py [--layers 2 --batch 2 --seq 512 --reps 3 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def examples(n: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (length - (i % 4) * (length // 8),), generator=g).tolist()  # some padding
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]})
    return out


def compare(cfg, reps: int, steps: int) -> dict:
    from fedmoe.algorithms import get_method
    from fedmoe.federation.local import load_client_model
    from fedmoe.plan import _LiveBytes
    from fedmoe.train import train_local

    mm = load_client_model(cfg, get_method(cfg.algorithm.name))
    data = examples(cfg.train.batch_size * steps, cfg.data.max_length, mm.config.vocab_size)
    start = {n: p.detach().clone() for n, p in mm.trainable_parameters().items()}
    settings = {"plain": False, "checkpointed": True}

    def once(setting, count=None):
        with torch.no_grad():  # every call from the same adapters
            for n, p in mm.trainable_parameters().items():
                p.copy_(start[n])
        tc = cfg.train.model_copy(update={"max_steps": steps, "activation_checkpointing": settings[setting]})
        t = time.perf_counter()
        if count is None:
            res = train_local(mm, data, tc, pad_id=0, lr=1e-4, seed=0)
        else:
            with count:
                res = train_local(mm, data, tc, pad_id=0, lr=1e-4, seed=0)
        return time.perf_counter() - t, res.loss

    out = {}
    for setting in settings:  # warm-up, and each setting's live-tensor peak
        live = _LiveBytes()
        live.exclude([*mm.model.parameters(), *mm.model.buffers()])
        _, loss = once(setting, live)
        out[setting] = {"loss": loss, "peak_live_bytes": int(live.peak), "times_s": []}
    for _ in range(reps):
        for setting in settings:
            out[setting]["times_s"].append(once(setting)[0])
    for setting in settings:
        out[setting]["median_s"] = statistics.median(out[setting]["times_s"])
    p, c = out["plain"], out["checkpointed"]
    out["time_ratio"] = c["median_s"] / p["median_s"]
    out["memory_ratio"] = c["peak_live_bytes"] / p["peak_live_bytes"]
    out["same_loss"] = c["loss"] == p["loss"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gpu_fed_olmoe import patch_loader, write_model_folder

    from fedmoe.config import load_config

    results = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
                          f"{args.threads} threads", "date": str(date.today()), "command": " ".join(sys.argv)}
    default = load_config("configs/default.yaml")
    results["default run (builtin:tiny-moe)"] = compare(default, args.reps, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder, source = write_model_folder(Path(tmp), dry=False, layers=args.layers)
        patch_loader(folder)
        cfg = load_config(None, [f"model.name={folder}", "model.tokenizer=builtin:tiny-moe", "lora.rank=8",
                                 "lora.alpha=16", f"train.batch_size={args.batch}", f"data.max_length={args.seq}"])
        results[f"OLMoE-1B-7B shape, {args.layers} layers (fp32)"] = compare(cfg, args.reps, args.steps)
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name}: checkpointed / plain step time {r['time_ratio']:.2f}, live-tensor peak "
                  f"{r['checkpointed']['peak_live_bytes'] / 2**20:.0f} / {r['plain']['peak_live_bytes'] / 2**20:.0f} MiB "
                  f"({r['memory_ratio']:.2f}), same loss {r['same_loss']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
