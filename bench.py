"""bench.py: how fast vjepa_reacher.py runs on this machine, one small function per measurement.

    python vjepa_reacher.py bench                  # full: writes results/bench.json and results/bench.md
    python vjepa_reacher.py bench --quick          # smoke, ~30 s on 2 cores: into --out, never over results/
    python vjepa_reacher.py bench --device cuda    # a GPU: ViT-L at batch 32 in fp16/bf16, CEM and training on it

Why a file of its own: nanoGPT keeps a bench.py beside train.py for the same reason. vjepa_reacher.py is the
pipeline that people read top to bottom; repeats, interleaving and replicas of the seed's loops would sit
between its stages and serve no reader of the method. This file imports the script's functions and times
them; it never copies them. The only code here that mirrors other code is the seed's two loops, on purpose.

How the numbers survive a noisy, shared machine: the sides of each comparison run in turn, A, B, A, B, ...,
several times, and each side reports its median; a slow spell then hits every side alike. Each measurement
is one function that returns (figures for bench.json, one row of the table in bench.md).
"""
import contextlib
import copy
import io
import multiprocessing
import os
import platform
import tempfile
import time
from functools import partial

import numpy as np
import torch

from vjepa_reacher import (DEFAULT_ENCODER, FRAME_SIZE, WINDOW, Encoder, MLPDynamics, Renderer, atomic_path,
                           bc_net, bc_policy, cem, encode, encoder_flops, expert_policy, latent_cost, load_encoder,
                           make_env, make_envs, md_table, n_params, new_window, p_expert, preprocess,
                           random_vjepa2, render_workers, reset_env, run_episodes, save_json, train_bc, train_dynamics,
                           windows_from_frames)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Timing plumbing
# ----------------------------------------------------------------------------------------------
def is_cuda(device):
    return device.startswith("cuda")


def precisions(device):
    """Every precision worth timing here: fp16 only on CUDA (CPUs have no fast fp16 matmul)."""
    return ("fp32", "bf16", "fp16") if is_cuda(device) else ("fp32", "bf16")


def low_precision(device):
    """The autocast precision the script picks for the device: fp16 on CUDA, bf16 on a CPU."""
    return "fp16" if is_cuda(device) else "bf16"


def synchronize(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def interleaved(sides, repeat, device="cpu", warmup=True):
    """Median seconds of each side of a comparison, timed in turn A, B, A, B, ... `repeat` times.

    sides: {name: fn()}. One untimed call each first (allocation, kernel choice) unless warmup=False.
    CUDA work is synchronised before and after each call. Returns ({name: seconds}, {name: last return}).
    """
    results = {name: fn() for name, fn in sides.items()} if warmup else {}
    times = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            synchronize(device)
            t0 = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}, results


def cpu_name():
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device):
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU x{os.cpu_count()}"


def busy_warning(device):
    """The 1-minute load average before bench starts, with a warning when other processes already keep the
    CPUs busy: the kernel then shares cores between threads, so a side with more threads (rendering beside
    the encoder) can get a bigger share than it would alone, many small ops stall, and ratios drift."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        hint = ("" if "OMP_WAIT_POLICY" in os.environ else "; OMP_WAIT_POLICY=PASSIVE stops torch's idle threads "
                "spinning against them (4x on `tiny` measured here)")
        print(f"bench: warning: load average {load:.1f} on {os.cpu_count()} cores; other processes share this "
              f"machine, so {'CPU-side ' if is_cuda(device) else ''}timings and ratios are noisy{hint}", flush=True)
    return load


def slash(values, fmt="{:.0f}"):
    """'a / b / c' for a table cell."""
    return " / ".join(fmt.format(v) for v in values)


# ----------------------------------------------------------------------------------------------
# The work each side does (plain functions, so partial() can name them without lambdas)
# ----------------------------------------------------------------------------------------------
def matmuls(a, b, n):
    for _ in range(n):
        torch.matmul(a, b)


def render_frames(renderer, physics, n):
    for _ in range(n):
        renderer(physics)


def seed_render(physics):
    """The seed's frame: physics.render builds a Camera (and its scene) on every call, full look."""
    return physics.render(height=FRAME_SIZE, width=FRAME_SIZE, camera_id=0).copy()


def seed_render_frames(physics, n):
    for _ in range(n):
        seed_render(physics)


