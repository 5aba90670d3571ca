"""benchmarks/gpu_check.sh --dry: the GPU check's CPU mode runs every step to success, so the script a
GPU session runs first (issue 17) does not rot while no GPU is at hand (~45 s on a 2-core CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["a_cuda_tests", "b_expert_lora", "c_federated_olmoe", "d_bf16_step", "e_quantized_base", "f_memory_plan"]
# at most 8 files come back from the GPU machine's $OUT: the step files travel in summary.json and the tarball
EXPECTED_FILES = ["logs.tar.gz", "summary.json", "summary.txt"]


def test_gpu_check_dry_run_succeeds_in_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "FEDMOE_TEST_DEVICE": "cpu"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == EXPECTED_FILES, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["dry"] and set(summary["steps"]) == set(STEPS)
    results = {s: summary["steps"][s]["result"] for s in STEPS}
    for step, data in results.items():
        assert data["complete"] and data["ok"] and not data.get("errors"), (step, data.get("errors"), out)
    import tarfile

    with tarfile.open(tmp_path / "logs.tar.gz") as tar:  # the step files themselves, as they were written
        names = set(tar.getnames())
        assert {f"{s}.json" for s in [*STEPS, "env"]} <= names, names
        assert json.load(tar.extractfile("f_memory_plan.json")) == results["f_memory_plan"]
    assert r.returncode == 0, out

    a = results["a_cuda_tests"]  # the CUDA cases ran (on the CPU), none failed
    assert a["counts"]["passed"] >= 8 and a["counts"]["failed"] == a["counts"]["error"] == 0
    b = results["b_expert_lora"]  # ours and PEFT timed at every k, with FLOPs and MFU
    assert [row["k"] for row in b["rows"]] == [8, 4, 2, 1]
    for row in b["rows"]:
        for m in ("ours", "peft"):
            assert len(row[f"{m}_times_s"]) == 2 and row[f"{m}_mfu"] > 0 and row[f"{m}_peak_gb"] > 0
    assert b["setup"]["ours_path"] == "grouped_mm" and b["peak"]["tflops"] > 0
    assert set(b["goals"]) >= {"mfu_at_kmax_ge_0.40", "k1_within_1.1x_of_flops_ratio", "faster_than_peft_at_every_k"}
    assert b["extra_ranks"][0]["rank"] == 20 and b["moe_layer"]["rows"] and set(b["profile"]["by_k"]) == {"8", "1"}
    assert all(r["gather_over_index_add"] > 0 for r in b["moe_layer"]["rows"])  # both ways back to the tokens timed
    c = results["c_federated_olmoe"]  # a round of each method, every client measured
    for method in ("flame", "flex"):
        clients = c["runs"][method]["clients"]
        assert len(clients) == 4 and all(cl["train_peak_gb"] > 0 and cl["steps"] == 1 for cl in clients)
    assert [cl["k"] for cl in c["runs"]["flame"]["clients"]] == [2, 1, 1, 1]  # tiny-olmoe: top-2, budgets 2, 1, 1, 1
    assert all(cl["setup_s"] > 0 and cl["calibration_tokens"] > 0 for cl in c["runs"]["flex"]["clients"])
    d = results["d_bf16_step"]  # the two losses and their difference
    assert d["loss_abs_diff"] == abs(d["bf16_autocast"]["loss"] - d["fp32"]["loss"])
    assert d["loss_rel_diff"] <= d["loss_rel_tolerance"]
    assert d["bf16_autocast"]["matmul_kernels"] and all("bfloat16" in k for k in d["bf16_autocast"]["matmul_kernels"])
    assert all("float32" in k for k in d["autocast_old_path"]["matmul_kernels"] if k.startswith("_grouped_mm"))
    e = results["e_quantized_base"]  # fedmoe's NF4 dequantization = bitsandbytes', timed beside it
    assert e["dequantize_vs_bitsandbytes"]["max_abs_diff"] == 0.0 and e["dequantize_vs_bitsandbytes"]["fedmoe_s"] > 0
    f = results["f_memory_plan"]  # the plan against train_local's tensors, every case within the tolerance
    assert set(f["cases"]) == {"bf16", "nf4", "fp32-autocast", "bf16-checkpointed"}
    assert all(1 - f["tolerance"] <= c["plan_over_measured"] <= 1 + f["over_tolerance"] for c in f["cases"].values())
    # and the option-scoring pass against the evaluator's tensors (on the CPU the same count: within 1%)
    assert f["choice"]["plan_over_measured"] == pytest.approx(1.0, abs=0.01) and f["choice"]["measured"] > 0
    assert "all steps succeeded" in (tmp_path / "summary.txt").read_text()
