"""vjepa-reacher: can frozen V-JEPA 2 be the only eyes of a dm_control reacher-easy arm?

What this reproduces (the published findings in shared/seed, "V-JEPA 2 -> Robot Policy"):
  Phase 1   a scripted expert drives reacher-easy, 256x256 frames are rendered, the last 8 frames are
            encoded by frozen V-JEPA 2 ViT-L (facebook/vjepa2-vitl-fpc64-256) into a 1024-d vector,
            and a 279,490-parameter MLP is trained by behaviour cloning and evaluated live.
  Phase 2   epsilon-greedy exploration data (epsilon 0.3, the seed's P-controller).
  Phase 3   residual dynamics MLPs f(z, a) -> z' (1-step, 5-step rollout loss, 10.5M ResBlock).
  Phase 4   latent MPC toward an expert-generated goal embedding: random shooting and CEM.
And where it goes further: a correct Jacobian expert (the seed's P-controller sends a Cartesian vector
to joint motors), a privileged-state oracle encoder (`--encoder state`), statistics over many episodes
with 95% Wilson intervals, a linear probe, and measured speed (`bench`).

References: V-JEPA 2 (Assran et al. 2025, github.com/facebookresearch/vjepa2), dm_control (Tassa et al.
2018), CEM for MPC as in TD-MPC2 and the vjepa2 notebooks' mpc_utils.py.

Copy and paste:
  python vjepa_reacher.py all                                   # everything, V-JEPA 2 ViT-L (GPU advised)
  python vjepa_reacher.py all --quick --encoder tiny            # offline smoke run, a few minutes on CPU
  python vjepa_reacher.py all --encoder state                   # privileged-state oracle: checks the machinery
  python vjepa_reacher.py collect --episodes 500                # Phase 1 expert demos -> runs/default/data/
  python vjepa_reacher.py bc                                    # behaviour cloning on those demos
  python vjepa_reacher.py eval --eval-episodes 100              # live evaluation: BC, experts, random
  python vjepa_reacher.py collect --expert p --epsilon 0.3      # Phase 2 exploration data (= `explore`)
  python vjepa_reacher.py dynamics                              # Phase 3/4c/4d dynamics models
  python vjepa_reacher.py plan --plan-episodes 20               # Phase 4/4b: random shooting and CEM
  python vjepa_reacher.py probe                                 # what the embedding knows (ridge probe)
  python vjepa_reacher.py report                                # rebuild report.md and plots, no re-running
  python vjepa_reacher.py collect --shard 0/4  (... 3/4), then `merge`   # parallel collection
  python vjepa_reacher.py bench --quick                         # speed, written to results/bench.json
"""
import argparse
import collections
import concurrent.futures
import contextlib
import glob
import json
import math
import os
import platform
import re
import sys
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------
FRAME_SIZE = 256  # seed: 256x256 frames, the crop size of vjepa2-vitl-fpc64-256
WINDOW = 8  # seed: the last 8 frames form one V-JEPA 2 clip
DEFAULT_ENCODER = "facebook/vjepa2-vitl-fpc64-256"
MAX_STEPS = 1000  # reacher-easy's own time limit: 20 s at 0.02 s per control step
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # V-JEPA 2 was pretrained with ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
LEAN_RENDER = dict(shadow=False, reflection=False, skybox=False)  # 2.3x faster, same arm and target
STATE_NAMES = ["sin_q0", "sin_q1", "cos_q0", "cos_q1", "qvel0", "qvel1",
               "finger_x", "finger_y", "target_x", "target_y"]
# Disjoint seed ranges (offset by --seed * SEED_STRIDE), so evaluation never replays a training episode.
SEED_STRIDE = 10_000_000
SEED_OFFSET = {"collect": 0, "eval": 5_000_000, "plan": 6_000_000, "probe": 7_000_000}
DYNAMICS = ("mlp", "mlp_rollout5", "resblock")
PLANS = ("random/mlp", "cem/mlp", "cem/mlp_rollout5", "cem/resblock")
# The seed's published figures, shown beside ours in every report.
SEED_PHASE1 = {"bc": (0.20, 66.4), "expert": (0.20, 67.6), "random": (0.02, 0.0)}
SEED_PHASE4 = {  # model: (params, val loss, min latent dist, improvement, env reward)
    "random/mlp": ("", "", "", "", 0.0),
    "cem/mlp": ("~1.2M", "~0.01", 7.80, 0.413, 6.0),
    "cem/mlp_rollout5": ("", "", 9.55, 0.314, 0.0),
    "cem/resblock": ("10.5M", "0.0137", 9.22, 0.115, 0.0),
}


class UserError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback."""


# ----------------------------------------------------------------------------------------------
# Small plumbing: atomic writes, JSON, seeding
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block finishes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))  # keeps the extension
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)


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


# ----------------------------------------------------------------------------------------------
# Environment and experts
# ----------------------------------------------------------------------------------------------
def make_env(seed):
    """dm_control reacher-easy: 2 joint motors in [-1, 1], target radius 0.05 m, 0.02 s control step."""
    from dm_control import suite
    return suite.load("reacher", "easy", task_kwargs={"random": seed})


_ENVS = []


def make_envs(n):
    """n envs reused across calls: building one (XML, physics, GL context) costs ~0.1 s; reset_env reseeds."""
    while len(_ENVS) < n:
        _ENVS.append(make_env(0))
    return _ENVS[:n]


def reset_env(env, seed):
    """Reuse one env (and its GL context) for many episodes: reseed the task, then reset."""
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


_RENDERER = {}


def render(physics, lean=True):
    """One 256x256 RGB frame from camera 0. Lean turns off shadows, reflections and skybox.

    Every env renders through one shared physics and Camera: its state (joints, target position and
    size) is copied in and forward kinematics rerun. A GL context per env would cost ~80 MB and ~0.5 s
    (measured), and physics.render builds a new Camera on every call (~2 ms of a ~6 ms frame)."""
    if not _RENDERER:
        from dm_control.mujoco import Camera
        _RENDERER["physics"] = make_env(0).physics
        _RENDERER["camera"] = Camera(_RENDERER["physics"], FRAME_SIZE, FRAME_SIZE, camera_id=0)
    shared = _RENDERER["physics"]
    shared.model.geom_pos[:] = physics.model.geom_pos
    shared.model.geom_size[:] = physics.model.geom_size
    shared.data.qpos[:] = physics.data.qpos
    shared.data.qvel[:] = physics.data.qvel
    shared.forward()
    # The Camera reuses one pixel buffer: copy, or every frame kept in a window would be the latest one.
    return _RENDERER["camera"].render(render_flag_overrides=LEAN_RENDER if lean else None).copy()


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


def expert_policy(name):
    """Wrap a per-physics expert as a batched policy(physics_list, z) -> (B, 2)."""
    fn = EXPERTS[name]
    return lambda physics_list, z, seeds: np.stack([fn(p) for p in physics_list])


def random_policy(rng):
    return lambda physics_list, z, seeds: rng.uniform(-1, 1, size=(len(physics_list), 2))


# ----------------------------------------------------------------------------------------------
# Frame window and encoders
# ----------------------------------------------------------------------------------------------
def new_window(first):
    """The last WINDOW observations; at reset the first one is repeated to fill it."""
    return collections.deque([first] * WINDOW, maxlen=WINDOW)


def windows_from_frames(frames):
    """Frames (T+1, ...) -> the window seen at every step (T+1, WINDOW, ...), padded as in an episode."""
    window, out = new_window(frames[0]), []
    for t, f in enumerate(frames):
        if t:
            window.append(f)
        out.append(np.stack(window))
    return np.stack(out)


def tiny_config():
    """A small random VJEPA2 config: the same class and code path as ViT-L, for offline runs and tests."""
    from transformers import VJEPA2Config
    return VJEPA2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
                        patch_size=32, crop_size=FRAME_SIZE, frames_per_clip=WINDOW, tubelet_size=2,
                        pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=4,
                        pred_num_mask_tokens=2, num_pooler_layers=1)


class Encoder:
    """What `load_encoder` returns: a frozen model (None for `state`), its id, embedding size and dtype."""

    def __init__(self, id, dim, model=None, device="cpu", precision="fp32", config=None):
        self.id, self.dim, self.model, self.device = id, dim, model, device
        self.precision, self.config = precision, config

    @property
    def pixels(self):
        return self.model is not None


def valid_encoder_name(name):
    return name in ("state", "tiny") or os.path.isdir(name) or bool(re.fullmatch(r"[\w.-]+/[\w.-]*vjepa2[\w.-]*", name, re.I))


def choose_precision(device, precision="auto", hidden_size=1024):
    """fp16 on CUDA; bf16 autocast on CPUs with native bf16 (ViT-L measured here: 4.5 s -> 2.6 s a window)."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    if hidden_size < 512:  # measured: bf16 makes the 64-d `tiny` slower (casts outweigh its small matmuls)
        return "fp32"
    return "bf16" if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else "fp32"


