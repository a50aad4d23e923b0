"""Run vjepa_reacher.py on Modal GPUs: sharded collection + encoding, merge, optional Hub upload, BC + eval.

    pip install modal && modal setup                         # once: the client is all a laptop needs; log in
    modal run modal_app.py                                   # seed Phase 2b: 10 x 500 episodes, epsilon 0.3, p expert
    modal run modal_app.py                                   # again after a failure: collects only missing shards
    modal run modal_app.py --episodes 500 --shards 1 --epsilon 0 --expert jacobian --evaluate   # Phase 1 on 1 GPU
    modal run modal_app.py --gpu L4 --force                  # another GPU type; redo every stage from scratch
    modal secret create huggingface HF_TOKEN=hf_...          # once, only for --hf-repo
    modal run modal_app.py --hf-repo you/vjepa2-reacher      # also upload the merged dataset
    modal volume get vjepa-reacher runs/modal ./runs/modal   # fetch the run folder

Nothing here re-implements the pipeline: every job builds the command line a local user would type and calls
vjepa_reacher.main, so the cloud and local paths cannot drift apart. Not yet run on a real Modal account.
"""
import dataclasses
import os

import modal

# ----------------------------------------------------------------------------------------------
# Image, volume and constants
# ----------------------------------------------------------------------------------------------
DEFAULT_ENCODER = "facebook/vjepa2-vitl-fpc64-256"  # vjepa_reacher's default, spelled out: a laptop needs only modal
# The seed's A10G: Modal's GPU guide (modal.com/docs/guide/gpu) now lists it as `A10` (24 GB, Ampere) and its
# dynamic-config guide uses gpu="A10". The client never checks the name (modal 1.6.4 _utils/function_utils.py
# parse_gpu_config only upper-cases it); Modal's server does, when the app starts.
GPU = "A10"
RENDER_WORKERS = 6  # --render-workers: MuJoCo render processes per GPU container (a guess: not measured on Modal)
GPU_CPUS = RENDER_WORKERS + 2  # a core per render process, one for the main process (physics, encoder), one for I/O
VOLUME = "/vol"  # run folders live on one modal.Volume; shards write only their own folder

volume = modal.Volume.from_name("vjepa-reacher", create_if_missing=True)
# The runtime lines of requirements.txt (test_modal_* checks they match), without modal and pytest. On Linux x86_64,
# torch from PyPI is the CUDA build (it pulls NVIDIA's runtime wheels), which is what a GPU container wants; the
# local CPU build comes from another index.
PACKAGES = ["torch==2.13.0", "mujoco==3.17.0", "dm_control==1.0.50", "transformers>=4.53,<6", "safetensors>=0.4",
            "numpy>=1.26", "tqdm>=4.66", "matplotlib>=3.8", "pillow>=10.1", "huggingface_hub>=0.30"]
# MUJOCO_GL=egl makes dm_control load EGL only (no osmesa fallback). libglvnd dispatches EGL to a vendor library named
# by a JSON file; Modal's GPU containers provide the NVIDIA driver libraries (libEGL_nvidia among them) but a slim
# image has no NVIDIA vendor file, so write the standard one (as MuJoCo's Colab notebook does).
NVIDIA_EGL_ICD = '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}'
image = (modal.Image.debian_slim(python_version="3.11")
         .apt_install("libegl1", "libgl1", "libglvnd0")
         .run_commands("mkdir -p /usr/share/glvnd/egl_vendor.d",
                       f"echo '{NVIDIA_EGL_ICD}' > /usr/share/glvnd/egl_vendor.d/10_nvidia.json")
         .pip_install(*PACKAGES)
         .env({"MUJOCO_GL": "egl"})  # the Hub cache stays per container: N shards must not write one shared copy
         .add_local_python_source("vjepa_reacher"))
app = modal.App("vjepa-reacher", image=image)

with image.imports():  # imported inside containers; a laptop without torch skips it
    import vjepa_reacher


