"""Tables, plots, GIFs and report.md from a run folder's JSON files; nothing here runs a model.

Every table is one function that takes the results dict and returns markdown, so a stage prints exactly the
table its report shows. `write_report(out)` rebuilds results.json, the PNG plots and report.md from the files
in a run folder; `aggregate_seeds(out, seeds)` writes the table across training seeds. The file also holds the
plumbing every writer shares: atomic writes, JSON, the one-line UserError, and the 95% intervals.
It imports nothing from vjepa_reacher.py (which imports it), so it can be copied alone.
"""
import contextlib
import glob
import json
import math
import os
import tempfile

import numpy as np
import scipy  # scipy.stats loads on first use (~0.5 s): stages that compute no interval skip it

SUCCESS_RADIUS = 0.06  # reacher-easy: reward 1 inside target radius 0.05 + finger radius 0.01


class UserError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback."""


# The seed's published figures, shown beside ours in every report: Phase 1's success / return in 200 steps; Phase 4's
# latent min distance / improvement / reward, one 200-step episode each (random shooting: 100 steps).
SEED_PHASE1 = {"bc": "20% / 66.4", "p": "20% / 67.6", "random": "2% / 0.0"}
SEED_PHASE4 = {"random/mlp": "- / - / 0.0", "cem/mlp": "7.8 / 0.413 / 6.0", "cem/mlp_rollout5": "9.55 / 0.314 / 0.0",
               "cem/resblock": "9.22 / 0.115 / 0.0"}

# ---- Plumbing: atomic writes and JSON --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block finishes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))  # keeps the extension
    os.close(fd)
    umask = os.umask(0o022)  # read the umask (and put it back): files get the mode a plain open() would give
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def record_run(out, config, stage, seconds):
    """OUT/config.json keeps the latest options (`config`) and each command that wrote something, once; timing.json
    the seconds of each stage that ran."""
    path, timing_path = os.path.join(out, "config.json"), os.path.join(out, "timing.json")
    commands = load_json(path)["commands"] if os.path.exists(path) else []
    save_json(path, dict(config, commands=commands + [config["command"]] * (commands[-1:] != [config["command"]])))
    save_json(timing_path, dict(load_json(timing_path) if os.path.exists(timing_path) else {}, **{stage: seconds}))


def load_json(path, made_by=None):
    if not os.path.exists(path):
        raise UserError(f"missing {path}" + (f": run the `{made_by}` stage first" if made_by else ""))
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupted ({e}); delete it and re-run the stage that made it")


# ---- Statistics: scipy.stats, which dm_control already requires ----------------------------------------------------
def wilson(k, n):
    """95% Wilson score interval for k successes in n trials (scipy's binomtest)."""
    if n == 0:
        return (0.0, 1.0)
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def mean_ci(x):
    """Mean and 95% normal-approximation half-width."""
    x = np.asarray(x, dtype=np.float64)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return float(x.mean()), float(half)


def across_seeds(values):
    """Mean and 95% t-interval half-width of per-seed values (one value a seed: each episode counted once)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def fisher_exact(k1, n1, k2, n2):
    """Two-sided Fisher exact test of k1 successes in n1 against k2 in n2 (scipy's)."""
    return float(scipy.stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]])[1])


def episode_metrics(episodes, steps):
    """success: reward 1 at the last step (finger inside target). seed_success: return > 150 per 200 steps."""
    n = len(episodes)
    final_reward = np.array([e["rewards"][-1] for e in episodes])
    returns = np.array([e["rewards"].sum() for e in episodes])
    success = int((final_reward >= 1.0).sum())
    seed_success = int((returns > 150.0 * steps / 200).sum())  # seed: return > 150 over 200 steps
    return {"n": n, "success": success / n, "success_ci": wilson(success, n),
            "seed_success": seed_success / n, "seed_success_ci": wilson(seed_success, n),
            "return": float(returns.mean()), "return_ci": mean_ci(returns)[1],
            "final_distance": float(np.mean([e["final_distance"] for e in episodes]))}