def load_encoder(name_or_path, device="cpu", precision="auto", seed=0):
    """Load a frozen encoder: 'state', 'tiny', a V-JEPA 2 hub id or a local save_pretrained folder."""
    if name_or_path == "state":
        return Encoder("state", len(STATE_NAMES), device=device)
    from transformers import VJEPA2Model
    if name_or_path == "tiny":
        torch.manual_seed(seed)  # tiny is random weights; the seed fixes them
        model = VJEPA2Model(tiny_config())
    else:
        try:
            model = VJEPA2Model.from_pretrained(name_or_path, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise UserError(f"could not fetch checkpoint {name_or_path} ({str(e).splitlines()[0][:120]}); offline? "
                            "use --encoder tiny, --encoder state or a local folder saved with save_pretrained")
    model = model.to(device).eval().requires_grad_(False)
    precision = choose_precision(device, precision, model.config.hidden_size)
    return Encoder(name_or_path, model.config.hidden_size, model, device, precision, model.config)


def random_init_like(encoder, seed=1):
    """The same architecture with random weights: the seed's 'random baseline' for the probe."""
    if not encoder.pixels:
        return None
    from transformers import VJEPA2Model
    torch.manual_seed(seed)
    model = VJEPA2Model(encoder.config).to(encoder.device).eval().requires_grad_(False)
    return Encoder(f"random-init({encoder.id})", encoder.dim, model, encoder.device, encoder.precision, encoder.config)


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


@torch.inference_mode()
def encode(encoder, windows):
    """Windows -> embeddings (B, D) float32.

    Pixel encoders take uint8 windows (B, 8, H, W, 3); only V-JEPA 2's encoder runs (the predictor is
    skipped), and the embedding is the mean over tokens of last_hidden_state. `state` takes the state
    window (B, 8, S) and returns its last row.
    """
    if not encoder.pixels:
        return np.asarray(windows, dtype=np.float32)[:, -1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(encoder.precision)
    x = preprocess(windows, encoder.device, dtype or torch.float32)
    device_type = "cuda" if encoder.device.startswith("cuda") else "cpu"
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
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


# ----------------------------------------------------------------------------------------------
# Rolling out episodes (collection, evaluation and MPC all use this)
# ----------------------------------------------------------------------------------------------
def run_episodes(seeds, policy, encoder, steps, needs_z=True, keep_z=False, epsilon=0.0, noise_seed=0,
                 lean=True, slots=None, batch_size=32, keep_frames=0, on_episode=None, desc=None):
    """Step episodes in lockstep, `slots` at a time, encoding the windows of many episodes as one batch.

    policy(physics_list, z, seeds) -> actions (B, 2); z is (B, D) when needs_z, else None. With epsilon > 0
    each action is replaced by a uniform random one with that probability, drawn from a generator seeded
    by (noise_seed, episode seed), so an episode's data never depends on its batch-mates.
    Pixel encoders run on a worker thread, overlapped with rendering (torch releases the GIL):
    the slots form two groups, and while one group's windows encode, the other group acts, steps
    and renders. When the policy does not read z (an expert), encoding trails rendering by up to two steps.
    Returns one dict per episode (or passes it to on_episode): actions (T, 2), rewards (T,),
    states (T+1, S), final_distance, and z (T+1, D) if keep_z, frames if among the first keep_frames.
    """
    slots = min(slots or len(seeds), len(seeds))
    envs = make_envs(slots)
    encoding = needs_z or keep_z
    pool = concurrent.futures.ThreadPoolExecutor(1) if encoder.pixels and encoding else None
    observe = (lambda p: render(p, lean)) if encoder.pixels else reacher_state
    frame = (lambda p, w: w[-1]) if encoder.pixels else (lambda p, w: render(p, lean))  # frames kept for GIFs
    results, bar = [], tqdm(total=len(seeds) * steps, desc=desc, disable=desc is None, leave=False)
    for start in range(0, len(seeds), slots):
        chunk = [int(s) for s in seeds[start:start + slots]]
        live = envs[:len(chunk)]
        physics = [e.physics for e in live]
        for env, s in zip(live, chunk):
            reset_env(env, s)
        windows = [new_window(observe(p)) for p in physics]
        states = [[reacher_state(p)] for p in physics]
        frames = [[frame(p, w)] if start + i < keep_frames else None for i, (p, w) in enumerate(zip(physics, windows))]
        noise = [np.random.default_rng([noise_seed, s]) for s in chunk]
        actions = np.zeros((len(chunk), steps, 2), np.float32)
        rewards = np.zeros((len(chunk), steps), np.float32)
        groups = np.array_split(np.arange(len(chunk)), 2 if pool and len(chunk) > 1 else 1)
        z = [[None] * len(groups) for _ in range(steps + 1)]  # z[t][group]: array or future

        def encode_group(t, gi):
            if encoding:
                batch = np.stack([np.stack(windows[i]) for i in groups[gi]])
                z[t][gi] = pool.submit(encode_batched, encoder, batch, batch_size) if pool else \
                    encode_batched(encoder, batch, batch_size)

        def z_of(t, gi):
            if isinstance(z[t][gi], concurrent.futures.Future):
                z[t][gi] = z[t][gi].result()
            return z[t][gi]

        for gi in range(len(groups)):
            encode_group(0, gi)
        for t in range(steps):
            for gi, g in enumerate(groups):
                if not needs_z and t >= 2:
                    z_of(t - 2, gi)  # bound the backlog of windows waiting for the encoder
                a = np.asarray(policy([physics[i] for i in g], z_of(t, gi) if needs_z else None,
                                      [chunk[i] for i in g]), dtype=np.float64)
                for j, i in enumerate(g):
                    if epsilon > 0 and noise[i].random() < epsilon:
                        a[j] = noise[i].uniform(-1, 1, size=2)
                    rewards[i, t] = live[i].step(a[j]).reward
                    obs = observe(physics[i])
                    windows[i].append(obs)
                    states[i].append(reacher_state(physics[i]) if encoder.pixels else obs)
                    if frames[i] is not None:
                        frames[i].append(frame(physics[i], windows[i]))
                actions[g, t] = a
                encode_group(t + 1, gi)
            bar.update(len(chunk))
        for i, (p, s) in enumerate(zip(physics, chunk)):
            finger, target = finger_and_target(p)
            ep = {"seed": s, "actions": actions[i], "rewards": rewards[i], "states": np.stack(states[i]),
                  "final_distance": float(np.linalg.norm(target - finger))}
            if keep_z:  # groups are contiguous ranges of the chunk
                gi = next(gi for gi, g in enumerate(groups) if i in g)
                ep["z"] = np.stack([z_of(t, gi)[i - groups[gi][0]] for t in range(steps + 1)])
            if frames[i] is not None:
                ep["frames"] = np.stack(frames[i])
            if on_episode:
                on_episode(ep)
            else:
                results.append(ep)
    bar.close()
    if pool is not None:
        pool.shutdown()
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


def episode_seeds(kind, n, seed):
    return [seed * SEED_STRIDE + SEED_OFFSET[kind] + i for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Data collection: shards of per-episode files, merged into one memory-mappable dataset
# ----------------------------------------------------------------------------------------------
def dataset_name(expert, epsilon):
    return f"{expert}_eps{epsilon:g}"


def versions():
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "mujoco", "dm_control", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def data_meta(encoder, expert, epsilon, steps, seeds, dtype, lean=True):
    return {"encoder": {"id": encoder.id, "dim": encoder.dim, "precision": encoder.precision},
            "render": render_mode(encoder, lean),
            "expert": expert, "epsilon": epsilon, "steps": steps, "seeds": [int(s) for s in seeds],
            "dtype": dtype, "state_names": STATE_NAMES, "versions": versions()}


def save_episode(path, ep, dtype):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, z=ep["z"].astype(dtype), actions=ep["actions"], rewards=ep["rewards"],
                 states=ep["states"], seed=ep["seed"])


def load_episode(path):
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupted ({type(e).__name__}); delete it and re-run collect")


def collect_shard(shard_dir, encoder, expert, epsilon, steps, seeds, batch_size=32, lean=True,
                  dtype="float32", rng_seed=0):
    """Roll out `expert` (epsilon-greedy) on `seeds` and save each episode as shard_dir/ep_SEED.npz.

    Episodes already on disk are skipped, so a killed run resumes. meta.json is written last: a shard
    without it is incomplete. Frames are never stored (100k frames at 256^2 would be ~20 GB).
    """
    os.makedirs(shard_dir, exist_ok=True)
    meta = data_meta(encoder, expert, epsilon, steps, seeds, dtype, lean)
    old = os.path.join(shard_dir, "meta.json")
    if os.path.exists(old):
        check_meta(load_json(old), encoder, shard_dir, steps=steps, lean=lean)
    todo = [s for s in seeds if not os.path.exists(os.path.join(shard_dir, f"ep_{s}.npz"))]
    if len(todo) < len(seeds):
        print(f"resuming {shard_dir}: {len(seeds) - len(todo)} of {len(seeds)} episodes already saved")
    if todo and encoder.pixels:
        print_estimate(encoder, len(todo) * (steps + 1), batch_size)
    run_episodes(todo, expert_policy(expert), encoder, steps, needs_z=False, keep_z=True, epsilon=epsilon,
                 noise_seed=rng_seed, lean=lean, slots=batch_size, batch_size=batch_size,
                 on_episode=lambda ep: save_episode(os.path.join(shard_dir, f"ep_{ep['seed']}.npz"), ep, dtype),
                 desc=f"collect {os.path.basename(shard_dir)}")
    save_json(old, meta)
    return meta


def render_mode(encoder, lean):
    return "lean" if lean and encoder.pixels else "full" if encoder.pixels else "none"


def check_meta(meta, encoder, where, steps=None, lean=None):
    """Refuse data or models made with another encoder (or render look) before any training starts."""
    enc = meta.get("encoder", {})
    if enc.get("id") != encoder.id or enc.get("dim") != encoder.dim:
        raise UserError(f"{where} was made with encoder {enc.get('id')} (dim {enc.get('dim')}), but --encoder is "
                        f"{encoder.id} (dim {encoder.dim}); pass --encoder {enc.get('id')} or use another --out")
    if lean is not None and meta.get("render", render_mode(encoder, lean)) != render_mode(encoder, lean):
        # measured: the lean look moves tiny's embeddings ~17x more than one control step does
        raise UserError(f"{where} was made with {meta['render']} rendering, this run uses {render_mode(encoder, lean)}; "
                        f"{'drop' if lean is False else 'add'} --full-render")
    if steps is not None and meta.get("steps") != steps:
        raise UserError(f"{where} was collected with --steps {meta.get('steps')}, not {steps}; "
                        f"pass --steps {meta.get('steps')} or --force to re-collect")


def merge(shard_dirs, out_dir):
    """Stream shards into one dataset of .npy arrays (episodes, T+1, D) that training can memory-map.

    Checks that every shard is complete, none is missing and no seed appears twice; meta.json is
    written last, so a dataset without it is never taken as complete.
    """
    if not shard_dirs:
        raise UserError(f"no shards to merge for {out_dir}: run `collect` first")
    shard_dirs, metas = sorted(shard_dirs), []
    for d in shard_dirs:
        if not os.path.exists(os.path.join(d, "meta.json")):
            raise UserError(f"shard {d} is incomplete (no meta.json): re-run its `collect --shard` to finish it")
        metas.append(load_json(os.path.join(d, "meta.json")))
    found = sorted(int(re.search(r"shard_(\d+)of(\d+)", d).group(1)) for d in shard_dirs)
    total = int(re.search(r"of(\d+)", shard_dirs[0]).group(1))
    missing = sorted(set(range(total)) - set(found))
    if missing:
        raise UserError(f"missing shards {missing} of {total} for {out_dir}: run `collect --shard i/{total}` for them")
    keys = ("encoder", "expert", "epsilon", "steps", "dtype", "render")
    for m, d in zip(metas, shard_dirs):
        for k in keys:
            if m.get(k) != metas[0].get(k):
                raise UserError(f"shard {d} has {k}={m.get(k)} but {shard_dirs[0]} has {metas[0].get(k)}; "
                                "shards must match")
    seeds = [s for m in metas for s in m["seeds"]]
    dup = sorted(s for s, count in collections.Counter(seeds).items() if count > 1)
    if dup:
        raise UserError(f"seeds overlap between shards (e.g. {dup[:3]}); shards need disjoint seeds")
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
    for i, s in enumerate(tqdm(order, desc=f"merge {os.path.basename(out_dir)}", leave=False)):
        d = shard_of[s]
        ep = load_episode(os.path.join(d, f"ep_{s}.npz"))
        for k in arrays:
            if ep[k].shape != arrays[k].shape[1:]:
                raise UserError(f"{d}/ep_{s}.npz has {k} of shape {ep[k].shape}, expected {arrays[k].shape[1:]}")
            arrays[k][i] = ep[k]
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


# ----------------------------------------------------------------------------------------------
# Training loop shared by BC and dynamics
# ----------------------------------------------------------------------------------------------
def split_episodes(n_episodes, val_frac=0.1, seed=0):
    """Validation split by episode (never by transition, which would leak neighbouring frames)."""
    if n_episodes == 1:
        return np.array([0]), np.array([0])  # one episode: train and validate on it, said in the log
    idx = np.random.default_rng(seed).permutation(n_episodes)
    n_val = max(1, int(round(n_episodes * val_frac)))
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def standardizer(z, episodes, enabled=True):
    """Per-dimension mean and std of z over the training episodes (identity if disabled)."""
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


def fit(model, batch_loss, n_train, n_val, epochs, lr=1e-3, batch_size=256, weight_decay=1e-4, seed=0, desc="train"):
    """AdamW + cosine decay; keep the weights with the best validation loss.

    batch_loss(idx, split) -> mean loss over samples idx of 'train' or 'val'. Stops with a UserError on a
    non-finite loss, after restoring the last good (best) weights.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    best = {"val": float("inf"), "state": {k: v.clone() for k, v in model.state_dict().items()}, "epoch": -1}
    history = {"train": [], "val": []}
    bar = tqdm(range(epochs), desc=desc, leave=False)
    for epoch in bar:
        t0, model_train_loss = time.time(), []
        model.train()
        for idx in torch.randperm(n_train, generator=g).split(batch_size):
            loss = batch_loss(idx.numpy(), "train")
            if not torch.isfinite(loss):
                model.load_state_dict(best["state"])
                raise UserError(f"{desc}: loss became {loss.item()} at epoch {epoch}; stopped, kept the best "
                                f"weights (epoch {best['epoch']}); try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model_train_loss.append(loss.item())
        model.eval()
        with torch.no_grad():
            val = [batch_loss(idx.numpy(), "val").item() * len(idx) for idx in torch.arange(n_val).split(4096)]
        val = sum(val) / n_val
        history["train"].append(float(np.mean(model_train_loss)))
        history["val"].append(val)
        if val < best["val"]:
            best = {"val": val, "state": {k: v.clone() for k, v in model.state_dict().items()}, "epoch": epoch}
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:  # ~10 lines per model
            tqdm.write(f"{desc} epoch {epoch:3d} | train {history['train'][-1]:.5f} | val {val:.5f} | "
                       f"{(time.time() - t0) * 1000:.0f} ms")
    model.load_state_dict(best["state"])
    return {"history": history, "best_val": best["val"], "best_epoch": best["epoch"]}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Behaviour cloning (Phase 1)
# ----------------------------------------------------------------------------------------------
def bc_net(dim):
    """The seed's BC MLP: 279,490 parameters at D=1024."""
    return nn.Sequential(nn.Linear(dim, 256), nn.LayerNorm(256), nn.ReLU(),
                         nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2), nn.Tanh())


def train_bc(data, epochs=100, lr=1e-3, batch_size=256, standardize=True, seed=0):
    """MSE regression of expert actions a_t from z_t, validated on held-out episodes."""
    seed_everything(seed)
    z, actions = data["z"], data["actions"]
    E, T = actions.shape[:2]
    train_eps, val_eps = split_episodes(E, seed=seed)
    mean, std = standardizer(z, train_eps, standardize)
    split = {"train": train_eps, "val": val_eps}
    cache = {k: (torch.from_numpy((np.asarray(z[v][:, :T], np.float32) - mean) / std).reshape(-1, z.shape[-1]),
                 torch.from_numpy(np.asarray(actions[v], np.float32)).reshape(-1, 2)) for k, v in split.items()}
    model = bc_net(z.shape[-1])
    loss = lambda idx, s: F.mse_loss(model(cache[s][0][idx]), cache[s][1][idx])
    out = fit(model, loss, len(cache["train"][0]), len(cache["val"][0]), epochs, lr, batch_size, seed=seed, desc="bc")
    with torch.no_grad():
        train_mse = float(np.mean([loss(i.numpy(), "train").item() for i in torch.arange(len(cache["train"][0])).split(4096)]))
    return model, {"params": n_params(model), "train_mse": train_mse, "val_mse": out["best_val"],
                   "best_epoch": out["best_epoch"], "history": out["history"],
                   "train_episodes": len(train_eps), "val_episodes": len(val_eps)}, (mean, std)


def bc_policy(model, mean, std):
    def act(physics_list, z, seeds):
        with torch.no_grad():
            return model(torch.from_numpy((z - mean) / std)).numpy()
    return act


# ----------------------------------------------------------------------------------------------
# Dynamics (Phases 3, 4c, 4d): residual models f(z, a) = z + delta(z, a)
# ----------------------------------------------------------------------------------------------
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
    def __init__(self, width):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
                                   nn.Linear(width, width), nn.LayerNorm(width))

    def forward(self, x):
        return x + self.block(x)


