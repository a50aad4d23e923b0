"""How much faster does the resblock train under bf16 autocast (the train_dtype knob) on this CPU?

Times one epoch of `vjepa_reacher.train_dynamics` for the resblock (8.4M parameters, batches of 256) on synthetic
oracle-sized data (20 episodes of 200 steps, D = 10), fp32 then bf16, alternating, three times each, on one
thread. From the repo root (a minute or two; the machine may be shared, so the load average is recorded):

    OMP_NUM_THREADS=1 python results/state-seed/train_dtype_timing.py   # writes train_dtype_timing.json here
"""
import contextlib
import io
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import report  # noqa: E402
import vjepa_reacher as vr  # noqa: E402

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    data = {"z": rng.normal(size=(20, 201, 10)).astype(np.float32), "actions": rng.uniform(-1, 1, (20, 200, 2))}
    seconds, load = {"fp32": [], "bf16": []}, os.getloadavg()[0]
    for _ in range(3):
        for dtype in seconds:
            args = vr.parse_args(["dynamics", "--recipe", "seed", "--device", "cpu", "--set", f"train_dtype={dtype}"])
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                vr.train_dynamics("resblock", data, args, epochs=1)
            seconds[dtype].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in seconds.items()}
    out = {"seconds_per_epoch": seconds, "best": best, "speedup_bf16": best["fp32"] / best["bf16"],
           "load_average_at_start": load, "threads": vr.torch.get_num_threads()}
    report.save_json(os.path.join(HERE, "train_dtype_timing.json"), out)
    print(f"resblock epoch: fp32 {best['fp32']:.2f} s, bf16 {best['bf16']:.2f} s: {out['speedup_bf16']:.2f}x "
          f"(load average {load:.2f})")
