"""vjepa-reacher: can frozen V-JEPA 2 be the only eyes of a dm_control reacher-easy arm?

What this reproduces (the published findings in shared/seed, "V-JEPA 2 -> Robot Policy"):
  Phase 1   a scripted expert drives reacher-easy, 256x256 frames are rendered, the last 8 frames are
            encoded by frozen V-JEPA 2 ViT-L (facebook/vjepa2-vitl-fpc64-256) into a 1024-d vector,
            and a 279,490-parameter MLP is trained by behaviour cloning and evaluated live.
  Phase 2   epsilon-greedy exploration data (epsilon 0.3, the seed's P-controller).
  Phase 3   residual dynamics MLPs f(z, a) -> z' (1-step, 5-step rollout loss, 10.5M ResBlock).
  Phase 4   latent MPC toward an expert-generated goal embedding: random shooting and CEM.
`--recipe seed` reruns the seed's published code knob for knob (README.md lists each knob, its file and
why ours differs). And where it goes further: a correct Jacobian expert (the seed's P-controller sends a
Cartesian vector to joint motors), a privileged-state oracle encoder (`--encoder state`), statistics over
many episodes (95% Wilson intervals) and training seeds (`--seeds`), soft actor-critic on the frozen
embeddings (the seed's planned next phase), a linear probe, and measured speed (`bench`).

References: V-JEPA 2 (Assran et al. 2025, github.com/facebookresearch/vjepa2), dm_control (Tassa et al.
2018), CEM for MPC as in TD-MPC2 and the vjepa2 notebooks' mpc_utils.py, SAC as in CleanRL.

Copy and paste:
  python vjepa_reacher.py all                                   # everything, V-JEPA 2 ViT-L (GPU advised)
  python vjepa_reacher.py all --quick --encoder tiny            # offline smoke run, minutes on CPU
  python vjepa_reacher.py all --encoder state                   # privileged-state oracle: checks the machinery
  python vjepa_reacher.py all --recipe seed                     # the seed's own code recipe, knob for knob
  python vjepa_reacher.py all --seeds 0 1 2                     # once per training seed, then mean +- 95%
  python vjepa_reacher.py collect --episodes 500                # Phase 1 expert demos -> runs/default/data/
  python vjepa_reacher.py bc                                    # behaviour cloning on those demos
  python vjepa_reacher.py eval --eval-episodes 100              # live evaluation: BC, experts, random
  python vjepa_reacher.py rl --rl-steps 100000                  # SAC on the frozen embeddings
  python vjepa_reacher.py explore                               # Phase 2 exploration data (p, epsilon 0.3)
  python vjepa_reacher.py dynamics                              # Phase 3/4c/4d dynamics models
  python vjepa_reacher.py plan --plan-episodes 20               # Phase 4/4b: random shooting and CEM
  python vjepa_reacher.py probe                                 # what the embedding knows (ridge probe)
  python vjepa_reacher.py report                                # rebuild report.md and plots, no re-running
  python vjepa_reacher.py collect --shard 0/4  (... 3/4), then `merge`   # parallel collection
  python vjepa_reacher.py bench                                 # speed -> results/bench.json (bench.py)
"""
import argparse
import collections
import concurrent.futures
import contextlib
import copy
import glob
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from functools import partial

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported
# Idle torch threads sleep instead of spinning: beside another busy process on 2 cores, spinning made tiny's
# encoding 4x slower and a quick `bench` 2.3x slower (measured here). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ---- Constants -----------------------------------------------------------------------------------------------------
FRAME_SIZE = 256  # seed: 256x256 frames in Phases 1 and 2 (its MPC used 224: --plan-frame-size)
WINDOW = 8  # seed: the last 8 frames form one V-JEPA 2 clip
DEFAULT_ENCODER = "facebook/vjepa2-vitl-fpc64-256"
MAX_STEPS = 1000  # reacher-easy's own time limit: 20 s at 0.02 s per control step
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # V-JEPA 2 was pretrained with ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
LEAN_RENDER = dict(shadow=False, reflection=False, skybox=False)  # 2.3x faster, same arm and target
STATE_NAMES = ("sin_q0", "sin_q1", "cos_q0", "cos_q1", "qvel0", "qvel1", "finger_x", "finger_y", "target_x", "target_y")
SUCCESS_RADIUS = 0.06  # reward 1 inside target radius 0.05 + finger radius 0.01 (reacher-easy)
# Episode seeds (each one fixes reacher's target and arm start), one table; see `episode_seeds`.
# Held-out episodes are the same for every --seed, so training seeds are compared on paired episodes;
# they live below HELD_OUT_END, and training episodes never do.
HELD_OUT = {"eval": 5_000, "plan": 1_000_000, "probe": 2_000_000, "goal": 3_000_000}  # seed: eval on 5000-5099
HELD_OUT_END = 2 ** 24
TRAINING = {"collect": 0, "explore": 1, "rl": 2}  # stage ids for np.random.SeedSequence([--seed, id])
MAX_EPISODES = 995_000  # per range: keeps every held-out range inside its slot, e.g. 5000 + n <= 1,000,000
MAX_SEED = 2 ** 31 - 1
EXPERT_NAMES = ("p", "jacobian")
DYNAMICS = ("mlp", "mlp_rollout5", "resblock")
PLANS = ("random/mlp", "cem/mlp", "cem/mlp_rollout5", "cem/resblock")
STAGE_NAMES = ("collect", "merge", "bc", "eval", "rl", "explore", "dynamics", "plan", "probe", "report")
ALL = ("collect", "bc", "eval", "rl", "explore", "dynamics", "plan", "probe", "report")


