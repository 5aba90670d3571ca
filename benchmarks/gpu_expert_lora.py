#!/usr/bin/env python
"""Step b of benchmarks/gpu_check.sh: the expert LoRA training step on the full OLMoE-1B-7B shape,
fedmoe's ``ExpertsWithLoRA`` against PEFT ``target_parameters``, with achieved TFLOP/s and MFU.

The model: OLMoE-1B-7B-0924's config (16 layers, H=2048, I=1024, 64 experts, top-8, V=50304),
random weights, bf16, on the GPU. A step is what benchmarks/expert_lora.py times: forward +
backward + AdamW over the expert LoRA only (``model(ids, labels=ids)``), here on ``--batch`` x
``--seq-len`` tokens (default 4 x 2048 = 8192, so that each expert gets ~1000 rows at k = 8), at
k = 8, 4, 2, 1, for ours and PEFT on the same frozen base (the two wrappers are swapped in), every
(method, k) warmed up, then timed in interleaved repetitions. Reported per (method, k): median step
time, peak CUDA memory, achieved TFLOP/s and MFU (model FLOPs utilisation) against the card's bf16
peak measured in the same run (a plain 8192^3 bf16 matmul).

FLOPs of a step (analytic, 2 x multiply-accumulates; "useful" work, the same for ours and PEFT):
forward = attention projections + attention scores (causal: half the T x T square, as the flash
kernels compute) + router + k routed experts + LM head + the expert LoRA on the k routed pairs;
backward = the input gradients of every frozen product (as much as its forward; none for layer 0's
attention, below which nothing trains, and no weight gradients: the base is frozen) + the LoRA's
input and weight gradients (2 x its forward). PEFT's extra work (folding W + B·A for all 64 experts
of every layer on every forward) is not counted as useful.

Also: the k=1 / k=8 step-time ratio against the FLOPs ratio; the goals of issue 17 (ours >= 40%
MFU at k = 8, k = 1 within 1.1x of the FLOPs ratio, faster than PEFT at every k); ours at rank 20
(FLAME's rank; in bf16 20 x 2 bytes is not 16-byte aligned, so ExpertsWithLoRA takes its per-expert
loop, not grouped_mm: which path ran is recorded); one MoE layer's experts alone (forward + input
and LoRA backward on balanced random routing: the grouped path's own efficiency; ours also with
``combine = "gather"``, the expert outputs gathered and summed per token instead of scatter-added with
atomics, timed beside it); a profile of our
step at k = 8 and k = 1 (device time by kernel, grouped into matmul / routing (sort, gather, scatter,
index) / attention / other).

    python benchmarks/gpu_expert_lora.py --json out.json           # GPU
    python benchmarks/gpu_expert_lora.py --dry --json out.json     # CPU, tiny shapes, fp32, 2 iterations
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

common.setup_paths()

import torch  # noqa: E402

from expert_lora import EXPERT_TARGETS, expected_experts_hit, forward_flops  # noqa: E402

METHODS = ("ours", "peft")


# ---------------------------------------------------------------------------------------- FLOPs
def step_flops(cfg, seq_len: int, batch: int, k: int, rank: int) -> dict:
    f = forward_flops(cfg, seq_len, batch, k)  # full T x T attention scores
    L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    T = seq_len * batch
    scores = f["attn_scores"] / 2  # causal
    base_fwd = f["attn_proj"] + scores + f["router"] + f["experts"] + f["lm_head"]
    lora_fwd = 2.0 * L * T * k * rank * ((H + 2 * I) + (I + H))  # gate_up: H -> r -> 2I; down: I -> r -> H
    base_bwd = base_fwd - (f["attn_proj"] + scores) / L  # input gradients; nothing below layer 0's MoE trains
    experts_fwd = f["experts"] + lora_fwd
    return {"forward": base_fwd + lora_fwd, "backward": base_bwd + 2 * lora_fwd, "step": base_fwd + base_bwd + 3 * lora_fwd,
            "lora_forward": lora_fwd, "experts_forward": experts_fwd, "attn_scores_causal": scores}


def experts_layer_flops(cfg, tokens: int, k: int, rank: int) -> float:
    """One MoE layer's routed experts with LoRA: forward + input gradients + LoRA gradients."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    base = 2.0 * tokens * k * 3 * H * I
    lora = 2.0 * tokens * k * rank * ((H + 2 * I) + (I + H))
    return 2 * base + 3 * lora