class ResBlockDynamics(nn.Module):
    """Seed Phase 4d: Linear(D+2->1024) LN ReLU, 4 ResBlocks, Linear(1024->D); ~10.5M params at D=1024."""

    def __init__(self, dim, width=1024, blocks=4, action_dim=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + action_dim, width), nn.LayerNorm(width), nn.ReLU(),
                                 *[ResBlock(width) for _ in range(blocks)], nn.Linear(width, dim))

    def forward(self, z, a):
        return z + self.net(torch.cat([z, a], -1))


def dynamics_net(name, dim):
    return ResBlockDynamics(dim) if name == "resblock" else MLPDynamics(dim)


def rollout_steps(name, rollout=None):
    """mlp_rollout5 sums the loss over 5 steps unrolled on its own predictions (seed Phase 4c)."""
    return rollout or (5 if name == "mlp_rollout5" else 1)


def train_dynamics(name, data, epochs, lr=1e-3, batch_size=256, standardize=True, seed=0, rollout=None):
    """SmoothL1 on z_{t+1..t+k}, unrolled k steps on the model's own predictions, in standardised space."""
    seed_everything(seed)
    z, actions = data["z"], data["actions"]
    E, T = actions.shape[:2]
    k = min(rollout_steps(name, rollout), T)
    train_eps, val_eps = split_episodes(E, seed=seed)
    mean, std = standardizer(z, train_eps, standardize)
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    starts = {s: np.array([(e, t) for e in eps for t in range(T - k + 1)]) for s, eps in
              (("train", train_eps), ("val", val_eps))}
    model = dynamics_net(name, z.shape[-1])

    def batch_loss(idx, split):
        e, t = starts[split][idx].T
        steps = t[:, None] + np.arange(k + 1)
        zs = (torch.from_numpy(np.asarray(z[e[:, None], steps], np.float32)) - mean_t) / std_t  # (B, k+1, D)
        a = torch.from_numpy(np.asarray(actions[e[:, None], steps[:, :k]], np.float32))
        pred, loss = zs[:, 0], 0.0
        for j in range(k):
            pred = model(pred, a[:, j])
            loss = loss + F.smooth_l1_loss(pred, zs[:, j + 1])
        return loss

    out = fit(model, batch_loss, len(starts["train"]), len(starts["val"]), epochs, lr, batch_size, seed=seed,
              desc=f"dynamics {name}")
    return model, {"params": n_params(model), "val_loss": out["best_val"], "best_epoch": out["best_epoch"],
                   "history": out["history"], "rollout": k}, (mean, std), val_eps


@torch.no_grad()
def kstep_error(model, z, actions, episodes, mean, std, k_max=10):
    """Open-loop k-step error for k = 1..k_max: mean L2 between predicted and true standardised z_{t+k}.

    Also returns the 'copy' baseline ||z_t - z_{t+k}||: a model that learned nothing matches it.
    """
    T = actions.shape[1]
    k_max = min(k_max, T)
    errs, copy = np.zeros(k_max), np.zeros(k_max)
    count = 0
    for e in episodes:
        zs = (torch.from_numpy(np.asarray(z[e], np.float32)) - torch.from_numpy(mean)) / torch.from_numpy(std)
        a = torch.from_numpy(np.asarray(actions[e], np.float32))
        starts = torch.arange(0, T - k_max + 1)
        pred = zs[starts]
        for j in range(k_max):
            pred = model(pred, a[starts + j])
            errs[j] += (pred - zs[starts + j + 1]).norm(dim=-1).sum().item()
            copy[j] += (zs[starts] - zs[starts + j + 1]).norm(dim=-1).sum().item()
        count += len(starts)
    return (errs / count).tolist(), (copy / count).tolist()


