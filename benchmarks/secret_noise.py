"""What local DP's secret noise costs, side by side in one run: ``dp.secret_normal`` (Box–Muller on os.urandom
bytes, the noise of ``federation.dp.client_noise: secret``) against torch's seeded generator (the noise of
``client_noise: seeded``, and what secret noise was drawn with before 2026-12-05), float64, alternated
repetition by repetition so the machine's drift hits both alike. Also privatize_reply on a reply of that many
values, the whole client-side cost of a release.

    python benchmarks/secret_noise.py --values 10000000 --reps 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from fedmoe.config import load_config
from fedmoe.federation.dp import gaussian_noise, privatize_reply, secret_normal
from fedmoe.messages import Message


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.values
    gen = torch.Generator().manual_seed(0)
    times = {"secret": [], "seeded": [], "release": []}
    theta = {"w": torch.zeros(n, dtype=torch.float32)}
    reply = Message({"w": torch.full((n,), 1e-3, dtype=torch.float32)}, {"n_train": 1})
    cfg = load_config(None, ["federation.dp.clip_norm=0.1", "federation.dp.noise_multiplier=1",
                             "federation.dp.where=client"])
    for _ in range(args.reps):
        t = time.perf_counter()
        secret_normal((n,))
        times["secret"].append(time.perf_counter() - t)
        t = time.perf_counter()
        gaussian_noise((n,), 1.0, gen)
        times["seeded"].append(time.perf_counter() - t)
        t = time.perf_counter()
        privatize_reply(cfg, reply, Message(dict(theta)), 0, 1)
        times["release"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · 1 thread · "
          f"{n:,} values · {args.reps} repetitions (median [min–max] s)")
    for k, label in (("secret", "secret_normal (os.urandom, Box–Muller)"), ("seeded", "torch seeded generator"),
                     ("release", "privatize_reply, secret noise (clip + noise + cast)")):
        print(f"  {label}: {med[k]:.3f} [{min(times[k]):.3f}–{max(times[k]):.3f}]")
    print(f"  secret / seeded: {med['secret'] / med['seeded']:.2f}×; per million values: "
          f"{1e6 * med['secret'] / n * 1e3:.1f} ms secret, {1e6 * med['seeded'] / n * 1e3:.1f} ms seeded")


if __name__ == "__main__":
    main()