def plan_metrics(eps, steps, seconds, goals):
    """Success, return and the finger-to-target distance in metres (initial, final, closest; mean and 95% half-width
    over episodes): one space for every encoder and model, where latent distances are not comparable."""
    finger = np.stack([ep["distances"] for ep in eps])
    m = dict(episode_metrics(eps, steps), steps=steps, ms_per_action=1000 * seconds / (steps * len(eps)),
             goal_distance=float(np.mean([g["distance"] for g in goals])))  # the goal's own finger distance
    for key, x in (("initial", finger[:, 0]), ("final", finger[:, -1]), ("min", finger.min(1))):
        m[f"{key}_distance"], m[f"{key}_distance_ci"] = mean_ci(x)
    m["episodes"] = [{"seed": ep["seed"], "success": bool(ep["rewards"][-1] >= 1), "return": float(ep["rewards"].sum()),
                      "final_distance": ep["final_distance"], "min_distance": float(d.min())}
                     for ep, d in zip(eps, finger)]
    return m, {"finger": finger.tolist()}


def ridge_probe(X, Y, episode, folds=4, lams=(1e-2, 1e-1, 1, 10, 100, 1e3, 1e4)):
    """Episode-wise k-fold ridge: every row is predicted by a probe fit on the other folds' episodes.

    Returns the pooled out-of-fold R^2 (averaged over columns; 0 for predicting the mean) for the best lambda.
    Pooling over all episodes matters for targets constant within an episode (target xy): one has no variance."""
    fold, best = episode % folds, -np.inf
    for lam in lams:
        P = np.zeros_like(Y)
        for f in np.unique(fold):
            tr, te = fold != f, fold == f
            if not tr.any():  # one episode: nothing to hold out
                return float("nan")
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
            Xc, my = (X[tr] - mu) / sd, Y[tr].mean(0)  # closed-form ridge with an unpenalised bias, on centred X, Y
            mx = Xc.mean(0)
            W = np.linalg.solve((Xc - mx).T @ (Xc - mx) + lam * np.eye(X.shape[1]), (Xc - mx).T @ (Y[tr] - my))
            P[te] = (X[te] - mu) / sd @ W + (my - mx @ W)
        best = max(best, np.mean(1 - ((Y - P) ** 2).sum(0) / (((Y - Y.mean(0)) ** 2).sum(0) + 1e-12)))
    return float(best)


def probe_embeddings(z, states, min_speed=1e-3):
    """Ridge probe R^2 of z (E*(T+1), D) for targets from states (E, T+1, S): finger xy, target xy, joint sin/cos,
    and the finger's velocity direction (cos, sin of finger_t - finger_{t-1}) where it moves > min_speed m a step."""
    vel = np.diff(states[..., 6:8], axis=1, prepend=states[:, :1, 6:8]).reshape(-1, 2)  # within each episode
    angle, flat = np.arctan2(vel[:, 1], vel[:, 0]), states.reshape(-1, states.shape[-1])
    targets = {"finger_xy": flat[:, 6:8], "target_xy": flat[:, 8:10], "joint_angles": flat[:, 0:4],
               "velocity_direction": np.stack([np.cos(angle), np.sin(angle)], 1)}
    episode, scores = np.repeat(np.arange(states.shape[0]), states.shape[1]), {}
    for name, Y in targets.items():
        keep = np.linalg.norm(vel, axis=1) > min_speed if name == "velocity_direction" else np.ones(len(Y), bool)
        scores[name] = ridge_probe(z[keep], Y[keep], episode[keep]) if keep.sum() > 4 else float("nan")
    return scores


# ---- Report ----------------------------------------------------------------------------------------------------------
def fmt_rate(m, key="success"):
    lo, hi = m[f"{key}_ci"]
    return f"{m[key] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}]"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def phase1_table(results, steps):
    """Experts, BC, RL and random on the same `steps`-step evaluation episodes, beside the seed's figures."""
    conditions = [(f"expert `{k}`", k, v) for k, v in results.get("experts", {}).items()]
    conditions += [(k, k, v) for k, v in results.get("eval", {}).items()]
    rows = [[label, fmt_rate(v), fmt_rate(v, "seed_success"), f"{v['return']:.1f}", f"{v['final_distance']:.3f}",
             v["n"], fmt_long(v), SEED_PHASE1.get(key, "")] for label, key, v in conditions]
    return (f"Phase 1: live evaluation, {steps}-step episodes (encoder `{results['encoder']['id']}`)\n\n" +
            md_table(["condition", "success [95% CI]", "seed_success", f"mean return ({steps} steps)", "final dist (m)",
                      "n", "return, 1,000 steps", "seed's figure (success / return, 200 steps)"], rows))


