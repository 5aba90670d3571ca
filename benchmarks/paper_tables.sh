#!/usr/bin/env bash
# The FLAME and FLEx experiment layouts on the built-in model, at a scale a 2-core CPU finishes in
# about an hour: two lanes of one thread each (FLAME | FLEx), every sweep resumable (run it again to
# continue). The full-scale versions are the configs themselves: `fedmoe run configs/<name>.yaml`.
#
# What is reduced, against the configs (which follow the papers):
#   FLAME: 20 local steps per round instead of 1 epoch (~190 steps); lr 1e-3 instead of 1.5e-4 (an
#          11.6M-parameter model barely moves at 1.5e-4 in 40 steps); ROUGE-L on 30 test examples
#          per client, 48 new tokens.
#   FLEx:  10 rounds instead of 20 (5 steps x batch 4 each, as the paper); lr 5e-4 instead of 4e-5
#          (same reason); 30 test examples per client (ROUGE-L, 64 new tokens instead of 256) and 40 for
#          the per-round loss; MMLU "quick" subset capped at 20 questions per subject (200).
#   FLEx Dirichlet (10 clients): 4 rounds; 16 test examples per client for the loss, 12 for ROUGE-L;
#          MMLU capped at 5 questions per subject (50), since each of FLEx's 10 personalised models
#          is evaluated twice (zero-shot and final).
#   Both:  greedy decoding that never repeats a 3-gram (eval.no_repeat_ngram_size=3, the default run's
#          setting) instead of plain greedy: the 11.6M model otherwise loops, and the loops decide ROUGE-L.
# Results land in runs/<name>-cpu/sweep_report.md. `dirichlet A` runs the FLEx Dirichlet sweep for one α
# (two lanes: `dirichlet 0.5` and `dirichlet 1.0`); `dirichlet all` then writes its whole report.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMOE=${FEDMOE:-.venv/bin/fedmoe}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

flame() {
  "$FEDMOE" run configs/flame-table2.yaml --quiet --set name=flame-table2-cpu \
    --set train.max_steps=20 --set train.lr=1e-3 \
    --set eval.max_examples=30 --set eval.max_new_tokens=48 --set eval.no_repeat_ngram_size=3
  "$FEDMOE" run configs/flame-ablations.yaml --quiet --set name=flame-ablations-cpu \
    --set train.max_steps=20 --set train.lr=1e-3 \
    --set eval.max_examples=30 --set eval.max_new_tokens=48 --set eval.no_repeat_ngram_size=3
}

flex() {
  local common=(--quiet --set train.lr=5e-4 --set federation.rounds=10 --set data.max_test_per_client=40
                --set eval.max_examples=30 --set eval.max_new_tokens=64
                --set eval.mmlu_max_per_subject=20 --set eval.no_repeat_ngram_size=3)
  "$FEDMOE" run configs/flex-pathological.yaml --set name=flex-pathological-cpu "${common[@]}"
  "$FEDMOE" run configs/flex-ablations.yaml --set name=flex-ablations-cpu "${common[@]}"
}

dirichlet() {
  local alpha=$1 sweep=()
  [ "$alpha" = all ] || sweep=(--set "sweep.data.partition.alpha=[$alpha]")
  "$FEDMOE" run configs/flex-dirichlet.yaml --quiet --set name=flex-dirichlet-cpu "${sweep[@]}" \
    --set train.lr=5e-4 --set federation.rounds=4 --set data.max_test_per_client=16 \
    --set eval.max_examples=12 --set eval.max_new_tokens=64 --set eval.mmlu_max_per_subject=5 \
    --set eval.no_repeat_ngram_size=3
}

case "${1:-all}" in
  flame) flame ;;
  flex) flex ;;
  dirichlet) dirichlet "${2:?usage: $0 dirichlet 0.5|1.0|all}" ;;
  all) flame > runs/paper_tables_flame.log 2>&1 &
       flex > runs/paper_tables_flex.log 2>&1 &
       wait ;;
  *) echo "usage: $0 [flame|flex|dirichlet ALPHA|all]" >&2; exit 2 ;;
esac
