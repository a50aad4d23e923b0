"""Run vjepa_reacher.py on Modal GPUs: sharded collection + encoding, merge, then optionally BC + eval.

    pip install modal && modal setup                          # once: the client is all a laptop needs; log in
    modal run modal_app.py --run smoke --shards 2 --args "--encoder tiny --episodes 8"   # smoke: 2 x 4 episodes
    modal run modal_app.py                                    # Phase 1: 500 jacobian demos, ViT-L, 10 A10 shards
    modal run modal_app.py --run seed --shards 1 --evaluate --args "--recipe seed"   # the seed's recipe, + BC
    mkdir -p runs && modal volume get vjepa-reacher runs/modal runs   # fetch runs/modal (--force: again)

README.md lists the rest (Phase 2b, another look, a Hub upload with `hf upload`). `--args` holds the script's
options as typed after `python vjepa_reacher.py collect`, checked by its parser (here if vjepa_reacher imports,
else in the first container, a CPU one); `--run RUN` is the run folder, runs/RUN on the volume. Jobs call
vjepa_reacher.main with the command line a local user would type, so the two cannot drift apart.
"""
import contextlib
import dataclasses
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import modal

# ---- Image, volume and constants ---------------------------------------------------------------------------------
# The seed's A10G, `A10` in modal.com/docs/guide/gpu; only Modal's server checks the name (not the 1.6.4 client).
GPU = "A10"
# One core steps, renders and feeds the GPU (render processes did not pay); the other takes I/O and OSMesa's 2nd thread.
GPU_CPUS = 2
VOLUME = "/vol"  # run folders live on one modal.Volume; shards write only their own folder
RESERVED = {"out": "--run", "shard": "--shards", "seeds": "one --run per seed", "device": "--gpu"}  # set here

volume = modal.Volume.from_name("vjepa-reacher", create_if_missing=True)
# requirements.txt's runtime lines (a test checks they match); on Linux x86_64 PyPI's torch is the CUDA build.
PACKAGES = ["torch==2.13.0", "mujoco==3.17.0", "dm_control==1.0.50", "transformers>=4.53,<6", "safetensors>=0.4",
            "numpy>=1.26", "scipy>=1.11", "tqdm>=4.66", "matplotlib>=3.8", "pillow>=10.1", "huggingface_hub>=0.30"]
SOURCES = ["vjepa_reacher", "gpu", "report", "rope", "sac", "imagine"]  # the script and the leaves it imports
# EGL through libglvnd, which dispatches to a vendor library named by a JSON file: Modal's GPU containers mount the
# NVIDIA driver libraries (libEGL_nvidia among them) but a slim image has no NVIDIA vendor file, so write the
# standard one (as MuJoCo's Colab notebook does). libosmesa6: the CPU fallback where no EGL context works.
APT = ["libegl1", "libgl1", "libglvnd0", "libosmesa6"]
NVIDIA_EGL_ICD = '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}'
image = (modal.Image.debian_slim(python_version="3.11")
         .apt_install(*APT)
         .run_commands("mkdir -p /usr/share/glvnd/egl_vendor.d",
                       f"echo '{NVIDIA_EGL_ICD}' > /usr/share/glvnd/egl_vendor.d/10_nvidia.json")
         .pip_install(*PACKAGES)  # the Hub cache stays per container: N shards must not write one shared copy
         .add_local_python_source(*SOURCES))
app = modal.App("vjepa-reacher", image=image)


def gl_backend(check="import mujoco; mujoco.GLContext(64, 64).make_current()"):
    """egl when `check` makes MuJoCo's EGL context current in a subprocess (frames drawn on the GPU), else osmesa
    (drawn by the CPU, llvmpipe); the check's error, if any, is in the log. A library that loads is not a context
    that works (a driver without EGL, no device), and a failed EGL start may crash or hang its process."""
    argv, env = [sys.executable, "-c", check], dict(os.environ, MUJOCO_GL="egl")
    try:
        return "osmesa" if subprocess.run(argv, env=env, timeout=120).returncode else "egl"
    except subprocess.TimeoutExpired:
        return "osmesa"


if not modal.is_local():  # in a container: before vjepa_reacher (and dm_control, which reads it once) import
    os.environ["MUJOCO_GL"] = gl_backend()
vjepa_reacher = None  # stays None on a laptop without torch: image.imports keeps the ImportError for containers
with image.imports():
    import vjepa_reacher


@dataclasses.dataclass
class Job:
    """A run: its folder on the volume, the script's options (`--args`, split as a shell would), the shard count,
    and the device GPU jobs pass (cuda: a container without CUDA fails at once instead of encoding on the CPU)."""
    out: str
    args: list = dataclasses.field(default_factory=list)
    shards: int = 10
    device: str = "cuda"