def fmt_long(m):
    """The 1,000-step return of a condition: mean ± 95% half-width (n), or '' if it was not measured."""
    s = m.get("standard")
    return f"{s['return']:.0f} ± {s['return_ci']:.0f} (n = {s['n']})" if s else ""


def bc_line(results):
    b = results["bc"]
    return (f"BC MLP: {b['params']:,} parameters; kept epoch {b['kept_epoch'] + 1} of {b['epochs']}: train MSE "
            f"{b['train_mse']:.5f}, val MSE {b['val_mse']:.5f} ({b['split']} split; seed: 279,490, 0.0001 / 0.0002).")


def dynamics_table(results):
    rows = [[k, f"{d['params']:,}", d["epochs"], f"{d['val_loss']:.5f}" + (" (k-step)" if d["rollout"] > 1 else ""),
             *(" ".join(f"{x:.3f}" for x in d[key][:10:3]) for key in ("kstep_error", "kstep_copy"))]
            for k, d in results["dynamics"].items()]
    return md_table(["model", "params", "epochs", "best val SmoothL1", "k-step error k=1,4,7,10",
                     "copy-z_t baseline"], rows)


def plan_table(results, steps):
    """Phase 4 per planner/model: success, return and finger distances in metres, beside the seed's figures."""
    rows = [[k, fmt_rate(p), p.get("steps", steps), f"{p['return']:.1f}", f"{p['initial_distance']:.3f}",
             f"{p['final_distance']:.3f} ± {p['final_distance_ci']:.3f}", f"{p['min_distance']:.3f}",
             f"{p['ms_per_action']:.0f}", p["n"], fmt_long(p), SEED_PHASE4.get(k, "- / - / ")]
            for k, p in results["plan"].items()]
    return (f"Phase 4: latent MPC (encoder `{results['encoder']['id']}`)\n\n" +
            md_table(["planner/model", "success", "steps", "return", "initial dist (m)", "final dist (m)",
                      "closest (m)", "ms/action", "n", "return, 1,000 steps",
                      "seed: latent min dist / improvement / reward (1 episode)"], rows))


def probe_table(results):
    cols = [c for c in results["probe"] if results["probe"][c]]
    names = list(results["probe"][cols[0]])
    return md_table(["target"] + cols, [[n] + [f"{results['probe'][c][n]:.2f}" for c in cols] for n in names])


def rl_section(results):
    """The RL table: budget, cost and final success of each variant (its row is also in the Phase 1 table)."""
    rl, rows = results["rl"], []
    for name, info in rl["runs"].items():
        m = rl["eval"][name]
        rows.append([name, f"{info['env_steps']:,}", f"{info['updates']:,}", f"{info['seconds']:.0f}", fmt_rate(m),
                     f"{m['return']:.1f}", m["n"]])
    return (f"### SAC on frozen embeddings (encoder `{results['encoder']['id']}`, standardised with "
            f"{rl['standardisation']})\n\n" +
            md_table(["variant", "env steps", "updates", "wall s", "final success [95% CI]", "return", "n"], rows) +
            "\n\nLearning curve (rl.json's `curve`): ![SAC learning curve](rl_curve.png)")


