#!/usr/bin/env python
"""Step d of benchmarks/gpu_check.sh: one local training step with bf16 autocast against the same
step in fp32, on the tiny model.

The model: the built-in pretrained ``builtin:tiny-moe`` (OLMoE architecture, 16 experts, top-4),
fp32 weights, with FedIT's adapters (expert LoRA + attention LoRA, r = 8, seeded), on the device.
The step is fedmoe's own ``train_local`` (one optimizer step on a batch of Dolly examples,
``train.bf16`` off / on; on CUDA "auto" means on), from the same initial state and seed, so the two
losses are the same forward pass in two precisions. Reported: both losses, their absolute and
relative difference, how far the step moved the LoRA tensors in each (and how far apart the two
updates are), each step's time, and what reaches the experts under autocast: the dtype of the
hidden states ``ExpertsWithLoRA`` receives (fp32: the residual stream of an fp32 model), which path
ran, and every matmul kernel with its operands' dtypes (``_grouped_mm(bfloat16, bfloat16)`` when the
experts compute in autocast's dtype; grouped_mm is not on autocast's list, so before issue 27 they
ran ``_grouped_mm(float32, float32)``). Also the same step with bf16 weights (``model.dtype:
bfloat16``, no autocast).

    python benchmarks/gpu_bf16_step.py --json out.json          # GPU
    python benchmarks/gpu_bf16_step.py --dry --json out.json    # CPU (autocast to bf16 on the CPU)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

common.setup_paths()

import torch  # noqa: E402

LOSS_REL_TOL = 2e-2  # bf16 autocast vs fp32 forward loss on the same batch (bf16: 8 significant bits)


def examples(cfg, tokenizer, n: int) -> list[dict]:
    from fedmoe.data import prepare_federated_data
    from fedmoe.data.tokenize import tokenize_examples

    data = prepare_federated_data(cfg.data, cfg.seed)
    return tokenize_examples(tokenizer, data.clients[0].train[:n], cfg.data.max_length)


class KernelOperands:
    """Which matmul kernels ran (``aten._grouped_mm``, ``aten.mm``/``addmm``/``bmm``) and the dtypes of
    their two operands, counted (a dispatch mode: what the device was really asked to compute)."""

    KERNELS = ("_grouped_mm", "mm", "addmm", "bmm")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in KernelOperands.KERNELS:
                    a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
                    key = f"{name}({str(a.dtype).replace('torch.', '')}, {str(b.dtype).replace('torch.', '')})"
                    seen[key] = seen.get(key, 0) + 1
                return func(*args, **(kwargs or {}))

        self.seen, self.mode = seen, Mode()


def spy_experts(mm) -> tuple[dict, list]:
    """What ExpertsWithLoRA receives (dtype of the hidden states) and which path it takes."""
    seen = {"input_dtypes": set(), "grouped": 0, "loop": 0}
    handles = []
    for layer in mm.layers:
        ex = mm.experts_module(layer.index)
        handles.append(ex.register_forward_pre_hook(
            lambda mod, args: seen["input_dtypes"].add(str(args[0].dtype).replace("torch.", ""))))
        for path, attr in (("grouped", "_experts_grouped"), ("loop", "_experts_loop")):
            orig = getattr(ex, attr)

            def counted(*a, _orig=orig, _path=path, **kw):
                seen[_path] += 1
                return _orig(*a, **kw)

            setattr(ex, attr, counted)
            handles.append((ex, attr))
    return seen, handles


def unspy(handles) -> None:
    for h in handles:
        if isinstance(h, tuple):
            delattr(*h)
        else:
            h.remove()


def one_step(mm, init_state, data, cfg, pad_id, bf16: str, dev: common.Device, spy_kernels: bool = True) -> dict:
    """One training step from ``init_state``; ``spy_kernels``: record the matmul kernels and their
    operand dtypes (a dispatch mode, which slows the step: the timed repeats run without it)."""
    from fedmoe.train import train_local

    mm.load_state(init_state)
    tc = cfg.train.model_copy(update={"bf16": bf16, "max_steps": 1})
    seen, handles = spy_experts(mm)
    kernels = KernelOperands()
    try:
        dev.sync()
        t = time.perf_counter()
        if spy_kernels:
            with kernels.mode:
                res = train_local(mm, data, tc, pad_id, lr=tc.lr, seed=123)
        else:
            res = train_local(mm, data, tc, pad_id, lr=tc.lr, seed=123)
        dev.sync()
        dt = time.perf_counter() - t
    finally:
        unspy(handles)
    after = mm.get_state()
    return {"loss": res.loss, "seconds": dt, "tokens": res.tokens, "after": after,
            "experts_input_dtypes": sorted(seen["input_dtypes"]), "matmul_kernels": dict(sorted(kernels.seen.items())),
            "experts_path_calls": {"grouped_mm": seen["grouped"], "per-expert loop": seen["loop"]}}


def update_norms(init: dict, a: dict, b: dict) -> dict:
    da = torch.cat([(a[n].float() - init[n].float()).flatten() for n in init])
    db = torch.cat([(b[n].float() - init[n].float()).flatten() for n in init])
    return {"update_norm_fp32": float(db.norm()), "update_norm_other": float(da.norm()),
            "update_rel_diff": float((da - db).norm() / db.norm().clamp_min(1e-30)),
            "update_cosine": float(torch.nn.functional.cosine_similarity(da, db, dim=0))}


def run(res: common.Result, args) -> None:
    from fedmoe.algorithms import get_method
    from fedmoe.config import load_config
    from fedmoe.data.tokenize import pad_token_id
    from fedmoe.moe import MoEModel, load_tokenizer

    dev = common.Device(args.device)
    res["device"] = dev.info()
    res["errors"] = []
    cfg = load_config(None, ["model.name=builtin:tiny-moe", f"model.device={args.device}", "lora.rank=8",
                             "data.max_examples=200", "data.max_length=128", "data.partition.num_clients=1",
                             f"train.batch_size={args.batch}", "train.lr=2e-3", "train.grad_clip=1.0"])
    tok = load_tokenizer(cfg.model.name)
    data = examples(cfg, tok, args.batch)
    pad = pad_token_id(tok)
    method = get_method("fedit")
    mm = MoEModel.from_pretrained(cfg.model.name, dtype="float32", device=args.device)
    torch.manual_seed(0)
    method.client.build(cfg, mm)
    init = mm.get_state()
    res["setup"] = {"model": cfg.model.name, "adapters": "FedIT: expert LoRA + attention LoRA, r=8",
                    "batch": args.batch, "tokens": None, "lr": cfg.train.lr,
                    "trainable_params": sum(t.numel() for t in init.values())}
    fp32 = one_step(mm, init, data, cfg, pad, "off", dev)
    res["setup"]["tokens"] = fp32["tokens"]
    amp = one_step(mm, init, data, cfg, pad, "on", dev)
    # timed warm (the first step of each pays one-off costs): fp32, autocast, and autocast through the
    # experts' old path (fp32 grouped_mm, before issue 27), interleaved, the median of 3 each
    from fedmoe.moe.lora import ExpertsWithLoRA

    def old_path(run):
        orig = ExpertsWithLoRA.__dict__["_compute_dtype"]
        ExpertsWithLoRA._compute_dtype = staticmethod(lambda x: x.dtype)
        try:
            return run()
        finally:
            ExpertsWithLoRA._compute_dtype = orig

    old = old_path(lambda: one_step(mm, init, data, cfg, pad, "on", dev))
    times: dict[str, list[float]] = {"fp32": [], "autocast": [], "autocast_old_path": []}
    peaks: dict[str, float] = {}
    for _ in range(3):
        for name, run in (("fp32", lambda: one_step(mm, init, data, cfg, pad, "off", dev, spy_kernels=False)),
                          ("autocast", lambda: one_step(mm, init, data, cfg, pad, "on", dev, spy_kernels=False)),
                          ("autocast_old_path", lambda: old_path(
                              lambda: one_step(mm, init, data, cfg, pad, "on", dev, spy_kernels=False)))):
            dev.reset_peak()
            times[name].append(run()["seconds"])
            peaks[name] = dev.peak_gb()
    med = {n: sorted(t)[1] for n, t in times.items()}
    fp32_t, amp_t = med["fp32"], med["autocast"]
    res["autocast_old_path"] = {"loss": old["loss"], "matmul_kernels": old["matmul_kernels"],
                                "warm_seconds": med["autocast_old_path"], "peak_gb": peaks["autocast_old_path"],
                                "new_over_old_time": amp_t / med["autocast_old_path"],
                                "loss_abs_diff_vs_new": abs(old["loss"] - amp["loss"])}
    res["peak_gb"] = peaks
    res["times_s"] = times
    diff = abs(amp["loss"] - fp32["loss"])
    rel = diff / max(abs(fp32["loss"]), 1e-12)
    res["fp32"] = {k: v for k, v in fp32.items() if k != "after"} | {"warm_seconds": fp32_t}
    res["bf16_autocast"] = {k: v for k, v in amp.items() if k != "after"} | {"warm_seconds": amp_t}
    res["loss_abs_diff"] = diff
    res["loss_rel_diff"] = rel
    res["loss_rel_tolerance"] = LOSS_REL_TOL
    res["update"] = update_norms(init, amp["after"], fp32["after"])
    res.save()
    # bf16 weights (no autocast): the same adapters, rounded
    mm16 = copy.deepcopy(mm)
    mm16.model.to(torch.bfloat16)
    init16 = {n: t.to(torch.bfloat16) for n, t in init.items()}
    try:
        w16 = one_step(mm16, init16, data, cfg, pad, "off", dev)
        res["bf16_weights"] = {k: v for k, v in w16.items() if k != "after"}
        res["bf16_weights"]["loss_abs_diff_vs_fp32"] = abs(w16["loss"] - fp32["loss"])
        res["bf16_weights"]["update"] = update_norms(init, w16["after"], fp32["after"])
    except Exception as e:  # noqa: BLE001 - a variant, recorded
        res["bf16_weights"] = {"error": common.error_text(e)}
        res["errors"].append(f"bf16 weights: {common.error_text(e)}")
    if not (rel <= LOSS_REL_TOL):
        res["errors"].append(f"bf16 autocast loss {amp['loss']} vs fp32 {fp32['loss']}: relative difference "
                             f"{rel:.3e} > {LOSS_REL_TOL}")
    res["headline"] = [
        f"loss fp32 {fp32['loss']:.6f}, bf16 autocast {amp['loss']:.6f}: |diff| {diff:.2e} ({rel:.2e} relative; "
        f"tolerance {LOSS_REL_TOL})",
        f"LoRA update bf16 vs fp32: relative difference {res['update']['update_rel_diff']:.3f}, cosine "
        f"{res['update']['update_cosine']:.4f}",
        f"step time fp32 {fp32_t:.4f} s, bf16 autocast {amp_t:.4f} s; under autocast the experts get "
        f"{amp['experts_input_dtypes']} via {amp['experts_path_calls']}",
        f"matmul kernels under autocast (operand dtypes: calls): {amp['matmul_kernels']}",
        f"the experts' old path under autocast (fp32 grouped_mm): {med['autocast_old_path']:.4f} s; new/old "
        f"{res['autocast_old_path']['new_over_old_time']:.3f}; peak GB new {peaks['autocast']:.3f}, old "
        f"{peaks['autocast_old_path']:.3f}; kernels {old['matmul_kernels']}",
    ]
    if "loss" in res["bf16_weights"]:
        w = res["bf16_weights"]
        res["headline"].append(f"bf16 weights (no autocast): loss {w['loss']:.6f} (|diff| vs fp32 "
                               f"{w['loss_abs_diff_vs_fp32']:.2e}), {w['seconds']:.4f} s, "
                               f"experts via {w['experts_path_calls']}")
    print("\n".join(res["headline"]), flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="on the CPU (autocast to bf16 there)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--batch", type=int, default=None, help="examples in the step (default 8; dry 4)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry else "cuda")
    args.batch = args.batch or (4 if args.dry else 8)
    return args


def main(argv=None) -> int:
    return common.run_script("d_bf16_step", parse, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
