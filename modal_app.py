"""Run vjepa_reacher.py's own functions on Modal GPUs: sharded collection + encoding, merge, Hub upload, eval.

    modal setup                                              # once: log in
    modal secret create huggingface HF_TOKEN=hf_...          # once, only for --hf-repo
    modal run modal_app.py                                   # seed Phase 2b: 10 x 500 episodes, epsilon 0.3, p expert
    modal run modal_app.py --episodes 500 --shards 1 --epsilon 0 --expert jacobian --evaluate   # Phase 1 on 1 GPU
    modal run modal_app.py --hf-repo you/vjepa2-reacher      # also upload the merged dataset
    modal volume get vjepa-reacher runs/modal ./runs/modal   # fetch the run folder

Nothing here re-implements the pipeline: each job builds the same command line a local user would type and
calls vjepa_reacher.main, so the cloud and local paths cannot drift apart.
"""
import os

import modal

import vjepa_reacher

VOLUME = "/vol"  # run folders and the Hugging Face model cache live on one modal.Volume
volume = modal.Volume.from_name("vjepa-reacher", create_if_missing=True)
image = (modal.Image.debian_slim(python_version="3.11")
         .apt_install("libegl1", "libgl1", "libglvnd0", "libosmesa6")  # headless MuJoCo: EGL on the GPU, osmesa fallback
         .pip_install_from_requirements(os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt"))
         .env({"MUJOCO_GL": "egl", "HF_HOME": f"{VOLUME}/hf"})
         .add_local_python_source("vjepa_reacher"))
app = modal.App("vjepa-reacher", image=image)


def run_script(argv):
    """Call the script's CLI in-process; a non-zero exit becomes an exception the caller sees."""
    code = vjepa_reacher.main(argv)
    if code:
        raise RuntimeError(f"`python vjepa_reacher.py {' '.join(argv)}` exited with {code}")


def collect_shard_job(out, shard, shards, episodes, epsilon, expert, encoder, steps=200, seed=0, batch_size=32,
                      store_dtype="float32"):
    """One shard: episodes shard, shard+shards, ... of the run's seed range, written to out/shards/."""
    run_script(["collect", "--out", out, "--shard", f"{shard}/{shards}", "--episodes", str(episodes),
                "--epsilon", str(epsilon), "--expert", expert, "--encoder", encoder, "--steps", str(steps),
                "--seed", str(seed), "--batch-size", str(batch_size), "--store-dtype", store_dtype])
    return shard


def merge_job(out, episodes, epsilon, expert, encoder, steps=200, seed=0):
    """Stream the shards into one memory-mappable dataset; refuses missing shards and overlapping seeds."""
    run_script(["merge", "--out", out, "--episodes", str(episodes), "--epsilon", str(epsilon), "--expert", expert,
                "--encoder", encoder, "--steps", str(steps), "--seed", str(seed)])
    return os.path.join(out, "data", vjepa_reacher.dataset_name(expert, epsilon))


@app.cls(gpu="A10G", volumes={VOLUME: volume}, timeout=4 * 3600)  # seed: A10G; --gpu overrides
class GPUWorker:
    @modal.method()
    def collect(self, out, shard, shards, episodes, epsilon, expert, encoder, steps, seed, batch_size, store_dtype):
        volume.reload()
        try:
            return collect_shard_job(out, shard, shards, episodes, epsilon, expert, encoder, steps, seed, batch_size,
                                     store_dtype)
        finally:
            volume.commit()  # finished episodes persist even if the shard fails; a re-run resumes

    @modal.method()
    def evaluate(self, out, encoder, expert, epsilon, eval_episodes, steps, seed):
        """Phase 1 BC on the merged data + live evaluation with V-JEPA encoding at every step."""
        volume.reload()
        try:
            run_script(["bc", "--out", out, "--encoder", encoder, "--expert", expert, "--epsilon", str(epsilon),
                        "--steps", str(steps), "--seed", str(seed)])
            run_script(["eval", "--out", out, "--encoder", encoder, "--expert", expert, "--steps", str(steps),
                        "--eval-episodes", str(eval_episodes), "--seed", str(seed)])
        finally:
            volume.commit()


@app.function(volumes={VOLUME: volume}, memory=32768, timeout=3 * 3600)  # CPU only; merge streams via memmap
def merge(out, episodes, epsilon, expert, encoder, steps, seed):
    volume.reload()
    data_dir = merge_job(out, episodes, epsilon, expert, encoder, steps, seed)
    volume.commit()
    return data_dir


@app.function(volumes={VOLUME: volume}, timeout=3 * 3600,
              secrets=[modal.Secret.from_name("huggingface", required_keys=["HF_TOKEN"])])
def upload(data_dir, hf_repo):
    """Upload the merged dataset as a Hub dataset repo (upload_large_folder is gone in huggingface_hub 2.x)."""
    from huggingface_hub import HfApi
    volume.reload()
    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(hf_repo, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=data_dir, repo_id=hf_repo, repo_type="dataset",
                      commit_message=f"vjepa-reacher dataset {os.path.basename(data_dir)}")
    return f"https://huggingface.co/datasets/{hf_repo}"


@app.local_entrypoint()
def main(episodes: int = 5000, shards: int = 10, epsilon: float = 0.3, expert: str = "p",
         encoder: str = vjepa_reacher.DEFAULT_ENCODER, gpu: str = "A10G", steps: int = 200, seed: int = 0,
         batch_size: int = 32, store_dtype: str = "float32", run: str = "modal", hf_repo: str = "",
         evaluate: bool = False, eval_episodes: int = 100):
    if not 0 <= epsilon <= 1 or episodes < 1 or shards < 1 or shards > episodes:
        raise SystemExit("error: need episodes >= shards >= 1 and 0 <= epsilon <= 1")
    out = f"{VOLUME}/runs/{run}"
    worker = GPUWorker.with_options(gpu=gpu)()
    args = [(out, i, shards, episodes, epsilon, expert, encoder, steps, seed, batch_size, store_dtype)
            for i in range(shards)]
    for shard in worker.collect.starmap(args):
        print(f"shard {shard}/{shards} done")
    data_dir = merge.remote(out, episodes, epsilon, expert, encoder, steps, seed)
    print("merged ->", data_dir)
    if hf_repo:
        print("uploaded ->", upload.remote(data_dir, hf_repo))
    if evaluate:
        worker.evaluate.remote(out, encoder, expert, epsilon, eval_episodes, steps, seed)
        print(f"eval done: `modal volume get vjepa-reacher runs/{run}/report.md .`")
