#!/usr/bin/env python
"""Step e of benchmarks/gpu_check.sh: a quantized base (``model.quantization``) on the device, side by
side with the bf16 base, on the OLMoE-1B-7B shape (all 16 layers, 64 experts, k = 8).

For each scheme (none, nf4, int8) in turn, on the device: the bf16 model is built, quantized (the
fused experts and the decoder's linears), given expert and attention LoRA (r = 8), and runs a few
training steps (AdamW, batch 4 x 256 tokens). Recorded per scheme: the bytes the base holds, the
device's peak allocated memory during the steps (CUDA: ``max_memory_allocated``; the dry run on the
CPU counts live tensors as ``fedmoe.plan`` does), the step time, and the loss (finite, and near the
bf16 model's on the same batch). The ratios to bf16 are the headline. First, one layer's NF4 expert
stack dequantized expert by expert by fedmoe and by bitsandbytes (``dequantize_4bit``), timed side
by side, with the largest difference of the two results.

    python benchmarks/gpu_quant.py --json out.json          # GPU
    python benchmarks/gpu_quant.py --dry --json out.json    # CPU, 2 layers of a small shape
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

common.setup_paths()

import torch  # noqa: E402

SCHEMES = ("none", "nf4", "int8")


def build(cfg_hf, scheme: str, device: str, dtype):
    from transformers import AutoModelForCausalLM

    from fedmoe.moe import MoEModel
    from fedmoe.moe.quant import quantize_model

    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg_hf, dtype=dtype)
    mm = MoEModel(hf)
    quantize_model(mm, scheme)
    torch.manual_seed(1)
    mm.add_expert_lora(8, 16.0)
    mm.add_attention_lora(8, 16.0)
    return mm


def dequantize_vs_bitsandbytes(cfg_hf, dev, dtype, repeats: int) -> dict:
    """One MoE layer's NF4 ``gate_up_proj`` stack, dequantized one expert at a time as the expert
    forward does: fedmoe's plain PyTorch path (``QuantizedWeight[e]`` with ``USE_BITSANDBYTES`` off: a
    byte-table lookup) against bitsandbytes' ``dequantize_4bit`` of the same expert (its CUDA kernel on
    a GPU) and fedmoe's codes through that kernel (what a run does where bitsandbytes is installed),
    each the median of ``repeats`` passes over all experts; and whether the plain path and
    bitsandbytes give the same tensor (their codes are equal: tests/test_quant.py)."""
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    from fedmoe.moe.quant import QuantizedWeight

    E, I2, H = cfg_hf.num_experts, 2 * cfg_hf.intermediate_size, cfg_hf.hidden_size
    g = torch.Generator().manual_seed(3)
    stack = (torch.randn(E, I2, H, generator=g) * 0.02).to(dtype).to(dev.device)
    ours = QuantizedWeight(stack, "nf4")
    theirs = [bnbf.quantize_4bit(stack[e].contiguous(), blocksize=64, quant_type="nf4") for e in range(E)]

    def timed(fn) -> float:
        out = []
        for _ in range(repeats):
            dev.sync()
            t = time.perf_counter()
            for e in range(E):
                fn(e)
            dev.sync()
            out.append(time.perf_counter() - t)
        return sorted(out)[len(out) // 2]

    from fedmoe.moe import quant

    quant.USE_BITSANDBYTES = False  # fedmoe's own plain PyTorch path
    try:
        t_ours = timed(lambda e: ours[e])
        plain = [ours[e] for e in range(E)]
    finally:
        quant.USE_BITSANDBYTES = True
    t_bnb = timed(lambda e: bnbf.dequantize_4bit(theirs[e][0], theirs[e][1]))
    t_run = timed(lambda e: ours[e])  # what a run does: fedmoe's codes through bitsandbytes' kernel
    worst = max(float((plain[e].float() - bnbf.dequantize_4bit(*theirs[e]).float().reshape(I2, H)).abs().max())
                for e in range(E))
    gb = E * I2 * H * torch.empty((), dtype=dtype).element_size() / 1e9
    return {"bitsandbytes": bitsandbytes.__version__, "experts": E, "expert_shape": [I2, H],
            "fedmoe_s": t_ours, "bitsandbytes_s": t_bnb, "fedmoe_over_bitsandbytes": t_ours / t_bnb,
            "fedmoe_through_bitsandbytes_s": t_run,
            "fedmoe_GBps_written": gb / t_ours, "bitsandbytes_GBps_written": gb / t_bnb,
            "max_abs_diff": worst}


def run(res: common.Result, args) -> None:
    from fedmoe.moe.loss import labelled_token_loss
    from fedmoe.moe.quant import stored_bytes
    from fedmoe.plan import _LiveBytes

    dev = common.Device(args.device)
    res["device"] = dev.info()
    res["errors"] = []
    if args.dry:
        from fedmoe.moe.tiny import tiny_config

        cfg_hf, source = tiny_config("olmoe", hidden_size=64, intermediate_size=32, vocab_size=256, num_layers=2), "tiny"
    else:
        cfg_hf, source = common.olmoe_config()
    res["config"] = source
    dtype = torch.float32 if args.dry else torch.bfloat16
    try:
        res["dequantize_vs_bitsandbytes"] = dequantize_vs_bitsandbytes(cfg_hf, dev, dtype, repeats=5 if args.dry else 50)
    except Exception as e:  # noqa: BLE001 - a comparison, recorded (bitsandbytes may lack this CUDA's binary)
        res["dequantize_vs_bitsandbytes"] = {"error": common.error_text(e)}
    res.save()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg_hf.vocab_size, (args.batch, args.seq), generator=g).to(dev.device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    res["schemes"] = {}
    for scheme in SCHEMES:
        dev.free_cache()
        mm = build(cfg_hf, scheme, str(dev.device), dtype)
        held = stored_bytes(mm.model)
        opt = torch.optim.AdamW(list(mm.trainable_parameters().values()), lr=1e-4)
        live = _LiveBytes()
        live.exclude([*mm.model.parameters(), *mm.model.buffers()])
        dev.reset_peak()
        losses, times = [], []
        with live if not dev.cuda else _null():
            for _ in range(args.steps):
                dev.sync()
                t = time.perf_counter()
                loss, n, _ = labelled_token_loss(mm.model, ids, mask, labels)
                (loss / n).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dev.sync()
                times.append(time.perf_counter() - t)
                losses.append(float(loss.detach()) / n)
        peak = dev.peak_gb() * 2**30 if dev.cuda else held + live.peak
        res["schemes"][scheme] = {"base_bytes": held, "peak_bytes": int(peak), "step_s": min(times[1:] or times),
                                  "first_loss": losses[0]}
        if not all(math.isfinite(v) for v in losses):
            res["errors"].append(f"{scheme}: non-finite loss {losses}")
        del mm, opt
        res.save()
    ref = res["schemes"]["none"]
    res["headline"] = [f"{s}: base {v['base_bytes'] / 2**30:.2f} GiB ({v['base_bytes'] / ref['base_bytes']:.2f}x), "
                       f"peak {v['peak_bytes'] / 2**30:.2f} GiB ({v['peak_bytes'] / ref['peak_bytes']:.2f}x), "
                       f"step {v['step_s']:.3f} s ({v['step_s'] / ref['step_s']:.2f}x), loss {v['first_loss']:.4f}"
                       for s, v in res["schemes"].items()]
    for s, v in res["schemes"].items():
        if s != "none" and abs(v["first_loss"] - ref["first_loss"]) > 0.1 * abs(ref["first_loss"]):
            res["errors"].append(f"{s}: first loss {v['first_loss']:.4f} is not near bf16's {ref['first_loss']:.4f}")
    dq = res["dequantize_vs_bitsandbytes"]
    res["headline"].append(
        f"NF4 dequantization of {dq['experts']} experts one at a time: fedmoe's plain path {dq['fedmoe_s'] * 1e3:.2f} "
        f"ms, bitsandbytes {dq['bitsandbytes_s'] * 1e3:.2f} ms ({dq['fedmoe_over_bitsandbytes']:.2f}x), fedmoe through "
        f"bitsandbytes {dq['fedmoe_through_bitsandbytes_s'] * 1e3:.2f} ms; max |diff| {dq['max_abs_diff']:.1e}" if "error" not in dq else f"bitsandbytes comparison: {dq['error']}")
    print("\n".join(res["headline"]), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse(argv=None):
    return common.parse_shape_args(__doc__, argv, lambda ap: ap.add_argument("--steps", type=int, default=2))


def main(argv=None) -> int:
    return common.run_script("e_quantized_base", parse, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
