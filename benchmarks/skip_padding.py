"""Padding through the experts, side by side in one run: training steps (forward + backward) and
evaluation forwards of a shipped config's first client, with ``model.skip_padding`` on and off,
alternated batch by batch (A B A B ...) so that the machine's drift hits both alike.

Reports the share of padded token slots in the batches, the time of each variant, the ratio, and how
far apart the two variants' losses and gradients are (real tokens' outputs are the same; the
backward's reductions run over fewer rows, so gradients may differ in the last bits).

    python benchmarks/skip_padding.py configs/default.yaml --steps 20
    python benchmarks/skip_padding.py configs/evidence-label-skew.yaml --set algorithm.name=flex --set lora.experts=false
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedmoe.algorithms.registry import get_method  # noqa: E402
from fedmoe.config import load_config  # noqa: E402
from fedmoe.data import prepare_federated_data  # noqa: E402
from fedmoe.data.tokenize import collate_sft  # noqa: E402
from fedmoe.federation.clients import client_sets  # noqa: E402
from fedmoe.federation.local import load_client_model  # noqa: E402
from fedmoe.moe import load_tokenizer  # noqa: E402
from fedmoe.moe.loss import labelled_token_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--steps", type=int, default=20, help="batches per variant")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    method = get_method(cfg.algorithm.name)
    data = prepare_federated_data(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    sets = client_sets(data, tok, cfg.data.max_length, cfg.eval.max_examples)
    mm = load_client_model(cfg, method, tok)
    with torch.no_grad():  # adapters away from their zero init, so every gradient is non-trivial
        gen = torch.Generator().manual_seed(0)
        for p in mm.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    train = [ex for s in sets for ex in s.train]
    bs = cfg.train.batch_size
    batches = [collate_sft(train[i * bs:(i + 1) * bs], sets[0].pad_id) for i in range(args.steps)]
    slots = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    params = mm.trainable_parameters()
    times = {True: 0.0, False: 0.0}
    eval_times = {True: 0.0, False: 0.0}
    loss_diff = grad_diff = eval_diff = 0.0
    mm.model.train()
    for b in batches:
        got = {}
        for skip in (True, False):
            mm.tracker.skip_padding = skip
            for p in params.values():
                p.grad = None
            t = time.perf_counter()
            loss, n, _ = labelled_token_loss(mm.model, b["input_ids"], b["attention_mask"], b["labels"])
            (loss / max(n, 1)).backward()
            times[skip] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                ev, _, _ = labelled_token_loss(mm.model, b["input_ids"], b["attention_mask"], b["labels"])
            eval_times[skip] += time.perf_counter() - t
            got[skip] = (float(loss.detach()), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}, float(ev))
        loss_diff = max(loss_diff, abs(got[True][0] - got[False][0]))
        eval_diff = max(eval_diff, abs(got[True][2] - got[False][2]))
        for k, g in got[True][1].items():
            ref = got[False][1][k]
            grad_diff = max(grad_diff, float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    print(f"## model.skip_padding, {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{args.steps} batches of {bs}: `python benchmarks/skip_padding.py {args.config} "
          f"{' '.join('--set ' + o for o in args.overrides)} --steps {args.steps}`".replace("  ", " "))
    print()
    print(f"padded token slots: {100 * (1 - real / slots):.1f}% ({slots - real} of {slots})")
    print()
    print("| | skip on (s) | skip off (s) | on / off |")
    print("|---|---:|---:|---:|")
    print(f"| train step (forward + backward) | {times[True]:.2f} | {times[False]:.2f} | {times[True] / times[False]:.3f} |")
    print(f"| evaluation forward | {eval_times[True]:.2f} | {eval_times[False]:.2f} | "
          f"{eval_times[True] / eval_times[False]:.3f} |")
    print()
    print(f"largest difference on vs off: training loss {loss_diff:.2e}, evaluation loss {eval_diff:.2e}, "
          f"gradient (relative to the tensor's largest entry) {grad_diff:.2e}")


if __name__ == "__main__":
    main()