class UserError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback."""


# ---- Options -------------------------------------------------------------------------------------------------------
# They come first, as CleanRL's Args do, so that --help and a bad option answer at once,
# before torch loads. Defaults are ours; `--recipe seed` fills every knob that differs from the
# seed's published code with the seed's value (each help line gives both, and README.md why).
def number(s, cast, what, low, high=math.inf, strict=False):
    """An argparse type (with partial): a finite int or float (`cast`) in [low, high], or (low, high] if strict."""
    try:
        v = cast(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and (v > low if strict else v >= low) and v <= high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


positive_int = partial(number, cast=int, what="an integer > 0", low=0, strict=True)
nonneg_float = partial(number, cast=float, what="a finite number >= 0", low=0)
positive_float = partial(number, cast=float, what="a finite number > 0", low=0, strict=True)
unit_float = partial(number, cast=float, what="a number in [0, 1]", low=0, high=1)
seed_int = partial(number, cast=int, what=f"an integer in [0, 2**31 - 1 = {MAX_SEED}]", low=0, high=MAX_SEED)


def shard_spec(s):
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def encoder_name(s):
    """state, tiny, a local folder, or a hub id owner/name that names V-JEPA 2."""
    if s in ("state", "tiny") or os.path.isdir(s):
        return s
    if s.startswith((".", "/", "~")) or s.count("/") > 1:  # a path, since a hub id is owner/name
        raise argparse.ArgumentTypeError(f"--encoder {s}: no such folder")
    owner_and_name = re.fullmatch(r"[\w.-]+/[\w.-]+", s)
    if not owner_and_name or "vjepa2" not in s.lower():
        raise argparse.ArgumentTypeError(f"unknown encoder {s!r}: use state, tiny, a V-JEPA 2 hub id "
                                         f"(e.g. {DEFAULT_ENCODER}) or a local checkpoint folder")
    return s


# --quick: smoke-sized runs on 2 CPU cores (timings in README.md). Planner sizes shrink the most because
# CEM on the 8.4M-param resblock costs ~17 GFLOP per 1,000 imagined steps.
QUICK = dict(episodes=100, eval_episodes=20, steps=100, epochs=50, dyn_epochs=10, rollout_epochs=10,
             plan_episodes=4, plan_steps=30, samples=64, elites=8, rs_samples=128, probe_episodes=8,
             goal_horizon=30, rl_steps=2000, rl_eval_every=1000, rl_eval_episodes=5)
# The seed's published code, knob by knob (shared/seed_audit.md rows 1-23, checked against its files).
RECIPES = {"ours": {}, "seed": dict(
    bc_optimizer="adam", bc_lr=3e-4, bc_weight_decay=0.0, bc_batch_size=512, bc_split="transition",
    bc_norm="all", bc_keep="final", schedule_step="epoch",
    dyn_lr=3e-4, dyn_grad_clip=1.0, dyn_split="contiguous", dyn_norm="none", rollout_loss="weighted",
    rollout_sampling="one-start", rollout_epochs=150, resblock_relu="on",
    cem_init_std=0.5, warm_tail="zero", cost="weighted", execute="best", plan_steps=200,
    goal_expert="p", goal_horizon=300, goal_form="frame", mpc_obs="frame", rs_goal="random-run",
    plan_frame_size=224, episode_seeds="seed", precision="half", plan_precision="fp32",
    encoder_forward="full")}


def run_options(p):
    """Where the run goes, what encodes, which recipe, seeds and devices."""
    a = p.add_argument
    a("--out", default="runs/default", help="run folder; stages talk only through files in it")
    a("--encoder", type=encoder_name, default=DEFAULT_ENCODER, help="V-JEPA 2 hub id or local folder, `tiny` or "
      "`state`")
    a("--recipe", choices=list(RECIPES), default="ours", help="`seed` sets every knob below marked 'seed:' to the "
      "seed's published code; options you pass yourself are kept")
    a("--quick", action="store_true", help="smoke-sized preset, minutes on 2 CPU cores: " +
      ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    a("--seed", type=seed_int, default=0, help="training seed in [0, 2**31 - 1]: seeds torch, numpy and the "
      "training episodes; evaluation episodes are the same for every seed (see episode_seeds)")
    a("--seeds", type=seed_int, nargs="+", default=None, help="run the stage once per training seed, in "
      "OUT/seed_S, then write OUT/seeds.json and OUT/seeds.md (mean and 95%% interval across seeds)")
    a("--device", default="auto", help="torch device for the encoder, training and planning; auto = cuda if "
      "available")
    a("--render-workers", type=int, default=-1, help="processes that step and render environments; 0 = in this "
      "process; -1 = auto (one per 2 spare cores, 0 on 2 cores)")
    a("--force", action="store_true", help="re-run stages whose outputs exist (otherwise they are skipped)")
    a("--bench-out", default=None, help="folder for bench.json and bench.md (default: results/, or --out with "
      "--quick, so a smoke run never overwrites the committed numbers)")


def data_options(p):
    g = p.add_argument_group("data (Phases 1 and 2)").add_argument
    g("--expert", choices=EXPERT_NAMES, default="jacobian", help="demo expert; `p` is the seed's P-controller")
    g("--episodes", type=positive_int, default=500, help="episodes to collect (seed: 500)")
    g("--eval-episodes", type=positive_int, default=100, help="live evaluation episodes (seed: 100)")
    g("--steps", type=positive_int, default=200, help=f"control steps per episode (seed: 200, at most {MAX_STEPS})")
    g("--epsilon", type=unit_float, default=0.0, help="probability of a uniform random action during `collect`")
    g("--explore-expert", choices=EXPERT_NAMES, default="p", help="expert for exploration data (seed: p)")
    g("--explore-epsilon", type=unit_float, default=0.3, help="epsilon for exploration data (seed: 0.3)")
    g("--episode-seeds", choices=["ours", "seed"], default="ours", help="training episode seeds. ours: a 32-bit "
      "hash of (--seed, stage), exploration disjoint from the demos. seed: 0..N-1 for demos and again for "
      "exploration, as the seed's code did (its epsilon draws were unseeded; ours are seeded)")
    g("--shard", type=shard_spec, default=(0, 1), help="collect only shard i of N (seeds i, i+N, ...); then `merge`")
    g("--batch-size", type=positive_int, default=32, help="encoder batch, and episodes stepped together (seed: 32)")
    g("--frame-size", type=positive_int, default=FRAME_SIZE, help="rendered frame size for data, BC and RL "
      "(seed: 256)")
    g("--precision", choices=["auto", "fp32", "bf16", "fp16", "half"], default="auto", help="encoder precision "
      "for data and evaluation. auto: fp16 autocast on CUDA, bf16 autocast on CPUs with native bf16. half: fp16 "
      "weights, as the seed's collection (ours: auto)")
    g("--encoder-forward", choices=["encoder", "full"], default="encoder", help="run only V-JEPA 2's encoder, or "
      "the full model with its predictor as the seed did (same embedding, more compute; ours: encoder)")
    g("--store-dtype", choices=["float32", "float16"], default="float32", help="embedding storage; float16 halves "
      "the disk")
    g("--full-render", action="store_true", help="render with shadows, reflections and skybox (2.3x slower)")


def bc_options(p):
    g = p.add_argument_group("behaviour cloning (Phase 1)").add_argument
    g("--epochs", type=positive_int, default=100, help="BC epochs (seed: 100)")
    g("--bc-optimizer", choices=["adamw", "adam"], default="adamw", help="seed: adam; ours: adamw")
    g("--bc-lr", type=positive_float, default=1e-3, help="BC peak learning rate (seed: 3e-4; ours: 1e-3)")
    g("--bc-weight-decay", type=nonneg_float, default=1e-4, help="BC weight decay (seed: 0; ours: 1e-4)")
    g("--bc-batch-size", type=positive_int, default=256, help="BC minibatch (seed: 512; ours: 256)")
    g("--bc-split", choices=["episode", "transition"], default="episode", help="validation split. seed: random "
      "transitions (neighbouring frames leak across it); ours: whole episodes")
    g("--val-frac", type=unit_float, default=0.2, help="validation fraction for BC (seed: 0.2; ours: 0.2)")
    g("--bc-keep", choices=["final", "best"], default="final", help="weights kept: the final epoch's (seed and "
      "ours: held-out MSE does not track closed-loop success, results/bc-seeds) or the best validation epoch's")
    g("--bc-norm", choices=["train", "all", "none"], default="train", help="z-score BC inputs with statistics of "
      "the training episodes (ours), of all samples (seed), or not at all")
    g("--schedule-step", choices=["batch", "epoch"], default="batch", help="cosine learning-rate decay stepped per "
      "batch (ours) or per epoch (seed)")


def dynamics_options(p):
    g = p.add_argument_group("dynamics (Phases 3, 4c, 4d)").add_argument
    g("--dynamics", nargs="+", choices=DYNAMICS, default=list(DYNAMICS), help="dynamics models to train and plan "
      "with")
    g("--dyn-epochs", type=positive_int, default=None, help="epochs of every dynamics model (default: 100 for "
      "mlp, --rollout-epochs for mlp_rollout5, 150 for resblock, as the seed)")
    g("--rollout-epochs", type=positive_int, default=100, help="epochs of mlp_rollout5 (seed: 150; ours: 100, it "
      "makes ~30x more updates per epoch, see --rollout-sampling)")
    g("--dyn-lr", type=positive_float, default=1e-3, help="AdamW peak learning rate (seed: 3e-4; ours: 1e-3)")
    g("--dyn-batch-size", type=positive_int, default=256, help="dynamics minibatch (seed: 256)")
    g("--dyn-grad-clip", type=nonneg_float, default=0.0, help="gradient-norm clip, 0 = none (seed: 1.0; ours: 0)")
    g("--dyn-split", choices=["random", "contiguous"], default="random", help="validation episodes: a random 10%% "
      "(ours) or the last 20%% (seed: episodes 400-499 of 500)")
    g("--dyn-norm", choices=["train", "none"], default="train", help="standardise latents with training "
      "statistics (ours) or use raw latents (seed)")
    g("--rollout", type=positive_int, default=None, help="override the rollout length of every model "
      "(mlp_rollout5: 5)")
    g("--rollout-loss", choices=["sum", "weighted"], default="sum", help="k-step loss: plain sum over steps (ours) "
      "or step h weighted (h+1)/k, summed, divided by k (seed)")
    g("--rollout-sampling", choices=["every-start", "one-start"], default="every-start", help="k-step batches: every "
      "start of every episode (ours) or 64 episodes per batch sharing one random start (seed)")
    g("--resblock-relu", choices=["off", "on"], default="off", help="ReLU after each ResBlock's skip-add: "
      "ReLU(x + net(x)) (seed: on; ours: off, a plain residual stream)")


def plan_options(p):
    g = p.add_argument_group("planning (Phases 4, 4b)").add_argument
    g("--plans", nargs="+", choices=PLANS, default=list(PLANS), help="planner/model pairs for `plan`")
    g("--plan-episodes", type=positive_int, default=20, help="MPC episodes per planner (seed: 1, on seed 42)")
    g("--plan-steps", type=positive_int, default=100, help="MPC episode length (seed: 200 for CEM, 100 for random "
      "shooting; ours: 100)")
    g("--horizon", type=positive_int, default=10, help="planning horizon (seed: 10)")
    g("--samples", type=positive_int, default=500, help="CEM samples (seed: 500)")
    g("--elites", type=positive_int, default=50, help="CEM elites (seed: 50)")
    g("--iterations", type=positive_int, default=5, help="CEM iterations (seed: 5)")
    g("--rs-samples", type=positive_int, default=1000, help="random-shooting samples (seed: 1000)")
    g("--cost", choices=["final", "sum", "weighted"], default="final", help="L2 to z_goal at the last imagined "
      "step (ours; the seed's random shooting), summed over the horizon, or summed with weights (t+1)/H (the "
      "seed's CEM)")
    g("--cem-init-std", type=positive_float, default=1.0, help="CEM sampling std at every new step (seed: 0.5; "
      "ours: 1.0)")
    g("--cem-std", choices=["reset", "carry"], default="reset", help="at each new step, reset the std to "
      "--cem-init-std (seed and ours) or carry the last step's std, shifted")
    g("--warm-tail", choices=["repeat", "zero"], default="repeat", help="warm start: the previous mean shifted by "
      "one step, its last step repeated (ours) or zero (seed)")
    g("--execute", choices=["mean", "best"], default="mean", help="executed action: first action of the final "
      "elite mean (ours) or of the best sample seen in any iteration (seed)")
    g("--goal-expert", choices=EXPERT_NAMES, default=None, help="expert that makes the goal (seed: p; ours: "
      "--expert)")
    g("--goal-horizon", type=positive_int, default=None, help="steps the goal expert runs (seed: 300; ours: "
      "--plan-steps)")
    g("--goal-form", choices=["window", "frame"], default="window", help="goal embedding: the 8-frame window at "
      "the expert's closest approach (ours) or that one frame repeated x8 (seed)")
    g("--mpc-obs", choices=["window", "frame"], default="window", help="what MPC encodes at each step: the sliding "
      "8-frame window its dynamics were trained on (ours) or the current frame repeated x8 (seed)")
    g("--rs-goal", choices=["expert", "random-run"], default="expert", help="random-shooting goal: the expert goal "
      "(ours) or, as the seed, the first frame with reward > 0.9 in 500 random steps of another episode (else "
      "the last)")
    g("--plan-frame-size", type=positive_int, default=None, help="frame size for goals and MPC observations (seed: "
      "224; ours: --frame-size)")
    g("--plan-precision", choices=["auto", "fp32", "bf16", "fp16", "half"], default=None, help="encoder precision "
      "in MPC (seed: fp32; ours: --precision)")
    g("--plan-bf16", action="store_true", help="run the planner's dynamics rollouts in bf16 (fp16 on CUDA)")
    g("--probe-episodes", type=positive_int, default=20, help="episodes rendered for the probe")


def rl_options(p):
    g = p.add_argument_group("reinforcement learning (SAC on frozen embeddings)").add_argument
    g("--rl-steps", type=positive_int, default=100_000, help="environment steps (= the seed's 500 demos x 200). "
      "Cost: steps / --action-repeat encoded windows (50k at the defaults, half of Phase 1's collection) and as "
      "many SAC updates; about 12 min with `state` on this 2-core CPU, hours with ViT-L on a CPU")
    g("--rl-envs", type=positive_int, default=8, help="environments stepped in lockstep, encoded as one batch")
    g("--action-repeat", type=positive_int, default=2, help="repeat each action this many steps (DrQ: 2 for reacher)")
    g("--rl-demos", action="store_true", help="also sample half of each batch from the Phase 1 demos (as RLPD)")
    g("--rl-eval-every", type=positive_int, default=10_000, help="environment steps between learning-curve "
      "evaluations")
    g("--rl-eval-episodes", type=positive_int, default=10, help="episodes per learning-curve point")


def build_parser():
    p = argparse.ArgumentParser(prog="vjepa_reacher.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=list(STAGE_NAMES) + ["all", "bench"],
                   help="what to run; `all` runs " + " -> ".join(ALL))
    for add_options in (run_options, data_options, bc_options, dynamics_options, plan_options, rl_options):
        add_options(p)
    return p

def given_options(argv):
    """The options the user typed (even at their default values): a parse in which nothing has a default."""
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = given_options(argv)
    if args.quick:  # the presets only fill options the user left at their defaults; sizes first
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(args, k, v)
    for k, v in RECIPES[args.recipe].items():
        if k not in explicit and not (args.quick and k in QUICK):
            setattr(args, k, v)
    args.goal_expert = args.goal_expert or args.expert
    args.goal_horizon = args.goal_horizon or args.plan_steps
    args.plan_frame_size = args.plan_frame_size or args.frame_size
    args.plan_precision = args.plan_precision or args.precision
    if max(args.steps, args.plan_steps, args.goal_horizon) > MAX_STEPS:
        parser.error(f"--steps, --plan-steps and --goal-horizon must be at most {MAX_STEPS} (reacher's time limit)")
    if max(args.episodes, args.eval_episodes, args.plan_episodes, args.probe_episodes) > MAX_EPISODES:
        parser.error(f"at most {MAX_EPISODES:,} episodes per range")
    if args.elites > args.samples:
        parser.error(f"--elites ({args.elites}) must not exceed --samples ({args.samples})")
    for k in ("frame_size", "plan_frame_size"):
        if getattr(args, k) % 16:
            parser.error(f"--{k.replace('_', '-')} must be a multiple of 16 (V-JEPA 2's patch), got {getattr(args, k)}")
    if args.render_workers < -1:
        parser.error(f"--render-workers must be -1 (auto), 0 or more, got {args.render_workers}")
    args.command = "python vjepa_reacher.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


if __name__ == "__main__":
    parse_args()  # --help and bad options answer here, before torch loads; main() parses again below

import numpy as np  # noqa: E402  (after the options, on purpose: see above)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

# The seed's published figures, shown beside ours in every report.
SEED_PHASE1 = {"bc": dict(success=0.20, reward=66.4), "p": dict(success=0.20, reward=67.6),
               "random": dict(success=0.02, reward=0.0)}
SEED_PHASE4 = {  # the seed's Phase 4 table: one 200-step episode each (random shooting: 100 steps)
    "random/mlp": dict(reward=0.0),
    "cem/mlp": dict(params="~1.2M", val_loss="~0.01", min_dist=7.80, improvement=0.413, reward=6.0),
    "cem/mlp_rollout5": dict(min_dist=9.55, improvement=0.314, reward=0.0),
    "cem/resblock": dict(params="10.5M", val_loss="0.0137", min_dist=9.22, improvement=0.115, reward=0.0),
}


# ---- Small plumbing: atomic writes, JSON, seeding ------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block finishes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    folder = os.path.dirname(os.path.abspath(path))
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


def load_json(path, made_by=None):
    if not os.path.exists(path):
        raise UserError(f"missing {path}" + (f": run the `{made_by}` stage first" if made_by else ""))
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupted ({e}); delete it and re-run the stage that made it")


def save_model(path, model, meta):
    """state_dict + plain metadata, loadable with torch.load(weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def load_model(path, made_by):
    if not os.path.exists(path):
        raise UserError(f"missing {path}: run the `{made_by}` stage first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupted ({type(e).__name__}); re-run `{made_by} --force`")


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def wilson(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(x):
    """Mean and 95% normal-approximation half-width."""
    x = np.asarray(x, dtype=np.float64)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return float(x.mean()), float(half)


# ---- Environment and experts ---------------------------------------------------------------------------------------
def make_env(seed=0):
    """dm_control reacher-easy: 2 joint motors in [-1, 1], target radius 0.05 m, 0.02 s control step."""
    from dm_control import suite
    return suite.load("reacher", "easy", task_kwargs={"random": seed})


def reset_env(env, seed):
    """Reuse one env (and its GL context) for many episodes: reseed the task, then reset. This gives exactly
    the state of a fresh suite.load with that seed (checked against the seed's code)."""
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
    """Renders any reacher physics from camera 0 at size x size. Lean turns off shadows, reflections, skybox.

    All envs render through this one physics and Camera: their state (joints, target position and size)
    is copied in and forward kinematics rerun. A GL context per env would cost ~80 MB and ~0.5 s
    (measured), and physics.render builds a new Camera on every call (~2 ms of a ~6 ms frame)."""

    def __init__(self, size=FRAME_SIZE, lean=True):
        from dm_control.mujoco import Camera
        self.physics = make_env(0).physics
        self.camera = Camera(self.physics, size, size, camera_id=0)
        self.flags = LEAN_RENDER if lean else None

    def __call__(self, physics):
        shared = self.physics
        shared.model.geom_pos[:] = physics.model.geom_pos
        shared.model.geom_size[:] = physics.model.geom_size
        shared.data.qpos[:] = physics.data.qpos
        shared.data.qvel[:] = physics.data.qvel
        shared.forward()
        # The Camera reuses one pixel buffer: copy, or every frame kept in a window would be the latest one.
        return self.camera.render(render_flag_overrides=self.flags).copy()

    def gl_renderer(self):
        """The GL_RENDERER string of this context: which rasteriser actually draws (llvmpipe = CPU)."""
        from OpenGL import GL
        with contextlib.suppress(Exception), self.physics.contexts.gl.make_current():
            return GL.glGetString(GL.GL_RENDERER).decode()
        return "unknown"


def p_expert(physics):
    """The seed's P-controller, kept faithful: a Cartesian error vector sent straight to two joint motors."""
    finger, target = finger_and_target(physics)
    return np.clip(5.0 * (target - finger), -1, 1)  # seed: gain 5.0


def jacobian_expert(physics, kp=400.0, kd=0.1):
    """Jacobian-transpose PD: joint torques tau = kp * J^T (target - finger) - kd * qvel.

    J (2 x nv) maps joint velocities to fingertip xy velocity, so J^T maps a Cartesian pull to joint
    torques. kp=400, kd=0.1 reached 100/100 final-step successes when tuned here (gear is 0.05).
    """
    import mujoco
    jacp = np.zeros((3, physics.model.nv))
    finger_id = physics.model.name2id("finger", "geom")
    mujoco.mj_jacGeom(physics.model.ptr, physics.data.ptr, jacp, None, finger_id)
    finger, target = finger_and_target(physics)
    tau = kp * jacp[:2].T @ (target - finger) - kd * physics.data.qvel
    return np.clip(tau, -1, 1)


EXPERTS = {"p": p_expert, "jacobian": jacobian_expert}


class EnvPool:
    """What Envs and EnvWorkers share: used as `with make_envs(...) as envs`, they close on leaving the block."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Envs(EnvPool):
    """n reacher-easy envs in this process, stepped in lockstep; `EnvWorkers` is the same in K processes.

    reset(seeds) and step(actions, idx) return obs: state (B, S), frame (B, H, W, 3) uint8 when
    frame_size is set, and expert (B, 2), the expert's action for the current state, when `expert` is named
    (experts read the physics, so they run where the physics lives). idx picks which envs step.
    """

    def __init__(self, n, frame_size=None, lean=True, expert=None):
        self.n, self.envs = n, [make_env(0) for _ in range(n)]
        self.renderer = Renderer(frame_size, lean) if frame_size else None
        self.expert = EXPERTS[expert] if expert else None

    def observe(self, idx):
        physics = [self.envs[i].physics for i in idx]
        obs = {"state": np.stack([reacher_state(p) for p in physics])}
        if self.renderer:
            obs["frame"] = np.stack([self.renderer(p) for p in physics])
        if self.expert:
            obs["expert"] = np.stack([self.expert(p) for p in physics])
        return obs

    def reset(self, seeds):
        for env, s in zip(self.envs, seeds):
            reset_env(env, int(s))
        return self.observe(range(len(seeds)))

    def step(self, actions, idx, repeat=1):
        """Step envs idx with actions (len(idx), 2), each repeated `repeat` times; returns obs, summed rewards."""
        rewards = np.zeros(len(idx), np.float32)
        for j, i in enumerate(idx):
            for _ in range(repeat):
                rewards[j] += self.envs[i].step(actions[j]).reward
        return self.observe(idx), rewards

    def groups(self, n):
        """Two halves of the first n envs: one steps while the other's windows encode."""
        return [g for g in np.array_split(np.arange(n), 2) if len(g)]

    def gl_renderer(self):
        return self.renderer.gl_renderer() if self.renderer else "none"


def env_worker(conn, n, frame_size, lean, expert, shm_name):
    """One render worker: owns n envs and a GL context; writes frames into shared memory, rest by pipe."""
    from multiprocessing import shared_memory
    envs = Envs(n, frame_size, lean, expert)
    shm = shared_memory.SharedMemory(name=shm_name) if frame_size else None
    frames = np.ndarray((n, frame_size, frame_size, 3), np.uint8, shm.buf) if shm else None
    conn.send(envs.gl_renderer())
    while True:
        cmd, arg, repeat = conn.recv()
        if cmd == "close":
            break
        if cmd == "reset":
            obs, rewards = envs.reset(arg), None
        else:
            obs, rewards = envs.step(arg, range(len(arg)), repeat)
        if frames is not None:
            frames[:len(arg)] = obs.pop("frame")
        conn.send((obs, rewards))
    if shm:
        shm.close()


class EnvWorkers(EnvPool):
    """`Envs` spread over K worker processes that step their share in parallel (same interface).

    A small multiprocessing design rather than gymnasium's AsyncVectorEnv(shared_memory=True): the experts
    need the physics inside the worker, every stage needs the privileged state next to the frame, and
    one shared renderer per worker keeps one GL context per process; that is ~60 lines here, while
    AsyncVectorEnv would need a gym Env wrapper, spaces and info plumbing for the same. Frames come back
    through shared memory, the small arrays through the pipe. Same seeds give byte-identical data (tested).
    """

    def __init__(self, n, k, frame_size=None, lean=True, expert=None):
        import multiprocessing as mp
        from multiprocessing import shared_memory
        self.n, self.frame_size = n, frame_size
        self.sizes = [len(a) for a in np.array_split(np.arange(n), min(k, n))]
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no inherited GL or torch threads
        self.shms, self.conns, self.procs = [], [], []
        for size in self.sizes:
            shm = shared_memory.SharedMemory(create=True, size=size * frame_size ** 2 * 3) if frame_size else None
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=env_worker, args=(child, size, frame_size, lean, expert,
                                                        shm.name if shm else None), daemon=True)
            proc.start()
            self.shms.append(shm)
            self.conns.append(parent)
            self.procs.append(proc)
        self.renderers = [c.recv() for c in self.conns]
        self.starts = np.cumsum([0] + self.sizes)

    def _send(self, cmd, values, idx, repeat=1):
        """Send each worker its rows of values (those of idx in its range: a prefix of its envs)."""
        idx, sent = np.asarray(idx), []
        for w, (lo, hi) in enumerate(zip(self.starts[:-1], self.starts[1:])):
            mine = (idx >= lo) & (idx < hi)
            if mine.any():
                if not np.array_equal(idx[mine], np.arange(lo, lo + mine.sum())):
                    raise ValueError("EnvWorkers steps a prefix of each worker's envs")
                self.conns[w].send((cmd, values[mine], repeat))
                sent.append((w, int(mine.sum())))
        return sent

    def _gather(self, sent):
        """Each worker's reply: frames from its shared memory, the rest through its pipe, joined in order."""
        observations, rewards = [], []
        for w, count in sent:
            obs, reward = self.conns[w].recv()
            if self.frame_size:
                size = self.frame_size
                obs["frame"] = np.ndarray((self.sizes[w], size, size, 3), np.uint8, self.shms[w].buf)[:count].copy()
            observations.append(obs)
            rewards.append(reward)
        obs = {k: np.concatenate([o[k] for o in observations]) for k in observations[0]}
        return obs, None if rewards[0] is None else np.concatenate(rewards)  # reset has no rewards

    def reset(self, seeds):
        return self._gather(self._send("reset", np.asarray(seeds), np.arange(len(seeds))))[0]

    def step(self, actions, idx, repeat=1):
        return self._gather(self._send("step", np.asarray(actions), idx, repeat))

    def groups(self, n):
        """Whole workers per group, so one group's workers step while the other group encodes."""
        live = [w for w in range(len(self.sizes)) if self.starts[w] < n]
        halves = [h for h in np.array_split(live, 2) if len(h)] if len(live) > 1 else [live]
        return [np.arange(self.starts[h[0]], min(self.starts[h[-1] + 1], n)) for h in halves]

    def gl_renderer(self):
        return self.renderers[0]

    def close(self):
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("close", None, 1))
        for proc in self.procs:
            proc.join(timeout=10)
        for shm in self.shms:
            if shm:
                shm.close()
                shm.unlink()


def render_workers(requested):
    """-1 (auto): one worker per 2 cores beyond the 2 that the encoder and main loop use; none on 2 cores."""
    return max(0, ((os.cpu_count() or 2) - 2) // 2) if requested < 0 else requested


def make_envs(n, workers=0, frame_size=None, lean=True, expert=None):
    """n envs in this process, or spread over `workers` render processes; use as `with make_envs(...) as envs`,
    so worker processes and shared memory are released even on an error."""
    workers = min(workers, n)
    return EnvWorkers(n, workers, frame_size, lean, expert) if workers > 0 else Envs(n, frame_size, lean, expert)


# ---- Policies ------------------------------------------------------------------------------------------------------
# policy(z, obs) -> actions (B, 2). z is (B, D) or None; obs holds the state, expert and seed.
def expert_policy(z, obs):
    """The expert's action, computed where the physics lives (Envs(expert=...))."""
    return obs["expert"]


def random_policy(rng):
    def act(z, obs):
        return rng.uniform(-1, 1, size=(len(obs["state"]), 2))
    return act


# ---- Frame window and encoders -------------------------------------------------------------------------------------
def new_window(first):
    """The last WINDOW observations; at reset the first one is repeated to fill it."""
    return collections.deque([first] * WINDOW, maxlen=WINDOW)


def window_array(window, form="window"):
    """A window as an array (8, ...): the sliding window, or its newest frame repeated x8 (the seed's MPC)."""
    return np.stack(window) if form == "window" else np.repeat(window[-1][None], WINDOW, 0)


def windows_from_frames(frames, form="window"):
    """Frames (T+1, ...) -> the window seen at every step (T+1, WINDOW, ...), padded as in an episode."""
    window, windows = new_window(frames[0]), []
    for t, f in enumerate(frames):
        if t:
            window.append(f)
        windows.append(window_array(window, form))
    return np.stack(windows)


def tiny_config():
    """A small random VJEPA2 config: the same class and code path as ViT-L, for offline runs and tests."""
    from transformers import VJEPA2Config
    return VJEPA2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
                        patch_size=32, crop_size=FRAME_SIZE, frames_per_clip=WINDOW, tubelet_size=2,
                        pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=4,
                        pred_num_mask_tokens=2, num_pooler_layers=1)


def cpu_has_bf16():
    """Native bf16 matmuls (AVX512-BF16 or AMX); torch exposes the check only as a private helper."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def choose_precision(device, precision="auto", hidden_size=1024):
    """fp16 autocast on CUDA; bf16 autocast on CPUs with native bf16 (ViT-L measured here: 4.5 s -> 2.6 s a
    window). `half` casts the weights themselves to fp16, as the seed did."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    if hidden_size < 512:  # measured: bf16 makes the 64-d `tiny` slower (casts outweigh its small matmuls)
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


