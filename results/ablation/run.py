"""Which single seed choice breaks our machinery? The reverse ablation on the privileged-state oracle.

From `--recipe ours`, one knob at a time is set to the seed's value, and whatever it touches is retrained: a
dynamics-training or data knob retrains the mlp (and BC), a BC knob retrains BC, a planner knob re-plans with the
base row's model. Every row uses the same data size and planner sizes (below), 50 planning episodes, and is
compared with the base row by a two-sided Fisher exact test on its success count. From the repo root:

    python results/ablation/run.py            # runs the missing rows, then writes README.md
    python results/ablation/run.py --table    # only rewrites README.md from the finished rows
    python results/ablation/run.py ROW ...    # runs only these rows (two can run side by side), then the table

Run folders go to runs/ablation/ROW; the small files (JSON, markdown, plots) are copied to results/ablation/ROW.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import report  # noqa: E402  (the repo's report.py: Wilson intervals, Fisher's test, tables)

# Same in every row: 200 episodes of data, our dynamics epochs, 50 plan episodes; CEM at 100 samples, 10 elites,
# 3 iterations (the seed's: 500, 50, 5) and random shooting at 200 samples (the seed's 1000), rollouts in bf16.
COMMON = ["--encoder", "state", "--episodes", "200", "--plan-episodes", "50", "--dynamics", "mlp",
          "--plans", "random/mlp", "cem/mlp", "--samples", "100", "--elites", "10", "--iterations", "3",
          "--rs-samples", "200", "--set", "plan_dtype=bf16"]
RETRAIN = ["collect", "bc", "eval", "explore", "dynamics", "plan"]  # a row that changes data or training
# row: (knob, the seed's value, stages[, planners]). Rows that do not start from data run in a copy of the base
# row's folder; a planner knob that only CEM reads (or only random shooting) plans only that planner.
ROWS = {"base": (None, None, RETRAIN),
        "dyn_lr": ("dyn_lr", "3e-4", ["dynamics", "plan"]),
        "dyn_grad_clip": ("dyn_grad_clip", "1.0", ["dynamics", "plan"]),
        "dyn_split": ("dyn_split", "contiguous", ["dynamics", "plan"]),
        "dyn_norm": ("dyn_norm", "none", ["dynamics", "plan"]),
        "schedule_step": ("schedule_step", "epoch", ["bc", "eval", "dynamics", "plan"]),
        "episode_seeds": ("episode_seeds", "seed", RETRAIN),
        "cem_init_std": ("cem_init_std", "0.5", ["plan"], ["cem/mlp"]),
        "warm_tail": ("warm_tail", "zero", ["plan"], ["cem/mlp"]),
        "cost": ("cost", "weighted", ["plan"]),
        "execute": ("execute", "best", ["plan"], ["cem/mlp"]),
        "plan_steps": ("plan_steps", "200", ["plan"]),
        "goal_expert": ("goal_expert", "p", ["plan"]),
        "goal_horizon": ("goal_horizon", "300", ["plan"]),
        "rs_goal": ("rs_goal", "random-run", ["plan"], ["random/mlp"]),
        "bc_optimizer": ("bc_optimizer", "adam", ["bc", "eval"]),
        "bc_lr": ("bc_lr", "3e-4", ["bc", "eval"]),
        "bc_weight_decay": ("bc_weight_decay", "0", ["bc", "eval"]),
        "bc_batch_size": ("bc_batch_size", "512", ["bc", "eval"]),
        "bc_split": ("bc_split", "transition", ["bc", "eval"]),
        "bc_norm": ("bc_norm", "all", ["bc", "eval"]),
        # The knobs that act only on mlp_rollout5: compared with base_models, our recipe's own mlp_rollout5 on the
        # same data (same commands as base), planned with CEM. (resblock_relu: see README.md.)
        "base_models": (None, None, ["collect", "explore", "dynamics", "plan"], ["cem/mlp_rollout5"]),
        "rollout_loss": ("rollout_loss", "weighted", ["dynamics", "plan"], ["cem/mlp_rollout5"]),
        "rollout_sampling": ("rollout_sampling", "one-start", ["dynamics", "plan"], ["cem/mlp_rollout5"]),
        "rollout_epochs": ("rollout_epochs", "150", ["dynamics", "plan"], ["cem/mlp_rollout5"]),
        # The knob that acts only on the resblock, against our recipe's own resblock on base_models' data. Both
        # train under bf16 autocast (the train_dtype knob; state-seed/train_dtype_timing.json) to fit this CPU.
        "base_resblock": (None, None, ["dynamics", "plan"], ["cem/resblock"]),
        "resblock_relu": ("resblock_relu", "on", ["dynamics", "plan"], ["cem/resblock"])}
MODEL_BASES = {"cem/mlp_rollout5": "base_models", "cem/resblock": "base_resblock"}  # planner: its base row


def base_of(name):
    """The row a row is compared with: its model's base row for a row that plans with one model, else base."""
    plans = ROWS[name][3] if len(ROWS[name]) > 3 else []
    return next((MODEL_BASES[p] for p in plans if p in MODEL_BASES and MODEL_BASES[p] != name), "base")


