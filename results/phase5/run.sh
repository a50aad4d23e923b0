#!/usr/bin/env bash
# Phase 5 on the privileged-state oracle, training seeds 0, 1, 2, at the settings of results/state (200 demo and
# 200 exploration episodes of 200 steps, the mlp dynamics 30 epochs, CEM planning rollouts in bf16):
#   sac S       SAC from reward alone, 100k env steps (rl), with its 1,000-step return
#   imagine S   the actor-critic in imagination (imagine): the 40k Phase 2 steps + 60k real steps = SAC's 100k
#   eval S      experts and BC with their 1,000-step returns (collect, bc, eval)
#   cem S       CEM/mlp's 1,000-step return on 2 planning episodes (1,000 steps of CEM at 500 x 50 x 5 cost ~0.3 s
#               an episode-action here); its 100-step success on 20 planning episodes is results/state's
#   report      the per-seed reports and the table across seeds
# Each part resumes; parts of different seeds can run side by side (one core each). From the repo root:
#   for s in 0 1 2; do bash results/phase5/run.sh sac $s; done > runs/phase5-sac.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
part=$1 seed=${2:-0}
run() { python vjepa_reacher.py "$1" --encoder state --episodes 200 --dyn-epochs 30 --dynamics mlp --plans cem/mlp \
  --set plan_dtype=bf16 --seed "$seed" --out "runs/phase5/seed_$seed" "${@:2}"; }
case $part in
  sac) run collect && run rl ;;
  imagine) run explore && run dynamics && run imagine ;;
  eval) run collect && run bc && run eval ;;
  cem) run explore && run dynamics && run plan --plan-episodes 2 --long-episodes 2 ;;
  report) python vjepa_reacher.py report --seeds 0 1 2 --out runs/phase5
          mkdir -p results/phase5
          for s in 0 1 2; do mkdir -p "results/phase5/seed_$s"
            cp runs/phase5/seed_$s/*.json runs/phase5/seed_$s/*.md runs/phase5/seed_$s/*.png "results/phase5/seed_$s/"
            cp runs/phase5/seed_$s/rl_curve.csv "results/phase5/seed_$s/" 2>/dev/null || true; done
          cp runs/phase5/seeds.* runs/phase5/report.md results/phase5/ ;;
  *) echo "usage: bash results/phase5/run.sh sac|imagine|eval|cem S, or report" >&2; exit 2 ;;
esac
