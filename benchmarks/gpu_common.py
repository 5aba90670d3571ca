#!/usr/bin/env python
"""Shared pieces of benchmarks/gpu_check.sh's steps, and its small command-line helpers.

Library (imported by gpu_expert_lora.py, gpu_fed_olmoe.py, gpu_bf16_step.py):

* :func:`olmoe_config`: the OLMoE-1B-7B-0924 config from ``../shared/data/configs`` (or
  ``$FEDMOE_OLMOE_CONFIG``); where neither exists (the GPU machine gets the repository only), the same
  values embedded below;
* :class:`Device`: synchronisation, peak memory (CUDA: allocated; CPU: resident set), device name;
* :func:`matmul_peak`: the card's bf16 peak measured with a plain large matmul, in the same run;
* :class:`Result`: a step's JSON result, written after every phase (so a step killed by its timeout
  still leaves what it measured), ``ok`` false with the traceback when the step raises.

Command line (used by gpu_check.sh)::

    python benchmarks/gpu_common.py env OUT.json [--dry]        # versions, device, requirements
    python benchmarks/gpu_common.py junit XML OUT.json [--dry]  # step a: pytest's JUnit XML -> result
    python benchmarks/gpu_common.py ensure OUT.json STEP RC LOG # a result for a step that wrote none
    python benchmarks/gpu_common.py summary OUT_DIR [--dry]     # summary.json + summary.txt
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIPPED_OLMOE = ROOT.parent / "shared" / "data" / "configs" / "allenai--OLMoE-1B-7B-0924.json"

# allenai/OLMoE-1B-7B-0924 config.json (the shipped copy in ../shared/data/configs), for machines
# that have the repository only
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
}

# dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, by device name;
# MFU is reported against the peak measured in the same run, these only for reference
NOMINAL_BF16_TFLOPS = [("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                       ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("L40S", 362.1), ("B200", 2250.0)]

# distribution -> lowest version fedmoe accepts (pyproject.toml), None: any
REQUIREMENTS = {"torch": "2.4", "transformers": "5.23", "peft": "0.21", "pydantic": "2.7", "tokenizers": "0.22",
                "safetensors": "0.4", "rouge-score": "0.1.2", "PyYAML": "6", "typer": "0.12", "rich": "13",
                "matplotlib": "3.8", "numpy": "1.26", "pytest": "8"}


def setup_paths() -> None:
    """src/ (fedmoe need not be installed) and benchmarks/ on the import path; offline hub."""
    for p in (str(ROOT / "src"), str(HERE)):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def olmoe_config_dict() -> tuple[dict, str]:
    env = os.environ.get("FEDMOE_OLMOE_CONFIG")
    for p in ([Path(env)] if env else []) + [SHIPPED_OLMOE]:
        if p.is_file():
            return json.loads(p.read_text()), str(p)
    return dict(OLMOE_1B_7B), "embedded copy of allenai/OLMoE-1B-7B-0924 config.json (benchmarks/gpu_common.py)"


def olmoe_config():
    """(OlmoeConfig of OLMoE-1B-7B-0924, where it came from)."""
    from transformers import OlmoeConfig

    d, source = olmoe_config_dict()
    d = {k: v for k, v in d.items() if k not in ("architectures", "torch_dtype", "transformers_version", "model_type")}
    return OlmoeConfig(**d), source


def nominal_peak(name: str) -> float | None:
    for key, tflops in NOMINAL_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


class Device:
    def __init__(self, spec: str = "auto"):
        import torch

        self.torch = torch
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(spec)
        self.cuda = self.device.type == "cuda"

    @property
    def name(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return cpu_model()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        except OSError:
            pass

    def peak_gb(self) -> float:
        """CUDA: peak allocated since reset_peak; CPU: peak resident set since reset_peak."""
        if self.cuda:
            self.sync()
            return self.torch.cuda.max_memory_allocated(self.device) / 2**30
        return (_proc_status_kb("VmHWM") or 0) / 2**20

    def peak_reserved_gb(self) -> float | None:
        return self.torch.cuda.max_memory_reserved(self.device) / 2**30 if self.cuda else None

    def current_gb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device) / 2**30
        return (_proc_status_kb("VmRSS") or 0) / 2**20

    def total_gb(self) -> float | None:
        if self.cuda:
            return self.torch.cuda.get_device_properties(self.device).total_memory / 2**30
        return None

    def free_cache(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def info(self) -> dict:
        torch = self.torch
        out = {"device": str(self.device), "name": self.name, "torch": torch.__version__,
               "cuda_runtime": torch.version.cuda, "threads": torch.get_num_threads()}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            out.update(capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                       memory_gb=round(p.total_memory / 2**30, 1), nominal_bf16_tflops=nominal_peak(p.name))
        return out


def _proc_status_kb(field: str) -> int | None:
    from expert_lora import _proc_status_kb as read  # benchmarks/ is on sys.path for every step script

    return read(field)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_peak(dev: Device, dtype, n: int = 8192, warmup: int = 3, iters: int = 10) -> dict:
    """TFLOP/s of a plain n x n x n matmul (random inputs, mean of ``iters`` after ``warmup``)."""
    torch = dev.torch
    g = torch.Generator(device=dev.device).manual_seed(0)
    a = torch.randn(n, n, device=dev.device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev.device, dtype=dtype, generator=g)
    for _ in range(warmup):
        a @ b
    dev.sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    dev.sync()
    s = (time.perf_counter() - t) / iters
    del a, b
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": s, "tflops": 2 * n**3 / s / 1e12}


# ---------------------------------------------------------------------------------------- results
def parse_shape_args(doc: str, argv=None, extra=None):
    """The arguments of a step on a model shape: --dry (the CPU, a tiny shape), --device (cuda; cpu
    with --dry), --batch (4; 2 dry), --seq (256; 32 dry), --json; ``extra(parser)`` adds a step's own."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="on the CPU, a tiny 2-layer shape")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--json", required=True)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry else "cuda")
    args.batch = args.batch or (2 if args.dry else 4)
    args.seq = args.seq or (32 if args.dry else 256)
    return args