class Encoder:
    """What `load_encoder` returns: a frozen model (None for `state`), its id, embedding size and precision.
    frame_size is the frame size this run feeds it (`encode` refuses others)."""

    def __init__(self, id, dim, model=None, device="cpu", precision="fp32", config=None, frame_size=FRAME_SIZE,
                 forward="encoder"):
        self.id, self.dim, self.model, self.device = id, dim, model, device
        self.precision, self.config, self.frame_size, self.forward = precision, config, frame_size, forward

    @property
    def pixels(self):
        return self.model is not None

    def info(self):
        return {"id": self.id, "dim": self.dim, "precision": self.precision}

    def variant(self, precision=None, frame_size=None):
        """The same model at another precision or frame size (the seed's MPC: fp32, 224 px)."""
        precision = choose_precision(self.device, precision or self.precision, self.dim)
        model = self.model
        if model is not None and (precision == "half") != (self.precision == "half"):
            # The weights change dtype: cast a copy, so that this encoder keeps its own.
            model = copy.deepcopy(model).to(torch.float16 if precision == "half" else torch.float32)
        return Encoder(self.id, self.dim, model, self.device, precision, self.config, frame_size or self.frame_size,
                       self.forward)


def hub_reachable(timeout=3.0):
    """One TCP connection to the Hub's endpoint, so an offline machine fails in seconds, not after retries."""
    import socket
    import urllib.parse
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(name_or_path):
    """VJEPA2Model.from_pretrained: the local cache first, then the Hub if it answers."""
    from transformers import VJEPA2Model
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the one-line error below says it all
    try:
        return VJEPA2Model.from_pretrained(name_or_path, attn_implementation="sdpa", local_files_only=True)
    except (OSError, ValueError) as e:
        first = e
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not hub_reachable()
    if not os.path.isdir(name_or_path) and not offline:
        try:
            return VJEPA2Model.from_pretrained(name_or_path, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            first = e
    why = "the Hub is unreachable" if offline else str(first).splitlines()[0][:120]
    raise UserError(f"could not fetch checkpoint {name_or_path} ({why}); use --encoder tiny, --encoder state "
                    "or a local folder saved with save_pretrained")


def random_vjepa2(config, seed):
    """VJEPA2Model(config) with random weights fixed by `seed`; the caller's RNG is left untouched."""
    from transformers import VJEPA2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VJEPA2Model(config)


def load_encoder(name_or_path, device="cpu", precision="auto", seed=0, frame_size=FRAME_SIZE, forward="encoder"):
    """Load a frozen encoder: 'state', 'tiny', a V-JEPA 2 hub id or a local save_pretrained folder."""
    if name_or_path == "state":
        return Encoder("state", len(STATE_NAMES), device=device, frame_size=frame_size)
    if name_or_path == "tiny":
        model = random_vjepa2(tiny_config(), seed)
    else:
        model = load_pretrained(name_or_path)
    model = model.to(device).eval().requires_grad_(False)
    encoder = Encoder(name_or_path, model.config.hidden_size, model, device, "fp32", model.config, frame_size, forward)
    return encoder.variant(precision)


def random_init_like(encoder, seed=1):
    """The same architecture with random weights: the seed's 'random baseline' for the probe."""
    if not encoder.pixels:
        return None
    model = random_vjepa2(encoder.config, seed).to(encoder.device).eval().requires_grad_(False)
    return Encoder(f"random-init({encoder.id})", encoder.dim, model, encoder.device, "fp32", encoder.config,
                   encoder.frame_size).variant(encoder.precision)


def preprocess(windows, device, dtype=torch.float32):
    """uint8 (B, 8, H, W, 3) -> (B, 8, 3, H, W) in ImageNet mean/std.

    Two in-place passes on the device, channels-last, then a permuted view: (x / 255 - mean) / std is
    x * (1 / (255 std)) - mean / std. bf16 halves the memory traffic where the encoder runs in bf16 anyway.
    """
    x = torch.as_tensor(np.ascontiguousarray(windows)).to(device, non_blocking=True).to(dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    x.mul_((1 / (255 * std)).to(dtype)).sub_((mean / std).to(dtype))
    return x.permute(0, 1, 4, 2, 3)


def check_windows(encoder, windows):
    """One clear error for each way a batch of windows can be wrong."""
    windows = np.asarray(windows)
    if not encoder.pixels:
        if windows.ndim != 3 or windows.shape[1:] != (WINDOW, len(STATE_NAMES)):
            raise UserError(f"encode(state): expected state windows (B, {WINDOW}, {len(STATE_NAMES)}), "
                            f"got shape {windows.shape}")
        return
    size = encoder.frame_size
    if windows.ndim != 5:
        raise UserError(f"encode: expected a batch of windows (B, {WINDOW}, H, W, 3), got shape {windows.shape}; "
                        "add a batch dimension for one window")
    if windows.dtype != np.uint8:
        raise UserError(f"encode: expected uint8 pixels in [0, 255], got {windows.dtype}")
    if windows.shape[1] != WINDOW:
        raise UserError(f"encode: expected {WINDOW} frames per window, got {windows.shape[1]}")
    if windows.shape[2:] != (size, size, 3):
        raise UserError(f"encode: expected {size}x{size} RGB frames, got {windows.shape[2:]}")


@torch.inference_mode()
def encode(encoder, windows):
    """Windows -> embeddings (B, D) float32.

    Pixel encoders take uint8 windows (B, 8, H, W, 3); V-JEPA 2's encoder runs (the predictor too with
    forward='full', as the seed did: same embedding), and the embedding is the mean over tokens of
    last_hidden_state. `state` takes the state window (B, 8, S) and returns its last row.
    """
    check_windows(encoder, windows)
    if not encoder.pixels:
        return np.asarray(windows, dtype=np.float32)[:, -1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}.get(encoder.precision)
    x = preprocess(windows, encoder.device, dtype or torch.float32)
    device_type = "cuda" if encoder.device.startswith("cuda") else "cpu"
    autocast = dtype is not None and encoder.precision != "half"  # half: the weights are fp16 already
    with torch.autocast(device_type, dtype=dtype, enabled=autocast):
        if encoder.forward == "full":
            tokens = encoder.model(pixel_values_videos=x).last_hidden_state
        else:
            tokens = encoder.model.encoder(pixel_values_videos=x).last_hidden_state
    return tokens.float().mean(1).cpu().numpy()


def encode_batched(encoder, windows, batch_size):
    return np.concatenate([encode(encoder, windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)])


def encoder_flops(config, frames=WINDOW, size=FRAME_SIZE):
    """Forward FLOPs of one window through the encoder, counted from the config (2 FLOPs per MAC)."""
    d, L, r = config.hidden_size, config.num_hidden_layers, config.mlp_ratio
    n = (frames // config.tubelet_size) * (size // config.patch_size) ** 2
    patch = n * d * 3 * config.tubelet_size * config.patch_size ** 2
    per_layer = n * (4 * d * d + 2 * r * d * d) + 2 * n * n * d  # qkv+proj, mlp, QK^T and AV
    return 2 * (patch + L * per_layer)


def print_estimate(encoder, n_windows, batch_size):
    """Estimate the encode time from results/bench.json when it measured this encoder, else time a batch."""
    key = f"{encoder.id}@{encoder.device.split(':')[0]}/{encoder.precision}"  # cuda:1 measures as cuda
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench.json")
    rate, source = None, "results/bench.json"
    if os.path.exists(bench) and encoder.frame_size == FRAME_SIZE:  # bench times 256 px windows
        with contextlib.suppress(Exception):
            rate = load_json(bench).get("encode_windows_per_s", {}).get(key)
    if rate is None:
        size = encoder.frame_size
        window = np.zeros((min(2, batch_size), WINDOW, size, size, 3), np.uint8)
        encode(encoder, window)  # warm-up at the timed shape: after a batch-1 one, an H200 guessed 19x too slow
        t0 = time.perf_counter()
        encode(encoder, window)
        rate, source = len(window) / (time.perf_counter() - t0), "one timed batch"
    print(f"estimate: {n_windows} windows with {key} at {rate:.2f} windows/s ({source}) "
          f"= {n_windows / rate / 60:.1f} min of encoding")


# ---- Rolling out episodes: collection, evaluation, MPC and RL all step through this one loop -----------------------
class Progress:
    """tqdm on a terminal; otherwise one plain line per ~10% (as nanoGPT logs), never a wall of '\\r' bars."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.next = total, desc, 0, 0.1
        self.bar = tqdm(total=total, desc=desc, leave=False) if desc and sys.stderr.isatty() else None
        self.t0 = self.last = time.time()

    def update(self, n=1, **info):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
        elif self.desc and self.total and self.n >= self.next * self.total:
            self.next = math.floor(10 * self.n / self.total) / 10 + 0.1
            if time.time() - self.last >= 5:  # quick stages print nothing
                extra = "".join(f" | {k} {v}" for k, v in info.items())
                print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n / self.total:.0f}%) | "
                      f"{time.time() - self.t0:.0f} s{extra}", file=sys.stderr, flush=True)
                self.last = time.time()

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Encodings:
    """Batches of windows encoded on one worker thread while the caller steps other envs (torch releases the
    GIL): put(key, windows (B, 8, ...)) starts one, get(key) waits for its (B, D). At most `backlog` batches
    wait, so a policy that never reads z (an expert) runs at most that far ahead of the encoder. `state`
    (no pixels) encodes inside put."""

    def __init__(self, encoder, batch_size, backlog=4):
        self.encoder, self.batch_size, self.backlog = encoder, batch_size, backlog
        self.pool = concurrent.futures.ThreadPoolExecutor(1) if encoder.pixels else None
        self.z, self.waiting = {}, collections.deque()

    def put(self, key, windows):
        if self.pool is None:
            self.z[key] = encode_batched(self.encoder, windows, self.batch_size)
            return
        self.z[key] = self.pool.submit(encode_batched, self.encoder, windows, self.batch_size)
        self.waiting.append(key)
        while len(self.waiting) > self.backlog:
            self.get(self.waiting.popleft())

    def get(self, key):
        if isinstance(self.z[key], concurrent.futures.Future):
            self.z[key] = self.z[key].result()
        return self.z[key]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


class Rollouts:
    """A lockstep batch of episodes so far: each one's window, states, frames (the first keep_frames
    episodes), actions, rewards and the expert's next action. `key` names the observation that windows hold."""

    def __init__(self, seeds, obs, key, T, keep_frames):
        B, self.seeds, self.key = len(seeds), seeds, key
        self.windows = [new_window(o) for o in obs[key]]
        self.states = [[s] for s in obs["state"]]
        frames = obs.get("frame")  # rendered only for pixel encoders and GIFs
        self.frames = [[frames[i]] if frames is not None and i < keep_frames else None for i in range(B)]
        self.expert = obs.get("expert")
        self.actions, self.rewards = np.zeros((B, T, 2), np.float32), np.zeros((B, T), np.float32)

    def view(self, g):
        """What a policy sees of episodes g: their state, seed and (with an expert) the expert's action."""
        return {"state": np.stack([self.states[i][-1] for i in g]), "seed": [self.seeds[i] for i in g],
                "expert": None if self.expert is None else self.expert[g]}

    def window_batch(self, g, form):
        return np.stack([window_array(self.windows[i], form) for i in g])

    def save(self, g, t, actions, rewards, obs):
        self.actions[g, t], self.rewards[g, t] = actions, rewards
        if self.expert is not None:
            self.expert[g] = obs["expert"]
        for j, i in enumerate(g):
            self.windows[i].append(obs[self.key][j])
            self.states[i].append(obs["state"][j])
            if self.frames[i] is not None:
                self.frames[i].append(obs["frame"][j])

    def episode(self, i, z=None):
        """Episode i as run_episodes returns it."""
        ep = {"seed": self.seeds[i], "actions": self.actions[i], "rewards": self.rewards[i],
              "states": np.stack(self.states[i]), "final_distance": float(finger_distance(self.states[i][-1]))}
        if z is not None:
            ep["z"] = z
        if self.frames[i] is not None:
            ep["frames"] = np.stack(self.frames[i])
        return ep


def epsilon_greedy(actions, rngs, epsilon):
    """Each action replaced by a uniform random one with probability epsilon, drawn from its episode's rng."""
    actions = np.asarray(actions, dtype=np.float64).copy()
    for j, rng in enumerate(rngs):
        if epsilon > 0 and rng.random() < epsilon:
            actions[j] = rng.uniform(-1, 1, size=2)
    return actions


def run_episodes(seeds, policy, encoder, envs, steps, needs_z=True, keep_z=False, epsilon=0.0, noise_seed=0,
                 window_form="window", keep_frames=0, on_episode=None, desc=None, action_repeat=1, batch_size=32):
    """Roll out `policy` on episodes `seeds`, envs.n at a time in lockstep; windows of many episodes encode as
    one batch.

    policy(z, obs) -> actions (B, 2); z is (B, D) when needs_z, else None; obs has state, seed (and expert).
    With epsilon > 0 each action is replaced by a uniform random one with that probability, drawn from a
    generator seeded by (noise_seed, episode seed), so an episode's data never depends on its batch-mates.
    Each action is held for action_repeat control steps; `steps` counts control steps.
    Returns one dict per episode (or passes it to on_episode): actions (T, 2), rewards (T,), states (T+1, S),
    final_distance, and z (T+1, D) if keep_z, frames (T+1, H, W, 3) if among the first keep_frames; T is
    steps // action_repeat.
    """
    bar, results, T = Progress(len(seeds) * steps, desc), [], steps // action_repeat
    on_episode = on_episode or results.append
    for start in range(0, len(seeds), envs.n):
        chunk = [int(s) for s in seeds[start:start + envs.n]]
        rollouts = Rollouts(chunk, envs.reset(chunk), "frame" if encoder.pixels else "state", T, keep_frames - start)
        noise = [np.random.default_rng([noise_seed, s]) for s in chunk]
        encodings = Encodings(encoder, batch_size) if needs_z or keep_z else None  # one per chunk, keyed (t, group)
        # Two groups of envs when encoding overlaps: one group's windows encode while the other one steps.
        groups = envs.groups(len(chunk)) if encodings and encodings.pool else [np.arange(len(chunk))]
        for gi, g in enumerate(groups):
            if encodings:
                encodings.put((0, gi), rollouts.window_batch(g, window_form))
        for t in range(T):
            for gi, g in enumerate(groups):
                z = encodings.get((t, gi)) if needs_z else None
                actions = epsilon_greedy(policy(z, rollouts.view(g)), [noise[i] for i in g], epsilon)
                obs, rewards = envs.step(actions, g, action_repeat)
                rollouts.save(g, t, actions, rewards, obs)
                if keep_z or (needs_z and t + 1 < T):  # the window after the last step only when it is kept
                    encodings.put((t + 1, gi), rollouts.window_batch(g, window_form))
            bar.update(len(chunk) * action_repeat)
        for gi, g in enumerate(groups):
            for j, i in enumerate(g):
                z = np.stack([encodings.get((t, gi))[j] for t in range(T + 1)]) if keep_z else None
                on_episode(rollouts.episode(i, z))
        if encodings:
            encodings.close()
    bar.close()
    return results


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


def training_base(kind, seed):
    """First episode seed of --seed's `collect`, `explore` or `rl` range: a 32-bit hash of (seed, stage).

    np.random.SeedSequence mixes (seed, stage id) into a uniform 32-bit word, mapped into
    [HELD_OUT_END, 2**32 - MAX_EPISODES), so no training episode is ever a held-out one, for any --seed.
    A range is checked against the seed's earlier ranges (a collision has p ~ 5e-4 each); on one, it takes
    the next word of the sequence.
    """
    span = 2 ** 32 - MAX_EPISODES - HELD_OUT_END
    taken = [training_base(k, seed) for k, i in TRAINING.items() if i < TRAINING[kind]]
    words = np.random.SeedSequence([seed, TRAINING[kind]]).generate_state(8)
    return next(base for base in (HELD_OUT_END + int(w) % span for w in words)
                if all(abs(base - other) >= MAX_EPISODES for other in taken))


def episode_seeds(kind, n, seed, same_as_seed_code=False):
    """n episode seeds for `kind` (collect, explore, eval, plan, probe); all fit numpy's 32-bit seeds.

    eval, plan and probe are fixed ranges below HELD_OUT_END, the same for every --seed (eval starts at
    the seed's 5000). collect and explore start at `training_base`. same_as_seed_code gives the seed's own
    training seeds, 0..n-1 for both demos and exploration (it reused its demo seeds)."""
    if n > MAX_EPISODES:
        raise UserError(f"at most {MAX_EPISODES:,} episodes per range, got {n:,}")
    if kind in HELD_OUT:
        start = HELD_OUT[kind]
    else:
        start = 0 if same_as_seed_code else training_base(kind, seed)
    return [start + i for i in range(n)]


# ---- Data collection: shards of per-episode files, merged into one memory-mappable dataset -------------------------
def dataset_name(expert, epsilon):
    return f"{expert}_eps{epsilon:g}"


def versions():
    import importlib.metadata as md
    found = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "mujoco", "dm_control", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[pkg] = md.version(pkg)
    return found


def frame_size_of(encoder):
    """Frames are rendered only for pixel encoders; `state` reads the simulator."""
    return encoder.frame_size if encoder.pixels else None


def render_mode(encoder, lean):
    """The look and size of the frames an encoder saw, e.g. 'lean@256'; data and models record it."""
    return f"{'lean' if lean else 'full'}@{encoder.frame_size}" if encoder.pixels else "none"


def check_meta(meta, encoder, where, steps=None, lean=None):
    """Refuse data or models made with another encoder (or render look) before any training starts."""
    enc = meta.get("encoder", {})
    if enc.get("id") != encoder.id or enc.get("dim") != encoder.dim:
        raise UserError(f"{where} was made with encoder {enc.get('id')} (dim {enc.get('dim')}), but --encoder is "
                        f"{encoder.id} (dim {encoder.dim}); pass --encoder {enc.get('id')} or use another --out")
    if lean is not None and meta.get("render", render_mode(encoder, lean)) != render_mode(encoder, lean):
        # measured: the lean look moves tiny's embeddings ~17x more than one control step does
        raise UserError(f"{where} was made with {meta['render']} rendering, this run uses "
                        f"{render_mode(encoder, lean)}; match --full-render and --frame-size to it")
    if steps is not None and meta.get("steps") != steps:
        raise UserError(f"{where} was collected with --steps {meta.get('steps')}, not {steps}; "
                        f"pass --steps {meta.get('steps')} or --force to re-collect")


def data_meta(encoder, expert, epsilon, steps, seeds, dtype, lean=True):
    return {"encoder": {"id": encoder.id, "dim": encoder.dim, "precision": encoder.precision},
            "render": render_mode(encoder, lean),
            "expert": expert, "epsilon": epsilon, "steps": steps, "seeds": [int(s) for s in seeds],
            "dtype": dtype, "state_names": STATE_NAMES, "versions": versions()}


def episode_path(shard_dir, seed):
    return os.path.join(shard_dir, f"ep_{seed}.npz")


def save_episode(shard_dir, dtype, ep):
    """run_episodes' on_episode for `collect`: one finished episode, without frames, as shard_dir/ep_SEED.npz."""
    with atomic_path(episode_path(shard_dir, ep["seed"])) as tmp, open(tmp, "wb") as f:
        np.savez(f, z=ep["z"].astype(dtype), actions=ep["actions"], rewards=ep["rewards"],
                 states=ep["states"], seed=ep["seed"])


def load_episode(path):
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupted ({type(e).__name__}); delete it and re-run collect")


def collect_shard(shard_dir, encoder, expert, epsilon, steps, seeds, batch_size=32, lean=True,
                  dtype="float32", rng_seed=0, workers=0):
    """Roll out `expert` (epsilon-greedy) on `seeds` and save each episode as shard_dir/ep_SEED.npz.

    Episodes already on disk are skipped, so a killed run resumes. meta.json is written last: a shard
    without it is incomplete. Frames are never stored (100k frames at 256^2 would be ~20 GB).
    """
    os.makedirs(shard_dir, exist_ok=True)
    meta = data_meta(encoder, expert, epsilon, steps, seeds, dtype, lean)
    meta_path = os.path.join(shard_dir, "meta.json")
    if os.path.exists(meta_path):
        check_meta(load_json(meta_path), encoder, shard_dir, steps=steps, lean=lean)
    todo = [s for s in seeds if not os.path.exists(episode_path(shard_dir, s))]
    if len(todo) < len(seeds):
        print(f"resuming {shard_dir}: {len(seeds) - len(todo)} of {len(seeds)} episodes already saved")
    if todo and encoder.pixels:
        print_estimate(encoder, len(todo) * (steps + 1), batch_size)
    if todo:
        with make_envs(min(batch_size, len(todo)), workers, frame_size_of(encoder), lean, expert) as envs:
            run_episodes(todo, expert_policy, encoder, envs, steps, needs_z=False, keep_z=True, epsilon=epsilon,
                         noise_seed=rng_seed, batch_size=batch_size, desc=f"collect {os.path.basename(shard_dir)}",
                         on_episode=partial(save_episode, shard_dir, dtype))
            meta["gl_renderer"] = envs.gl_renderer()
    save_json(meta_path, meta)
    return meta


def check_shards(shard_dirs, out_dir):
    """Every shard complete, none missing, all alike, no seed twice; returns their metadata and count."""
    if not shard_dirs:
        raise UserError(f"no shards to merge for {out_dir}: run `collect` first")
    metas = []
    for d in shard_dirs:
        if not os.path.exists(os.path.join(d, "meta.json")):
            raise UserError(f"shard {d} is incomplete (no meta.json): re-run its `collect --shard` to finish it")
        metas.append(load_json(os.path.join(d, "meta.json")))
    found = sorted(int(re.search(r"shard_(\d+)of(\d+)", d).group(1)) for d in shard_dirs)
    total = int(re.search(r"of(\d+)", shard_dirs[0]).group(1))
    missing = sorted(set(range(total)) - set(found))
    if missing:
        raise UserError(f"missing shards {missing} of {total} for {out_dir}: run `collect --shard i/{total}` for them")
    for m, d in zip(metas, shard_dirs):
        for k in ("encoder", "expert", "epsilon", "steps", "dtype", "render"):
            if m.get(k) != metas[0].get(k):
                raise UserError(f"shard {d} has {k}={m.get(k)} but {shard_dirs[0]} has {metas[0].get(k)}; "
                                "shards must match")
    seeds = [s for m in metas for s in m["seeds"]]
    dup = sorted(s for s, count in collections.Counter(seeds).items() if count > 1)
    if dup:
        raise UserError(f"seeds overlap between shards (e.g. {dup[:3]}); shards need disjoint seeds")
    return metas, total


def merge(shard_dirs, out_dir):
    """Stream shards into one dataset of .npy arrays (episodes, T+1, D) that training can memory-map.

    The shards are checked first; meta.json is written last, so a dataset without it is never taken as complete.
    """
    shard_dirs = sorted(shard_dirs)
    metas, total = check_shards(shard_dirs, out_dir)
    seeds = [s for m in metas for s in m["seeds"]]
    m0, n, T = metas[0], len(seeds), metas[0]["steps"]
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # the old dataset is invalid until this merge ends
    shapes = {"z": ((n, T + 1, m0["encoder"]["dim"]), m0["dtype"]), "actions": ((n, T, 2), "float32"),
              "rewards": ((n, T), "float32"), "states": ((n, T + 1, len(STATE_NAMES)), "float32")}
    arrays = {k: np.lib.format.open_memmap(os.path.join(out_dir, f"{k}.npy"), mode="w+", dtype=dt, shape=shape)
              for k, (shape, dt) in shapes.items()}
    order = sorted(seeds)
    shard_of = {s: d for d, m in zip(shard_dirs, metas) for s in m["seeds"]}
    bar = Progress(len(order), f"merge {os.path.basename(out_dir)}")
    for i, s in enumerate(order):
        path = episode_path(shard_of[s], s)
        ep = load_episode(path)
        for k in arrays:
            if ep[k].shape != arrays[k].shape[1:]:
                raise UserError(f"{path} has {k} of shape {ep[k].shape}, expected {arrays[k].shape[1:]}")
            arrays[k][i] = ep[k]
        bar.update()
    bar.close()
    for a in arrays.values():
        a.flush()
    np.save(os.path.join(out_dir, "seeds.npy"), np.array(order))
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


# ---- Training loop shared by BC and dynamics -----------------------------------------------------------------------
def split_episodes(n_episodes, val_frac=0.1, seed=0, contiguous=False):
    """Validation episodes: a seeded random val_frac of them, or the last val_frac (the seed's dynamics).

    By episode, never by transition, which would leak neighbouring frames (see split_transitions)."""
    if n_episodes == 1:
        return np.array([0]), np.array([0])  # one episode: train and validate on it, said in the log
    n_val = min(n_episodes - 1, max(1, int(round(n_episodes * val_frac))))
    idx = np.arange(n_episodes)[::-1] if contiguous else np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def split_transitions(n_transitions, val_frac=0.2, seed=0):
    """The seed's BC split: a random val_frac of all transitions (it was unseeded; this one is seeded)."""
    idx = np.random.default_rng(seed).permutation(n_transitions)
    n_val = max(1, int(round(n_transitions * val_frac)))
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def standardizer(z, episodes, enabled=True):
    """Per-dimension mean and std of z (E, T, D) over `episodes` (identity if disabled)."""
    D = z.shape[-1]
    if not enabled:
        return np.zeros(D, np.float32), np.ones(D, np.float32)
    total, sq, count = np.zeros(D), np.zeros(D), 0
    for e in episodes:  # one episode at a time, so a memory-mapped 4 GB dataset is never loaded whole
        x = np.asarray(z[e], dtype=np.float64)
        total += x.sum(0)
        sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


@contextlib.contextmanager
def cpu_threads(n):
    """Run a block with n torch threads (None: as it is), then put the old count back."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def copy_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate_loss(model, batch_loss, n, split="val", chunk=4096):
    """Mean of batch_loss over all n samples of a split, in eval mode."""
    model.eval()
    total = sum(batch_loss(idx.numpy(), split).item() * len(idx) for idx in torch.arange(n).split(chunk))
    return total / n


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def fit(model, batch_loss, n_train, n_val, epochs, lr=1e-3, batch_size=256, weight_decay=1e-4, optimizer="adamw",
        grad_clip=0.0, schedule_step="batch", keep="best", seed=0, desc="train"):
    """Adam(W) with cosine decay (stepped per batch or per epoch); keep the best-validation or final weights.

    batch_loss(idx, split) -> mean loss over samples idx of 'train' or 'val'. grad_clip > 0 clips the
    gradient norm. Stops with a UserError on a non-finite loss, after restoring the last good weights.
    Returns history, the kept epoch and its validation loss.
    """
    opt_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(model.parameters(), lr=lr, weight_decay=weight_decay)
    decay_steps = epochs * (max(1, math.ceil(n_train / batch_size)) if schedule_step == "batch" else 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay_steps)
    g = torch.Generator().manual_seed(seed)
    best = {"val": float("inf"), "state": copy_state(model), "epoch": -1}
    history = {"train": [], "val": []}
    for epoch in range(epochs):
        t0, train_loss = time.time(), []
        model.train()
        for idx in torch.randperm(n_train, generator=g).split(batch_size):
            loss = batch_loss(idx.numpy(), "train")
            if not torch.isfinite(loss):
                model.load_state_dict(best["state"])
                raise UserError(f"{desc}: loss became {loss.item()} at epoch {epoch}; stopped, kept the best "
                                f"weights (epoch {best['epoch']}); try a lower learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            if schedule_step == "batch":
                sched.step()
            train_loss.append(loss.item())
        if schedule_step == "epoch":
            sched.step()
        val = evaluate_loss(model, batch_loss, n_val)
        history["train"].append(float(np.mean(train_loss)))
        history["val"].append(val)
        if val < best["val"] or keep == "final":
            best = {"val": val, "state": copy_state(model), "epoch": epoch}
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:  # ~10 lines per model
            print(f"{desc} epoch {epoch:3d} | train {history['train'][-1]:.5f} | val {val:.5f} | "
                  f"{(time.time() - t0) * 1000:.0f} ms", flush=True)
    model.load_state_dict(best["state"])
    return {"history": history, "kept_val": best["val"], "kept_epoch": best["epoch"]}


def small_model_threads(model, batch_size):
    """Small models train on one CPU thread: measured here, BC on 8k samples took 1.4 s an epoch on one
    thread and 11 s on two while another process was busy (threads spin-waiting on 2 cores)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return 1 if on_cpu and n_params(model) * batch_size < 1e9 else None


# ---- Behaviour cloning (Phase 1) -----------------------------------------------------------------------------------
def bc_net(dim):
    """The seed's BC MLP: 279,490 parameters at D=1024."""
    return nn.Sequential(nn.Linear(dim, 256), nn.LayerNorm(256), nn.ReLU(),
                         nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2), nn.Tanh())


def train_bc(data, epochs=100, lr=1e-3, batch_size=256, seed=0, optimizer="adamw", weight_decay=1e-4,
             split="episode", val_frac=0.2, keep="final", norm="train", schedule_step="batch", device="cpu"):
    """MSE regression of expert actions a_t from z_t.

    split 'episode' validates on held-out episodes; 'transition' on random transitions (the seed's).
    norm z-scores the inputs with statistics of the training episodes, of all samples, or not at all.
    keep 'final' keeps the last epoch: held-out MSE is dominated by the expert's near-target corrections
    and does not track closed-loop success (results/bc-seeds), so best-validation kept undertrained nets.
    """
    seed_everything(seed)
    z, actions = data["z"], data["actions"]
    E, T = actions.shape[:2]
    X = torch.from_numpy(np.array(z[:, :T], np.float32).reshape(-1, z.shape[-1]))
    Y = torch.from_numpy(np.array(actions, np.float32).reshape(-1, 2))
    if split == "episode":
        train_eps, val_eps = split_episodes(E, val_frac, seed)
        rows = {k: (eps[:, None] * T + np.arange(T)).ravel() for k, eps in (("train", train_eps), ("val", val_eps))}
    else:
        train_eps = np.arange(E)
        rows = dict(zip(("train", "val"), split_transitions(E * T, val_frac, seed)))
    mean, std = standardizer(z[:, :T], train_eps if norm == "train" else np.arange(E), norm != "none")
    X = (X - torch.from_numpy(mean)) / torch.from_numpy(std)
    cache = {k: (X[r].to(device), Y[r].to(device)) for k, r in rows.items()}
    model = bc_net(z.shape[-1]).to(device)

    def batch_loss(idx, split_name):
        x, y = cache[split_name]
        return F.mse_loss(model(x[idx]), y[idx])

    with cpu_threads(small_model_threads(model, batch_size)):
        fitted = fit(model, batch_loss, len(rows["train"]), len(rows["val"]), epochs, lr, batch_size, weight_decay,
                     optimizer, 0.0, schedule_step, keep, seed, desc="bc")
    info = {"params": n_params(model), "train_mse": evaluate_loss(model, batch_loss, len(rows["train"]), "train"),
            "val_mse": fitted["kept_val"], "kept_epoch": fitted["kept_epoch"], "epochs": epochs,
            "history": fitted["history"], "split": split, "train_samples": len(rows["train"]),
            "val_samples": len(rows["val"])}
    return model.cpu(), info, (mean, std)


def bc_policy(model, mean, std):
    def act(z, obs):
        with torch.no_grad():
            return model(torch.from_numpy((z - mean) / std)).numpy()
    return act


# ---- Reinforcement learning: soft actor-critic on frozen embeddings ------------------------------------------------
# CleanRL's sac_continuous_action.py in spirit: twin Q + Polyak targets, tanh-Gaussian actor, automatic entropy
# tuning, random warm-up.
# The encoder stays frozen; SAC sees standardised z and stores z, never frames, in its replay buffer.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # CleanRL (from SpinUp / Yarats): std in [0.007, 7.4] before the tanh


def sac_mlp(n_in, n_out, hidden=256):
    """Two ReLU hidden layers, CleanRL's shape for both actor and critic."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class Actor(nn.Module):
    """Tanh-Gaussian policy: z (B, D) -> mean and log-std (B, A) of a Gaussian, squashed into [-1, 1]."""

    def __init__(self, dim, action_dim=2, hidden=256):
        super().__init__()
        self.net = sac_mlp(dim, 2 * action_dim, hidden)

    def forward(self, z):
        mean, log_std = self.net(z).chunk(2, dim=-1)
        # tanh then rescale, rather than a hard clamp: the bound keeps a gradient (CleanRL, SpinUp)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(self, z, generator=None):
        """Reparameterised action a = tanh(mean + std * eps) (B, A) and its log-probability (B,).

        log pi(a) = log N(u; mean, std) - sum log(1 - tanh(u)^2), the change of variables through tanh;
        log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) is the same quantity without the 1e-6 fudge.
        """
        mean, log_std = self(z)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        u = mean + log_std.exp() * eps
        log_prob = (-0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob


class QNet(nn.Module):
    """Twin soft Q-functions: (z (B, D), a (B, A)) -> q1, q2 (B,). Two nets so the target can take the minimum
    (clipped double Q, against overestimation)."""

    def __init__(self, dim, action_dim=2, hidden=256):
        super().__init__()
        self.q1, self.q2 = sac_mlp(dim + action_dim, 1, hidden), sac_mlp(dim + action_dim, 1, hidden)

    def forward(self, z, a):
        x = torch.cat([z, a], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ReplayBuffer:
    """Transitions (z, a, r, z_next, done) in preallocated float32 numpy arrays; raw z, standardised on sampling.

    r is the reward of one decision (summed over its action repeats). Episodes that end by reacher's time limit
    are truncated, not terminated: done stays 0 and the target bootstraps from z_next, as CleanRL does.
    When full, the oldest transitions are overwritten.
    """

    def __init__(self, dim, capacity, action_dim=2):
        self.z = np.zeros((capacity, dim), np.float32)
        self.z_next = np.zeros((capacity, dim), np.float32)
        self.a = np.zeros((capacity, action_dim), np.float32)
        self.r = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def __len__(self):
        return self.size

    def add_episode(self, z, actions, rewards, terminal=False):
        """Append the T transitions of one episode: z (T+1, D), actions (T, A), rewards (T,)."""
        T = len(actions)
        rows = (self.pos + np.arange(T)) % self.capacity
        self.z[rows], self.z_next[rows] = z[:-1], z[1:]
        self.a[rows], self.r[rows] = actions, rewards
        self.done[rows] = 0.0
        self.done[rows[-1]] = float(terminal)
        self.pos, self.size = (self.pos + T) % self.capacity, min(self.size + T, self.capacity)

    def rows(self, idx):
        return {k: torch.from_numpy(getattr(self, k)[idx]) for k in ("z", "a", "r", "z_next", "done")}

    def sample(self, n, rng):
        """n uniformly drawn transitions: dict of tensors z (n, D), a (n, A), r (n,), z_next (n, D), done (n,)."""
        return self.rows(rng.integers(0, self.size, n))

    def sample_mixed(self, n, demos, rng):
        """Half of the batch from this buffer, half from the demos (RLPD's symmetric sampling)."""
        own, demo = self.sample(n - n // 2, rng), demos.sample(n // 2, rng)
        return {k: torch.cat([own[k], demo[k]]) for k in own}


def sac_update(nets, optims, batch, gamma=0.99, tau=0.005, target_entropy=-2.0, generator=None):
    """One gradient step of SAC on a batch of standardised transitions (z, a, r, z_next, done).

    nets: actor, critic (QNet), critic_target, log_alpha; optims: actor, critic, alpha (Adam).
      1. critic: regress q1, q2 (z, a) on r + gamma (1 - done) [min Q_target(z', a') - alpha log pi(a'|z')],
         a' ~ pi(z'): the soft Bellman target.
      2. actor: minimise alpha log pi(a|z) - min Q(z, a) with a ~ pi(z) reparameterised (CleanRL every other
         step with two updates; one every step here is the same count, simpler).
      3. alpha: move log alpha so that the policy's entropy tracks target_entropy (-action_dim).
      4. Polyak: critic_target <- tau critic + (1 - tau) critic_target.
    Returns losses and statistics as floats.
    """
    actor, critic, critic_target, log_alpha = nets["actor"], nets["critic"], nets["critic_target"], nets["log_alpha"]
    alpha = log_alpha.exp().detach()
    with torch.no_grad():
        a_next, logp_next = actor.sample(batch["z_next"], generator)
        q_next = torch.min(*critic_target(batch["z_next"], a_next)) - alpha * logp_next
        target = batch["r"] + gamma * (1 - batch["done"]) * q_next
    q1, q2 = critic(batch["z"], batch["a"])
    critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    optims["critic"].zero_grad(set_to_none=True)
    critic_loss.backward()
    optims["critic"].step()

    a, logp = actor.sample(batch["z"], generator)
    critic.requires_grad_(False)  # the actor's loss moves the actor only
    actor_loss = (alpha * logp - torch.min(*critic(batch["z"], a))).mean()
    critic.requires_grad_(True)
    optims["actor"].zero_grad(set_to_none=True)
    actor_loss.backward()
    optims["actor"].step()

    alpha_loss = -(log_alpha * (logp.detach() + target_entropy)).mean()  # on log alpha, as SAC's authors' code
    optims["alpha"].zero_grad(set_to_none=True)
    alpha_loss.backward()
    optims["alpha"].step()

    with torch.no_grad():
        for p, p_target in zip(critic.parameters(), critic_target.parameters()):
            p_target.lerp_(p, tau)
    return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
            "entropy": -logp.mean().item(), "q": q1.mean().item()}


class SACAgent:
    """SAC's nets, optimisers, replay buffer(s) and standardisation; also a `run_episodes` policy that learns.

    Called as policy(z, obs) on a lockstep batch z (B, D) it returns actions (B, 2): uniform random for the
    first learning_starts control steps, then a ~ pi(z). It counts control steps (B x action_repeat per call)
    and, once the buffer holds batch_size transitions, makes updates_per_step gradient updates per decision
    (per transition collected), so learning happens while the episodes run. `greedy` is the deterministic
    policy tanh(mean) for evaluation: it neither counts steps nor learns.
    """

    def __init__(self, dim, mean, std, action_repeat=2, demos=None, hidden=256, batch_size=256,
                 learning_starts=5_000, updates_per_step=1.0, actor_lr=3e-4, critic_lr=1e-3, gamma=0.99, tau=0.005,
                 capacity=100_000, seed=0, device="cpu"):
        # hidden 256, batch 256, actor lr 3e-4, critic and alpha lr 1e-3, tau 0.005, gamma 0.99: CleanRL's
        # defaults. learning_starts 5,000: CleanRL's (25 random episodes of 200 steps). capacity in transitions,
        # not CleanRL's 1M: at D=1024 each costs 8 kB (z and z_next); train_sac sizes it to the whole run.
        # updates_per_step 1: one update per transition (per decision), as CleanRL and DrQ.
        self.device, self.action_repeat, self.batch_size = device, action_repeat, batch_size
        self.gamma, self.tau = gamma, tau
        self.learning_starts, self.updates_per_step = learning_starts, updates_per_step
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        with torch.random.fork_rng(devices=[]):  # --seed alone fixes the initial weights; caller's RNG untouched
            torch.manual_seed(seed)
            actor, critic = Actor(dim, 2, hidden).to(device), QNet(dim, 2, hidden).to(device)
        critic_target = QNet(dim, 2, hidden).to(device).requires_grad_(False)
        critic_target.load_state_dict(critic.state_dict())
        log_alpha = torch.zeros((), device=device, requires_grad=True)  # alpha starts at 1, as CleanRL
        self.nets = {"actor": actor, "critic": critic, "critic_target": critic_target, "log_alpha": log_alpha}
        self.optims = {"actor": torch.optim.Adam(actor.parameters(), lr=actor_lr),
                       "critic": torch.optim.Adam(critic.parameters(), lr=critic_lr),
                       "alpha": torch.optim.Adam([log_alpha], lr=critic_lr)}
        self.target_entropy = -2.0  # -action_dim, SAC's heuristic
        self.buffer, self.demos = ReplayBuffer(dim, capacity), demos
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.env_steps, self.updates, self.owed, self.info, self.returns = 0, 0, 0.0, {}, []

    def standardize(self, z):
        return (torch.as_tensor(z, dtype=torch.float32, device=self.device) - self.mean) / self.std

    @torch.no_grad()
    def greedy(self, z, obs):
        """The deterministic policy tanh(mean), actions (B, 2) for raw embeddings z (B, D): for evaluation."""
        return torch.tanh(self.nets["actor"](self.standardize(z))[0]).cpu().numpy()

    def __call__(self, z, obs):
        B = len(z)
        if self.env_steps < self.learning_starts:
            a = self.rng.uniform(-1, 1, size=(B, 2)).astype(np.float32)
        else:
            with torch.no_grad():
                a = self.nets["actor"].sample(self.standardize(z), self.generator)[0].cpu().numpy()
        self.env_steps += B * self.action_repeat
        if len(self.buffer) >= self.batch_size and self.env_steps > self.learning_starts:
            self.owed += B * self.updates_per_step
            while self.owed >= 1:
                self.update()
                self.owed -= 1
        return a

    def add_episode(self, ep):
        """run_episodes' on_episode: store a finished episode (z (T+1, D), actions, rewards). Episodes of a
        lockstep chunk arrive when the chunk ends: one chunk later than CleanRL's add after every step."""
        self.buffer.add_episode(ep["z"], ep["actions"], ep["rewards"])
        self.returns.append(float(ep["rewards"].sum()))

    def update(self):
        if self.demos is not None:
            batch = self.buffer.sample_mixed(self.batch_size, self.demos, self.rng)
        else:
            batch = self.buffer.sample(self.batch_size, self.rng)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["z"], batch["z_next"] = self.standardize(batch["z"]), self.standardize(batch["z_next"])
        self.info = sac_update(self.nets, self.optims, batch, self.gamma, self.tau, self.target_entropy, self.generator)
        self.updates += 1


def demo_buffer(episodes, dim, action_repeat=1):
    """A ReplayBuffer of demo episodes (dicts with z (T+1, D), actions, rewards) for RLPD-style mixing.

    Demos recorded at action_repeat 1 are regrouped into decisions of `action_repeat` steps: every k-th z,
    the first action of each block, the block's summed reward (an approximation: the expert's action changes
    within a block)."""
    k = action_repeat
    n = sum(len(ep["actions"]) // k for ep in episodes)
    buffer = ReplayBuffer(dim, n)
    for ep in episodes:
        T = len(ep["actions"]) // k
        rewards = np.asarray(ep["rewards"][:T * k], np.float32).reshape(T, k).sum(1)
        buffer.add_episode(np.asarray(ep["z"][:T * k + 1:k], np.float32), ep["actions"][:T * k:k], rewards)
    return buffer


def evaluate_sac(agent, encoder, envs, seeds, steps, action_repeat=2, batch_size=32):
    """episode_metrics of the deterministic policy on episodes `seeds` (no learning)."""
    eps = run_episodes(seeds, agent.greedy, encoder, envs, steps, action_repeat=action_repeat, batch_size=batch_size)
    return episode_metrics(eps, steps)


def train_sac(encoder, envs, seeds_fn, steps_per_episode, total_steps, mean, std, action_repeat=2, demos=None,
              eval_every=10_000, eval_fn=None, seed=0, device="cpu", progress=None, **agent_kwargs):
    """SAC for total_steps control steps (decisions x action_repeat), envs.n episodes at a time.

    seeds_fn(n) -> n training episode seeds. Each chunk of envs.n episodes runs through run_episodes with the
    agent as its policy (it learns as it acts) and adds the finished episodes to the buffer. Every eval_every
    control steps, and at the end, eval_fn(agent) -> metrics dict (success, return) adds a point to the curve.
    Returns the agent and the curve: [{step, updates, success, return, train_return, alpha, ...}].
    """
    per_episode = steps_per_episode // action_repeat * action_repeat
    agent_kwargs.setdefault("capacity", math.ceil(total_steps / per_episode) * (per_episode // action_repeat))
    agent = SACAgent(encoder.dim, mean, std, action_repeat, demos, seed=seed, device=device, **agent_kwargs)
    seeds = seeds_fn(math.ceil(total_steps / per_episode))
    curve, next_eval, t0 = [], eval_every, time.time()
    for start in range(0, len(seeds), envs.n):
        chunk = seeds[start:start + envs.n]
        run_episodes(chunk, agent, encoder, envs, steps_per_episode, keep_z=True, on_episode=agent.add_episode,
                     action_repeat=action_repeat)
        if progress is not None:
            shown = {"return": f"{np.mean(agent.returns[-len(chunk):]):.0f}"}
            if curve:
                shown["eval success"] = f"{curve[-1]['success']:.2f}"
            progress.update(len(chunk) * per_episode, **shown)
        last = start + envs.n >= len(seeds)
        if eval_fn is not None and (agent.env_steps >= next_eval or last):
            m = eval_fn(agent)
            curve.append({"step": agent.env_steps, "updates": agent.updates, "success": m["success"],
                          "return": m["return"], "train_return": float(np.mean(agent.returns[-2 * envs.n:])),
                          "seconds": round(time.time() - t0, 1), **agent.info})
            while next_eval <= agent.env_steps:
                next_eval += eval_every
    return agent, curve


# ---- Dynamics (Phases 3, 4c, 4d): residual models f(z, a) = z + delta(z, a) ----------------------------------------
class MLPDynamics(nn.Module):
    """Seed Phase 3: Linear(D+2->512) LN ReLU, 2x [Linear(512->512) LN ReLU], Linear(512->D)."""

    def __init__(self, dim, hidden=512, action_dim=2):
        super().__init__()
        layers, d = [], dim + action_dim
        for _ in range(3):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()]
            d = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, z, a):
        return z + self.net(torch.cat([z, a], -1))


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


class ResBlockDynamics(nn.Module):
    """Seed Phase 4d: Linear(D+2->1024) LN ReLU, 4 ResBlocks, Linear(1024->D); ~10.5M params at D=1024."""

    def __init__(self, dim, width=1024, blocks=4, action_dim=2, post_relu=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + action_dim, width), nn.LayerNorm(width), nn.ReLU(),
                                 *[ResBlock(width, post_relu) for _ in range(blocks)], nn.Linear(width, dim))

    def forward(self, z, a):
        return z + self.net(torch.cat([z, a], -1))


def dynamics_net(name, dim, resblock_relu=False):
    return ResBlockDynamics(dim, post_relu=resblock_relu) if name == "resblock" else MLPDynamics(dim)


def rollout_steps(name, rollout=None):
    """mlp_rollout5 is trained unrolled 5 steps on its own predictions (seed Phase 4c)."""
    return rollout or (5 if name == "mlp_rollout5" else 1)


def rollout_weights(k, loss="sum"):
    """Weights of the k unrolled steps' losses. sum: all 1. weighted: step h gets (h+1)/k and the total is
    divided by k, as the seed's Phase 4c (so its k-step loss is ~0.6x one step's, not 5x)."""
    if loss == "sum":
        return [1.0] * k
    return [(h + 1) / k / k for h in range(k)]


def train_dynamics(name, data, epochs, lr=1e-3, batch_size=256, seed=0, rollout=None, norm="train",
                   split="random", grad_clip=0.0, rollout_loss="sum", sampling="every-start", resblock_relu=False,
                   schedule_step="batch", device="cpu"):
    """SmoothL1 on z_{t+1..t+k}, unrolled k steps on the model's own predictions.

    split: random 10% of episodes (ours) or the last 20% (seed). norm: standardised or raw latents.
    sampling 'every-start' trains on every (episode, start); 'one-start' on batches of 64 training
    episodes that share one random start, as the seed's Phase 4c. Validation always uses every start.
    """
    seed_everything(seed)
    z, actions = data["z"], data["actions"]
    E, T = actions.shape[:2]
    k = min(rollout_steps(name, rollout), T)
    train_eps, val_eps = split_episodes(E, 0.2 if split == "contiguous" else 0.1, seed, split == "contiguous")
    mean, std = standardizer(z, train_eps, norm == "train")
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    starts = {s: np.array([(e, t) for e in eps for t in range(T - k + 1)]) for s, eps in
              (("train", train_eps), ("val", val_eps))}
    weights = rollout_weights(k, rollout_loss)
    model = dynamics_net(name, z.shape[-1], resblock_relu).to(device)
    start_rng = np.random.default_rng([seed, 4])
    one_start = sampling == "one-start"  # the seed's batches: 64 training episodes sharing one random start

    def batch_loss(idx, split_name):
        if split_name == "train" and one_start:
            e = train_eps[idx]
            t = np.full(len(e), start_rng.integers(0, T - k + 1))
        else:
            e, t = starts[split_name][idx].T
        steps = t[:, None] + np.arange(k + 1)
        zs = (torch.from_numpy(np.array(z[e[:, None], steps], np.float32)) - mean_t) / std_t  # (B, k+1, D)
        a = torch.from_numpy(np.array(actions[e[:, None], steps[:, :k]], np.float32))
        zs, a = zs.to(device, non_blocking=True), a.to(device, non_blocking=True)
        pred, loss = zs[:, 0], 0.0
        for j in range(k):
            pred = model(pred, a[:, j])
            loss = loss + weights[j] * F.smooth_l1_loss(pred, zs[:, j + 1])
        return loss

    n_train, batch_size = (len(train_eps), 64) if one_start else (len(starts["train"]), batch_size)
    with cpu_threads(small_model_threads(model, batch_size)):
        fitted = fit(model, batch_loss, n_train, len(starts["val"]), epochs, lr, batch_size, 1e-4, "adamw", grad_clip,
                     schedule_step, "best", seed, desc=f"dynamics {name}")
    return model.cpu(), {"params": n_params(model), "val_loss": fitted["kept_val"], "kept_epoch": fitted["kept_epoch"],
                         "history": fitted["history"], "rollout": k, "rollout_weights": weights, "epochs": epochs,
                         "val_episodes": val_eps.tolist()}, (mean, std)


@torch.no_grad()
def kstep_error(model, z, actions, episodes, mean, std, k_max=10, device="cpu"):
    """Open-loop k-step error for k = 1..k_max: mean L2 between predicted and true standardised z_{t+k}.

    Also returns the 'copy' baseline ||z_t - z_{t+k}||: a model that learned nothing matches it.
    """
    model = model.to(device)
    T = actions.shape[1]
    k_max = min(k_max, T)
    errs, copy = np.zeros(k_max), np.zeros(k_max)
    count = 0
    mean_t, std_t = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)
    for e in episodes:
        zs = (torch.from_numpy(np.array(z[e], np.float32)).to(device) - mean_t) / std_t
        a = torch.from_numpy(np.array(actions[e], np.float32)).to(device)
        starts = torch.arange(0, T - k_max + 1, device=device)
        pred = zs[starts]
        for j in range(k_max):
            pred = model(pred, a[starts + j])
            errs[j] += (pred - zs[starts + j + 1]).norm(dim=-1).sum().item()
            copy[j] += (zs[starts] - zs[starts + j + 1]).norm(dim=-1).sum().item()
        count += len(starts)
    model.cpu()
    return (errs / count).tolist(), (copy / count).tolist()