def imagine_section(results):
    """Phase 5's table: the actor-critic learned in imagination, on the evaluation and the planning episodes."""
    im = results["imagine"]
    rows = [[label, fmt_rate(m), f"{m['return']:.1f} ± {m['return_ci']:.1f}", m["n"]]
            for label, m in ((f"evaluation episodes, {im['steps']} steps", im["eval"]),
                             (f"planning episodes (CEM's), {im['plan_steps']} steps", im["plan"]),
                             ("evaluation episodes, reacher-easy's 1,000 steps", im["eval"].get("standard"))) if m]
    first, last, d = im["refits"][0], im["refits"][-1], im["eval"].get("diagnosis")
    parts = [f"{k} (n = {d[k]['n']}): reward head MSE {d[k]['reward_mse']:.3f}, dynamics 1-step error "
             f"{d[k]['dynamics_error']:.3f}" for k in ("success", "failure") if d[k]["n"]] if d else []
    where = (" Along its real evaluation episodes, " + "; ".join(parts) +
             f" (held-out replay: {d['replay_dynamics_error']:.3f}).") if d else ""
    return (f"### Phase 5: actor-critic in imagination (encoder `{results['encoder']['id']}`)\n\n" +
            md_table(["episodes", "success [95% CI]", "return", "n"], rows) +
            f"\n\n{im['env_steps']:,} env steps ({im['phase2_steps']:,} of them the Phase 2 data), "
            f"{im['updates']:,} imagination updates, {im['seconds']:.0f} s; {im['eval']['ms_per_action']:.3f} ms an "
            f"action. Reward head held-out MSE {first['reward_val']:.4f} at the first refit, {last['reward_val']:.4f} "
            f"at the last ({len(im['refits'])} refits); dynamics held-out SmoothL1 {first['dynamics_val']:.5f} -> "
            f"{last['dynamics_val']:.5f}.{where} Learning curve: ![learning curves](rl_curve.png)")


def save_rollout_gif(path, ep, title, goal=None):
    """An episode's frames (T, H, W, 3) -> GIF, each captioned on a dark band with its finger-to-target distance
    (ep["distances"], metres) at that step; the goal frame beside each one."""
    from PIL import Image, ImageDraw, ImageFont
    frames, d = ep["frames"], ep["distances"]
    font = ImageFont.load_default(size=max(12, frames.shape[1] // 18))  # sized: Pillow >= 10.1
    band, images = font.getbbox("Ag")[3] + 8, []
    for t, f in enumerate(frames):
        im = Image.fromarray(np.concatenate([f, goal], 1) if goal is not None else f)
        draw = ImageDraw.Draw(im)
        draw.rectangle((0, 0, im.width, band), fill=(0, 0, 0))
        draw.text((4, 4), f"{title}  step {t}  dist {d[t]:.3f} m", fill=(255, 255, 255), font=font)
        if goal is not None:
            draw.text((f.shape[1] + 4, 4), "goal", fill=(255, 255, 255), font=font)
        images.append(im)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=60, loop=0)


def evaluated(results):
    """Every condition a run evaluated live, by name: experts, BC, RL, random and the MPC planners."""
    named = {f"expert {k}": v for k, v in results.get("experts", {}).items()}
    named.update(results.get("eval", {}))
    named.update({f"MPC {k}": v for k, v in results.get("plan", {}).items()})
    return named


def plot_success(plt, results, enc):
    conditions = evaluated(results)
    if not conditions:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(conditions)), 3.2))
    rates = np.array([m["success"] for m in conditions.values()])
    ci = np.array([m["success_ci"] for m in conditions.values()]).T
    ax.bar(list(conditions), rates * 100, yerr=np.abs(ci - rates) * 100, capsize=4)
    ax.set(ylabel="final-step success %", ylim=(0, 105), title=f"Success with 95% Wilson CI ({enc})")
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_dynamics(plt, results, enc):
    if "dynamics" not in results:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, d in results["dynamics"].items():
        ax.plot(range(1, len(d["kstep_error"]) + 1), d["kstep_error"], marker="o", label=name)
    first = next(iter(results["dynamics"].values()))
    ax.plot(range(1, len(first["kstep_copy"]) + 1), first["kstep_copy"], "k--", label="copy z_t")
    ax.set(xlabel="k (open-loop steps)", ylabel="L2 error (model space)", title=f"k-step prediction error ({enc})")
    ax.legend(fontsize=7)
    return fig


def plot_plan(plt, results, enc):
    if not results.get("plan_traces"):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, tr in results["plan_traces"].items():
        x = np.array(tr["finger"])
        ax.plot(x.mean(0), label=name)
        ax.fill_between(range(x.shape[1]), x.mean(0) - x.std(0), x.mean(0) + x.std(0), alpha=0.15)
    ax.axhline(SUCCESS_RADIUS, color="k", ls="--", lw=1, label=f"success radius {SUCCESS_RADIUS} m")
    ax.set(xlabel="step", ylabel="finger-target distance (m)", title=f"Finger distance under MPC ({enc})")
    ax.legend(fontsize=7)
    return fig