def step_random(envs, steps, rng):
    idx = np.arange(envs.n)
    for _ in range(steps):
        envs.step(rng.uniform(-1, 1, size=(envs.n, 2)), idx)


def encode_n(encoder, windows, n):
    for _ in range(n):
        encode(encoder, windows)


def rendered_windows(batch):
    """`batch` windows of real lean frames (the first frame of seeds 0.. repeated x8): what the encoder sees
    in `collect`, rather than noise."""
    env, renderer, frames = make_env(0), Renderer(FRAME_SIZE, lean=True), []
    for s in range(batch):
        reset_env(env, s)
        frames.append(renderer(env.physics))
    return np.repeat(np.stack(frames)[:, None], WINDOW, 1)


def seed_frame_tensor(frame):
    """The seed's ET(Image.fromarray(frame)): ToTensor and ImageNet Normalize, (3, H, W) float32 on the CPU.
    Its Resize((256, 256)) is a no-op on 256 px frames; `preprocess` computes the same normalisation."""
    return preprocess(frame[None, None], "cpu")[0, 0]


@torch.no_grad()
def seed_collection_loop(model, env, seeds, steps, device, dtype, batch=32):
    """The seed's Phase 1 collection loop, replicated for timing: generate_and_encode_modal.py at commit
    8c91016, lines ~80-106 (encode_windows) and ~120-150 (the episode loop).

    One env at a time; the P-controller; full-look frames from physics.render(256, 256, camera_id=0); after
    the episode each frame is preprocessed ONCE, and its windows (front-padded with frame 0) go 32 per
    forward through the full model (encoder and predictor), weights in fp16 on CUDA as the seed's
    (fp32 on a CPU, where fp16 weights would only slow the seed down). The seed loaded a fresh suite env per
    episode; here one env is reset per seed, which can only favour the seed. Returns windows encoded
    (`steps` per episode, as the seed).
    """
    for s in seeds:
        reset_env(env, s)
        frames = [seed_render(env.physics)]
        for _ in range(steps):
            env.step(p_expert(env.physics))
            frames.append(seed_render(env.physics))
        tensors = [seed_frame_tensor(f) for f in frames]
        for start in range(0, steps, batch):
            clips = [torch.stack([tensors[max(0, t - WINDOW + 1 + i)] for i in range(WINDOW)])
                     for t in range(start, min(start + batch, steps))]
            x = torch.stack(clips).to(device, dtype)
            model(pixel_values_videos=x).last_hidden_state.mean(1).cpu().float().numpy()
    return len(seeds) * steps


@torch.no_grad()
def seed_eval_loop(model, policy_net, mean, std, env, seeds, steps, device, dtype):
    """The seed's live evaluation loop, replicated for timing: eval_modal.py at commit 8c91016, lines ~105-112
    (encode_buffer) and ~151-170 (the episode loop).

    One env at a time; a deque of the last 8 full-look frames; at EVERY step all 8 frames are preprocessed
    again and encoded as one window (batch 1) by the full model, z-scored, mapped to an action by the BC
    net, stepped and rendered. Returns control steps taken.
    """
    for s in seeds:
        reset_env(env, s)
        window = new_window(seed_render(env.physics))
        for _ in range(steps):
            clip = torch.stack([seed_frame_tensor(f) for f in window])[None].to(device, dtype)
            z = model(pixel_values_videos=clip).last_hidden_state.mean(1).cpu().float()
            action = policy_net((z - mean) / std).numpy()[0]
            env.step(action)
            window.append(seed_render(env.physics))
    return len(seeds) * steps


def seed_model(encoder):
    """The seed's encoder: the full model with fp16 weights on CUDA (a copy), the same fp32 model on a CPU."""
    if is_cuda(encoder.device):
        return copy.deepcopy(encoder.model).half(), torch.float16
    return encoder.model, torch.float32


# ----------------------------------------------------------------------------------------------
# Encoders under test
# ----------------------------------------------------------------------------------------------
def vitl_model(device):
    """V-JEPA 2 ViT-L with random weights: VJEPA2Config()'s defaults are ViT-L/16 at 256 px (1024 wide, 24
    layers), so the compute is the real model's without a 1.3 GB download. SDPA attention, as load_pretrained."""
    from transformers import VJEPA2Config
    return random_vjepa2(VJEPA2Config(attn_implementation="sdpa"), 0).to(device).eval().requires_grad_(False)