# ---- Planners: CEM and random shooting (CEM with one iteration), batched over episodes -----------------------------
def cem(cost_fn, batch, horizon, action_dim=2, samples=500, elites=50, iterations=5, mean=None, std=None,
        init_std=1.0, min_std=0.05, uniform_first=False, generator=None, device="cpu"):
    """Cross-entropy method over action sequences, for `batch` independent problems at once.

    cost_fn(actions (batch, samples, horizon, action_dim)) -> costs (batch, samples).
    1. sample `samples` sequences from N(mean, std) (uniform in [-1, 1] on the first iteration if
       uniform_first), clamped to the action bounds;
    2. score them with cost_fn and keep the `elites` lowest-cost sequences (topk);
    3. refit mean and std to the elites, std clamped below at min_std; repeat `iterations` times.
    Returns (the lowest-cost sequence seen in any iteration (batch, horizon, A), mean, std).
    With iterations=1, elites=1 and uniform_first=True this is random shooting.
    """
    shape = (batch, horizon, action_dim)
    mean = torch.zeros(shape, device=device) if mean is None else mean
    std = torch.full(shape, init_std, device=device) if std is None else std
    best, best_cost = None, torch.full((batch,), float("inf"), device=device)
    for i in range(iterations):
        if uniform_first and i == 0:
            actions = torch.rand((batch, samples) + shape[1:], generator=generator, device=device) * 2 - 1
        else:
            noise = torch.randn((batch, samples) + shape[1:], generator=generator, device=device)
            actions = (mean[:, None] + std[:, None] * noise).clamp(-1, 1)
        costs = cost_fn(actions)
        elite_cost, elite_idx = costs.topk(elites, dim=1, largest=False)  # (batch, elites), best first
        elite = actions.gather(1, elite_idx[..., None, None].expand(-1, -1, horizon, action_dim))
        better = elite_cost[:, 0] < best_cost
        best = elite[:, 0] if best is None else torch.where(better[:, None, None], elite[:, 0], best)
        best_cost = torch.minimum(best_cost, elite_cost[:, 0])
        mean = elite.mean(1)
        std = elite.std(1, unbiased=False).clamp_min(min_std) if elites > 1 else torch.full_like(mean, min_std)
    return best, mean, std


