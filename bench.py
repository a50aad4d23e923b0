"""bench.py: how fast vjepa_reacher.py runs on this machine, one small function per measurement.

    python bench.py                                          # full: results/bench.json and results/bench.md
    python bench.py --quick                                  # smoke, ~30 s on 2 cores, into runs/bench-quick
    python bench.py --device cuda --out results/bench-h200   # a GPU: ViT-L at batch 32, CEM and training on it

As nanoGPT's bench.py, it imports the script's functions and times them (the script never imports it back); only
the seed's two loops are copied, on purpose. The sides of each comparison run in turn, A, B, A, B, ..., each
reporting its median, so a slow spell on a shared machine hits every side alike.
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import io
import os
import platform
import shlex
import sys
import time
from functools import partial

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MEASURES = ("render", "loops_vs_seed", "encoder_tiny", "encoder_vitl", "compile", "cem_ms_per_step", "train_epoch")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes: batch 8, no ViT-L, small CEM and training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: cuda if available")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the pipeline's encoder")
    p.add_argument("--only", nargs="+", choices=MEASURES, help="only these measurements (the matmul peak always)")
    p.add_argument("--out", help="folder for bench.json and bench.md (default results/; --quick: runs/bench-quick)")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "bench.py"] + argv)
    return args


if __name__ == "__main__":
    parse_args()  # --help and bad options answer here, before torch loads

import vjepa_reacher as vr  # noqa: E402  (first: it sets MUJOCO_GL and OMP_WAIT_POLICY before torch loads)
import gpu  # noqa: E402
import numpy as np  # noqa: E402
import rope  # noqa: E402
import torch  # noqa: E402
from report import md_table, save_json, write_text  # noqa: E402

SIZE = 256  # seed: 256 px frames (gen ~74-78)
BATCH = 32  # seed: 32 windows a forward; also the episodes we step in lockstep
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}  # CPUs have no fast fp16 matmul


# ---- Timing plumbing; the work of each side is a plain function, so partial() names it without a lambda ---------
def interleaved(sides, repeat, device="cpu", warmup=True):
    """Median seconds of each side of a comparison, timed in turn A, B, A, B, ... `repeat` times.
    sides: {name: fn()}, each called once untimed first (allocation, kernel choice) unless warmup=False.
    Returns ({name: seconds}, {name: last return})."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {name: fn() for name, fn in sides.items()} if warmup else {}
    times = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            sync()
            t0 = time.perf_counter()
            results[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}, results


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(device)
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""  # Linux; else the arch only
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return f"{(names or [platform.machine()])[0]} CPU x{os.cpu_count()}"


def slash(values, fmt="{:.0f}"):
    """'a / b / c' for a table cell."""
    return " / ".join(fmt.format(v) for v in values)


def repeat(n, fn, *inputs):
    for _ in range(n):
        fn(*inputs)


def rollout(seeds, policy, encoder, envs, steps):
    """Our loop, as `collect` and `eval` run it (less the disk writes): every window encoded, in lockstep."""
    return list(vr.run_episodes(seeds, policy, encoder, envs, steps, keep_z=True))