@dataclasses.dataclass
class Job:
    """The options every job turns into the script's command line."""
    out: str
    """run folder, on the volume"""
    episodes: int = 5000
    shards: int = 10
    epsilon: float = 0.3
    expert: str = "p"
    encoder: str = DEFAULT_ENCODER
    steps: int = 200
    seed: int = 0
    batch_size: int = 32
    store_dtype: str = "float32"
    eval_episodes: int = 100
    force: bool = False
    """redo stages whose outputs exist (`--force`)"""
    device: str = "cuda"
    """GPU jobs pass `--device cuda`, so a container without CUDA fails at once instead of encoding on the CPU"""
    render_workers: int | None = RENDER_WORKERS
    """`--render-workers`; None leaves the option out"""


# ----------------------------------------------------------------------------------------------
# Jobs: plain functions that call the script's CLI; the Modal functions below only wrap them
# ----------------------------------------------------------------------------------------------
def cli(stage, job, gpu=False):
    """The command line a local user would type (after `python vjepa_reacher.py`) for `stage`."""
    argv = [stage, "--out", job.out, "--encoder", job.encoder, "--expert", job.expert, "--epsilon", str(job.epsilon),
            "--episodes", str(job.episodes), "--eval-episodes", str(job.eval_episodes), "--steps", str(job.steps),
            "--seed", str(job.seed), "--batch-size", str(job.batch_size), "--store-dtype", job.store_dtype]
    if gpu:
        argv += ["--device", job.device]
        if job.render_workers is not None:
            argv += ["--render-workers", str(job.render_workers)]
    return argv + ["--force"] * job.force


def run_script(argv):
    """Call the script's CLI in-process; a non-zero exit becomes an exception the caller sees."""
    code = vjepa_reacher.main(argv)
    if code:
        raise RuntimeError(f"`python vjepa_reacher.py {' '.join(argv)}` exited with {code}")


def shard_dir(job, shard):
    name = vjepa_reacher.dataset_name(job.expert, job.epsilon)
    return os.path.join(job.out, "shards", name, f"shard_{shard}of{job.shards}")


def finished_shards_job(job):
    """Shards whose folder has meta.json, which the script writes last: they need no re-run."""
    return [i for i in range(job.shards) if os.path.exists(os.path.join(shard_dir(job, i), "meta.json"))]


def collect_job(job, shard):
    """Episodes shard, shard+N, ... of the run's seeds, into the shard's own folder (with N > 1 nothing else)."""
    run_script(cli("collect", job, gpu=True) + ["--shard", f"{shard}/{job.shards}"])
    return shard


def merge_job(job):
    """Stream the shards into one memory-mappable dataset; the script refuses missing or overlapping shards."""
    run_script(cli("merge", job))
    return os.path.join(job.out, "data", vjepa_reacher.dataset_name(job.expert, job.epsilon))


def bc_eval_job(job):
    """Phase 1: BC on the merged data, then live evaluation with the encoder at every step."""
    run_script(cli("bc", job, gpu=True))
    run_script(cli("eval", job, gpu=True))


def require_cuda():
    """Fail in seconds, not after an hour of CPU encoding, when a GPU container cannot use CUDA."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA in this GPU container (torch {torch.__version__}, built for CUDA "
                           f"{torch.version.cuda}): the driver may be older than that CUDA, or --gpu named no GPU")


def on_volume(fn, *args):
    """Run fn on the volume's latest state; commit even when it fails, so finished episodes persist."""
    volume.reload()
    try:
        return fn(*args)
    finally:
        volume.commit()


# ----------------------------------------------------------------------------------------------
# Modal functions: no secrets here, because `modal run` resolves every declared secret at start
# ----------------------------------------------------------------------------------------------
@app.function(gpu=GPU, cpu=GPU_CPUS, volumes={VOLUME: volume}, timeout=4 * 3600)
def collect_shard(job: Job, shard: int) -> int:
    require_cuda()
    return on_volume(collect_job, job, shard)


@app.function(gpu=GPU, cpu=GPU_CPUS, volumes={VOLUME: volume}, timeout=4 * 3600)
def bc_eval(job: Job):
    require_cuda()
    on_volume(bc_eval_job, job)


@app.function(volumes={VOLUME: volume}, memory=32768, timeout=3 * 3600)  # CPU only; merge streams via memmap
def merge(job: Job) -> str:
    return on_volume(merge_job, job)


