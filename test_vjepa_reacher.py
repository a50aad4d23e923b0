"""Tests for vjepa_reacher.py: pure functions on synthetic data with known answers, then the real script
run in subprocesses with tiny budgets. Run with `python -m pytest -q test_vjepa_reacher.py`."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import vjepa_reacher as vr

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "vjepa_reacher.py")
# Tiny budgets shared by the end-to-end runs.
TINY = ["--episodes", "6", "--eval-episodes", "4", "--steps", "20", "--epochs", "5", "--dyn-epochs", "2",
        "--plan-episodes", "2", "--plan-steps", "6", "--samples", "16", "--elites", "4", "--rs-samples", "32",
        "--iterations", "2", "--horizon", "3",
        "--probe-episodes", "4", "--batch-size", "8"]

# Without the 8.4M-param resblock, whose planning dominates a tiny run's time.
LIGHT = ["--dynamics", "mlp", "mlp_rollout5", "--plans", "random/mlp", "cem/mlp", "cem/mlp_rollout5"]


def run(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=HERE)


def assert_one_line_error(p, *fragments, code=1):
    assert p.returncode == code, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error") or "error:" in l]
    assert lines, p.stderr[-2000:]
    for f in fragments:
        assert f in p.stderr, (f, p.stderr[-2000:])


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
def test_parameter_counts():
    assert vr.n_params(vr.bc_net(1024)) == 279_490  # the seed's figure
    assert vr.n_params(vr.MLPDynamics(1024)) == 1_579_520  # seed says "~1.2M"; this is the true count
    assert vr.n_params(vr.ResBlockDynamics(1024)) == 10_516_480  # seed: 10.5M


def test_window_is_padded_with_the_first_frame():
    frames = np.arange(5)[:, None] * np.ones((5, 3))  # frame t filled with t
    windows = vr.windows_from_frames(frames)
    assert windows.shape == (5, vr.WINDOW, 3)
    assert (windows[0, :, 0] == 0).all()
    assert windows[2, :, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2]
    assert windows[4, :, 0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]


def test_render_returns_a_fresh_frame_per_env_and_step():
    envs = vr.make_envs(2)
    for env, seed in zip(envs, (1, 2)):
        vr.reset_env(env, seed)
    first = vr.render(envs[0].physics)
    kept = first.copy()
    other = vr.render(envs[1].physics)  # another env, other target: must not overwrite `first`
    envs[0].step([1.0, -1.0])
    for _ in range(5):
        envs[0].step([1.0, -1.0])
    later = vr.render(envs[0].physics)
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, kept)
    assert np.abs(first.astype(int) - other).sum() > 0 and np.abs(first.astype(int) - later).sum() > 0
    direct = envs[0].physics.render(256, 256, camera_id=0, render_flag_overrides=vr.LEAN_RENDER)
    np.testing.assert_array_equal(later, direct)  # the shared renderer draws exactly what the env would


def test_wilson_interval():
    lo, hi = vr.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = vr.wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3
    lo, hi = vr.wilson(20, 20)
    assert hi == 1 and lo > 0.8


def test_jacobian_expert_succeeds_and_p_controller_does_not():
    seeds = vr.episode_seeds("eval", 20, 0)
    state = vr.Encoder("state", len(vr.STATE_NAMES))
    m = {name: vr.episode_metrics(vr.run_episodes(seeds, vr.expert_policy(name), state, 200, needs_z=False), 200)
         for name in ("jacobian", "p")}
    assert m["jacobian"]["success"] >= 0.9
    assert m["p"]["success"] <= m["jacobian"]["success"] - 0.3


def test_train_and_eval_seeds_are_disjoint():
    train = set(vr.episode_seeds("collect", 5000, 0)) | {s + 1_000_000 for s in vr.episode_seeds("collect", 5000, 0)}
    for kind in ("eval", "plan", "probe"):
        assert not train & set(vr.episode_seeds(kind, 1000, 0))


def linear_problem(batch=3, dim=4, seed=0):
    """z' = z + B a with known B: the best plan moves z to the goal."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(dim, 2, generator=g) * 0.3

    class Linear(torch.nn.Module):
        def forward(self, z, a):
            return z + a @ B.T
    z0 = torch.zeros(batch, dim)
    goal = (torch.rand(batch, 10, 2, generator=g) * 1.6 - 0.8).sum(1) @ B.T  # reachable in 10 steps
    return Linear(), z0, goal