def as_encoder(key, model, device, precision):
    """An Encoder around `model`; `half` casts a copy, so the fp32 weights stay for the throughput rows."""
    if precision == "half":
        model = copy.deepcopy(model)
    return Encoder(key, model.config.hidden_size, model, device, "fp32", model.config).variant(precision)


# ----------------------------------------------------------------------------------------------
# Measurements: each returns (figures for bench.json, a table row [measure, result, ratio])
# ----------------------------------------------------------------------------------------------
def matmul_peak(device, quick):
    """Square-matmul GFLOP/s per precision, measured now on this device: the ceiling MFU is quoted against.
    On CUDA fp32 means true fp32 (torch leaves TF32 off for matmuls by default), as the encoder's fp32 rows."""
    n, calls = (8192, 10) if is_cuda(device) else ((1024, 3) if quick else (2048, 3))
    sides = {}
    for p in precisions(device):
        a = torch.randn(n, n, device=device, dtype=DTYPES[p])
        b = torch.randn(n, n, device=device, dtype=DTYPES[p])
        sides[p] = partial(matmuls, a, b, calls)
    seconds, _ = interleaved(sides, 3 if quick else 5, device)
    peak = {p: 2 * n ** 3 * calls / s / 1e9 for p, s in seconds.items()}
    figures = dict(peak, value=max(peak.values()), n=n)
    return figures, [f"matmul peak {' / '.join(peak)} (GFLOP/s, {n}x{n})", slash(peak.values()), ""]


def measure_render(tiny, quick):
    """Frames/s of the lean look, the full look (both through a `Renderer`) and the seed's physics.render
    call, interleaved on one physics; how far lean moves the pixels and `tiny`'s embedding of the same states
    (against how far one control step moves it); and GL_RENDERER: llvmpipe means Mesa draws on the CPU."""
    env = make_env(0)
    reset_env(env, 0)
    renderers = {"lean": Renderer(FRAME_SIZE, lean=True), "full": Renderer(FRAME_SIZE, lean=False)}
    n = 5 if quick else 50
    sides = {k: partial(render_frames, r, env.physics, n) for k, r in renderers.items()}
    sides["seed"] = partial(seed_render_frames, env.physics, n)
    seconds, _ = interleaved(sides, 3 if quick else 5)
    fps = {k: n / s for k, s in seconds.items()}
    frames = {k: [] for k in renderers}
    for _ in range(10 if quick else 30):  # one short expert episode, drawn both ways
        for k, r in renderers.items():
            frames[k].append(r(env.physics))
        env.step(p_expert(env.physics))
    z = {k: encode(tiny, windows_from_frames(np.stack(f))) for k, f in frames.items()}
    pixel = float(np.abs(np.stack(frames["lean"]).astype(np.int16) - np.stack(frames["full"])).mean())
    shift = np.linalg.norm(z["lean"] - z["full"], axis=1) / np.linalg.norm(z["full"], axis=1)
    step = np.linalg.norm(np.diff(z["full"], axis=0), axis=1) / np.linalg.norm(z["full"][1:], axis=1)
    figures = {"value": fps["lean"] / fps["full"], "lean_fps": fps["lean"], "full_fps": fps["full"],
               "seed_physics_render_fps": fps["seed"], "pixel_mean_abs_diff": pixel,
               "tiny_embedding_rel_shift": float(shift.mean()), "tiny_embedding_rel_step": float(step.mean()),
               "gl_renderer": renderers["lean"].gl_renderer()}
    row = [f"rendering {FRAME_SIZE}², lean / full look / the seed's physics.render (frames/s)",
           slash(fps.values()), f"{figures['value']:.1f}x lean vs full; pixels differ {pixel:.0f}/255"]
    return figures, row


