#!/usr/bin/env bash
# fedmoe's GPU check (issue 17): one short script that a session with a GPU runs first, and that
# leaves its numbers behind. At most ~11.7 minutes on one H100/H200 (each step has a time budget and
# is killed past it); `--dry` runs the same steps on the CPU with tiny shapes in well under a minute
# (tests/test_gpu_check.py runs it, so the script does not rot while no GPU is at hand).
#
#   bash benchmarks/gpu_check.sh           # on the GPU machine (results under $OUT, else benchmarks/gpu_out/)
#   bash benchmarks/gpu_check.sh --dry     # on a CPU
#
# Steps (each writes <step>.json with "ok", continues when one fails, and records the failure):
#   a  a_cuda_tests       pytest -m cuda tests/test_cuda.py (dry: FEDMOE_TEST_DEVICE=cpu runs them on the CPU)
#   b  b_expert_lora      benchmarks/gpu_expert_lora.py: expert LoRA step on the OLMoE-1B-7B shape, ours vs
#                         PEFT at k = 8, 4, 2, 1; TFLOP/s and MFU against the measured bf16 matmul peak
#   c  c_federated_olmoe  benchmarks/gpu_fed_olmoe.py: one round of FLAME (k_i = 8, 4, 2, 1) and of FLEx
#                         (grafting included) on the OLMoE-1B-7B shape: peak memory per client, fits 80 GB
#   d  d_bf16_step        benchmarks/gpu_bf16_step.py: a bf16 autocast training step against fp32 (tiny model),
#                         with every matmul kernel that ran and its operand dtypes
#   e  e_quantized_base   benchmarks/gpu_quant.py: nf4 / int8 base (experts included) vs bf16 on the OLMoE-1B-7B
#                         shape: base bytes, peak memory, step time, loss; NF4 dequantization, fedmoe vs bitsandbytes
#   f  f_memory_plan      benchmarks/gpu_plan.py: `fedmoe plan` against the peak CUDA memory of train_local (bf16,
#                         nf4, fp32 + bf16 autocast, bf16 + activation checkpointing) on the OLMoE-1B-7B shape cut
#                         to 4 layers, and its option-scoring pass (eval.task: choice) against the evaluator's peak
# Then summary.json (the environment and every step's whole result) and summary.txt; the step files,
# logs, pytest's JUnit XML and the profile tables go into logs.tar.gz. $OUT ends with 3 files:
# summary.json, summary.txt, logs.tar.gz (the device machine returns at most 8).
#
# Environment: PYTHON (default: .venv/bin/python when it sees a GPU (or with --dry), else python3);
# GPU_CHECK_TIMEOUT_A/B/C/D/E/F (seconds per step; on the GPU 120/130/170/40/120/90, i.e. 670 s + 5 s grace
# each; 120 each with --dry); a step past its budget gets SIGTERM, saves what it measured, and is killed 5 s later;
# GPU_CHECK_TESTS (default tests/test_cuda.py); KEEP_WORK=1 keeps the work folder beside the tarball;
# FEDMOE_OLMOE_CONFIG (the OLMoE config.json; default ../shared/data/configs/..., else an embedded copy).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/benchmarks/gpu_out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$OUT_DIR/work"
STEPS=(a_cuda_tests b_expert_lora c_federated_olmoe d_bf16_step e_quantized_base f_memory_plan)
for s in "${STEPS[@]}" env summary; do rm -f "$OUT_DIR/$s.json"; done
rm -rf "$WORK" "$OUT_DIR/summary.txt" "$OUT_DIR/logs.tar.gz"
mkdir -p "$WORK"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]] && { [[ $DRY == 1 ]] || "$ROOT/.venv/bin/python" -c \
    'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi

export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # deterministic cuBLAS (test_cuda's resume test)
DRYFLAG=()
if [[ $DRY == 1 ]]; then
  DRYFLAG=(--dry)
  export FEDMOE_TEST_DEVICE="${FEDMOE_TEST_DEVICE:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TA="${GPU_CHECK_TIMEOUT_A:-120}" TB="${GPU_CHECK_TIMEOUT_B:-120}" TC="${GPU_CHECK_TIMEOUT_C:-120}" TD="${GPU_CHECK_TIMEOUT_D:-120}"
  TE="${GPU_CHECK_TIMEOUT_E:-120}" TF="${GPU_CHECK_TIMEOUT_F:-120}"
else
  TA="${GPU_CHECK_TIMEOUT_A:-120}" TB="${GPU_CHECK_TIMEOUT_B:-130}" TC="${GPU_CHECK_TIMEOUT_C:-170}" TD="${GPU_CHECK_TIMEOUT_D:-40}"
  TE="${GPU_CHECK_TIMEOUT_E:-120}" TF="${GPU_CHECK_TIMEOUT_F:-90}"
fi
TESTS="${GPU_CHECK_TESTS:-tests/test_cuda.py}"

echo "gpu_check: $([[ $DRY == 1 ]] && echo 'dry run (CPU)' || echo GPU) - python $PY - out $OUT_DIR"
START=$SECONDS

with_timeout() {  # seconds cmd... (no timeout command: run without one)
  local budget=$1; shift
  if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=5 "$budget" "$@"
  else
    "$@"
  fi
}

RC=0
run_step() {  # name budget cmd...   runs one step, its log in work/<name>.log; RC = its exit status
  local name=$1 budget=$2; shift 2
  local log="$WORK/$name.log"
  echo "=== $name (budget ${budget} s, at $((SECONDS - START)) s) ==="
  RC=0
  with_timeout "$budget" "$@" >"$log" 2>&1 || RC=$?
  tail -n 30 "$log" || true
  echo "=== $name: exit status $RC after $((SECONDS - START)) s ==="
}

ensure() {  # name: a result file for a step that ended without writing a complete one
  "$PY" "$HERE/gpu_common.py" ensure "$OUT_DIR/$1.json" "$1" "$RC" "$WORK/$1.log" || true
}

"$PY" "$HERE/gpu_common.py" env "$OUT_DIR/env.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"} >"$WORK/env.log" 2>&1 || true
if [[ $DRY == 0 ]]; then nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1 || true; fi