# ---------------------------------------------------------------------------------------- model
def build_config(args):
    if args.dry:
        from fedmoe.moe.tiny import tiny_config

        cfg = tiny_config("olmoe", vocab_size=512, hidden_size=64, intermediate_size=32, num_experts=16,
                          top_k=8, num_layers=2)
        source = "tiny_config('olmoe', vocab 512, H 64, I 32, 16 experts, top-8, 2 layers)"
    else:
        cfg, source = common.olmoe_config()
        if args.layers:
            cfg.num_hidden_layers = args.layers
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    if args.experts_impl:
        cfg._experts_implementation = args.experts_impl
    return cfg, source


def build_model(cfg, dtype, dev: common.Device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(dev.device):  # initialise on the device (a 7B CPU init takes minutes)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(dev.device).train()


class Bench:
    def __init__(self, args, res: common.Result, dev: common.Device):
        from peft import LoraConfig, get_peft_model

        from fedmoe.moe import ExpertsWithLoRA, MoEModel

        self.args, self.res, self.dev = args, res, dev
        self.dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        self.cfg, source = build_config(args)
        t = time.perf_counter()
        self.model = build_model(self.cfg, self.dtype, dev)
        build_s = time.perf_counter() - t
        cfg = self.cfg
        self.kmax = int(cfg.num_experts_per_tok)
        self.ks = [k for k in (args.ks or [self.kmax >> i for i in range(4)]) if 1 <= k <= self.kmax]
        self.ks = sorted(set(self.ks), reverse=True)
        mm = MoEModel(self.model)
        mm.add_expert_lora(args.rank, args.alpha)
        self.mm = mm
        self.mods = {"ours": [layer.block.experts for layer in mm.layers]}
        self.params = {"ours": list(mm.trainable_parameters().values())}
        grouped = all(m.grouped and m._grouped_ok(self.dtype) for m in self.mods["ours"])
        self.path = "grouped_mm" if grouped else "per-expert loop"
        for layer in mm.layers:  # the HF experts back in place; PEFT wraps them
            layer.block.experts = layer.experts
        self.peft_model = get_peft_model(self.model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=[],
                                                                target_parameters=EXPERT_TARGETS))
        self.mods["peft"] = [layer.block.experts for layer in mm.layers]
        self.params["peft"] = [p for p in self.peft_model.parameters() if p.requires_grad]
        n_ours, n_peft = (sum(p.numel() for p in self.params[m]) for m in METHODS)
        assert n_ours == n_peft, (n_ours, n_peft)
        self.ExpertsWithLoRA = ExpertsWithLoRA
        self.opts = {m: torch.optim.AdamW(self.params[m], lr=args.lr) for m in METHODS}
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(dev.device)
        res["model"] = {
            "config": source, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "experts": cfg.num_experts, "top_k": self.kmax,
            "vocab": cfg.vocab_size, "params": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.dtype).replace("torch.", ""), "build_s": round(build_s, 2),
            "memory_gb_after_build": round(dev.current_gb(), 2),
            "hf_experts_implementation": getattr(self.model.config, "_experts_implementation", None),
            "attention": self.model.config._attn_implementation,
        }
        res["setup"] = {"batch": args.batch, "seq_len": args.seq_len, "tokens": args.batch * args.seq_len,
                        "rank": args.rank, "alpha": args.alpha, "ks": self.ks, "lora_params": n_ours,
                        "ours_path": self.path, "warmup": args.warmup, "reps": args.reps,
                        "peft_adapter_dtype": str(self.params["peft"][0].dtype).replace("torch.", ""),
                        "ours_adapter_dtype": str(self.params["ours"][0].dtype).replace("torch.", "")}
        res.save()

    def use(self, method: str, mods=None) -> None:
        for layer, mod in zip(self.mm.layers, mods or self.mods[method]):
            layer.block.experts = mod

    def set_k(self, k: int) -> None:
        self.mm.set_top_k(k)
        for layer in self.model.model.layers:
            layer.mlp.gate.top_k = k
        self.model.num_experts_per_tok = k

    def forward(self, method: str):
        m = self.model if method == "ours" else self.peft_model
        return m(input_ids=self.ids, labels=self.ids, use_cache=False)

    def step(self, method: str, opt=None) -> float:
        opt = opt or self.opts[method]
        self.dev.sync()
        t = time.perf_counter()
        self.forward(method).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.dev.sync()
        return time.perf_counter() - t