@app.function(volumes={VOLUME: volume}, timeout=600)
def finished_shards(job: Job) -> list[int]:
    volume.reload()
    return finished_shards_job(job)


@app.function(volumes={VOLUME: volume}, timeout=3 * 3600)  # HF_TOKEN comes from the secret main attaches
def upload(data_dir: str, hf_repo: str) -> str:
    """Upload the merged dataset as a Hub dataset repo (upload_large_folder is gone in huggingface_hub 2.x)."""
    from huggingface_hub import HfApi
    volume.reload()
    api = HfApi()  # reads HF_TOKEN from the environment
    api.create_repo(hf_repo, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=data_dir, repo_id=hf_repo, repo_type="dataset",
                      commit_message=f"vjepa-reacher dataset {os.path.basename(data_dir)}")
    return f"https://huggingface.co/datasets/{hf_repo}"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def run_pipeline(job, collect_shards, merge, upload=None, evaluate=None, done_shards=lambda job: []):
    """Collect the missing shards, merge, then optionally upload and evaluate; returns the merged data folder.

    The remote calls come in as arguments so a test can run this locally:
    collect_shards(job, shards) -> one result per shard, in order, an exception for each that failed;
    merge(job) -> data folder; upload(data_dir) -> URL; evaluate(job); done_shards(job) -> finished shards.
    """
    if not 0 <= job.epsilon <= 1 or job.episodes < 1 or not 1 <= job.shards <= job.episodes:
        raise SystemExit("error: need episodes >= shards >= 1 and 0 <= epsilon <= 1")
    done = set() if job.force else set(done_shards(job))
    todo = [i for i in range(job.shards) if i not in done]
    if done:
        print(f"{len(done)} of {job.shards} shards already finished; collecting {todo}")
    failed = []
    for i, result in zip(todo, collect_shards(job, todo) if todo else []):
        if isinstance(result, BaseException):
            failed.append(i)
            print(f"shard {i}/{job.shards} failed: {result!r}")
        else:
            print(f"shard {i}/{job.shards} done")
    if failed:
        raise SystemExit(f"error: {len(failed)} of {job.shards} shards failed ({failed}); the others are saved: "
                         "re-run the same command to collect only the missing ones")
    data_dir = merge(job)
    print("merged ->", data_dir)
    if upload:
        print("uploaded ->", upload(data_dir))
    if evaluate:
        evaluate(job)
        print(f"eval done: `modal volume get vjepa-reacher {job.out.removeprefix(VOLUME + '/')}/report.md .`")
    return data_dir


@app.local_entrypoint()
def main(episodes: int = 5000, shards: int = 10, epsilon: float = 0.3, expert: str = "p",
         encoder: str = DEFAULT_ENCODER, gpu: str = GPU, steps: int = 200, seed: int = 0, batch_size: int = 32,
         store_dtype: str = "float32", run: str = "modal", hf_repo: str = "", evaluate: bool = False,
         eval_episodes: int = 100, force: bool = False):
    job = Job(f"{VOLUME}/runs/{run}", episodes=episodes, shards=shards, epsilon=epsilon, expert=expert, encoder=encoder,
              steps=steps, seed=seed, batch_size=batch_size, store_dtype=store_dtype, eval_episodes=eval_episodes,
              force=force)
    # with_options sends a fresh resource request, so the CPU count goes with the GPU name.
    collect_gpu, bc_eval_gpu = (f.with_options(gpu=gpu, cpu=GPU_CPUS) for f in (collect_shard, bc_eval))
    uploader = None
    if hf_repo:  # the secret is attached here, so only runs that upload need it (modal 1.6.4 Function.with_options)
        uploader = upload.with_options(secrets=[modal.Secret.from_name("huggingface", required_keys=["HF_TOKEN"])])
    run_pipeline(job,
                 # return_exceptions: one failed shard does not cancel the others
                 collect_shards=lambda job, todo: collect_gpu.starmap([(job, i) for i in todo], return_exceptions=True),
                 merge=merge.remote,
                 upload=(lambda data_dir: uploader.remote(data_dir, hf_repo)) if hf_repo else None,
                 evaluate=bc_eval_gpu.remote if evaluate else None,
                 done_shards=finished_shards.remote)