def measure_render_workers(quick, n_envs):
    """Frames/s of stepping and rendering n_envs envs (lean look, random actions) at K = 0, 1, ... render
    worker processes, up to min(4, cores) (--quick: 1); every K is alive at once and timed interleaved, their
    start-up untimed.

    The main process only waits here, so K workers may use every core; in `collect` the encoder competes
    for them too. With 2 cores, expect K = 1 to cost the pipe and copy and K = 2 at most ~2x."""
    ks = list(range((1 if quick else min(4, os.cpu_count() or 1)) + 1))
    envs, steps, rng = {}, 3 if quick else 10, np.random.default_rng(0)
    try:
        for k in ks:
            envs[k] = make_envs(n_envs, k, FRAME_SIZE, lean=True)
            envs[k].reset(list(range(n_envs)))
        seconds, _ = interleaved({k: partial(step_random, e, steps, rng) for k, e in envs.items()},
                                 3 if quick else 5)
    finally:
        for e in envs.values():
            e.close()
    fps = {str(k): n_envs * steps / s for k, s in seconds.items()}
    best = max(fps, key=fps.get)
    figures = {"frames_per_s": fps, "envs": n_envs, "cores": os.cpu_count(), "auto": render_workers(-1),
               "value": fps[best] / fps["0"], "best_k": int(best)}
    gain = f"{figures['value']:.1f}x at K={best}" if best != "0" else "none faster than K=0"
    row = [f"stepping + rendering {n_envs} envs, K = {' / '.join(fps)} render workers (frames/s)",
           slash(fps.values()), f"{gain} ({os.cpu_count()} cores; auto K={render_workers(-1)})"]
    return figures, row


def measure_collect_vs_encoder(encoder, windows, expert, workers, quick):
    """Collection windows/s (expert episodes in lockstep, every window encoded, as `collect` runs them, less
    the disk writes) as a fraction of encoder-only windows/s at the same batch, interleaved. 1.0 means
    stepping and rendering hide entirely behind the encoder. The goal on a GPU is >= 0.8."""
    batch, steps, calls = len(windows), 6 if quick else 20, 2 if quick else 5
    envs = make_envs(batch, workers, encoder.frame_size, lean=True, expert=expert)
    encode(encoder, windows)  # warm-up; the collection side gets one too, except with --quick
    try:
        seconds, _ = interleaved({
            "collect": partial(run_episodes, list(range(batch)), expert_policy, encoder, envs, steps, needs_z=False,
                               keep_z=True, batch_size=batch),
            "encoder": partial(encode_n, encoder, windows, calls)}, 3, encoder.device, warmup=not quick)
    finally:
        envs.close()
    collect, alone = batch * (steps + 1) / seconds["collect"], batch * calls / seconds["encoder"]
    figures = {"value": collect / alone, "collect_windows_per_s": collect, "encoder_windows_per_s": alone,
               "encoder": encoder.id, "precision": encoder.precision, "batch": batch, "render_workers": workers}
    row = [f"collection vs the encoder alone, {encoder.id} {encoder.precision}, batch {batch}, K={workers} "
           "(windows/s)", f"{collect:.1f} vs {alone:.1f}", f"{collect / alone:.2f} of the encoder"]
    return figures, row


def measure_seed_collection(encoder, batch, workers, quick):
    """Our collection (P-controller, `batch` episodes in lockstep, lean look, batched encoder overlapped with
    stepping) against the seed's COLLECTION loop (`seed_collection_loop`: one env, full look, frames
    preprocessed once, 32 windows of an episode per forward of the full model), in windows/s, interleaved.
    The seed's side runs 64-step episodes so that its forwards are full batches of 32, as in its 200 steps."""
    steps, seed_steps = (5, 5) if quick else (20, 64)
    envs = make_envs(batch, workers, encoder.frame_size, lean=True, expert="p")
    env, (model, dtype) = make_env(0), seed_model(encoder)
    try:
        seconds, _ = interleaved({
            "ours": partial(run_episodes, list(range(batch)), expert_policy, encoder, envs, steps, needs_z=False,
                            keep_z=True, batch_size=batch),
            "seed": partial(seed_collection_loop, model, env, [0], seed_steps, encoder.device, dtype)},
            3, encoder.device, warmup=not quick)
    finally:
        envs.close()
    ours, seed = batch * (steps + 1) / seconds["ours"], seed_steps / seconds["seed"]
    figures = {"value": ours / seed, "ours_windows_per_s": ours, "seed_windows_per_s": seed, "encoder": encoder.id,
               "precision": encoder.precision, "seed_precision": str(dtype).replace("torch.", ""),
               "batch": batch, "render_workers": workers, "steps": steps, "seed_steps": seed_steps}
    row = [f"collection with {encoder.id} vs the seed's collection loop (windows/s)", f"{ours:.1f} vs {seed:.1f}",
           f"{ours / seed:.1f}x"]
    return figures, row


