"""Round overhead of the three runtimes, side by side in one run: the same small federation on
``local`` (in-process), ``flower-sim`` (Flower's simulation engine) and ``flower`` (a SuperLink and
one SuperNode per client on this machine), for a few client counts.

Per round the runtime logs its wall time, the clients' training + evaluation time (summed over
clients) and the aggregation time; overhead = wall − clients − aggregation. In-process the clients
run one after another, so the overhead is what the runtime adds. On Flower the clients run in
parallel (one simulation actor per core; one process per message on a SuperNode, here all on one
machine with one torch thread each), so the sum of their work can exceed the wall time; the
clients' model-and-data load per message is reported apart.

    python benchmarks/runtime_overhead.py --clients 4 40 [--runtimes local flower-sim flower]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

WORK = ["model.name=builtin:tiny-moe", "data.max_examples=800", "data.max_length=128", "train.max_steps=2",
        "train.batch_size=4", "eval.rouge=false", "eval.zero_shot=false", "data.max_test_per_client=5",
        "federation.rounds=2", "lora.rank=8"]


def one(runtime: str, n: int, root: Path) -> dict:
    sets = WORK + [f"data.partition.num_clients={n}", f"output_dir={root}", f"name={runtime}-{n}"]
    t0 = time.time()
    if runtime == "flower":
        from fedmoe.federation.flower.localdeploy import LocalDeployment

        # one torch thread per client process: n processes on this machine's cores at once would
        # otherwise each start one thread per core and slow down by orders of magnitude
        with LocalDeployment(root / f"deploy-{n}", clients=n, threads=1) as lab:
            # 8 messages out at once: each starts a process holding the model (about 0.5 GB here)
            proc = lab.run(sets + ["federation.node_wait_s=600", "federation.max_inflight=8"])
            out, _ = proc.communicate()
    else:
        cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--runtime", runtime, "--quiet",
               *[x for s in sets for x in ("--set", s)]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} with {n} clients failed:\n{out[-3000:]}")
    from fedmoe.rundir import RunDir

    rows = RunDir(root / f"{runtime}-{n}", create=False).read_metrics()
    rounds = [r for r in rows if r["kind"] == "round"]
    loads = [r["load_s"] for r in rows if r["kind"] == "train" and "load_s" in r]
    return {"runtime": runtime, "clients": n, "total_s": time.time() - t0, "rounds": rounds,
            "load_s": sum(loads) / len(loads) if loads else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 40])
    ap.add_argument("--runtimes", nargs="+", default=["local", "flower-sim", "flower"])
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for rt in args.runtimes:
                res = one(rt, n, Path(tmp))
                results.append(res)
                print(json.dumps({k: v for k, v in res.items() if k != "rounds"}), flush=True)
    print(f"\n{date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"`python benchmarks/runtime_overhead.py --clients {' '.join(map(str, args.clients))}`\n")
    print("| clients | runtime | run wall | round 2 wall | clients' work (sum) | aggregation | overhead "
          "| client load per message (mean) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        last = r["rounds"][-1]
        print(f"| {r['clients']} | {r['runtime']} | {r['total_s']:.1f} s | {last['wall_s']:.2f} s | "
              f"{last['clients_s']:.2f} s | {last['aggregate_s']:.3f} s | {last['overhead_s']:+.2f} s | "
              f"{r['load_s']:.2f} s |")


if __name__ == "__main__":
    main()
