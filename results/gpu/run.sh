#!/usr/bin/env bash
# The one device run, prepared and tried on the CPU: bench on the GPU (with --compile), then `all` with ViT-L's
# architecture at random weights (a save_pretrained folder: the same compute as V-JEPA 2, no download) at a reduced
# episode count, each stage's time in its timing.json. On a lent GPU, from the repo root, with the kit carried
# (`carry: [".whl", ".gl"]`, see shared/gpu/README.md):
#   source .gl/on-device.sh && bash results/gpu/run.sh $OUT
# then copy $OUT/bench-GPU/ and $OUT/all-GPU/*.json *.md to results/. Tried here as:
#   DEVICE=cpu ENCODER=tiny QUICK=1 bash results/gpu/run.sh runs/gpu-dry
set -euo pipefail
out=${1:?usage: run.sh OUT}
device=${DEVICE:-cuda} episodes=${EPISODES:-32} encoder=${ENCODER:-vitl} quick=${QUICK:+--quick}
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() \
else 'cpu')")
python3 bench.py --device "$device" --compile $quick --out "$out/bench-$gpu"
if [ "$encoder" = vitl ]; then
  python3 -c "import sys, vjepa_reacher as vr; from transformers import VJEPA2Config
vr.random_vjepa2(VJEPA2Config(crop_size=256, frames_per_clip=64), 0).save_pretrained(sys.argv[1])" "$out/vitl-random"
  encoder="$out/vitl-random"
fi
python3 vjepa_reacher.py all --encoder "$encoder" --device "$device" $quick --episodes "$episodes" \
  --eval-episodes "$episodes" --plan-episodes 8 --rl-steps 4000 --out "$out/all-$gpu"
python3 -c "import json, sys; t = json.load(open(sys.argv[1])); print('stage seconds:', t, 'total', sum(t.values()))" \
  "$out/all-$gpu/timing.json"
