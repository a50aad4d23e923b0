"""The forward path: from the seed's recipe at its own budget (runs/state-seed, made by results/state-seed/run.sh),
switch our knobs on cumulatively, most harmful first as the reverse ablation ranks them (run.py's rows, by CEM
success, then Fisher's p, then name), until CEM/mlp reaches 90% or every knob is ours. A dynamics-training knob retrains the
mlp on the seed's 500 exploration episodes; a planner knob re-plans. Planner sizes as run.py's rows. From the
repo root, after run.py and run.sh:

    python results/ablation/forward.py        # runs the missing steps (rerunning resumes), then writes forward.md
"""
import json
import os
import shutil
import subprocess
import sys

import run  # run.py beside this file: its rows; it puts the repo root on the path

import report  # noqa: E402
from vjepa_reacher import KNOBS, SameAs  # noqa: E402  (our column of the recipe)

DYNAMICS_KNOBS = {"dyn_lr", "dyn_grad_clip", "dyn_split", "dyn_norm", "schedule_step"}
OURS = {"goal_expert": "jacobian", "goal_horizon": None}  # None: the plan_steps in force at that point
SIZES = ["--encoder", "state", "--recipe", "seed", "--episodes", "500", "--plan-episodes", "50", "--dynamics", "mlp",
         "--plans", "cem/mlp", "--samples", "100", "--elites", "10", "--iterations", "3", "--set", "plan_dtype=bf16"]


def ranked_knobs():
    """The reverse ablation's planner and dynamics rows, most harmful first (lowest CEM success, then lowest p)."""
    base = json.load(open(os.path.join(run.HERE, "base", "results.json")))["plan"]["cem/mlp"]
    rows = []
    for name, (knob, _, stages, *_) in run.ROWS.items():
        path = os.path.join(run.HERE, name, "results.json")
        if knob and os.path.exists(path) and "plan" in stages and "collect" not in stages:  # data knobs: not here
            m = json.load(open(path)).get("plan", {}).get("cem/mlp")
            if m:
                k, kb = round(m["success"] * m["n"]), round(base["success"] * base["n"])
                rows.append((m["success"], report.fisher_exact(k, m["n"], kb, base["n"]), knob))
    return [knob for _, _, knob in sorted(rows)]


def ours(knob, switched):
    """Our value of a knob as a --set string; goal_horizon follows the plan_steps in force."""
    value = OURS.get(knob, KNOBS[knob].ours)
    if value is None or isinstance(value, SameAs):
        value = dict(switched).get("plan_steps", "200")
    return f"{knob}={value}"


def step(i, switched):
    """Run forward step i with the knobs `switched` to ours, in a copy of the previous step's folder."""
    out, prev = os.path.join("runs", "forward", f"step{i}"), os.path.join("runs", "forward", f"step{i - 1}")
    keep = os.path.join(run.HERE, "forward", f"step{i}")
    if os.path.exists(os.path.join(keep, "results.json")):  # finished and kept
        return json.load(open(os.path.join(keep, "results.json")))["plan"]["cem/mlp"]
    if not os.path.exists(os.path.join(run.ROOT, out)):
        shutil.copytree(os.path.join(run.ROOT, prev if i else os.path.join("runs", "state-seed")),
                        os.path.join(run.ROOT, out), ignore=shutil.ignore_patterns("*.gif", "plan.json"))
    sets = [a for s in switched for a in ("--set", s)]
    stages = ["dynamics", "plan"] if i and switched[-1].split("=")[0] in DYNAMICS_KNOBS else ["plan"]
    for stage in stages:
        cmd = ["python", "vjepa_reacher.py", stage, *SIZES, *sets, "--out", out] + ["--force"] * (stage == "dynamics")
        if subprocess.run(cmd, cwd=run.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode:
            sys.exit(f"forward step {i}: `{' '.join(cmd)}` failed")
    subprocess.run(["python", "vjepa_reacher.py", "report", "--out", out], cwd=run.ROOT, check=True)
    os.makedirs(keep, exist_ok=True)
    for f in os.listdir(os.path.join(run.ROOT, out)):
        if f.endswith((".json", ".md", ".png")):
            shutil.copy(os.path.join(run.ROOT, out, f), keep)
    return json.load(open(os.path.join(keep, "results.json")))["plan"]["cem/mlp"]


if __name__ == "__main__":
    switched, lines = [], []
    for i, knob in enumerate([None] + ranked_knobs()):
        if knob:
            switched.append(ours(knob, [s.split("=") for s in switched]))
        m = step(i, switched)
        m0 = m if i == 0 else m0
        p = report.fisher_exact(round(m["success"] * m["n"]), m["n"], round(m0["success"] * m0["n"]), m0["n"])
        lines.append([i, ", ".join(f"`{s}`" for s in switched) or "the seed's recipe", report.fmt_rate(m), m["n"],
                      "" if i == 0 else f"{p:.2g}", f"{m['final_distance']:.3f}"])
        if m["success"] >= 0.9:
            break
    table = report.md_table(["step", "our knobs switched on (cumulative)", "CEM/mlp success [95%]", "n",
                             "p vs step 0", "final dist (m)"], lines)
    report.write_text(os.path.join(run.HERE, "forward.md"), table + "\n")
    print(table)