def encoder_flops(config):
    """Forward FLOPs of one window through the V-JEPA 2 encoder, counted from the config (2 FLOPs per MAC)."""
    d, L, r = config.hidden_size, config.num_hidden_layers, config.mlp_ratio
    n = (vr.WINDOW // config.tubelet_size) * (SIZE // config.patch_size) ** 2  # tokens
    patch = n * d * 3 * config.tubelet_size * config.patch_size ** 2
    return 2 * (patch + L * (n * (4 + 2 * r) * d * d + 2 * n * n * d))  # a layer: qkv+proj, mlp, QK^T and AV


def vitl_encoder(device, batch):
    """V-JEPA 2 ViT-L with random weights: VJEPA2Config()'s defaults are ViT-L/16 at 256 px (1024 wide, 24 layers,
    16 heads), so the compute is the real model's without a 1.3 GB download. SDPA attention, as load_pretrained,
    and rope.py's cached rotary tables, as load_encoder installs them."""
    from transformers import VJEPA2Config
    model = vr.random_vjepa2(VJEPA2Config(attn_implementation="sdpa"), 0).to(device).eval().requires_grad_(False)
    return vr.Encoder("vitl-random", 1024, model, device, "fp32", batch_size=batch, rope=rope.install(model, "input"))


# ---- The seed's loops, replicated for timing (ThomasVuNguyen/Meta-s-Jepa, train_robots/ at 8c91016) --------------
def seed_frame(physics):
    """The seed's frame: physics.render builds a Camera (and its scene) on every call, full look."""
    return physics.render(height=SIZE, width=SIZE, camera_id=0).copy()


def seed_tensor(frame):
    """The seed's ET(Image.fromarray(frame)): ToTensor and ImageNet Normalize, (3, H, W) float32 on the CPU.
    Its Resize((256, 256)) is a no-op on 256 px frames; `preprocess` computes the same normalisation."""
    return vr.preprocess(torch.from_numpy(frame[None, None]), *vr.Encoder("seed", 3).normalize)[0, 0]


@torch.no_grad()
def seed_collection_loop(model, env, seeds, steps):
    """The seed's Phase 1 collection (generate_and_encode_modal.py ~80-106, ~120-150): one env at a time, the
    P-controller, full-look frames; after the episode each frame is preprocessed once and its windows (front-padded
    with frame 0) go 32 a forward through the full model (encoder and predictor). It loaded a fresh suite env per
    episode; one env reset per seed can only favour it."""
    for s in seeds:
        vr.reset_env(env, s)
        frames = [seed_frame(env.physics)]
        for _ in range(steps):
            env.step(vr.p_expert(env.physics))
            frames.append(seed_frame(env.physics))
        tensors = [seed_tensor(f) for f in frames]
        for start in range(0, steps, BATCH):
            clips = [torch.stack([tensors[max(0, t - vr.WINDOW + 1 + i)] for i in range(vr.WINDOW)])
                     for t in range(start, min(start + BATCH, steps))]
            x = torch.stack(clips).to(model.device, model.dtype)
            model(pixel_values_videos=x).last_hidden_state.mean(1).cpu().float().numpy()


@torch.no_grad()
def seed_eval_loop(model, policy, env, seeds, steps):
    """The seed's live evaluation (eval_modal.py ~105-112 and ~151-170): one env at a time, a deque of the last 8
    full-look frames; at EVERY step all 8 are preprocessed again and encoded as one window (batch 1) by the full
    model, then the BC net acts."""
    for s in seeds:
        vr.reset_env(env, s)
        window = collections.deque([seed_frame(env.physics)] * vr.WINDOW, maxlen=vr.WINDOW)
        for _ in range(steps):
            clip = torch.stack([seed_tensor(f) for f in window])[None].to(model.device, model.dtype)
            z = model(pixel_values_videos=clip).last_hidden_state.mean(1).float()
            env.step(policy(z, None)[0])
            window.append(seed_frame(env.physics))


# ---- Measurements: each returns (figures for bench.json, table rows [measure, result, ratio]) --------------------
def matmul_peak(device, quick):
    """Square-matmul GFLOP/s per precision, measured now on this device: the ceiling MFU is quoted against.
    On CUDA fp32 means true fp32 (torch leaves TF32 off for matmuls by default), as the encoder's fp32 rows."""
    n, calls = (8192, 10) if device == "cuda" else ((1024, 3) if quick else (2048, 3))
    sides = {p: partial(repeat, calls, torch.matmul, *torch.randn(2, n, n, device=device, dtype=DTYPES[p]))
             for p in PRECISIONS[device]}
    seconds, _ = interleaved(sides, 3 if quick else 5, device)
    peak = {p: 2 * n ** 3 * calls / s / 1e9 for p, s in seconds.items()}
    return dict(peak, n=n), [[f"matmul peak {' / '.join(peak)} (GFLOP/s, {n}x{n})", slash(peak.values()), ""]]


def measure_render(quick):
    """Frames/s of the lean look, the full look (both through a `Renderer`) and the seed's physics.render call,
    interleaved on one physics; how far lean moves the pixels; and GL_RENDERER (llvmpipe: Mesa draws on the CPU)."""
    env = vr.make_env(0)
    vr.reset_env(env, 0)
    renderers = {"lean": vr.Renderer(SIZE, lean=True), "full": vr.Renderer(SIZE, lean=False), "seed": seed_frame}
    n = 5 if quick else 50
    seconds, _ = interleaved({k: partial(repeat, n, r, env.physics) for k, r in renderers.items()}, 3 if quick else 5)
    fps = {k: n / s for k, s in seconds.items()}
    diffs = []
    for _ in range(10):  # a short expert episode, drawn both ways
        lean, full = renderers["lean"](env.physics), renderers["full"](env.physics)
        diffs.append(np.abs(lean.astype(np.int16) - full).mean())
        env.step(vr.p_expert(env.physics))
    figures = {"fps": fps, "pixel_mean_abs_diff": float(np.mean(diffs)), "gl_renderer": renderers["lean"].gl_renderer()}
    return figures, [[f"rendering {SIZE}², lean / full look / seed's physics.render (frames/s)", slash(fps.values()),
                      f"{fps['lean'] / fps['full']:.1f}x lean vs full; pixels differ {np.mean(diffs):.0f}/255"]]


def measure_loops(encoder, envs, windows, quick):
    """Our loops and the seed's, interleaved. Collection, windows/s: ours (expert episodes in lockstep), the encoder
    alone at the same batch (at 1.0 of it, stepping and rendering hide behind it; issue 21's goal on a GPU: 0.9), the
    seed's (64-step episodes, forwards of 32). Live evaluation, control steps/s: ours (a BC policy, envs.n episodes
    encoded as one batch) and the seed's (one window a forward). The seed's model: fp16 weights on CUDA, as it did."""
    steps, seed_steps, seed_episodes, calls = (5, 5, 1, 2) if quick else (20, 64, 2, 5)
    torch.manual_seed(0)
    zeros, ones = np.zeros(encoder.dim, np.float32), np.ones(encoder.dim, np.float32)
    policy = vr.bc_policy(vr.bc_net(encoder.dim).eval(), zeros, ones)
    model = copy.deepcopy(encoder.model).half() if encoder.device == "cuda" else encoder.model
    seconds, _ = interleaved({
        "collect": partial(rollout, list(range(envs.n)), vr.expert_policy, encoder, envs, steps),
        "encoder": partial(repeat, calls, vr.encode, encoder, windows),
        "seed_collect": partial(seed_collection_loop, model, vr.make_env(0), [0], seed_steps),
        "eval": partial(rollout, list(range(envs.n)), policy, encoder, envs, steps),
        "seed_eval": partial(seed_eval_loop, model, policy, vr.make_env(0), range(seed_episodes), steps)},
        3, encoder.device)
    done = {"collect": envs.n * (steps + 1), "encoder": len(windows) * calls, "seed_collect": seed_steps,
            "eval": envs.n * steps, "seed_eval": seed_episodes * steps}  # windows; eval: control steps
    rate = {k: done[k] / s for k, s in seconds.items()}
    collect = [f"collection with {encoder.id} {encoder.precision}, batch {envs.n}: ours / the encoder alone / the "
               "seed's loop (windows/s)", slash((rate[k] for k in ("collect", "encoder", "seed_collect")), "{:.1f}"),
               f"{rate['collect'] / rate['encoder']:.2f} of the encoder; "
               f"{rate['collect'] / rate['seed_collect']:.1f}x the seed"]
    live = [f"live eval with {encoder.id}, {envs.n} episodes batched vs the seed's one-window loop (steps/s)",
            f"{rate['eval']:.1f} vs {rate['seed_eval']:.1f}", f"{rate['eval'] / rate['seed_eval']:.1f}x"]
    return {"encoder": encoder.id, "precision": encoder.precision, "per_s": rate}, [collect, live]


def measure_encoder(encoder, windows, peak, quick, compile=False):
    """Windows/s of one encoder at the batch of `windows`, interleaved: at each precision, or with compile (--compile)
    as it is against a copy under torch.compile (as --set compile=on), the compile (its first batch) timed first; MFU
    against this run's matmul peak at each side's precision; each side's lowest cosine to the first side's embedding."""
    flops = encoder_flops(encoder.model.config)
    figures = {"gflop_per_window": flops / 1e9, "batch": len(windows)}
    if compile:
        compiled = dataclasses.replace(encoder, model=copy.deepcopy(encoder.model))
        compiled.model.encoder = gpu.Compiled(compiled.model.encoder)
        vr.encode(compiled, windows[:1])  # its first call runs eagerly, building the rotary tables
        figures |= interleaved({"compile_s": partial(vr.encode, compiled, windows)}, 1, encoder.device, False)[0]
        sides = {encoder.precision: encoder, "compiled": compiled}
    else:
        precisions = ("fp32", "fp16", "half") if encoder.device == "cuda" else ("fp32", "bf16")
        sides = {p: vr.variant(encoder, p, batch_size=len(windows)) for p in precisions}
    seconds, z = interleaved({k: partial(vr.encode, e, windows) for k, e in sides.items()},
                             3 if quick or encoder.dim >= 1024 else 5, encoder.device)  # ViT-L: slow
    first = next(iter(sides))
    for k, s in seconds.items():  # issue 21: low precision must agree with fp32 (cosine >= 0.999, no inf)
        gflops, precision = len(windows) / s * flops / 1e9, sides[k].precision.replace("half", "fp16")
        figures[k] = {"windows_per_s": len(windows) / s, "mfu_measured_peak": gflops / peak[precision],
                      f"min_cosine_vs_{first}": float(torch.cosine_similarity(z[k], z[first]).min()),
                      "all_finite": bool(z[k].isfinite().all())}
    ratio = f"MFU {slash(100 * figures[k]['mfu_measured_peak'] for k in seconds)} % of the measured peak"
    if compile:
        ratio += f"; compile {figures['compile_s']:.0f} s for a {seconds[first] / seconds['compiled']:.2f}x gain"
    name = f"encoder {encoder.id} ({flops / 1e9:.1f} GFLOP/window), batch {len(windows)}, {' / '.join(seconds)}"
    return figures, [[name + " (windows/s)", slash((figures[p]["windows_per_s"] for p in seconds), "{:.2f}"), ratio]]


def measure_cem(device, peak, quick):
    """One CEM call for all episodes of a control step at the seed's sizes on the 1.58M-param mlp (D = 1024),
    interleaved: `cem` in fp32 and under each autocast; on CUDA also the planner as `plan` runs it with the 10 ms
    goal's settings ('mpc': MPC with an fp16 copy of the net, TF32 and its CUDA graph, standardising and returning
    actions to the host). The FLOP floor at the measured peak; how far each side moves the first action of the elite
    mean from fp32's (the same noise, but for 'mpc', which draws its noise up front)."""
    episodes, samples, elites, iterations = (2, 64, 8, 2) if quick else (20, 500, 50, 5)  # seed: 500, 50, 5
    settings = dict(horizon=10, samples=samples, elites=elites, iterations=iterations)  # seed: horizon 10
    torch.manual_seed(0)
    model = vr.Dynamics("mlp", 1024).to(device).eval().requires_grad_(False)
    z, z_goal = torch.randn(2, episodes, 1024).to(device)
    sides = {p: partial(vr.cem, vr.latent_cost(model, z, z_goal, "final", DTYPES[p]), episodes, device=device,
                        generator=torch.Generator(device).manual_seed(0), **settings) for p in PRECISIONS[device]}
    if device == "cuda":
        identity = np.zeros(1024, np.float32), np.ones(1024, np.float32)  # MPC standardises z: here to itself
        mpc = vr.MPC(model, dict(enumerate(z_goal.cpu().numpy())), identity, settings, dtype="bf16", graph=True)
        sides["mpc"] = partial(mpc, z.cpu().numpy(), {"seed": list(range(episodes)), "step": 0})
    seconds, results = interleaved(sides, 3 if quick or device == "cpu" else 5, device)
    params = sum(p.numel() for p in model.parameters())
    flops = 2 * params * samples * settings["horizon"] * iterations * episodes
    figures = dict(episodes=episodes, **settings, params=params, gflop_per_step=flops / 1e9)
    first = {p: torch.as_tensor(out).to(device) if p == "mpc" else out[1][:, 0] for p, out in results.items()}
    for p, s in seconds.items():
        figures[p] = {"ms": s * 1000, "floor_ms": flops / peak[p if p in peak else "fp16"] / 1e6,
                      "first_action_abs_diff": float((first[p] - first["fp32"]).abs().max())}
    return figures, [[f"CEM step, {episodes} episodes x {samples} x {settings['horizon']} x {iterations} on the mlp, "
                      f"{' / '.join(seconds)} (ms)", slash(figures[p]["ms"] for p in seconds),
                      f"floor {slash(figures[p]['floor_ms'] for p in seconds)} ms; first action moves "
                      f"{slash((figures[p]['first_action_abs_diff'] for p in seconds), '{:.2f}')}"]]


def measure_training(device, quick):
    """One epoch of BC and one of the mlp dynamics (train_bc and train_dynamics, recipe `ours`) on E episodes x T
    steps x D = 1024 synthetic z on the device, interleaved. Full: 500 x 200 = 100k transitions, no warm-up epoch."""
    E, T, D = (20, 50, 1024) if quick else (500, 200, 1024)
    rng = np.random.default_rng(0)
    data = {"z": rng.standard_normal((E, T + 1, D), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (E, T, 2)).astype(np.float32)}
    args = argparse.Namespace(**vr.RECIPES["ours"], seed=0, device=device, epochs=1)
    sides = {"bc": partial(vr.train_bc, data, args), "dynamics": partial(vr.train_dynamics, "mlp", data, args, 1)}
    with contextlib.redirect_stdout(io.StringIO()):  # the one-line-per-epoch logs
        seconds, _ = interleaved(sides, 3, device, warmup=quick)
    figures = {"transitions": E * T, "dim": D, **{f"{k}_epoch_s": s for k, s in seconds.items()}}
    return figures, [[f"one epoch on {E * T:,} x {D} synthetic transitions, BC / mlp dynamics (s)",
                      slash(seconds.values(), "{:.2f}"), f"{slash(E * T / s for s in seconds.values())} transitions/s"]]


# ---- The run -----------------------------------------------------------------------------------------------------
def record(result, rows, out, key, measure, *inputs):
    """Run one measurement; keep its figures under `key` (and return them), its rows for the table, its wall time;
    then write bench.json and bench.md in `out`, so a run cut short keeps every measurement it finished."""
    t0 = time.perf_counter()
    result[key], new = measure(*inputs)
    result["bench_seconds"][key] = time.perf_counter() - t0
    for row in new:
        print(f"bench: {row[0]}: {row[1]} | {row[2]} ({result['bench_seconds'][key]:.0f} s)", flush=True)
    rows += new
    gl = result.get("render", {}).get("gl_renderer", "not measured")
    save_json(os.path.join(out, "bench.json"), result)
    write_text(os.path.join(out, "bench.md"), f"Device: {result['device']} (GL_RENDERER: {gl}), torch "
               f"{result['torch']}, load average {result['load_average_at_start']:.2f} at the start. Made by "
               f"`{result['command']}`.\n\n{md_table(['measure', 'result', 'ratio'], rows)}\n")
    return result[key]


def main(argv=None):
    """Every measurement on one device, each row printed as it lands and written to bench.json and bench.md."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    quick, batch = args.quick, 8 if args.quick else BATCH
    out = args.out or ("runs/bench-quick" if quick else RESULTS)  # a smoke run never overwrites committed numbers
    load = os.getloadavg()[0]  # above 0.5, other jobs share the cores and ratios drift (ViT-L: 42% MFU, alone 88%)
    result, rows = {"device": device_name(device), "torch": torch.__version__, "command": args.command,
                    "load_average_at_start": load, "torch_threads": torch.get_num_threads(), "bench_seconds": {}}, []
    print(f"bench: {result['device']}, torch {torch.__version__}{', quick' if args.quick else ''}", flush=True)
    if load > 0.5:
        print(f"bench: warning: load average {load:.2f} at the start: other processes share this machine, so "
              f"{'CPU-side ' if device == 'cuda' else ''}timings are noisy; run it alone to commit", flush=True)
    peak = record(result, rows, out, "matmul_peak_gflops", matmul_peak, device, quick)

    def run(key, *measurement):
        if not args.only or key in args.only:
            record(result, rows, out, key, *measurement)
    run("render", measure_render, quick)
    tiny = vr.load_encoder("tiny", device, "fp32", batch_size=batch)  # fp32 weights; the pipeline picks its own
    vitl = None if quick or not {"loops_vs_seed", "encoder_vitl", "compile"} & set(args.only or MEASURES) else \
        vitl_encoder(device, batch)
    pipeline = vr.variant(vitl if vitl is not None and device == "cuda" else tiny, "auto")  # ViT-L on a GPU
    envs = vr.Envs(batch, SIZE, lean=True, expert="p")  # seed: the P-controller drives collection
    windows = torch.from_numpy(np.repeat(envs.reset(range(batch))["frame"][:, None], vr.WINDOW, 1)).to(device)
    run("loops_vs_seed", measure_loops, pipeline, envs, windows, quick)
    run("encoder_tiny", measure_encoder, tiny, windows, peak, quick)
    if vitl is not None:  # ViT-L on a CPU takes seconds a window: batch 1 there
        run("encoder_vitl", measure_encoder, vitl, windows[:batch if device == "cuda" else 1], peak, quick)
    if args.compile:
        run("compile", measure_encoder, pipeline, windows, peak, quick, True)
    run("cem_ms_per_step", measure_cem, device, peak, quick)
    run("train_epoch", measure_training, device, quick)
    print(open(os.path.join(out, "bench.md")).read() + f"bench: wrote {out}/bench.json and bench.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
