#!/usr/bin/env bash
# CEM / mlp on the first 10 planning episodes of run.sh's run folder (after its dynamics stage), once with fp32
# rollouts and once with bf16, the same model and goals, one core each: does bf16 change what CEM does? The two
# folders' plan.json and config.json are in cem-first10-fp32/ and cem-first10-bf16/. From the repo root:
#   bash results/state-seed-fp32/first10.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
A="--encoder state --recipe seed --episodes 500 --plan-episodes 10 --dynamics mlp mlp_rollout5 --long-episodes 0"
for d in ss-fp32-10 ss-bf16-10; do
  rm -rf runs/$d && cp -r runs/state-seed runs/$d && rm -f runs/$d/plan.json
  cp results/state-seed/rollout_cem.gif runs/$d/  # skips the GIF episode: it is not compared
done
python vjepa_reacher.py plan $A --plans cem/mlp --out runs/ss-fp32-10 &
python vjepa_reacher.py plan $A --plans cem/mlp --set plan_dtype=bf16 --out runs/ss-bf16-10 &
wait
for d in fp32 bf16; do
  mkdir -p results/state-seed-fp32/cem-first10-$d
  cp runs/ss-$d-10/plan.json runs/ss-$d-10/config.json results/state-seed-fp32/cem-first10-$d/
done