# ----------------------------------------------------------------------------------------------
# Planners: CEM and random shooting (CEM with one iteration), batched over episodes
# ----------------------------------------------------------------------------------------------
def cem(cost_fn, batch, horizon, action_dim=2, samples=500, elites=50, iterations=5, mean=None, std=None,
        min_std=0.05, uniform_first=False, generator=None):
    """Cross-entropy method over action sequences, for `batch` independent problems at once.

    cost_fn(actions (batch, samples, horizon, action_dim)) -> costs (batch, samples).
    1. sample `samples` sequences from N(mean, std) (uniform in [-1, 1] on the first iteration if
       uniform_first), clamped to the action bounds;
    2. score them with cost_fn and keep the `elites` lowest-cost sequences (topk);
    3. refit mean and std to the elites, std clamped below at min_std; repeat `iterations` times.
    Returns (best sequence of the last iteration (batch, horizon, A), mean, std) for warm-starting.
    With iterations=1, elites=1 and uniform_first=True this is random shooting.
    """
    shape = (batch, horizon, action_dim)
    mean = torch.zeros(shape) if mean is None else mean
    std = torch.ones(shape) if std is None else std
    for i in range(iterations):
        noise = torch.randn((batch, samples) + shape[1:], generator=generator)
        if uniform_first and i == 0:
            actions = torch.rand((batch, samples) + shape[1:], generator=generator) * 2 - 1
        else:
            actions = (mean[:, None] + std[:, None] * noise).clamp(-1, 1)
        costs = cost_fn(actions)
        elite_idx = costs.topk(elites, dim=1, largest=False).indices  # (batch, elites), best first
        elite = actions.gather(1, elite_idx[..., None, None].expand(-1, -1, horizon, action_dim))
        mean = elite.mean(1)
        std = elite.std(1, unbiased=False).clamp_min(min_std) if elites > 1 else torch.full_like(mean, min_std)
    return elite[:, 0], mean, std


def latent_cost(model, z, z_goal, cost="final", dtype=torch.float32):
    """Cost of action sequences: L2 distance of the imagined latent to z_goal (standardised space).

    'final' scores the last imagined latent (the seed's choice); 'sum' adds every step of the horizon.
    z, z_goal: (batch, D). Returns cost_fn for `cem`.
    """
    def cost_fn(actions):
        B, S, H, A = actions.shape
        zz = z[:, None].expand(B, S, -1).reshape(B * S, -1).to(dtype)
        goal = z_goal[:, None].expand(B, S, -1).reshape(B * S, -1).to(dtype)
        total = 0.0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for h in range(H):
                zz = model(zz, actions[:, :, h].reshape(B * S, A).to(dtype))
                if cost == "sum" or h == H - 1:
                    total = total + (zz.float() - goal.float()).norm(dim=-1)
        return total.view(B, S)
    return cost_fn


def mpc_policy(model, z_goal, mean, std, planner="cem", horizon=10, samples=500, elites=50, iterations=5,
               cost="final", bf16=False, seed=0, timer=None):
    """MPC: plan from the current z, execute the first action, replan at every step.

    CEM warm-starts from the previous step's mean shifted by one step (last step repeated).
    z_goal: {episode seed: (D,) raw embedding}; mean/std: the dynamics model's standardisation.
    """
    g = torch.Generator().manual_seed(seed)
    warm = {}  # episode seed -> last CEM mean (horizon, A)
    dtype = torch.bfloat16 if bf16 else torch.float32
    standardize = lambda x: (torch.from_numpy(np.asarray(x, np.float32)) - torch.from_numpy(mean)) / torch.from_numpy(std)

    def act(physics_list, z, seeds):
        t0 = time.perf_counter()
        zt, goal = standardize(z), standardize(np.stack([z_goal[s] for s in seeds]))
        fn = latent_cost(model, zt, goal, cost, dtype)
        if planner == "random":  # seed Phase 4: 1000 uniform sequences, keep the best
            best, _, _ = cem(fn, len(zt), horizon, samples=samples, elites=1, iterations=1, uniform_first=True,
                             generator=g)
            action = best[:, 0]
        else:
            init = None
            if all(s in warm for s in seeds):
                prev = torch.stack([warm[s] for s in seeds])
                init = torch.cat([prev[:, 1:], prev[:, -1:]], 1)
            _, m, _ = cem(fn, len(zt), horizon, samples=samples, elites=elites, iterations=iterations,
                          mean=init, std=None, generator=g)
            warm.update(zip(seeds, m))
            action = m[:, 0]
        if timer is not None:
            timer.append(time.perf_counter() - t0)
        return action.numpy()
    return act


# ----------------------------------------------------------------------------------------------
# Evaluation helpers: goals for planning
# ----------------------------------------------------------------------------------------------
def expert_goals(seeds, expert, encoder, steps, batch_size=32, lean=True):
    """The seed's expert-generated goal: run the expert from the same start and target, and encode the
    8-frame window at its closest approach to the target. Returns z_goal (B, D), goal step, distance."""
    eps = run_episodes(seeds, expert_policy(expert), encoder, steps, needs_z=False, keep_z=True,
                       batch_size=batch_size, lean=lean, keep_frames=1, desc="goals")  # goal frame for the GIF
    z_goal, info = [], []
    for ep in eps:
        d = finger_distance(ep["states"])
        t = int(d.argmin())
        z_goal.append(ep["z"][t])
        info.append({"step": t, "distance": float(d[t]), "frame": ep["frames"][t] if "frames" in ep else None,
                     "states": ep["states"][t]})
    return np.stack(z_goal).astype(np.float32), info


# ----------------------------------------------------------------------------------------------
# Probe and embedding statistics
# ----------------------------------------------------------------------------------------------
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


def probe_embeddings(z, states, min_speed=1e-3):
    """Ridge probe R^2 of z (E*(T+1), D) for every target; velocity direction only where the finger moves
    more than min_speed metres per step."""
    targets, speed = probe_targets_by_episode(states)
    episode = np.repeat(np.arange(states.shape[0]), states.shape[1])
    out = {}
    for name, Y in targets.items():
        keep = speed > min_speed if name == "velocity_direction" else np.ones(len(Y), bool)
        out[name] = ridge_probe(z[keep], Y[keep], episode[keep]) if keep.sum() > 4 else float("nan")
    return out


def probe_targets_by_episode(states):
    """states (E, T+1, S) -> targets flattened to rows, velocities computed within each episode."""
    parts = [probe_targets(s) for s in states]
    targets = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    return targets, np.concatenate([p[1] for p in parts])


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
    p = eig / eig.sum()
    return {"cos_random_pairs": float((unit[i] * unit[j]).sum(1).mean()),
            "cos_consecutive": float(consecutive.mean()),
            "effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "top10_pc_variance": float(p[:10].sum())}


# ----------------------------------------------------------------------------------------------
# Report: results.json, report.md, plots and GIFs, rebuilt from the run folder alone
# ----------------------------------------------------------------------------------------------
def fmt_rate(m, key="success"):
    lo, hi = m[f"{key}_ci"]
    return f"{m[key] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}]"


def gif(path, frames, captions, goal=None):
    """Frames (T, H, W, 3) -> GIF with step and distance captions; the goal frame beside each one."""
    from PIL import Image, ImageDraw
    images = []
    for f, text in zip(frames, captions):
        img = np.concatenate([f, goal], 1) if goal is not None else f
        im = Image.fromarray(img)
        ImageDraw.Draw(im).text((4, 4), text, fill=(255, 255, 255))
        if goal is not None:
            ImageDraw.Draw(im).text((FRAME_SIZE + 4, 4), "goal", fill=(255, 255, 255))
        images.append(im)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=60, loop=0)


def save_rollout_gif(path, ep, title, goal=None):
    d = finger_distance(ep["states"])
    gif(path, ep["frames"], [f"{title} step {t} dist {d[t]:.3f} m" for t in range(len(ep["frames"]))], goal)


