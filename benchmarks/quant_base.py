"""A quantized base on the OLMoE-1B-7B shape (bf16, as its config says) with fewer layers, side by side
in one run: the bytes the frozen base holds, the peak resident memory (each scheme in a fresh
process: VmHWM) of building it — the full-precision model is built, then quantized slab by slab — and
of two training steps after that, and the step time (forward + backward + AdamW over expert and
attention LoRA, r = 8) with every scheme's model built in one process and the steps interleaved, so
the ratios share the machine's state.

    python benchmarks/quant_base.py --layers 1 --steps 3 [--schemes none nf4 int8 nf4-plain]

``nf4-plain``: NF4 dequantized by fedmoe's plain PyTorch path even where bitsandbytes is installed
(``fedmoe.moe.quant.USE_BITSANDBYTES = False``), beside ``nf4`` through bitsandbytes' kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

OLMOE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs" / "allenai--OLMoE-1B-7B-0924.json"


def use_scheme(scheme: str) -> str:
    """The quantization scheme of a benchmark scheme name, with the dequantization path it asks for set."""
    from fedmoe.moe import quant

    quant.USE_BITSANDBYTES = not scheme.endswith("-plain")
    return scheme.removesuffix("-plain")


def build(layers: int, scheme: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from fedmoe.moe import MoEModel
    from fedmoe.moe.model import load_model_config
    from fedmoe.moe.quant import quantize_model

    scheme = use_scheme(scheme)

    config = load_model_config(str(OLMOE_CONFIG))
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    mm = MoEModel(AutoModelForCausalLM.from_config(config))
    quantize_model(mm, scheme)
    torch.manual_seed(1)
    mm.add_expert_lora(8, 16.0)
    mm.add_attention_lora(8, 16.0)
    return mm


def batch(mm, size: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mm.config.vocab_size, (size, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return ids, torch.ones_like(ids), labels


def step(mm, opt, ids, mask, labels) -> None:
    from fedmoe.moe.loss import labelled_token_loss

    loss, n, _ = labelled_token_loss(mm.model, ids, mask, labels)
    (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def memory_child(args) -> None:
    """One scheme in this process: the base's stored bytes and the peak RSS of building it and stepping."""
    from fedmoe.moe.quant import stored_bytes

    def hwm() -> int:
        return 1024 * next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                            if line.startswith("VmHWM:"))

    mm = build(args.layers, args.child)
    held = stored_bytes(mm.model)
    build_peak = hwm()
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the full-precision build freed (glibc keeps it)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here on: the training steps
    from fedmoe.plan import _LiveBytes

    opt = torch.optim.AdamW(list(mm.trainable_parameters().values()), lr=1e-4)
    ids, mask, labels = batch(mm, args.batch, args.seq)
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])  # the base and adapters are in held
    use_scheme(args.child)
    with live:  # every tensor the steps create, while it lives (fedmoe.plan's count, on real tensors)
        for _ in range(2):
            step(mm, opt, ids, mask, labels)
    print(json.dumps({"scheme": args.child, "stored_bytes": held, "build_peak": build_peak, "step_peak": hwm(),
                      "tensor_peak": held + live.peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--schemes", nargs="+", default=["none", "nf4", "int8"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    mem = {}
    for s in args.schemes:
        out = subprocess.run([sys.executable, __file__, "--child", s, "--layers", str(args.layers), "--batch",
                              str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        mem[s] = json.loads(out.stdout.strip().splitlines()[-1])
    models = {s: build(args.layers, s) for s in args.schemes}
    opts = {s: torch.optim.AdamW(list(m.trainable_parameters().values()), lr=1e-4) for s, m in models.items()}
    data = batch(next(iter(models.values())), args.batch, args.seq)
    for s in args.schemes:  # warm-up
        use_scheme(s)
        step(models[s], opts[s], *data)
    times = {s: 0.0 for s in args.schemes}
    for _ in range(args.steps):
        for s in args.schemes:
            use_scheme(s)
            t = time.perf_counter()
            step(models[s], opts[s], *data)
            times[s] += time.perf_counter() - t
    ref = args.schemes[0]
    print(f"## Quantized base, OLMoE-1B-7B shape with {args.layers} layer(s)")
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {args.threads} thread(s), batch "
          f"{args.batch} x {args.seq}, {args.steps} interleaved steps: `python benchmarks/quant_base.py --layers "
          f"{args.layers} --steps {args.steps}`\n")
    print(f"| scheme | base held | / {ref} | tensors at the steps' peak | / {ref} | peak RSS, build | peak RSS, "
          f"steps | step time | / {ref} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.schemes:
        m, r = mem[s], mem[ref]
        print(f"| {s} | {m['stored_bytes'] / 2**30:.2f} GiB | {m['stored_bytes'] / r['stored_bytes']:.3f} | "
              f"{m['tensor_peak'] / 2**30:.2f} GiB | {m['tensor_peak'] / r['tensor_peak']:.3f} | "
              f"{m['build_peak'] / 2**30:.2f} GiB | {m['step_peak'] / 2**30:.2f} GiB | "
              f"{times[s] / args.steps:.2f} s | {times[s] / times[ref]:.2f} |")


if __name__ == "__main__":
    main()