def measure_seed_eval(encoder, batch, workers, quick):
    """Our live evaluation (a BC policy, `batch` episodes stepped in lockstep, their windows encoded as one
    batch) against the seed's EVALUATION loop (`seed_eval_loop`: one window per forward, 8 frames
    re-preprocessed every step), in control steps/s, interleaved."""
    steps, seed_episodes = (5, 1) if quick else (20, 2)
    torch.manual_seed(0)
    net = bc_net(encoder.dim).eval()
    mean, std = np.zeros(encoder.dim, np.float32), np.ones(encoder.dim, np.float32)
    envs = make_envs(batch, workers, encoder.frame_size, lean=True)
    env, (model, dtype) = make_env(0), seed_model(encoder)
    try:
        seconds, _ = interleaved({
            "ours": partial(run_episodes, list(range(batch)), bc_policy(net, mean, std), encoder, envs, steps,
                            batch_size=batch),
            "seed": partial(seed_eval_loop, model, net, torch.from_numpy(mean), torch.from_numpy(std), env,
                            list(range(seed_episodes)), steps, encoder.device, dtype)},
            3, encoder.device, warmup=not quick)
    finally:
        envs.close()
    ours, seed = batch * steps / seconds["ours"], seed_episodes * steps / seconds["seed"]
    figures = {"value": ours / seed, "ours_steps_per_s": ours, "seed_steps_per_s": seed, "encoder": encoder.id,
               "episodes": batch, "render_workers": workers, "steps": steps}
    row = [f"live eval with {encoder.id}, {batch} episodes batched vs the seed's one-window loop (steps/s)",
           f"{ours:.1f} vs {seed:.1f}", f"{ours / seed:.1f}x"]
    return figures, row


def measure_encoder(label, key, model, windows, device, peak, quick):
    """Windows/s of one encoder at every precision (autocast over fp32 weights; on CUDA also `half`, fp16
    weights without autocast, as --precision half) at `batch`, interleaved; its GFLOP/s from encoder_flops,
    and MFU: that GFLOP/s over the matmul peak measured in this run at the same precision (fp16 for half).
    Returns figures per precision and windows/s under print_estimate's keys."""
    config, batch = model.config, len(windows)
    encoders = {p: Encoder(key, config.hidden_size, model, device, p, config) for p in precisions(device)}
    if is_cuda(device):  # measured on an H200: autocast's casts and fp32 elementwise ops cost ViT-L ~1.3x
        encoders["half"] = encoders["fp32"].variant("half")
    seconds, _ = interleaved({p: partial(encode, e, windows) for p, e in encoders.items()},
                             3 if quick or label == "vitl" else 5, device)
    flops = encoder_flops(config)
    figures, rates, mfu = {}, {}, []
    for p, s in seconds.items():
        rate = batch / s
        gflops = rate * flops / 1e9
        rates[f"{key}@{device}/{p}"] = rate
        ceiling = peak["fp16" if p == "half" else p]
        figures[p] = {"windows_per_s": rate, "gflops": gflops, "fraction_of_matmul_peak": gflops / ceiling}
        mfu.append(100 * gflops / ceiling)
    figures.update(gflop_per_window=flops / 1e9, batch=batch, attn_implementation=config._attn_implementation,
                   encode_windows_per_s=rates)
    row = [f"encoder {label} ({flops / 1e9:.1f} GFLOP/window), batch {batch}, {' / '.join(seconds)} (windows/s)",
           slash((batch / s for s in seconds.values()), "{:.2f}"), f"MFU {slash(mfu)} %"]
    return figures, row