def latent_cost(model, z, z_goal, cost="final", dtype=torch.float32):
    """Cost of action sequences: L2 distance of the imagined latents to z_goal.

    'final' scores the last imagined latent (ours; the seed's random shooting); 'sum' adds every step;
    'weighted' adds step t with weight (t+1)/H (the seed's CEM). z, z_goal: (batch, D) on the model's
    device. dtype bf16/fp16 runs the rollouts under autocast. Returns cost_fn for `cem`.
    """
    device_type = z.device.type

    def cost_fn(actions):
        B, S, H, A = actions.shape
        zz = z[:, None].expand(B, S, -1).reshape(B * S, -1)
        goal = z_goal[:, None].expand(B, S, -1).reshape(B * S, -1).float()
        total = torch.zeros(B * S, device=z.device)
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            for h in range(H):
                zz = model(zz, actions[:, :, h].reshape(B * S, A))
                weight = {"final": float(h == H - 1), "sum": 1.0, "weighted": (h + 1) / H}[cost]
                if weight:
                    total = total + weight * (zz.float() - goal).norm(dim=-1)
        return total.view(B, S)
    return cost_fn


class MPC:
    """Model-predictive control in latent space: plan from the current z, execute the first action, replan.

    plan: planner ('cem' or 'random'), horizon, samples, elites, iterations, cost, init_std, std_mode ('reset'
    or 'carry'), warm_tail ('repeat' or 'zero'), execute ('mean' or 'best'), dtype, seed, device.
    CEM warm-starts from the previous step's mean shifted by one step. z_goal: {episode seed: (D,) raw
    embedding}; mean/std: the dynamics model's standardisation. self.seconds sums the planning time.
    """

    def __init__(self, model, z_goal, mean, std, **plan):
        self.plan, self.device = plan, plan.get("device", "cpu")
        self.model = model.to(self.device)
        self.z_goal, self.warm, self.seconds = z_goal, {}, 0.0
        self.mean, self.std = (torch.from_numpy(x).to(self.device) for x in (mean, std))
        self.generator = torch.Generator(device=self.device).manual_seed(plan.get("seed", 0))

    def standardize(self, x):
        return (torch.from_numpy(np.asarray(x, np.float32)).to(self.device) - self.mean) / self.std

    def __call__(self, z, obs):
        t0, p, seeds = time.perf_counter(), self.plan, obs["seed"]
        goal = self.standardize(np.stack([self.z_goal[s] for s in seeds]))
        fn = latent_cost(self.model, self.standardize(z), goal, p["cost"], p.get("dtype", torch.float32))
        if p["planner"] == "random":  # seed Phase 4: 1000 uniform sequences, keep the best
            best, _, _ = cem(fn, len(seeds), p["horizon"], samples=p["samples"], elites=1, iterations=1,
                             uniform_first=True, generator=self.generator, device=self.device)
            action = best[:, 0]
        else:
            mean, std = self.warm_start(seeds)
            best, m, s = cem(fn, len(seeds), p["horizon"], samples=p["samples"], elites=p["elites"],
                             iterations=p["iterations"], mean=mean, std=std, init_std=p["init_std"],
                             generator=self.generator, device=self.device)
            self.warm.update(zip(seeds, zip(m, s)))
            action = (m if p["execute"] == "mean" else best)[:, 0]
        self.seconds += time.perf_counter() - t0
        return action.float().cpu().numpy()

    def warm_start(self, seeds):
        """The previous step's mean (and std with std='carry'), shifted one step; the new last step repeats
        the old last step (ours) or is zero (the seed's), its std the initial one."""
        if not all(s in self.warm for s in seeds):
            return None, None
        mean = torch.stack([self.warm[s][0] for s in seeds])
        tail = mean[:, -1:] if self.plan["warm_tail"] == "repeat" else torch.zeros_like(mean[:, -1:])
        mean = torch.cat([mean[:, 1:], tail], 1)
        if self.plan["std_mode"] == "reset":
            return mean, None
        std = torch.stack([self.warm[s][1] for s in seeds])
        return mean, torch.cat([std[:, 1:], torch.full_like(std[:, -1:], self.plan["init_std"])], 1)