# ---- Jobs: plain functions that call the script's CLI; the Modal functions below only wrap them ------------------
def cli(stage, job, shard=None, gpu=False):
    """The command line a local user would type (after `python vjepa_reacher.py`) for `stage`."""
    sharding = ["--shard", f"{shard}/{job.shards}"] if shard is not None else []
    return [stage, *job.args, "--out", job.out, *sharding, *(["--device", job.device] if gpu else [])]


class Tail(io.TextIOBase):
    """stderr's stand-in: passes what the script writes on to `echo` (None: nowhere) and keeps the last 4 kB."""
    def __init__(self, echo):
        self.echo, self.text = echo, ""

    def write(self, s):
        self.text = (self.text + s)[-4096:]
        return self.echo.write(s) if self.echo else len(s)


def last_line(text):
    """The last line of a message, without the `vjepa_reacher.py: error: ` that argparse or main put before it."""
    return re.sub(r"^(\S+: )?error: ", "", str(text).strip().rpartition("\n")[2].strip())


def call_script(fn, argv, echo=True):
    """fn(argv), fn being vjepa_reacher.main or parse_args. A non-zero exit, or the SystemExit of a bad option,
    becomes a RuntimeError carrying the script's last stderr line: modal's return_exceptions catches Exception,
    not SystemExit, and a SystemExit inside starmap hangs the map (modal 1.6.4 parallel_map.py ~544)."""
    tail = Tail(sys.stderr if echo else None)
    try:
        with contextlib.redirect_stderr(tail):
            result = fn(argv)
    except SystemExit as e:
        if not e.code:
            raise  # --help
        result = e.code
    if isinstance(result, (int, str)) and result:
        raise RuntimeError(last_line(tail.text) or f"`python vjepa_reacher.py {shlex.join(argv)}` exited with {result}")
    return result


def parse_job(job):
    """The script's own parser on the job's options; refuses those this file sets itself."""
    args = call_script(vjepa_reacher.parse_args, cli("collect", job, shard=0, gpu=True), echo=False)
    reserved = sorted(vjepa_reacher.given_options(["collect", *job.args]) & set(RESERVED))
    if reserved:
        raise RuntimeError(f"--args may not hold --{reserved[0]}: modal_app sets it ({RESERVED[reserved[0]]})")
    if not 1 <= job.shards <= args.episodes:
        raise RuntimeError(f"--shards must be between 1 and --episodes ({args.episodes}), got {job.shards}")
    return args


def expected_meta(args, shard, shards):
    """What shard `shard`'s meta.json holds if this job made it (as vjepa_reacher.stage_collect makes it)."""
    seeds = vjepa_reacher.episode_seeds("explore" if args.epsilon > 0 else "collect", args.episodes, args.seed,
                                        args.episode_seeds == "seed")
    render = "none" if args.encoder == "state" else f"{args.render}@{args.frame_size}"  # vjepa_reacher.render_mode
    return {"encoder": args.encoder, "render": render, "steps": args.steps, "expert": args.expert,
            "epsilon": args.epsilon, "seeds": seeds[shard::shards]}


def shard_todo(args, job, root, shard):
    """True if the shard needs a container: no meta.json, or other seeds (the script resumes, collecting only the
    missing episodes). Another encoder, render or steps: refused, as the script's check_meta would, before any GPU."""
    path = os.path.join(root, f"shard_{shard}of{job.shards}", "meta.json")
    if args.force or not os.path.exists(path):
        return True
    meta, want = vjepa_reacher.load_json(path), expected_meta(args, shard, job.shards)
    got = dict(meta, encoder=meta.get("encoder", {}).get("id"))
    wrong = [k for k in want if got.get(k) != want[k]]
    if wrong and wrong != ["seeds"]:
        raise RuntimeError(f"{os.path.dirname(path)} was made with {wrong[0]}={got.get(wrong[0])}, this job has "
                           f"{want[wrong[0]]}: pass the same options, or another --run (a new run folder), or "
                           f"--force in --args (it deletes the episodes in {root} and collects them anew)")
    return wrong == ["seeds"]


def todo_shards_job(job):
    """Check the options, then list the shards to collect. Shards of another --shards count hold other seeds per
    folder, so they are refused (merge would find seeds twice); --force deletes them and collects anew."""
    args = parse_job(job)
    root = os.path.join(job.out, "shards", vjepa_reacher.dataset_name(args.expert, args.epsilon))
    others = [d for d in sorted(glob.glob(os.path.join(root, "shard_*of*"))) if not d.endswith(f"of{job.shards}")]
    if others and not args.force:
        count = others[0].rpartition("of")[2]
        raise RuntimeError(f"{root} holds shards of --shards {count}, not {job.shards}: pass --shards {count}, or "
                           f"another --run (a new run folder), or --force in --args (deletes them all, collects anew)")
    for d in others:
        shutil.rmtree(d)
    return [i for i in range(job.shards) if shard_todo(args, job, root, i)]


def collect_job(job, shard):
    """Episodes shard, shard+N, ... of the run's seeds, into the shard's own folder (with N > 1 nothing else)."""
    call_script(vjepa_reacher.main, cli("collect", job, shard=shard, gpu=True))


