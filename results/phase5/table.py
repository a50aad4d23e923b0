"""Phase 5's tables and plot from the committed files: the three learners at equal environment steps, and every
policy's 1,000-step return beside the field's published figures. From the repo root, after run.sh:
    python results/phase5/table.py          # writes results/phase5/tables.md and curves.png
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import report  # noqa: E402

SEEDS = (0, 1, 2)
# The field's returns on reacher-easy (mean over seeds; files read at the commits named in results/README.md).
PUBLISHED = [("SAC, state, 100k steps", "nicklashansen/tdmpc2 results/sac/reacher-easy.csv", 540, 3),
             ("DreamerV3, state, 100k steps", "nicklashansen/tdmpc2 results/dreamerv3/reacher-easy.csv", 872, 3),
             ("TD-MPC2, state, 100k steps", "nicklashansen/tdmpc2 results/tdmpc2/reacher-easy.csv", 937, 3),
             ("DrQ-v2, pixels, 500k frames", "facebookresearch/drqv2 curves/dmc_reacher_easy.csv", 751, 10),
             ("DreamerV3, pixels, ~500k", "danijar/dreamerv3 scores/dmc_vision-dreamerv3.json.gz", 821, 10),
             ("TD-MPC2, pixels, 500k steps", "nicklashansen/tdmpc2 results/tdmpc2-pixels/reacher-easy.csv", 918, 3)]


def load(seed, name, folder="phase5"):
    path = os.path.join(HERE, "..", folder, f"seed_{seed}", name)
    return json.load(open(path)) if os.path.exists(path) else None


def nearest(curve, step):
    return min(curve, key=lambda c: abs(c["step"] - step))


def across(values, fmt="{:.0f}", scale=1.0, unit=""):
    """mean ± 95% t-interval over seeds, or the one value."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, half = report.across_seeds([scale * v for v in values])
    return (fmt.format(mean) + (f" ± {fmt.format(half)}" if len(values) > 1 else "") + unit +
            f" ({len(values)} seed{'s' * (len(values) > 1)})")


def rate_row(label, steps, metrics, n_text, long=None, ms=None):
    """A row of the equal-steps table: success per seed with its Wilson interval, then the t-interval over seeds."""
    per_seed = " ".join(report.fmt_rate(m) for m in metrics)
    return [label, f"{steps:,}", across([m["success"] for m in metrics], scale=100, unit="%"), per_seed, n_text,
            across([m["return"] for m in metrics], "{:.1f}"), long or "-", ms or "-"]


def long_text(ms):
    ms = [m for m in ms if m]
    if not ms:
        return None
    n = sum(m["n"] for m in ms) // len(ms)
    return across([m["return"] for m in ms], "{:.0f}") + f", n = {n} a seed"