def plot_rl(plt, results, enc):
    """SAC's and the actor-critic's learning curves against env steps (the actor-critic's count its Phase 2 data)."""
    curves = {k: v["curve"] for k, v in results.get("rl", {}).get("runs", {}).items()}
    curves.update({"imagine": results["imagine"]["curve"]} if "imagine" in results else {})
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for label, curve in curves.items():
        axes[0].plot([c["step"] for c in curve], [c["return"] for c in curve], marker="o", label=label)
        axes[1].plot([c["step"] for c in curve], [100 * c["success"] for c in curve], marker="o", label=label)
    axes[0].set(xlabel="environment steps", ylabel="return", title=f"Learning curves ({enc})")
    axes[1].set(xlabel="environment steps", ylabel="final-step success %", ylim=(0, 105), title=f"Success ({enc})")
    for ax in axes:
        ax.legend()
    return fig


def write_curves(out, results):
    """rl_curve.csv: every learning-curve point of SAC and the actor-critic, one row each, by environment steps."""
    curves = {k: v["curve"] for k, v in results.get("rl", {}).get("runs", {}).items()}
    curves.update({"imagine": results["imagine"]["curve"]} if "imagine" in results else {})
    if curves:
        rows = [f"{name},{c['step']},{c['updates']},{c['success']},{c['return']},{c['seconds']}"
                for name, curve in curves.items() for c in curve]
        write_text(os.path.join(out, "rl_curve.csv"), "\n".join(["method,env_steps,updates,success,return,seconds"] +
                                                               rows) + "\n")


def make_plots(out, results):
    """Write the PNG plots for whatever stages have run; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    enc, made = results["encoder"]["id"], []
    for name, plot in (("success.png", plot_success), ("dynamics.png", plot_dynamics),
                       ("plan_distance.png", plot_plan), ("rl_curve.png", plot_rl)):
        fig = plot(plt, results, enc)
        if fig is not None:
            with atomic_path(os.path.join(out, name)) as tmp:
                fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
            plt.close(fig)
            made.append(name)
    return made


def collect_results(out):
    """Assemble results.json from the stage outputs in the run folder."""
    config = load_json(os.path.join(out, "config.json"), made_by="any stage")
    results = {"config": config, "encoder": config.get("encoder_info", {"id": config["encoder"]}), "timing": {}}
    for name, key in (("timing.json", "timing"), ("bc.json", "bc"), ("eval.json", None), ("rl.json", "rl"),
                      ("dynamics.json", None), ("imagine.json", "imagine"), ("plan.json", None), ("probe.json", None)):
        path = os.path.join(out, name)
        if os.path.exists(path):
            part = load_json(path)
            if key is None and "steps" in part:  # each table's own episode length: eval_steps, plan_steps
                part[f"{name[:-5]}_steps"] = part.pop("steps")
            results.update({key: part} if key else part)
    if "eval" in results:  # SAC's final policies and the actor-critic's join the Phase 1 table
        results["eval"].update(results.get("rl", {}).get("eval", {}))
        results["eval"].update({"imagine": results["imagine"]["eval"]} if "imagine" in results else {})
    return results


def recipe_notes(cfg):
    """The seed's own inconsistencies, stated as the seed's wherever --recipe seed reproduces them."""
    notes = {"MPC sees the current frame repeated x8, not the window its dynamics were trained on (mpc_planner.py).":
             cfg.get("mpc_obs") == "frame",
             f"Goals and MPC are rendered at {cfg.get('plan_frame_size')} px, the data at {cfg.get('frame_size')} px "
             "(at 224 px V-JEPA 2's position layout no longer matches its patch grid).":
             cfg.get("plan_frame_size") != cfg.get("frame_size"),
             f"The encoder runs at {cfg.get('precision')} for data and {cfg.get('plan_precision')} for MPC.":
             cfg.get("plan_precision") != cfg.get("precision"),
             "Random shooting's goal comes from a random run on another episode, so another target.":
             cfg.get("rs_goal") == "random-run",
             "Demos and exploration share episode seeds 0..N-1 (the seed's epsilon draws were unseeded; ours are).":
             cfg.get("episode_seeds") == "seed"}
    return [note for note, applies in notes.items() if applies]


def report_sections(results, plots):
    """report.md's section for each stage that has run: Phase 1, BC, SAC, Phase 5, dynamics, latent MPC, the probe."""
    enc, cfg, parts = results["encoder"]["id"], results["config"], []
    if "eval" in results:
        parts += ["## " + phase1_table(results, results.get("eval_steps", cfg["steps"])), "",
                  "success: reward 1 at the last step. seed_success: return > 150 per 200 steps (the seed's own "
                  "definition, scaled to the episode length). The seed's expert was the `p` controller; its random "
                  "figure was '~2% / ~0'.", ""]
    for key, section in (("bc", bc_line), ("rl", rl_section), ("imagine", imagine_section)):
        if key in results:
            parts += [section(results), ""]
    if "success.png" in plots:
        parts += [f"![success rates, encoder {enc}](success.png)", ""]
    if "dynamics" in results:
        parts += [f"## Phase 3/4c/4d: dynamics models (encoder `{enc}`)", "", dynamics_table(results), "",
                  "Errors are L2 on validation episodes in one space for every model: latents standardised with the "
                  "training episodes' statistics. A model below the copy baseline predicts motion; one at it has "
                  "learned nothing. Seed: mlp ~1.2M params, val ~0.01; resblock 10.5M, val 0.0137.", "",
                  f"![dynamics, encoder {enc}](dynamics.png)", ""]
    if results.get("plan"):
        parts += ["## " + plan_table(results, results.get("plan_steps", cfg["plan_steps"])), "",
                  "Distances are the simulator's finger-to-target metres (mean ± 95% over episodes); success needs "
                  f"< {SUCCESS_RADIUS} m. The seed's figures are ViT-L latent distances: not comparable.", "",
                  f"![finger distance under MPC, encoder {enc}](plan_distance.png)", ""]
    if "probe" in results:
        parts += [f"## What the embedding knows: ridge probe R^2, 4-fold by episode (encoder `{enc}`)", "",
                  probe_table(results), "",
                  "Seed (V-JEPA 2 on its own video probe, not reacher): object XY R^2 0.86 vs random-init -0.11.", ""]
    return parts


