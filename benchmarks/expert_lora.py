#!/usr/bin/env python
"""One local LoRA training step versus top-k: fedmoe's per-expert LoRA against PEFT ``target_parameters``.

A step is forward + backward + AdamW step over the LoRA parameters only, with the loss on every
token (``model(input_ids, labels=input_ids)``), fp32, expert LoRA only (no attention LoRA):

* ours: ``MoEModel(model)`` + ``add_expert_lora(r, alpha)`` + ``set_top_k(k)``; LoRA runs only on the
  (token, expert) pairs the router picked, so its cost falls with k;
* PEFT: ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``, which
  folds W + s·B·A for the *whole* expert stack into the weight on every forward and then runs the
  Hugging Face experts forward (``config._experts_implementation``); top-k is set with
  ``router.top_k = k`` on every ``model.model.layers[i].mlp.gate`` and ``model.num_experts_per_tok = k``.

The base model is built once and shared: both adapters wrap the same frozen expert tensors and the
benchmark swaps ``mlp.experts`` between the two wrappers. For every k the two methods are warmed up,
then timed in interleaved repetitions (each repetition runs every k with both methods, the method
order alternating), so load from other processes hits all cells alike; medians and ratios are
reported. On a small shared CPU pass ``--threads 1``: with other processes running, two OpenMP
threads stall at barriers on every one of ours' many small per-expert ops.

    python benchmarks/expert_lora.py --models tiny olmoe4 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OLMOE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs" / "allenai--OLMoE-1B-7B-0924.json"
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


# ---------------------------------------------------------------------------------------- helpers
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak resident memory (CPU: VmHWM, reset through /proc/self/clear_refs) or CUDA peak allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.overall_peak_gb = 0.0

    def reset_peak(self) -> None:
        self.note()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            v = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            kb = _proc_status_kb("VmHWM")
            v = (kb or 0) / 2**20
        self.overall_peak_gb = max(self.overall_peak_gb, v)
        return v

    def current_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        return (_proc_status_kb("VmRSS") or 0) / 2**20

    def note(self) -> None:
        self.peak_gb()

    def process_peak_rss_gb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    import peft
    import transformers

    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------- models
def model_config(name: str, args):
    from fedmoe.moe.tiny import tiny_config

    if name == "tiny":
        cfg = tiny_config("olmoe", vocab_size=1024, hidden_size=128, intermediate_size=64,
                          num_experts=16, top_k=4, num_layers=4)
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
    elif name == "olmoe4":
        from transformers import OlmoeConfig

        cfg = OlmoeConfig.from_json_file(str(OLMOE_CONFIG))
        cfg.num_hidden_layers = 4
    else:
        raise SystemExit(f"unknown model '{name}' (choose from: tiny, olmoe4)")
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    if args.experts_impl:
        cfg._experts_implementation = args.experts_impl
    return cfg


def forward_flops(cfg, seq_len: int, batch: int, k: int) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one forward pass, by part, for OLMoE-style layers.

    Attention projections q,k,v,o; attention scores QK^T and PV over the full T x T square (no
    causal halving); router; k routed experts per token (gate_up: H -> 2I, down: I -> H); LM head.
    Norms, activations, softmax and the embedding lookup are ignored.
    """
    T, H, L = seq_len * batch, cfg.hidden_size, cfg.num_hidden_layers
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    d = H // heads
    I, E, V = cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    macs = {
        "attn_proj": L * T * (H * heads * d + 2 * H * kv_heads * d + heads * d * H),
        "attn_scores": L * batch * 2 * seq_len * seq_len * heads * d,
        "router": L * T * H * E,
        "experts": L * T * k * 3 * H * I,
        "lm_head": T * H * V,
    }
    out = {p: 2.0 * m for p, m in macs.items()}
    out["total"] = sum(out.values())
    return out