# ---- Evaluation helpers: goals for planning, and rollouts kept as GIFs ---------------------------------------------
def goals_at(eps, steps):
    """Goal embeddings z_goal (B, D) at step steps[i] of episode i, and per-episode info: the step, the goal's
    finger-target distance and its frame (None when no frames were kept)."""
    z_goal = np.stack([ep["z"][t] for ep, t in zip(eps, steps)]).astype(np.float32)
    info = [{"step": t, "distance": float(finger_distance(ep["states"][t])),
             "frame": ep["frames"][t] if "frames" in ep else None} for ep, t in zip(eps, steps)]
    return z_goal, info


def expert_goals(seeds, expert, encoder, envs, horizon, form="window", batch_size=32):
    """The seed's expert-generated goal: run the expert from the same start and target for `horizon`
    steps and encode what it sees at its closest approach to the target (after its first step): the
    8-frame window (ours) or that one frame repeated x8 (form='frame', the seed's).
    Returns z_goal (B, D) and per-episode info (step, distance, frame)."""
    eps = run_episodes(seeds, expert_policy, encoder, envs, horizon, needs_z=False, keep_z=True, window_form=form,
                       keep_frames=1, batch_size=batch_size, desc="goals")  # the goal frame goes in the GIF
    steps = [1 + int(finger_distance(ep["states"])[1:].argmin()) for ep in eps]
    return goals_at(eps, steps)


def random_run_goals(seeds, encoder, envs, form="frame", steps=500, batch_size=32):
    """The seed's random-shooting goal: the first frame with reward > 0.9 in `steps` uniform random steps,
    else the last one. Its goal run was the next episode of the same env, so it showed another target:
    reproduced here by running each goal on a held-out 'goal' episode, not on the planned one."""
    goal_seeds = episode_seeds("goal", len(seeds), 0)
    eps = run_episodes(goal_seeds, random_policy(np.random.default_rng(0)), encoder, envs, steps, needs_z=False,
                       keep_z=True, window_form=form, keep_frames=1, batch_size=batch_size, desc="random goals")
    hits = [np.flatnonzero(ep["rewards"] > 0.9) for ep in eps]
    z_goal, info = goals_at(eps, [int(h[0]) + 1 if len(h) else steps for h in hits])  # z[t] follows action t
    for i, h in zip(info, hits):
        i["found"] = bool(len(h))
    return z_goal, info


def gif_episode(seed, policy, encoder, steps, frame_size, lean, expert=None, window_form="window", batch_size=32):
    """One episode with its frames, for a GIF: the `state` encoder renders only here."""
    with Envs(1, frame_size, lean, expert) as envs:
        return run_episodes([seed], policy, encoder, envs, steps, needs_z=policy is not expert_policy,
                            window_form=window_form, keep_frames=1, batch_size=batch_size)[0]


# ---- Probe and embedding statistics --------------------------------------------------------------------------------
def probe_targets(states):
    """Probe targets from states (N, S), per episode rows in order: finger xy, target xy, joint sin/cos,
    and finger velocity direction (cos, sin of the angle of finger_t - finger_{t-1})."""
    vel = np.diff(states[:, 6:8], axis=0, prepend=states[:1, 6:8])
    angle = np.arctan2(vel[:, 1], vel[:, 0])
    return {"finger_xy": states[:, 6:8], "target_xy": states[:, 8:10], "joint_angles": states[:, 0:4],
            "velocity_direction": np.stack([np.cos(angle), np.sin(angle)], 1)}, np.linalg.norm(vel, axis=1)


def ridge_fit(X, Y, lam):
    """Closed-form ridge with an unpenalised bias: W = (X^T X + lam I)^-1 X^T Y on centred X, Y."""
    mx, my = X.mean(0), Y.mean(0)
    Xc = X - mx
    W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (Y - my))
    return W, my - mx @ W


def r2(Y, P):
    """R^2 averaged over columns; 0 for predicting the mean, negative for worse."""
    ss_res = ((Y - P) ** 2).sum(0)
    ss_tot = ((Y - Y.mean(0)) ** 2).sum(0) + 1e-12
    return float(np.mean(1 - ss_res / ss_tot))


def ridge_probe(X, Y, episode, folds=4, lams=(1e-2, 1e-1, 1, 10, 100, 1e3, 1e4)):
    """Episode-wise k-fold ridge: every row is predicted by a probe fit on the other folds' episodes.

    Returns the pooled out-of-fold R^2 for the best lambda. Pooling over all episodes matters for
    targets that are constant within an episode (target xy): one held-out episode has no variance.
    """
    fold = episode % folds
    best = -np.inf
    for lam in lams:
        P = np.zeros_like(Y)
        for f in np.unique(fold):
            tr, te = fold != f, fold == f
            if not tr.any():  # one episode: nothing to hold out
                return float("nan")
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
            W, b = ridge_fit((X[tr] - mu) / sd, Y[tr], lam)
            P[te] = (X[te] - mu) / sd @ W + b
        best = max(best, r2(Y, P))
    return float(best)


def probe_targets_by_episode(states):
    """states (E, T+1, S) -> targets flattened to rows, velocities computed within each episode."""
    targets, speeds = zip(*[probe_targets(s) for s in states])
    return {k: np.concatenate([t[k] for t in targets]) for k in targets[0]}, np.concatenate(speeds)


def probe_embeddings(z, states, min_speed=1e-3):
    """Ridge probe R^2 of z (E*(T+1), D) for every target; velocity direction only where the finger moves
    more than min_speed metres per step."""
    targets, speed = probe_targets_by_episode(states)
    episode = np.repeat(np.arange(states.shape[0]), states.shape[1])
    scores = {}
    for name, Y in targets.items():
        keep = speed > min_speed if name == "velocity_direction" else np.ones(len(Y), bool)
        scores[name] = ridge_probe(z[keep], Y[keep], episode[keep]) if keep.sum() > 4 else float("nan")
    return scores


def embedding_stats(z, standardize=False, pairs=2000, seed=0):
    """z (E, T+1, D): cosine similarity of random and of consecutive pairs, effective rank, top-10 PC share."""
    rng = np.random.default_rng(seed)
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
    if standardize:
        mu, sd = flat.mean(0), flat.std(0) + 1e-6
        flat = (flat - mu) / sd
        z = ((z - mu) / sd)
    unit = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-12)
    i, j = rng.integers(0, len(flat), pairs), rng.integers(0, len(flat), pairs)
    zz = z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
    consecutive = (zz[:, 1:] * zz[:, :-1]).sum(-1)
    eig = np.clip(np.linalg.eigvalsh(np.cov(flat.T)), 0, None)[::-1] if flat.shape[1] > 1 else np.ones(1)
    p = eig / eig.sum()  # effective rank: exp(entropy of the normalised spectrum), Roy & Vetterli (2007)
    return {"cos_random_pairs": float((unit[i] * unit[j]).sum(1).mean()),
            "cos_consecutive": float(consecutive.mean()),
            "effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "top10_pc_variance": float(p[:10].sum())}


# ---- Report --------------------------------------------------------------------------------------------------------
# results.json, report.md, plots and GIFs, rebuilt from the run folder alone. Each table is one
# function, printed by its stage and joined by write_report.
def fmt_rate(m, key="success"):
    lo, hi = m[f"{key}_ci"]
    return f"{m[key] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}]"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def seed_figure(name):
    s = SEED_PHASE1.get(name)
    return f"{s['success'] * 100:.0f}% / {s['reward']}" if s else ""


def phase1_table(results, steps):
    """Experts, BC, RL and random on the same `steps`-step evaluation episodes, beside the seed's figures."""
    conditions = [(f"expert `{k}`", k, v) for k, v in results.get("experts", {}).items()]
    conditions += [(k, k, v) for k, v in results.get("eval", {}).items()]
    rows = [[label, fmt_rate(v), fmt_rate(v, "seed_success"), f"{v['return']:.1f}", f"{v['final_distance']:.3f}",
             v["n"], seed_figure(key)] for label, key, v in conditions]
    return (f"Phase 1: live evaluation, {steps}-step episodes (encoder `{results['encoder']['id']}`)\n\n" +
            md_table(["condition", "success [95% CI]", "seed_success", f"mean return ({steps} steps)",
                      "final dist (m)", "n", "seed's figure (success / return, 200 steps)"], rows))


def bc_line(results):
    b = results["bc"]
    return (f"BC MLP: {b['params']:,} parameters; kept epoch {b['kept_epoch'] + 1} of {b['epochs']}: train MSE "
            f"{b['train_mse']:.5f}, val MSE {b['val_mse']:.5f} ({b['split']} split; seed: 279,490, 0.0001 / 0.0002).")


def every_third(errors):
    return " ".join(f"{x:.3f}" for x in errors[:10:3])


def dynamics_table(results):
    rows = [[k, f"{d['params']:,}", d["epochs"], f"{d['val_loss']:.5f}" + (" (k-step)" if d["rollout"] > 1 else ""),
             every_third(d["kstep_error"]), every_third(d["kstep_copy"])]
            for k, d in results["dynamics"].items()]
    return md_table(["model", "params", "epochs", "best val SmoothL1", "k-step error k=1,4,7,10",
                     "copy-z_t baseline"], rows)


def plan_table(results, steps):
    rows = []
    for k, p in results["plan"].items():
        s = SEED_PHASE4.get(k, {})
        seed = (f"{s['min_dist']} / {s['improvement'] * 100:.1f}% / {s['reward']}" if "min_dist" in s else
                f"- / - / {s.get('reward', '')}")
        rows.append([k, fmt_rate(p), f"{p['return']:.1f}", f"{p['final_distance']:.3f}", f"{p['latent_initial']:.2f}",
                     f"{p['latent_final']:.2f}", f"{p['latent_min']:.2f}",
                     f"{p['latent_improvement'] * 100:.1f}% ± {p['latent_improvement_ci'] * 100:.1f}",
                     f"{p['ms_per_action']:.0f}", p["n"], seed])
    return (f"Phase 4: latent MPC, {steps}-step episodes (encoder `{results['encoder']['id']}`)\n\n" +
            md_table(["planner/model", "success", f"return ({steps} steps)", "final dist (m)", "latent init",
                      "latent final", "latent min", "improvement", "ms/action", "n",
                      "seed: min dist / improvement / reward (1 episode, 200 steps)"], rows))


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
            "\n\nLearning curve: `rl_curve.csv` (step, return, success, seed, variant) and "
            "![SAC learning curve](rl_curve.png)")


def gif(path, frames, captions, goal=None):
    """Frames (T, H, W, 3) -> GIF with a caption on a dark band; the goal frame beside each one."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=max(12, frames.shape[1] // 18))
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        font = ImageFont.load_default()
    images = []
    for f, text in zip(frames, captions):
        img = np.concatenate([f, goal], 1) if goal is not None else f
        im = Image.fromarray(img)
        draw = ImageDraw.Draw(im)
        band = font.getbbox("Ag")[3] + 8
        draw.rectangle((0, 0, im.width, band), fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 255), font=font)
        if goal is not None:
            draw.text((f.shape[1] + 4, 4), "goal", fill=(255, 255, 255), font=font)
        images.append(im)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=60, loop=0)


def save_rollout_gif(path, ep, title, goal=None):
    d = finger_distance(ep["states"])
    gif(path, ep["frames"], [f"{title}  step {t}  dist {d[t]:.3f} m" for t in range(len(ep["frames"]))], goal)


def plot_bc(plt, results, enc):
    if "bc" not in results:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in ("train", "val"):
        ax.plot(results["bc"]["history"][k], label=k)
    ax.axvline(results["bc"]["kept_epoch"], color="k", ls=":", label="kept")
    ax.set(xlabel="epoch", ylabel="MSE", yscale="log", title=f"BC loss ({enc})")
    ax.legend()
    return fig


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
    names = list(conditions)
    rates = np.array([conditions[n]["success"] for n in names])
    ci = np.array([conditions[n]["success_ci"] for n in names]).T
    ax.bar(names, rates * 100, yerr=np.abs(ci - rates) * 100, capsize=4)
    ax.set(ylabel="final-step success %", ylim=(0, 105), title=f"Success with 95% Wilson CI ({enc})")
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_dynamics(plt, results, enc):
    if "dynamics" not in results:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, d in results["dynamics"].items():
        label = f"{name} (loss summed over {d['rollout']} steps)" if d["rollout"] > 1 else name
        axes[0].plot(d["history"]["val"], label=label)
        axes[1].plot(range(1, len(d["kstep_error"]) + 1), d["kstep_error"], marker="o", label=name)
    first = next(iter(results["dynamics"].values()))
    axes[1].plot(range(1, len(first["kstep_copy"]) + 1), first["kstep_copy"], "k--", label="copy z_t")
    axes[0].set(xlabel="epoch", ylabel="val loss (k-step models: their k-step loss)", yscale="log",
                title=f"Dynamics validation loss ({enc})")
    axes[1].set(xlabel="k (open-loop steps)", ylabel="L2 error (model space)", title=f"k-step prediction error ({enc})")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def plot_plan(plt, results, enc):
    if not results.get("plan_traces"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, tr in results["plan_traces"].items():
        for ax, key in zip(axes, ("latent", "finger")):
            x = np.array(tr[key])
            ax.plot(x.mean(0), label=name)
            ax.fill_between(range(x.shape[1]), x.mean(0) - x.std(0), x.mean(0) + x.std(0), alpha=0.15)
    axes[1].axhline(SUCCESS_RADIUS, color="k", ls="--", lw=1, label=f"success radius {SUCCESS_RADIUS} m")
    axes[0].set(xlabel="step", ylabel="||z - z_goal||", title=f"Latent distance under MPC ({enc})")
    axes[1].set(xlabel="step", ylabel="finger-target distance (m)", title=f"Finger distance under MPC ({enc})")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def plot_probe(plt, results, enc):
    if "probe" not in results:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    cols = [c for c in results["probe"] if results["probe"][c]]
    names = list(results["probe"][cols[0]])
    values = np.array([[results["probe"][c][n] for n in names] for c in cols], dtype=float)
    w = 0.8 / len(cols)
    for i, c in enumerate(cols):
        ax.bar(np.arange(len(names)) + i * w, values[i], w, label=c)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
    finite = values[np.isfinite(values)]
    low = min(0.0, finite.min() if finite.size else 0.0)
    ax.set(ylabel="held-out R^2", ylim=(low - 0.05, 1.05), title=f"Linear probe R^2 ({enc})")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    return fig


def plot_rl(plt, results, enc):
    if "rl" not in results or not results["rl"].get("runs"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for label, trained in results["rl"]["runs"].items():
        curve = trained["curve"]
        axes[0].plot([c["step"] for c in curve], [c["return"] for c in curve], marker="o", label=label)
        axes[1].plot([c["step"] for c in curve], [100 * c["success"] for c in curve], marker="o", label=label)
    axes[0].set(xlabel="environment steps", ylabel="return", title=f"SAC learning curve ({enc})")
    axes[1].set(xlabel="environment steps", ylabel="final-step success %", ylim=(0, 105), title=f"SAC success ({enc})")
    for ax in axes:
        ax.legend()
    return fig


def make_plots(out, results):
    """Write the PNG plots for whatever stages have run; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    enc, made = results["encoder"]["id"], []
    for name, plot in (("bc_loss.png", plot_bc), ("success.png", plot_success), ("dynamics.png", plot_dynamics),
                       ("plan_distance.png", plot_plan), ("probe.png", plot_probe), ("rl_curve.png", plot_rl)):
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
    timing = os.path.join(out, "timing.json")
    results = {"config": config, "encoder": config.get("encoder_info", {"id": config["encoder"]}),
               "timing": load_json(timing) if os.path.exists(timing) else {}}
    for name, key in (("bc.json", "bc"), ("eval.json", None), ("rl.json", "rl"), ("dynamics.json", None),
                      ("plan.json", None), ("probe.json", None)):
        path = os.path.join(out, name)
        if os.path.exists(path):
            part = load_json(path)
            if key is None and "steps" in part:  # each table's own episode length: eval_steps, plan_steps
                part[f"{name[:-5]}_steps"] = part.pop("steps")
            results.update({key: part} if key else part)
    if "rl" in results and "eval" in results:  # SAC's final policies join the Phase 1 table
        results["eval"].update(results["rl"]["eval"])
    return results