def run_row(name):
    """Run one row's stages in runs/ablation/ROW (a copy of its source row's folder unless it starts from data)."""
    knob, value, stages, *plans = ROWS[name]
    out = os.path.join("runs", "ablation", name)
    if os.path.exists(os.path.join(HERE, name, "results.json")):  # finished and kept
        return
    models = [p.split("/")[1] for p in (plans[0] if plans else []) if p in MODEL_BASES]
    # A row for one model retrains that model, so base_models' data suffice: it can run beside its own base.
    src = "base_models" if models else base_of(name)
    if stages[0] != "collect" and not os.path.exists(out):
        shutil.copytree(os.path.join("runs", "ablation", src), out,
                        ignore=shutil.ignore_patterns("*.gif", "plan.json", "results.json", "report.md"))
    extra = (["--set", f"{knob}={value}"] if knob else []) + (["--plans", *plans[0]] if plans else [])
    extra += ["--dynamics", *models] if models else []
    extra += ["--set", "train_dtype=bf16"] if "resblock" in models else []
    for stage in stages:
        force = ["--force"] if knob and stage in ("bc", "eval", "dynamics") else []
        cmd = ["python", "vjepa_reacher.py", stage, *COMMON, *extra, *force, "--out", out]
        if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode:
            sys.exit(f"row {name}: `{' '.join(cmd)}` failed")
    subprocess.run(["python", "vjepa_reacher.py", "report", "--out", out], cwd=ROOT, check=True)
    keep = os.path.join(HERE, name)
    os.makedirs(keep, exist_ok=True)
    for f in glob.glob(os.path.join(ROOT, out, "*")):
        if f.endswith((".json", ".md", ".png")) or name == "base" and f.endswith(".gif"):  # rollouts: the base's
            shutil.copy(f, keep)


def row_cells(name, results, base):
    """Cells of one row: success [Wilson] and Fisher's p against the base for CEM, random shooting and BC."""
    cells = []
    for part, key in (("plan", "cem/mlp"), ("plan", "random/mlp"), ("eval", "bc")):
        m, b = results.get(part, {}).get(key), base.get(part, {}).get(key)
        if m is None:
            cells += ["-", "-"]
            continue
        k, n, kb, nb = round(m["success"] * m["n"]), m["n"], round(b["success"] * b["n"]), b["n"]
        cells += [f"{report.fmt_rate(m)} (n={n})", "" if name == "base" else f"{report.fisher_exact(k, n, kb, nb):.2g}"]
    return cells


def model_table(done):
    """The rows of the knobs that act on one model: CEM on that model, against its base row's same model."""
    rows = []
    for first in MODEL_BASES.values():
        base = done.get(first, {}).get("plan", {})
        for n in [n for n in done if n == first or base_of(n) == first]:
            rows += model_rows(n, done[n], base, first)
    return report.md_table(["row (one seed knob)", "planner", "success [95%]", "p vs its base", "final dist (m)",
                            "1-step error"], rows)


def model_rows(name, results, base, first):
    """One model row's cells for each of its planners."""
    rows = []
    for key, m in results["plan"].items():
        b = base.get(key)
        p = "" if name == first or b is None else report.fisher_exact(
            round(m["success"] * m["n"]), m["n"], round(b["success"] * b["n"]), b["n"])
        rows.append([f"`{ROWS[name][0]}={ROWS[name][1]}`" if ROWS[name][0] else f"ours ({name})", f"`{key}`",
                     f"{report.fmt_rate(m)} (n={m['n']})", p if p == "" else f"{p:.2g}", f"{m['final_distance']:.3f}",
                     f"{results['dynamics'][key.split('/')[1]]['kstep_error'][0]:.3f}"])
    return rows


def write_table():
    """README.md: one row per finished knob, with the Wilson intervals and Fisher's p against the base row."""
    done = {n: json.load(open(os.path.join(HERE, n, "results.json"))) for n in ROWS
            if os.path.exists(os.path.join(HERE, n, "results.json"))}
    base = done.get("base", {})
    rows = [[f"`{ROWS[n][0]}={ROWS[n][1]}`" if ROWS[n][0] else "ours (base)", *row_cells(n, r, base),
             f"{r['plan']['cem/mlp']['final_distance']:.3f}" if "cem/mlp" in r.get("plan", {}) else "-"]
            for n, r in done.items() if base_of(n) == "base" and n not in MODEL_BASES.values()]
    table = report.md_table(["row (one seed knob)", "CEM/mlp success [95%]", "p vs base", "random/mlp",
                             "p vs base", "BC", "p vs base", "CEM final dist (m)"], rows)
    table += "\n\n" + model_table(done)
    header = open(os.path.join(HERE, "README.md")).read().split("<!-- table -->")[0]
    report.write_text(os.path.join(HERE, "README.md"), header + "<!-- table -->\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    if "--table" not in sys.argv:
        for row in sys.argv[1:] or ROWS:  # rows named on the command line, or all of them
            run_row(row)
    write_table()
