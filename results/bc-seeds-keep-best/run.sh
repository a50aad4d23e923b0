#!/usr/bin/env bash
# Quick BC on the oracle over training seeds 0-9, twice, with one change between the runs: the weights kept
# (final epoch, ours and the seed's; or best held-out MSE, bc_keep=best). The same 100 episodes, epochs and
# evaluation episodes in both. The first re-makes results/bc-seeds/ with this commit's code. From the repo root:
#   bash results/bc-seeds-keep-best/run.sh > runs/bc-seeds-keep-best.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
seeds="0 1 2 3 4 5 6 7 8 9"
for run in bc-seeds bc-seeds-keep-best; do
  keep=final; [ "$run" = bc-seeds-keep-best ] && keep=best
  for stage in collect bc eval report; do
    python vjepa_reacher.py "$stage" --quick --encoder state --set bc_keep=$keep --seeds $seeds --out runs/$run
  done
done
for run in bc-seeds bc-seeds-keep-best; do
  mkdir -p results/$run
  (cd runs/$run && cp --parents *.json *.md seed_*/*.json seed_*/*.md seed_*/*.png ../../results/$run/)
done