# ---------------------------------------------------------------------------------------- phases
def phase_peak(args, res, dev):
    if args.dry:
        peak = common.matmul_peak(dev, torch.float32, n=256, warmup=1, iters=3)
    else:
        peak = common.matmul_peak(dev, torch.bfloat16, n=args.peak_n)
    peak["nominal_bf16_tflops"] = common.nominal_peak(dev.name) if dev.cuda else None
    res["peak"] = peak
    res.save()
    print(f"peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['n']}^3 matmul; nominal "
          f"{peak['nominal_bf16_tflops']})", flush=True)
    return peak["tflops"]


def phase_sanity(b: Bench, res):
    with torch.no_grad():
        b.set_k(b.kmax)
        b.use("ours")
        lo = b.forward("ours").loss.item()
        b.use("peft")
        lp = b.forward("peft").loss.item()
    tol = 1e-4 if b.dtype == torch.float32 else 2e-2
    res["sanity"] = {"loss_ours": lo, "loss_peft": lp, "rel_diff": abs(lo - lp) / max(1.0, abs(lo)), "tolerance": tol}
    res.save()
    print(f"sanity at k={b.kmax}: loss ours {lo:.5f}, PEFT {lp:.5f}", flush=True)
    if abs(lo - lp) > tol * max(1.0, abs(lo)):
        res["errors"].append(f"ours and PEFT disagree at init: {lo} vs {lp}")


def phase_steps(b: Bench, res, peak_tflops: float):
    args, dev = b.args, b.dev
    cells = {}
    hit = {}
    for k in b.ks:
        b.set_k(k)
        b.use("ours")
        b.mm.reset_activation_counts()
        with torch.no_grad(), b.mm.tracking(None):
            b.forward("ours")
        counts, _ = b.mm.activation_counts()
        hit[k] = (counts > 0).sum(dim=1).float().mean().item()
        for m in METHODS:
            b.use(m)
            dev.free_cache()
            dev.reset_peak()
            cell = cells[(m, k)] = {"times": [], "error": None}
            try:
                for _ in range(args.warmup):
                    b.step(m)
                cell["peak_gb"] = dev.peak_gb()
                cell["peak_reserved_gb"] = dev.peak_reserved_gb()
            except Exception as e:  # noqa: BLE001 - an OOM at one k is a result, not the end
                cell["error"] = common.error_text(e)
                b.opts[m].zero_grad(set_to_none=True)
                dev.free_cache()
        print(f"warmed up k={k}: experts hit/layer {hit[k]:.1f}; peak GB ours "
              f"{cells[('ours', k)].get('peak_gb')}, PEFT {cells[('peft', k)].get('peak_gb')}", flush=True)
    flops = {k: step_flops(b.cfg, args.seq_len, args.batch, k, args.rank) for k in b.ks}
    res["flops"] = {str(k): v for k, v in flops.items()}
    rows = _rows(b, cells, hit, flops, peak_tflops)
    res["rows"] = rows
    res.save()
    for rep in range(args.reps):
        order = METHODS if rep % 2 == 0 else METHODS[::-1]
        for k in b.ks:
            b.set_k(k)
            for m in order:
                if cells[(m, k)]["error"]:
                    continue
                b.use(m)
                try:
                    cells[(m, k)]["times"].append(b.step(m))
                except Exception as e:  # noqa: BLE001
                    cells[(m, k)]["error"] = common.error_text(e)
                    dev.free_cache()
        print(f"rep {rep + 1}/{args.reps}: " + "  ".join(
            f"k={k} ours {_last(cells[('ours', k)])} PEFT {_last(cells[('peft', k)])}" for k in b.ks), flush=True)
        rows = _rows(b, cells, hit, flops, peak_tflops)  # saved after every repetition: a kill keeps them
        res["rows"] = rows
        res.save()
    return rows


