#!/usr/bin/env python
"""Step c of benchmarks/gpu_check.sh: one round of FLAME (budgets k_i = 8, 4, 2, 1) and one round of
FLEx (grafting included) on the full OLMoE-1B-7B shape, through fedmoe's own runtime
(``run_federated``, in-process), with a few local steps per client.

The model: OLMoE-1B-7B-0924's config with random weights, bf16, on the GPU. fedmoe's runtime names
its model by ``model.name``; this script writes the config alone (no weights) into
``<work>/olmoe-1b-7b-random/config.json``, names that folder, and has ``MoEModel.from_pretrained``
build it with ``MoEModel.from_config`` (random weights, initialised on the device) instead of
reading weights: nothing of 14 GB is written or read. The server half reads the same config.json
(its skeleton). Tokenizer: the OLMoE tokenizer shipped with fedmoe (``builtin:tiny-olmoe``).

Per client: the peak CUDA memory of its local training (allocated and reserved, reset before each
client), its training time and tokens; FLEx: each client's grafting (expert scoring on its
calibration data) time and peak memory. Whether the largest peak fits an 80 GB card (reserved <=
79 GiB, the usable memory of an H100 80GB).

    python benchmarks/gpu_fed_olmoe.py --json out.json          # GPU
    python benchmarks/gpu_fed_olmoe.py --dry --json out.json    # CPU: the tiny-olmoe config, fp32, 1 step
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

common.setup_paths()

import torch  # noqa: E402

FITS_GIB = 79.0  # an H100 80GB holds 79.6 GiB; leave a little for the CUDA context


# ---------------------------------------------------------------------------------------- model by config
def write_model_folder(work: Path, dry: bool, layers: int | None = None) -> tuple[Path, str]:
    """A folder with only the config.json of the shape measured (``layers``: the OLMoE-1B-7B config cut
    to that many decoder layers)."""
    if dry:
        from fedmoe.moe.model import builtin_tiny_olmoe_config

        cfg, source = builtin_tiny_olmoe_config(), "builtin:tiny-olmoe config (fedmoe.moe.model)"
        folder = work / "tiny-olmoe-random"
    else:
        cfg, source = common.olmoe_config()
        folder = work / "olmoe-1b-7b-random"
        if layers is not None:
            cfg.num_hidden_layers = layers
            source += f", cut to {layers} layers"
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(folder / "config.json"))
    return folder, source


def patch_loader(folder: Path) -> None:
    """``MoEModel.from_pretrained(folder)`` -> ``MoEModel.from_config`` (random weights, built on the device)."""
    from fedmoe.eval.flops import load_model_config
    from fedmoe.moe import MoEModel, resolve_device

    original = MoEModel.from_pretrained.__func__
    target = folder.resolve()

    def from_pretrained(cls, name_or_path, *args, **kw):
        if Path(str(name_or_path)).resolve() != target:
            return original(cls, name_or_path, *args, **kw)
        opts = dict(zip(("dtype", "device", "attn_implementation", "seed"), args))
        opts.update(kw)
        device = resolve_device(opts.get("device", "cpu"))
        with torch.device(device):
            return cls.from_config(load_model_config(str(folder)), dtype=opts.get("dtype", "float32"),
                                   device=str(device), attn_implementation=opts.get("attn_implementation", "sdpa"),
                                   seed=opts.get("seed", 0))

    MoEModel.from_pretrained = classmethod(from_pretrained)


# ---------------------------------------------------------------------------------------- runs
def overrides(args, folder: Path, method: str, work: Path) -> list[str]:
    dry = args.dry
    common_ = [
        f"model.name={folder}", "model.tokenizer=builtin:tiny-olmoe",
        f"model.dtype={'float32' if dry else 'bfloat16'}", f"model.device={args.device}",
        "data.source=dolly", f"data.max_examples={40 if dry else 400}", f"data.max_length={48 if dry else args.max_length}",
        "data.partition.num_clients=4", f"data.max_test_per_client={2 if dry else 4}",
        f"train.max_steps={args.steps}", f"train.batch_size={2 if dry else args.batch}",
        "eval.rouge=false", "eval.zero_shot=false", "eval.batch_size=4", "federation.rounds=1",
        f"output_dir={work / 'runs'}", f"name={method}", f"algorithm.name={method}",
    ]
    if method == "flame":  # FLAME Table 2 layout (configs/flame-table2.yaml) at this rank
        ks = "[2,1,1,1]" if dry else "[8,4,2,1]"
        return common_ + [f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}", "lora.experts=true",
                          "lora.expert_layout=split", "lora.attention_targets=[q_proj,k_proj,v_proj,o_proj]",
                          "lora.router=true", f"algorithm.budgets.top_k={ks}", "train.lr=1.5e-4"]
    # FLEx (configs/flex-dirichlet.yaml): shared attention LoRA r 32 on q, k, v; one graft per layer
    return common_ + ["lora.rank=32", "lora.alpha=64", "lora.experts=false", "lora.attention_targets=[q_proj,k_proj,v_proj]",
                      f"algorithm.flex.calibration_size={4 if dry else args.calibration}", "train.lr=4e-5"]


def run_method(args, res: common.Result, method: str, folder: Path, work: Path, dev: common.Device) -> dict:
    from fedmoe.algorithms import get_method
    from fedmoe.config import load_config
    from fedmoe.federation import run_federated

    out: dict = {"method": method}
    res.setdefault("runs", {})[method] = out
    cfg = load_config(None, overrides(args, folder, method, work))
    out["config"] = {"lora": cfg.lora.model_dump(), "train": {"max_steps": cfg.train.max_steps,
                     "batch_size": cfg.train.batch_size, "bf16": cfg.train.bf16},
                     "data": {"max_length": cfg.data.max_length, "clients": cfg.data.partition.num_clients}}
    clients: dict[int, dict] = {}
    t_client: dict[int, float] = {}

    def observe(kind, cid, message):
        if cid is None:
            return
        if kind == "downlink":
            dev.reset_peak()
            t_client[cid] = time.perf_counter()
        elif kind == "reply":
            c = clients.setdefault(cid, {"client": cid})
            c["train_peak_gb"] = round(dev.peak_gb(), 3)
            c["train_peak_reserved_gb"] = dev.peak_reserved_gb()
            c["train_wall_s"] = round(time.perf_counter() - t_client[cid], 3)

    # grafting (FLEx's one-shot setup): its time and peak memory per client
    half = get_method(method).client
    setup_orig, own_setup = half.setup, "setup" in half.__dict__

    def setup(self, client, mm, train):
        dev.reset_peak()
        t = time.perf_counter()
        try:
            return setup_orig(self, client, mm, train)
        finally:
            c = clients.setdefault(client, {"client": client})
            c["setup_s"] = round(time.perf_counter() - t, 3)
            c["setup_peak_gb"] = round(dev.peak_gb(), 3)
            c["setup_peak_reserved_gb"] = dev.peak_reserved_gb()

    half.setup = setup
    dev.free_cache()
    dev.reset_peak()
    t0 = time.perf_counter()
    try:
        summary, rd = run_federated(cfg, observe=observe)
    finally:
        if own_setup:
            half.setup = setup_orig
        else:
            del half.setup
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        out["clients"] = [clients[c] for c in sorted(clients)]
        res.save()
    rows = [r for r in rd.read_metrics() if r.get("kind") == "train"]
    for r in rows:
        c = clients.setdefault(r["client"], {"client": r["client"]})
        c.update({k: r.get(k) for k in ("loss", "steps", "tokens", "train_s", "tokens_per_s")})
    for c in summary["clients"]:
        clients.setdefault(c["id"], {"client": c["id"]}).update(k=c.get("k"), rank=c.get("rank"))
    setup_metrics = summary.get("client_setup") or {}
    for cid, m in setup_metrics.items():
        c = clients.setdefault(int(cid), {"client": int(cid)})
        c.update({k: m.get(k) for k in ("seconds", "calibration_tokens", "scoring_peak_bytes", "cuda_peak_extra_bytes")
                  if k in m})
    out["clients"] = [clients[c] for c in sorted(clients)]
    out["global_loss"] = summary["global"].get("loss")
    out["trainable_params"] = summary.get("trainable_params")
    out["shared_params"] = summary.get("shared_params")
    peaks = [v for c in out["clients"] for k, v in c.items() if k.endswith("_reserved_gb") and v is not None]
    peaks_alloc = [v for c in out["clients"] for k, v in c.items() if k.endswith("peak_gb") and v is not None]
    out["max_peak_gb"] = max(peaks_alloc) if peaks_alloc else None
    out["max_peak_reserved_gb"] = max(peaks) if peaks else None
    top = out["max_peak_reserved_gb"]
    out["fits_80gb"] = None if not dev.cuda or top is None else top <= FITS_GIB
    if summary.get("failures"):
        out["failures"] = summary["failures"]
        res["errors"].append(f"{method}: clients failed: {summary['failures']}")
    shutil.rmtree(rd.path / "checkpoints", ignore_errors=True)  # hundreds of MB of LoRA state; not kept
    res.save()
    return out


def run(res: common.Result, args) -> None:
    dev = common.Device(args.device)
    res["device"] = dev.info()
    res["errors"] = []
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work / "runs", ignore_errors=True)
    folder, source = write_model_folder(work, args.dry)
    res["model"] = {"config": source, "folder": str(folder), "dtype": "float32" if args.dry else "bfloat16"}
    patch_loader(folder)
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    for method in ("flame", "flex"):
        if deadline is not None and time.perf_counter() > deadline:
            res["errors"].append(f"{method}: not run, the time budget ({args.time_budget} s) was spent")
            continue
        try:
            out = run_method(args, res, method, folder, work, dev)
            print(f"{method}: {out['wall_s']} s, max peak {out['max_peak_gb']} GB allocated / "
                  f"{out['max_peak_reserved_gb']} GB reserved; clients {out['clients']}", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded; FLEx still runs after a FLAME failure
            import traceback

            res["runs"].setdefault(method, {})["error"] = common.error_text(e)
            res["runs"][method]["traceback"] = traceback.format_exc()[-5000:]
            res["errors"].append(f"{method}: {common.error_text(e)[:500]}")
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        finally:
            dev.free_cache()
            res.save()
    res["headline"] = headline(res)


def headline(res) -> list[str]:
    out = []
    for method, r in res.get("runs", {}).items():
        if r.get("error"):
            out.append(f"{method}: ERROR {r['error'][:200]}")
            continue
        parts = []
        for c in r.get("clients", []):
            s = f"client {c['client']}"
            if c.get("k") is not None:
                s += f" k={c['k']}"
            s += f": train {c.get('train_peak_gb')} GB"
            if c.get("setup_s") is not None and method == "flex":
                s += f", grafting {c['setup_s']} s / {c.get('setup_peak_gb')} GB"
            parts.append(s)
        out.append(f"{method}: {r.get('wall_s')} s; " + "; ".join(parts) +
                   f"; max reserved {r.get('max_peak_reserved_gb')} GB, fits 80 GB: {r.get('fits_80gb')}")
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, the tiny-olmoe config, fp32, 1 local step")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--rank", type=int, default=20,
                    help="FLAME's LoRA rank (default 20, the paper's; ExpertsWithLoRA pads it to 24 for grouped_mm)")
    ap.add_argument("--steps", type=int, default=None, help="local steps per client (default 3; dry 1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=64, help="FLEx calibration sequences per client (default 64)")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--json", required=True)
    ap.add_argument("--work", default=None, help="scratch folder (default: <json folder>/work/c)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry else "cuda")
    args.steps = args.steps or (1 if args.dry else 3)
    if args.dry:
        args.rank = min(args.rank, 8)
    args.work = args.work or str(Path(args.json).resolve().parent / "work" / "c")
    return args


def main(argv=None) -> int:
    return common.run_script("c_federated_olmoe", parse, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