def measure_cem(device, peak, quick):
    """One MPC step for 20 episodes at the seed's sizes (500 samples x horizon 10 x 5 iterations, 50 elites) on
    the 1.58M-param mlp at D = 1024, in fp32 and under bf16 (fp16 on CUDA) autocast, interleaved; --quick: one
    episode, 64 samples, 2 iterations. FLOP floor: 2 x params x samples x horizon x iterations x episodes over the
    measured matmul peak."""
    episodes, samples, horizon, iterations = (1, 64, 10, 2) if quick else (20, 500, 10, 5)  # seed: 500 x 10 x 5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLPDynamics(1024).to(device).eval().requires_grad_(False)
        z, z_goal = torch.randn(episodes, 1024, device=device), torch.randn(episodes, 1024, device=device)
    sides = {}
    for p in ("fp32", low_precision(device)):
        cost_fn = latent_cost(model, z, z_goal, "final", DTYPES[p])
        sides[p] = partial(cem, cost_fn, episodes, horizon, samples=samples, elites=samples // 10,
                           iterations=iterations,
                           generator=torch.Generator(device).manual_seed(0), device=device)
    seconds, results = interleaved(sides, 3 if quick or not is_cuda(device) else 5, device)
    flops = 2 * n_params(model) * samples * horizon * iterations * episodes
    figures = {"value": seconds["fp32"] * 1000, "episodes": episodes, "samples": samples, "horizon": horizon,
               "iterations": iterations, "params": n_params(model),
               "gflop_per_step": flops / 1e9}
    for p, s in seconds.items():
        figures[f"{p}_ms"] = s * 1000
        figures[f"{p}_floor_ms"] = flops / peak[p] / 1e6
    low = low_precision(device)
    (best_fp32, _, _), (best_low, _, _) = results["fp32"], results[low]  # cem returns (best, mean, std)
    figures[f"{low}_first_action_abs_diff"] = float((best_fp32[:, 0] - best_low[:, 0]).abs().max())
    row = [f"CEM step, {episodes} episode(s) x {samples} x {horizon} x {iterations} on the mlp, fp32 / {low} (ms)",
           slash(figures[f"{p}_ms"] for p in seconds),
           f"floor {slash(figures[f'{p}_floor_ms'] for p in seconds)} ms"]
    return figures, row


def measure_training(device, quick):
    """One epoch of BC and one of the mlp dynamics (the script's train_bc / train_dynamics, default batch 256)
    on a synthetic set of E episodes x T steps x D = 1024, on the device, interleaved. Full: 500 x 200 = 100k
    transitions. BC copies its inputs to the device once; dynamics gathers each batch from numpy."""
    E, T, D = (20, 50, 1024) if quick else (500, 200, 1024)
    rng = np.random.default_rng(0)
    data = {"z": rng.standard_normal((E, T + 1, D), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (E, T, 2)).astype(np.float32)}
    with contextlib.redirect_stdout(io.StringIO()):  # the one-line-per-epoch logs
        seconds, _ = interleaved({"bc": partial(train_bc, data, epochs=1, device=device),
                                  "dynamics": partial(train_dynamics, "mlp", data, 1, device=device)},
                                 3, device, warmup=quick)  # full: 100k transitions, no spare epoch
    figures = {"transitions": E * T, "dim": D, "bc_epoch_s": seconds["bc"], "dynamics_epoch_s": seconds["dynamics"],
               "bc_transitions_per_s": E * T / seconds["bc"],
               "dynamics_transitions_per_s": E * T / seconds["dynamics"], "value": seconds["dynamics"]}
    row = [f"one epoch on {E * T:,} x {D} synthetic transitions, BC / mlp dynamics (s)",
           slash(seconds.values(), "{:.2f}"),
           f"{slash((E * T / s for s in seconds.values()))} transitions/s"]
    return figures, row


def bench_memory(episodes, steps, dim):
    """Peak RSS of one epoch of mlp dynamics on a memory-mapped synthetic dataset (run in a fresh process)."""
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
        with contextlib.redirect_stdout(io.StringIO()):
            train_dynamics("mlp", data, epochs=1, batch_size=1024)
        seconds = time.perf_counter() - t0
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    # ru_maxrss counts the memmap's file-backed pages once touched; RssAnon is the process's own heap.
    return {"transitions": episodes * steps, "dim": dim, "dataset_gb": episodes * (steps + 1) * dim * 4 / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "rss_anon_gb_after": int(status.get("RssAnon", "0 kB").split()[0]) / 1e6, "epoch_seconds": seconds}