def test_cem_and_random_shooting_beat_random_actions():
    model, z0, goal = linear_problem()
    cost = vr.latent_cost(model, z0, goal)
    g = torch.Generator().manual_seed(0)
    random_cost = cost((torch.rand(3, 500, 10, 2, generator=g) * 2 - 1)).mean().item()
    best, _, _ = vr.cem(cost, 3, 10, samples=500, elites=50, iterations=5, generator=g)
    cem_cost = cost(best[:, None]).mean().item()
    rs, _, _ = vr.cem(cost, 3, 10, samples=1000, elites=1, iterations=1, uniform_first=True, generator=g)
    rs_cost = cost(rs[:, None]).mean().item()
    assert cem_cost < 0.1 * random_cost
    assert rs_cost < 0.5 * random_cost
    assert cem_cost < 0.1 * goal.norm(dim=-1).mean().item()  # close to the true minimum, 0
    assert best.abs().max() <= 1  # actions are clamped to their bounds


def test_perfect_model_has_zero_kstep_error():
    model, _, _ = linear_problem(dim=5)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (3, 20, 2)).astype(np.float32)
    z = np.zeros((3, 21, 5), np.float32)
    with torch.no_grad():
        for t in range(20):
            z[:, t + 1] = model(torch.from_numpy(z[:, t]), torch.from_numpy(actions[:, t])).numpy()
    err, copy = vr.kstep_error(model, z, actions, [0, 1, 2], np.zeros(5, np.float32), np.ones(5, np.float32))
    assert len(err) == 10 and max(err) < 1e-5
    assert min(copy) > 0.01  # the copy baseline does see motion


def test_probe_recovers_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(10, 30, len(vr.STATE_NAMES))).astype(np.float32)
    flat = states.reshape(300, -1)
    planted = np.concatenate([flat @ rng.normal(size=(flat.shape[1], 40)), rng.normal(size=(300, 20)) * 0.01], 1)
    noise = rng.normal(size=(300, 60))
    r_planted = vr.probe_embeddings(planted, states)
    r_noise = vr.probe_embeddings(noise, states)
    for k in ("finger_xy", "target_xy", "joint_angles"):
        assert r_planted[k] > 0.99
        assert abs(r_noise[k]) < 0.15


def test_embedding_stats_on_known_data():
    z = np.ones((2, 5, 8)) + np.random.default_rng(0).normal(size=(2, 5, 8)) * 1e-3
    s = vr.embedding_stats(z)
    assert s["cos_random_pairs"] > 0.99 and s["cos_consecutive"] > 0.99
    s = vr.embedding_stats(z, standardize=True)
    assert s["cos_random_pairs"] < 0.5


