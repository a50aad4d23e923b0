"""vjepa-reacher: can frozen V-JEPA 2 be the only eyes of a dm_control reacher-easy arm?

What this reproduces (the published findings in shared/seed, "V-JEPA 2 -> Robot Policy"):
  Phase 1   a scripted expert drives reacher-easy; the last 8 rendered 256x256 frames are encoded by frozen
            V-JEPA 2 ViT-L (facebook/vjepa2-vitl-fpc64-256) into 1024 numbers; a 279,490-parameter MLP is
            trained by behaviour cloning and evaluated live.
  Phase 2   epsilon-greedy exploration data (epsilon 0.3, the seed's P-controller).
  Phase 3   residual dynamics MLPs f(z, a) -> z' (1-step, 5-step rollout loss, 10.5M ResBlock).
  Phase 4   latent MPC toward an expert-generated goal embedding: random shooting and CEM.
  Phase 5   the seed's next step: an actor-critic learned in imagination through that dynamics (imagine.py).
`--recipe seed` reruns the seed's code knob for knob (KNOBS below). Further: a correct Jacobian expert, a
privileged-state oracle (`--encoder state`), intervals over episodes and training seeds (`--seeds`), SAC on the
frozen embeddings (sac.py) and a linear probe. report.py writes tables, plots and GIFs; bench.py measures speed.
References: V-JEPA 2 (Assran et al. 2025), dm_control (Tassa et al. 2018), CEM as in TD-MPC2 and vjepa2's
mpc_utils.py, SAC as in CleanRL.

Copy and paste (`--help` lists every stage, option and knob):
  python vjepa_reacher.py all                                   # everything, V-JEPA 2 ViT-L (GPU advised)
  python vjepa_reacher.py all --quick --encoder tiny            # offline smoke run, minutes on CPU
  python vjepa_reacher.py all --encoder state --seeds 0 1 2     # the privileged-state oracle, mean +- 95% over seeds
  python vjepa_reacher.py all --recipe seed --set cost=final    # the seed's own recipe, knob for knob, one changed
  python vjepa_reacher.py plan --plan-episodes 20               # one stage: each reads and writes runs/default/
  python vjepa_reacher.py collect --shard 0/4  (... 3/4), then `merge`   # parallel collection
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import glob
import hashlib
import importlib.metadata
import math
import os
import re
import shlex
import shutil
import sys
import time
from functools import cached_property, partial

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported
# Idle torch threads sleep instead of spinning: beside another busy process on 2 cores, spinning made tiny's
# encoding 4x slower (measured here). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ---- Constants ---------------------------------------------------------------------------------------------------
WINDOW = 8  # seed: the last 8 frames form one V-JEPA 2 clip
DEFAULT_ENCODER = "facebook/vjepa2-vitl-fpc64-256"
MAX_STEPS = 1000  # reacher-easy's own time limit: 20 s at 0.02 s per control step
LEAN_RENDER = dict(shadow=False, reflection=False, skybox=False)  # same arm and target, faster (bench.py)
STATE_NAMES = ("sin_q0", "sin_q1", "cos_q0", "cos_q1", "qvel0", "qvel1", "finger_x", "finger_y", "target_x", "target_y")
SAC_REPEAT = 2  # SAC holds each action 2 control steps (DrQ-v2's action repeat)
EXPLORE = ("p", 0.3)  # seed: Phase 2 exploration data, the P-controller with epsilon 0.3
# Episode seeds fix reacher's target and arm start (`episode_seeds`). Held-out episodes are fixed ranges below 2**24,
# the same for every --seed, so training seeds are compared on paired episodes; training episodes lie above it.
HELD_OUT = {"eval": 5_000, "plan": 1_000_000, "probe": 2_000_000, "goal": 3_000_000}  # seed: eval on 5000-5099
TRAINING = ("collect", "explore", "rl")  # stage i of --seed S starts at 2**24 + a hash of (S, i)
MAX_EPISODES = 995_000  # per range: keeps every held-out range inside its slot, e.g. 5000 + n <= 1,000,000
EXPERT_NAMES = ("p", "jacobian")
DYNAMICS = ("mlp", "mlp_rollout5", "resblock")
PLANS = ("random/mlp", "cem/mlp", "cem/mlp_rollout5", "cem/resblock")
ALL = ("collect", "bc", "eval", "rl", "explore", "dynamics", "imagine", "plan", "probe", "report")

# ---- The recipe: every knob where our code and the seed's differ, one row each -------------------------------------
# `--recipe seed|ours` picks a column; `--set name=value` overrides one knob (as nanoGPT's configurator). A text
# knob takes its two columns' values and those in `also`. Files are the seed repository's (ThomasVuNguyen/Meta-s-Jepa,
# train_robots/; gen = generate_and_encode_modal.py); shared/seed_audit.md has the rows. An `ours` of SameAs("x")
# takes the value of option or knob x once everything else is set (--help: "same as x").
Knob = collections.namedtuple("Knob", "seed source ours why also", defaults=((),))


class SameAs(collections.namedtuple("SameAs", "name")):
    """An `ours` that takes the value of option or knob `name`: random shooting runs as long as CEM, say."""

    def __str__(self):
        return f"same as {self.name}"


KNOBS = {
    "bc_optimizer": Knob("adam", "train_bc.py ~50", "adamw", "faster to converge at our small budgets"),
    "bc_lr": Knob(3e-4, "train_bc.py ~50", 1e-3, "faster to converge; both decay to ~0"),
    "bc_weight_decay": Knob(0.0, "train_bc.py ~50", 1e-4, "mild regularisation"),
    "schedule_step": Knob("epoch", "all its training scripts", "batch", "cosine decay stepped per batch: smoother"),
    "bc_batch_size": Knob(512, "train_bc.py ~50", 256, "more updates per epoch on small datasets"),
    "bc_split": Knob("transition", "train_bc.py ~69-73", "episode", "neighbouring frames leak across transitions"),
    "bc_keep": Knob("final", "train_bc.py ~117-126", "final", "best val MSE: 98 vs 99.5%, 10 seeds", ("best",)),
    "bc_norm": Knob("all", "train_bc.py ~64-67", "train", "z-score inputs without validation statistics"),
    "dyn_lr": Knob(3e-4, "train_dynamics.py ~68-83", 1e-3, "fewer epochs reach the same loss"),
    "dyn_grad_clip": Knob(1.0, "train_dynamics.py ~108", 0.0, "gradient-norm clip; 0 = none"),
    "dyn_split": Knob("contiguous", "train_dynamics.py ~58-63", "random", "validate on the last 20% or a random 10%"),
    "dyn_norm": Knob("none", "train_dynamics.py ~54-56", "train", "ViT-L dimensions differ in scale by 100x"),
    "rollout_loss": Knob("weighted", "multistep ~177-187", "sum", "seed: step h weighs (h+1)/k/k, ~0.6x one step"),
    "rollout_sampling": Knob("one-start", "multistep ~105-110, 170", "every-start", "~30x more updates an epoch"),
    "rollout_epochs": Knob(150, "multistep ~106", 100, "epochs of mlp_rollout5"),
    "rollout_val": Knob("every-10th", "multistep ~211", "every-start", "mlp_rollout5's validation starts"),
    "resblock_relu": Knob("on", "resblock ~68-71", "off", "ReLU(x + net(x)) clips the residual stream at 0"),
    "cem_init_std": Knob(0.5, "mpc_planner.py ~74-99", 1.0, "covers the action box [-1, 1] at first"),
    "elite_std": Knob("unbiased", "mpc_planner.py ~99", "biased", "the elites' std: torch's default, or /n"),
    "warm_tail": Knob("zero", "mpc_planner.py ~76-80", "repeat", "shifted mean's new last step, as TD-MPC2"),
    "cost": Knob("weighted", "mpc_planner.py ~104-114", "final", "L2 to the goal at the end, or (t+1)/H-weighted"),
    "execute": Knob("best", "mpc_planner.py ~94-102", "mean", "first action of the elite mean or the best sample"),
    "plan_steps": Knob(200, "mpc_planner.py ~205", 100, "CEM episode length; the arm reaches in < 50 steps"),
    "rs_plan_steps": Knob(100, "mpc_planner.py at ebcc18d ~144", SameAs("plan_steps"), "random shooting's length"),
    "goal_expert": Knob("p", "mpc_planner.py ~117-142", SameAs("expert"), "goal maker", ("jacobian",)),
    "goal_horizon": Knob(300, "mpc_planner.py ~117-142", SameAs("plan_steps"), "steps the goal expert runs"),
    "goal_form": Knob("frame", "mpc_planner.py ~117-142", "window", "closest frame x8, or the window there"),
    "mpc_obs": Knob("frame", "mpc_planner.py ~41-48", "window", "current frame x8, or the window it trained on"),
    "demo_expert": Knob("p", "gen at 8c91016 ~133", SameAs("expert"), "BC's demo expert", ("jacobian",)),
    "rs_goal": Knob("random-run", "mpc_planner.py at ebcc18d ~57-144", "expert", "seed's shows another target"),
    "frame_size": Knob(256, "gen ~74-78", 256, "frame size for data, BC and RL"),
    "plan_frame_size": Knob(224, "mpc_planner.py ~31-35", SameAs("frame_size"), "frame size of goals and MPC"),
    "render": Knob("full", "gen ~74-78", "lean", "no shadows, reflections, skybox: same arm and target, faster"),
    "episode_seeds": Knob("seed", "gen ~120-126", "ours", "seed: 0..N-1 for demos and exploration alike"),
    "precision": Knob("half", "gen at 8c91016 ~67-71", "auto", "auto: fp16 weights on CUDA, bf16 autocast on CPU",
                      ("fp32", "fp16", "bf16")),
    "plan_precision": Knob("fp32", "mpc_planner.py ~153-155", SameAs("precision"), "MPC's encoder precision",
                           ("half", "auto")),
    "encoder_forward": Knob("full", "gen ~89-106", "encoder", "the predictor adds compute, not embedding"),
    "plan_dtype": Knob("fp32", "mpc_planner.py", "fp32", "planning rollouts (bf16: fp16 on CUDA)", ("bf16",)),
    "train_dtype": Knob("fp32", "train_dynamics.py", "fp32", "bf16: autocast (timed: results/state-seed)", ("bf16",)),
    "plan_graph": Knob("off", "mpc_planner.py", "off", "CEM's iterations as one CUDA graph (GPU opt-in)", ("on",)),
    "compile": Knob("off", "gen", "off", "torch.compile the encoder (GPU opt-in)", ("on",)),
    "rope_grid": Knob("checkpoint", "transformers' VJEPA2", "input", "token grid: input's, or 16x16 (wrong at 224)"),
}
RECIPES = {"seed": {k: v.seed for k, v in KNOBS.items()}, "ours": {k: v.ours for k, v in KNOBS.items()}}
# --quick: smoke-sized runs on 2 CPU cores; it fills what you did not type, before the recipe. Planner sizes
# shrink the most because CEM on the 8.4M-param resblock costs ~17 GFLOP per 1,000 imagined steps.
QUICK = dict(episodes=100, eval_episodes=20, steps=100, epochs=50, dyn_epochs=10, rollout_epochs=10,
             plan_episodes=4, plan_steps=30, rs_plan_steps=SameAs("plan_steps"), samples=64, elites=8, rs_samples=128,
             probe_episodes=8, goal_horizon=30, rl_steps=2000, rl_eval_every=1000, long_episodes=0,
             imagine_steps=1000, imagine_updates=400)


# ---- Options -----------------------------------------------------------------------------------------------------
# They come first, as CleanRL's Args do, so that --help and a bad option answer at once, before torch loads.
def checked(cast, ok, what):
    """An argparse type: s cast to int or float, finite and ok(value), else the error 'expected <what>'."""
    def parse(s):
        try:
            value = cast(s)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "an integer > 0")
count_int = checked(int, lambda v: v >= 0, "an integer >= 0")
unit_float = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
seed_int = checked(int, lambda v: 0 <= v < 2 ** 31, f"an integer in [0, 2**31 - 1 = {2 ** 31 - 1}]")


def knob_setting(s):
    """`--set name=value` -> (name, value), typed and checked by the knob's row in KNOBS."""
    name, _, value = s.partition("=")
    if name not in KNOBS:
        raise argparse.ArgumentTypeError(f"unknown knob {name!r} in {s!r}: --help lists them")
    knob = KNOBS[name]
    if isinstance(knob.seed, str):
        choices = [c for c in (knob.seed, knob.ours, *knob.also) if isinstance(c, str)]
        if value not in choices:
            raise argparse.ArgumentTypeError(f"knob {name}: expected one of {', '.join(choices)}, got {value!r}")
        return name, value
    if 0 in (knob.seed, knob.ours):  # 0 means none, e.g. dyn_grad_clip
        return name, checked(type(knob.seed), lambda v: v >= 0, f"knob {name} >= 0")(value)
    return name, checked(type(knob.seed), lambda v: v > 0, f"knob {name} > 0")(value)


