"""The P-controller as goal maker: how far from the target is the goal it makes (its closest approach)?

For the 50 planning episodes (the same for every run) at the two horizons that planned with its goals:
100 steps (`ablation/goal_expert/`, our plan_steps) and 300 (`state-seed/`, the seed's goal_horizon). It runs the
plan stage's own goal code (`vjepa_reacher.plan_goals`) on the oracle, and checks that each mean is the
goal_distance in that row's plan.json. From the repo root, seconds on one core:

    python results/ablation/p_goals.py        # writes p_goals.json and p_goals.md beside this file
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import report  # noqa: E402
import vjepa_reacher as vr  # noqa: E402

ROWS = {100: "ablation/goal_expert/plan.json", 300: "state-seed/plan.json"}  # horizon: the plan that used them

if __name__ == "__main__":
    seeds, encoder, out, lines = vr.episode_seeds("plan", 50, 0), vr.load_encoder("state"), {}, []
    for horizon, plan in ROWS.items():
        args = vr.parse_args(["plan", "--encoder", "state", "--set", "goal_expert=p", "--set",
                              f"goal_horizon={horizon}"])
        d = np.array([g["distance"] for g in vr.plan_goals(args, encoder, seeds, "expert")[1]])
        committed = json.load(open(os.path.join(HERE, "..", plan)))["plan"]["cem/mlp"]["goal_distance"]
        assert abs(d.mean() - committed) < 1e-6, (horizon, d.mean(), committed)  # the same goals as that plan
        inside = int((d < report.SUCCESS_RADIUS).sum())
        out[horizon] = {"plan": plan, "n": len(d), "mean": d.mean(), "median": float(np.median(d)),
                        "inside_radius": inside, "inside_ci": report.wilson(inside, len(d)), "distances": d.tolist()}
        lo, hi = out[horizon]["inside_ci"]
        lines.append([horizon, f"`{plan}`", len(d), f"{d.mean():.3f}", f"{np.median(d):.3f}",
                      f"{inside} of {len(d)} ({100 * inside / len(d):.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])"])
    report.save_json(os.path.join(HERE, "p_goals.json"), out)
    table = report.md_table(["P-controller steps", "planned in", "n", "mean (m)", "median (m)",
                             f"goals inside the {report.SUCCESS_RADIUS} m radius"], lines)
    report.write_text(os.path.join(HERE, "p_goals.md"), "The P-controller's goals: finger-to-target distance at its "
                      "closest approach (`python results/ablation/p_goals.py`)\n\n" + table + "\n")
    print(table)