def test_nan_loss_stops_and_keeps_last_good_weights():
    model = torch.nn.Linear(2, 1)
    calls = {"n": 0}

    def batch_loss(idx, split):
        calls["n"] += split == "train"
        loss = model(torch.ones(len(idx), 2)).pow(2).mean()
        return loss * float("nan") if calls["n"] > 3 else loss
    with pytest.raises(vr.UserError, match="loss became nan"):
        vr.fit(model, batch_loss, n_train=4, n_val=4, epochs=10, batch_size=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    vr.save_json(str(path), {"old": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vr.json, "dump", disk_full)
    with pytest.raises(OSError):
        vr.save_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind


def test_checkpoints_load_safely(tmp_path):
    path = str(tmp_path / "m.pt")
    vr.save_model(path, vr.bc_net(4), {"encoder": {"id": "state", "dim": 4}})
    assert vr.load_model(path, "bc")["meta"]["encoder"]["dim"] == 4
    torch.save({"state_dict": {}, "meta": vr.Encoder("x", 1)}, path)  # an arbitrary pickled object
    with pytest.raises(vr.UserError, match="m.pt"):
        vr.load_model(path, "bc")
    source = open(SCRIPT).read()
    assert "trust_remote_code" not in source and "import pickle" not in source
    assert source.count("torch.load(") == source.count("weights_only=True")


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------
def test_tiny_checkpoint_round_trip_matches_transformers(tmp_path):
    from transformers import VJEPA2Model
    torch.manual_seed(3)
    VJEPA2Model(vr.tiny_config()).save_pretrained(tmp_path / "ckpt")
    enc = vr.load_encoder(str(tmp_path / "ckpt"), precision="fp32")
    assert enc.dim == vr.tiny_config().hidden_size  # read from the config, never hard-coded
    windows = np.random.default_rng(0).integers(0, 256, (2, 8, 256, 256, 3), dtype=np.uint8)
    z = vr.encode(enc, windows)
    assert z.shape == (2, enc.dim) and z.dtype == np.float32
    direct = VJEPA2Model.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.from_numpy(windows).permute(0, 1, 4, 2, 3).float() / 255
    x = (x - torch.tensor(vr.IMAGENET_MEAN).view(1, 1, 3, 1, 1)) / torch.tensor(vr.IMAGENET_STD).view(1, 1, 3, 1, 1)
    with torch.no_grad():
        ref = direct(pixel_values_videos=x, skip_predictor=True).last_hidden_state.mean(1).numpy()
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-5)
    z_bf16 = vr.encode(vr.load_encoder(str(tmp_path / "ckpt"), precision="bf16"), windows)
    assert np.linalg.norm(z_bf16 - ref) / np.linalg.norm(ref) < 0.05


def test_offline_checkpoint_fails_with_one_line(tmp_path):
    p = run("collect", "--encoder", "facebook/vjepa2-vitl-fpc64-256", "--out", str(tmp_path),
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(p, "facebook/vjepa2-vitl-fpc64-256", "could not fetch", "--encoder tiny", "--encoder state")


# ---------------------------------------------------------------------------------------------
# Bad input, mismatches and interruptions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["collect", "--episodes", "0"], ["collect", "--episodes", "-3"], ["collect", "--steps", "0"],
    ["collect", "--epsilon", "1.5"], ["collect", "--epsilon", "-0.1"], ["collect", "--batch-size", "0"],
    ["collect", "--encoder", "resnet50"], ["collect", "--expert", "pid"], ["plan", "--dynamics", "transformer"],
    ["plan", "--plans", "cem/lstm"], ["collect", "--shard", "3/2"], ["collect", "--steps", "5000"],
    ["plan", "--elites", "600"], ["bc", "--lr", "nan"], ["teleport"],
])
def test_invalid_options_exit_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as e:
        vr.main(argv + ["--encoder", "state"] if "--encoder" not in argv else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_stage_before_its_inputs_names_the_missing_file(tmp_path, capsys):
    for stage, made_by in (("bc", "collect"), ("eval", "bc"), ("dynamics", "explore"), ("plan", "dynamics")):
        assert vr.main([stage, "--encoder", "state", "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "missing" in err and f"`{made_by}`" in err, err


def test_unwritable_out_is_one_line_and_keeps_earlier_results(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("earlier result")
    assert vr.main(["collect", "--encoder", "state", "--out", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and "Traceback" not in err
    assert blocker.read_text() == "earlier result"


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    """A complete tiny `all` with the state oracle, shared by the mismatch and corruption tests."""
    out = str(tmp_path_factory.mktemp("state_small"))
    p = run("all", "--encoder", "state", "--out", out, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_mismatched_encoder_is_caught_before_training(state_run, tmp_path, capsys):
    assert vr.main(["bc", "--encoder", "tiny", "--out", state_run, "--force"]) == 1
    err = capsys.readouterr().err
    assert "encoder state (dim 10)" in err and "--encoder is tiny (dim 64)" in err
    # A dynamics checkpoint of another dimension, labelled as this encoder, is refused with its path.
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(state_run, out)
    ckpt = torch.load(os.path.join(out, "dynamics_mlp.pt"), weights_only=True)
    vr.save_model(os.path.join(out, "dynamics_mlp.pt"), vr.MLPDynamics(7), ckpt["meta"])
    args = vr.parse_args(["plan", "--encoder", "state", "--out", out])
    with pytest.raises(vr.UserError, match="does not fit encoder dim 10"):
        vr.load_dynamics(args, vr.load_encoder("state"), "mlp")


def test_corrupted_files_are_named(state_run, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(state_run, out)
    z = os.path.join(out, "data", "jacobian_eps0", "z.npy")
    with open(z, "r+b") as f:
        f.truncate(100)
    assert vr.main(["bc", "--encoder", "state", "--out", out, "--force"]) == 1
    assert "z.npy is truncated or corrupted" in capsys.readouterr().err
    with open(os.path.join(out, "bc.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    assert vr.main(["eval", "--encoder", "state", "--out", out, "--force"]) == 1
    assert "bc.pt is truncated or corrupted" in capsys.readouterr().err


def test_killed_collection_resumes_to_the_same_dataset(tmp_path):
    args = ["collect", "--encoder", "tiny", "--episodes", "8", "--steps", "12", "--batch-size", "2", "--epsilon", "0.3"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert run(*args, "--out", ref).returncode == 0
    shard = os.path.join(out, "shards", "jacobian_eps0.3", "shard_0of1")
    p = subprocess.Popen([sys.executable, SCRIPT, *args, "--out", out], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(glob.glob(os.path.join(shard, "ep_*.npz"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    saved = len(glob.glob(os.path.join(shard, "ep_*.npz")))
    assert 2 <= saved < 8, saved  # killed in the middle
    assert not os.path.exists(os.path.join(out, "data", "jacobian_eps0.3", "meta.json"))
    again = run(*args, "--out", out)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    a = vr.load_dataset(os.path.join(ref, "data", "jacobian_eps0.3"))
    b = vr.load_dataset(os.path.join(out, "data", "jacobian_eps0.3"))
    assert a["meta"]["seeds"] == b["meta"]["seeds"]
    for k in ("actions", "rewards", "states"):
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["z"], b["z"], rtol=1e-5, atol=1e-5)  # same windows; batch-mates may differ


def test_ctrl_c_says_where_to_resume(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, SCRIPT, "collect", "--encoder", "tiny", "--episodes", "40", "--steps", "50",
                          "--batch-size", "2", "--out", out], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    shard = os.path.join(out, "shards", "jacobian_eps0", "shard_0of1")
    deadline = time.time() + 120
    while not glob.glob(os.path.join(shard, "ep_*.npz")) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "re-run the same command to resume" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Sharding and merging (the same functions modal_app.py calls)
# ---------------------------------------------------------------------------------------------
def test_shards_merge_to_the_unsharded_dataset(tmp_path):
    common = ["--encoder", "tiny", "--episodes", "4", "--steps", "6", "--batch-size", "4"]
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    assert run("collect", *common, "--out", whole).returncode == 0
    for i in range(2):
        assert run("collect", *common, "--shard", f"{i}/2", "--out", sharded).returncode == 0
    p = run("merge", *common, "--out", sharded)
    assert p.returncode == 0, p.stderr[-2000:]
    a = vr.load_dataset(os.path.join(whole, "data", "jacobian_eps0"))
    b = vr.load_dataset(os.path.join(sharded, "data", "jacobian_eps0"))
    assert a["meta"]["seeds"] == b["meta"]["seeds"]
    np.testing.assert_array_equal(a["actions"], b["actions"])  # the BC targets
    np.testing.assert_allclose(a["z"], b["z"], rtol=1e-5, atol=1e-5)  # the BC inputs


def test_merge_rejects_missing_and_overlapping_shards(tmp_path):
    enc = vr.load_encoder("state")
    root = tmp_path / "shards"
    vr.collect_shard(str(root / "shard_0of3"), enc, "p", 0.0, 5, [1, 2])
    vr.collect_shard(str(root / "shard_1of3"), enc, "p", 0.0, 5, [2, 3])
    with pytest.raises(vr.UserError, match=r"missing shards \[2\] of 3"):
        vr.merge([str(root / "shard_0of3"), str(root / "shard_1of3")], str(tmp_path / "data"))
    vr.collect_shard(str(root / "shard_2of3"), enc, "p", 0.0, 5, [4])
    with pytest.raises(vr.UserError, match="seeds overlap"):
        vr.merge(sorted(glob.glob(str(root / "shard_*"))), str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data" / "meta.json")


def test_modal_app_shard_jobs_run_locally_and_merge(tmp_path):
    modal_app = pytest.importorskip("modal_app", reason="the modal package is not installed")
    assert modal_app.vjepa_reacher is vr  # imports the script, copies nothing
    for i in range(2):  # the plain functions the Modal GPU workers call, run here with tiny
        assert modal_app.collect_shard_job(str(tmp_path), i, 2, 4, 0.3, "p", "tiny", steps=5, batch_size=2) == i
    data_dir = modal_app.merge_job(str(tmp_path), 4, 0.3, "p", "tiny", steps=5)
    data = vr.load_dataset(data_dir)
    assert data["z"].shape == (4, 6, 64) and data["meta"]["shards"] == 2


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_all_quick_with_state_oracle(tmp_path):
    out = str(tmp_path / "run")
    p = run("all", "--quick", "--encoder", "state", "--episodes", "100", "--epochs", "100", "--plans", "random/mlp",
            "cem/mlp", "--dynamics", "mlp", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["encoder"] == {"id": "state", "dim": 10, "precision": r["encoder"]["precision"]}
    assert r["bc"]["params"] == vr.n_params(vr.bc_net(10))
    assert r["experts"]["jacobian"]["success"] >= 0.9
    assert r["eval"]["bc"]["success"] >= r["experts"]["jacobian"]["success"] - 0.25  # BC close to its expert
    assert r["eval"]["bc"]["success"] > r["eval"]["random"]["success"]
    for k in ("success", "seed_success", "return", "final_distance", "n"):
        assert k in r["eval"]["bc"] and k in r["experts"]["p"]
    assert set(r["plan"]) == {"random/mlp", "cem/mlp"}
    assert r["plan"]["cem/mlp"]["latent_improvement"] > 0  # the planner moves toward the goal
    assert len(r["dynamics"]["mlp"]["kstep_error"]) == 10
    assert r["dynamics"]["mlp"]["kstep_error"][0] < r["dynamics"]["mlp"]["kstep_copy"][0]
    assert {"bc", "eval", "dynamics", "plan", "probe"} <= set(r["timing"])
    assert r["probe"]["encoder"]["finger_xy"] > 0.95  # the state oracle holds the finger position linearly
    pngs = sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "*.png")))
    assert pngs == ["bc_loss.png", "dynamics.png", "plan_distance.png", "probe.png", "success.png"]
    assert all(os.path.getsize(os.path.join(out, f)) > 5000 for f in pngs)
    assert len(glob.glob(os.path.join(out, "*.gif"))) == 3


def test_all_quick_with_tiny_vjepa2_then_report(tmp_path):
    out = str(tmp_path / "run")
    p = run("all", "--quick", "--encoder", "tiny", "--out", out, *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["encoder"]["id"] == "tiny" and r["encoder"]["dim"] == 64
    assert set(r["plan"]) == set(vr.PLANS) and set(r["dynamics"]) == set(vr.DYNAMICS)
    assert set(r["probe"]) == {"encoder", "random_init", "state"}
    # BC trained on lean frames is not evaluated on the full look by mistake
    assert vr.main(["eval", "--encoder", "tiny", "--out", out, "--force", "--full-render"]) == 1
    os.remove(os.path.join(out, "report.md"))
    p = run("report", "--out", out)  # no encoder needed, nothing re-run
    assert p.returncode == 0, p.stderr[-3000:]
    report = open(os.path.join(out, "report.md")).read()
    assert "NOT V-JEPA 2" in report and "python vjepa_reacher.py all --quick --encoder tiny" in report
    assert len(glob.glob(os.path.join(out, "*.png"))) == 5


def test_same_seed_same_numbers(tmp_path):
    outs = [str(tmp_path / f"run{i}") for i in range(2)]
    for out in outs:
        assert run("all", "--encoder", "state", "--out", out, *TINY, *LIGHT).returncode == 0
    a, b = (json.load(open(os.path.join(o, "results.json"))) for o in outs)
    for r in (a, b):
        r.pop("timing"), r.pop("config")
        for p in r["plan"].values():
            p.pop("ms_per_action"), p.pop("ms_per_step_all_episodes")
    assert a == b


@pytest.mark.parametrize("extra", [
    ["--steps", "8", "--episodes", "1", "--eval-episodes", "1", "--horizon", "1"],
    ["--epsilon", "1", "--explore-epsilon", "1", "--plan-episodes", "1", "--probe-episodes", "1"],
])
def test_odd_but_valid_inputs_run(tmp_path, extra):
    out = str(tmp_path / "run")
    p = run("all", "--encoder", "state", "--out", out, *TINY, *LIGHT, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert 0 <= r["eval"]["bc"]["success"] <= 1 and set(r["plan"]) == set(LIGHT[LIGHT.index("--plans") + 1:])
    assert all(np.isfinite(d["val_loss"]) for d in r["dynamics"].values())


def test_bench_quick_smoke(tmp_path):
    p = run("bench", "--quick", "--bench-out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.load(open(tmp_path / "bench.json"))
    for k in ("render_speedup", "collect_speedup_vs_seed_loop", "eval_speedup_batched", "encoder_gflops",
              "matmul_peak_gflops", "cem_ms_per_action", "device", "memory"):
        assert k in b
    assert b["render_speedup"]["lean_fps"] > 0 and b["memory"]["peak_rss_gb"] > 0
    assert (tmp_path / "bench.md").read_text().count("|") > 20