def _rows(b: Bench, cells: dict, hit: dict, flops: dict, peak_tflops: float) -> list[dict]:
    args = b.args
    rows = []
    for k in b.ks:
        row = {"k": k, "step_flops": flops[k]["step"], "flops_ratio_vs_kmax": flops[k]["step"] / flops[b.kmax]["step"],
               "experts_hit_per_layer": hit[k],
               "experts_hit_uniform": expected_experts_hit(b.cfg.num_experts, k, args.seq_len * args.batch)}
        for m in METHODS:
            c = cells[(m, k)]
            row[f"{m}_error"] = c["error"]
            row[f"{m}_times_s"] = list(c["times"])
            row[f"{m}_peak_gb"] = c.get("peak_gb")
            row[f"{m}_peak_reserved_gb"] = c.get("peak_reserved_gb")
            if c["times"]:
                med = statistics.median(c["times"])
                row[f"{m}_median_s"] = med
                row[f"{m}_tflops"] = flops[k]["step"] / med / 1e12
                row[f"{m}_mfu"] = row[f"{m}_tflops"] / peak_tflops
        rows.append(row)
    for row in rows:
        for m in METHODS:
            base = next(r for r in rows if r["k"] == b.kmax).get(f"{m}_median_s")
            if row.get(f"{m}_median_s") and base:
                row[f"{m}_time_ratio_vs_kmax"] = row[f"{m}_median_s"] / base
        if row.get("ours_median_s") and row.get("peft_median_s"):
            row["peft_over_ours"] = row["peft_median_s"] / row["ours_median_s"]
    return rows


def _last(cell) -> str:
    return f"{cell['times'][-1]:.4f}s" if cell["times"] else ("ERR" if cell["error"] else "-")


def goals(rows, kmax: int) -> dict:
    by_k = {r["k"]: r for r in rows}
    out = {}
    r8 = by_k.get(kmax, {})
    out["mfu_at_kmax"] = r8.get("ours_mfu")
    out["mfu_at_kmax_ge_0.40"] = None if r8.get("ours_mfu") is None else r8["ours_mfu"] >= 0.40
    r1 = by_k.get(1)
    if r1 and r1.get("ours_time_ratio_vs_kmax") is not None:
        out["k1_time_ratio"] = r1["ours_time_ratio_vs_kmax"]
        out["k1_flops_ratio"] = r1["flops_ratio_vs_kmax"]
        out["k1_time_over_flops_ratio"] = r1["ours_time_ratio_vs_kmax"] / r1["flops_ratio_vs_kmax"]
        out["k1_within_1.1x_of_flops_ratio"] = out["k1_time_over_flops_ratio"] <= 1.1
    faster = [r.get("peft_over_ours") for r in rows]
    out["peft_over_ours_by_k"] = {r["k"]: r.get("peft_over_ours") for r in rows}
    out["faster_than_peft_at_every_k"] = None if None in faster else all(f > 1.0 for f in faster)
    return out