def merge_job(job):
    """Stream the shards into one memory-mappable dataset; the script refuses missing or overlapping shards."""
    args = parse_job(job)
    call_script(vjepa_reacher.main, cli("merge", job))
    return os.path.join(job.out, "data", vjepa_reacher.dataset_name(args.expert, args.epsilon))


def bc_eval_job(job):
    """Phase 1: BC on the merged data, then live evaluation with the encoder at every step."""
    call_script(vjepa_reacher.main, cli("bc", job, gpu=True))
    call_script(vjepa_reacher.main, cli("eval", job, gpu=True))


def on_volume(fn, *args):
    """Run fn on the volume's latest state; commit even when it fails, so finished episodes persist."""
    volume.reload()
    try:
        return fn(*args)
    finally:
        volume.commit()


# ---- Modal functions: plain wrappers of the jobs on the volume ------------------------------------------------
@app.function(gpu=GPU, cpu=GPU_CPUS, volumes={VOLUME: volume}, timeout=4 * 3600)
def collect_shard(job: Job, shard: int):
    print(f"MUJOCO_GL={os.environ['MUJOCO_GL']}: the {'GPU' if os.environ['MUJOCO_GL'] == 'egl' else 'CPU'} draws")
    on_volume(collect_job, job, shard)


@app.function(gpu=GPU, cpu=GPU_CPUS, volumes={VOLUME: volume}, timeout=4 * 3600)
def bc_eval(job: Job):
    on_volume(bc_eval_job, job)


@app.function(volumes={VOLUME: volume}, memory=32768, timeout=3 * 3600)  # CPU only; merge streams via memmap
def merge(job: Job) -> str:
    return on_volume(merge_job, job)


@app.function(volumes={VOLUME: volume}, timeout=600)  # CPU only: checks options and shards before any GPU starts
def todo_shards(job: Job) -> list[int]:
    return on_volume(todo_shards_job, job)


# ---- Entry point -------------------------------------------------------------------------------------------------
def step(what, fn, *args):
    """fn(*args); an exception ends the run with one line naming the step (its traceback is in the logs)."""
    try:
        return fn(*args)
    except Exception as e:
        raise SystemExit(f"error: {what}: {last_line(e) or repr(e)}") from None


def run_pipeline(job, todo_shards, collect_shards, merge, evaluate=None):
    """Check options and shards, collect the shards still to do, merge, then optionally evaluate.

    The remote calls come in as arguments so a test can run this locally: todo_shards(job) -> shards to collect;
    collect_shards(job, shards) -> one result per shard, in order, an exception for each that failed;
    merge(job) -> data folder; evaluate(job). Returns the merged data folder."""
    todo = step("check", todo_shards, job)
    if len(todo) < job.shards:
        print(f"{job.shards - len(todo)} of {job.shards} shards already finished with these options; collecting {todo}")
    failed = {}
    for i, result in zip(todo, collect_shards(job, todo) if todo else []):
        if isinstance(result, BaseException):
            failed[i] = last_line(result) or repr(result)
        print(f"shard {i}/{job.shards} " + (f"failed: {failed[i]}" if i in failed else "done"))
    if failed:  # a rerun with --force would delete the shards that finished
        rerun = "the same command without --force in --args" if "--force" in job.args else "the same command"
        raise SystemExit(f"error: {len(failed)} of {job.shards} shards failed ({sorted(failed)}; first: "
                         f"{failed[min(failed)]}); the others are saved: re-run {rerun} to collect the rest")
    data_dir = step("merge", merge, job)
    print("merged ->", data_dir)
    if evaluate:
        step("bc + eval", evaluate, job)
    # modal 1.6.4's `volume get` puts REMOTE's last part inside LOCAL, which must be a folder that exists
    print(f"fetch it: mkdir -p runs && modal volume get vjepa-reacher {os.path.relpath(job.out, VOLUME)} runs")
    return data_dir


@app.local_entrypoint()
def main(args: str = "", shards: int = 10, gpu: str = GPU, run: str = "modal", evaluate: bool = False):
    job = Job(f"{VOLUME}/runs/{run}", step("--args", shlex.split, args), shards)
    if vjepa_reacher is not None:  # where the script imports, bad options fail here; else in `todo_shards`
        step("--args", parse_job, job)
    # with_options sends a fresh resource request, so the CPU count goes with the GPU name.
    collect_gpu, bc_eval_gpu = (f.with_options(gpu=gpu, cpu=GPU_CPUS) for f in (collect_shard, bc_eval))
    run_pipeline(job, todo_shards=todo_shards.remote,  # return_exceptions: a failed shard does not cancel the others
                 collect_shards=lambda job, todo: collect_gpu.starmap([(job, i) for i in todo], return_exceptions=True),
                 merge=merge.remote, evaluate=bc_eval_gpu.remote if evaluate else None)