def measure_memory():
    """One epoch of mlp dynamics on a 1M x 1024 float32 memmap (4.1 GB) in a freshly spawned process, so its
    peak RSS is that epoch's alone. ~70 s on 2 cores: full runs on a CPU only."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        m = pool.apply(bench_memory, (5000, 200, 1024))
    row = [f"one epoch of mlp dynamics on a {m['transitions']:,} x {m['dim']} memmap ({m['dataset_gb']:.1f} GB)",
           f"peak RSS {m['peak_rss_gb']:.2f} GB (heap {m['rss_anon_gb_after']:.2f} GB)", f"{m['epoch_seconds']:.0f} s"]
    return m, row


# ----------------------------------------------------------------------------------------------
# The bench stage
# ----------------------------------------------------------------------------------------------
def bench(args):
    """Run every measurement on args.device, print each row as it lands, then write bench.json and bench.md
    to --bench-out, else results/ (full run) or --out (--quick, so a smoke run never overwrites results/)."""
    quick, device = args.quick, args.device
    folder = args.bench_out or (args.out if quick else RESULTS)
    batch = min(args.batch_size, 8) if quick else args.batch_size
    workers = render_workers(args.render_workers)
    result = {"device": device_name(device), "torch": torch.__version__, "quick": quick, "command": args.command,
           "encode_windows_per_s": {}, "encoder_gflops": {}, "bench_seconds": {}}
    rows = []

    def record(key, measure, *inputs, into=result):
        """Run one measurement; keep its figures under `key`, its row for the table, its own wall time."""
        t0 = time.perf_counter()
        into[key], row = measure(*inputs)
        result["bench_seconds"][key] = time.perf_counter() - t0
        rows.append(row)
        print(f"bench: {row[0]}: {row[1]} | {row[2]} ({result['bench_seconds'][key]:.0f} s)", flush=True)

    print(f"bench: {result['device']}, torch {torch.__version__}{', quick' if quick else ''}", flush=True)
    result["load_average_at_start"] = busy_warning(device)
    result["torch_threads"] = torch.get_num_threads()
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    record("matmul_peak_gflops", matmul_peak, device, quick)
    peak = result["matmul_peak_gflops"]
    tiny = load_encoder("tiny", device, "fp32")
    record("render", measure_render, tiny, quick)
    result["gl_renderer"] = result["render"]["gl_renderer"]
    record("render_workers", measure_render_workers, quick, batch)

    # The pipeline rows run ViT-L (random weights, same compute) on a GPU, `tiny` on a CPU or with --quick.
    vitl = None if quick else vitl_model(device)
    on_gpu = vitl is not None and is_cuda(device)
    pipeline = as_encoder("ViT-L (random init)" if on_gpu else "tiny", vitl if on_gpu else tiny.model, device,
                          args.precision)
    windows = rendered_windows(batch)
    record("collect_vs_encoder", measure_collect_vs_encoder, pipeline, windows, args.expert, workers, quick)
    record("collect_speedup_vs_seed_collection", measure_seed_collection, pipeline, batch, workers, quick)
    record("eval_speedup_vs_seed_eval_loop", measure_seed_eval, pipeline, batch, workers, quick)

    encoders = [("tiny", "tiny", tiny.model, batch)]
    if vitl is not None:  # ViT-L on a CPU takes seconds per window: batch 1 there
        encoders.append(("vitl", DEFAULT_ENCODER, vitl, batch if is_cuda(device) else 1))
    for label, key, model, size in encoders:
        record(label, measure_encoder, label, key, model, windows[:size], device, peak, quick,
               into=result["encoder_gflops"])
        result["encode_windows_per_s"].update(result["encoder_gflops"][label]["encode_windows_per_s"])
    main = result["encoder_gflops"]["vitl" if vitl is not None else "tiny"]
    result["encoder_gflops"]["value"] = max(v["gflops"] for p, v in main.items() if p in DTYPES or p == "half")

    record("cem_ms_per_step", measure_cem, device, peak, quick)
    record("train_epoch", measure_training, device, quick)
    if not quick and not is_cuda(device):
        record("memory", measure_memory)

    text = (f"Device: {result['device']} (GL_RENDERER: {result['gl_renderer']}), torch {result['torch']}. "
            f"Made by `{result['command']}`.\n\n{md_table(['measure', 'result', 'ratio'], rows)}\n")
    os.makedirs(folder, exist_ok=True)
    save_json(os.path.join(folder, "bench.json"), result)
    with atomic_path(os.path.join(folder, "bench.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text + f"bench: wrote {os.path.join(folder, 'bench.json')} and bench.md")
    return 0