def encoder_note(enc):
    if enc == "tiny":
        return " (`tiny` is a random-weight VJEPA2 model: it tests the plumbing and is NOT V-JEPA 2)"
    return " (`state` is the privileged-state oracle, not pixels)" if enc == "state" else ""


def recipe_notes(cfg):
    """The seed's own inconsistencies, stated as the seed's wherever --recipe seed reproduces them."""
    notes = []
    if cfg.get("mpc_obs") == "frame":
        notes.append("MPC observations are the current frame repeated x8, not the sliding window the dynamics "
                     "were trained on: the seed's code did this (mpc_planner.py), not a choice of ours.")
    if cfg.get("plan_frame_size") != cfg.get("frame_size"):
        notes.append(f"Goals and MPC observations are rendered at {cfg.get('plan_frame_size')} px while the data "
                     f"were at {cfg.get('frame_size')} px, as in the seed's code (at 224 px V-JEPA 2's position "
                     "layout no longer matches its 16x16 patch grid; the seed ran it so).")
    if cfg.get("plan_precision") != cfg.get("precision"):
        notes.append(f"The encoder runs at {cfg.get('precision')} for data and {cfg.get('plan_precision')} for MPC, "
                     "as the seed's code did.")
    if cfg.get("rs_goal") == "random-run":
        notes.append("Random shooting's goal comes from a random run on another episode (another target), as "
                     "the seed's code: its goal env's RNG moved on before the planned episode.")
    if cfg.get("episode_seeds") == "seed":
        notes.append("Demo and exploration data share episode seeds 0..N-1, as the seed's code; its epsilon "
                     "draws were unseeded, ours are seeded.")
    return notes


def write_report(out):
    """Rebuild results.json, the plots and report.md from the run folder; nothing is re-run."""
    results = collect_results(out)
    plots = make_plots(out, results)
    enc, cfg = results["encoder"]["id"], results["config"]
    parts = [f"# vjepa-reacher report: encoder `{enc}`{encoder_note(enc)}", "",
             f"Recipe `{cfg.get('recipe', 'ours')}`. Made by these commands, in order:", ""]
    parts += [f"    {c}" for c in cfg.get("commands", [])]
    parts += ["", f"Rebuild with `python vjepa_reacher.py report --out {out}`.", ""]
    notes = recipe_notes(cfg)
    if notes:
        parts += ["The seed's inconsistencies, reproduced on purpose by `--recipe seed`:", ""]
        parts += [f"- {n}" for n in notes] + [""]
    if "eval" in results:
        parts += ["## " + phase1_table(results, results.get("eval_steps", cfg["steps"])), "",
                  "success: reward 1 at the last step. seed_success: return > 150 per 200 steps (the seed's own "
                  "definition, scaled to the episode length). The seed's expert was the `p` controller; its random "
                  "figure was '~2% / ~0'.", ""]
    if "bc" in results:
        parts += [bc_line(results), "", f"![BC loss, encoder {enc}](bc_loss.png)", ""]
    if "rl" in results:
        parts += [rl_section(results), ""]
    if "success.png" in plots:
        parts += [f"![success rates, encoder {enc}](success.png)", ""]
    if "dynamics" in results:
        parts += [f"## Phase 3/4c/4d: dynamics models (encoder `{enc}`)", "", dynamics_table(results), "",
                  "Errors are L2 in the model's latent space on validation episodes. A model below the copy "
                  "baseline predicts motion; one at it has learned nothing. Seed: mlp ~1.2M params, val ~0.01; "
                  "resblock 10.5M, val 0.0137.", "", f"![dynamics, encoder {enc}](dynamics.png)", ""]
    if results.get("plan"):
        parts += ["## " + plan_table(results, results.get("plan_steps", cfg["plan_steps"])), "",
                  "Latent distances are L2 in the dynamics model's space (standardised unless raw latents were "
                  "used; the seed's were raw ViT-L L2, so only the improvement % compares). improvement = "
                  "(initial - final) / initial.", "",
                  f"![latent and finger distance under MPC, encoder {enc}](plan_distance.png)", ""]
    if "probe" in results:
        parts += [f"## What the embedding knows: ridge probe R^2, 4-fold by episode (encoder `{enc}`)", "",
                  probe_table(results), "",
                  "Seed (V-JEPA 2 on its own video probe, not reacher): object XY R^2 0.86 vs random-init -0.11.", ""]
        if "embedding_stats" in results:
            st = results["embedding_stats"]
            rows = [[k] + [f"{st[c][k]:.3f}" for c in st] for k in next(iter(st.values()))]
            parts += [md_table(["statistic"] + list(st), rows), "", f"![probe, encoder {enc}](probe.png)", ""]
    gifs = sorted(os.path.basename(g) for g in glob.glob(os.path.join(out, "*.gif")))
    if gifs:
        parts += ["## Rollouts", ""] + [f"![{g}]({g})" for g in gifs] + [""]
    if results["timing"]:
        parts += ["## Cost: wall time per stage on this machine", "",
                  md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in results["timing"].items()]), ""]
    save_json(os.path.join(out, "results.json"), results)
    write_text(os.path.join(out, "report.md"), "\n".join(parts))
    return results


# ---- Stages --------------------------------------------------------------------------------------------------------
# Each reads and writes only files in the run folder, so any stage can be re-run alone.
# A stage returns False when it skipped (its outputs exist), so the run folder is left untouched.
def exists_skip(args, path, stage):
    """The one skip rule: outputs that exist are kept unless --force."""
    if os.path.exists(path) and not args.force:
        print(f"{stage}: {path} exists; --force to redo")
        return True
    return False


def is_lean(args):
    return not args.full_render


def stage_envs(args, encoder, n, expert=None):
    """Envs for n episodes as the options ask: up to --batch-size in lockstep, --render-workers, frame size."""
    return make_envs(min(n, args.batch_size), render_workers(args.render_workers), frame_size_of(encoder),
                     is_lean(args), expert)


def stage_collect(args, encoder, expert=None, epsilon=None):
    expert = expert or args.expert
    epsilon = args.epsilon if epsilon is None else epsilon
    name = dataset_name(expert, epsilon)
    data_dir = os.path.join(args.out, "data", name)
    seeds = episode_seeds("explore" if epsilon > 0 else "collect", args.episodes, args.seed,
                          args.episode_seeds == "seed")
    i, n = args.shard
    shard_dir = os.path.join(args.out, "shards", name, f"shard_{i}of{n}")
    if os.path.exists(os.path.join(data_dir, "meta.json")) and not args.force:
        meta = load_json(os.path.join(data_dir, "meta.json"))
        check_meta(meta, encoder, data_dir, steps=args.steps, lean=is_lean(args))
        if meta["seeds"] == sorted(seeds):
            print(f"collect: {data_dir} exists ({len(seeds)} episodes); --force to redo")
            return False
    if args.force:
        for f in glob.glob(os.path.join(shard_dir, "*")):
            os.remove(f)
    collect_shard(shard_dir, encoder, expert, epsilon, args.steps, seeds[i::n], args.batch_size, is_lean(args),
                  args.store_dtype, args.seed, render_workers(args.render_workers))
    if n == 1:
        merge([shard_dir], data_dir)
        print(f"collect: {len(seeds)} episodes x {args.steps} steps ({expert}, epsilon {epsilon:g}) -> {data_dir}")
    else:
        print(f"collect: shard {i}/{n} done -> {shard_dir}; run `merge` once all {n} shards are done")


def stage_merge(args, encoder):
    merged = False
    for expert, eps in {(args.expert, args.epsilon), (args.explore_expert, args.explore_epsilon)}:
        name = dataset_name(expert, eps)
        shards = sorted(glob.glob(os.path.join(args.out, "shards", name, "shard_*of*")))
        if shards:
            meta = merge(shards, os.path.join(args.out, "data", name))
            print(f"merge: {len(shards)} shards, {meta['episodes']} episodes -> {args.out}/data/{name}")
            merged = True
        elif expert == args.expert and eps == args.epsilon:
            raise UserError(f"no shards in {args.out}/shards/{name}: run `collect --shard i/N` first")
    return merged


def rl_standardizer(args, encoder):
    """mean, std of z for SAC: from the Phase 1 data when they exist, else from 16 random-action episodes."""
    data_dir = os.path.join(args.out, "data", dataset_name(args.expert, args.epsilon))
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        data = load_dataset(data_dir, encoder)
        name = os.path.relpath(data_dir, args.out)
        return (*standardizer(data["z"], np.arange(len(data["z"]))), f"the Phase 1 data ({name})")
    seeds = episode_seeds("rl", 16, args.seed)[::-1]  # the range's far end: training starts at its front
    with make_envs(16, 0, frame_size_of(encoder), is_lean(args)) as envs:
        eps = run_episodes(seeds, random_policy(np.random.default_rng(args.seed)), encoder, envs, args.steps,
                           needs_z=False, keep_z=True, batch_size=args.batch_size, desc="rl warm-up")
    z = np.stack([ep["z"] for ep in eps])
    return (*standardizer(z, np.arange(len(z))), "16 random-action episodes (no Phase 1 data)")