def shard_spec(s):
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def encoder_name(s):
    """state, tiny, a local folder, or a hub id owner/name that names V-JEPA 2."""
    if s in ("state", "tiny") or os.path.isdir(s) or re.fullmatch(r"[\w.-]+/[\w.-]*vjepa2[\w.-]*", s, re.I):
        return s
    raise argparse.ArgumentTypeError(f"unknown encoder {s!r}: no such folder, and not state, tiny or a V-JEPA 2 hub "
                                     f"id such as {DEFAULT_ENCODER}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every help line, and the knob table laid out as written."""


def build_parser():
    knobs = "\n".join(f"  {k:<17} seed: {v.seed!s:<11} ours: {v.ours!s:<11} {v.why} [seed: {v.source}]"
                      for k, v in KNOBS.items())  # every knob with both values, in --help
    p = argparse.ArgumentParser(prog="vjepa_reacher.py", description=__doc__.split("\n\n")[0], formatter_class=
                                HelpFormatter, epilog="knobs (--set name=value; --recipe picks a column):\n" + knobs)
    a = p.add_argument
    a("stage", choices=list(ALL) + ["all", "merge"], help="what to run; `all` runs " + " -> ".join(ALL))
    a("--out", default="runs/default", help="run folder; stages talk only through files in it")
    a("--encoder", type=encoder_name, default=DEFAULT_ENCODER, help="V-JEPA 2 hub id or folder, `tiny`, `state`")
    a("--recipe", choices=list(RECIPES), default="ours", help="the column of knobs (see below) to run")
    a("--set", type=knob_setting, action="append", default=[], metavar="KNOB=VALUE", help="override a knob (repeat)")
    a("--quick", action="store_true", help="smoke-sized preset, minutes on 2 CPU cores: " +
      ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    a("--seed", type=seed_int, default=0, help="training seed: torch, training episodes (152 and ~1 in 700 refused)")
    a("--seeds", type=seed_int, nargs="+", help="once per training seed in OUT/seed_S, then OUT/seeds.md across them")
    a("--device", default="auto", help="torch device for encoder, training and planning; auto = cuda if available")
    a("--force", action="store_true", help="re-run stages whose outputs exist (otherwise they are skipped)")
    a("--expert", choices=EXPERT_NAMES, default="jacobian", help="demo expert; `p` is the seed's P-controller")
    a("--epsilon", type=unit_float, default=0.0, help="probability of a uniform random action during `collect`")
    a("--shard", type=shard_spec, default=(0, 1), help="collect only shard i of N (seeds i, i+N, ...); then `merge`")
    a("--episodes", type=positive_int, default=500, help="episodes to collect (seed: 500)")
    a("--steps", type=positive_int, default=200, help=f"control steps per episode (seed: 200, at most {MAX_STEPS})")
    a("--batch-size", type=positive_int, default=32, help="encoder batch, and episodes stepped together (seed: 32)")
    a("--eval-episodes", type=positive_int, default=100, help="live evaluation episodes (seed: 100)")
    a("--epochs", type=positive_int, default=100, help="BC epochs (seed: 100)")
    a("--dynamics", nargs="+", choices=DYNAMICS, default=list(DYNAMICS), help="dynamics models to train")
    a("--dyn-epochs", type=positive_int, help="epochs of every dynamics model (seed: mlp 100, resblock 150)")
    a("--plans", nargs="+", choices=PLANS, default=list(PLANS), help="planner/model pairs for `plan`")
    a("--plan-episodes", type=positive_int, default=20, help="MPC episodes per planner (seed: 1, on seed 42)")
    a("--horizon", type=positive_int, default=10, help="planning horizon (seed: 10)")
    a("--samples", type=positive_int, default=500, help="CEM samples (seed: 500)")
    a("--elites", type=positive_int, default=50, help="CEM elites (seed: 50)")
    a("--iterations", type=positive_int, default=5, help="CEM iterations (seed: 5)")
    a("--rs-samples", type=positive_int, default=1000, help="random-shooting samples (seed: 1000)")
    a("--probe-episodes", type=positive_int, default=20, help="episodes rendered for the probe")
    a("--rl-steps", type=positive_int, default=100_000, help="SAC environment steps (= the seed's 500 demos x 200)")
    a("--rl-envs", type=positive_int, default=8, help="SAC: environments stepped in lockstep (at most --batch-size)")
    a("--rl-eval-every", type=positive_int, default=10_000, help="SAC, imagine: env steps a learning-curve point")
    a("--imagine-steps", type=positive_int, default=60_000, help="imagine: env steps after Phase 2's 40k (SAC: 100k)")
    a("--imagine-updates", type=positive_int, default=5_000, help="imagine: updates on the Phase 2 data before acting")
    a("--long-episodes", type=count_int, default=50, help="1,000-step episodes a policy, for the return DMC papers "
      "report (CEM: at most --plan-episodes); 0 skips")
    a("--plan-long-episodes", type=count_int, help="those of each planner (CEM: minutes each; default --long-episodes)")
    return p


def given_options(argv):
    """The options the user typed (even at their default values): a parse in which nothing has a default."""
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def resolve_knobs(args, typed):
    """Each knob: --set if given, else --quick's size if any, else the recipe's column; then each SameAs."""
    quick = {k: v for k, v in QUICK.items() if args.quick and k not in typed}
    for k, v in [*RECIPES[args.recipe].items(), *quick.items(), *args.set]:
        setattr(args, k, v)
    if "expert" in typed and "demo_expert" not in typed:  # a typed --expert beats the recipe's demo expert
        args.demo_expert = args.expert
    args.expert = args.expert if isinstance(args.demo_expert, SameAs) else args.demo_expert  # the demo expert
    for k in KNOBS:  # SameAs("x") -> x's value; no SameAs points at another SameAs
        if isinstance(getattr(args, k), SameAs):
            setattr(args, k, getattr(args, getattr(args, k).name))


def parse_args(argv=None):
    """Parse, fill the knobs, and refuse impossible combinations (exit 2 with one line, before torch loads)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_knobs(args, given_options(argv) | {k for k, _ in args.set})
    args.rl_eval_episodes = max(1, args.eval_episodes // 10)  # a learning-curve point: 10 of the default 100
    args.plan_long_episodes = args.long_episodes if args.plan_long_episodes is None else args.plan_long_episodes
    if max(args.steps, args.plan_steps, args.rs_plan_steps, args.goal_horizon) > MAX_STEPS:
        parser.error(f"--steps, plan_steps, rs_plan_steps and goal_horizon must be at most {MAX_STEPS} (time limit)")
    if args.elites > args.samples:
        parser.error(f"--elites ({args.elites}) must not exceed --samples ({args.samples})")
    for k in ("frame_size", "plan_frame_size"):
        if getattr(args, k) % 16:
            parser.error(f"{k} must be a multiple of 16 (V-JEPA 2's patch), got {getattr(args, k)}")
    args.command = shlex.join(["python", "vjepa_reacher.py"] + argv)
    return args


if __name__ == "__main__":
    parse_args()  # --help and bad options answer here, before torch loads; main() parses again below

import numpy as np  # noqa: E402  (after the options, on purpose: see above)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gpu  # noqa: E402  (gpu.py, report.py, rope.py, sac.py and imagine.py import nothing back)
import imagine  # noqa: E402
import report  # noqa: E402
import rope  # noqa: E402
import sac  # noqa: E402
from report import UserError, atomic_path, load_json, save_json  # noqa: E402


def save_model(path, model, data, mean, std, **extra):
    """state_dict + plain metadata (data's encoder and look, input standardisation): loadable with weights_only."""
    meta = dict(encoder=data["meta"]["encoder"], render=data["meta"].get("render"), mean=mean.tolist(),
                std=std.tolist(), **extra)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


# ---- Environment and experts -------------------------------------------------------------------------------------
def make_env(seed=0):
    """dm_control reacher-easy: 2 joint motors in [-1, 1], target radius 0.05 m, 0.02 s control step."""
    from dm_control import suite
    return suite.load("reacher", "easy", task_kwargs={"random": seed})


def reset_env(env, seed):
    """Reuse one env (and its GL context): reseed the task, then reset, exactly as a fresh suite.load(seed) starts."""
    env.task._random = np.random.RandomState(seed)
    return env.reset()


def finger_and_target(physics):
    xpos = physics.named.data.geom_xpos
    return xpos["finger", :2].copy(), xpos["target", :2].copy()


def finger_distance(states):
    """Finger-to-target distance (m) for every row of a state array (..., S)."""
    return np.linalg.norm(states[..., 6:8] - states[..., 8:10], axis=-1)


def reacher_state(physics):
    """Privileged low-dimensional state (STATE_NAMES): sin/cos joints, joint velocities, finger, target."""
    q = physics.data.qpos[:2]
    finger, target = finger_and_target(physics)
    return np.concatenate([np.sin(q), np.cos(q), physics.data.qvel[:2], finger, target]).astype(np.float32)


class Renderer:
    """Renders any reacher physics from camera 0 at size x size (lean: no shadows, reflections or skybox) through one
    shared physics and Camera: a context per env costs ~80 MB and ~0.5 s, a new Camera ~2 ms of a 6 ms frame."""

    def __init__(self, size, lean=True):
        from dm_control.mujoco import Camera
        self.physics = make_env(0).physics
        self.camera = Camera(self.physics, size, size, camera_id=0)
        self.flags = LEAN_RENDER if lean else None

    def __call__(self, physics):
        shared = self.physics  # the target's place and size, and the arm's joints
        shared.model.geom_pos[:], shared.model.geom_size[:] = physics.model.geom_pos, physics.model.geom_size
        shared.data.qpos[:], shared.data.qvel[:] = physics.data.qpos, physics.data.qvel
        shared.forward()
        # The Camera reuses one pixel buffer: copy, or every frame kept in a window would be the latest one.
        return self.camera.render(render_flag_overrides=self.flags).copy()

    def gl_renderer(self):
        """The GL_RENDERER string of this context: which rasteriser actually draws (llvmpipe = CPU)."""
        from OpenGL import GL
        try:  # ctx.call: OSMesa runs its GL calls on its own thread
            with self.physics.contexts.gl.make_current() as ctx:
                return ctx.call(GL.glGetString, GL.GL_RENDERER).decode()
        except Exception:
            return "unknown"


def p_expert(physics):
    """The seed's P-controller, kept faithful: a Cartesian error vector sent straight to two joint motors."""
    finger, target = finger_and_target(physics)
    return np.clip(5.0 * (target - finger), -1, 1)  # seed: gain 5.0


def jacobian_expert(physics, kp=400.0, kd=0.1):
    """Jacobian-transpose PD: joint torques tau = kp * J^T (target - finger) - kd * qvel. J (2 x nv) maps joint
    velocities to fingertip velocity, so J^T maps a Cartesian pull to torques. kp=400, kd=0.1: 100/100 successes
    when tuned here (gear 0.05)."""
    import mujoco
    jacp = np.zeros((3, physics.model.nv))
    mujoco.mj_jacGeom(physics.model.ptr, physics.data.ptr, jacp, None, physics.model.name2id("finger", "geom"))
    finger, target = finger_and_target(physics)
    return np.clip(kp * jacp[:2].T @ (target - finger) - kd * physics.data.qvel, -1, 1)  # tau


EXPERTS = {"p": p_expert, "jacobian": jacobian_expert}


class Envs:
    """n reacher-easy envs stepped in lockstep in this process (render processes did not pay on a lent H200).
    reset(seeds) and step(actions) act on the first len(seeds) or len(actions) envs and return obs: state (B, S),
    frame (B, H, W, 3) uint8 with a frame_size, and the expert's action (B, 2) when `expert` is named."""

    def __init__(self, n, frame_size=None, lean=True, expert=None, action_repeat=1):
        self.n, self.envs, self.action_repeat = n, [make_env(0) for _ in range(n)], action_repeat
        self.renderer = Renderer(frame_size, lean) if frame_size else None
        self.expert = EXPERTS[expert] if expert else None

    def observe(self, n):
        physics = [env.physics for env in self.envs[:n]]
        obs = {"state": np.stack([reacher_state(p) for p in physics])}
        if self.renderer:
            obs["frame"] = np.stack([self.renderer(p) for p in physics])
        if self.expert:
            obs["expert"] = np.stack([self.expert(p) for p in physics])
        return obs

    def reset(self, seeds):
        for env, s in zip(self.envs, seeds):
            reset_env(env, int(s))
        return self.observe(len(seeds))

    def step(self, actions):
        """Step the first len(actions) envs; returns obs and the rewards summed over the action repeats."""
        rewards = np.zeros(len(actions), np.float32)
        for j, action in enumerate(actions):
            for _ in range(self.action_repeat):
                rewards[j] += self.envs[j].step(action).reward
        return self.observe(len(actions)), rewards


# ---- Policies: policy(z, obs) -> actions (B, 2); z (B, D) tensor or None; obs: state, seed, step (and expert) -----
def expert_policy(z, obs):
    """Executes obs["expert"]: the action of the expert named in Envs(expert=name), computed on its physics."""
    return obs["expert"]


def random_policy(rng):
    """Uniform random actions in [-1, 1] from one generator."""
    def act(z, obs):
        return rng.uniform(-1, 1, size=(len(obs["state"]), 2))
    return act


def epsilon_greedy(policy, epsilon, seed):
    """`policy` with each action replaced by a uniform random one with probability epsilon, drawn from a
    generator seeded by (seed, episode seed): an episode's data never depend on its batch-mates."""
    rngs = {}

    def act(z, obs):
        actions = np.asarray(policy(z, obs), dtype=np.float64).copy()
        for j, s in enumerate(obs["seed"]):
            if s not in rngs:
                rngs[s] = np.random.default_rng([seed, s])
            if rngs[s].random() < epsilon:
                actions[j] = rngs[s].uniform(-1, 1, size=2)
        return actions
    return act


# ---- Frame window and encoder ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Encoder:
    """A frozen encoder (model None for `state`) and how it is fed: frame size, precision, V-JEPA 2's forward
    ('encoder', or 'full' with the predictor, as the seed), form ('window'; 'frame': the newest frame x8) and batch."""
    id: str
    dim: int
    model: object = None
    device: str = "cpu"
    precision: str = "fp32"
    frame_size: int = 256
    forward: str = "encoder"
    form: str = "window"
    batch_size: int = 32
    positions: str = "input"  # RoPE token grid: the input's, or the checkpoint's (rope.py)
    rope: object = None  # the installed rope.Tables; None: transformers' own rotary code runs

    @property
    def pixels(self):
        return self.model is not None

    @cached_property
    def normalize(self):
        """ImageNet's mean and std, as V-JEPA 2 was pretrained: (x / 255 - mean) / std = x * scale - shift on uint8
        pixels, built once per encoder on its device, in the dtype its input runs in (fp32 unless low precision)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.half, "half": torch.half}.get(self.precision, torch.float32)
        mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
        return (1 / (255 * std)).to(self.device, dtype), (mean / std).to(self.device, dtype)

    def info(self):
        rope = f"cached, {self.rope.grid} grid" if self.rope else "transformers' own (checkpoint grid)"
        return {"id": self.id, "dim": self.dim, "precision": self.precision} | ({"rope": rope} if self.pixels else {})


def variant(encoder, precision=None, **changes):
    """The same encoder at another precision, frame size or form (the seed's MPC: fp32, 224 px, one frame x8).
    auto: fp16 weights on CUDA; bf16 autocast on CPUs with native bf16 (ViT-L measured here: 4.5 s -> 2.6 s a
    window); fp32 elsewhere. `half` casts the weights (a copy) to fp16, as the seed did; fp16/bf16: autocast."""
    precision = precision or encoder.precision
    if precision == "auto" and encoder.device.startswith("cuda"):
        precision = "half"  # fp16 weights: autocast would re-cast every frozen weight on every forward
    elif precision == "auto":  # measured: bf16 makes the 64-d `tiny` slower (casts outweigh its small matmuls)
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch has it only as a private helper
        precision = "bf16" if encoder.dim >= 512 and check and check() else "fp32"
    model, copied = encoder.model, {}
    if model is not None and (precision == "half") != (encoder.precision == "half"):
        model = copy.deepcopy(model, copied).to(torch.float16 if precision == "half" else torch.float32)
    rope = copied.get(id(encoder.rope), encoder.rope)  # the copy's hooks use a copy of the tables
    return dataclasses.replace(encoder, model=model, precision=precision, rope=rope, **changes)


def tiny_config():
    """A small random VJEPA2 config: the same class and code path as ViT-L, for offline runs and tests."""
    from transformers import VJEPA2Config
    return VJEPA2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
                        patch_size=32, crop_size=256, frames_per_clip=WINDOW, tubelet_size=2,
                        pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=4,
                        pred_num_mask_tokens=2, num_pooler_layers=1)


def random_vjepa2(config, seed):
    """VJEPA2Model(config) with random weights fixed by `seed`; the caller's RNG is left untouched."""
    from transformers import VJEPA2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VJEPA2Model(config)


def load_pretrained(name_or_path):
    """VJEPA2Model.from_pretrained: the local cache or folder first, then the Hub if one TCP connection reaches
    it, so an offline machine fails in seconds with one line, not after minutes of retries."""
    import socket
    from transformers import VJEPA2Model
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the one-line error below says it all
    for local in (True, False):
        if not local and (os.path.isdir(name_or_path) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")):
            break  # a folder has nothing more to fetch; HF_HUB_OFFLINE says not to try
        try:
            if not local:
                host = re.sub(r"^\w+://|[:/].*$", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
                socket.create_connection((host, 443), timeout=3.0).close()
            return VJEPA2Model.from_pretrained(name_or_path, attn_implementation="sdpa", local_files_only=local)
        except (OSError, ValueError) as e:
            why = "the Hub is unreachable" if isinstance(e, OSError) and not local else str(e).splitlines()[0][:120]
    raise UserError(f"could not fetch checkpoint {name_or_path} ({why}); use --encoder tiny, --encoder state or a "
                    "local folder saved with save_pretrained")


def load_encoder(name_or_path, device="cpu", precision="auto", seed=0, **feed):
    """A frozen encoder: 'state', 'tiny' (random from `seed`), a V-JEPA 2 hub id or folder; feed: Encoder's fields."""
    if name_or_path == "state":
        return Encoder("state", len(STATE_NAMES), device=device, **feed)
    model = random_vjepa2(tiny_config(), seed) if name_or_path == "tiny" else load_pretrained(name_or_path)
    model = model.to(device).eval().requires_grad_(False)
    encoder = Encoder(name_or_path, model.config.hidden_size, model, device, **feed)
    return variant(dataclasses.replace(encoder, rope=rope.install(model, encoder.positions)), precision)


def preprocess(windows, scale, shift):
    """uint8 (B, 8, H, W, 3) -> (B, 8, 3, H, W) in scale's dtype: x * scale - shift in place, then a permuted view."""
    return windows.to(scale.dtype).mul_(scale).sub_(shift).permute(0, 1, 4, 2, 3)


def check_windows(encoder, windows):
    """One clear error for windows of the wrong shape or dtype, before any forward."""
    want = (WINDOW, encoder.frame_size, encoder.frame_size, 3) if encoder.pixels else (WINDOW, encoder.dim)
    if tuple(windows.shape[1:]) != want or (encoder.pixels and windows.dtype != torch.uint8):
        kind = "uint8 windows" if encoder.pixels else "windows"
        raise UserError(f"encode: expected a batch of {kind} (B, {', '.join(map(str, want))}), got "
                        f"{str(windows.dtype).replace('torch.', '')} {tuple(windows.shape)}")
    return windows


@torch.inference_mode()
def encode(encoder, windows):
    """Windows -> embeddings (B, D) float32 on the encoder's device, encoder.batch_size windows a forward.
    Pixels: uint8 (B, 8, H, W, 3), numpy or torch, through V-JEPA 2's encoder (with its predictor too for forward
    'full', as the seed: same embedding); z = the mean over tokens of last_hidden_state. `state`: the last row of
    (B, 8, S). Form 'frame': the newest frame stands for the whole window (the seed's MPC)."""
    windows = check_windows(encoder, torch.as_tensor(windows).to(encoder.device, non_blocking=True))
    if encoder.form == "frame":
        windows = windows[:, -1:].expand_as(windows)
    if not encoder.pixels:
        return windows[:, -1].float()
    net = encoder.model if encoder.forward == "full" else encoder.model.encoder
    autocast = encoder.precision in ("bf16", "fp16")  # half: the weights are fp16 already
    with torch.autocast(windows.device.type, encoder.normalize[0].dtype, enabled=autocast):
        return torch.cat([net(pixel_values_videos=preprocess(batch, *encoder.normalize)).last_hidden_state.float()
                          .mean(1) for batch in windows.split(encoder.batch_size)])


# ---- Rolling out episodes: collection, evaluation, MPC and RL all step through this one loop ---------------------
def envs_for(args, encoder, n, expert=None, repeat=1):
    """Envs for n episodes, up to --batch-size in lockstep, rendering what `encoder` sees (`state` renders none)."""
    return Envs(min(n, args.batch_size), encoder.frame_size if encoder.pixels else None, args.render == "lean", expert,
                repeat)


def run_chunk(seeds, policy, encoder, envs, T, keep_z, keep_frames):
    """One lockstep batch of episodes (len(seeds) <= envs.n), T decisions each -> one dict per episode. The
    window (B, 8, ...) lives on the encoder's device and rolls by one frame a step, front-padded at reset."""
    obs, key = envs.reset(seeds), "frame" if encoder.pixels else "state"  # what fills the window
    new = gpu.upload(obs[key], encoder.device)  # one upload a step, uint8 for frames; z stays on the device
    window = new[:, None].repeat(1, WINDOW, *[1] * (new.dim() - 1))
    z = [encode(encoder, window) if keep_z else None]
    states, frames = [obs["state"]], [obs.get("frame")]
    actions, rewards = np.zeros((len(seeds), T, 2), np.float32), np.zeros((len(seeds), T), np.float32)
    for t in range(T):
        action = policy(z[-1], dict(obs, seed=seeds, step=t))
        obs, rewards[:, t] = envs.step(action)  # the policy's own values: stored below as float32
        actions[:, t] = action
        new = gpu.upload(obs[key], encoder.device)
        window = torch.cat([window[:, 1:], new[:, None]], 1)
        z.append(encode(encoder, window) if keep_z else None)
        states.append(obs["state"])
        frames.append(obs.get("frame") if keep_frames else None)
    states = np.stack(states, 1)
    z = torch.stack(z, 1).cpu().numpy() if keep_z else [None] * len(seeds)
    frames = np.stack(frames, 1) if keep_frames else [None] * len(seeds)
    return [{"seed": s, "actions": actions[i], "rewards": rewards[i], "states": states[i], "z": z[i],
             "frames": frames[i], "distances": finger_distance(states[i]),
             "final_distance": float(finger_distance(states[i, -1]))} for i, s in enumerate(seeds)]


def run_episodes(seeds, policy, encoder, envs, steps, keep_z=False, keep_frames=False, desc=None):
    """Roll out `policy` (z is None unless keep_z) on episodes `seeds`, envs.n at a time in lockstep, each action
    held envs.action_repeat of the `steps` control steps. Yields one dict per episode as its batch ends: actions
    (T, 2), rewards (T,), states (T+1, S), distances (T+1,) finger to target, final_distance, z (T+1, D) if keep_z,
    frames (T+1, H, W, 3) if keep_frames (and envs render), else None; T = steps // repeat."""
    t0, log = time.time(), desc and not sys.stderr.isatty()  # a log file gets plain lines, not tqdm's '\r' bars
    for start in tqdm(range(0, len(seeds), envs.n), desc, disable=not desc or log, leave=False):
        chunk = [int(s) for s in seeds[start:start + envs.n]]
        yield from run_chunk(chunk, policy, encoder, envs, steps // envs.action_repeat, keep_z, keep_frames)
        if log:  # the time left, from the rate so far: long encodes say early what they will cost
            n, spent = start + len(chunk), time.time() - t0
            print(f"{desc}: {n}/{len(seeds)} episodes | {spent:.0f} s | ~{spent * (len(seeds) / n - 1):.0f} s left",
                  file=sys.stderr, flush=True)


def episode_seeds(kind, n, seed, same_as_seed_code=False):
    """n episode seeds of `kind`: held-out kinds (HELD_OUT) at fixed seeds below 2**24, the same for every --seed;
    training kinds (TRAINING) at 2**24 + a hash of (--seed, stage), or at 0 for demos and exploration alike with
    same_as_seed_code (the seed's). A --seed whose training ranges would overlap (~1 in 700, 152 first) is refused."""
    if n > MAX_EPISODES:
        raise UserError(f"at most {MAX_EPISODES:,} episodes per range, got {n:,}")
    if kind in HELD_OUT:
        return list(range(HELD_OUT[kind], HELD_OUT[kind] + n))
    room = 2 ** 32 - MAX_EPISODES - 2 ** 24
    starts = [2 ** 24 + int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) % room for i in range(3)]
    if min(np.diff(sorted(starts))) < MAX_EPISODES:
        raise UserError(f"--seed {seed}: its collect, explore and rl episodes would overlap; use another --seed")
    start = 0 if same_as_seed_code else starts[TRAINING.index(kind)]
    return list(range(start, start + n))


# ---- Data collection: shards of per-episode files, merged into one memory-mappable dataset -----------------------
def dataset_name(expert, epsilon):
    return f"{expert}_eps{epsilon:g}"


def render_mode(encoder, render):
    """The look and size of the frames an encoder saw, e.g. 'lean@256'; data and models record it."""
    return f"{render}@{encoder.frame_size}" if encoder.pixels else "none"


def check_meta(meta, encoder, where, render=None, steps=None):
    """Refuse data or models made with another encoder, render look or episode length before any work starts."""
    enc = meta.get("encoder", {})
    if enc.get("id") != encoder.id or enc.get("dim") != encoder.dim:
        raise UserError(f"{where} was made with encoder {enc.get('id')} (dim {enc.get('dim')}), but --encoder is "
                        f"{encoder.id} (dim {encoder.dim}); pass --encoder {enc.get('id')} or use another --out")
    mode = render_mode(encoder, render)
    if render is not None and meta.get("render", mode) != mode:
        # measured: the lean look moves tiny's embeddings ~17x more than one control step does
        raise UserError(f"{where} was made with {meta['render']} rendering, this run uses {mode}; match the "
                        "render and frame_size knobs to it")
    if steps is not None and meta.get("steps") != steps:
        raise UserError(f"{where} was collected with --steps {meta.get('steps')}, not {steps}; "
                        f"pass --steps {meta.get('steps')} or --force to re-collect")


def episode_path(shard_dir, seed):
    return os.path.join(shard_dir, f"ep_{seed}.npz")


def collect_shard(args, encoder, shard_dir, seeds, expert, epsilon):
    """Roll out `expert` (epsilon-greedy) on `seeds`, saving each episode as shard_dir/ep_SEED.npz (never frames:
    100k at 256^2 would be ~20 GB). Saved episodes are skipped, so a killed run resumes; meta.json comes last."""
    meta = {"encoder": encoder.info(), "render": render_mode(encoder, args.render), "expert": expert,
            "epsilon": epsilon, "steps": args.steps, "seeds": [int(s) for s in seeds], "state_names": STATE_NAMES,
            "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "mujoco", "dm_control")}}
    meta_path = os.path.join(shard_dir, "meta.json")
    os.makedirs(shard_dir, exist_ok=True)
    if os.path.exists(meta_path):
        check_meta(load_json(meta_path), encoder, shard_dir, args.render, args.steps)
    todo = [s for s in seeds if not os.path.exists(episode_path(shard_dir, s))]
    if len(todo) < len(seeds):
        print(f"resuming {shard_dir}: {len(seeds) - len(todo)} of {len(seeds)} episodes already saved")
    envs = envs_for(args, encoder, max(1, len(todo)), expert)
    policy = epsilon_greedy(expert_policy, epsilon, args.seed) if epsilon > 0 else expert_policy
    for ep in run_episodes(todo, policy, encoder, envs, args.steps, keep_z=True,
                           desc=f"collect {os.path.basename(shard_dir)}"):
        with atomic_path(episode_path(shard_dir, ep["seed"])) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: ep[k] for k in ("z", "actions", "rewards", "states", "seed")})
    save_json(meta_path, dict(meta, gl_renderer=envs.renderer.gl_renderer() if envs.renderer else "none"))
    return meta


def check_shards(shard_dirs, out_dir):
    """Every shard complete, none missing, all alike, no seed twice; returns their metadata and count."""
    incomplete = [d for d in shard_dirs if not os.path.exists(os.path.join(d, "meta.json"))]
    if not shard_dirs or incomplete:
        raise UserError(f"shard {incomplete[0]} is incomplete (no meta.json): re-run its `collect --shard`"
                        if incomplete else f"no shards to merge for {out_dir}: run `collect` first")
    metas = [load_json(os.path.join(d, "meta.json")) for d in shard_dirs]
    total = int(re.search(r"of(\d+)", shard_dirs[0]).group(1))
    missing = sorted(set(range(total)) - {int(re.search(r"shard_(\d+)of", d).group(1)) for d in shard_dirs})
    if missing:
        raise UserError(f"missing shards {missing} of {total} for {out_dir}: run `collect --shard i/{total}` for them")
    for m, d in zip(metas, shard_dirs):
        for k in ("encoder", "expert", "epsilon", "steps", "render"):
            if m.get(k) != metas[0].get(k):
                raise UserError(f"shard {d} has {k}={m.get(k)} but {shard_dirs[0]} has {metas[0].get(k)}; "
                                "shards must match")
    seeds = collections.Counter(s for m in metas for s in m["seeds"])
    if max(seeds.values()) > 1:
        raise UserError(f"seeds overlap between shards (e.g. {sorted(s for s, c in seeds.items() if c > 1)[:3]}); "
                        "shards need disjoint seeds")
    return metas, total


def merge(shard_dirs, out_dir):
    """Check the shards, then stream them into .npy arrays (episodes, T+1, D) that training memory-maps; meta.json
    comes last, so a dataset without it is never taken as complete."""
    shard_dirs = sorted(shard_dirs)
    metas, total = check_shards(shard_dirs, out_dir)
    order = sorted(s for m in metas for s in m["seeds"])
    shard_of = {s: d for d, m in zip(shard_dirs, metas) for s in m["seeds"]}
    m0, n, T = metas[0], len(order), metas[0]["steps"]
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # the old dataset is invalid until this merge ends
    shapes = {"z": (n, T + 1, m0["encoder"]["dim"]), "actions": (n, T, 2), "rewards": (n, T),
              "states": (n, T + 1, len(STATE_NAMES))}
    arrays = {k: np.lib.format.open_memmap(os.path.join(out_dir, f"{k}.npy"), mode="w+", dtype="float32",
                                           shape=shape) for k, shape in shapes.items()}
    for i, s in enumerate(order):
        path = episode_path(shard_of[s], s)
        try:
            with np.load(path) as f:
                ep = {k: f[k] for k in arrays}
        except Exception as e:
            raise UserError(f"{path} is truncated or corrupted ({type(e).__name__}); delete it and re-run collect")
        for k in arrays:
            if ep[k].shape != arrays[k].shape[1:]:
                raise UserError(f"{path} has {k} of shape {ep[k].shape}, expected {arrays[k].shape[1:]}")
            arrays[k][i] = ep[k]
    for a in arrays.values():
        a.flush()
    meta = dict(m0, seeds=order, shards=total, episodes=n)
    save_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def load_dataset(data_dir, encoder=None, made_by="collect"):
    """Memory-mapped dataset: z (E, T+1, D), actions (E, T, 2), rewards (E, T), states (E, T+1, S)."""
    meta = load_json(os.path.join(data_dir, "meta.json"), made_by=made_by)
    if encoder is not None:
        check_meta(meta, encoder, data_dir)
    data = {"meta": meta}
    for k in ("z", "actions", "rewards", "states"):
        path = os.path.join(data_dir, f"{k}.npy")
        try:
            data[k] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is truncated or corrupted ({e}); re-run `{made_by} --force`")
    if data["z"].shape[:2] != (meta["episodes"], meta["steps"] + 1):
        raise UserError(f"{data_dir}/z.npy has shape {data['z'].shape}, meta.json says {meta['episodes']} episodes")
    return data


# ---- Training loop shared by BC and dynamics ---------------------------------------------------------------------
def split_episodes(n_episodes, val_frac=0.1, seed=0, contiguous=False):
    """Validation episodes: a seeded random val_frac of them, or the last val_frac (the seed's dynamics). Ours split
    by episode: the seed's BC split transitions (this on E * T "episodes"), which leaks neighbouring frames."""
    if n_episodes == 1:
        return np.array([0]), np.array([0])  # one episode: train and validate on it
    n_val = min(n_episodes - 1, max(1, int(round(n_episodes * val_frac))))
    idx = np.arange(n_episodes)[::-1] if contiguous else np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def standardizer(z, episodes, enabled=True):
    """Per-dimension mean and std of z (E, T, D) over `episodes` (identity if disabled)."""
    D = z.shape[-1]
    if not enabled:
        return np.zeros(D, np.float32), np.ones(D, np.float32)
    total, sq, count = np.zeros(D), np.zeros(D), 0
    for x in (np.asarray(z[e], dtype=np.float64) for e in episodes):  # one at a time: a 4 GB memmap never loads whole
        total, sq, count = total + x.sum(0), sq + (x * x).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


@contextlib.contextmanager
def cpu_threads(n):
    """n CPU threads for a block (None: as is): BC on 8k samples, 1.4 s an epoch on 1, 11 s on 2 beside a busy job."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def evaluate_loss(model, batch_loss, n, split="val", chunk=4096):
    """Mean of batch_loss over all n samples of a split, in eval mode."""
    model.eval()
    return sum(batch_loss(idx.numpy(), split).item() * len(idx) for idx in torch.arange(n).split(chunk)) / n


def fit(model, batch_loss, opt, n_train, n_val, epochs, batch_size, *, grad_clip=0.0, schedule_step="batch",
        keep="final", seed=0, desc="train"):
    """Train with `opt` under cosine decay (stepped per 'batch' or 'epoch') on seeded batches of the n_train samples;
    batch_loss(idx, split) -> mean loss of samples idx of 'train' or 'val'; grad_clip > 0 clips the gradient norm.
    Keeps the 'final' or 'best' epoch's weights; a non-finite loss restores them and stops with a UserError."""
    per_batch, g = schedule_step == "batch", torch.Generator().manual_seed(seed)
    decay = epochs * (math.ceil(n_train / batch_size) if per_batch else 1)  # cosine to ~0 over the whole run
    sched, params = torch.optim.lr_scheduler.CosineAnnealingLR(opt, decay), sum(p.numel() for p in model.parameters())
    small = next(model.parameters()).device.type == "cpu" and params * batch_size < 1e9
    history, kept = {"train": [], "val": []}, {"val": math.inf, "state": copy.deepcopy(model.state_dict()), "epoch": -1}
    for epoch in range(epochs):
        t0, losses = time.time(), []
        with cpu_threads(1 if small else None):
            model.train()
            for idx in torch.randperm(n_train, generator=g).split(batch_size):
                loss = batch_loss(idx.numpy(), "train")
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    model.load_state_dict(kept["state"])
                    raise UserError(f"{desc}: loss became {losses[-1]} at epoch {epoch}; stopped, kept the weights "
                                    f"of epoch {kept['epoch']}; try a lower learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                if per_batch:
                    sched.step()
            history["val"].append(evaluate_loss(model, batch_loss, n_val))
        if not per_batch:
            sched.step()
        history["train"].append(float(np.mean(losses)))
        if history["val"][-1] < kept["val"] or keep == "final":
            kept = {"val": history["val"][-1], "state": copy.deepcopy(model.state_dict()), "epoch": epoch}
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:  # ~10 lines per model
            print(f"{desc} epoch {epoch:3d} | train {history['train'][-1]:.5f} | val {history['val'][-1]:.5f} | "
                  f"{(time.time() - t0) * 1000:.0f} ms", flush=True)
    model.load_state_dict(kept["state"])
    return {"history": history, "kept_val": kept["val"], "kept_epoch": kept["epoch"]}


# ---- Behaviour cloning (Phase 1) ---------------------------------------------------------------------------------
def bc_net(dim):
    """The seed's BC MLP: 279,490 parameters at D=1024."""
    return nn.Sequential(nn.Linear(dim, 256), nn.LayerNorm(256), nn.ReLU(),
                         nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2), nn.Tanh())


def train_bc(data, args):
    """MSE regression of expert actions a_t from z-scored z_t with the bc_* knobs (bc_keep: final-epoch weights, as
    the seed's; results/bc-seeds-keep-best). Returns the model (on the CPU), its info and its (mean, std)."""
    torch.manual_seed(args.seed)  # the initial weights: every other draw has its own seeded generator
    z, actions = data["z"], data["actions"]
    E, T = actions.shape[:2]
    if args.bc_split == "episode":  # held-out episodes (ours), or random transitions (the seed's); seed: 80/20
        train_eps, val_eps = split_episodes(E, 0.2, args.seed)
        rows = {k: (eps[:, None] * T + np.arange(T)).ravel() for k, eps in (("train", train_eps), ("val", val_eps))}
    else:
        train_eps, rows = np.arange(E), dict(zip(("train", "val"), split_episodes(E * T, 0.2, args.seed)))
    mean, std = standardizer(z[:, :T], train_eps if args.bc_norm == "train" else np.arange(E))
    X = torch.from_numpy(np.array(z[:, :T], np.float32).reshape(-1, z.shape[-1]))
    X = (X - torch.from_numpy(mean)) / torch.from_numpy(std)
    Y = torch.from_numpy(np.array(actions, np.float32).reshape(-1, 2))
    cache = {k: (X[r].to(args.device), Y[r].to(args.device)) for k, r in rows.items()}
    model = bc_net(z.shape[-1]).to(args.device)

    def batch_loss(idx, split):
        x, y = cache[split]
        return F.mse_loss(model(x[idx]), y[idx])
    optimizer = torch.optim.AdamW if args.bc_optimizer == "adamw" else torch.optim.Adam
    fitted = fit(model, batch_loss, optimizer(model.parameters(), lr=args.bc_lr, weight_decay=args.bc_weight_decay),
                 len(rows["train"]), len(rows["val"]), args.epochs, args.bc_batch_size,
                 schedule_step=args.schedule_step, keep=args.bc_keep, seed=args.seed, desc="bc")
    info = {"params": sum(p.numel() for p in model.parameters()),
            "train_mse": evaluate_loss(model, batch_loss, len(rows["train"]), "train"),
            "val_mse": fitted["kept_val"], "kept_epoch": fitted["kept_epoch"], "epochs": args.epochs,
            "history": fitted["history"], "split": args.bc_split, "train_samples": len(rows["train"]),
            "val_samples": len(rows["val"])}
    return model.cpu(), info, (mean, std)


def bc_policy(model, mean, std):
    """The BC net as a policy: actions (B, 2) from raw embeddings z (B, D), z-scored as in training."""
    @torch.no_grad()
    def act(z, obs):
        return model((z.cpu() - torch.from_numpy(mean)) / torch.from_numpy(std)).numpy()
    return act


# ---- Dynamics (Phases 3, 4c, 4d): residual models f(z, a) = z + delta(z, a) --------------------------------------
class ResBlock(nn.Module):
    """x + net(x), or ReLU(x + net(x)) with post_relu, as the seed's Phase 4d block."""

    def __init__(self, width, post_relu=False):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
                                   nn.Linear(width, width), nn.LayerNorm(width))
        self.post_relu = post_relu

    def forward(self, x):
        x = x + self.block(x)
        return F.relu(x) if self.post_relu else x


class Dynamics(nn.Module):
    """A residual model f(z, a) = z + net([z, a]), z (B, D), a (B, 2). name 'mlp' and 'mlp_rollout5': the seed's
    Phase 3 MLP, Linear(D+2->512) LN ReLU, 2x [Linear(512->512) LN ReLU], Linear(512->D), 1.58M params at D=1024.
    'resblock': its Phase 4d net, Linear(D+2->1024) LN ReLU, 4 ResBlocks, Linear(1024->D), 10.5M params."""

    def __init__(self, name, dim, resblock_relu=False):
        super().__init__()
        if name == "resblock":
            self.net = nn.Sequential(nn.Linear(dim + 2, 1024), nn.LayerNorm(1024), nn.ReLU(),
                                     *[ResBlock(1024, resblock_relu) for _ in range(4)], nn.Linear(1024, dim))
        else:
            self.net = nn.Sequential(nn.Linear(dim + 2, 512), nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 512),
                                     nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 512), nn.LayerNorm(512), nn.ReLU(),
                                     nn.Linear(512, dim))

    def forward(self, z, a):
        return z + self.net(torch.cat([z, a], -1))

    def unrolled_loss(self, zs, a, weights):
        """SmoothL1 of the model unrolled on its own predictions: zs (B, k+1, D), a (B, k, 2), a weight a step."""
        pred, loss = zs[:, 0], 0.0
        for j, w in enumerate(weights):
            pred = self(pred, a[:, j])
            loss = loss + w * F.smooth_l1_loss(pred, zs[:, j + 1])
        return loss


def dynamics_split(n_episodes, args):
    """Training and validation episodes of every dynamics model: a random 10% (ours) or the last 20% (the seed's)."""
    contiguous = args.dyn_split == "contiguous"
    return split_episodes(n_episodes, 0.2 if contiguous else 0.1, args.seed, contiguous)


def train_dynamics(name, data, args, epochs):
    """SmoothL1 on z_{t+1..t+k}, unrolled k steps on the model's own predictions (k = 5 for mlp_rollout5).
    rollout_sampling 'every-start' trains on every (episode, start); 'one-start' on batches of 64 training episodes
    sharing one random start, as the seed's Phase 4c. rollout_val 'every-10th' validates on t0 in range(0, T-k, 2k)."""
    torch.manual_seed(args.seed)  # the initial weights: every other draw has its own seeded generator
    z, actions, device = data["z"], data["actions"], args.device
    E, T = actions.shape[:2]
    k = min(5 if name == "mlp_rollout5" else 1, T)
    train_eps, val_eps = dynamics_split(E, args)
    mean, std = standardizer(z, train_eps, args.dyn_norm == "train")
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    starts = {s: np.array([(e, t) for e in eps for t in range(0, T - k + (n == 1) or 1, n)]) for s, eps, n in
              (("train", train_eps, 1), ("val", val_eps, 2 * k if k > 1 and args.rollout_val == "every-10th" else 1))}
    # the seed's k-step loss weighs step h by (h+1)/k and divides the sum by k: ~0.6x one step's, not k times
    weights = [1.0] * k if args.rollout_loss == "sum" else [(h + 1) / k / k for h in range(k)]
    model = Dynamics(name, z.shape[-1], args.resblock_relu == "on").to(device)
    start_rng = np.random.default_rng([args.seed, 4])  # (seed, 4): a stream apart from (seed, 0-2) of the episodes
    one_start = args.rollout_sampling == "one-start" and k > 1  # the seed's 1-step models saw every transition

    def batch_loss(idx, split):
        if split == "train" and one_start:  # the seed's batches: 64 training episodes sharing one random start
            e = train_eps[idx]
            t = np.full(len(e), start_rng.integers(0, T - k + 1))
        else:
            e, t = starts[split][idx].T
        steps = t[:, None] + np.arange(k + 1)
        zs = (torch.from_numpy(np.array(z[e[:, None], steps], np.float32)) - mean_t) / std_t  # (B, k+1, D)
        a = torch.from_numpy(np.array(actions[e[:, None], steps[:, :k]], np.float32))
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=args.train_dtype == "bf16"):
            return model.unrolled_loss(zs.to(device, non_blocking=True), a.to(device, non_blocking=True), weights)
    n_train, batch_size = (len(train_eps), 64) if one_start else (len(starts["train"]), 256)  # seed: 256
    opt = torch.optim.AdamW(model.parameters(), lr=args.dyn_lr, weight_decay=1e-4)  # seed: AdamW, decay 1e-4
    fitted = fit(model, batch_loss, opt, n_train, len(starts["val"]), epochs, batch_size, grad_clip=args.dyn_grad_clip,
                 schedule_step=args.schedule_step, keep="best", seed=args.seed, desc=f"dynamics {name}")
    return model.cpu(), {"params": sum(p.numel() for p in model.parameters()), "val_loss": fitted["kept_val"],
                         "kept_epoch": fitted["kept_epoch"], "history": fitted["history"], "rollout": k,
                         "rollout_weights": weights, "epochs": epochs, "val_episodes": val_eps.tolist()}, (mean, std)


@torch.no_grad()
def kstep_error(model, z, actions, episodes, model_space, common, k_max=10):
    """Open-loop k-step error, k = 1..k_max: mean L2 of predicted vs true z_{t+k} on `episodes` in the `common` (mean,
    std) space (model_space: the model's), and the copy baseline ||z_t - z_{t+k}|| a model that learned nothing gets."""
    device = next(model.parameters()).device
    mean, std, c_mean, c_std = (torch.from_numpy(x).to(device) for x in (*model_space, *common))
    same = all(np.array_equal(a, b) for a, b in zip(model_space, common))
    T, k_max = actions.shape[1], min(k_max, actions.shape[1])
    errs, copy_z, count = np.zeros(k_max), np.zeros(k_max), 0
    for e in episodes:
        raw = torch.from_numpy(np.array(z[e], np.float32)).to(device)
        a = torch.from_numpy(np.array(actions[e], np.float32)).to(device)
        zs = (raw - mean) / std
        target, starts = zs if same else (raw - c_mean) / c_std, torch.arange(0, T - k_max + 1, device=device)
        pred = zs[starts]
        for j in range(k_max):
            pred = model(pred, a[starts + j])
            out = pred if same else (pred * std + mean - c_mean) / c_std
            errs[j] += (out - target[starts + j + 1]).norm(dim=-1).sum().item()
            copy_z[j] += (target[starts] - target[starts + j + 1]).norm(dim=-1).sum().item()
        count += len(starts)
    return (errs / count).tolist(), (copy_z / count).tolist()


# ---- Planners: CEM and random shooting (CEM with one iteration), batched over episodes ---------------------------
def cem(cost_fn, batch, horizon, action_dim=2, samples=500, elites=50, iterations=5, mean=None, std=None,
        init_std=1.0, min_std=0.05, uniform_first=False, generator=None, device="cpu", noise=None, unbiased=False):
    """Cross-entropy method over action sequences, for `batch` independent problems at once.

    cost_fn(actions (batch, samples, horizon, action_dim)) -> costs (batch, samples).
    1. sample `samples` sequences from N(mean, std) (uniform in [-1, 1] on the first iteration if
       uniform_first), clamped to the action bounds;
    2. score them with cost_fn and keep the `elites` lowest-cost sequences (topk);
    3. refit mean and std to the elites (std over n, n - 1 if unbiased), floored at min_std; repeat `iterations` times.
    Returns (the lowest-cost sequence seen in any iteration (batch, horizon, A), mean, std).
    With iterations=1, elites=1 and uniform_first=True this is random shooting. noise: the standard normal draws
    (iterations, batch, samples, horizon, A) made up front, e.g. for a CUDA graph; else drawn from `generator`.
    """
    shape = (batch, horizon, action_dim)
    mean = torch.zeros(shape, device=device) if mean is None else mean
    std = torch.full(shape, init_std, device=device) if std is None else std
    best, best_cost = None, torch.full((batch,), float("inf"), device=device)
    for i in range(iterations):
        if uniform_first and i == 0:
            actions = torch.rand((batch, samples) + shape[1:], generator=generator, device=device) * 2 - 1
        else:
            draw = noise[i] if noise is not None else torch.randn((batch, samples) + shape[1:], generator=generator,
                                                                   device=device)
            actions = (mean[:, None] + std[:, None] * draw).clamp(-1, 1)
        costs = cost_fn(actions)
        elite_cost, elite_idx = costs.topk(elites, dim=1, largest=False)  # (batch, elites), best first
        elite = actions.gather(1, elite_idx[..., None, None].expand(-1, -1, horizon, action_dim))
        better = elite_cost[:, 0] < best_cost
        best = elite[:, 0] if best is None else torch.where(better[:, None, None], elite[:, 0], best)
        best_cost = torch.minimum(best_cost, elite_cost[:, 0])
        mean = elite.mean(1)
        std = elite.std(1, unbiased=unbiased).clamp_min(min_std) if elites > 1 else torch.full_like(mean, min_std)
    return best, mean, std


def latent_cost(model, z, z_goal, cost="final", dtype=torch.float32):
    """cost_fn for `cem`: L2 distance of the imagined latents to z_goal (both (batch, D), standardised), at the
    last step ('final': ours, and the seed's random shooting) or weighted (t+1)/H over the horizon ('weighted': the
    seed's CEM). dtype bf16/fp16 runs the rollouts under autocast; a model with half weights runs in its dtype."""
    net_dtype = next(model.parameters(), torch.empty(0)).dtype  # fp32 for a model without parameters

    def cost_fn(actions):
        (B, S, H, A), actions = actions.shape, actions.to(net_dtype)  # a half net gets half inputs, cast once
        zz = z[:, None].expand(B, S, -1).reshape(B * S, -1).to(net_dtype)
        goal = z_goal[:, None].expand(B, S, -1).reshape(B * S, -1).float()
        total = torch.zeros(B * S, device=z.device)
        autocast = dtype != torch.float32 and net_dtype == torch.float32
        with torch.no_grad(), torch.autocast(z.device.type, dtype=dtype, enabled=autocast):
            for h in range(H):
                zz = model(zz, actions[:, :, h].reshape(B * S, A))
                weight = float(h == H - 1) if cost == "final" else (h + 1) / H
                if weight:
                    total = total + weight * (zz.float() - goal).norm(dim=-1)
        return total.view(B, S)
    return cost_fn


class MPC:
    """Model-predictive control in latent space, a policy(z, obs): each step plan from z toward the episode's goal
    with `cem` (its `settings`), execute the first action of the elite mean (or of the best sample), replan from the
    last mean shifted one step (its new last step repeated, or 0 with warm_tail 'zero'); each episode starts cold.
    z_goal: {episode seed: (D,) raw z}; dtype 'bf16': bf16 autocast (CUDA: an fp16 copy); graph: one CUDA graph."""

    def __init__(self, model, z_goal, standardisation, settings, *, cost="final", execute="mean",
                 warm_tail="repeat", dtype="fp32", graph=False, seed=0):
        self.device = str(next(model.parameters()).device)
        self.model, self.z_goal, self.settings, self.cost = model, z_goal, settings, cost
        self.execute, self.warm_tail, self.graph = execute, warm_tail, gpu.Graphed(self.plan) if graph else None
        self.mean, self.std = (torch.from_numpy(x).to(self.device) for x in standardisation)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.dtype = torch.float32 if dtype == "fp32" else torch.float16 if "cuda" in self.device else torch.bfloat16
        if self.dtype == torch.float16:  # CUDA: an fp16 copy of the net; autocast would re-cast its weights each call
            self.model = copy.deepcopy(model).half()
        self.warm, self.seconds = None, 0.0

    def standardize(self, z):
        return (torch.as_tensor(z, dtype=torch.float32).to(self.device) - self.mean) / self.std

    def __call__(self, z, obs):
        t0, seeds, s = time.perf_counter(), obs["seed"], self.settings
        z, goal = self.standardize(z), self.standardize(np.stack([self.z_goal[s] for s in seeds]))
        mean = torch.zeros((len(z), s["horizon"], 2), device=self.device)  # cold, as cem's own start
        if obs["step"] > 0:  # warm: the last step's mean, shifted by one
            tail = self.warm[:, -1:] if self.warm_tail == "repeat" else torch.zeros_like(self.warm[:, -1:])
            mean = torch.cat([self.warm[:, 1:], tail], 1)
        with gpu.tf32(self.device):
            if self.graph is None:
                best, self.warm = self.plan(z, goal, mean)
            else:  # the graph cannot draw from the generator: its noise comes in as an input
                noise = torch.randn((s["iterations"], len(z), s["samples"], s["horizon"], 2),
                                    generator=self.generator, device=self.device)
                best, self.warm = self.graph(z, goal, mean, noise)
        self.seconds += time.perf_counter() - t0
        return (self.warm if self.execute == "mean" else best)[:, 0].float().cpu().numpy()

    def plan(self, z, goal, mean, noise=None):
        """One `cem` call: the best sequence and the elite mean, (B, horizon, 2) each."""
        fn = latent_cost(self.model, z, goal, self.cost, self.dtype)
        return cem(fn, len(z), mean=mean, noise=noise, generator=self.generator, device=self.device,
                   **self.settings)[:2]


def gif_episode(args, seed, policy, encoder, steps, expert=None, size=None):
    """One episode rendered at `size` (default frame_size), for a GIF: the `state` encoder renders only here."""
    envs = Envs(1, size or args.frame_size, args.render == "lean", expert)
    return list(run_episodes([seed], policy, encoder, envs, steps, policy is not expert_policy, keep_frames=True))[0]


def evaluate(seeds, policy, encoder, envs, steps, long=0, desc=None):
    """episode_metrics of `policy` on episodes `seeds` of `steps` control steps; for long > 0 also 'standard': the
    same on the first `long` of them over reacher-easy's own 1,000 steps, whose return (the sum of its 0/1 rewards,
    1 inside the target) DMC papers report."""
    metrics = report.episode_metrics(list(run_episodes(seeds, policy, encoder, envs, steps, True, desc=desc)), steps)
    if long:
        metrics["standard"] = evaluate(seeds[:long], policy, encoder, envs, MAX_STEPS)
    return metrics


# ---- Stages ------------------------------------------------------------------------------------------------------
# Stages read and write only files in the run folder, so any can be re-run alone; False: skipped, nothing written.
def exists_skip(args, path, stage):
    """The skip rule of a stage with one output: kept if it exists, unless --force."""
    if os.path.exists(path) and not args.force:
        print(f"{stage}: {path} exists; --force to redo")
        return True
    return False


def saved_and_todo(args, path, key, wanted, stage, complete=lambda part, entry: True):
    """The resume rule of dynamics and plan, which save each part as it ends: the results at `path` (kept under
    --force, so parts not asked for stay) and the parts of `wanted` missing or not complete(part, entry), or all."""
    saved = load_json(path) if os.path.exists(path) else {key: {}}
    todo = [w for w in wanted if args.force or w not in saved[key] or not complete(w, saved[key][w])]
    if not todo:
        print(f"{stage}: {path} has {', '.join(wanted)}; --force to redo")
    return saved, todo


def data_dir(args, expert, epsilon):
    return os.path.join(args.out, "data", dataset_name(expert, epsilon))


def stage_collect(args, encoder, expert=None, epsilon=None):
    """Phase 1 demos (--expert, --epsilon), or with expert and epsilon given, Phase 2 exploration data."""
    expert, epsilon, (i, n) = expert or args.expert, args.epsilon if epsilon is None else epsilon, args.shard
    folder, kind = data_dir(args, expert, epsilon), "explore" if epsilon > 0 else "collect"
    seeds = episode_seeds(kind, args.episodes, args.seed, args.episode_seeds == "seed")
    shard_dir = os.path.join(args.out, "shards", dataset_name(expert, epsilon), f"shard_{i}of{n}")
    if os.path.exists(os.path.join(folder, "meta.json")) and not args.force:
        meta = load_json(os.path.join(folder, "meta.json"))
        check_meta(meta, encoder, folder, args.render, args.steps)
        if meta["seeds"] == sorted(seeds):
            print(f"collect: {folder} exists ({len(seeds)} episodes); --force to redo")
            return False
    if args.force:
        shutil.rmtree(shard_dir, ignore_errors=True)
    collect_shard(args, encoder, shard_dir, seeds[i::n], expert, epsilon)
    if n == 1:
        merge([shard_dir], folder)
        print(f"collect: {len(seeds)} episodes x {args.steps} steps ({expert}, epsilon {epsilon:g}) -> {folder}")
    else:
        print(f"collect: shard {i}/{n} done -> {shard_dir}; run `merge` once all {n} shards are done")


def stage_merge(args, encoder):
    """Merge the `collect --shard i/N` shards of every dataset in OUT/shards into OUT/data."""
    roots = sorted(glob.glob(os.path.join(args.out, "shards", "*")))
    if not roots:
        raise UserError(f"no shards in {args.out}/shards: run `collect --shard i/N` first")
    for root in roots:
        folder = os.path.join(args.out, "data", os.path.basename(root))
        meta = merge(glob.glob(os.path.join(root, "shard_*of*")), folder)
        print(f"merge: {meta['shards']} shards, {meta['episodes']} episodes -> {folder}")


def load_checked(args, encoder, path, made_by, net=None):
    """A checkpoint in `net` (None: the dynamics its meta names) and its standardisation; another encoder's refused."""
    if not os.path.exists(path):
        raise UserError(f"missing {path}: run the `{made_by}` stage first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_meta(ckpt["meta"], encoder, path, args.render)
        net = net or Dynamics(ckpt["meta"]["name"], encoder.dim, ckpt["meta"].get("resblock_relu", False))
        net.load_state_dict(ckpt["state_dict"])
    except UserError:
        raise
    except Exception as e:  # a truncated file, or weights of another shape
        raise UserError(f"{path} is truncated, corrupted or made for another dim ({type(e).__name__}); re-run "
                        f"`{made_by} --force`")
    return net.eval().requires_grad_(False), *(np.array(ckpt["meta"][k], np.float32) for k in ("mean", "std"))


def stage_bc(args, encoder):
    if exists_skip(args, path := os.path.join(args.out, "bc.pt"), "bc"):
        return False
    data = load_dataset(data_dir(args, args.expert, args.epsilon), encoder)
    model, info, (mean, std) = train_bc(data, args)
    print(report.bc_line({"bc": info}))
    save_model(path, model, data, mean, std)
    save_json(os.path.join(args.out, "bc.json"), info)


def stage_eval(args, encoder):
    """BC, both experts and a random policy on the same held-out episodes; GIFs of BC and the expert."""
    if exists_skip(args, path := os.path.join(args.out, "eval.json"), "eval"):
        return False
    bc = bc_policy(*load_checked(args, encoder, os.path.join(args.out, "bc.pt"), "bc", bc_net(encoder.dim)))
    seeds, state = episode_seeds("eval", args.eval_episodes, args.seed), load_encoder("state")
    metrics, random = {}, random_policy(np.random.default_rng(args.seed))
    for name in (*EXPERT_NAMES, "random", "bc"):  # all but BC act on the physics: no rendering, no encoding
        policy, enc = {"random": random, "bc": bc}.get(name, expert_policy), encoder if name == "bc" else state
        envs = (envs_for(args, encoder, len(seeds)) if name == "bc" else  # Envs runs the expert `name`
                Envs(min(len(seeds), 100), expert=name if name in EXPERTS else None))
        metrics[name] = evaluate(seeds, policy, enc, envs, args.steps, args.long_episodes, desc=name)
    results = {"experts": {k: metrics[k] for k in EXPERT_NAMES}, "steps": args.steps,
               "eval": {"bc": metrics["bc"], "random": metrics["random"]}}
    for name, title, policy, expert in (("bc", "BC", bc, None), ("expert", f"expert {args.expert}", expert_policy,
                                                                  args.expert)):  # one more episode each, rendered
        report.save_rollout_gif(os.path.join(args.out, f"rollout_{name}.gif"),
                                gif_episode(args, seeds[0], policy, encoder, args.steps, expert), title)
    save_json(path, results)
    print(report.phase1_table(dict(results, encoder=encoder.info()), args.steps))


def stage_rl(args, encoder):
    """SAC on frozen embeddings standardised with the Phase 1 data's statistics, trained for --rl-steps on episodes
    of its own, then its deterministic policy evaluated on the evaluation episodes; its actor and rl.json are saved."""
    if exists_skip(args, path := os.path.join(args.out, "rl.json"), "rl"):
        return False
    folder = data_dir(args, args.expert, args.epsilon)
    data, t0 = load_dataset(folder, encoder), time.time()
    (mean, std), per_episode = standardizer(data["z"], np.arange(len(data["z"]))), args.steps // SAC_REPEAT * SAC_REPEAT
    agent = sac.SACAgent(encoder.dim, mean, std, SAC_REPEAT, seed=args.seed, device=args.device,
                         capacity=math.ceil(args.rl_steps / per_episode) * (per_episode // SAC_REPEAT),
                         learning_starts=min(5_000, args.rl_steps // 4))  # quick runs learn too
    eval_envs = envs_for(args, encoder, args.eval_episodes, repeat=SAC_REPEAT)
    eval_seeds = episode_seeds("eval", args.eval_episodes, args.seed)
    envs = envs_for(args, encoder, args.rl_envs, repeat=SAC_REPEAT)
    play = partial(run_episodes, policy=agent, encoder=encoder, envs=envs, steps=args.steps, keep_z=True)
    with cpu_threads(1 if args.device == "cpu" and encoder.dim < 512 else None):  # SAC's nets are small; ViT-L's not
        curve = sac.train(agent, play, episode_seeds("rl", math.ceil(args.rl_steps / per_episode), args.seed), envs.n,
                          lambda agent: evaluate(eval_seeds[:args.rl_eval_episodes], agent.greedy, encoder, eval_envs,
                                                 args.steps), args.rl_eval_every)
        final = evaluate(eval_seeds, agent.greedy, encoder, eval_envs, args.steps, args.long_episodes)
    result = {"runs": {"rl": {"curve": curve, "env_steps": agent.env_steps, "updates": agent.updates,
                              "seconds": time.time() - t0}}, "eval": {"rl": final},
              "standardisation": f"the Phase 1 data ({os.path.relpath(folder, args.out)})", "steps": args.steps}
    save_model(os.path.join(args.out, "rl_actor.pt"), agent.nets["actor"], data, mean, std)
    print(f"rl: {agent.env_steps:,} env steps, {agent.updates:,} updates, {time.time() - t0:.0f} s | "
          f"final success {report.fmt_rate(final)}")
    save_json(path, result)
    print(report.rl_section({"rl": result, "encoder": encoder.info()}))


def stage_dynamics(args, encoder):
    """Train --dynamics; a re-run with a subset keeps the other models (`plan` redoes the plans of retrained ones)."""
    path, plan_path = os.path.join(args.out, "dynamics.json"), os.path.join(args.out, "plan.json")
    saved, todo = saved_and_todo(args, path, "dynamics", args.dynamics, "dynamics")
    if not todo:
        return False
    data = load_dataset(data_dir(args, *EXPLORE), encoder, made_by="explore")
    common = standardizer(data["z"], dynamics_split(len(data["z"]), args)[0])  # every model's k-step errors in it
    for name in todo:
        epochs = args.dyn_epochs or {"mlp": 100, "mlp_rollout5": args.rollout_epochs, "resblock": 150}[name]  # seed
        model, info, (mean, std) = train_dynamics(name, data, args, epochs)
        weights = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
        info["digest"] = hashlib.sha256(weights).hexdigest()[:16]  # plans name the weights they were made with
        info["kstep_error"], info["kstep_copy"] = kstep_error(model.to(args.device), data["z"], data["actions"],
                                                              info["val_episodes"], (mean, std), common)
        save_model(os.path.join(args.out, f"dynamics_{name}.pt"), model.cpu(), data, mean, std, name=name,
                   resblock_relu=args.resblock_relu == "on")
        saved["dynamics"][name] = info
        save_json(path, saved)
        plans = load_json(plan_path)["plan"] if os.path.exists(plan_path) else {}
        stale = [c for c in plans if c.endswith("/" + name) and plans[c].get("model") != info["digest"]]
        if stale:
            print(f"dynamics: plan results {', '.join(stale)} were made with the old {name}; re-run `plan`")
    print(report.dynamics_table(saved))


def stage_imagine(args, encoder):
    """Phase 5: an actor-critic learned in imagination through the mlp dynamics (imagine.py), from the Phase 2 data,
    then a Dyna loop of --imagine-steps real steps; evaluated on the evaluation and the planning episodes."""
    if exists_skip(args, path := os.path.join(args.out, "imagine.json"), "imagine"):
        return False
    data = load_dataset(data_dir(args, *EXPLORE), encoder, made_by="explore")
    model, mean, std = load_checked(args, encoder, os.path.join(args.out, "dynamics_mlp.pt"), "dynamics")
    t0, n_episodes, phase2 = time.time(), math.ceil(args.imagine_steps / args.steps), data["actions"].size // 2
    learner = imagine.Imagination(model, mean, std, seed=args.seed, device=args.device,
                                  capacity=phase2 + n_episodes * args.steps)
    for e in range(len(data["z"])):  # the Phase 2 episodes: replay, and the env steps they cost
        learner.add_episode({k: data[k][e] for k in ("z", "actions", "rewards")})
    envs = envs_for(args, encoder, min(args.rl_envs, args.eval_episodes))
    eval_seeds = episode_seeds("eval", args.eval_episodes, args.seed)
    play = partial(run_episodes, policy=learner, encoder=encoder, envs=envs, steps=args.steps, keep_z=True)
    with cpu_threads(1 if args.device == "cpu" and encoder.dim < 512 else None):
        curve = imagine.dyna(learner, play, episode_seeds("rl", n_episodes, args.seed), envs.n,
                             lambda agent: evaluate(eval_seeds[:args.rl_eval_episodes], agent.greedy, encoder, envs,
                                                    args.steps), args.rl_eval_every, pretrain=args.imagine_updates,
                             first_fit=min(2_000, args.imagine_updates))  # the reward head's first fit: fewer in smoke
    seconds, learner.seconds = time.time() - t0, 0.0
    eps = list(run_episodes(eval_seeds, learner.greedy, encoder, envs, args.steps, keep_z=True))
    result = {"eval": report.episode_metrics(eps, args.steps) | {"diagnosis": learner.diagnose(eps)},
              "plan": evaluate(episode_seeds("plan", args.plan_episodes, args.seed), learner.greedy, encoder, envs,
                               args.plan_steps)}
    result["eval"]["ms_per_action"] = 1e3 * learner.seconds / (args.steps * args.eval_episodes + args.plan_steps *
                                                                args.plan_episodes)  # as MPC's: batched over envs
    if args.long_episodes:
        result["eval"]["standard"] = evaluate(eval_seeds[:args.long_episodes], learner.greedy, encoder, envs, MAX_STEPS)
    save_model(os.path.join(args.out, "imagine_actor.pt"), learner.actor, data, mean, std)
    save_json(path, dict(result, curve=curve, refits=learner.refits, env_steps=learner.env_steps, seconds=seconds,
                         updates=learner.updates, phase2_steps=int(phase2),
                         steps=args.steps, plan_steps=args.plan_steps))
    print(report.imagine_section({"imagine": load_json(path), "encoder": encoder.info()}))


def plan_goals(args, encoder, seeds, kind):
    """z_goal (B, D) for the plan episodes `seeds`, and per episode its step and finger distance. expert: what the
    goal expert sees at its closest approach within goal_horizon steps of the same episode. random-run (the seed's
    random shooting): the first frame with reward > 0.9 in 500 random steps, else the last, on held-out 'goal'
    episodes (the seed's goal run was its env's next episode). goal_form: the window there, or that frame x8."""
    encoder = variant(encoder, form=args.goal_form)
    if kind == "expert":
        policy, steps, envs = expert_policy, args.goal_horizon, envs_for(args, encoder, len(seeds), args.goal_expert)
    else:
        seeds, policy, steps = episode_seeds("goal", len(seeds), 0), random_policy(np.random.default_rng(0)), 500
        envs = envs_for(args, encoder, len(seeds))
    eps = list(run_episodes(seeds, policy, encoder, envs, steps, keep_z=True, desc=f"{kind} goals"))
    if kind == "expert":
        at = [1 + int(ep["distances"][1:].argmin()) for ep in eps]
    else:  # z[t] follows action t
        at = [int(hits[0]) + 1 if len(hits) else steps for hits in (np.flatnonzero(ep["rewards"] > 0.9) for ep in eps)]
    info = [{"step": t, "distance": float(ep["distances"][t])} for ep, t in zip(eps, at)]
    return np.stack([ep["z"][t] for ep, t in zip(eps, at)]).astype(np.float32), info


def plan_gif(args, mpc, encoder, seed, steps, title):
    """One more episode of the first CEM model, rendered, beside the goal expert's closest-approach frame."""
    ep = gif_episode(args, seed, mpc, encoder, steps, size=args.plan_frame_size)
    goal = gif_episode(args, seed, expert_policy, load_encoder("state"), args.goal_horizon, args.goal_expert,
                       args.plan_frame_size)
    report.save_rollout_gif(os.path.join(args.out, "rollout_cem.gif"), ep, title,
                            goal["frames"][1 + int(goal["distances"][1:].argmin())])


def make_mpc(args, planner, model, z_goal, standardisation):
    """The MPC of `planner`, 'cem' or 'random' (random shooting: CEM with one uniform iteration keeping its best)."""
    if planner == "random":  # seed Phase 4: 1000 uniform sequences, keep the best
        settings = dict(horizon=args.horizon, samples=args.rs_samples, elites=1, iterations=1, uniform_first=True)
    else:  # seed: horizon 10, 500 samples, 50 elites, 5 iterations
        settings = dict(horizon=args.horizon, samples=args.samples, elites=args.elites, iterations=args.iterations,
                        init_std=args.cem_init_std, unbiased=args.elite_std == "unbiased")
    # the seed's random shooting scored the last step alone, with its random-run goal: --recipe seed keeps both
    cost = "final" if planner == "random" and args.rs_goal == "random-run" else args.cost
    return MPC(model.to(args.device), z_goal, standardisation, settings, cost=cost, execute=args.execute,
               warm_tail=args.warm_tail, dtype=args.plan_dtype, graph=planner == "cem" and args.plan_graph == "on",
               seed=args.seed)


def stage_plan(args, encoder):
    """Random shooting and CEM with each dynamics model on the plan episodes; a pair is saved as soon as it ends."""
    path, gif = os.path.join(args.out, "plan.json"), args.force or not os.path.exists(f"{args.out}/rollout_cem.gif")
    wanted = [c for c in args.plans if c.split("/")[1] in args.dynamics]
    trained = load_json(os.path.join(args.out, "dynamics.json"), made_by="dynamics")["dynamics"]
    made_with = {c: trained.get(c.split("/")[1], {}).get("digest") for c in wanted}  # None: trained by older code
    current = lambda c, entry: entry is not None and made_with[c] in (None, entry.get("model"))  # noqa: E731
    saved, todo = saved_and_todo(args, path, "plan", wanted, "plan", lambda c, entry: current(c, entry) and (
        not args.plan_long_episodes or "standard" in entry))  # made with the model on disk, and whole
    if not todo:
        return False
    models = {name: load_checked(args, encoder, os.path.join(args.out, f"dynamics_{name}.pt"), "dynamics")
              for name in sorted({c.split("/")[1] for c in todo})}  # refused, if at all, before any rollout
    # The seed planned at 224 px in fp32 on data collected at 256 px in fp16: plan_frame_size, plan_precision.
    plan_encoder = variant(encoder, args.plan_precision, frame_size=args.plan_frame_size, form=args.mpc_obs)
    seeds = episode_seeds("plan", args.plan_episodes, args.seed)
    goals = dict.fromkeys(("cem", "random"), plan_goals(args, plan_encoder, seeds, "expert"))
    if args.rs_goal == "random-run" and any(c.startswith("random/") for c in todo):
        goals["random"] = plan_goals(args, plan_encoder, seeds, "random-run")
    for combo in todo:
        planner, name = combo.split("/")
        (z_goal, info), steps = goals[planner], args.rs_plan_steps if planner == "random" else args.plan_steps
        model, mean, std = models[name]
        mpc = make_mpc(args, planner, model, dict(zip(seeds, z_goal)), (mean, std))
        if args.force or not current(combo, saved["plan"].get(combo)):  # else only its 1,000-step part is missing
            eps = list(run_episodes(seeds, mpc, plan_encoder, envs_for(args, plan_encoder, len(seeds)), steps,
                                    keep_z=True, desc=f"plan {combo}"))
            metrics, saved.setdefault("plan_traces", {})[combo] = report.plan_metrics(eps, steps, mpc.seconds, info)
            saved["plan"][combo] = dict(metrics, model=made_with[combo])
            save_json(path, dict(saved, steps=args.plan_steps))
            print(f"plan {combo}: success {report.fmt_rate(saved['plan'][combo])}")
        if planner == "cem" and gif:  # the first CEM model's
            plan_gif(args, mpc, plan_encoder, seeds[0], steps, f"CEM {name}")
            gif = False
        if args.plan_long_episodes:  # a fresh planner: the same goals, over reacher-easy's 1,000 steps
            n, mpc = min(args.plan_long_episodes, len(seeds)), make_mpc(args, planner, model, mpc.z_goal, (mean, std))
            long = evaluate(seeds[:n], mpc, plan_encoder, envs_for(args, plan_encoder, n), MAX_STEPS)
            saved["plan"][combo]["standard"] = dict(long, ms_per_action=1e3 * mpc.seconds / MAX_STEPS / n)
            save_json(path, dict(saved, steps=args.plan_steps))
    print(report.plan_table(dict(saved, encoder=encoder.info()), args.plan_steps))


def stage_probe(args, encoder):
    """Ridge probes of the encoder, of the same architecture with random weights (the seed's baseline) and, for
    pixels, of the state, on the same exploration episodes: every draw is seeded, so each encoder sees them all."""
    if exists_skip(args, path := os.path.join(args.out, "probe.json"), "probe"):
        return False
    seeds, encoders = episode_seeds("probe", args.probe_episodes, args.seed), {"encoder": encoder}
    if encoder.pixels:
        model = random_vjepa2(encoder.model.config, args.seed + 1).to(encoder.device).eval()
        tables = rope.install(model, encoder.positions)  # the same token positions as the encoder's
        encoders["random_init"] = variant(dataclasses.replace(encoder, id=f"random-init({encoder.id})", model=model,
                                                              precision="fp32", rope=tables), encoder.precision)
    z = {}
    for name, enc in encoders.items():
        eps = list(run_episodes(seeds, epsilon_greedy(expert_policy, EXPLORE[1], args.seed), enc,
                                envs_for(args, enc, len(seeds), EXPLORE[0]), args.steps, keep_z=True, desc=name))
        z[name] = np.stack([ep["z"] for ep in eps])
    states = np.stack([ep["states"] for ep in eps])
    if encoder.pixels:  # the oracle column
        z["state"] = states
    probe = {k: report.probe_embeddings(v.reshape(-1, v.shape[-1]).astype(np.float64), states) for k, v in z.items()}
    save_json(path, {"probe": probe})
    print(report.probe_table({"probe": probe, "encoder": encoder.info()}))


def stage_report(args, encoder):
    results = report.write_report(args.out)
    print(f"report: {args.out}/report.md, {args.out}/results.json ({len(results)} sections)")


STAGES = {"collect": stage_collect, "merge": stage_merge, "bc": stage_bc, "eval": stage_eval, "rl": stage_rl,
          "explore": partial(stage_collect, expert=EXPLORE[0], epsilon=EXPLORE[1]), "dynamics": stage_dynamics,
          "imagine": stage_imagine, "plan": stage_plan, "probe": stage_probe, "report": stage_report}


# ---- Main --------------------------------------------------------------------------------------------------------
def run(args):
    """The stage (or all of them) on one run folder, which belongs to one encoder: another is refused first."""
    if args.stage in ("report", "merge"):  # need no encoder: everything comes from the run folder
        return STAGES[args.stage](args, None)
    encoder = load_encoder(args.encoder, args.device, args.precision, args.seed, frame_size=args.frame_size,
                           forward=args.encoder_forward, batch_size=args.batch_size, positions=args.rope_grid)
    if args.compile == "on" and encoder.pixels:  # GPU speed, opt-in: torch.compile at a few batch sizes
        encoder.model.encoder = gpu.Compiled(encoder.model.encoder)
    if os.path.exists(os.path.join(args.out, "config.json")):
        check_meta({"encoder": load_json(os.path.join(args.out, "config.json")).get("encoder_info", {})}, encoder,
                   args.out)
    shard_only = args.stage == "collect" and args.shard[1] > 1  # concurrent shards share no file but their own
    wrote = False
    for name in (ALL if args.stage == "all" else [args.stage]):
        t0 = time.time()
        if STAGES[name](args, encoder) is not False and not shard_only:
            report.record_run(args.out, dict(vars(args), encoder_info=encoder.info()), name, time.time() - t0)
            wrote = True
    if wrote and args.stage != "report":
        report.write_report(args.out)
    return wrote


def run_seeds(args):
    """--seeds: the stage once per training seed in OUT/seed_S, then the table across seeds."""
    for s in args.seeds:
        run(argparse.Namespace(**dict(vars(args), seed=s, seeds=None, out=os.path.join(args.out, f"seed_{s}"))))
    if args.stage in ("all", "report"):
        report.aggregate_seeds(args.out, args.seeds)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}, but torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        run_seeds(args) if args.seeds else run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished episodes and stages are saved in {args.out}; "
              f"re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or args.out}); earlier results are untouched",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