def run_script(step: str, parse, run, argv=None) -> int:
    """The main() of a step script: parse its arguments (``--dry``: one CPU thread), run it under a
    :class:`Result` that writes the step's JSON whatever happens, return the exit status."""
    import torch

    args = parse(argv)
    if args.dry:
        torch.set_num_threads(1)
    res = Result(args.json, step, dry=args.dry, argv=sys.argv)
    return res.run(lambda r: run(r, args))


class Result:
    """A step's result file: ``{"step", "ok", "complete", ..., "error"}``, rewritten by :meth:`save`."""

    def __init__(self, path: str | Path, step: str, **fields):
        self.path = Path(path)
        self.data = {"step": step, "ok": False, "complete": False, "started": _now(), **fields}
        self._t0 = time.perf_counter()
        self.save()

    def __setitem__(self, k, v):
        self.data[k] = v

    def __getitem__(self, k):
        return self.data[k]

    def setdefault(self, k, v):
        return self.data.setdefault(k, v)

    def get(self, k, default=None):
        return self.data.get(k, default)

    def save(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self._t0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)

    def run(self, fn) -> int:
        """Run ``fn(self)``; ok unless it raises (then the traceback is recorded). Returns an exit code.
        SIGTERM (gpu_check.sh's timeout) raises, so that what was measured is saved before the kill."""
        import signal

        def terminated(signum, frame):
            raise SystemExit(f"terminated by signal {signum} (the step's time budget ran out)")

        signal.signal(signal.SIGTERM, terminated)
        try:
            fn(self)
            self.data.setdefault("errors", [])
            self.data["ok"] = not self.data["errors"]
            rc = 0 if self.data["ok"] else 1
        except BaseException as e:  # noqa: BLE001 - recorded, the script goes on to the next step
            self.data.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
            self.data["traceback"] = traceback.format_exc()[-6000:]
            self.data["ok"] = False
            print(self.data["traceback"], file=sys.stderr, flush=True)
            rc = 1
        self.data["complete"] = True
        self.data["finished"] = _now()
        self.save()
        return rc


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _jsonable(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (torch.dtype, torch.device)):
            return str(o)
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def error_text(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 2000 else s[:2000] + " ..."


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


# ---------------------------------------------------------------------------------------- CLI
def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def _older(v: str, need: str) -> bool:
    def parts(s):
        out = []
        for p in s.split("+")[0].split("."):
            digits = "".join(ch for ch in p if ch.isdigit())
            if not digits:
                break
            out.append(int(digits))
        return out

    return parts(v) < parts(need)


def cmd_env(out: str, dry: bool) -> int:
    res = Result(out, "env", dry=dry)
    versions = {m: _version(m) for m in REQUIREMENTS}
    problems = []
    for m, need in REQUIREMENTS.items():
        v = versions[m]
        if v.startswith("missing"):
            problems.append(f"{m} {v}")
        elif need and _older(v, need):
            problems.append(f"{m} {v} is older than fedmoe's requirement >= {need} (pyproject.toml)")
    res["python"] = f"{sys.executable} ({platform.python_version()})"
    res["versions"] = versions
    # what the device has of the engines fedmoe's exports and quantization meet (not required: recorded,
    # so a session knows whether a serving check can run there without carrying them)
    res["optional"] = {m: _version(m) for m in ("bitsandbytes", "torchao", "vllm", "sglang", "flwr", "kernels")}
    res["problems"] = problems
    try:
        import torch

        res["cuda_available"] = torch.cuda.is_available()
        dev = Device("auto")
        res["device"] = dev.info()
    except Exception as e:  # noqa: BLE001
        res["cuda_available"] = False
        problems.append(f"torch: {error_text(e)}")
    if not dry and not res["cuda_available"]:
        problems.append("no CUDA device: the GPU check needs one (use --dry on a CPU)")
    res["host"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}
    res["ok"] = not problems
    res["complete"] = True
    res.save()
    print(json.dumps({k: res.data[k] for k in ("versions", "optional", "problems", "cuda_available")}, indent=1))
    return 0


def cmd_junit(xml: str, out: str, dry: bool) -> int:
    """pytest's JUnit XML -> step a's result: counts, each test's outcome, time and recorded properties."""
    import xml.etree.ElementTree as ET

    res = Result(out, "a_cuda_tests", dry=dry)
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
        res["errors"] = [f"no JUnit XML from pytest ({error_text(e)})"]
        res["complete"] = True
        res.save()
        return 1
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "")[:1500]
                if tag != "skipped" and el.text:
                    message = (message or "") + "\n" + el.text[-3000:]
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message, "properties": props})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    res["counts"] = counts
    res["tests"] = tests
    res["pytest_s"] = round(sum(t["seconds"] for t in tests), 2)
    head = [", ".join(f"{n} {o}" for o, n in counts.items() if n) + f" in {res['pytest_s']} s"]
    for t in tests:
        short = t["test"].split("::")[-1]
        if t["outcome"] in ("failed", "error"):
            first = (t["message"] or "").strip().splitlines()
            head.append(f"{t['outcome'].upper()} {short}: {first[0][:240] if first else ''}")
        if t["properties"]:
            head.append(f"{short}: " + ", ".join(f"{k}={v}" for k, v in t["properties"].items()))
    res["headline"] = head
    errors = [f"{t['test']}: {t['outcome']}" for t in tests if t["outcome"] in ("failed", "error")]
    if counts["passed"] == 0:
        errors.append("no test passed")
    if not dry and counts["skipped"]:
        errors.append(f"{counts['skipped']} test(s) skipped on the GPU machine: " +
                      "; ".join(f"{t['test']} ({t['message']})" for t in tests if t["outcome"] == "skipped"))
    res["errors"] = errors
    res["ok"] = not errors
    res["complete"] = True
    res.save()
    return 0 if res["ok"] else 1