def make_plots(out, results):
    """Write the PNG plots for whatever stages have run; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    enc, made = results["encoder"]["id"], []

    def save(fig, name):
        with atomic_path(os.path.join(out, name)) as tmp:
            fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    if "bc" in results:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in ("train", "val"):
            ax.plot(results["bc"]["history"][k], label=k)
        ax.set(xlabel="epoch", ylabel="MSE", yscale="log", title=f"BC loss ({enc})")
        ax.legend()
        save(fig, "bc_loss.png")
    conditions = {f"expert {k}": v for k, v in results.get("experts", {}).items()}
    conditions.update({k: v for k, v in results.get("eval", {}).items() if k != "expert"})  # shown above
    conditions.update({f"MPC {k}": v for k, v in results.get("plan", {}).items()})
    if conditions:
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(conditions)), 3.2))
        names = list(conditions)
        rates = np.array([conditions[n]["success"] for n in names])
        ci = np.array([conditions[n]["success_ci"] for n in names]).T
        ax.bar(names, rates * 100, yerr=np.abs(ci - rates) * 100, capsize=4)
        ax.set(ylabel="final-step success %", ylim=(0, 105), title=f"Success with 95% Wilson CI ({enc})")
        ax.tick_params(axis="x", rotation=30)
        save(fig, "success.png")
    if "dynamics" in results:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for name, d in results["dynamics"].items():
            axes[0].plot(d["history"]["val"], label=name)
            axes[1].plot(range(1, len(d["kstep_error"]) + 1), d["kstep_error"], marker="o", label=name)
        first = next(iter(results["dynamics"].values()))
        axes[1].plot(range(1, len(first["kstep_copy"]) + 1), first["kstep_copy"], "k--", label="copy z_t")
        axes[0].set(xlabel="epoch", ylabel="val loss", yscale="log", title=f"Dynamics validation loss ({enc})")
        axes[1].set(xlabel="k (open-loop steps)", ylabel="L2 error (standardised z)",
                    title=f"k-step prediction error ({enc})")
        axes[0].legend(), axes[1].legend()
        save(fig, "dynamics.png")
    if "plan_traces" in results:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for name, tr in results["plan_traces"].items():
            for ax, key in zip(axes, ("latent", "finger")):
                x = np.array(tr[key])
                ax.plot(x.mean(0), label=name)
                ax.fill_between(range(x.shape[1]), x.mean(0) - x.std(0), x.mean(0) + x.std(0), alpha=0.15)
        axes[0].set(xlabel="step", ylabel="||z - z_goal||", title=f"Latent distance under MPC ({enc})")
        axes[1].set(xlabel="step", ylabel="finger-target distance (m)", title=f"Finger distance under MPC ({enc})")
        axes[0].legend(), axes[1].legend()
        save(fig, "plan_distance.png")
    if "probe" in results:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        cols = [c for c in results["probe"] if results["probe"][c]]
        names = list(results["probe"][cols[0]])
        w = 0.8 / len(cols)
        for i, c in enumerate(cols):
            ax.bar(np.arange(len(names)) + i * w, [results["probe"][c][n] for n in names], w, label=c)
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
        ax.set(ylabel="held-out R^2", ylim=(-0.2, 1.05), title=f"Linear probe R^2 ({enc})")
        ax.legend()
        save(fig, "probe.png")
    return made


def collect_results(out):
    """Assemble results.json from the stage outputs in the run folder."""
    config = load_json(os.path.join(out, "config.json"), made_by="any stage")
    results = {"config": config, "encoder": config.get("encoder_info", {"id": config["encoder"]}),
               "timing": load_json(os.path.join(out, "timing.json")) if os.path.exists(os.path.join(out, "timing.json")) else {}}
    for name, key in (("bc.json", "bc"), ("eval.json", None), ("dynamics.json", None),
                      ("plan.json", None), ("probe.json", None)):
        path = os.path.join(out, name)
        if os.path.exists(path):
            part = load_json(path)
            results.update({key: part} if key else part)
    return results


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def write_report(out):
    """Rebuild results.json, the plots and report.md from the run folder; nothing is re-run."""
    results = collect_results(out)
    plots = make_plots(out, results)
    enc, cfg = results["encoder"]["id"], results["config"]
    note = " (`tiny` is a random-weight VJEPA2 model: it tests the plumbing and is NOT V-JEPA 2)" if enc == "tiny" else (
        " (`state` is the privileged-state oracle, not pixels)" if enc == "state" else "")
    parts = [f"# vjepa-reacher report: encoder `{enc}`{note}", "", "Made by these commands, in order:", ""]
    parts += [f"    {c}" for c in cfg.get("commands", [])]
    parts += ["", f"Rebuild with `python vjepa_reacher.py report --out {out}`.", ""]
    if "experts" in results or "eval" in results:
        rows = [[f"expert `{k}`", fmt_rate(v), fmt_rate(v, "seed_success"), f"{v['return']:.1f}",
                 f"{v['final_distance']:.3f}", v["n"], ""] for k, v in results.get("experts", {}).items()]
        for k, v in results.get("eval", {}).items():
            seed = SEED_PHASE1.get(k)
            rows.append([k, fmt_rate(v), fmt_rate(v, "seed_success"), f"{v['return']:.1f}", f"{v['final_distance']:.3f}",
                         v["n"], f"{seed[0] * 100:.0f}% / {seed[1]}" if seed else ""])
        parts += [f"## Phase 1: behaviour cloning, live evaluation (encoder `{enc}`, expert `{cfg['expert']}`)", "",
                  md_table(["condition", "success [95% CI]", "seed_success", "mean return", "final dist (m)", "n",
                            "seed's figure (success / return)"], rows), "",
                  "success: reward 1 at the last step. seed_success: return > 150 per 200 steps (the seed's own "
                  "definition). The seed's expert was the `p` controller; the seed's random was '~2% / ~0'.", ""]
    if "bc" in results:
        b = results["bc"]
        parts += [f"BC MLP: {b['params']:,} parameters, train MSE {b['train_mse']:.5f}, val MSE {b['val_mse']:.5f} "
                  f"(seed: 279,490, 0.0001 / 0.0002).", "", f"![BC loss, encoder {enc}](bc_loss.png)", ""]
    if "success.png" in plots:
        parts += [f"![success rates, encoder {enc}](success.png)", ""]
    if "dynamics" in results:
        rows = [[k, f"{d['params']:,}", f"{d['val_loss']:.5f}", " ".join(f"{x:.3f}" for x in d["kstep_error"][:10:3]),
                 " ".join(f"{x:.3f}" for x in d["kstep_copy"][:10:3])] for k, d in results["dynamics"].items()]
        parts += [f"## Phase 3/4c/4d: dynamics models (encoder `{enc}`)", "",
                  md_table(["model", "params", "best val SmoothL1", "k-step error k=1,4,7,10", "copy-z_t baseline"], rows),
                  "", "Errors are L2 in standardised latent space on validation episodes. A model below the copy "
                  "baseline predicts motion; one at it has learned nothing. Seed: mlp ~1.2M params, val ~0.01; "
                  "resblock 10.5M, val 0.0137.", "", f"![dynamics, encoder {enc}](dynamics.png)", ""]
    if "plan" in results:
        rows = []
        for k, p in results["plan"].items():
            s = SEED_PHASE4.get(k, ("",) * 5)
            rows.append([k, fmt_rate(p), f"{p['return']:.1f}", f"{p['final_distance']:.3f}",
                         f"{p['latent_initial']:.2f}", f"{p['latent_final']:.2f}", f"{p['latent_min']:.2f}",
                         f"{p['latent_improvement'] * 100:.1f}% ± {p['latent_improvement_ci'] * 100:.1f}",
                         f"{p['ms_per_action']:.0f}", p["n"],
                         f"{s[2]} / {s[3] * 100:.1f}% / {s[4]}" if s[2] != "" else f"reward {s[4]}"])
        parts += [f"## Phase 4: latent MPC toward the expert goal (encoder `{enc}`)", "",
                  md_table(["planner/model", "success", "return", "final dist (m)", "latent init", "latent final",
                            "latent min", "improvement", "ms/action", "n", "seed (min dist / improvement / reward), 1 episode"],
                           rows), "",
                  "Latent distances are L2 in the dynamics model's standardised space (the seed's were raw "
                  "ViT-L L2, so only the improvement % compares). improvement = (initial - final) / initial.", "",
                  f"![latent and finger distance under MPC, encoder {enc}](plan_distance.png)", ""]
    if "probe" in results:
        cols = [c for c in results["probe"] if results["probe"][c]]
        names = list(results["probe"][cols[0]])
        rows = [[n] + [f"{results['probe'][c][n]:.2f}" for c in cols] for n in names]
        parts += [f"## What the embedding knows: ridge probe R^2, 4-fold by episode (encoder `{enc}`)", "",
                  md_table(["target"] + cols, rows), "",
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
    with atomic_path(os.path.join(out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(parts))
    return results


# ----------------------------------------------------------------------------------------------
# Time estimates and the bench stage
# ----------------------------------------------------------------------------------------------
def print_estimate(encoder, n_windows, batch_size):
    """Estimate the encode time from results/bench.json when it measured this encoder, else time a batch."""
    key = f"{encoder.id}@{encoder.device}/{encoder.precision}"
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench.json")
    rate = None
    if os.path.exists(bench):
        with contextlib.suppress(Exception):
            rate = json.load(open(bench)).get("encode_windows_per_s", {}).get(key)
    source = "results/bench.json"
    if rate is None:
        window = np.zeros((min(2, batch_size), WINDOW, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        encode(encoder, window[:1])  # warm-up: the first call pays for allocation and kernel selection
        t0 = time.perf_counter()
        encode(encoder, window)
        rate, source = len(window) / (time.perf_counter() - t0), "one timed batch"
    print(f"estimate: {n_windows} windows with {key} at {rate:.2f} windows/s ({source}) "
          f"= {n_windows / rate / 60:.1f} min of encoding")


# ----------------------------------------------------------------------------------------------
# Speed: `bench` measures each pair of ways in one run, on this device
# ----------------------------------------------------------------------------------------------
def timed(fn, repeat=1):
    """Best-of-`repeat` wall time of fn() in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device, dtype, n=2048, repeat=5):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    (a @ b), sync()
    return 2 * n ** 3 / timed(lambda: ((a @ b), sync()), repeat) / 1e9


def seed_loop_collect(model, seeds, steps, device):
    """A faithful re-implementation of the seed's collection loop, for comparison only: one env at a time,
    full-look rendering, preprocessing frame by frame, the full model forward (predictor included),
    one window per call."""
    env = make_env(seeds[0])
    full_render = lambda p: p.render(FRAME_SIZE, FRAME_SIZE, camera_id=0)
    for s in seeds:
        reset_env(env, s)
        frames = new_window(full_render(env.physics))
        for t in range(steps + 1):
            clip = torch.stack([preprocess(f[None, None], device)[0, 0] for f in frames])[None]
            with torch.no_grad():
                model(pixel_values_videos=clip).last_hidden_state.mean(1)
            if t < steps:
                env.step(p_expert(env.physics))
                frames.append(full_render(env.physics))


def bench_memory(episodes, steps, dim):
    """Peak RSS of training the mlp dynamics for one epoch on a memory-mapped synthetic dataset."""
    import resource
    with tempfile.TemporaryDirectory() as d:
        z = np.lib.format.open_memmap(os.path.join(d, "z.npy"), "w+", np.float32, (episodes, steps + 1, dim))
        for e in range(episodes):
            z[e] = np.random.default_rng(e).standard_normal((steps + 1, dim), dtype=np.float32)
        z.flush()
        del z
        data = {"z": np.load(os.path.join(d, "z.npy"), mmap_mode="r"),
                "actions": np.zeros((episodes, steps, 2), np.float32)}
        t0 = time.perf_counter()
        train_dynamics("mlp", data, epochs=1, batch_size=1024)
        seconds = time.perf_counter() - t0
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    # ru_maxrss counts the memmap's file-backed pages once touched; RssAnon is the process's own heap.
    return {"transitions": episodes * steps, "dim": dim, "dataset_gb": episodes * (steps + 1) * dim * 4 / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "rss_anon_gb_after": int(status.get("RssAnon", "0 kB").split()[0]) / 1e6, "epoch_seconds": seconds}


