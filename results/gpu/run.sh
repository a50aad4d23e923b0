#!/usr/bin/env bash
# The device run, prepared and tried on the CPU, in four parts, one device call each: `bench` (bench.py on the GPU),
# `compile` (bench.py's torch.compile measurement alone), `phase1` (collect, bc, eval, rl) and `phase2` (explore,
# dynamics, plan, probe, report) of `all` with ViT-L's architecture at random weights (a save_pretrained folder: V-JEPA
# 2's compute without a download) on 32 episodes, each stage's time in timing.json. Each part stops itself at 450 s
# (PART_LIMIT), under the 600 s a call may take; bench.json is written after every measurement, and a stage saves its
# outputs as it ends, so a part cut short keeps what it finished and a rerun of it resumes.
# The model and the run folder live in runs/gpu/, which a warm machine keeps between calls; $OUT gets only results
# (JSON, markdown, plots, GIFs), never weights or data. On a lent GPU, from the repo root, with the kit carried
# (`carry: [".whl", ".gl"]`, see shared/gpu/README.md), one call per part, in order:
#   source .gl/on-device.sh && bash results/gpu/run.sh $OUT bench      (then compile, phase1, phase2)
# then copy $OUT/*-GPU/ to results/. Tried here, each part in turn, as (a busy 2-core CPU needs more than 450 s):
#   DEVICE=cpu ENCODER=tiny QUICK=1 PART_LIMIT=1200 bash results/gpu/run.sh runs/gpu-dry PART
set -euo pipefail
out=${1:?usage: run.sh OUT bench|compile|phase1|phase2} part=${2:?usage: run.sh OUT bench|compile|phase1|phase2}
device=${DEVICE:-cuda} episodes=${EPISODES:-32} encoder=${ENCODER:-vitl} quick=${QUICK:+--quick}
limit=${PART_LIMIT:-450} work=runs/gpu
# the GPU's model name, e.g. h100 from "NVIDIA H100 80GB HBM3" (not its last word, hbm3); cpu without CUDA
gpu=$(python3 -c "import re, torch; print((re.findall(r'\b[A-Z]*[0-9]+[A-Z]?\b', torch.cuda.get_device_name())
+ ['gpu'])[0].lower() if torch.cuda.is_available() else 'cpu')")
stages() {  # each stage in turn, until the part's time is spent; the first failure ends the part
  for stage in "$@"; do
    left=$((end - SECONDS))
    [ "$left" -gt 0 ] || { echo "run.sh: $part's $limit s were spent before $stage" >&2; return 124; }
    timeout --foreground "$left" python3 vjepa_reacher.py "$stage" --encoder "$encoder" --device "$device" $quick \
      --episodes "$episodes" --eval-episodes "$episodes" --plan-episodes 8 --rl-steps 4000 --out "$work/all-$gpu" \
      || return
  done
}
end=$((SECONDS + limit)) status=0
mkdir -p "$out" "$work"
case $part in
  bench) timeout --foreground "$limit" python3 bench.py --device "$device" $quick --out "$out/bench-$gpu" ;;
  compile) timeout --foreground "$limit" python3 bench.py --device "$device" $quick --compile --only compile \
             --out "$out/compile-$gpu" ;;
  phase1|phase2)
    if [ "$encoder" = vitl ]; then
      [ -f "$work/vitl-random/config.json" ] || python3 -c "import sys, vjepa_reacher as vr
from transformers import VJEPA2Config
vr.random_vjepa2(VJEPA2Config(crop_size=256, frames_per_clip=64), 0).save_pretrained(sys.argv[1])" "$work/vitl-random"
      encoder="$work/vitl-random"
    fi
    if [ "$part" = phase1 ]; then stages collect bc eval rl || status=$?
    else stages explore dynamics plan probe report || status=$?; fi
    dest=$(realpath -m "$out/all-$gpu") && mkdir -p "$dest"  # results only: no weights, no data, no shards
    (cd "$work/all-$gpu" && find . -maxdepth 1 -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o \
      -name '*.gif' \) -exec cp -t "$dest" {} +)
    python3 -c "import json, sys; t = json.load(open(sys.argv[1])); print('stage seconds:', t, 'total', \
sum(t.values()))" "$work/all-$gpu/timing.json"
    exit "$status" ;;
  *) echo "run.sh: unknown part $part (bench, compile, phase1 or phase2)" >&2; exit 2 ;;
esac
