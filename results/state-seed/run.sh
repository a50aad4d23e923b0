#!/usr/bin/env bash
# The privileged-state oracle under the seed's recipe at the seed's own budget: 500 demo and 500 exploration
# episodes of 200 steps, BC 100 epochs, mlp 100 epochs and mlp_rollout5 150 (train_dynamics.py, multistep), then
# random shooting (100 steps) and CEM (200 steps) at the seed's sizes on 50 episodes each. Planning rollouts in
# bf16 (the plan_dtype knob) to fit this 2-core CPU. The resblock trains its 150 epochs (47k updates of 8.4M
# parameters) under bf16 autocast (the train_dtype knob; 2.1x a resblock epoch here, train_dtype_timing.json)
# for the k-step table; CEM on it at the seed's sizes is out of reach here. From the repo root; rerunning skips
# finished stages, models and planners:
#   bash results/state-seed/run.sh > runs/state-seed.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for stage in collect bc eval explore dynamics plan probe report; do
  python vjepa_reacher.py "$stage" --encoder state --recipe seed --episodes 500 --plan-episodes 50 \
    --dynamics mlp mlp_rollout5 --plans random/mlp cem/mlp --set plan_dtype=bf16 --out runs/state-seed
done
OMP_NUM_THREADS=2 python vjepa_reacher.py dynamics --encoder state --recipe seed --episodes 500 --plan-episodes 50 \
  --dynamics resblock --plans random/mlp cem/mlp --set plan_dtype=bf16 --set train_dtype=bf16 --out runs/state-seed
python vjepa_reacher.py report --out runs/state-seed
mkdir -p results/state-seed
cp runs/state-seed/*.json runs/state-seed/*.md runs/state-seed/*.png runs/state-seed/*.gif results/state-seed/
# Our dynamics recipe on the same data, for the k-step table in results/README.md:
[ -f results/state-seed/ours-on-seed-data/dynamics.json ] && exit 0
rm -rf runs/ours-on-seed-data && cp -r runs/state-seed runs/ours-on-seed-data && rm -f runs/ours-on-seed-data/plan.json
python vjepa_reacher.py dynamics --encoder state --recipe ours --episodes 500 --dynamics mlp --force \
  --out runs/ours-on-seed-data
mkdir -p results/state-seed/ours-on-seed-data
cp runs/ours-on-seed-data/dynamics.json runs/ours-on-seed-data/config.json results/state-seed/ours-on-seed-data/