def expected_experts_hit(num_experts: int, k: int, tokens: int) -> float:
    """Distinct experts per layer if every token picked k of E uniformly at random."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


# ---------------------------------------------------------------------------------------- benchmark
DEFAULT_REPS = {"tiny": 10, "olmoe4": 3}


def bench_model(name: str, args, device: torch.device, mem: Memory) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedmoe.moe import MoEModel

    cfg = model_config(name, args)
    reps = args.reps or DEFAULT_REPS[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).float().to(device)
    model.train()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    kmax = int(cfg.num_experts_per_tok)
    ks = args.ks or sorted({max(1, kmax // 2**i) for i in range(kmax.bit_length())}, reverse=True)
    ks = [k for k in ks if 1 <= k <= kmax]
    print(f"\n=== {name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, intermediate "
          f"{cfg.intermediate_size}, {cfg.num_experts} experts, top-{kmax}, vocab {cfg.vocab_size}; "
          f"{n_params / 1e6:.1f}M params (fp32), built in {build_s:.1f}s; experts implementation "
          f"'{model.config._experts_implementation}', attention '{model.config._attn_implementation}'; "
          f"RSS {mem.current_gb():.2f} GB", flush=True)

    # ours, on the shared base model
    mm = MoEModel(model)
    mm.add_expert_lora(args.rank, args.alpha)
    ours_mods = [layer.block.experts for layer in mm.layers]
    ours_params = list(mm.trainable_parameters().values())
    # put the original experts modules back, then let PEFT wrap them in place
    for layer in mm.layers:
        layer.block.experts = layer.experts
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=[],
                                                  target_parameters=EXPERT_TARGETS))
    peft_mods = [layer.block.experts for layer in mm.layers]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert all(p.requires_grad for p in ours_params)
    n_ours, n_peft = sum(p.numel() for p in ours_params), sum(p.numel() for p in peft_params)
    assert n_ours == n_peft, (n_ours, n_peft)
    print(f"trainable LoRA params: ours {n_ours:,} in {len(ours_params)} tensors, "
          f"PEFT {n_peft:,} in {len(peft_params)} tensors (rank {args.rank}, alpha {args.alpha})", flush=True)

    def use(method: str) -> None:
        mods = ours_mods if method == "ours" else peft_mods
        for layer, mod in zip(mm.layers, mods):
            layer.block.experts = mod

    def set_k(k: int) -> None:
        mm.set_top_k(k)  # ours: router.top_k on every MoE layer (+ model.num_experts_per_tok)
        for layer in model.model.layers:  # PEFT: the same routers, set the way a PEFT user would
            layer.mlp.gate.top_k = k
        model.num_experts_per_tok = k

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)

    def forward(method: str):
        if method == "ours":
            return model(input_ids=ids, labels=ids, use_cache=False)
        return peft_model(input_ids=ids, labels=ids, use_cache=False)

    # sanity: fresh adapters (B = 0) change nothing, so both give the base loss
    with torch.no_grad():
        use("ours")
        l_ours = forward("ours").loss.item()
        use("peft")
        l_peft = forward("peft").loss.item()
    print(f"sanity at k={kmax}: loss ours {l_ours:.6f}, PEFT {l_peft:.6f} (|diff| {abs(l_ours - l_peft):.2e})",
          flush=True)
    assert abs(l_ours - l_peft) < 1e-4 * max(1.0, abs(l_ours)), "ours and PEFT disagree at init"

    opts = {"ours": torch.optim.AdamW(ours_params, lr=args.lr),
            "peft": torch.optim.AdamW(peft_params, lr=args.lr)}

    def step(method: str) -> float:
        opt = opts[method]
        sync(device)
        t = time.perf_counter()
        out = forward(method)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t

    methods = ("ours", "peft")
    times = {(m, k): [] for m in methods for k in ks}
    peaks, hit = {}, {}
    # warm every (method, k) up first, measuring its peak memory and (for ours) the experts it hits
    for k in ks:
        set_k(k)
        use("ours")
        mm.reset_activation_counts()
        with torch.no_grad(), mm.tracking(None):
            forward("ours")
        counts, _ = mm.activation_counts()
        hit[k] = (counts > 0).sum(dim=1).float().mean().item()  # distinct experts per layer
        for m in methods:
            use(m)
            gc.collect()
            mem.reset_peak()
            for _ in range(args.warmup):
                step(m)
            peaks[(m, k)] = mem.peak_gb()
        print(f"warmed up k={k}: experts hit/layer {hit[k]:.1f}; peak {mem.device.type} mem ours "
              f"{peaks[('ours', k)]:.2f} GB, PEFT {peaks[('peft', k)]:.2f} GB", flush=True)
    # timed: every repetition visits every k and both methods (method order alternates), so both
    # the PEFT/ours and the k/kmax ratios compare measurements taken close together in time
    for rep in range(reps):
        order = methods if rep % 2 == 0 else methods[::-1]
        for k in ks:
            set_k(k)
            for m in order:
                use(m)
                times[(m, k)].append(step(m))
        print(f"rep {rep + 1}/{reps}: " + "  ".join(
            f"k={k} ours {times[('ours', k)][-1]:.3f}s PEFT {times[('peft', k)][-1]:.3f}s" for k in ks), flush=True)

    flops = {k: forward_flops(cfg, args.seq_len, args.batch, k) for k in ks}
    rows = []
    for k in ks:
        o = times[("ours", k)]
        p = times[("peft", k)]
        rows.append({
            "k": k,
            "ours_median_s": statistics.median(o), "ours_min_s": min(o), "ours_max_s": max(o),
            "peft_median_s": statistics.median(p), "peft_min_s": min(p), "peft_max_s": max(p),
            "peft_over_ours": statistics.median(p) / statistics.median(o),
            "ours_over_ours_kmax": statistics.median(o) / statistics.median(times[("ours", ks[0])]),
            "peft_over_peft_kmax": statistics.median(p) / statistics.median(times[("peft", ks[0])]),
            "fwd_flops_ratio": flops[k]["total"] / forward_flops(cfg, args.seq_len, args.batch, kmax)["total"],
            "experts_hit_per_layer": hit[k],
            "experts_hit_uniform": expected_experts_hit(cfg.num_experts, k, args.seq_len * args.batch),
            "peak_gb_ours": peaks[("ours", k)], "peak_gb_peft": peaks[("peft", k)],
            "ours_s": o, "peft_s": p,
        })
    result = {
        "model": name, "reps": reps, "kmax": kmax, "num_experts": cfg.num_experts, "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
        "params": n_params, "lora_params": n_ours, "experts_impl": model.config._experts_implementation,
        "rows": rows, "flops_kmax": forward_flops(cfg, args.seq_len, args.batch, kmax),
    }
    # free the model before the next one
    del opts, ours_params, peft_params, ours_mods, peft_mods, peft_model, mm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------- report
def print_table(res: dict, args, markdown: bool) -> None:
    head = ["k", "ours s (median)", "PEFT s (median)", "PEFT/ours", "ours(k)/ours(kmax)",
            "PEFT(k)/PEFT(kmax)", "fwd FLOPs(k)/FLOPs(kmax)",
            "experts hit/layer (uniform)", "peak mem GB ours / PEFT"]
    lines = []
    for r in res["rows"]:
        lines.append([
            str(r["k"]),
            f"{r['ours_median_s']:.4f} [{r['ours_min_s']:.4f}-{r['ours_max_s']:.4f}]",
            f"{r['peft_median_s']:.4f} [{r['peft_min_s']:.4f}-{r['peft_max_s']:.4f}]",
            f"{r['peft_over_ours']:.2f}",
            f"{r['ours_over_ours_kmax']:.2f}",
            f"{r['peft_over_peft_kmax']:.2f}",
            f"{r['fwd_flops_ratio']:.3f}",
            f"{r['experts_hit_per_layer']:.1f} ({r['experts_hit_uniform']:.1f})",
            f"{r['peak_gb_ours']:.2f} / {r['peak_gb_peft']:.2f}",
        ])
    title = (f"{res['model']}: {res['layers']} layers, H={res['hidden']}, I={res['intermediate']}, "
             f"E={res['num_experts']}, top-{res['kmax']}, V={res['vocab']}, {res['params'] / 1e6:.1f}M params; "
             f"seq {args.seq_len} x batch {args.batch}, LoRA r={args.rank} alpha={args.alpha} "
             f"({res['lora_params']:,} params), {res['reps']} reps after {args.warmup} warmup; "
             f"HF experts impl '{res['experts_impl']}' (used by PEFT)")
    print()
    if markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" for _ in head) + "|")
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
        print(f"\nStep seconds: median [min-max] over the repetitions. Experts hit: distinct experts per "
              f"layer (of {res['num_experts']}) that the router picked for this batch; in brackets the "
              f"expectation under uniform routing.")
    else:
        print(title)
        widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for ln in lines:
            print("  ".join(c.rjust(w) for c, w in zip(ln, widths)))


def print_flops(res: dict, args) -> None:
    f = res["flops_kmax"]
    kmax = res["kmax"]
    print(f"\nAnalytic forward FLOPs per step for {res['model']} (seq {args.seq_len} x batch {args.batch}), "
          f"2 x MACs, at k={kmax}:")
    for part in ("attn_proj", "attn_scores", "router", "experts", "lm_head", "total"):
        print(f"  {part:12s} {f[part] / 1e9:10.2f} GFLOP")
    for r in res["rows"]:
        print(f"  k={r['k']}: forward FLOPs ratio vs k={kmax}: {r['fwd_flops_ratio']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "olmoe4"], choices=["tiny", "olmoe4"],
                    help="default: tiny olmoe4")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per (method, k), interleaved (default: tiny 10, olmoe4 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per (method, k) before timing (default 1)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    ap.add_argument("--ks", type=int, nargs="+", default=None,
                    help="top-k values (default: kmax, kmax/2, ..., 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's). On a small shared CPU use 1: with other "
                         "processes running, multi-threaded small ops stall at OpenMP barriers")
    ap.add_argument("--experts-impl", default=None,
                    help="HF experts implementation for the base/PEFT forward (default: HF's choice)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--json", default=None, help="also write all timings to this JSON file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    mem = Memory(device)
    info = machine_info(device)
    print("command:", " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    results = []
    for name in args.models:
        results.append(bench_model(name, args, device, mem))
    for res in results:
        print_table(res, args, args.markdown)
        print_flops(res, args)
    mem.note()
    peak = mem.overall_peak_gb
    if device.type == "cpu":
        peak = max(peak, mem.process_peak_rss_gb())
    print(f"\npeak {'RSS' if device.type == 'cpu' else 'CUDA allocated'} over the run: {peak:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "argv": sys.argv, "results": results,
                                               "peak_gb": peak}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