# a. the CUDA test cases
run_step a_cuda_tests "$TA" "$PY" -m pytest -m cuda $TESTS -p no:cacheprovider -q -rA \
  --junitxml="$WORK/a_junit.xml"
"$PY" "$HERE/gpu_common.py" junit "$WORK/a_junit.xml" "$OUT_DIR/a_cuda_tests.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"} \
  >>"$WORK/a_cuda_tests.log" 2>&1 || true
ensure a_cuda_tests

# b. expert LoRA step on the OLMoE-1B-7B shape, ours vs PEFT, MFU
run_step b_expert_lora "$TB" "$PY" "$HERE/gpu_expert_lora.py" ${DRYFLAG[@]+"${DRYFLAG[@]}"} --json "$OUT_DIR/b_expert_lora.json" \
  --work "$WORK" --time-budget $((TB > 80 ? TB - 40 : TB / 2))
ensure b_expert_lora

# c. one round of FLAME and of FLEx on the OLMoE-1B-7B shape
run_step c_federated_olmoe "$TC" "$PY" "$HERE/gpu_fed_olmoe.py" ${DRYFLAG[@]+"${DRYFLAG[@]}"} --json "$OUT_DIR/c_federated_olmoe.json" \
  --work "$WORK/c" --time-budget $((TC > 120 ? TC - 75 : TC / 2))
ensure c_federated_olmoe

# d. bf16 autocast step vs fp32 on the tiny model
run_step d_bf16_step "$TD" "$PY" "$HERE/gpu_bf16_step.py" ${DRYFLAG[@]+"${DRYFLAG[@]}"} --json "$OUT_DIR/d_bf16_step.json"
ensure d_bf16_step

# e. a quantized base (nf4, int8) against bf16 on the OLMoE-1B-7B shape
run_step e_quantized_base "$TE" "$PY" "$HERE/gpu_quant.py" ${DRYFLAG[@]+"${DRYFLAG[@]}"} --json "$OUT_DIR/e_quantized_base.json"
ensure e_quantized_base

# f. the memory plan against the peak memory of fedmoe's training on the device
run_step f_memory_plan "$TF" "$PY" "$HERE/gpu_plan.py" ${DRYFLAG[@]+"${DRYFLAG[@]}"} --json "$OUT_DIR/f_memory_plan.json"
ensure f_memory_plan

echo "=== summary (after $((SECONDS - START)) s) ==="
"$PY" "$HERE/gpu_common.py" summary "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"} || true
STEP_FILES=()
for s in env "${STEPS[@]}"; do [[ -f "$OUT_DIR/$s.json" ]] && STEP_FILES+=("$s.json"); done
if tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' work \
    ${STEP_FILES[@]+"${STEP_FILES[@]}"}; then
  for f in ${STEP_FILES[@]+"${STEP_FILES[@]}"}; do rm -f "$OUT_DIR/$f"; done  # in summary.json and the tarball
else
  echo "gpu_check: could not write logs.tar.gz" >&2
fi
if [[ "${KEEP_WORK:-0}" != 1 ]]; then rm -rf "$WORK"; fi
echo "gpu_check: done in $((SECONDS - START)) s; results in $OUT_DIR"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("ok") else 1)' "$OUT_DIR/summary.json"