def equal_steps():
    rl = [load(s, "rl.json") for s in SEEDS]
    im = [load(s, "imagine.json") for s in SEEDS]
    plan = [load(s, "plan.json", "state") for s in SEEDS]
    long_cem = [(load(s, "plan.json") or {}).get("plan", {}).get("cem/mlp", {}).get("standard") for s in SEEDS]
    rows = []
    if all(im):
        phase2 = im[0]["phase2_steps"]
        first = [c["curve"][0] for c in im]
        rows.append(rate_row("actor-critic, imagination only (the Phase 2 data)", phase2,
                             [dict(m, n=10, success_ci=report.wilson(round(10 * m["success"]), 10)) for m in first],
                             "10 eval"))
    if all(plan):
        cem = [p["plan"]["cem/mlp"] for p in plan]
        rows.append(rate_row("CEM/mlp (results/state; plans on the Phase 2 data's model)", 40_000, cem,
                             "20 plan", long_text(long_cem), f"{np.mean([c['ms_per_action'] for c in cem]):.0f}"))
    if all(rl):
        at = [nearest(r["runs"]["rl"]["curve"], 40_000) for r in rl]
        rows.append(rate_row(f"SAC from reward alone, at {at[0]['step']:,}", at[0]["step"],
                             [dict(m, n=10, success_ci=report.wilson(round(10 * m["success"]), 10)) for m in at],
                             "10 eval"))
        rows.append(rate_row("SAC from reward alone", rl[0]["runs"]["rl"]["env_steps"],
                             [r["eval"]["rl"] for r in rl], "100 eval",
                             long_text([r["eval"]["rl"].get("standard") for r in rl]), "as the actor-critic's (the "
                             "same actor net)"))
    if all(im):
        rows.append(rate_row("actor-critic in imagination, after Dyna", im[0]["env_steps"], [m["eval"] for m in im],
                             "100 eval", long_text([m["eval"].get("standard") for m in im]),
                             f"{np.mean([m['eval']['ms_per_action'] for m in im]):.3f}"))
        rows.append(rate_row("  the same, on CEM's planning episodes (100 steps)", im[0]["env_steps"],
                             [m["plan"] for m in im], "20 plan"))
    return report.md_table(["learner", "env steps", "success, mean ± 95% over seeds", "per seed [Wilson 95%]",
                            "episodes a seed", "return (200 steps; plan rows 100)", "return, 1,000 steps",
                            "ms an action"], rows)


def field():
    ev = [load(s, "eval.json") for s in SEEDS]
    rl, im = [load(s, "rl.json") for s in SEEDS], [load(s, "imagine.json") for s in SEEDS]
    ours = []
    if all(ev):
        for name, key in (("expert `p` (the seed's P-controller)", "p"), ("expert `jacobian` (ours)", "jacobian")):
            ours.append([name, long_text([ev[0]["experts"][key].get("standard")]), "this code; one evaluation (an "
                         "expert does not depend on the training seed)"])
        for name, key in (("BC on the oracle embedding", "bc"), ("random", "random")):
            ours.append([name, long_text([e["eval"][key].get("standard") for e in ev]), "this code, `state` oracle"])
    if all(rl):
        ours.append(["SAC from reward alone, 100k steps", long_text([r["eval"]["rl"].get("standard") for r in rl]),
                     "this code, `state` oracle"])
    if all(im):
        ours.append([f"actor-critic in imagination, {im[0]['env_steps'] // 1000}k steps",
                     long_text([m["eval"].get("standard") for m in im]), "this code, `state` oracle"])
    cem = (load(0, "plan.json") or {}).get("plan", {}).get("cem/mlp", {}).get("standard")
    if cem:
        ours.append(["CEM/mlp, 40k steps of data", long_text([cem]), "this code, `state` oracle, 2 planning episodes"])
    theirs = [[name, f"{ret} (mean of {n} seeds)", f"`{src}`"] for name, src, ret, n in PUBLISHED]
    return report.md_table(["policy", "return over reacher-easy's 1,000 steps", "source"], ours + theirs)


def plot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for s, color in zip(SEEDS, ("C0", "C1", "C2")):
        rl, im = load(s, "rl.json"), load(s, "imagine.json")
        for curve, style, label in ((rl and rl["runs"]["rl"]["curve"], "-o", "SAC"),
                                    (im and im["curve"], "--s", "actor-critic in imagination")):
            if curve:
                ax.plot([c["step"] for c in curve], [100 * c["success"] for c in curve], style, color=color, ms=3,
                        label=f"{label}, seed {s}")
    ax.set(xlabel="environment steps (the actor-critic's include its Phase 2 data)", ylabel="success % (10 episodes)",
           ylim=(-5, 105), title="Learning curves on the state oracle")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=90, bbox_inches="tight")


if __name__ == "__main__":
    text = ("## At equal environment steps\n\n" + equal_steps() + "\n\n## Over reacher-easy's own 1,000 steps\n\n" +
            field() + "\n")
    report.write_text(os.path.join(HERE, "tables.md"), text)
    plot()
    print(text)