def rl_estimate(args, encoder, variants=1):
    """Expected time from measured rates: SAC updates timed here, encoding as `collect` estimates it."""
    agent = SACAgent(encoder.dim, np.zeros(encoder.dim), np.ones(encoder.dim), device=args.device, capacity=512)
    agent.buffer.add_episode(np.zeros((257, encoder.dim), np.float32), np.zeros((256, 2)), np.zeros(256))
    agent.update()
    t0 = time.perf_counter()
    for _ in range(10):
        agent.update()
    updates = (args.rl_steps - min(5_000, args.rl_steps // 4)) // args.action_repeat * variants
    seconds = (time.perf_counter() - t0) / 10 * updates
    print(f"estimate: {updates:,} SAC updates at {seconds / updates * 1000:.1f} ms = {seconds / 60:.1f} min")
    if encoder.pixels:
        print_estimate(encoder, updates * (1 + 1 / args.action_repeat), args.batch_size)


def run_rl(args, encoder, path, mean, std, source, variants, done):
    """Train each SAC variant, evaluate its final policy; its actor and rl.json are saved as it ends."""
    rl_estimate(args, encoder, len(variants))
    eval_seeds = episode_seeds("eval", args.eval_episodes, args.seed)
    result = dict(done, standardisation=source, steps=args.steps)
    train_envs = make_envs(args.rl_envs, render_workers(args.render_workers), frame_size_of(encoder), is_lean(args))
    with train_envs as envs, stage_envs(args, encoder, len(eval_seeds)) as eval_envs:
        evaluate = partial(evaluate_sac, encoder=encoder, envs=eval_envs, steps=args.steps,
                           action_repeat=args.action_repeat, batch_size=args.batch_size)
        for name, demos in variants.items():  # learning starts after min(5,000, 1/4 of the steps): quick runs learn
            t0, bar = time.time(), Progress(args.rl_steps, f"rl {name}")
            agent, curve = train_sac(encoder, envs, partial(episode_seeds, "rl", seed=args.seed), args.steps,
                                     args.rl_steps, mean, std, args.action_repeat, demos, args.rl_eval_every,
                                     partial(evaluate, seeds=eval_seeds[:args.rl_eval_episodes]), args.seed,
                                     args.device, bar, learning_starts=min(5_000, args.rl_steps // 4))
            bar.close()
            result["eval"][name] = evaluate(agent, seeds=eval_seeds)
            result["runs"][name] = {"curve": curve, "env_steps": agent.env_steps, "updates": agent.updates,
                                    "seconds": time.time() - t0}
            save_model(os.path.join(args.out, f"{name.replace('+', '_')}_actor.pt"), agent.nets["actor"],
                       {"encoder": encoder.info(), "render": render_mode(encoder, is_lean(args)),
                        "mean": mean.tolist(), "std": std.tolist()})
            print(f"rl {name}: {agent.env_steps:,} env steps, {agent.updates:,} updates, "
                  f"{time.time() - t0:.0f} s | final success {fmt_rate(result['eval'][name])}")
            save_json(path, result)
    write_text(os.path.join(args.out, "rl_curve.csv"), "step,return,success,seed,variant\n" + "".join(
        f"{c['step']},{c['return']:.3f},{c['success']:.4f},{args.seed},{name}\n"
        for name, trained in result["runs"].items() for c in trained["curve"]))
    save_json(path, result)
    print(rl_section({"rl": result, "encoder": encoder.info()}))


def stage_rl(args, encoder):
    """SAC on frozen embeddings, without and (with --rl-demos) with the Phase 1 demos mixed in; the final
    deterministic policy is evaluated like every other condition, on the evaluation episodes."""
    path = os.path.join(args.out, "rl.json")
    done = load_json(path) if os.path.exists(path) and not args.force else {"runs": {}, "eval": {}}
    wanted = ["rl"] + ["rl+demos"] * args.rl_demos
    if all(name in done["runs"] for name in wanted):  # each variant is kept once it finishes
        print(f"rl: {path} has {', '.join(wanted)}; --force to redo")
        return False
    mean, std, source = rl_standardizer(args, encoder)
    variants = {"rl": None} if "rl" not in done["runs"] else {}
    if args.rl_demos and "rl+demos" not in done["runs"]:
        data = load_dataset(os.path.join(args.out, "data", dataset_name(args.expert, args.epsilon)), encoder)
        episodes = [{"z": data["z"][e], "actions": data["actions"][e], "rewards": data["rewards"][e]}
                    for e in range(len(data["z"]))]
        variants["rl+demos"] = demo_buffer(episodes, encoder.dim, args.action_repeat)
    # SAC's nets are small: one CPU thread (2 threads were 200x slower here beside another busy process); a
    # ViT-L encoder keeps every thread.
    with cpu_threads(1 if args.device == "cpu" and encoder.dim < 512 else None):
        return run_rl(args, encoder, path, mean, std, source, variants, done)


def stage_explore(args, encoder):
    return stage_collect(args, encoder, args.explore_expert, args.explore_epsilon)


def model_meta(data, mean, std, **extra):
    return dict({"encoder": data["meta"]["encoder"], "render": data["meta"].get("render"), "mean": mean.tolist(),
                 "std": std.tolist()}, **extra)


def stage_bc(args, encoder):
    path = os.path.join(args.out, "bc.pt")
    if exists_skip(args, path, "bc"):
        return False
    data = load_dataset(os.path.join(args.out, "data", dataset_name(args.expert, args.epsilon)), encoder)
    model, info, (mean, std) = train_bc(data, args.epochs, args.bc_lr, args.bc_batch_size, args.seed,
                                        args.bc_optimizer, args.bc_weight_decay, args.bc_split, args.val_frac,
                                        args.bc_keep, args.bc_norm, args.schedule_step, args.device)
    print(bc_line({"bc": info}))
    save_model(path, model, model_meta(data, mean, std))
    save_json(os.path.join(args.out, "bc.json"), info)


def load_checked(args, encoder, path, made_by, net=None):
    """A checkpoint's weights into `net` (None: the dynamics model its metadata names), with its input
    standardisation; refused if it was made with another encoder or render look."""
    ckpt = load_model(path, made_by)
    meta = ckpt["meta"]
    check_meta(meta, encoder, path, lean=is_lean(args))
    if net is None:
        net = dynamics_net(meta["name"], encoder.dim, meta.get("resblock_relu", False))
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit encoder dim {encoder.dim}: {str(e).splitlines()[0]}")
    mean, std = (np.array(meta[k], np.float32) for k in ("mean", "std"))
    return net.eval().requires_grad_(False), mean, std


def state_baselines(seeds, steps, seed):
    """Both experts and a uniform random policy on episodes `seeds`: they act on the physics, so they need no
    rendering or encoding. Returns episode_metrics for p, jacobian and random."""
    policies = dict.fromkeys(EXPERT_NAMES, expert_policy)
    policies["random"] = random_policy(np.random.default_rng(seed))
    state, metrics = load_encoder("state"), {}
    for name, policy in policies.items():
        with Envs(min(len(seeds), 100), expert=name if name in EXPERTS else None) as envs:
            eps = run_episodes(seeds, policy, state, envs, steps, needs_z=False, desc=name)
        metrics[name] = episode_metrics(eps, steps)
    return metrics


def stage_eval(args, encoder):
    path = os.path.join(args.out, "eval.json")
    if exists_skip(args, path, "eval"):
        return False
    model, mean, std = load_checked(args, encoder, os.path.join(args.out, "bc.pt"), "bc", bc_net(encoder.dim))
    seeds = episode_seeds("eval", args.eval_episodes, args.seed)
    baselines = state_baselines(seeds, args.steps, args.seed)
    results = {"experts": {name: baselines[name] for name in EXPERT_NAMES}, "eval": {}, "steps": args.steps}
    if encoder.pixels:
        print_estimate(encoder, len(seeds) * (args.steps + 1), args.batch_size)
    with stage_envs(args, encoder, len(seeds)) as envs:
        eps = run_episodes(seeds, bc_policy(model, mean, std), encoder, envs, args.steps, batch_size=args.batch_size,
                           keep_frames=int(encoder.pixels), desc="eval bc")
    results["eval"]["bc"] = episode_metrics(eps, args.steps)
    if not encoder.pixels:
        eps = [gif_episode(seeds[0], bc_policy(model, mean, std), encoder, args.steps, args.frame_size, is_lean(args))]
    save_rollout_gif(os.path.join(args.out, "rollout_bc.gif"), eps[0], "BC")
    results["eval"]["random"] = baselines["random"]
    ep = gif_episode(seeds[0], expert_policy, encoder, args.steps, args.frame_size, is_lean(args), args.expert)
    save_rollout_gif(os.path.join(args.out, "rollout_expert.gif"), ep, f"expert {args.expert}")
    save_json(path, results)
    print(phase1_table(dict(results, encoder=encoder.info()), args.steps))


def clear_plans(out, model_name):
    path = os.path.join(out, "plan.json")
    if not os.path.exists(path):
        return
    plans = load_json(path)
    stale = [c for c in plans["plan"] if c.split("/")[1] == model_name]
    for c in stale:
        del plans["plan"][c]
        plans["plan_traces"].pop(c, None)
    if stale:
        save_json(path, plans)
        print(f"dynamics: cleared plan results {', '.join(stale)} (made with the old {model_name}); re-run `plan`")


def stage_dynamics(args, encoder):
    """Train args.dynamics; a re-run with a subset keeps the other models and clears plans that used the
    retrained ones (they no longer match their model)."""
    path = os.path.join(args.out, "dynamics.json")
    done = load_json(path)["dynamics"] if os.path.exists(path) else {}
    todo = [m for m in args.dynamics if args.force or m not in done]
    if not todo:
        print(f"dynamics: {path} has {', '.join(args.dynamics)}; --force to retrain")
        return False
    data = load_dataset(os.path.join(args.out, "data", dataset_name(args.explore_expert, args.explore_epsilon)),
                        encoder, made_by="explore")
    for name in todo:
        epochs = args.dyn_epochs or {"mlp": 100, "mlp_rollout5": args.rollout_epochs, "resblock": 150}[name]
        model, info, (mean, std) = train_dynamics(
            name, data, epochs, args.dyn_lr, args.dyn_batch_size, args.seed, args.rollout, args.dyn_norm,
            args.dyn_split, args.dyn_grad_clip, args.rollout_loss, args.rollout_sampling,
            args.resblock_relu == "on", args.schedule_step, args.device)
        info["kstep_error"], info["kstep_copy"] = kstep_error(model, data["z"], data["actions"], info["val_episodes"],
                                                              mean, std, device=args.device)
        save_model(os.path.join(args.out, f"dynamics_{name}.pt"), model,
                   model_meta(data, mean, std, name=name, resblock_relu=args.resblock_relu == "on"))
        done[name] = info
        save_json(path, {"dynamics": done})
        clear_plans(args.out, name)
    print(dynamics_table({"dynamics": done}))


def load_dynamics(args, encoder, name):
    return load_checked(args, encoder, os.path.join(args.out, f"dynamics_{name}.pt"), "dynamics")


def plan_settings(args, planner):
    """The planner's settings as one dict, as vjepa2's mpc_utils passes them."""
    on_cuda = args.device.startswith("cuda")
    dtype = (torch.float16 if on_cuda else torch.bfloat16) if args.plan_bf16 else torch.float32
    return dict(planner=planner, horizon=args.horizon, samples=args.rs_samples if planner == "random" else args.samples,
                elites=args.elites, iterations=args.iterations, init_std=args.cem_init_std, std_mode=args.cem_std,
                warm_tail=args.warm_tail, execute=args.execute, dtype=dtype, seed=args.seed, device=args.device,
                cost="final" if planner == "random" and args.rs_goal == "random-run" else args.cost)


def plan_goals(args, encoder, seeds, kind):
    """z_goal for every plan episode: the expert goal, or the seed's random-run goal for random shooting."""
    with stage_envs(args, encoder, len(seeds), args.goal_expert if kind == "expert" else None) as envs:
        if kind == "expert":
            return expert_goals(seeds, args.goal_expert, encoder, envs, args.goal_horizon, args.goal_form,
                                args.batch_size)
        return random_run_goals(seeds, encoder, envs, args.goal_form, batch_size=args.batch_size)


def goal_frame_of(args, seed):
    """The expert's closest-approach frame, rendered for the GIF when the encoder itself sees no pixels."""
    ep = gif_episode(seed, expert_policy, load_encoder("state"), args.goal_horizon, args.plan_frame_size,
                     is_lean(args), args.goal_expert)
    return ep["frames"][1 + int(finger_distance(ep["states"])[1:].argmin())]


def plan_metrics(eps, z_goal, std, steps, seconds, goals):
    """Success, return and latent distance to the goal (in the dynamics model's standardised space)."""
    latent = np.stack([np.linalg.norm((ep["z"] - zg) / std, axis=1) for ep, zg in zip(eps, z_goal)])
    finger = np.stack([finger_distance(ep["states"]) for ep in eps])
    improvement = (latent[:, 0] - latent[:, -1]) / np.maximum(latent[:, 0], 1e-9)
    m = episode_metrics(eps, steps)
    for key, x in (("latent_initial", latent[:, 0]), ("latent_final", latent[:, -1]), ("latent_min", latent.min(1)),
                   ("latent_improvement", improvement), ("final_distance", finger[:, -1])):
        m[key], m[f"{key}_ci"] = mean_ci(x)  # mean and 95% half-width over episodes
    m["ms_per_action"] = 1000 * seconds / (steps * len(eps))
    m["ms_per_step_all_episodes"] = 1000 * seconds / steps
    m["goal_distance"] = float(np.mean([g["distance"] for g in goals]))  # the goal's own finger distance
    m["episodes"] = [{"seed": ep["seed"], "success": bool(ep["rewards"][-1] >= 1), "return": float(ep["rewards"].sum()),
                      "final_distance": ep["final_distance"], "latent_initial": float(lat[0]),
                      "latent_final": float(lat[-1]), "latent_min": float(lat.min())} for ep, lat in zip(eps, latent)]
    return m, {"latent": latent.tolist(), "finger": finger.tolist()}


def stage_plan(args, encoder):
    """Each planner/model pair is saved as soon as it finishes; a re-run does only the missing pairs."""
    path = os.path.join(args.out, "plan.json")
    done = load_json(path) if os.path.exists(path) and not args.force else {"plan": {}, "plan_traces": {}}
    todo = [c for c in args.plans if c not in done["plan"] and c.split("/")[1] in args.dynamics]
    if not todo:
        print(f"plan: {path} has {', '.join(args.plans)}; --force to redo")
        return False
    models = {name: load_dynamics(args, encoder, name) for name in {c.split("/")[1] for c in todo}}
    # The seed planned at 224 px in fp32 on data collected at 256 px in fp16: --plan-frame-size/precision.
    plan_encoder = encoder.variant(args.plan_precision, args.plan_frame_size)
    seeds, steps = episode_seeds("plan", args.plan_episodes, args.seed), args.plan_steps
    goals = {"expert": plan_goals(args, plan_encoder, seeds, "expert")}
    if any(c.startswith("random/") for c in todo) and args.rs_goal == "random-run":
        goals["random-run"] = plan_goals(args, plan_encoder, seeds, "random-run")
    gif_made = os.path.exists(os.path.join(args.out, "rollout_cem.gif")) and not args.force
    for combo in todo:
        planner, name = combo.split("/")
        z_goal, info = goals["random-run" if planner == "random" and "random-run" in goals else "expert"]
        model, mean, std = models[name]
        mpc = MPC(model, dict(zip(seeds, z_goal)), mean, std, **plan_settings(args, planner))
        with stage_envs(args, plan_encoder, len(seeds)) as envs:
            eps = run_episodes(seeds, mpc, plan_encoder, envs, steps, keep_z=True, window_form=args.mpc_obs,
                               keep_frames=int(planner == "cem" and not gif_made and plan_encoder.pixels),
                               batch_size=args.batch_size, desc=f"plan {combo}")
        m, trace = plan_metrics(eps, z_goal, std, steps, mpc.seconds, info)
        done["plan"][combo], done["plan_traces"][combo] = m, trace
        save_json(path, dict(done, steps=steps))
        print(f"plan {combo}: success {fmt_rate(m)} | return {m['return']:.1f} | latent {m['latent_initial']:.2f} -> "
              f"{m['latent_final']:.2f} (min {m['latent_min']:.2f}) | {m['ms_per_action']:.0f} ms/action")
        if planner == "cem" and not gif_made:  # the first CEM model of this run, beside its goal frame
            if "frames" not in eps[0]:
                eps[0] = gif_episode(seeds[0], mpc, plan_encoder, steps, args.plan_frame_size, is_lean(args),
                                     window_form=args.mpc_obs)
            goal_frame = info[0]["frame"] if info[0]["frame"] is not None else goal_frame_of(args, seeds[0])
            save_rollout_gif(os.path.join(args.out, "rollout_cem.gif"), eps[0], f"CEM {name}", goal_frame)
            gif_made = True
    print(plan_table(dict(done, encoder=encoder.info()), steps))


def stage_probe(args, encoder):
    path = os.path.join(args.out, "probe.json")
    if exists_skip(args, path, "probe"):
        return False
    seeds = episode_seeds("probe", args.probe_episodes, args.seed)
    random_init = random_init_like(encoder, args.seed + 1)  # None for `state`: it has no architecture
    # One rollout renders the frames; every encoder sees the same windows (frames are kept only here).
    with stage_envs(args, encoder, len(seeds), args.explore_expert) as envs:
        eps = run_episodes(seeds, expert_policy, encoder, envs, args.steps, needs_z=False, keep_z=True,
                           epsilon=args.explore_epsilon, noise_seed=args.seed, batch_size=args.batch_size,
                           keep_frames=len(seeds) if encoder.pixels else 0, desc="probe")
    states = np.stack([ep["states"] for ep in eps])
    z = {"encoder": np.stack([ep["z"] for ep in eps])}
    if encoder.pixels:  # the oracle column; for `state` it would repeat the encoder column
        z["state"] = states
    if random_init is not None:
        z["random_init"] = np.stack([encode_batched(random_init, windows_from_frames(ep["frames"]),
                                                    args.batch_size) for ep in eps])
    E, T1 = states.shape[:2]
    probe = {k: probe_embeddings(v.reshape(E * T1, -1).astype(np.float64), states) for k, v in z.items()}
    stats = {f"{k}{' standardised' if s else ''}": embedding_stats(z[k], s) for k in ("encoder", "random_init")
             if k in z for s in (False, True)}
    save_json(path, {"probe": probe, "embedding_stats": stats})
    print(probe_table({"probe": probe, "encoder": encoder.info()}))


def stage_report(args, encoder):
    results = write_report(args.out)
    print(f"report: {args.out}/report.md, {args.out}/results.json ({len(results)} sections)")


STAGES = {"collect": stage_collect, "merge": stage_merge, "bc": stage_bc, "eval": stage_eval, "rl": stage_rl,
          "explore": stage_explore, "dynamics": stage_dynamics, "plan": stage_plan, "probe": stage_probe,
          "report": stage_report}


# ---- Several training seeds: the same stages once per seed, then mean and 95% interval across seeds ----------------
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student t, 2-sided 95%


def across_seeds(values):
    """Mean and 95% t-interval half-width of per-seed values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(T_975.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x)))


def headline(results):
    """Every headline number of one run: {name: (success, n, return)} and probe R^2 values."""
    numbers = {k: {"success": v["success"], "n": v["n"], "return": v["return"]} for k, v in evaluated(results).items()}
    for target, r2_value in results.get("probe", {}).get("encoder", {}).items():
        numbers[f"probe R^2 {target}"] = {"value": r2_value}
    return numbers


def seed_entry(values):
    """One headline measure across seeds: per-seed values, mean, 95% t-interval; for a success rate also the
    pooled Wilson interval over all episodes and the return's mean and interval."""
    key = "value" if "value" in values[0] else "success"
    mean, half = across_seeds([v[key] for v in values])
    entry = {"per_seed": [v[key] for v in values], "mean": mean, "ci95_across_seeds": half}
    if key == "success":
        k = sum(round(v["success"] * v["n"]) for v in values)
        entry["pooled_wilson"] = wilson(k, sum(v["n"] for v in values))
        entry["return"] = dict(zip(("mean", "ci95_across_seeds"), across_seeds([v["return"] for v in values])))
    return entry


def seed_row(name, entry):
    """A row of seeds.md: success rates in %, other measures (probe R^2) as they are."""
    if "pooled_wilson" not in entry:
        return [name, " ".join(f"{x:.2f}" for x in entry["per_seed"]),
                f"{entry['mean']:.2f} ± {entry['ci95_across_seeds']:.2f}", "", ""]
    lo, hi = entry["pooled_wilson"]
    ret = entry["return"]
    return [name, " ".join(f"{100 * x:.0f}" for x in entry["per_seed"]),
            f"{100 * entry['mean']:.1f} ± {100 * entry['ci95_across_seeds']:.1f}", f"[{100 * lo:.0f}, {100 * hi:.0f}]",
            f"{ret['mean']:.1f} ± {ret['ci95_across_seeds']:.1f}"]


def aggregate_seeds(out, seeds):
    """OUT/seeds.json and seeds.md from OUT/seed_S/results.json: per seed, mean ± 95% across seeds, and the
    pooled Wilson interval over all episodes (evaluation episodes are shared, so seeds are paired)."""
    per_seed = {s: headline(load_json(os.path.join(out, f"seed_{s}", "results.json"), made_by="report")) for s in seeds}
    names = [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]
    table = {name: seed_entry([per_seed[s][name] for s in seeds]) for name in names}
    save_json(os.path.join(out, "seeds.json"), {"seeds": seeds, "headline": table, "per_seed": per_seed})
    text = (f"Training seeds {seeds}; evaluation episodes shared across seeds. Success in %.\n\n" +
            md_table(["measure", "per seed", "mean ± 95% across seeds", "pooled Wilson 95% (all episodes)",
                      "return, mean ± 95%"], [seed_row(name, entry) for name, entry in table.items()]) + "\n")
    write_text(os.path.join(out, "seeds.md"), text)
    links = " ".join(f"[seed {s}](seed_{s}/report.md)" for s in seeds)
    first = load_json(os.path.join(out, f"seed_{seeds[0]}", "config.json"))
    commands = "".join(f"    {c}\n" for c in first["commands"])
    write_text(os.path.join(out, "report.md"), f"# vjepa-reacher over training seeds\n\nMade by these commands, in "
               f"order (the per-seed reports list their own):\n\n{commands}\n{text}\nPer seed: {links}\n")
    print(text)


# ---- Main ----------------------------------------------------------------------------------------------------------
def check_writable(out):
    """Refuse an --out that cannot be written, without creating it (it appears only once there is output)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {out}: {path} is not a writable folder")


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but torch {torch.__version__} sees no CUDA GPU "
                        f"(built for CUDA {torch.version.cuda}); use --device cpu")
    return device


def check_run_folder(args, encoder):
    """A run folder belongs to one encoder: refuse another before any stage runs, or skips."""
    path = os.path.join(args.out, "config.json")
    if os.path.exists(path):
        check_meta({"encoder": load_json(path).get("encoder_info", {})}, encoder, args.out)


def record(args, encoder, stage, seconds):
    """config.json keeps the latest options and each command that wrote something, once; timing.json the
    time of each stage that ran."""
    path = os.path.join(args.out, "config.json")
    old = load_json(path) if os.path.exists(path) else {}
    commands = old.get("commands", [])
    if not commands or commands[-1] != args.command:
        commands = commands + [args.command]
    save_json(path, dict(vars(args), encoder_info=encoder.info(), commands=commands))
    timing_path = os.path.join(args.out, "timing.json")
    timing = load_json(timing_path) if os.path.exists(timing_path) else {}
    save_json(timing_path, dict(timing, **{stage: seconds}))


def run(args):
    if args.stage in ("report", "merge"):  # need no encoder: everything comes from the run folder
        return STAGES[args.stage](args, None)
    check_writable(args.out)
    seed_everything(args.seed)
    encoder = load_encoder(args.encoder, args.device, args.precision, args.seed, args.frame_size, args.encoder_forward)
    check_run_folder(args, encoder)
    shard_only = args.stage == "collect" and args.shard[1] > 1  # concurrent shards share no file but their own
    wrote = False
    for name in (ALL if args.stage == "all" else [args.stage]):
        t0 = time.time()
        if STAGES[name](args, encoder) is not False and not shard_only:
            record(args, encoder, name, time.time() - t0)
            wrote = True
    if wrote and args.stage != "report":
        write_report(args.out)
    return wrote


def run_seeds(args):
    """--seeds: the stage once per training seed in OUT/seed_S, then the table across seeds."""
    for s in args.seeds:
        one = argparse.Namespace(**dict(vars(args), seed=s, seeds=None, out=os.path.join(args.out, f"seed_{s}")))
        run(one)
    if args.stage in ("all", "report"):
        aggregate_seeds(args.out, args.seeds)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        if args.stage == "bench":
            sys.modules.setdefault("vjepa_reacher", sys.modules[__name__])  # bench imports this module, not a copy
            import bench
            return bench.bench(args)
        if args.seeds:
            return run_seeds(args)
        run(args)
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