def phase_extra_rank(b: Bench, res, rank: int, peak_tflops: float):
    """Ours at another rank (k = kmax and 1): which path ExpertsWithLoRA takes, and its speed."""
    args, dev = b.args, b.dev
    mods = [b.ExpertsWithLoRA(layer.experts, layer.index, b.mm.tracker, rank=rank, alpha=args.alpha)
            for layer in b.mm.layers]
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    path = "grouped_mm" if all(m.grouped and m._grouped_ok(b.dtype) for m in mods) else "per-expert loop"
    out = {"rank": rank, "path": path, "rows": []}
    b.use("ours", mods)
    try:
        for k in sorted({b.kmax, 1}, reverse=True):
            b.set_k(k)
            dev.free_cache()
            dev.reset_peak()
            for _ in range(args.warmup):
                b.step("ours", opt)
            times = [b.step("ours", opt) for _ in range(max(2, args.reps // 2))]
            med = statistics.median(times)
            f = step_flops(b.cfg, args.seq_len, args.batch, k, rank)["step"]
            out["rows"].append({"k": k, "median_s": med, "times_s": times, "peak_gb": dev.peak_gb(),
                                "tflops": f / med / 1e12, "mfu": f / med / 1e12 / peak_tflops})
    except Exception as e:  # noqa: BLE001
        out["error"] = common.error_text(e)
    finally:
        b.use("ours")
        del opt, params, mods
        dev.free_cache()
    res.setdefault("extra_ranks", []).append(out)
    res.save()
    print(f"ours at rank {rank} ({path}): " + ", ".join(f"k={r['k']} {r['median_s']:.4f}s" for r in out["rows"]), flush=True)


def phase_layer(b: Bench, res, peak_tflops: float):
    """One MoE layer's experts alone, ours and PEFT, on balanced random routing."""
    args, dev = b.args, b.dev
    T = args.batch * args.seq_len
    H, E = b.cfg.hidden_size, b.cfg.num_experts
    g = torch.Generator(device=dev.device).manual_seed(7)
    x = torch.randn(T, H, device=dev.device, dtype=b.dtype, generator=g) * 0.5
    logits = torch.randn(T, E, device=dev.device, generator=g)
    grad = torch.randn(T, H, device=dev.device, dtype=b.dtype, generator=g)
    rows = []
    for k in b.ks:
        weights, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        weights = weights.to(b.dtype)
        row = {"k": k, "flops": experts_layer_flops(b.cfg, T, k, args.rank)}
        for m in (*METHODS, "ours_gather"):
            mod = b.mods["ours" if m == "ours_gather" else m][0]
            if m != "peft":  # ours with the scatter-add back to the tokens, and with gather-and-sum
                mod.combine = "gather" if m == "ours_gather" else "index_add"
            xr = x.detach().clone().requires_grad_(True)
            params = [p for p in mod.parameters() if p.requires_grad]

            def once():
                dev.sync()
                t = time.perf_counter()
                mod(xr, idx, weights).backward(grad)
                dev.sync()
                dt = time.perf_counter() - t
                xr.grad = None
                for p in params:
                    p.grad = None
                return dt

            try:
                for _ in range(args.warmup):
                    once()
                times = [once() for _ in range(args.reps)]
                med = statistics.median(times)
                row[f"{m}_median_s"] = med
                row[f"{m}_tflops"] = row["flops"] / med / 1e12
                row[f"{m}_mfu"] = row[f"{m}_tflops"] / peak_tflops
            except Exception as e:  # noqa: BLE001
                row[f"{m}_error"] = common.error_text(e)
            finally:
                if m != "peft":
                    mod.combine = "index_add"
        if row.get("ours_median_s") and row.get("ours_gather_median_s"):
            row["gather_over_index_add"] = row["ours_gather_median_s"] / row["ours_median_s"]
        rows.append(row)
        print(f"one MoE layer, k={k}: ours {row.get('ours_median_s')} (gather-and-sum: {row.get('ours_gather_median_s')}), "
              f"PEFT {row.get('peft_median_s')}", flush=True)
    res["moe_layer"] = {"tokens": T, "routing": "softmax top-k of N(0, 1) logits (balanced)", "rows": rows,
                        "ours_gather": "ours with ExpertsWithLoRA.combine = 'gather' (no scatter-add atomics)"}
    res.save()


CATEGORIES = [
    ("grouped_mm", ("grouped", "group_gemm", "groupedgemm", "_grouped_mm")),
    ("other matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "aten::mm", "aten::bmm", "aten::addmm",
                      "aten::matmul", "aten::linear", "dot_product")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("routing: sort/gather/scatter/index", ("sort", "radix", "index", "gather", "scatter", "bincount", "cumsum",
                                            "histogram", "topk", "argsort", "unique", "nonzero", "masked")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "lerp", "addcdiv", "addcmul")),
]


def _category(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(key in n for key in keys):
            return cat
    return "other (elementwise, copies, norms, ...)"


def phase_profile(b: Bench, res, work: Path):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.dev.cuda else [])
    out = {}
    texts = []
    b.use("ours")
    for k in sorted({b.kmax, 1}, reverse=True):
        b.set_k(k)
        b.step("ours")  # warm
        with profile(activities=acts) as prof:
            b.step("ours")
        ev = prof.key_averages()
        key = "self_device_time_total" if b.dev.cuda else "self_cpu_time_total"

        def self_time(e):
            v = getattr(e, key, None)
            if v is None and key == "self_device_time_total":
                v = getattr(e, "self_cuda_time_total", 0)
            return float(v or 0)

        cats: dict[str, float] = {}
        for e in ev:
            t = self_time(e)
            if t > 0:
                cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + t
        total = sum(cats.values()) or 1.0
        out[str(k)] = {"total_ms": total / 1e3,
                       "by_category_ms": {c: round(v / 1e3, 3) for c, v in sorted(cats.items(), key=lambda x: -x[1])},
                       "by_category_share": {c: round(v / total, 4) for c, v in sorted(cats.items(), key=lambda x: -x[1])},
                       "top": [{"name": e.key[:120], "self_ms": self_time(e) / 1e3, "count": e.count}
                               for e in sorted(ev, key=self_time, reverse=True)[:15]]}
        try:
            table = ev.table(sort_by=key, row_limit=30, max_name_column_width=80)
        except Exception:  # noqa: BLE001 - older/newer profiler column names
            table = ev.table(row_limit=30)
        texts.append(f"### ours, k={k}, sorted by {key}\n{table}\n")
    res["profile"] = {"time": "device (CUDA kernels)" if b.dev.cuda else "CPU (self time of each op)", "by_k": out}
    work.mkdir(parents=True, exist_ok=True)
    (work / "b_profile.txt").write_text("\n".join(texts))
    res.save()


# ---------------------------------------------------------------------------------------- main
def run(res: common.Result, args) -> None:
    dev = common.Device(args.device)
    res["device"] = dev.info()
    res["errors"] = []
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None

    def time_left(phase: str) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            res.setdefault("skipped", []).append(f"{phase}: time budget ({args.time_budget} s) spent")
            return False
        return True

    peak = phase_peak(args, res, dev)
    b = Bench(args, res, dev)
    print(f"model: {res['model']}\nsetup: {res['setup']}", flush=True)
    phase_sanity(b, res)
    rows = phase_steps(b, res, peak)
    res["goals"] = goals(rows, b.kmax)
    res["headline"] = headline(res, rows, b.kmax)
    res.save()
    for rank in args.extra_ranks:
        if time_left(f"ours at rank {rank}"):
            phase_extra_rank(b, res, rank, peak)
    if time_left("one MoE layer"):
        phase_layer(b, res, peak)
    if args.profile and time_left("profile"):
        phase_profile(b, res, Path(args.work))
    res["headline"] = headline(res, rows, b.kmax)
    for r in rows:
        for m in METHODS:
            if r.get(f"{m}_error"):
                res["errors"].append(f"{m} at k={r['k']}: {r[f'{m}_error']}")
    print_table(res, rows)


def headline(res, rows, kmax) -> list[str]:
    out = []
    peak = res.get("peak", {})
    out.append(f"peak {peak.get('tflops', 0):.3g} TFLOP/s ({peak.get('dtype')} matmul); "
               f"{res['setup']['tokens']} tokens/step, r={res['setup']['rank']}, ours via {res['setup']['ours_path']}")
    for r in rows:
        o, p = r.get("ours_median_s"), r.get("peft_median_s")
        out.append(f"k={r['k']}: ours {o and f'{o:.4f}'} s ({(r.get('ours_mfu') or 0) * 100:.1f}% MFU, "
                   f"{r.get('ours_peak_gb') or 0:.1f} GB), PEFT {p and f'{p:.4f}'} s "
                   f"({(r.get('peft_mfu') or 0) * 100:.1f}% MFU, {r.get('peft_peak_gb') or 0:.1f} GB)")
    g = res.get("goals", {})
    if g.get("k1_time_ratio") is not None:
        out.append(f"k=1/k={kmax} time {g['k1_time_ratio']:.3f} vs FLOPs {g['k1_flops_ratio']:.3f} "
                   f"({g['k1_time_over_flops_ratio']:.2f}x)")
    out.append("goals: MFU>=40% at k=max {}, k=1 within 1.1x of FLOPs ratio {}, faster than PEFT at every k {}".format(
        g.get("mfu_at_kmax_ge_0.40"), g.get("k1_within_1.1x_of_flops_ratio"), g.get("faster_than_peft_at_every_k")))
    for e in res.get("extra_ranks", []):
        out.append(f"rank {e['rank']} ({e['path']}): " + ", ".join(
            f"k={r['k']} {r['median_s']:.4f} s ({r['mfu'] * 100:.1f}% MFU)" for r in e["rows"]) + (
            f" error: {e['error']}" if e.get("error") else ""))
    layer = [r for r in res.get("moe_layer", {}).get("rows", []) if r.get("gather_over_index_add")]
    if layer:
        out.append("one MoE layer, gather-and-sum / scatter-add time: " + ", ".join(
            f"k={r['k']} {r['gather_over_index_add']:.2f}" for r in layer))
    return out


def print_table(res, rows) -> None:
    print()
    head = ["k", "ours s", "PEFT s", "PEFT/ours", "ours MFU", "PEFT MFU", "ours(k)/ours(kmax)", "FLOPs(k)/FLOPs(kmax)",
            "peak GB ours/PEFT"]
    print(" | ".join(head))
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        print(" | ".join([str(r["k"]), f("ours_median_s", ".4f"), f("peft_median_s", ".4f"), f("peft_over_ours", ".2f"),
                          f("ours_mfu", ".3f"), f("peft_mfu", ".3f"), f("ours_time_ratio_vs_kmax", ".3f"),
                          f("flops_ratio_vs_kmax", ".3f"), f"{f('ours_peak_gb', '.2f')} / {f('peft_peak_gb', '.2f')}"]))
    for line in res.get("headline", []):
        print(line)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, fp32, 2 iterations")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 (float32 with --dry)")
    ap.add_argument("--layers", type=int, default=None, help="cut the OLMoE config to this many layers (default: all 16)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (dry 32)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (dry 2)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8, as benchmarks/expert_lora.py)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="default: 8 4 2 1")
    ap.add_argument("--warmup", type=int, default=None, help="default 2 (dry 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per (method, k) (default 5; dry 2)")
    ap.add_argument("--extra-ranks", type=int, nargs="*", default=[20], help="ours alone at these ranks too (default 20)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--experts-impl", default=None, help="HF experts implementation for PEFT (default: HF's choice)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; optional phases are skipped after it")
    ap.add_argument("--json", required=True, help="result file")
    ap.add_argument("--work", default=None, help="folder for the profile table (default: beside --json)")
    args = ap.parse_args(argv)
    d = args.dry
    args.device = args.device or ("cpu" if d else "cuda")
    args.dtype = args.dtype or ("float32" if d else "bfloat16")
    args.seq_len = args.seq_len or (32 if d else 2048)
    args.batch = args.batch or (2 if d else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if d else 2)
    args.reps = args.reps or (2 if d else 5)
    args.work = args.work or str(Path(args.json).resolve().parent / "work")
    return args


def main(argv=None) -> int:
    return common.run_script("b_expert_lora", parse, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