def cmd_ensure(out: str, step: str, rc: int, log: str) -> int:
    """A step that ended without a complete result (killed, timed out, crashed): record that."""
    p = Path(out)
    data = {}
    if p.is_file():
        try:
            data = json.loads(p.read_text())
        except ValueError:
            data = {}
    if data.get("complete") and rc == 0:
        return 0
    tail = ""
    try:
        tail = Path(log).read_text(errors="replace")[-4000:]
    except OSError:
        pass
    why = {124: "timed out (its share of the time budget)", 137: "killed (SIGKILL: out of memory or timeout)"}
    data.setdefault("step", step)
    errs = data.setdefault("errors", [])
    if rc != 0:
        errs.append(f"exit status {rc}" + (f": {why[rc]}" if rc in why else ""))
    if not data.get("complete"):
        errs.append("the step ended before writing a complete result (what it measured so far is kept)")
    data.update(ok=False, complete=True, rc=rc, log_tail=tail)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1))
    return 0


STEPS = [("a_cuda_tests", "a. pytest -m cuda"), ("b_expert_lora", "b. expert LoRA step, ours vs PEFT{shape}"),
         ("c_federated_olmoe", "c. one round of FLAME and of FLEx{shape}"), ("d_bf16_step", "d. bf16 autocast vs fp32 step"),
         ("e_quantized_base", "e. nf4 / int8 base vs bf16{shape}"),
         ("f_memory_plan", "f. memory plan vs measured peak{shape}")]


