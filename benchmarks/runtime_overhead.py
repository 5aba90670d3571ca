"""Round overhead of the runtimes, side by side in one run: the same small federation on ``local``
(in-process), ``flower-sim`` (Flower's simulation engine), ``flower`` (a SuperLink and one SuperNode
per client on this machine, each message a new process that loads the model) and ``flower+worker``
(the same, each SuperNode relaying to a ``fedmoe worker`` that keeps the model loaded), for a few
client counts.

Per round the runtime logs its wall time, the clients' training + evaluation time (summed over
clients) and the aggregation time; overhead = wall − clients − aggregation. In-process the clients
run one after another, so the overhead is what the runtime adds. On Flower the clients run in
parallel (one simulation actor per core; one process per message on a SuperNode, here all on one
machine with one torch thread each), so the sum of their work can exceed the wall time; the
clients' model-and-data load per message is reported apart.

    python benchmarks/runtime_overhead.py --clients 4 40 [--runtimes local flower-sim flower flower+worker]
        [--plain-flower-up-to 4]   # plain `flower` only up to this many clients (40 took 17 minutes)
        [--set KEY=VALUE ...]      # on top of the federation below (another method, more rounds)
        [--before SRC]             # each runtime also run with the fedmoe in SRC (another commit's src/),
                                   # before the current one, and the round wall of the two as a ratio
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


def one(runtime: str, n: int, root: Path, args, src: str | None = None) -> dict:
    """``src``: run the runtime's processes with the fedmoe of that directory (PYTHONPATH)."""
    before = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = src
    try:
        res = _one(runtime, n, root / ("before" if src else "now"), args)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return {**res, "code": "before" if src else "now"}


def _one(runtime: str, n: int, root: Path, args) -> dict:
    sets = WORK + args.set + [f"data.partition.num_clients={n}", f"output_dir={root}", f"name={runtime}-{n}"]
    t0 = time.time()
    rss = None
    if runtime in ("flower", "flower+worker"):
        from fedmoe.federation.flower.localdeploy import LocalDeployment

        workers = runtime == "flower+worker"
        # one torch thread per client process: n processes on this machine's cores at once would
        # otherwise each start one thread per core and slow down by orders of magnitude
        # 40 SuperNodes, 40 SuperExecs and 40 workers (0.66 GB resident each) do not fit in 24 GB: above
        # --own-workers-up-to clients, the SuperNodes share --shared-workers workers (a lab machine's choice)
        shared = args.shared_workers if workers and n > args.own_workers_up_to else None
        with LocalDeployment(root / f"deploy-{runtime}-{n}", clients=n, threads=1, workers=workers,
                             shared_workers=shared) as lab:
            # without workers, 8 messages out at once: each starts a process holding the model (about 0.5 GB).
            # With workers, 20: a SuperNode gives each message's process 30 s to start before it starts
            # another (Flower's HEARTBEAT_DEFAULT_INTERVAL), which 40 processes starting at once on two
            # cores exceed (each then started again, and again: 195 processes for 40 messages)
            inflight = 20 if workers else 8
            proc = lab.run(sets + ["federation.node_wait_s=600", f"federation.max_inflight={inflight}"])
            out, _ = proc.communicate()
            if workers:
                rss = _worker_rss(lab)
    else:
        cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--runtime", runtime, "--quiet",
               *[x for s in sets for x in ("--set", s)]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} with {n} clients failed:\n{out[-3000:]}")
    from fedmoe.rundir import RunDir

    rows = RunDir(root / f"{runtime}-{n}", create=False).read_metrics()
    rounds = [r for r in rows if r["kind"] == "round"]
    loads = [r["load_s"] for r in rows if r["kind"] == "train" and "load_s" in r]
    if runtime == "flower+worker" and n > args.own_workers_up_to:
        runtime = f"flower+worker ({args.shared_workers} shared)"
    return {"runtime": runtime, "clients": n, "total_s": time.time() - t0, "rounds": rounds,
            "load_s": sum(loads) / len(loads) if loads else 0.0, "worker_rss_mb": rss}


def _worker_rss(lab) -> float:
    """The mean resident memory of the deployment's workers (MB), read before they are stopped."""
    from fedmoe.federation.flower.relay import pid_path

    sizes = []
    for sock in lab.sockets.values():
        for pid in pid_path(sock).read_text().split():
            status = Path(f"/proc/{pid}/status")
            if status.is_file():
                kb = [int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith("VmRSS:")]
                sizes += kb
    return sum(sizes) / len(sizes) / 1024 if sizes else float("nan")


def _print_before_now(results: list[dict]) -> None:
    """Each runtime with the code before and now: the mean wall of the rounds after the first, and their ratio."""
    print("| clients | runtime | rounds | round wall, before | round wall, now | now ÷ before | run wall, before | "
          "run wall, now |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    pairs: dict[tuple, dict] = {}
    for r in results:
        pairs.setdefault((r["clients"], r["runtime"]), {})[r["code"]] = r
    for (n, rt), p in pairs.items():
        walls = {c: [x["wall_s"] for x in p[c]["rounds"][1:]] for c in p}
        mean = {c: sum(w) / len(w) for c, w in walls.items()}
        print(f"| {n} | {rt} | {len(walls['now'])} | {mean['before']:.2f} s | {mean['now']:.2f} s | "
              f"{mean['now'] / mean['before']:.2f} | {p['before']['total_s']:.1f} s | {p['now']['total_s']:.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 40])
    ap.add_argument("--runtimes", nargs="+", default=["local", "flower-sim", "flower", "flower+worker"])
    ap.add_argument("--own-workers-up-to", type=int, default=20,
                    help="up to this many clients every SuperNode has its own worker; above, they share")
    ap.add_argument("--shared-workers", type=int, default=4, help="workers the SuperNodes share above that")
    ap.add_argument("--plain-flower-up-to", type=int, default=None,
                    help="run plain `flower` (a model load per message) only up to this many clients")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="on top of the federation")
    ap.add_argument("--before", default=None, metavar="SRC",
                    help="also run each runtime with the fedmoe of SRC (a src/ directory), for a ratio")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for rt in args.runtimes:
                if rt == "flower" and args.plain_flower_up_to is not None and n > args.plain_flower_up_to:
                    continue
                for src in ([args.before] if args.before else []) + [None]:
                    res = one(rt, n, Path(tmp), args, src)
                    results.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "rounds"}), flush=True)
    print(f"\n{date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"`python {' '.join(sys.argv)}`\n")
    if args.before:
        _print_before_now(results)
        return
    print("| clients | runtime | run wall | round 2 wall | ÷ flower-sim | clients' work (sum) | aggregation | overhead "
          "| client load per message (mean) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    sim = {r["clients"]: r["rounds"][-1]["wall_s"] for r in results if r["runtime"] == "flower-sim"}
    for r in results:
        last = r["rounds"][-1]
        ratio = f"{last['wall_s'] / sim[r['clients']]:.1f}x" if r["clients"] in sim else "–"
        print(f"| {r['clients']} | {r['runtime']} | {r['total_s']:.1f} s | {last['wall_s']:.2f} s | {ratio} | "
              f"{last['clients_s']:.2f} s | {last['aggregate_s']:.3f} s | {last['overhead_s']:+.2f} s | "
              f"{r['load_s']:.2f} s |")
    for r in results:
        if r["worker_rss_mb"] is not None:
            print(f"\n{r['clients']} clients: a worker holds {r['worker_rss_mb']:.0f} MB resident (mean)")


if __name__ == "__main__":
    main()