def write_report(out):
    """Rebuild results.json, the plots, rl_curve.csv and report.md from the run folder; nothing is re-run.
    report.md: title, recipe, the commands that made the run and the seed's inconsistencies the recipe reproduces,
    then the phases' tables, the rollout GIFs and the wall time per stage."""
    results = collect_results(out)
    plots = make_plots(out, results)
    write_curves(out, results)
    enc, cfg = results["encoder"]["id"], results["config"]
    note = {"tiny": " (`tiny` is a random-weight VJEPA2 model: it tests the plumbing and is NOT V-JEPA 2)",
            "state": " (`state` is the privileged-state oracle, not pixels)"}.get(enc, "")
    parts = [f"# vjepa-reacher report: encoder `{enc}`{note}", "",
             f"Recipe `{cfg.get('recipe', 'ours')}`. Made by these commands, in order:", "",
             *(f"    {c}" for c in cfg.get("commands", [])), "",
             f"Rebuild with `python vjepa_reacher.py report --out {out}`.", ""]
    if notes := recipe_notes(cfg):
        parts += ["The seed's inconsistencies, reproduced on purpose by `--recipe seed`:", ""]
        parts += [f"- {n}" for n in notes] + [""]
    try:
        parts += report_sections(results, plots)
    except KeyError as e:  # a file written by an older version of this code: its report.md stays as it was made
        raise UserError(f"{out}: a results file lacks {e} (an older format); re-run the stage that wrote it")
    if gifs := sorted(os.path.basename(g) for g in glob.glob(os.path.join(out, "*.gif"))):
        parts += ["## Rollouts", ""] + [f"![{g}]({g})" for g in gifs] + [""]
    if results["timing"]:
        parts += ["## Cost: wall time per stage on this machine", "",
                  md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in results["timing"].items()]), ""]
    save_json(os.path.join(out, "results.json"), results)
    write_text(os.path.join(out, "report.md"), "\n".join(parts))
    return results