def bench(args):
    """Measure lean vs full rendering, our collection vs the seed's loop, batched vs sequential
    evaluation, encoder GFLOP/s vs the matmul peak, CEM cost, and peak memory; write bench.json."""
    from transformers import VJEPA2Config, VJEPA2Model
    quick, device = args.quick, args.device
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"
    out = {"device": name, "torch": torch.__version__, "quick": quick, "command": args.command}
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    out["matmul_peak_gflops"] = dict(peak, value=max(peak.values()))
    print(f"bench: matmul peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16 on {name}")

    # 1. Rendering: lean vs full look, and how far the pixels and tiny embeddings move.
    env = make_env(0)
    reset_env(env, 0)
    n = 20 if quick else 100
    rates = {k: n / timed(lambda: [render(env.physics, lean=k == "lean") for _ in range(n)]) for k in ("lean", "full")}
    tiny = load_encoder("tiny", device, args.precision)
    eps = {k: run_episodes([0], expert_policy("jacobian"), tiny, 30, needs_z=False, keep_z=True, lean=k == "lean",
                           keep_frames=1)[0] for k in ("lean", "full")}
    pixel = float(np.abs(eps["lean"]["frames"].astype(int) - eps["full"]["frames"]).mean())
    shift = np.linalg.norm(eps["lean"]["z"] - eps["full"]["z"], axis=1) / np.linalg.norm(eps["full"]["z"], axis=1)
    step = np.linalg.norm(np.diff(eps["full"]["z"], axis=0), axis=1) / np.linalg.norm(eps["full"]["z"][1:], axis=1)
    out["render_speedup"] = {"value": rates["lean"] / rates["full"], "lean_fps": rates["lean"], "full_fps": rates["full"],
                             "pixel_mean_abs_diff": pixel, "tiny_embedding_rel_shift": float(shift.mean()),
                             "tiny_embedding_rel_step": float(step.mean())}
    print(f"bench: render {rates['lean']:.0f} vs {rates['full']:.0f} frames/s (lean vs full), pixel diff {pixel:.1f}/255, "
          f"tiny embedding shift {shift.mean():.4f} (one step moves it {step.mean():.4f})")

    # 2. Collection with tiny: ours (batched, lean, overlapped) vs the seed's loop.
    E, T = (4, 20) if quick else (16, 50)
    seeds = list(range(E))
    with tempfile.TemporaryDirectory() as d:
        ours = timed(lambda: collect_shard(os.path.join(d, "s"), tiny, "p", 0.0, T, seeds, args.batch_size))
    torch.manual_seed(0)
    full_tiny = VJEPA2Model(tiny_config()).to(device).eval()
    n_seed = max(1, E // 4)
    seed = timed(lambda: seed_loop_collect(full_tiny, seeds[:n_seed], T, device))
    r_ours, r_seed = E * T / ours, n_seed * T / seed
    out["collect_speedup_vs_seed_loop"] = {"value": r_ours / r_seed, "ours_transitions_per_s": r_ours,
                                           "seed_loop_transitions_per_s": r_seed, "encoder": "tiny"}
    print(f"bench: collect {r_ours:.0f} vs {r_seed:.0f} transitions/s (ours vs seed loop) = {r_ours / r_seed:.1f}x")

    # 3. Live evaluation with tiny: every episode stepped and encoded together vs one at a time.
    policy = bc_policy(bc_net(tiny.dim).eval(), np.zeros(tiny.dim, np.float32), np.ones(tiny.dim, np.float32))
    seeds = list(range(8 if quick else 32))
    batched = timed(lambda: run_episodes(seeds, policy, tiny, T, batch_size=len(seeds)))
    sequential = timed(lambda: [run_episodes([s], policy, tiny, T) for s in seeds])
    out["eval_speedup_batched"] = {"value": sequential / batched, "batched_steps_per_s": len(seeds) * T / batched,
                                   "sequential_steps_per_s": len(seeds) * T / sequential, "episodes": len(seeds)}
    print(f"bench: eval {len(seeds) * T / batched:.0f} vs {len(seeds) * T / sequential:.0f} steps/s (batched vs "
          f"sequential) = {sequential / batched:.1f}x")

    # 4. Encoder throughput: tiny always, ViT-L (random init: the same compute) unless --quick.
    out["encode_windows_per_s"], out["encoder_gflops"] = {}, {}
    models = [("tiny", tiny.config)] + ([] if quick else [("vitl", VJEPA2Config())])
    for label, config in models:
        torch.manual_seed(0)
        model = VJEPA2Model(config).to(device).eval().requires_grad_(False) if label != "tiny" else tiny.model
        batch = 32 if device.startswith("cuda") or label == "tiny" else 1
        windows = np.random.default_rng(0).integers(0, 255, (batch, WINDOW, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
        flops = encoder_flops(config)
        for precision in ("fp32", "fp16" if device.startswith("cuda") else "bf16"):
            enc = Encoder(label, config.hidden_size, model, device, precision, config)
            encode(enc, windows)  # warm-up
            rate = batch / timed(lambda: encode(enc, windows), 1 if label == "vitl" else 3)
            gflops = rate * flops / 1e9
            key = DEFAULT_ENCODER if label == "vitl" else "tiny"
            out["encode_windows_per_s"][f"{key}@{device}/{precision}"] = rate
            out["encoder_gflops"][f"{label}/{precision}"] = {"gflops": gflops, "windows_per_s": rate,
                                                             "gflop_per_window": flops / 1e9, "batch": batch,
                                                             "fraction_of_matmul_peak": gflops / peak[precision if precision != "fp16" else "bf16"]}
            print(f"bench: encoder {label} {precision}: {rate:.2f} windows/s, {gflops:.0f} GFLOP/s "
                  f"({flops / 1e9:.1f} GFLOP/window)")
    main_key = "vitl" if not quick else "tiny"
    best = max((v for k, v in out["encoder_gflops"].items() if k.startswith(main_key)), key=lambda v: v["gflops"])
    out["encoder_gflops"]["value"] = best["gflops"]

    # 5. CEM on the seed-size mlp (D=1024): seed sizes 500 x 10 x 5, one episode, fp32 and bf16.
    model = MLPDynamics(1024).eval().requires_grad_(False)
    z, goal = torch.randn(1, 1024), torch.randn(1, 1024)
    cem_out = {"params": n_params(model)}
    first = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        fn = latent_cost(model, z, goal, "final", dtype)
        run = lambda: cem(fn, 1, 10, samples=500, elites=50, iterations=5, generator=torch.Generator().manual_seed(0))
        run()
        seconds = timed(run, 2 if quick else 3)
        first[label] = run()[1][0, 0]
        flops = 2 * n_params(model) * 500 * 10 * 5
        cem_out[f"{label}_ms_per_action"] = seconds * 1000
        cem_out[f"{label}_gflops"] = flops / seconds / 1e9
        cem_out[f"{label}_floor_ms"] = flops / peak[label] / 1e6
    cem_out["value"] = cem_out["fp32_ms_per_action"]
    cem_out["bf16_first_action_abs_diff"] = float((first["fp32"] - first["bf16"]).abs().max())
    out["cem_ms_per_action"] = cem_out
    print(f"bench: CEM {cem_out['fp32_ms_per_action']:.0f} ms/action fp32 ({cem_out['fp32_gflops']:.0f} GFLOP/s, floor "
          f"{cem_out['fp32_floor_ms']:.0f} ms), {cem_out['bf16_ms_per_action']:.0f} ms bf16")

    # 6. Memory: one epoch of mlp dynamics on a memory-mapped synthetic dataset, in a fresh process.
    size = (200, 200, 1024) if quick else (5000, 200, 1024)  # full: 1M x 1024 float32 = 4.1 GB
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        out["memory"] = pool.submit(bench_memory, *size).result()
    print(f"bench: memory {out['memory']['transitions']:,} x {size[2]} ({out['memory']['dataset_gb']:.1f} GB memmap): "
          f"peak RSS {out['memory']['peak_rss_gb']:.2f} GB, epoch {out['memory']['epoch_seconds']:.0f} s")

    os.makedirs(args.bench_out, exist_ok=True)
    save_json(os.path.join(args.bench_out, "bench.json"), out)
    write_bench_table(args.bench_out, out)
    return 0


def write_bench_table(folder, b):
    rows = [["rendering, lean vs full (frames/s)", f"{b['render_speedup']['lean_fps']:.0f} vs {b['render_speedup']['full_fps']:.0f}",
             f"{b['render_speedup']['value']:.1f}x"],
            ["collection with tiny vs the seed's loop (transitions/s)",
             f"{b['collect_speedup_vs_seed_loop']['ours_transitions_per_s']:.0f} vs "
             f"{b['collect_speedup_vs_seed_loop']['seed_loop_transitions_per_s']:.0f}", f"{b['collect_speedup_vs_seed_loop']['value']:.1f}x"],
            ["live eval with tiny, batched vs sequential (steps/s)",
             f"{b['eval_speedup_batched']['batched_steps_per_s']:.0f} vs {b['eval_speedup_batched']['sequential_steps_per_s']:.0f}",
             f"{b['eval_speedup_batched']['value']:.1f}x"]]
    rows += [[f"encoder {k}", f"{v['windows_per_s']:.2f} windows/s, {v['gflops']:.0f} GFLOP/s",
              f"{v['fraction_of_matmul_peak'] * 100:.0f}% of matmul peak"] for k, v in b["encoder_gflops"].items() if k != "value"]
    c = b["cem_ms_per_action"]
    rows += [["CEM 500x10x5 on the 1.58M mlp, fp32 / bf16 (ms per action)",
              f"{c['fp32_ms_per_action']:.0f} / {c['bf16_ms_per_action']:.0f}", f"floor {c['fp32_floor_ms']:.0f} / {c['bf16_floor_ms']:.0f} ms"],
             ["matmul peak fp32 / bf16 (GFLOP/s)", f"{b['matmul_peak_gflops']['fp32']:.0f} / {b['matmul_peak_gflops']['bf16']:.0f}", ""],
             [f"one epoch of mlp dynamics on {b['memory']['transitions']:,} x {b['memory']['dim']} memmap "
              f"({b['memory']['dataset_gb']:.1f} GB)", f"peak RSS {b['memory']['peak_rss_gb']:.2f} GB (heap "
              f"{b['memory']['rss_anon_gb_after']:.2f} GB)", f"{b['memory']['epoch_seconds']:.0f} s"]]
    table = md_table(["measure", "rates", "ratio"], rows)
    text = f"Device: {b['device']}. Made by `{b['command']}`.\n\n{table}\n"
    with atomic_path(os.path.join(folder, "bench.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(table)


# ----------------------------------------------------------------------------------------------
# Stages: each reads and writes only files in the run folder, so any stage can be re-run alone
# ----------------------------------------------------------------------------------------------
def stage_collect(args, encoder, expert=None, epsilon=None):
    expert = expert or args.expert
    epsilon = args.epsilon if epsilon is None else epsilon
    name = dataset_name(expert, epsilon)
    data_dir = os.path.join(args.out, "data", name)
    seeds = episode_seeds("collect", args.episodes, args.seed)
    if epsilon > 0:  # exploration data gets its own seeds, disjoint from the demos'
        seeds = [s + 1_000_000 for s in seeds]
    i, n = args.shard
    shard_dir = os.path.join(args.out, "shards", name, f"shard_{i}of{n}")
    if os.path.exists(os.path.join(data_dir, "meta.json")) and not args.force:
        meta = load_json(os.path.join(data_dir, "meta.json"))
        check_meta(meta, encoder, data_dir, steps=args.steps, lean=not args.full_render)
        if meta["seeds"] == sorted(seeds):
            print(f"collect: {data_dir} exists ({len(seeds)} episodes); --force to redo")
            return False
    if args.force:
        for f in glob.glob(os.path.join(shard_dir, "*")):
            os.remove(f)
    collect_shard(shard_dir, encoder, expert, epsilon, args.steps, seeds[i::n], args.batch_size,
                  lean=not args.full_render, dtype=args.store_dtype, rng_seed=args.seed)
    if n == 1:
        merge([shard_dir], data_dir)
        print(f"collect: {len(seeds)} episodes x {args.steps} steps ({expert}, epsilon {epsilon:g}) -> {data_dir}")
    else:
        print(f"collect: shard {i}/{n} done -> {shard_dir}; run `merge` once all {n} shards are done")


def stage_merge(args, encoder):
    for expert, eps in {(args.expert, args.epsilon), (args.explore_expert, args.explore_epsilon)}:
        name = dataset_name(expert, eps)
        shards = sorted(glob.glob(os.path.join(args.out, "shards", name, "shard_*of*")))
        if shards:
            meta = merge(shards, os.path.join(args.out, "data", name))
            print(f"merge: {len(shards)} shards, {meta['episodes']} episodes -> {args.out}/data/{name}")
        elif expert == args.expert and eps == args.epsilon:
            raise UserError(f"no shards in {args.out}/shards/{name}: run `collect --shard i/N` first")


def stage_explore(args, encoder):
    return stage_collect(args, encoder, args.explore_expert, args.explore_epsilon)


def stage_bc(args, encoder):
    path = os.path.join(args.out, "bc.pt")
    if os.path.exists(path) and not args.force:
        print(f"bc: {path} exists; --force to retrain")
        return False
    data = load_dataset(os.path.join(args.out, "data", dataset_name(args.expert, args.epsilon)), encoder)
    model, info, (mean, std) = train_bc(data, args.epochs, args.lr, args.train_batch_size, not args.no_standardize,
                                        args.seed)
    print(f"bc: {info['params']:,} params | train MSE {info['train_mse']:.5f} | val MSE {info['val_mse']:.5f}")
    save_model(path, model, {"encoder": data["meta"]["encoder"], "render": data["meta"].get("render"),
                             "mean": mean.tolist(), "std": std.tolist()})
    save_json(os.path.join(args.out, "bc.json"), info)


def stage_eval(args, encoder):
    path = os.path.join(args.out, "eval.json")
    if os.path.exists(path) and not args.force:
        print(f"eval: {path} exists; --force to redo")
        return False
    ckpt = load_model(os.path.join(args.out, "bc.pt"), "bc")
    check_meta(ckpt["meta"], encoder, os.path.join(args.out, "bc.pt"), lean=not args.full_render)
    model = bc_net(encoder.dim)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    mean, std = (np.array(ckpt["meta"][k], np.float32) for k in ("mean", "std"))
    seeds = episode_seeds("eval", args.eval_episodes, args.seed)
    lean = not args.full_render
    results, physics_only = {"experts": {}, "eval": {}}, load_encoder("state")
    for name in ("p", "jacobian"):  # experts act on physics, so they need no rendering or encoding
        eps = run_episodes(seeds, expert_policy(name), physics_only, args.steps, needs_z=False, desc=f"expert {name}")
        results["experts"][name] = episode_metrics(eps, args.steps)
    results["eval"]["expert"] = results["experts"][args.expert]
    if encoder.pixels:
        print_estimate(encoder, len(seeds) * (args.steps + 1), args.batch_size)
    eps = run_episodes(seeds, bc_policy(model, mean, std), encoder, args.steps, needs_z=True, lean=lean,
                       batch_size=args.batch_size, keep_frames=1, desc="eval bc")
    results["eval"]["bc"] = episode_metrics(eps, args.steps)
    save_rollout_gif(os.path.join(args.out, "rollout_bc.gif"), eps[0], "BC")
    rng = np.random.default_rng(args.seed)
    eps = run_episodes(seeds, random_policy(rng), physics_only, args.steps, needs_z=False, desc="random")
    results["eval"]["random"] = episode_metrics(eps, args.steps)
    expert_ep = run_episodes(seeds[:1], expert_policy(args.expert), encoder, args.steps, needs_z=False,
                             keep_frames=1, lean=lean)[0]
    save_rollout_gif(os.path.join(args.out, "rollout_expert.gif"), expert_ep, f"expert {args.expert}")
    print(md_table(["condition", "success", "seed_success", "return"],
                   [[k, fmt_rate(v), fmt_rate(v, "seed_success"), f"{v['return']:.1f}"]
                    for k, v in list(results["experts"].items()) + list(results["eval"].items())]))
    save_json(path, results)


def stage_dynamics(args, encoder):
    path = os.path.join(args.out, "dynamics.json")
    if os.path.exists(path) and not args.force:
        print(f"dynamics: {path} exists; --force to retrain")
        return False
    data = load_dataset(os.path.join(args.out, "data", dataset_name(args.explore_expert, args.explore_epsilon)),
                        encoder, made_by="explore")
    out = {}
    for name in args.dynamics:
        epochs = args.dyn_epochs or (150 if name == "resblock" else 100)  # seed: 100 epochs, 150 for resblock
        model, info, (mean, std), val_eps = train_dynamics(name, data, epochs, args.lr, args.train_batch_size,
                                                           not args.no_standardize, args.seed, args.rollout)
        info["kstep_error"], info["kstep_copy"] = kstep_error(model, data["z"], data["actions"], val_eps, mean, std)
        print(f"dynamics {name}: {info['params']:,} params | val {info['val_loss']:.5f} | "
              f"k-step error k=1 {info['kstep_error'][0]:.3f}, k={len(info['kstep_error'])} {info['kstep_error'][-1]:.3f} "
              f"(copy {info['kstep_copy'][-1]:.3f})")
        save_model(os.path.join(args.out, f"dynamics_{name}.pt"), model,
                   {"encoder": data["meta"]["encoder"], "render": data["meta"].get("render"), "name": name,
                    "mean": mean.tolist(), "std": std.tolist()})
        out[name] = info
    save_json(path, {"dynamics": out})


def load_dynamics(args, encoder, name):
    path = os.path.join(args.out, f"dynamics_{name}.pt")
    ckpt = load_model(path, "dynamics")
    check_meta(ckpt["meta"], encoder, path, lean=not args.full_render)
    model = dynamics_net(name, encoder.dim)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit encoder dim {encoder.dim}: {str(e).splitlines()[0]}")
    mean, std = (np.array(ckpt["meta"][k], np.float32) for k in ("mean", "std"))
    return model.eval().requires_grad_(False), mean, std


def stage_plan(args, encoder):
    """Each planner/model pair is saved as soon as it finishes; a re-run does only the missing pairs."""
    path = os.path.join(args.out, "plan.json")
    done = load_json(path) if os.path.exists(path) and not args.force else {"plan": {}, "plan_traces": {}}
    todo = [c for c in args.plans if c not in done["plan"] and c.split("/")[1] in args.dynamics]
    if not todo:
        print(f"plan: {path} has {', '.join(args.plans)}; --force to redo")
        return False
    models = {name: load_dynamics(args, encoder, name) for name in {c.split("/")[1] for c in todo}}
    seeds = episode_seeds("plan", args.plan_episodes, args.seed)
    lean, steps = not args.full_render, args.plan_steps
    z_goal, goals = expert_goals(seeds, args.expert, encoder, steps, args.batch_size, lean)
    results, traces, gif_made = done["plan"], done["plan_traces"], False
    for combo in todo:
        planner, name = combo.split("/")
        model, mean, std = models[name]
        timer = []
        policy = mpc_policy(model, dict(zip(seeds, z_goal)), mean, std, planner, args.horizon,
                            args.rs_samples if planner == "random" else args.samples, args.elites, args.iterations,
                            args.cost, args.plan_bf16, args.seed, timer)
        eps = run_episodes(seeds, policy, encoder, steps, needs_z=True, keep_z=True, lean=lean,
                           batch_size=args.batch_size, keep_frames=int(planner == "cem" and not gif_made),
                           desc=f"plan {combo}")
        latent = np.stack([np.linalg.norm((ep["z"] - zg) / std, axis=1) for ep, zg in zip(eps, z_goal)])
        finger = np.stack([finger_distance(ep["states"]) for ep in eps])
        improvement = (latent[:, 0] - latent[:, -1]) / np.maximum(latent[:, 0], 1e-9)
        m = episode_metrics(eps, steps)
        for key, x in (("latent_initial", latent[:, 0]), ("latent_final", latent[:, -1]), ("latent_min", latent.min(1)),
                       ("latent_improvement", improvement), ("final_distance", finger[:, -1])):
            m[key], m[f"{key}_ci"] = mean_ci(x)  # mean and 95% half-width over episodes
        m["ms_per_action"] = 1000 * sum(timer) / (steps * len(seeds))
        m["ms_per_step_all_episodes"] = 1000 * sum(timer) / steps
        m["goal_distance"] = float(np.mean([g["distance"] for g in goals]))  # the expert's closest approach
        m["episodes"] = [{"seed": ep["seed"], "success": bool(ep["rewards"][-1] >= 1),
                          "return": float(ep["rewards"].sum()), "final_distance": ep["final_distance"],
                          "latent_initial": float(l[0]), "latent_final": float(l[-1]), "latent_min": float(l.min())}
                         for ep, l in zip(eps, latent)]
        results[combo] = m
        traces[combo] = {"latent": latent.tolist(), "finger": finger.tolist()}
        print(f"plan {combo}: success {fmt_rate(m)} | return {m['return']:.1f} | latent {m['latent_initial']:.2f} -> "
              f"{m['latent_final']:.2f} (min {m['latent_min']:.2f}) | {m['ms_per_action']:.0f} ms/action")
        if planner == "cem" and "frames" in eps[0]:  # the first CEM model of this run, beside its goal frame
            save_rollout_gif(os.path.join(args.out, "rollout_cem.gif"), eps[0], f"CEM {name}", goals[0]["frame"])
            gif_made = True
        save_json(path, {"plan": results, "plan_traces": traces})


def stage_probe(args, encoder):
    path = os.path.join(args.out, "probe.json")
    if os.path.exists(path) and not args.force:
        print(f"probe: {path} exists; --force to redo")
        return False
    seeds = episode_seeds("probe", args.probe_episodes, args.seed)
    random_init = random_init_like(encoder, args.seed + 1)  # None for `state`: it has no architecture
    # One rollout renders the frames; every encoder sees the same windows (frames are kept only here).
    eps = run_episodes(seeds, expert_policy(args.explore_expert), encoder, args.steps, needs_z=False, keep_z=True,
                       epsilon=args.explore_epsilon, noise_seed=args.seed,
                       keep_frames=len(seeds) if encoder.pixels else 0, lean=not args.full_render,
                       batch_size=args.batch_size, desc="probe")
    states = np.stack([ep["states"] for ep in eps])
    z = {"encoder": np.stack([ep["z"] for ep in eps])}
    if encoder.pixels:  # the oracle column; for `state` it would repeat the encoder column
        z["state"] = states
    if random_init is not None:
        z["random_init"] = np.stack([encode_batched(random_init, windows_from_frames(ep["frames"]),
                                                    args.batch_size) for ep in eps])
    E, T1 = states.shape[:2]
    probe = {k: probe_embeddings(v.reshape(E * T1, -1).astype(np.float64), states)
             for k, v in z.items()}
    stats = {f"{k}{' standardised' if s else ''}": embedding_stats(z[k], s) for k in ("encoder", "random_init")
             if k in z for s in (False, True)}
    print(md_table(["target"] + list(probe), [[t] + [f"{probe[c][t]:.2f}" for c in probe] for t in probe["encoder"]]))
    save_json(path, {"probe": probe, "embedding_stats": stats})


def stage_report(args, encoder):
    results = write_report(args.out)
    print(f"report: {args.out}/report.md, {args.out}/results.json ({len(results)} sections)")


STAGES = {"collect": stage_collect, "merge": stage_merge, "bc": stage_bc, "eval": stage_eval,
          "explore": stage_explore, "dynamics": stage_dynamics, "plan": stage_plan, "probe": stage_probe,
          "report": stage_report}
ALL = ["collect", "bc", "eval", "explore", "dynamics", "plan", "probe", "report"]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def unit_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return v


def shard_spec(s):
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def encoder_name(s):
    if not valid_encoder_name(s):
        raise argparse.ArgumentTypeError(f"unknown encoder {s!r}: use state, tiny, a V-JEPA 2 hub id "
                                         f"(e.g. {DEFAULT_ENCODER}) or a local checkpoint folder")
    return s


# --quick: about 3 minutes for `all --encoder tiny` on 2 CPU cores. Planner sizes shrink the most because
# CEM on the 8.4M-param resblock costs ~17 GFLOP per 1,000 imagined steps.
QUICK = dict(episodes=50, eval_episodes=20, steps=100, epochs=50, dyn_epochs=10, plan_episodes=4, plan_steps=30,
             samples=64, elites=8, rs_samples=128, probe_episodes=8)


def build_parser():
    p = argparse.ArgumentParser(prog="vjepa_reacher.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=list(STAGES) + ["all", "bench"], help="what to run; `all` runs " + " -> ".join(ALL))
    a = p.add_argument
    a("--out", default="runs/default", help="run folder; stages talk only through files in it")
    a("--encoder", type=encoder_name, default=DEFAULT_ENCODER, help="V-JEPA 2 hub id or local folder, `tiny` or `state`")
    a("--expert", choices=list(EXPERTS), default="jacobian", help="demo expert; `p` is the seed's P-controller")
    a("--episodes", type=positive_int, default=500, help="episodes to collect (seed: 500)")
    a("--eval-episodes", type=positive_int, default=100, help="live evaluation episodes (seed: 100)")
    a("--steps", type=positive_int, default=200, help=f"control steps per episode (seed: 200, at most {MAX_STEPS})")
    a("--epsilon", type=unit_float, default=0.0, help="probability of a uniform random action during `collect`")
    a("--explore-expert", choices=list(EXPERTS), default="p", help="expert for exploration data (seed: p)")
    a("--explore-epsilon", type=unit_float, default=0.3, help="epsilon for exploration data (seed: 0.3)")
    a("--shard", type=shard_spec, default=(0, 1), help="collect only shard i of N (seeds i, i+N, ...); then `merge`")
    a("--batch-size", type=positive_int, default=32, help="encoder batch, and episodes stepped together (seed: 32)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="encoder precision; auto = "
      "fp16 on CUDA, bf16 autocast on CPUs with native bf16")
    a("--store-dtype", choices=["float32", "float16"], default="float32", help="embedding storage; float16 halves the disk")
    a("--full-render", action="store_true", help="render with shadows, reflections and skybox (2.3x slower)")
    a("--epochs", type=positive_int, default=100, help="BC epochs (seed: 100)")
    a("--dyn-epochs", type=positive_int, default=None, help="dynamics epochs (default: seed's 100, 150 for resblock)")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine-decayed")
    a("--train-batch-size", type=positive_int, default=256, help="minibatch for BC and dynamics training")
    a("--no-standardize", action="store_true", help="train on raw embeddings, as the seed did")
    a("--dynamics", nargs="+", choices=DYNAMICS, default=list(DYNAMICS), help="dynamics models to train and plan with")
    a("--rollout", type=positive_int, default=None, help="override the rollout length of every model (mlp_rollout5: 5)")
    a("--plans", nargs="+", choices=PLANS, default=list(PLANS), help="planner/model pairs for `plan`")
    a("--plan-episodes", type=positive_int, default=20, help="MPC episodes per planner (seed: 1)")
    a("--plan-steps", type=positive_int, default=100, help="MPC episode length (seed: 100)")
    a("--horizon", type=positive_int, default=10, help="planning horizon (seed: 10)")
    a("--samples", type=positive_int, default=500, help="CEM samples (seed: 500)")
    a("--elites", type=positive_int, default=50, help="CEM elites (seed: 50)")
    a("--iterations", type=positive_int, default=5, help="CEM iterations (seed: 5)")
    a("--rs-samples", type=positive_int, default=1000, help="random-shooting samples (seed: 1000)")
    a("--cost", choices=["final", "sum"], default="final", help="L2 to z_goal at the last step, or summed over the horizon")
    a("--plan-bf16", action="store_true", help="run the planner's dynamics rollouts in bf16")
    a("--probe-episodes", type=positive_int, default=20, help="episodes rendered for the probe")
    a("--bench-out", default="results", help="folder for bench.json and bench.md")
    a("--quick", action="store_true", help="small preset that finishes in minutes on 2 CPU cores: " +
      ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device for the encoder")
    a("--seed", type=int, default=0, help="seeds torch, numpy and the episode seed ranges")
    a("--force", action="store_true", help="re-run stages whose outputs exist (otherwise they are skipped)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the preset only fills options the user left at their defaults
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    if args.steps > MAX_STEPS or args.plan_steps > MAX_STEPS:
        parser.error(f"--steps and --plan-steps must be at most {MAX_STEPS} (reacher's time limit)")
    if args.elites > args.samples:
        parser.error(f"--elites ({args.elites}) must not exceed --samples ({args.samples})")
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.encoder.startswith((".", "/", "~")):  # a path, not a hub id
        if not os.path.isdir(args.encoder):
            parser.error(f"--encoder {args.encoder}: no such folder")
    args.command = "python vjepa_reacher.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}")


def run_stage(name, args, encoder):
    t0 = time.time()
    if STAGES[name](args, encoder) is False:  # skipped: outputs exist, keep the time it took to make them
        return
    timing_path = os.path.join(args.out, "timing.json")
    timing = load_json(timing_path) if os.path.exists(timing_path) else {}
    timing[name] = time.time() - t0
    save_json(timing_path, timing)


def save_config(args, encoder):
    """config.json holds the latest options and every command that has written to this run folder."""
    path = os.path.join(args.out, "config.json")
    old = load_json(path) if os.path.exists(path) else {}
    config = dict(vars(args), encoder_info={"id": encoder.id, "dim": encoder.dim, "precision": encoder.precision},
                  commands=old.get("commands", []) + [args.command])
    save_json(path, config)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.stage == "bench":
            return bench(args)
        check_writable(args.out)
        if args.stage in ("report", "merge"):  # need no encoder: everything comes from the run folder
            STAGES[args.stage](args, None)
            return 0
        seed_everything(args.seed)
        encoder = load_encoder(args.encoder, args.device, args.precision, args.seed)
        save_config(args, encoder)
        for name in (ALL if args.stage == "all" else [args.stage]):
            run_stage(name, args, encoder)
        if args.stage != "all":
            write_report(args.out)
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