def cmd_summary(out_dir: str, dry: bool) -> int:
    out = Path(out_dir)
    summary = {"dry": dry, "date": _now(), "steps": {}}
    env = out / "env.json"
    if env.is_file():
        e = json.loads(env.read_text())
        summary["env"] = e  # the whole environment record (env.json goes into logs.tar.gz)
    lines = [f"fedmoe GPU check ({'dry run on the CPU' if dry else 'GPU'}) - {summary['date']}"]
    if "env" in summary and summary["env"].get("device"):
        d = summary["env"]["device"]
        lines.append(f"device: {d.get('name')} ({d.get('device')}), torch {d.get('torch')}")
    for problem in summary.get("env", {}).get("problems") or []:
        lines.append(f"  environment: {problem}")
    for step, title in STEPS:
        title = title.format(shape=" (tiny shapes)" if dry else ", OLMoE-1B-7B shape")
        p = out / f"{step}.json"
        if not p.is_file():
            summary["steps"][step] = {"ok": False, "errors": ["no result file"]}
            lines.append(f"[FAIL] {title}: no result file")
            continue
        r = json.loads(p.read_text())
        entry = {"ok": bool(r.get("ok")), "wall_s": r.get("wall_s"), "errors": r.get("errors", [])[:10],
                 "headline": r.get("headline"), "result": r}  # the step's whole file (it goes into the tarball)
        summary["steps"][step] = entry
        lines.append(f"[{'ok' if entry['ok'] else 'FAIL'}] {title} ({r.get('pytest_s', r.get('wall_s', '?'))} s)")
        for h in (r.get("headline") or []):
            lines.append(f"    {h}")
        for e in entry["errors"]:
            lines.append(f"    error: {str(e).splitlines()[0][:300]}")
    summary["ok"] = all(s["ok"] for s in summary["steps"].values())
    lines.append("all steps succeeded" if summary["ok"] else "some steps FAILED (see the step's JSON and logs.tar.gz)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry" in argv
    argv = [a for a in argv if a != "--dry"]
    if not argv:
        print(__doc__)
        return 2
    cmd, *rest = argv
    if cmd == "env":
        return cmd_env(rest[0], dry)
    if cmd == "junit":
        return cmd_junit(rest[0], rest[1], dry)
    if cmd == "ensure":
        return cmd_ensure(rest[0], rest[1], int(rest[2]), rest[3])
    if cmd == "summary":
        return cmd_summary(rest[0], dry)
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