# ---- Several training seeds: mean and 95% interval across seeds ------------------------------------------------------
def headline(results):
    """Every headline number of one run: {name: (success, n, return)} and probe R^2 values."""
    numbers = {k: {"success": v["success"], "n": v["n"], "return": v["return"]} for k, v in evaluated(results).items()}
    return numbers | {f"probe R^2 {k}": {"value": v} for k, v in results.get("probe", {}).get("encoder", {}).items()}


def seed_entry(name, values):
    """One headline measure across seeds, each episode counted once: per-seed values and the mean with the 95%
    t-interval of the seed means; for a success rate also each seed's Wilson interval over its own n episodes and
    the return's mean. An expert is one evaluation (it does not depend on the training seed): its first seed's."""
    key = "value" if "value" in values[0] else "success"
    if name.startswith("expert ") and all(v == values[0] for v in values):
        values = values[:1]
    mean, half = across_seeds([v[key] for v in values])
    entry = {"per_seed": [v[key] for v in values], "mean": mean, "ci95_across_seeds": half}
    if key == "success":
        entry["wilson_per_seed"] = [wilson(round(v["success"] * v["n"]), v["n"]) for v in values]
        entry["n_per_seed"] = [v["n"] for v in values]
        entry["return"] = dict(zip(("mean", "ci95_across_seeds"), across_seeds([v["return"] for v in values])))
    return entry


def seed_row(name, entry):
    """A row of seeds.md: success rates in %, other measures (probe R^2) as they are."""
    if "wilson_per_seed" not in entry:
        return [name, " ".join(f"{x:.2f}" for x in entry["per_seed"]),
                f"{entry['mean']:.2f} ± {entry['ci95_across_seeds']:.2f}", "", ""]
    cis = [f"[{100 * lo:.0f}, {100 * hi:.0f}]" for lo, hi in entry["wilson_per_seed"]]
    n, ret = entry["n_per_seed"], entry["return"]
    if len(entry["per_seed"]) == 1:  # an expert: one evaluation
        return [name, f"{100 * entry['mean']:.0f} (every seed)", "one evaluation", f"{cis[0]} (n = {n[0]})",
                f"{ret['mean']:.1f}"]
    wilsons = f"{cis[0]} each" if len(set(cis)) == 1 else " ".join(cis)
    return [name, " ".join(f"{100 * x:.0f}" for x in entry["per_seed"]),
            f"{100 * entry['mean']:.1f} ± {100 * entry['ci95_across_seeds']:.1f}",
            wilsons + (f" (n = {n[0]})" if len(set(n)) == 1 else ""),
            f"{ret['mean']:.1f} ± {ret['ci95_across_seeds']:.1f}"]


def aggregate_seeds(out, seeds):
    """OUT/seeds.json and seeds.md from OUT/seed_S/results.json: per seed (its Wilson interval over its episodes)
    and the mean ± 95% t-interval across seeds. Evaluation episodes are shared, so seeds are paired and no
    episode is counted twice; the experts, the same for every seed, are one evaluation."""
    per_seed = {s: headline(load_json(os.path.join(out, f"seed_{s}", "results.json"), made_by="report")) for s in seeds}
    names = [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]
    table = {name: seed_entry(name, [per_seed[s][name] for s in seeds]) for name in names}
    save_json(os.path.join(out, "seeds.json"), {"seeds": seeds, "headline": table, "per_seed": per_seed})
    text = (f"Training seeds {seeds}; evaluation episodes shared across seeds, so each is counted once: per seed "
            "its Wilson interval over its n episodes, across seeds the t-interval of the seed means. Success in %."
            "\n\n" + md_table(["measure", "per seed", "mean ± 95% across seeds (t)", "Wilson 95% per seed",
                                "return, mean ± 95%"], [seed_row(k, entry) for k, entry in table.items()]) + "\n")
    write_text(os.path.join(out, "seeds.md"), text)
    links = " ".join(f"[seed {s}](seed_{s}/report.md)" for s in seeds)
    first = load_json(os.path.join(out, f"seed_{seeds[0]}", "config.json"))
    commands = "".join(f"    {c}\n" for c in first["commands"])
    write_text(os.path.join(out, "report.md"), f"# vjepa-reacher over training seeds\n\nMade by these commands, in "
               f"order (the per-seed reports list their own):\n\n{commands}\n{text}\nPer seed: {links}\n")
    print(text)

