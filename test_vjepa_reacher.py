"""Tests for vjepa_reacher.py, sac.py and report.py: pure functions on synthetic data with known answers, then
the stages run with tiny budgets. Run with `python -m pytest -q -x test_vjepa_reacher.py`.

Stages run in this process through `vr.main` (an int exit code; output captured), and share a few complete
runs through session fixtures: `state_run` (--quick, the privileged-state oracle), `tiny_run` (--quick, a
random-weight VJEPA2) and `light_runs` (tiny budgets, two training seeds, a relative --out). Subprocesses are
kept where the process itself is under test: SIGKILL, Ctrl-C, `--help` before torch loads, and offline start-up.
"""
import ast
import contextlib
import copy
import glob
import io
import json
import math
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import imagine
import report
import rope
import sac
import vjepa_reacher as vr

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "vjepa_reacher.py")
# Tiny budgets shared by the end-to-end runs.
TINY = ["--episodes", "6", "--eval-episodes", "4", "--steps", "20", "--epochs", "5", "--dyn-epochs", "2",
        "--plan-episodes", "2", "--set", "plan_steps=6", "--samples", "16", "--elites", "4", "--rs-samples", "32",
        "--iterations", "2", "--horizon", "3", "--probe-episodes", "4", "--batch-size", "8", "--rl-steps", "80",
        "--rl-envs", "2", "--rl-eval-every", "80", "--imagine-steps", "40",
        "--imagine-updates", "3", "--long-episodes", "0"]
# Without the 8.4M-param resblock, whose planning dominates a tiny run's time.
LIGHT = ["--dynamics", "mlp", "mlp_rollout5", "--plans", "random/mlp", "cem/mlp", "cem/mlp_rollout5"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def cli(*argv):
    """`python vjepa_reacher.py ARGV` in this process: (exit code, stdout, stderr). argparse's exit 2 included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = vr.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def ok(*argv):
    """cli() that must succeed; returns stdout and stderr."""
    code, out, err = cli(*argv)
    assert code == 0, (argv, err[-3000:])
    return out, err


def assert_one_line_error(code, err, *fragments, expected=1):
    assert code == expected, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for f in fragments:
        assert f in err, (f, err[-2000:])


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def table_rows(markdown):
    """{first cell: [cells]} of every markdown table row."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


def pct(x):
    return f"{x * 100:.0f}"


@pytest.fixture
def one_thread():
    """Small nets on one thread, as the rl stage runs them (two threads spin-wait beside another process)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def state_run(tmp_path_factory):
    """`all --quick` with the state oracle (one dynamics model, two planners): the behaviour checks."""
    out = str(tmp_path_factory.mktemp("state_quick") / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a non-writable numpy array into torch once raised one
        _, err = ok("all", "--quick", "--encoder", "state", "--dynamics", "mlp", "--plans", "random/mlp", "cem/mlp",
                    "--rl-steps", "1000", "--long-episodes", "1", "--plan-long-episodes", "0", "--out", out)
    return out, err


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`all --quick` with the tiny random-weight VJEPA2 and every dynamics model and planner, tiny budgets."""
    out = str(tmp_path_factory.mktemp("tiny_quick") / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ok("all", "--quick", "--encoder", "tiny", "--out", out, *TINY)
    return out


@pytest.fixture(scope="session")
def light_runs(tmp_path_factory):
    """Two training seeds under a relative --out (cwd = a fresh folder), and seed 3 again under an absolute one."""
    root = tmp_path_factory.mktemp("light")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ok("all", "--encoder", "state", "--seeds", "3", "2147483647", "--out", "multi", *TINY, *LIGHT)
    finally:
        os.chdir(cwd)
    again = str(root / "again")
    ok("all", "--encoder", "state", "--seed", "3", "--out", again, *TINY, *LIGHT)
    return {"root": str(root), "multi": str(root / "multi"), "again": again}


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, name", [
    (["collect", "--episodes", "0"], "--episodes"), (["collect", "--episodes", "-3"], "--episodes"),
    (["collect", "--steps", "0"], "--steps"), (["collect", "--steps", "5000"], "--steps"),
    (["collect", "--epsilon", "1.5"], "--epsilon"), (["collect", "--epsilon", "-0.1"], "--epsilon"),
    (["collect", "--batch-size", "0"], "--batch-size"), (["collect", "--encoder", "resnet50"], "--encoder"),
    (["collect", "--encoder", "/nonexistent/path"], "/nonexistent/path': no such folder"),
    (["collect", "--expert", "pid"], "--expert"), (["plan", "--dynamics", "transformer"], "--dynamics"),
    (["plan", "--plans", "cem/lstm"], "--plans"), (["collect", "--shard", "3/2"], "--shard"),
    (["plan", "--elites", "600"], "--elites"), (["teleport"], "stage"),
    (["collect", "--seed", "-1"], "--seed"), (["collect", "--seed", str(2 ** 31)], "--seed"),
    (["collect", "--seed", "4.5"], "--seed"), (["collect", "--seeds", "1", "-2"], "--seeds"),
    (["collect", "--recipe", "theirs"], "--recipe"), (["collect", "--set", "frame_size=100"], "frame_size"),
    (["bc", "--set", "bc_lr=nan"], "bc_lr"), (["bc", "--set", "dyn_lr=-1"], "dyn_lr"),
    (["plan", "--set", "cost=max"], "cost"), (["plan", "--set", "execute=worst"], "execute"),
    (["plan", "--set", "plan_steps=5000"], "plan_steps"), (["plan", "--set", "plan_steps=six"], "plan_steps"),
    (["plan", "--set", "cem_init_std=0"], "cem_init_std"), (["plan", "--set", "warp_drive=on"], "warp_drive"),
    (["plan", "--set", "cost"], "cost"),
])
def test_invalid_options_exit_2_naming_the_option(argv, name):
    code, out, err = cli(*argv, *([] if "--encoder" in argv else ["--encoder", "state"]))
    assert code == 2 and out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith("vjepa_reacher.py: error: ") and name in message, err
    assert "Traceback" not in err


def test_recipe_fills_only_defaults_and_set_and_typed_options_win():
    a = vr.parse_args(["plan", "--recipe", "seed", "--set", "cost=final"])
    assert a.cost == "final" and a.execute == "best" and a.plan_steps == 200 and a.goal_horizon == 300
    assert a.plan_frame_size == 224 and a.frame_size == 256 and a.bc_optimizer == "adam"
    assert all(getattr(a, k) == v for k, v in vr.RECIPES["seed"].items() if k != "cost")
    b = vr.parse_args(["plan", "--recipe", "seed", "--quick", "--episodes", "7"])
    assert b.plan_steps == vr.QUICK["plan_steps"] and b.mpc_obs == "frame"  # quick sizes win, recipe knobs fill
    assert b.episodes == 7 and b.eval_episodes == vr.QUICK["eval_episodes"]  # a typed option beats --quick
    c = vr.parse_args(["plan", "--quick", "--set", "plan_steps=6", "--set", "plan_steps=9"])
    assert c.plan_steps == 9  # --set beats --quick; the last one wins
    d = vr.parse_args(["plan"])
    assert d.cost == "final" and d.execute == "mean" and d.plan_frame_size == d.frame_size
    assert d.goal_horizon == d.rs_plan_steps == d.plan_steps == vr.KNOBS["plan_steps"].ours
    assert d.goal_expert == d.expert and d.plan_precision == d.precision
    assert vr.parse_args(["plan", "--set", "dyn_grad_clip=0"]).dyn_grad_clip == 0.0  # 0 is a valid value here


def test_help_lists_every_knob_with_both_values_before_torch_loads():
    p = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "--help"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert not {"torch", "numpy"} & imported  # the options come first, before any heavy import
    lines = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ") and line.split()}
    for name, knob in vr.KNOBS.items():
        line = " ".join(lines[name].split())
        assert f"seed: {knob.seed}" in line, line
        assert f"ours: {knob.ours}" in line, line  # a SameAs shows as "same as name"
    options = [a for a in vr.build_parser()._actions if a.option_strings]
    assert len(options) <= 35  # issue 19: at most 35 options besides the knobs
    for a in options:
        assert a.help and max(map(len, a.option_strings)) > 2 and a.option_strings[-1] in p.stdout


# ---------------------------------------------------------------------------------------------
# Environment, experts, episode seeds
# ---------------------------------------------------------------------------------------------
def test_window_rolls_and_is_padded_with_the_first_frame(monkeypatch):
    """The window each step encodes: the last 8 observations, front-padded with the first one at reset."""
    seen, encode = [], vr.encode

    def recording_encode(encoder, windows):
        seen.append(windows.clone())
        return encode(encoder, windows)
    monkeypatch.setattr(vr, "encode", recording_encode)
    ep, = vr.run_episodes([3], vr.expert_policy, vr.load_encoder("state"), vr.Envs(1, expert="p"), 10, keep_z=True)
    states = torch.from_numpy(ep["states"])  # (11, S)
    assert len(seen) == 11 and all(w.shape == (1, vr.WINDOW, len(vr.STATE_NAMES)) for w in seen)
    for t, w in enumerate(seen):
        rows = [max(0, t - vr.WINDOW + 1 + i) for i in range(vr.WINDOW)]  # t=2: 0 0 0 0 0 0 1 2
        assert torch.equal(w[0], states[rows]), t
    np.testing.assert_array_equal(ep["z"], ep["states"])  # the state encoder returns the window's last row


def test_render_returns_a_fresh_frame_per_env_and_step():
    envs = [vr.make_env(0) for _ in range(2)]
    for env, seed in zip(envs, (1, 2)):
        vr.reset_env(env, seed)
    render = vr.Renderer(256)
    first = render(envs[0].physics)
    kept = first.copy()
    other = render(envs[1].physics)  # another env, other target: must not overwrite `first`
    for _ in range(6):
        envs[0].step([1.0, -1.0])
    later = render(envs[0].physics)
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, kept)
    assert np.abs(first.astype(int) - other).sum() > 0 and np.abs(first.astype(int) - later).sum() > 0
    direct = envs[0].physics.render(256, 256, camera_id=0, render_flag_overrides=vr.LEAN_RENDER)
    np.testing.assert_array_equal(later, direct)  # the shared renderer draws exactly what the env would


def test_envs_match_fresh_environments_and_sum_repeated_rewards():
    envs = vr.Envs(2, expert="jacobian", action_repeat=3)
    obs = envs.reset([11, 12])
    fresh = [vr.make_env(s) for s in (11, 12)]
    for env in fresh:
        env.reset()
    np.testing.assert_array_equal(obs["state"], np.stack([vr.reacher_state(e.physics) for e in fresh]))
    np.testing.assert_array_equal(obs["expert"][0], vr.jacobian_expert(fresh[0].physics))
    action = np.array([[0.5, -0.5], [-1.0, 1.0]])
    obs, rewards = envs.step(action)
    expected = [sum(e.step(a).reward for _ in range(3)) for e, a in zip(fresh, action)]
    np.testing.assert_allclose(rewards, expected)
    np.testing.assert_array_equal(obs["state"], np.stack([vr.reacher_state(e.physics) for e in fresh]))
    np.testing.assert_allclose(vr.finger_distance(obs["state"]),
                               [np.linalg.norm(np.subtract(*vr.finger_and_target(e.physics))) for e in fresh])


def test_jacobian_expert_against_a_finite_difference_jacobian():
    """tau = kp J^T (target - finger) - kd qvel, with J from finite differences of the finger position in the joint
    angles; a moving arm checks the damping's sign. Small gains keep tau inside the clip."""
    env = vr.make_env(3)
    vr.reset_env(env, 3)
    physics = env.physics
    physics.data.qvel[:2] = [2.0, -3.0]
    physics.forward()
    finger, target = vr.finger_and_target(physics)
    J, eps = np.zeros((2, 2)), 1e-6
    for j in range(2):
        physics.data.qpos[j] += eps
        physics.forward()
        J[:, j] = (vr.finger_and_target(physics)[0] - finger) / eps
        physics.data.qpos[j] -= eps
    physics.forward()
    tau = vr.jacobian_expert(physics, kp=2.0, kd=0.1)
    expected = 2.0 * J.T @ (target - finger) - 0.1 * np.array([2.0, -3.0])
    assert np.abs(expected).max() < 1 and np.allclose(tau, expected, atol=1e-4), (tau, expected)


def test_training_ranges_bounds_by_arithmetic(monkeypatch):
    """Whatever 32-bit word the seed mixes to, a training range starts at 2**24 or above and ends below 2**32: the
    smallest word starts it at 2**24, the one just below the room at 2**32 - MAX_EPISODES - 1 (the other two stages
    get words 2 * MAX_EPISODES apart, so the seed is not refused)."""
    room = 2 ** 32 - vr.MAX_EPISODES - 2 ** 24
    for word, first in ((0, 2 ** 24), (room - 1, 2 ** 32 - vr.MAX_EPISODES - 1), (room, 2 ** 24)):
        class Words:
            def __init__(self, entropy):
                self.stage = entropy[1]

            def generate_state(self, n, word=word):
                return np.full(n, (word + 2 * vr.MAX_EPISODES * self.stage) % 2 ** 32, np.uint32)
        monkeypatch.setattr(vr.np.random, "SeedSequence", Words)
        seeds = vr.episode_seeds("collect", vr.MAX_EPISODES, 0)
        assert seeds[0] == first and seeds[-1] < 2 ** 32 and seeds[-1] - seeds[0] == vr.MAX_EPISODES - 1, word
    monkeypatch.undo()
    held_out_last = max(vr.episode_seeds(k, vr.MAX_EPISODES, 0)[-1] for k in vr.HELD_OUT)
    assert held_out_last == vr.HELD_OUT["goal"] + vr.MAX_EPISODES - 1 < 2 ** 24


@pytest.mark.parametrize("seed", [0, 1, 151, 429, 430, 4242, 2 ** 31 - 1])
def test_seed_ranges_are_disjoint_and_fit_32_bits(seed):
    n = vr.MAX_EPISODES
    kinds = ("collect", "explore", "rl", "eval", "plan", "probe", "goal")
    first = {k: vr.episode_seeds(k, 1, seed)[0] for k in kinds}
    for k in kinds:  # each range is first, first + 1, ...: checked on 1,000, then taken as n long
        assert vr.episode_seeds(k, 1000, seed) == list(range(first[k], first[k] + 1000)), k
    ranges = {k: (first[k], first[k] + n - 1) for k in kinds}
    for a in ranges:
        assert 0 <= ranges[a][0] and ranges[a][1] < 2 ** 32, a
        for b in ranges:
            if a < b:  # intervals: disjoint when one ends before the other starts
                assert ranges[a][1] < ranges[b][0] or ranges[b][1] < ranges[a][0], (a, b)
    held_out = max(ranges[k][1] for k in vr.HELD_OUT)
    assert held_out < 2 ** 24 <= min(ranges[k][0] for k in vr.TRAINING)
    assert vr.episode_seeds("eval", 100, seed) == list(range(5000, 5100))  # the seed's eval episodes, paired
    np.random.RandomState(ranges["collect"][1])  # numpy accepts every one
    with pytest.raises(vr.UserError, match="at most"):
        vr.episode_seeds("eval", n + 1, seed)


def test_training_ranges_of_other_seeds_never_hold_evaluation_episodes():
    held_out_end = max(vr.episode_seeds(k, 1, 0)[0] + vr.MAX_EPISODES - 1 for k in vr.HELD_OUT)
    for seed in range(0, 3000, 7):
        try:
            assert all(vr.episode_seeds(k, 1, seed)[0] > held_out_end for k in vr.TRAINING)
        except vr.UserError:  # refused: its own training ranges would overlap
            assert seed in (483, 896, 1589, 2387)


TODAYS_TRAINING_STARTS = [[2985588926, 3981702212, 3157893759], [1852281343, 1205810605, 1613587627],
                          [2850904203, 324403663, 1356804060]]  # from the rule before issue 27, which rehashed overlaps


def test_training_seeds_are_todays_and_a_seed_whose_ranges_overlap_is_refused():
    # the first episode of collect, explore and rl for --seed 0, 1, 2, as every committed result was trained on
    assert [[vr.episode_seeds(k, 1, s)[0] for k in vr.TRAINING] for s in range(3)] == TODAYS_TRAINING_STARTS
    with pytest.raises(vr.UserError, match="--seed 152: its collect, explore and rl episodes would overlap"):
        vr.episode_seeds("rl", 1, 152)
    assert vr.episode_seeds("eval", 3, 152) == [5000, 5001, 5002]  # held-out ranges never depend on --seed


def test_seed_recipe_reuses_the_demo_seeds_for_exploration():
    assert vr.episode_seeds("collect", 5, 7, same_as_seed_code=True) == [0, 1, 2, 3, 4]
    assert vr.episode_seeds("explore", 5, 7, same_as_seed_code=True) == [0, 1, 2, 3, 4]


def test_epsilon_greedy_draws_per_episode_not_per_batch():
    expert = lambda z, obs: np.zeros((len(obs["seed"]), 2))  # noqa: E731
    alone, together = vr.epsilon_greedy(expert, 0.5, 3), vr.epsilon_greedy(expert, 0.5, 3)
    a = [alone(None, {"seed": [7]})[0] for _ in range(20)]
    b = [together(None, {"seed": [5, 7]})[1] for _ in range(20)]
    np.testing.assert_array_equal(a, b)  # episode 7's actions do not depend on its batch-mate
    replaced = np.mean([np.any(x != 0) for x in a])
    assert 0 < replaced < 1 and np.abs(a).max() <= 1


# ---------------------------------------------------------------------------------------------
# Statistics and report tables
# ---------------------------------------------------------------------------------------------
def test_wilson_interval():
    lo, hi = report.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = report.wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3
    lo, hi = report.wilson(20, 20)
    assert hi == 1 and lo > 0.8


def test_mean_ci_is_the_normal_interval_of_the_mean():
    mean, half = report.mean_ci([1, 2, 3, 4])
    assert mean == 2.5 and half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, rel=1e-12)  # sample var 5/3
    assert report.mean_ci([7.0]) == (7.0, 0.0)
    assert report.mean_ci(np.full(10, 0.3))[1] == pytest.approx(0.0, abs=1e-15)


def test_across_seeds_is_the_t_interval():
    mean, half = report.across_seeds([1, 2, 3])  # sd 1, df 2: t = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=3e-4)
    mean, half = report.across_seeds([0.2, 0.4, 0.6, 0.8, 1.0])  # sd sqrt(0.1), df 4: t = 2.776
    assert mean == pytest.approx(0.6) and half == pytest.approx(2.776 * math.sqrt(0.1) / math.sqrt(5), rel=3e-4)
    mean, half = report.across_seeds([5.0])
    assert mean == 5.0 and math.isnan(half)
    # Student t quantiles t(0.975, df), to three decimals, beyond 30 degrees of freedom too
    for df, t in {1: 12.706, 10: 2.228, 30: 2.042, 40: 2.021, 120: 1.980}.items():
        x = np.arange(df + 1.0)
        assert report.across_seeds(x)[1] == pytest.approx(t * x.std(ddof=1) / math.sqrt(df + 1), rel=3e-4)


def test_success_is_the_last_step_and_seed_success_the_return():
    """success: reward 1 at the last step; seed_success: return > 150 per 200 steps (75 at 100 steps)."""
    def episode(rewards):
        return {"rewards": np.array(rewards, np.float32), "final_distance": 0.0}
    last_only = episode([0.0] * 99 + [1.0])  # inside at the end, return 1
    left = episode([1.0] * 99 + [0.0])  # inside all along but the last step: return 99
    edge = episode([1.0] * 75 + [0.0] * 25)  # return exactly 75: not above the seed's threshold
    m = report.episode_metrics([last_only, left, edge, episode([0.0] * 100)], steps=100)
    assert (m["n"], m["success"], m["seed_success"]) == (4, 0.25, 0.25)
    assert m["success_ci"] == pytest.approx(report.wilson(1, 4)) and m["return"] == pytest.approx(175 / 4)
    assert report.episode_metrics([left], steps=200)["seed_success"] == 0.0  # 99 < 150 at 200 steps


def test_fisher_p_values_and_wilson_intervals_as_the_tables_print_them():
    """Known answers: Fisher's tea-tasting table; the extreme 2x2 table by hand (its one mirror image is as unlikely,
    every other table more likely); the published rows' p and intervals as results/ablation/run.py formats them."""
    assert report.fisher_exact(3, 4, 1, 4) == pytest.approx(0.4857, abs=1e-4)
    assert report.fisher_exact(19, 50, 50, 50) == pytest.approx(2 * math.comb(69, 19) / math.comb(100, 50), rel=1e-9)
    assert f"{report.fisher_exact(19, 50, 50, 50):.2g}" == "9.2e-13"  # goal_expert=p: 38% vs 100%
    assert f"{report.fisher_exact(2, 50, 50, 50):.2g}" == "2.6e-26"  # rs_goal=random-run: 4% vs 100%
    assert report.fisher_exact(50, 50, 50, 50) == 1.0 and report.fisher_exact(3, 5, 2, 5) == pytest.approx(1.0)
    for k, n, printed in ((49, 100, "49% [39, 59]"), (100, 100, "100% [96, 100]"), (20, 20, "100% [84, 100]"),
                          (50, 50, "100% [93, 100]"), (37, 50, "74% [60, 84]"), (0, 20, "0% [0, 16]")):
        assert report.fmt_rate({"success": k / n, "success_ci": report.wilson(k, n)}) == printed


def test_phase1_and_plan_tables_on_known_numbers():
    m = {"success": 0.75, "success_ci": (0.5, 0.9), "seed_success": 0.5, "seed_success_ci": (0.25, 0.75),
         "return": 12.345, "return_ci": 1.0, "final_distance": 0.01234, "n": 20}
    text = report.phase1_table({"encoder": {"id": "state"}, "eval": {"bc": m}}, 50)
    assert "50-step episodes" in text and "encoder `state`" in text
    row = table_rows(text)["bc"]
    assert {"75% [50, 90]", "50% [25, 75]", "12.3", "0.012", "20", "20% / 66.4"} <= set(row), row
    p = dict(m, steps=30, initial_distance=0.25, initial_distance_ci=0.02, final_distance_ci=0.004, min_distance=0.0075,
             min_distance_ci=0.001, ms_per_action=7.4)
    text = report.plan_table({"encoder": {"id": "tiny"}, "plan": {"cem/mlp": p}}, 30)
    assert "encoder `tiny`" in text
    row = table_rows(text)["cem/mlp"]
    assert {"75% [50, 90]", "12.3", "7", "20"} <= set(row), row
    for x in (0.25, 0.01234, 0.0075):  # the finger distances in metres, with or without their interval
        assert any(cell.split(" ± ")[0] == f"{x:.3f}" for cell in row), (x, row)
    assert any("7.8" in cell for cell in row)  # the seed's own figure beside ours


def test_report_tables_show_the_numbers_in_results_json(state_run):
    out, _ = state_run
    r = results(out)
    text = open(os.path.join(out, "report.md")).read()
    rows = table_rows(text)
    for name in ("bc", "random", "rl"):
        m, row = r["eval"][name], rows[name]
        (lo, hi), (slo, shi) = m["success_ci"], m["seed_success_ci"]
        assert row[1] == f"{pct(m['success'])}% [{pct(lo)}, {pct(hi)}]", row
        assert f"{pct(m['seed_success'])}% [{pct(slo)}, {pct(shi)}]" in row and f"{m['return']:.1f}" in row
        assert f"{m['final_distance']:.3f}" in row and str(m["n"]) in row
        long = m["standard"]  # the 1,000-step return, its interval and n
        assert row[-2] == f"{long['return']:.0f} ± {long['return_ci']:.0f} (n = {long['n']})", row
    for name, p in r["plan"].items():
        row = rows[name]
        lo, hi = p["success_ci"]
        assert row[1] == f"{pct(p['success'])}% [{pct(lo)}, {pct(hi)}]", row
        assert f"{p['return']:.1f}" in row and str(p["n"]) == row[-3] == str(r["config"]["plan_episodes"])
        assert row[-2] == "", row  # --plan-long-episodes 0; the planners' 1,000-step cell: test_plan_stage_knobs_...
        cells = [c.split(" ± ")[0] for c in row]
        assert f"{p['final_distance']:.3f}" in cells and f"{p['initial_distance']:.3f}" in cells, row
    d = r["dynamics"]["mlp"]
    assert rows["mlp"][1:4] == [f"{d['params']:,}", str(d["epochs"]), f"{d['val_loss']:.5f}"]
    assert rows["finger_xy"][1] == f"{r['probe']['encoder']['finger_xy']:.2f}"


def test_report_states_episode_lengths_kept_epoch_and_seed_figures(state_run):
    out, _ = state_run
    text = open(os.path.join(out, "report.md")).read()
    q = vr.QUICK
    assert f"Phase 1: live evaluation, {q['steps']}-step episodes" in text
    assert "Phase 4: latent MPC" in text and str(q["plan_steps"]) in table_rows(text)["cem/mlp"]
    assert f"kept epoch {q['epochs']} of {q['epochs']}" in text
    rows = table_rows(text)
    assert rows["expert `p`"][-1] == "20% / 67.6" and rows["expert `jacobian`"][-1] == ""


def test_gif_captions_sit_on_a_dark_band(state_run):
    from PIL import Image
    im = Image.open(os.path.join(state_run[0], "rollout_bc.gif")).convert("RGB")
    top = np.asarray(im)[:4]
    assert top.mean() < 60 and np.asarray(im)[4:20].max() > 200  # dark band, white text on it


def test_plan_plot_marks_the_success_radius():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = report.plot_plan(plt, {"plan_traces": {"cem/mlp": {"finger": [[0.3, 0.2, 0.1], [0.2, 0.1, 0.05]]}}}, "x")
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert any(list(line.get_ydata()) == [report.SUCCESS_RADIUS] * 2 for line in lines)
    assert any(np.allclose(line.get_ydata(), [0.25, 0.15, 0.075]) for line in lines)  # the mean over episodes
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, umask
# ---------------------------------------------------------------------------------------------
def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    report.save_json(str(path), {"old": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report.json, "dump", disk_full)
    with pytest.raises(OSError):
        report.save_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind


def test_checkpoints_load_safely(tmp_path):
    path = str(tmp_path / "bc.pt")
    args, state = vr.parse_args(["eval", "--encoder", "state"]), vr.load_encoder("state")
    data = {"meta": {"encoder": state.info(), "render": "none"}}
    net = vr.bc_net(10)
    vr.save_model(path, net, data, np.arange(10, dtype=np.float32), np.ones(10, np.float32))
    loaded, mean, std = vr.load_checked(args, state, path, "bc", vr.bc_net(10))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert mean.tolist() == list(range(10)) and std.dtype == np.float32
    torch.save({"state_dict": {}, "meta": vr.Encoder("x", 1)}, path)  # an arbitrary pickled object
    with pytest.raises(vr.UserError, match="bc.pt is truncated, corrupted"):
        vr.load_checked(args, state, path, "bc", vr.bc_net(10))
    for name in ("vjepa_reacher.py", "sac.py", "report.py"):
        source = open(os.path.join(HERE, name)).read()
        assert "trust_remote_code" not in source and "import pickle" not in source, name
        assert source.count("torch.load(") == source.count("weights_only=True)"), name


def test_written_files_respect_the_umask(state_run):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("report.md", "bc.pt", "config.json", "success.png", "rollout_bc.gif", "data/jacobian_eps0/meta.json"):
        assert os.stat(os.path.join(state_run[0], f)).st_mode & 0o777 == 0o666 & ~umask, f


def test_relative_out_writes_no_absolute_path(light_runs):
    """Issue 20: a run folder can be moved or shared: nothing in it names the machine's absolute path."""
    root, multi = light_runs["root"], light_runs["multi"]
    paths = [p for p in glob.glob(os.path.join(multi, "**", "*"), recursive=True) if os.path.isfile(p)]
    texts = [p for p in paths if p.endswith((".json", ".md", ".csv", ".txt"))]
    assert len(texts) >= 20 and os.path.join(multi, "seeds.json") in texts
    for p in paths:
        data = open(p, "rb").read()
        for absolute in {root, os.path.realpath(root)}:
            assert absolute.encode() not in data, p
    config = json.load(open(os.path.join(multi, "seed_3", "config.json")))
    assert config["out"] == os.path.join("multi", "seed_3")


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
    assert z.shape == (2, enc.dim) and z.dtype == torch.float32
    direct = VJEPA2Model.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.from_numpy(windows).permute(0, 1, 4, 2, 3).float() / 255
    imagenet_mean, imagenet_std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    x = (x - imagenet_mean.view(1, 1, 3, 1, 1)) / imagenet_std.view(1, 1, 3, 1, 1)
    with torch.no_grad():
        ref = direct(pixel_values_videos=x, skip_predictor=True).last_hidden_state.mean(1)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vr.encode(enc, torch.from_numpy(windows)), z)  # numpy or torch windows alike
    z_bf16 = vr.encode(vr.load_encoder(str(tmp_path / "ckpt"), precision="bf16"), windows)
    assert (z_bf16 - ref).norm() / ref.norm() < 0.05
    full = vr.encode(vr.variant(enc, forward="full"), windows)  # the seed's forward: the predictor too
    torch.testing.assert_close(full, z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, dtype", [
    ((1, 8, 128, 128, 3), np.uint8), ((1, 4, 256, 256, 3), np.uint8), ((1, 8, 256, 256, 3), np.float32),
    ((8, 256, 256, 3), np.uint8),
])
def test_encode_refuses_wrong_windows(shape, dtype):
    with pytest.raises(vr.UserError, match=r"expected a batch of uint8 windows \(B, 8, 256, 256, 3\)") as e:
        vr.encode(vr.load_encoder("tiny"), np.zeros(shape, dtype))
    assert str(tuple(shape)) in str(e.value)
    with pytest.raises(vr.UserError, match=r"expected a batch of windows \(B, 8, 10\)"):
        vr.encode(vr.load_encoder("state"), np.zeros((2, 8, 3), np.float32))


def test_loading_tiny_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vr.load_encoder("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)
    a, b = vr.load_encoder("tiny", seed=7), vr.load_encoder("tiny", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def vitl_config(layers=2):
    """ViT-L's widths (1024 wide, 16 heads of 64, patch 16, crop 256) at `layers` depth, 8 frames a clip."""
    from transformers import VJEPA2Config
    return VJEPA2Config(num_hidden_layers=layers, crop_size=256, frames_per_clip=vr.WINDOW)


def last_hidden(model, x, autocast=None):
    with torch.inference_mode(), torch.autocast("cpu", autocast, enabled=autocast is not None):
        return model.encoder(pixel_values_videos=x).last_hidden_state


@pytest.mark.parametrize("shape", ["tiny", "vitl"])
def test_rope_cache_is_bit_identical_to_transformers_at_the_checkpoint_size(shape):
    config = vr.tiny_config() if shape == "tiny" else vitl_config()
    ref, ours = vr.random_vjepa2(config, 0).eval(), vr.random_vjepa2(config, 0).eval()
    tables = rope.install(ours, "input")
    x = torch.randn(2, vr.WINDOW, 3, 256, 256)
    assert torch.equal(last_hidden(ref, x), last_hidden(ours, x))  # fp32
    assert torch.equal(last_hidden(ref, x, torch.bfloat16), last_hidden(ours, x, torch.bfloat16))  # bf16 autocast
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)  # bf16 weights
    assert torch.equal(last_hidden(ref, x.bfloat16()), last_hidden(ours, x.bfloat16()))
    assert [k[-1] for k in tables.tables] == [torch.float32, torch.bfloat16]  # built once a dtype, not per layer


def test_rope_positions_follow_the_input_grid_at_224_px():
    config = vitl_config()
    ref, ours = vr.random_vjepa2(config, 0).eval(), vr.random_vjepa2(config, 0).eval()
    tables = rope.install(ours, "input")
    own = [layer.attention.get_position_ids(torch.empty(1, 784, 1)) for layer in ref.encoder.layer][0]
    for layer in ref.encoder.layer:  # transformers' own arithmetic, told the true 14 x 14 grid
        layer.attention.grid_size = 224 // 16
    x = torch.randn(1, vr.WINDOW, 3, 224, 224)
    assert torch.equal(last_hidden(ref, x), last_hidden(ours, x)) and tables.thw == (4, 14, 14)
    ids = torch.arange(784)
    frame, row, column = tables.positions(784, "cpu")
    assert torch.equal(frame, ids // 196) and torch.equal(row, ids % 196 // 14) and torch.equal(column, ids % 14)
    wrong = (own[0] != frame) | (own[1] != row) | (own[2] != column)  # transformers' 16-wide grid at 224 px
    assert int(wrong.sum()) == 770


def test_seed_recipe_keeps_transformers_token_positions():
    assert vr.parse_args(["plan", "--recipe", "seed"]).rope_grid == "checkpoint"
    assert vr.parse_args(["plan"]).rope_grid == "input"
    windows = np.random.default_rng(1).integers(0, 256, (2, vr.WINDOW, 224, 224, 3), dtype=np.uint8)
    seed_like = vr.load_encoder("tiny", precision="fp32", positions="checkpoint", frame_size=224)
    with torch.inference_mode():  # transformers' untouched model, positions on its 256 px crop's grid
        plain = vr.random_vjepa2(vr.tiny_config(), 0).eval().encoder
        x = vr.preprocess(torch.from_numpy(windows), *seed_like.normalize)
        ref = plain(pixel_values_videos=x).last_hidden_state
    assert torch.equal(vr.encode(seed_like, windows), ref.mean(1))
    ours = vr.load_encoder("tiny", precision="fp32", frame_size=224)
    assert not torch.equal(vr.encode(ours, windows), ref.mean(1))  # 7 x 7 patches: the positions now differ
    assert seed_like.info()["rope"] == "cached, checkpoint grid" and ours.info()["rope"] == "cached, input grid"


def test_rope_cache_steps_aside_for_an_attention_it_was_not_written_for(capsys):
    model = vr.random_vjepa2(vr.tiny_config(), 0).eval()
    for layer in model.encoder.layer:
        layer.attention.d_dim = 2  # as if a later transformers rotated fewer dimensions
    x = torch.randn(1, vr.WINDOW, 3, 256, 256)
    before = last_hidden(model, x)
    with pytest.warns(UserWarning, match="RoPE cache") as caught:  # a warning, not a print: rope.py is a library
        assert rope.install(model, "input") is None
    assert caught[0].filename == __file__  # stacklevel: it names the caller's line
    assert capsys.readouterr().err == "" and not model.encoder.embeddings._forward_pre_hooks
    assert torch.equal(last_hidden(model, x), before)  # transformers' own code still runs
    assert vr.Encoder("x", 64, model).info()["rope"] == "transformers' own (checkpoint grid)"


def test_fp16_weights_agree_with_fp32_on_a_random_vitl():
    """The encoder's CUDA default (fp16 weights) on all 24 layers of a random ViT-L, here on the CPU, at 128 px:
    the depth and width where fp16 could overflow, on a quarter of 256 px's tokens (fp16 matmuls are slow on CPUs)."""
    model = vr.random_vjepa2(vitl_config(24), 0).eval().requires_grad_(False)
    fp32 = vr.Encoder("vitl", 1024, model, precision="fp32", frame_size=128, rope=rope.install(model, "input"))
    half = vr.variant(fp32, "half")
    assert half.model is not model and half.rope is not fp32.rope and half.rope.grid == "input"
    windows = np.random.default_rng(2).integers(0, 256, (1, vr.WINDOW, 128, 128, 3), dtype=np.uint8)
    a, b = vr.encode(fp32, windows), vr.encode(half, windows)
    assert torch.isfinite(b).all() and torch.nn.functional.cosine_similarity(a, b).item() >= 0.999
    assert half.rope.thw == (4, 8, 8) and [k[-1] for k in half.rope.tables] == [torch.float16]
    assert vr.variant(vr.Encoder("x", 64, model, device="cuda"), "auto").precision == "half"


# The default encoder with no network and an empty cache, in a fresh process (so HF_HOME is read anew).
# Every socket is refused and every DNS lookup fails, and the script's one reachability check is recorded.
OFFLINE = """
import json, socket, sys
tried = []
def refuse(address, timeout=None, *args, **kwargs):
    tried.append([list(address), timeout])
    raise OSError(101, "Network is unreachable")
def no_dns(*args, **kwargs):
    raise socket.gaierror(-3, "Temporary failure in name resolution")
socket.create_connection, socket.getaddrinfo = refuse, no_dns
import vjepa_reacher
code = vjepa_reacher.main(sys.argv[1:])
print(json.dumps(tried))
sys.exit(code)
"""


@pytest.mark.parametrize("hub_offline", ["1", None])
def test_offline_start_fails_with_one_line_and_no_run_folder(tmp_path, hub_offline):
    out = tmp_path / "runs" / "default"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), **({"HF_HUB_OFFLINE": hub_offline} if hub_offline else {}))
    p = subprocess.run([sys.executable, "-c", OFFLINE, "all", "--out", str(out)], capture_output=True, text=True,
                       cwd=HERE, env=env, timeout=300)
    assert_one_line_error(p.returncode, p.stderr, f"could not fetch checkpoint {vr.DEFAULT_ENCODER}",
                          "--encoder tiny", "--encoder state")
    tried = json.loads(p.stdout.strip().splitlines()[-1])
    if hub_offline:  # not even one connection
        assert tried == []
    else:  # the script's one check, with a short timeout; no attempt (huggingface_hub makes one too) waits unbounded
        assert [["huggingface.co", 443], 3.0] in tried
        assert len(tried) <= 3 and all(timeout is not None and timeout <= 5 for _, timeout in tried), tried
    assert not out.exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Training: splits, losses, dynamics
# ---------------------------------------------------------------------------------------------
def test_parameter_counts():
    assert n_params(vr.bc_net(1024)) == 279_490  # the seed's figure
    assert n_params(vr.Dynamics("mlp", 1024)) == 1_579_520  # seed says "~1.2M"; this is the true count
    assert n_params(vr.Dynamics("resblock", 1024)) == 10_516_480  # seed: 10.5M


@pytest.mark.parametrize("name", ["mlp", "mlp_rollout5", "resblock"])
def test_dynamics_with_a_zeroed_last_layer_is_the_identity(name):
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(6, 12, generator=g), torch.rand(6, 2, generator=g) * 2 - 1
    model = vr.Dynamics(name, 12, resblock_relu=True)
    assert not torch.equal(model(z, a), z)
    torch.nn.init.zeros_(model.net[-1].weight)
    torch.nn.init.zeros_(model.net[-1].bias)
    assert torch.equal(model(z, a), z)  # f(z, a) = z + net([z, a]) exactly


def test_the_seeds_one_start_batches_apply_to_its_5_step_model_only(monkeypatch):
    """Its 1-step mlp and resblock trained on every transition in batches of 256; only its 5-step model on
    batches of 64 episodes sharing one start. 10 episodes of 20 steps, the last 2 held out (contiguous)."""
    seen = {}
    def fit(model, loss, opt, n_train, n_val, epochs, batch_size, desc, **settings):
        seen[desc] = n_train, batch_size
        return {"kept_val": 0.0, "kept_epoch": 0, "history": {}}
    monkeypatch.setattr(vr, "fit", fit)
    rng = np.random.default_rng(0)
    data = {"z": rng.normal(size=(10, 21, 4)).astype(np.float32), "actions": rng.uniform(-1, 1, (10, 20, 2))}
    args = vr.parse_args(["dynamics", "--recipe", "seed", "--device", "cpu"])
    for name in ("mlp", "mlp_rollout5", "resblock"):
        vr.train_dynamics(name, data, args, epochs=1)
    assert seen == {"dynamics mlp": (8 * 20, 256), "dynamics mlp_rollout5": (8, 64), "dynamics resblock": (8 * 20, 256)}


def test_train_dtype_bf16_trains_the_dynamics_under_autocast(monkeypatch):
    rng = np.random.default_rng(1)
    data = {"z": rng.normal(size=(6, 11, 4)).astype(np.float32), "actions": rng.uniform(-1, 1, (6, 10, 2))}
    seen, forward, models = [], vr.Dynamics.forward, {}
    monkeypatch.setattr(vr.Dynamics, "forward", lambda self, z, a: seen.append(torch.is_autocast_enabled("cpu"))
                        or forward(self, z, a))
    for dtype in ("fp32", "bf16"):
        args = vr.parse_args(["dynamics", "--set", f"train_dtype={dtype}", "--device", "cpu"])
        with contextlib.redirect_stdout(io.StringIO()):
            models[dtype], info, _ = vr.train_dynamics("mlp", data, args, epochs=2)
        assert math.isfinite(info["val_loss"]) and all(p.dtype == torch.float32 for p in models[dtype].parameters())
        assert seen and all(seen) == (dtype == "bf16") and any(seen) == (dtype == "bf16")  # every batch, or none
        seen.clear()
    assert not all(torch.equal(a, b) for a, b in zip(models["fp32"].parameters(), models["bf16"].parameters()))


def test_resblock_post_add_relu():
    block = vr.ResBlock(4, post_relu=True)
    torch.nn.init.zeros_(block.block[3].weight), torch.nn.init.zeros_(block.block[3].bias)
    torch.nn.init.zeros_(block.block[4].bias)  # net(x) = LayerNorm(0) = 0, so the block is relu(x)
    x = torch.tensor([[-1.0, 2.0, -3.0, 4.0]])
    assert torch.equal(block(x), torch.tensor([[0.0, 2.0, 0.0, 4.0]]))
    block.post_relu = False
    assert torch.equal(block(x), x)


def test_unrolled_loss_weighs_each_step():
    model = vr.Dynamics("mlp", 3)
    torch.nn.init.zeros_(model.net[-1].weight)
    torch.nn.init.ones_(model.net[-1].bias)  # z' = z + 1 everywhere; the targets grow by 2 a step
    zs = torch.arange(4.0)[None, :, None] * 2 * torch.ones(1, 4, 3)  # (B 1, k+1 4, D 3): 0, 2, 4, 6
    # errors at steps 1, 2, 3: 1, 2, 3; SmoothL1 (beta 1): 0.5, 1.5, 2.5
    loss = model.unrolled_loss(zs, torch.zeros(1, 3, 2), [1.0, 10.0, 100.0])
    assert loss.item() == pytest.approx(0.5 + 15 + 250)


def test_splits_by_transition_and_by_episode():
    train, val = vr.split_episodes(1000, 0.2, seed=0)  # the seed's BC split: 1000 transitions
    assert len(val) == 200 and len(train) == 800 and not set(train) & set(val)
    assert len(set(val // 100)) > 5  # transitions of many episodes: neighbours fall on both sides
    train, val = vr.split_episodes(10, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and len(train) == 8
    train, val = vr.split_episodes(10, 0.2, contiguous=True)
    assert list(val) == [8, 9] and list(train) == list(range(8))  # the seed's dynamics: the last 20%


def test_standardizer_on_known_data():
    z = np.zeros((3, 4, 2), np.float32)
    z[0, :, 0], z[1, :, 0], z[2, :, 0] = 1, 3, 100  # episode 2 is left out below
    mean, std = vr.standardizer(z, [0, 1])
    np.testing.assert_allclose(mean, [2, 0])
    np.testing.assert_allclose(std, [1 + 1e-6, 1e-6], rtol=1e-6)
    mean, std = vr.standardizer(z, [0, 1], enabled=False)
    assert (mean == 0).all() and (std == 1).all()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)


def test_nan_loss_stops_and_keeps_last_good_weights():
    """At the 5th update (epoch 2) a finite loss with a NaN gradient turns the weights NaN; the next loss is NaN,
    and fit must put back the weights kept at epoch 1 (the last validation), not leave the NaN ones."""
    model = torch.nn.Linear(2, 1)
    calls, at_val = {"n": 0}, []

    def batch_loss(idx, split):
        calls["n"] += split == "train"
        loss = model(torch.ones(len(idx), 2)).pow(2).mean()
        if split == "val":
            at_val.append(copy.deepcopy(model.state_dict()))
        elif calls["n"] == 5:  # sqrt(|w - w|) = 0, a finite loss; its gradient at 0 is NaN
            loss = loss + (model.weight - model.weight.detach()).abs().sqrt().sum()
        return loss
    with pytest.raises(vr.UserError, match="loss became nan at epoch 2; stopped, kept the weights of epoch 1"):
        vr.fit(model, batch_loss, adamw(model), 4, 4, epochs=10, batch_size=2, keep="best")
    assert all(torch.equal(p, at_val[-1][k]) for k, p in model.state_dict().items())


@pytest.mark.parametrize("keep", ["best", "final"])
def test_fit_keeps_the_best_or_the_final_epoch(keep):
    """Training pulls w toward 1 while the validation loss is lowest at w = 0.5: 'best' keeps that epoch's weights."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    weights = []

    def batch_loss(idx, split):
        if split == "val":
            weights.append(model.weight.item())
            return (model.weight - 0.5).pow(2).sum()
        return (model.weight - 1.0).pow(2).sum()
    fitted = vr.fit(model, batch_loss, adamw(model), 4, 1, epochs=30, batch_size=2, keep=keep)
    val = fitted["history"]["val"]
    assert len(val) == 30 and len(fitted["history"]["train"]) == 30
    kept = int(np.argmin(val)) if keep == "best" else 29
    assert fitted["kept_epoch"] == kept and fitted["kept_val"] == val[kept]
    assert model.weight.item() == pytest.approx(weights[kept])


def test_kstep_copy_baseline_by_hand_at_k_1_to_3():
    """z_t = t^2 on one dimension, starts 0, 1, 2: the copy baseline |s^2 - (s + k)^2| = 2sk + k^2 averages to
    k^2 + 2k, so 3, 8 and 15; a model that adds 2t + 1 (the true step) has no error."""
    class Square(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, a):
            return z + 2 * torch.sqrt(z) + 1  # (t + 1)^2 from t^2
    z = (np.arange(6.0) ** 2).reshape(1, 6, 1).astype(np.float32)
    space = (np.zeros(1, np.float32), np.ones(1, np.float32))
    err, copy_z = vr.kstep_error(Square(), z, np.zeros((1, 5, 2), np.float32), [0], space, space, k_max=3)
    assert copy_z == pytest.approx([3, 8, 15]) and err == pytest.approx([0, 0, 0], abs=1e-5)


@pytest.mark.parametrize("name", ["mlp", "mlp_rollout5", "resblock"])
def test_dynamics_output_depends_on_the_action(name):
    torch.manual_seed(0)
    model, z = vr.Dynamics(name, 6), torch.randn(4, 6)
    a = torch.rand(4, 2) * 2 - 1
    assert not torch.allclose(model(z, a), model(z, -a))
    assert torch.equal(model(z, a), model(z.clone(), a.clone()))


class Linear(torch.nn.Module):
    """z' = z + B a with a known B (a parameter, so the model has a device)."""

    def __init__(self, B):
        super().__init__()
        self.B = torch.nn.Parameter(B, requires_grad=False)

    def forward(self, z, a):
        return z + a @ self.B.T


def linear_problem(batch=3, dim=4, seed=0):
    """A linear model and goals it reaches in 10 steps from z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    model = Linear(torch.randn(dim, 2, generator=g) * 0.3)
    goal = (torch.rand(batch, 10, 2, generator=g) * 1.6 - 0.8).sum(1) @ model.B.T
    return model, torch.zeros(batch, dim), goal


class Standardised(torch.nn.Module):
    """`model` seen through the standardisation (mean, std): it maps (z - mean) / std one step forward."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, torch.from_numpy(mean), torch.from_numpy(std)

    def forward(self, zs, a):
        return (self.model(zs * self.std + self.mean, a) - self.mean) / self.std


def test_perfect_model_has_zero_kstep_error_in_any_common_space():
    model, _, _ = linear_problem(dim=5)
    actions = np.random.default_rng(0).uniform(-1, 1, (3, 20, 2)).astype(np.float32)
    z = np.zeros((3, 21, 5), np.float32)
    with torch.no_grad():
        for t in range(20):
            z[:, t + 1] = model(torch.from_numpy(z[:, t]), torch.from_numpy(actions[:, t])).numpy()
    raw = (np.zeros(5, np.float32), np.ones(5, np.float32))
    err, copy_raw = vr.kstep_error(model, z, actions, [0, 1, 2], raw, raw)
    assert len(err) == 10 and max(err) < 1e-5
    assert min(copy_raw) > 0.01  # the copy baseline does see motion
    # a model trained on standardised latents, scored in another space: still exact; the baseline scales by 1/std
    space = (np.full(5, 0.3, np.float32), np.full(5, 2.0, np.float32))
    common = (np.full(5, -0.1, np.float32), np.full(5, 0.5, np.float32))
    err, copy_common = vr.kstep_error(Standardised(model, *space), z, actions, [0, 1, 2], space, common)
    assert max(err) < 1e-4
    np.testing.assert_allclose(copy_common, np.array(copy_raw) / 0.5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
def test_cem_converges_on_a_quadratic_for_every_seed():
    """cost = ||a - a*||^2 over the horizon, a* inside the action box: the minimum is a* itself."""
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        target = torch.rand(4, 5, 2, generator=g) * 1.8 - 0.9  # (batch, horizon, action)

        def cost(actions):
            return (actions - target[:, None]).pow(2).sum((-1, -2))
        best, mean, std = vr.cem(cost, 4, 5, samples=200, elites=20, iterations=12, generator=g)
        assert best.shape == mean.shape == std.shape == (4, 5, 2)
        assert (mean - target).abs().max() < 0.05, seed
        assert (best - target).abs().max() < 0.15 and cost(best[:, None]).max() < 0.05, seed
        assert std.max() < 0.1 and std.min() >= 0.05  # shrunk onto the optimum, clamped at min_std


def test_cem_and_random_shooting_beat_random_actions():
    model, z0, goal = linear_problem()
    cost = vr.latent_cost(model, z0, goal)
    g = torch.Generator().manual_seed(0)
    random_cost = cost(torch.rand(3, 500, 10, 2, generator=g) * 2 - 1).mean().item()
    best, _, _ = vr.cem(cost, 3, 10, samples=500, elites=50, iterations=5, generator=g)
    rs, _, _ = vr.cem(cost, 3, 10, samples=1000, elites=1, iterations=1, uniform_first=True, generator=g)
    cem_cost, rs_cost = cost(best[:, None]).mean().item(), cost(rs[:, None]).mean().item()
    assert cem_cost < 0.1 * random_cost and rs_cost < 0.5 * random_cost
    assert cem_cost < 0.1 * goal.norm(dim=-1).mean().item()  # close to the true minimum, 0
    assert best.abs().max() <= 1 and rs.abs().max() <= 1  # actions are clamped to their bounds


def test_bf16_planning_keeps_the_plan_quality():
    model, z0, goal = linear_problem()
    costs = {}
    for dtype in (torch.float32, torch.bfloat16):
        fn = vr.latent_cost(model, z0, goal, "final", dtype)
        best, _, _ = vr.cem(fn, 3, 10, generator=torch.Generator().manual_seed(0))
        costs[dtype] = vr.latent_cost(model, z0, goal)(best[:, None]).mean().item()
    scale = goal.norm(dim=-1).mean().item()
    assert costs[torch.bfloat16] < 0.1 * scale and abs(costs[torch.bfloat16] - costs[torch.float32]) < 0.05 * scale


def test_weighted_cost_matches_a_hand_computation_on_a_linear_model():
    class Shift(torch.nn.Module):
        def forward(self, z, a):
            return z + torch.cat([a, torch.zeros(len(a), z.shape[1] - 2)], 1)
    z, goal = torch.zeros(1, 3), torch.tensor([[3.0, 0.0, 4.0]])
    actions = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # (batch 1, sample 1, horizon 2, 2)
    # imagined z: (1,0,0) then (2,0,0); distances to the goal: sqrt(4+16), sqrt(1+16)
    d1, d2 = math.sqrt(20), math.sqrt(17)
    cost = {c: vr.latent_cost(Shift(), z, goal, c)(actions).item() for c in ("final", "weighted")}
    assert cost["final"] == pytest.approx(d2) and cost["weighted"] == pytest.approx(0.5 * d1 + 1.0 * d2)


def test_cem_returns_the_best_sample_seen_and_mpc_best_executes_its_first_action():
    target = torch.tensor([0.3, -0.6])
    seen = []

    def recording(actions):  # known optimum: every step at `target`
        costs = (actions - target).pow(2).sum((-1, -2))
        seen.append((actions, costs))
        return costs
    best, _, _ = vr.cem(recording, 1, 3, samples=64, elites=8, iterations=3, generator=torch.Generator().manual_seed(0))
    all_actions, all_costs = torch.cat([a for a, _ in seen], 1), torch.cat([c for _, c in seen], 1)
    assert torch.equal(best[0], all_actions[0, all_costs[0].argmin()])

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, a):
            return z
    args = vr.parse_args(["plan", "--recipe", "seed", "--set", "cost=final", "--horizon", "3", "--samples", "64",
                          "--elites", "8", "--iterations", "3", "--device", "cpu"])
    assert args.execute == "best" and args.cem_init_std == 0.5
    mpc = vr.make_mpc(args, "cem", Zero(), {0: np.zeros(2, np.float32)}, (np.zeros(2, np.float32),
                                                                          np.ones(2, np.float32)))
    action = mpc(np.zeros((1, 2), np.float32), {"seed": [0], "step": 0})
    g = torch.Generator().manual_seed(args.seed)  # the same draws as the MPC's own generator
    fn = vr.latent_cost(Zero(), torch.zeros(1, 2), torch.zeros(1, 2), "final")
    best, _, _ = vr.cem(fn, 1, 3, samples=64, elites=8, iterations=3, init_std=0.5, generator=g)
    np.testing.assert_allclose(action, best[:, 0].numpy())


def test_cem_keeps_the_best_sample_of_an_earlier_iteration():
    """Costs rise by 100 each iteration, so the best sample ever seen comes from the first one, not the last."""
    seen = []

    def rising(actions):
        costs = (actions - 0.3).pow(2).sum((-1, -2)) + 100 * len(seen)
        seen.append((actions, costs))
        return costs
    best, _, _ = vr.cem(rising, 2, 3, samples=16, elites=4, iterations=3, generator=torch.Generator().manual_seed(0))
    first, costs = seen[0]
    assert torch.equal(best, first[torch.arange(2), costs.argmin(1)])


def test_static_cem_is_cem_on_fixed_buffers_with_noise_drawn_up_front():
    model = vr.Dynamics("mlp", 10).eval()
    z, goal, mean = torch.randn(3, 10), torch.randn(3, 10), torch.zeros(3, 5, 2)
    fn, sizes = vr.latent_cost(model, z, goal), dict(samples=32, elites=4, iterations=3, init_std=1.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = vr.cem(fn, 3, 5, mean=mean, generator=g1, **sizes)
    up_front = torch.stack([torch.randn(3, 32, 5, 2, generator=g2) for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(drawn, vr.cem(fn, 3, 5, mean=mean, noise=up_front, **sizes)))
    args = vr.parse_args(["plan", "--samples", "32", "--elites", "4", "--iterations", "3", "--horizon", "5",
                          "--set", "plan_graph=on", "--device", "cpu"])
    mpc = vr.make_mpc(args, "cem", model, {0: goal[0].numpy()}, (np.zeros(10, np.float32), np.ones(10, np.float32)))
    g = torch.Generator().manual_seed(args.seed)  # the same draws as the MPC's own generator
    noise = [torch.randn(3, 1, 32, 5, 2, generator=g) for _ in range(3)]
    fn = vr.latent_cost(model, z[:1], goal[:1])
    action = mpc(z[:1].numpy(), {"seed": [0], "step": 0})  # on the CPU the graph's code runs eagerly
    first = vr.cem(fn, 1, 5, mean=torch.zeros(1, 5, 2), noise=noise[0], **sizes)[1][:, 0]
    np.testing.assert_array_equal(action, first)
    again = mpc(z[:1].numpy(), {"seed": [0], "step": 1})  # the same buffers, fresh noise, a warm start
    assert len(mpc.graph.captured) == 1 and not np.array_equal(again, action)
    cold = mpc(z[:1].numpy(), {"seed": [0], "step": 0})  # a new episode starts cold, not from the last mean
    np.testing.assert_array_equal(cold, vr.cem(fn, 1, 5, mean=torch.zeros(1, 5, 2), noise=noise[2], **sizes)[1][:, 0])


def test_tf32_only_while_planning_with_the_new_api_only():
    with vr.gpu.tf32("cuda"):  # TF32 only while planning, and only where it means something
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision != "tf32"
    torch.get_float32_matmul_precision()  # the legacy read works again: no mixed state is left behind
    with vr.gpu.tf32("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"


def test_compiled_encoder_pads_the_last_batch_and_never_recompiles(monkeypatch):
    assert vr.parse_args(["all"]).compile == "off" and vr.parse_args(["all"]).plan_graph == "off"  # opt-in
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    windows = np.random.default_rng(4).integers(0, 256, (6, vr.WINDOW, 256, 256, 3), dtype=np.uint8)
    plain = vr.encode(vr.load_encoder("tiny", precision="fp32", batch_size=4), windows)
    compiled = vr.load_encoder("tiny", precision="fp32", batch_size=4)
    compiled.model.encoder = vr.gpu.Compiled(compiled.model.encoder, backend="eager")  # as --set compile=on does
    z = vr.encode(compiled, windows)  # 4 eagerly (the first call), then 2 compiled, padded to 8
    assert z.shape == (6, 64) and isinstance(compiled.model.encoder, vr.gpu.Compiled)
    torch.testing.assert_close(z, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vr.encode(compiled, windows), plain, rtol=1e-5, atol=1e-6)  # 4 and 2: both 8 again
    torch._dynamo.reset()


def test_mpc_moves_a_linear_system_to_its_goal():
    """z' = z + 0.2 a from 0 toward a goal 0.64 away: replanning every step, MPC gets there and stays near.
    (With cost=final the plan may arrive only at its horizon, so each replan can postpone the arrival.)"""
    model = Linear(0.2 * torch.eye(2))
    goal = np.array([0.5, -0.4], np.float32)
    for seed in range(5):
        args = vr.parse_args(["plan", "--set", "cost=weighted", "--horizon", "5", "--samples", "100", "--elites", "10",
                              "--seed", str(seed), "--device", "cpu"])
        mpc = vr.make_mpc(args, "cem", model, {9: goal}, (np.zeros(2, np.float32), np.ones(2, np.float32)))
        z, distances = np.zeros((1, 2), np.float32), []
        for t in range(15):  # execute the first action, replan from where it led
            action = torch.from_numpy(mpc(z, {"seed": [9], "step": t}).astype(np.float32))
            assert action.shape == (1, 2) and action.abs().max() <= 1
            z = model(torch.from_numpy(z), action).detach().numpy()
            distances.append(np.linalg.norm(z[0] - goal))
        assert np.mean(distances[-5:]) < 0.25 * np.linalg.norm(goal), (seed, distances)
    assert mpc.seconds > 0


# ---------------------------------------------------------------------------------------------
# Every --recipe seed knob that can act on the oracle acts where its stage reads it (issue 28)
# ---------------------------------------------------------------------------------------------
def knob_values(name):
    """The seed's value and another: ours, or where ours is the same (or follows an option) the knob's `also`."""
    knob = vr.KNOBS[name]
    return knob.seed, knob.ours if not isinstance(knob.ours, vr.SameAs) and knob.ours != knob.seed else knob.also[0]


def scaled_linear_data(E=10, T=40, D=4):
    """z' = z + B a on E episodes of T steps, dimensions on scales 1 to 1000 (where standardising acts)."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (E, T, 2)).astype(np.float32)
    B, z = rng.normal(size=(2, D)).astype(np.float32), np.zeros((E, T + 1, D), np.float32)
    z[:, 0] = rng.normal(size=(E, D))
    for t in range(T):
        z[:, t + 1] = z[:, t] + actions[:, t] @ B
    return {"z": z * np.float32([1, 10, 100, 1000]), "actions": actions}


def trained(stage, name, value, model="mlp"):
    """(weights, validation history, kept epoch) of BC or one dynamics model trained 4 epochs with knob=value."""
    args = vr.parse_args([stage, "--device", "cpu", "--epochs", "4", "--set", f"{name}={value}"])
    with contextlib.redirect_stdout(io.StringIO()):
        net, info, _ = (vr.train_bc(scaled_linear_data(), args) if stage == "bc" else
                        vr.train_dynamics(model, scaled_linear_data(), args, epochs=4))
    return torch.cat([p.flatten() for p in net.state_dict().values()]), info["history"]["val"], info["kept_epoch"]


@pytest.mark.parametrize("stage, name, model", [
    *[("bc", k, None) for k in ("bc_optimizer", "bc_lr", "bc_weight_decay", "schedule_step", "bc_batch_size",
                                "bc_split", "bc_norm")],
    *[("dynamics", k, "mlp") for k in ("dyn_lr", "dyn_grad_clip", "dyn_split", "dyn_norm", "schedule_step",
                                       "train_dtype")],
    *[("dynamics", k, "mlp_rollout5") for k in ("rollout_loss", "rollout_sampling", "rollout_val")],
    ("dynamics", "resblock_relu", "resblock")])
def test_each_training_knob_changes_what_is_trained(stage, name, model):
    (w_seed, val_seed, _), (w_other, val_other, _) = (trained(stage, name, v, model) for v in knob_values(name))
    assert not torch.equal(w_seed, w_other) or val_seed != val_other, name


def test_bc_keep_best_keeps_an_earlier_epoch_than_final():
    kept = {v: trained("bc", "bc_keep", v)[2] for v in ("final", "best")}
    assert kept["final"] == 3 and kept["best"] < 3


def test_rollout_val_scores_the_seeds_every_10th_start(monkeypatch):
    """The seed validated mlp_rollout5 from t0 in range(0, T - 5, 10): at T = 40, starts 0, 10, 20, 30; at T = 25,
    0 and 10 (not 20: the seed's range stops before T - 5)."""
    seen = []
    monkeypatch.setattr(vr, "fit", lambda model, loss, opt, n_train, n_val, *rest, **settings: seen.append(n_val)
                        or {"kept_val": 0.0, "kept_epoch": 0, "history": {}})
    args = vr.parse_args(["dynamics", "--recipe", "seed", "--device", "cpu"])
    for T in (40, 25):
        vr.train_dynamics("mlp_rollout5", scaled_linear_data(T=T), args, epochs=1)
    assert seen == [2 * 4, 2 * 2]  # 2 validation episodes (the last 20%), 4 and 2 starts each


def planned(name, value):
    """Actions of two CEM control steps (the second warm-started) on a random mlp, with knob=value."""
    args = vr.parse_args(["plan", "--device", "cpu", "--horizon", "4", "--samples", "32", "--elites", "4",
                          "--iterations", "2", "--set", f"{name}={value}"])
    torch.manual_seed(0)
    model, goal = vr.Dynamics("mlp", 4).eval(), np.ones(4, np.float32)
    mpc = vr.make_mpc(args, "cem", model, {0: goal, 1: -goal}, (np.zeros(4, np.float32), np.ones(4, np.float32)))
    return (np.stack([mpc(np.zeros((2, 4), np.float32), {"seed": [0, 1], "step": t}) for t in range(2)]),
            mpc.graph is not None)


@pytest.mark.parametrize("name", ["cem_init_std", "elite_std", "warm_tail", "cost", "execute", "plan_dtype",
                                  "plan_graph"])
def test_each_planner_knob_changes_the_actions(name):
    """plan_graph draws the same noise on the CPU (the same plan, test_static_cem...): there its static path ran."""
    (first, graphs_first), (second, graphs_second) = (planned(name, v) for v in knob_values(name))
    assert not np.array_equal(first, second) or graphs_first != graphs_second, name


def test_elite_std_unbiased_is_the_seeds_std():
    elites = torch.tensor([0.0, 0.2, 0.4, 0.6])[None, :, None, None].expand(1, 4, 1, 2)  # 4 samples, all elites
    for unbiased, var in ((True, 0.2 / 3), (False, 0.2 / 4)):  # squared deviations from 0.3 sum to 0.2
        _, _, std = vr.cem(lambda a: a.sum((-1, -2)), 1, 1, samples=4, elites=4, iterations=1, noise=elites[None],
                           mean=torch.zeros(1, 1, 2), std=torch.ones(1, 1, 2), unbiased=unbiased)
        assert std[0, 0, 0].item() == pytest.approx(math.sqrt(var))


def test_collect_knobs_pick_the_seeds_episodes_and_demo_expert(monkeypatch, tmp_path):
    """episode_seeds=seed: demos and exploration on episodes 0..N-1; demo_expert=p: BC clones the P-controller."""
    seen = []
    monkeypatch.setattr(vr, "collect_shard", lambda args, enc, folder, seeds, expert, eps: seen.append(
        (seeds[:2], expert)) or {})
    monkeypatch.setattr(vr, "merge", lambda *a: None)
    for recipe in ("seed", "ours"):
        args = vr.parse_args(["collect", "--recipe", recipe, "--encoder", "state", "--episodes", "3",
                              "--out", str(tmp_path / recipe)])
        with contextlib.redirect_stdout(io.StringIO()):
            vr.stage_collect(args, vr.load_encoder("state"))
            vr.STAGES["explore"](args, vr.load_encoder("state"))
    base = vr.episode_seeds("collect", 1, 0)[0]
    assert seen[:2] == [([0, 1], "p"), ([0, 1], "p")] and seen[2] == ([base, base + 1], "jacobian")
    assert vr.parse_args(["bc", "--recipe", "seed"]).expert == "p"
    assert vr.parse_args(["bc", "--recipe", "seed", "--expert", "jacobian"]).demo_expert == "jacobian"  # typed wins


def test_rollout_epochs_sets_the_5_step_models_epochs(state_run, monkeypatch):
    class Trained(Exception):
        pass

    def stop(name, data, args, epochs):
        raise Trained(epochs)
    monkeypatch.setattr(vr, "train_dynamics", stop)
    for epochs in (150, 100):
        args = vr.parse_args(["dynamics", "--encoder", "state", "--dynamics", "mlp_rollout5", "--force",
                              "--set", f"rollout_epochs={epochs}", "--out", state_run[0]])
        with pytest.raises(Trained) as caught:
            vr.stage_dynamics(args, vr.load_encoder("state"))
        assert caught.value.args == (epochs,)


def test_goal_knobs_pick_the_goal_expert_and_its_horizon():
    seeds, enc = vr.episode_seeds("plan", 3, 0), vr.load_encoder("state")
    goals = {}
    for expert, horizon in (("p", 60), ("jacobian", 60), ("jacobian", 4)):
        args = vr.parse_args(["plan", "--encoder", "state", "--set", f"goal_expert={expert}",
                              "--set", f"goal_horizon={horizon}"])
        goals[expert, horizon] = vr.plan_goals(args, enc, seeds, "expert")[1]
    assert max(g["step"] for g in goals["jacobian", 4]) <= 4 < max(g["step"] for g in goals["jacobian", 60])
    assert [g["distance"] for g in goals["p", 60]] != [g["distance"] for g in goals["jacobian", 60]]


def test_plan_stage_knobs_set_the_episode_lengths_and_random_shootings_goal(state_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(state_run[0], out)
    sizes = ["--encoder", "state", "--dynamics", "mlp", "--plans", "random/mlp", "cem/mlp", "--plan-episodes", "2",
             "--samples", "16", "--elites", "4", "--rs-samples", "32", "--iterations", "2", "--horizon", "3",
             "--force", "--out", out, "--set", "plan_steps=7", "--long-episodes", "0"]
    plans = {}
    for rs_goal, rs_steps, long in (("random-run", 5, "0"), ("expert", 7, "1")):
        ok("plan", *sizes, "--set", f"rs_goal={rs_goal}", "--set", f"rs_plan_steps={rs_steps}",
           "--plan-long-episodes", long)
        plans[rs_goal] = results(out)["plan"]
        assert plans[rs_goal]["cem/mlp"]["steps"] == 7 and plans[rs_goal]["random/mlp"]["steps"] == rs_steps
    rows = table_rows(open(os.path.join(out, "report.md")).read())
    for name, m in plans["expert"].items():  # each planner's return over reacher-easy's own 1,000 steps
        long = m["standard"]
        assert long["n"] == 1 and 0 <= long["return"] <= vr.MAX_STEPS and long["ms_per_action"] > 0, name
        assert rows[name][-2] == f"{long['return']:.0f} ± {long['return_ci']:.0f} (n = 1)", rows[name]
    assert not any("standard" in m for m in plans["random-run"].values())
    same_goal = {k: p["random/mlp"]["goal_distance"] == p["cem/mlp"]["goal_distance"] for k, p in plans.items()}
    assert same_goal == {"random-run": False, "expert": True}


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------
def test_probe_velocity_is_taken_within_episodes(monkeypatch):
    """The finger moves +x within each episode and jumps back -10 m between episodes: every velocity target is
    (1, 0), and the first step of each episode (no velocity yet) is left out, never differenced across episodes."""
    seen = {}
    monkeypatch.setattr(report, "ridge_probe", lambda z, Y, episode: seen.setdefault(len(seen), (Y, episode)) and 0.0)
    states = np.zeros((3, 4, len(vr.STATE_NAMES)), np.float32)
    states[..., 6] = -10 * np.arange(3)[:, None] + 0.1 * np.arange(4)
    report.probe_embeddings(np.random.default_rng(0).normal(size=(12, 5)), states)
    Y, episode = seen[3]  # finger_xy, target_xy, joint_angles, velocity_direction
    np.testing.assert_allclose(Y, np.tile([1.0, 0.0], (9, 1)), atol=1e-6)
    assert list(episode) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_probe_recovers_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(10, 30, len(vr.STATE_NAMES))).astype(np.float32)
    flat = states.reshape(300, -1)
    planted = np.concatenate([flat @ rng.normal(size=(flat.shape[1], 40)), rng.normal(size=(300, 20)) * 0.01], 1)
    noise = rng.normal(size=(300, 60))
    r_planted = report.probe_embeddings(planted, states)
    r_noise = report.probe_embeddings(noise, states)
    for k in ("finger_xy", "target_xy", "joint_angles"):
        assert r_planted[k] > 0.99
        assert abs(r_noise[k]) < 0.15


# ---------------------------------------------------------------------------------------------
# SAC (sac.py): known answers for one update, then a toy task, the buffers and the agent
# ---------------------------------------------------------------------------------------------
def sac_problem(seed=0, dim=3, n=6, hidden=8, lr=1e-2):
    """Tiny SAC nets with fixed weights, a target critic that differs from the critic (and whose second head
    is much lower than its first), and a batch with two terminal transitions."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        actor, critic = sac.Actor(dim, 2, hidden), sac.QNet(dim, 2, hidden)
    target = copy.deepcopy(critic).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        target.q2[-1].bias -= 3.0  # min(Q1, Q2) is Q2: taking Q1 or the mean would show
    log_alpha = torch.tensor(math.log(0.2), requires_grad=True)
    nets = {"actor": actor, "critic": critic, "critic_target": target, "log_alpha": log_alpha}
    optims = {"actor": torch.optim.Adam(actor.parameters(), lr=lr),
              "critic": torch.optim.Adam(critic.parameters(), lr=lr), "alpha": torch.optim.Adam([log_alpha], lr=lr)}
    batch = {"z": torch.randn(n, dim, generator=g), "a": torch.rand(n, 2, generator=g) * 2 - 1,
             "r": torch.rand(n, generator=g), "z_next": torch.randn(n, dim, generator=g),
             "done": torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])[:n]}
    return nets, optims, batch


def clone_nets(nets, lr=1e-2):
    ref = {k: copy.deepcopy(v) if k != "log_alpha" else v.detach().clone().requires_grad_(True)
           for k, v in nets.items()}
    return ref, {"actor": torch.optim.Adam(ref["actor"].parameters(), lr=lr),
                 "critic": torch.optim.Adam(ref["critic"].parameters(), lr=lr),
                 "alpha": torch.optim.Adam([ref["log_alpha"]], lr=lr)}


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_sac_update_matches_a_hand_computation():
    gamma, tau, target_entropy = 0.9, 0.3, -2.0
    nets, optims, batch = sac_problem()
    ref, ref_optims = clone_nets(nets)
    target_before = params(nets["critic_target"])
    info = sac.sac_update(nets, optims, batch, gamma, tau, target_entropy, torch.Generator().manual_seed(7))

    # The same steps by hand, with the same random draws: first a' ~ pi(z'), then a ~ pi(z).
    g = torch.Generator().manual_seed(7)
    alpha = ref["log_alpha"].detach().exp()
    with torch.no_grad():
        a_next, logp_next = ref["actor"].sample(batch["z_next"], g)
        q1_next, q2_next = ref["critic_target"](batch["z_next"], a_next)
        assert (q2_next < q1_next).all()
        y = batch["r"] + gamma * (1 - batch["done"]) * (q2_next - alpha * logp_next)  # soft Bellman, twin minimum
    assert torch.equal(y[batch["done"] == 1], batch["r"][batch["done"] == 1])  # no bootstrap past a terminal
    q1, q2 = ref["critic"](batch["z"], batch["a"])
    critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    assert info["critic_loss"] == pytest.approx(critic_loss.item(), rel=1e-6)
    y_q1 = batch["r"] + gamma * (1 - batch["done"]) * (q1_next - alpha * logp_next)
    assert abs(((q1 - y_q1) ** 2).mean() + ((q2 - y_q1) ** 2).mean() - critic_loss) > 0.1  # the minimum mattered
    ref_optims["critic"].zero_grad()
    critic_loss.backward()
    ref_optims["critic"].step()
    for p, p_ref in zip(nets["critic"].parameters(), ref["critic"].parameters()):
        # the critic took exactly its own step: the actor's loss added no gradient and no step to it
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
        assert p.requires_grad

    a, logp = ref["actor"].sample(batch["z"], g)
    actor_loss = (alpha * logp - torch.minimum(*ref["critic"](batch["z"], a))).mean()
    assert info["actor_loss"] == pytest.approx(actor_loss.item(), rel=1e-5)
    ref_optims["actor"].zero_grad()
    actor_loss.backward()
    ref_optims["actor"].step()
    for p, p_ref in zip(nets["actor"].parameters(), ref["actor"].parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)

    alpha_loss = -(ref["log_alpha"] * (logp.detach() + target_entropy)).mean()
    ref_optims["alpha"].zero_grad()
    alpha_loss.backward()
    ref_optims["alpha"].step()
    torch.testing.assert_close(nets["log_alpha"], ref["log_alpha"], rtol=1e-6, atol=1e-7)
    assert info["alpha"] == pytest.approx(0.2) and info["entropy"] == pytest.approx(-logp.mean().item(), rel=1e-5)

    # Polyak: target <- tau critic + (1 - tau) target, with the critic after its step
    for p_target, p, before in zip(nets["critic_target"].parameters(), nets["critic"].parameters(), target_before):
        torch.testing.assert_close(p_target, tau * p + (1 - tau) * before, rtol=1e-6, atol=1e-7)
        assert not p_target.requires_grad and p_target.grad is None


@pytest.mark.parametrize("target_entropy, direction", [(5.0, 1), (-50.0, -1)])
def test_entropy_coefficient_rises_below_the_target_entropy_and_falls_above(target_entropy, direction):
    # A 2-d action in [-1, 1]^2 has entropy at most log 4 = 1.39 < 5, and the policy's is far above -50.
    lr = 1e-2
    nets, optims, batch = sac_problem(lr=lr)
    before = nets["log_alpha"].item()
    info = sac.sac_update(nets, optims, batch, target_entropy=target_entropy,
                          generator=torch.Generator().manual_seed(1))
    assert (info["entropy"] < target_entropy) == (direction == 1)
    step = nets["log_alpha"].item() - before
    assert step * direction > 0 and abs(step) == pytest.approx(lr, rel=1e-3)  # Adam's first step: lr x sign


def point_episodes(policy, seeds, T=30, radius=0.15, speed=0.2):
    """A toy task with a known answer: a point in [-1, 1]^2 must move to the origin and stay there.
    x' = clip(x + speed a); reward 1 inside `radius` of the origin, else 0 (sparse, like reacher-easy).
    All episodes run in lockstep through policy(z, obs)."""
    x = np.stack([np.random.default_rng(s).uniform(-1, 1, 2) for s in seeds]).astype(np.float32)
    z, actions, rewards = [x], [], []
    for _ in range(T):
        a = np.asarray(policy(x, {"seed": list(seeds)}), np.float32)
        x = np.clip(x + speed * a, -1, 1).astype(np.float32)
        z.append(x), actions.append(a), rewards.append((np.linalg.norm(x, axis=1) < radius).astype(np.float32))
    z, actions, rewards = np.stack(z, 1), np.stack(actions, 1), np.stack(rewards, 1)
    return [{"z": z[i], "actions": actions[i], "rewards": rewards[i], "seed": s} for i, s in enumerate(seeds)]


@pytest.mark.parametrize("seed", [0, 1])
def test_sac_solves_point_task(seed, one_thread):
    # Sized for seconds: hidden 64, batch 64, a short warm-up, higher learning rates and gamma 0.9 for a 30-step
    # task; otherwise sac.py's agent and update. Seeds 0-11 all reached 100% when this was sized (by ~6 chunks).
    agent = sac.SACAgent(2, np.zeros(2), np.full(2, 0.6), action_repeat=1, hidden=64, batch_size=64,
                         learning_starts=100, actor_lr=2e-3, critic_lr=5e-3, gamma=0.9, seed=seed)
    for chunk in range(7):  # 7 x 8 episodes x 30 steps = 1,680 steps, 1,440 updates
        for ep in point_episodes(agent, [1000 * seed + 8 * chunk + i for i in range(8)]):
            agent.add_episode(ep)
    assert agent.env_steps == 1680 and agent.updates == 1440 and len(agent.buffer) == 1680
    eval_seeds = list(range(10 ** 6, 10 ** 6 + 50))
    rng = np.random.default_rng(seed)
    trained = point_episodes(agent.greedy, eval_seeds)
    random = point_episodes(lambda z, obs: rng.uniform(-1, 1, (len(z), 2)), eval_seeds)
    final = np.mean([ep["rewards"][-1] for ep in trained])
    assert np.mean([ep["rewards"][-1] for ep in random]) < 0.2
    assert final >= 0.9, f"greedy SAC reached the origin in only {final:.0%} of episodes"
    assert np.mean([ep["rewards"].sum() for ep in trained]) > 20  # there within ~8 of 30 steps, then stays
    assert agent.info["alpha"] < 1.0 and np.isfinite(agent.info["critic_loss"])


def test_sac_takes_any_action_size():
    """sac.py is copied whole into other tasks: nothing in it may assume reacher's two torques."""
    rng = np.random.default_rng(0)
    ep = {"z": rng.normal(size=(9, 4)).astype(np.float32), "actions": rng.uniform(-1, 1, (8, 3)).astype(np.float32),
          "rewards": np.ones(8, np.float32)}
    agent = sac.SACAgent(4, np.zeros(4), np.ones(4), action_repeat=1, hidden=16, batch_size=8, learning_starts=4,
                         action_dim=3)
    z = np.zeros((4, 4), np.float32)
    assert agent(z, {}).shape == (4, 3) and agent.updates == 0  # the uniform warm-up
    agent.add_episode(ep)
    assert agent(z, {}).shape == (4, 3) and agent.updates == 4  # the actor, and updates on its own batches
    assert agent.greedy(z, {}).shape == (4, 3) and agent.buffer.a.shape[1] == 3 and agent.target_entropy == -3
    log_alpha = torch.zeros((), requires_grad=True)  # plain SGD, lr 1: log alpha moves by exactly entropy gap
    optims = {"actor": torch.optim.SGD(agent.nets["actor"].parameters(), lr=0.0),
              "critic": torch.optim.SGD(agent.nets["critic"].parameters(), lr=0.0),
              "alpha": torch.optim.SGD([log_alpha], lr=1.0)}
    info = sac.sac_update(dict(agent.nets, log_alpha=log_alpha), optims, agent.buffer.sample(8, rng))
    assert log_alpha.item() == pytest.approx(-info["entropy"] - 3, rel=1e-5)  # the default target: -action_dim


def test_actor_log_prob_matches_torch_distributions():
    actor = sac.Actor(3, 2, hidden=16)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    a, logp = actor.sample(z, torch.Generator().manual_seed(0))
    mean, log_std = actor(z)
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(-1) - torch.log(1 - a ** 2).sum(-1)
    assert torch.allclose(logp, expected, atol=1e-3)
    assert a.abs().max() <= 1 and (log_std >= sac.LOG_STD_MIN).all() and (log_std <= sac.LOG_STD_MAX).all()


# ---------------------------------------------------------------------------------------------
# imagine.py: behaviour learning in imagination (Phase 5)
# ---------------------------------------------------------------------------------------------
def test_lambda_return_by_hand():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])  # r_1, r_2, r_3
    values = torch.tensor([[0.5], [1.0], [2.0], [4.0]])  # v_0 .. v_3
    # R_3 = v_3 = 4; R_2 = 2 + 0.9 (0.5 * 4 + 0.5 * 4) = 5.6; R_1 = 0 + 0.9 (0.5 * 2 + 0.5 * 5.6) = 3.42;
    # R_0 = 1 + 0.9 (0.5 * 1 + 0.5 * 3.42) = 2.989
    R = imagine.lambda_return(rewards, values, gamma=0.9, lam=0.5)
    assert R.shape == (3, 1) and torch.allclose(R[:, 0], torch.tensor([2.989, 3.42, 5.6]))
    monte_carlo = imagine.lambda_return(rewards, values, gamma=0.9, lam=1.0)[0, 0]
    assert monte_carlo.item() == pytest.approx(1 + 0.9 * 0 + 0.81 * 2 + 0.729 * 4)
    td0 = imagine.lambda_return(rewards, values, gamma=0.9, lam=0.0)[:, 0]
    assert torch.allclose(td0, torch.tensor([1 + 0.9 * 1.0, 0 + 0.9 * 2.0, 2 + 0.9 * 4.0]))


def test_return_scale_is_a_debiased_percentile_range_never_below_one():
    scale = imagine.ReturnScale()
    assert scale(torch.arange(101.0)) == pytest.approx(90.0)  # P95 - P5 of 0..100, debiased after one update
    # a second batch (P5 0.5, P95 9.5): EMAs with decay 0.99, debiased by 1 - 0.99^2
    assert scale(torch.arange(11.0)) == pytest.approx((0.99 * 0.01 * 90 + 0.01 * 9) / (1 - 0.99 ** 2))
    assert imagine.ReturnScale()(torch.linspace(3.0, 3.5, 50)) == 1.0  # a small range is not blown up


class Linear2(torch.nn.Module):
    """A differentiable toy dynamics z' = z + W [z, a] (action-free if uses_action is False)."""

    def __init__(self, dim, uses_action=True):
        super().__init__()
        self.w, self.uses_action = torch.nn.Linear(dim + 2, dim), uses_action

    def forward(self, z, a):
        return z + self.w(torch.cat([z, a if self.uses_action else torch.zeros_like(a)], -1))


def filled_learner(dynamics, dim=3, n=8, T=20, **kw):
    learner = imagine.Imagination(dynamics, np.zeros(dim), np.ones(dim), hidden=32, batch_size=16, capacity=n * T,
                                  **kw)
    rng = np.random.default_rng(0)
    for _ in range(n):
        learner.add_episode({"z": rng.normal(size=(T + 1, dim)), "actions": rng.uniform(-1, 1, (T, 2)),
                             "rewards": rng.uniform(0, 1, T)})
    return learner


@pytest.mark.parametrize("uses_action", [True, False])
def test_actor_update_reaches_the_actor_through_the_dynamics_only(uses_action):
    learner = filled_learner(Linear2(3, uses_action), entropy=0.0)  # no entropy: the return is the only signal
    learner.refit(steps=2)
    for net in (learner.dynamics, learner.reward, learner.actor):
        for p in net.parameters():
            p.grad = None
    dynamics_before = copy.deepcopy(learner.dynamics.state_dict())
    learner.update()
    assert all(p.grad is None for p in learner.dynamics.parameters())  # held fixed: no gradient, no step
    assert all(p.grad is None for p in learner.reward.parameters())
    assert all(torch.equal(v, learner.dynamics.state_dict()[k]) for k, v in dynamics_before.items())
    actor_grad = sum(p.grad.abs().sum().item() for p in learner.actor.parameters())
    # The return depends on the actions only through f(z, a): an action-free model gives the actor no gradient.
    assert (actor_grad > 0) == uses_action


def test_reward_head_fits_a_known_function_and_records_held_out_loss():
    learner = filled_learner(Linear2(3), n=40, T=50)
    for split in ("train", "val"):  # r_t = 0.5 + 0.4 tanh(2 z_{t+1, 0}): a function of the next latent
        buf = learner.replay[split]
        buf.r[:len(buf)] = 0.5 + 0.4 * np.tanh(2 * buf.z_next[:len(buf), 0])
    assert len(learner.replay["val"]) == 4 * 50  # every 10th episode is held out
    first = learner.refit(steps=600)
    assert first["reward_val_before"] > 0.02 and first["reward_val"] < 0.002
    assert learner.refits == [first] and first["env_steps"] == 40 * 50


class PointDynamics(torch.nn.Module):
    """The point task's exact dynamics on standardised z (raw x = 0.6 z): x' = clip(x + 0.2 a, -1, 1)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))  # something for the refit to hold

    def forward(self, z, a):
        return torch.clamp(0.6 * z + 0.2 * a, -1, 1) / 0.6 + self.bias


@pytest.mark.parametrize("seed", [0, 1])
def test_imagination_alone_solves_point_task(seed, one_thread):
    # No real step after the random data: the actor learns only inside the model. Sized for seconds: hidden 64,
    # gamma 0.9 for a 30-step task, a higher learning rate.
    learner = imagine.Imagination(PointDynamics(), np.zeros(2), np.full(2, 0.6), hidden=64, batch_size=64,
                                  gamma=0.9, lr=1e-3, capacity=4000, seed=seed)
    rng = np.random.default_rng(seed)
    for ep in point_episodes(lambda z, obs: rng.uniform(-1, 1, (len(z), 2)), [1000 * seed + i for i in range(100)]):
        learner.add_episode(ep)
    learner.refit(steps=1000)
    for _ in range(400):
        learner.update()
    trained = point_episodes(learner.greedy, list(range(10 ** 6, 10 ** 6 + 50)))
    final = np.mean([ep["rewards"][-1] for ep in trained])
    assert final >= 0.9, f"the imagined actor reached the origin in only {final:.0%} of episodes"
    assert learner.updates == 400 and learner.env_steps == 3000 and np.isfinite(learner.info["critic_loss"])


def ramp_episode(T, D, offset):
    """z[t] = offset + t in every dimension, so a transition's z_next is recognisable."""
    z = (offset + np.arange(T + 1, dtype=np.float32))[:, None].repeat(D, 1)
    return z, np.full((T, 2), offset / 1000, np.float32), offset + np.arange(T, dtype=np.float32)


def test_replay_buffer_transitions():
    buffer = sac.ReplayBuffer(3, capacity=25)
    for offset in (0, 100, 200):
        buffer.add_episode(*ramp_episode(10, 3, offset))
    assert len(buffer) == 25  # 30 transitions into 25 slots: the oldest 5 were overwritten
    b = buffer.sample(500, np.random.default_rng(0))
    assert b["z"].shape == (500, 3) and b["a"].shape == (500, 2) and b["r"].dtype == torch.float32
    assert torch.equal(b["z_next"], b["z"] + 1)  # z_next is the next row of the same episode
    assert torch.equal(b["r"], b["z"][:, 0])  # the reward of the step taken from z
    assert torch.equal(b["a"][:, 0], torch.div(b["z"][:, 0], 100, rounding_mode="floor") * 0.1)
    assert (b["done"] == 0).all()  # time-limit ends are truncations: bootstrap
    assert set(np.unique(b["z"][:, 0].numpy() // 100)) == {0, 1, 2}
    assert b["z"][:, 0].min() >= 5  # rows 0-4 of the first episode are gone
    buffer.add_episode(*ramp_episode(4, 3, 300), terminal=True)
    assert buffer.done[(buffer.pos - 1) % 25] == 1 and buffer.done[(buffer.pos - 2) % 25] == 0


def test_agent_counts_steps_and_learns_while_acting(one_thread):
    agent = sac.SACAgent(2, np.zeros(2), np.ones(2), action_repeat=2, hidden=16, batch_size=8,
                         learning_starts=40, updates_per_step=0.5)
    z = np.zeros((4, 2), np.float32)
    a = agent(z, {})
    assert a.shape == (4, 2) and np.abs(a).max() <= 1 and agent.env_steps == 8
    for _ in range(5):
        agent(z, {})
    assert agent.updates == 0  # empty buffer: nothing to learn from yet
    agent.add_episode({"z": np.zeros((11, 2), np.float32), "actions": np.zeros((10, 2), np.float32),
                       "rewards": np.zeros(10, np.float32)})
    agent(z, {})
    assert agent.env_steps == 56 and agent.updates == 2  # 4 decisions x 0.5 updates each
    assert np.array_equal(agent.greedy(z, {}), agent.greedy(z, {}))


# ---------------------------------------------------------------------------------------------
# Collection: shards, merge, kill and Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_shards_merge_to_the_unsharded_dataset(tmp_path):
    common = ["--encoder", "tiny", "--episodes", "4", "--steps", "6", "--batch-size", "4"]
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    ok("collect", *common, "--out", whole)
    for i in range(2):
        out, _ = ok("collect", *common, "--shard", f"{i}/2", "--out", sharded)
        assert f"shard {i}/2 done" in out
    assert sorted(os.listdir(sharded)) == ["shards"]  # concurrent shards write only their own folders
    out, _ = ok("merge", *common, "--out", sharded)
    assert "merge: 2 shards, 4 episodes" in out
    a = vr.load_dataset(os.path.join(whole, "data", "jacobian_eps0"))
    b = vr.load_dataset(os.path.join(sharded, "data", "jacobian_eps0"))
    assert a["meta"]["seeds"] == b["meta"]["seeds"] and b["meta"]["shards"] == 2
    assert a["z"].shape == (4, 7, 64) and a["meta"]["gl_renderer"] not in ("unknown", "none")
    for k in ("actions", "rewards", "states"):
        np.testing.assert_array_equal(a[k], b[k])  # the BC targets
    np.testing.assert_allclose(a["z"], b["z"], rtol=1e-5, atol=1e-5)  # the BC inputs; batch-mates may differ


def make_shard(root, name, seeds, steps=5, expert="p", encoder="state"):
    args = vr.parse_args(["collect", "--encoder", encoder, "--steps", str(steps)])
    vr.collect_shard(args, vr.load_encoder(encoder), str(root / name), seeds, expert, 0.0)
    return str(root / name)


@pytest.mark.parametrize("case, problem", [
    ("missing", "missing shards [2] of 3"), ("overlap", "seeds overlap between shards (e.g. [3])"),
    ("steps", "has steps=6 but"), ("expert", "has expert=jacobian but"), ("encoder", "has encoder="),
    ("epsilon", "has epsilon=0.3 but"), ("render", "has render=full@256 but"),
    ("incomplete", "is incomplete (no meta.json)"),
])
def test_merge_refuses_shards_that_do_not_fit(tmp_path, case, problem):
    root = tmp_path / "shards"
    if case == "missing":
        shards = [make_shard(root, "shard_0of3", [1, 4]), make_shard(root, "shard_1of3", [2, 5])]
    else:
        first = make_shard(root, "shard_0of2", [1, 3])
        seeds = [2, 3] if case == "overlap" else [2, 4]
        second = {"steps": dict(steps=6), "expert": dict(expert="jacobian"), "encoder": dict(encoder="tiny")}
        shards = [first, make_shard(root, "shard_1of2", seeds, **second.get(case, {}))]
        if case == "incomplete":
            os.remove(os.path.join(shards[1], "meta.json"))
        if case in ("epsilon", "render"):  # every field merge compares, one at a time
            meta = json.load(open(os.path.join(shards[1], "meta.json")))
            meta[case] = {"epsilon": 0.3, "render": "full@256"}[case]
            report.save_json(os.path.join(shards[1], "meta.json"), meta)
    with pytest.raises(vr.UserError) as e:
        vr.merge(shards, str(tmp_path / "data"))
    message = str(e.value)
    assert problem in message and "\n" not in message, message
    assert not os.path.exists(tmp_path / "data" / "meta.json")


# The child collects normally, but SIGKILLs itself while writing its third episode file: a kill mid-write,
# at the same point on every run, and without any clock.
KILLED_WHILE_WRITING = """
import os, signal, sys
import numpy as np
import vjepa_reacher
savez, calls = np.savez, []
def dying_savez(f, **arrays):
    calls.append(1)
    if len(calls) == 3:
        f.write(b"half an episode")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    savez(f, **arrays)
np.savez = dying_savez
sys.exit(vjepa_reacher.main(sys.argv[1:]))
"""


def test_killed_collection_resumes_to_the_same_dataset(tmp_path):
    args = ["collect", "--encoder", "tiny", "--episodes", "8", "--steps", "12", "--batch-size", "2", "--epsilon", "0.3"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    p = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, *args, "--out", out], cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    shard = os.path.join(out, "shards", "jacobian_eps0.3", "shard_0of1")
    assert len(glob.glob(os.path.join(shard, "ep_*.npz"))) == 2  # two finished episodes; the third was cut
    assert len(glob.glob(os.path.join(shard, ".tmp-*"))) == 1
    assert not os.path.exists(os.path.join(out, "data", "jacobian_eps0.3", "meta.json"))
    stdout, _ = ok(*args, "--out", out)
    assert "2 of 8 episodes already saved" in stdout
    ok(*args, "--out", ref)
    a = vr.load_dataset(os.path.join(ref, "data", "jacobian_eps0.3"))
    b = vr.load_dataset(os.path.join(out, "data", "jacobian_eps0.3"))
    assert a["meta"]["seeds"] == b["meta"]["seeds"] and len(b["meta"]["seeds"]) == 8
    for k in ("actions", "rewards", "states"):
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["z"], b["z"], rtol=1e-5, atol=1e-5)  # same windows; batch-mates may differ


# The child stops before writing its second episode and says so; the test interrupts it there.
WAITS_FOR_CTRL_C = """
import sys, time
import numpy as np
import vjepa_reacher
savez, calls = np.savez, []
def waiting_savez(f, **arrays):
    calls.append(1)
    if len(calls) == 2:
        print("waiting for Ctrl-C", flush=True)
        time.sleep(600)
    savez(f, **arrays)
np.savez = waiting_savez
sys.exit(vjepa_reacher.main(sys.argv[1:]))
"""


def test_ctrl_c_says_where_to_resume(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", WAITS_FOR_CTRL_C, "collect", "--encoder", "state", "--episodes", "4",
                          "--steps", "5", "--batch-size", "1", "--out", out], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    waiting = threading.Event()

    def watch():  # reads the child's lines on a thread, so a child that stalls cannot hang the test
        for line in p.stdout:
            if line.startswith("waiting for Ctrl-C"):
                return waiting.set()
    try:
        threading.Thread(target=watch, daemon=True).start()
        assert waiting.wait(timeout=120), "the child never reached its wait"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"interrupted: finished episodes and stages are saved in {out}; re-run the same command to resume" in err
    shard = os.path.join(out, "shards", "jacobian_eps0", "shard_0of1")
    assert len(glob.glob(os.path.join(shard, "ep_*.npz"))) == 1 and not glob.glob(os.path.join(shard, ".tmp-*"))


# ---------------------------------------------------------------------------------------------
# Bad input, mismatches and corrupted files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, made_by", [
    ("bc", "collect"), ("eval", "bc"), ("rl", "collect"), ("dynamics", "explore"),
    ("plan", "dynamics"),
])
def test_stage_before_its_inputs_names_the_missing_file_and_does_nothing(tmp_path, stage, made_by):
    code, _, err = cli(stage, "--encoder", "state", "--out", tmp_path, *TINY)
    assert_one_line_error(code, err, "missing", f"`{made_by}`")  # one line: no progress of work done first
    assert os.listdir(tmp_path) == []


def test_merge_without_shards_names_the_command(tmp_path):
    code, _, err = cli("merge", "--out", tmp_path)
    assert_one_line_error(code, err, "no shards", "collect --shard")


def test_unwritable_out_is_one_line_and_keeps_earlier_results(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("earlier result")
    code, _, err = cli("collect", "--encoder", "state", "--out", blocker / "run")
    assert_one_line_error(code, err, str(blocker))
    assert blocker.read_text() == "earlier result"


def test_mismatched_encoder_is_caught_before_training(state_run):
    code, _, err = cli("bc", "--encoder", "tiny", "--out", state_run[0], "--force")
    assert_one_line_error(code, err, "encoder state (dim 10)", "--encoder is tiny (dim 64)")


def test_dynamics_checkpoint_of_another_dim_is_refused_before_planning(state_run, tmp_path):
    """A dynamics checkpoint of another dimension, labelled as this encoder, is refused with its path."""
    out = str(tmp_path / "run")
    shutil.copytree(state_run[0], out)
    path = os.path.join(out, "dynamics_mlp.pt")
    meta = torch.load(path, weights_only=True)["meta"]
    vr.save_model(path, vr.Dynamics("mlp", 7), {"meta": meta}, np.zeros(7), np.ones(7), name="mlp")
    code, _, err = cli("plan", "--encoder", "state", "--out", out, "--force", "--dynamics", "mlp", "--plans", "cem/mlp")
    assert_one_line_error(code, err, path, "another dim")


def test_corrupted_files_are_named(state_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(state_run[0], out)
    with open(os.path.join(out, "data", "jacobian_eps0", "z.npy"), "r+b") as f:
        f.truncate(100)
    code, _, err = cli("bc", "--encoder", "state", "--out", out, "--force")
    assert_one_line_error(code, err, "z.npy is truncated or corrupted")
    with open(os.path.join(out, "bc.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    code, _, err = cli("eval", "--encoder", "state", "--out", out, "--force")
    assert_one_line_error(code, err, "bc.pt is truncated, corrupted")
    with open(os.path.join(out, "plan.json"), "w") as f:
        f.write('{"plan": ')
    code, _, err = cli("report", "--out", out)
    assert_one_line_error(code, err, "plan.json is corrupted")


def test_report_on_a_folder_of_an_older_format_is_one_line_and_keeps_its_report(tmp_path):
    out = str(tmp_path / "old")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "results", "state", "seed_0"), out)
    plan = json.load(open(os.path.join(out, "plan.json")))
    for entry in plan["plan"].values():
        entry.pop("initial_distance", None)  # a field older runs did not write
    json.dump(plan, open(os.path.join(out, "plan.json"), "w"))
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("report.md", "results.json")}
    code, _, err = cli("report", "--out", out)
    assert_one_line_error(code, err, "lacks 'initial_distance' (an older format)")
    assert before == {f: open(os.path.join(out, f), "rb").read() for f in before}


def test_skipped_stage_with_another_encoder_leaves_the_report_alone(state_run):
    out = state_run[0]
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("config.json", "report.md", "results.json")}
    code, _, err = cli("eval", "--encoder", "tiny", "--out", out)
    assert_one_line_error(code, err, "was made with encoder state")
    assert before == {f: open(os.path.join(out, f), "rb").read() for f in before}


def test_a_skipped_command_is_not_listed_and_rewrites_nothing(state_run):
    out = state_run[0]
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in ("report.md", "config.json", "results.json")}
    stdout, _ = ok("eval", "--encoder", "state", "--out", out)
    assert "eval.json exists; --force to redo" in stdout
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    commands = json.load(open(os.path.join(out, "config.json")))["commands"]
    assert len(commands) == 1 and commands[0].startswith("python vjepa_reacher.py all --quick --encoder state")
    assert "Made by these commands" in open(os.path.join(out, "report.md")).read()


def test_retraining_one_dynamics_model_keeps_the_others_and_plan_redoes_its_pairs(light_runs, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(light_runs["again"], out)
    plan_json = open(os.path.join(out, "plan.json"), "rb").read()
    stdout, _ = ok("dynamics", "--encoder", "state", "--out", out, "--force", "--dynamics", "mlp", *TINY,
                   "--set", "dyn_lr=0.003")  # other weights (retrained alike, the plans would stand)
    assert "plan results random/mlp, cem/mlp were made with the old mlp; re-run `plan`" in stdout
    assert set(results(out)["dynamics"]) == {"mlp", "mlp_rollout5"}  # the other model's entry stays with its .pt file
    assert open(os.path.join(out, "plan.json"), "rb").read() == plan_json  # dynamics writes only its own files
    stdout, _ = ok("plan", "--encoder", "state", "--out", out, *TINY, *LIGHT)  # only the pairs of the new mlp
    assert "plan cem/mlp_rollout5" not in stdout and "plan cem/mlp:" in stdout and "plan random/mlp:" in stdout
    plans = results(out)["plan"]
    assert set(plans) == {"random/mlp", "cem/mlp", "cem/mlp_rollout5"}
    digest = {c: results(out)["dynamics"][c.split("/")[1]]["digest"] for c in plans}
    assert {c: plans[c]["model"] for c in plans} == digest  # each pair names the weights it was made with
    assert plans["cem/mlp"]["model"] != json.loads(plan_json)["plan"]["cem/mlp"]["model"]  # the new mlp's


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_all_quick_with_state_oracle(state_run):
    out, err = state_run
    r = results(out)
    q = vr.QUICK
    assert r["encoder"] == {"id": "state", "dim": 10, "precision": r["encoder"]["precision"]}
    assert r["bc"]["params"] == n_params(vr.bc_net(10))
    experts = r["experts"]
    assert experts["jacobian"]["success"] >= 0.9 and experts["p"]["success"] <= experts["jacobian"]["success"] - 0.3
    # The issue's bar, at the default seed (results/bc-seeds: seeds 0-9 all pass it; not a tuned seed)
    assert r["eval"]["bc"]["success"] >= 0.75 * experts["jacobian"]["success"]
    assert r["bc"]["kept_epoch"] == r["bc"]["epochs"] - 1  # never an untrained network
    assert r["eval"]["bc"]["success"] > r["eval"]["random"]["success"]
    for k in ("success", "seed_success", "return", "final_distance", "n"):
        assert k in r["eval"]["bc"] and k in r["experts"]["p"]
    assert r["eval"]["bc"]["n"] == q["eval_episodes"]
    assert set(r["plan"]) == {"random/mlp", "cem/mlp"} and r["plan"]["cem/mlp"]["steps"] == q["plan_steps"]
    cem = r["plan"]["cem/mlp"]
    assert cem["final_distance"] < 0.5 * cem["initial_distance"]  # the planner moves the finger toward the target
    d = r["dynamics"]["mlp"]
    assert len(d["kstep_error"]) == 10 and d["kstep_error"][0] < d["kstep_copy"][0]
    assert {"collect", "bc", "eval", "rl", "explore", "dynamics", "plan", "probe"} <= set(r["timing"])
    assert r["probe"]["encoder"]["finger_xy"] > 0.95  # the state oracle holds the finger position linearly
    rl = r["rl"]["runs"]["rl"]  # 1,000 steps: warm-up 250, one update per decision once the buffer holds a batch
    assert rl["env_steps"] == 1000 and 0 < rl["updates"] <= (1000 - 250) // 2
    assert [c["step"] for c in rl["curve"]][-1] == 1000
    for c in rl["curve"]:
        assert 0 <= c["success"] <= 1 and all(np.isfinite(c[k]) for k in ("return", "critic_loss", "alpha", "q"))
    assert r["eval"]["rl"]["n"] == q["eval_episodes"]  # SAC's final policy joins the Phase 1 table
    pngs = {os.path.basename(f) for f in glob.glob(os.path.join(out, "*.png"))}
    text = open(os.path.join(out, "report.md")).read()
    assert pngs == set(re.findall(r"\]\(([\w.]+\.png)\)", text))  # every plot is in the report, and only those
    assert {"success.png", "dynamics.png", "plan_distance.png", "rl_curve.png"} <= pngs
    assert all(os.path.getsize(os.path.join(out, f)) > 5000 for f in pngs)
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "*.gif"))) == [
        "rollout_bc.gif", "rollout_cem.gif", "rollout_expert.gif"]
    assert "\r" not in err  # one line per interval in a log, not tqdm's carriage returns
    stdout, _ = ok("rl", "--quick", "--encoder", "state", "--out", out)
    assert "rl.json exists" in stdout and "--force to redo" in stdout


def test_quick_imagine_beats_random_and_every_policy_has_a_1000_step_return(state_run):
    out, _ = state_run
    r, q = results(out), vr.QUICK
    im = r["imagine"]
    assert im["phase2_steps"] == q["episodes"] * q["steps"] and im["env_steps"] == im["phase2_steps"] + 1000
    # quick's 400 + 100 updates: seeds 0 and 1 reached 35% and 45% of 20 episodes, random ~5% (measured when sized)
    assert im["eval"]["success"] > r["eval"]["random"]["success"] + 0.2 and im["eval"]["n"] == q["eval_episodes"]
    assert im["plan"]["n"] == q["plan_episodes"] and 0 < im["eval"]["ms_per_action"] < 50
    assert [c["step"] for c in im["curve"]][0] == im["phase2_steps"] and im["curve"][-1]["step"] == im["env_steps"]
    assert len(im["refits"]) >= 1 and all(np.isfinite(f["reward_val"]) for f in im["refits"])
    assert im["updates"] == q["imagine_updates"] + 1000 // 10  # pretraining, then 0.1 an env step
    for name, m in list(r["experts"].items()) + list(r["eval"].items()):
        long = m["standard"]  # reacher-easy's own episode, on the first --long-episodes episodes
        assert long["n"] == 1, name  # --long-episodes 1
        assert 0 <= long["return"] <= vr.MAX_STEPS and long["return_ci"] >= 0, name
    assert not any("standard" in m for m in r["plan"].values())  # --plan-long-episodes 0 (the planners': below)
    assert r["experts"]["jacobian"]["standard"]["return"] > 900  # in the target from ~step 50 to step 1,000
    rows = open(os.path.join(out, "rl_curve.csv")).read().splitlines()
    assert rows[0].startswith("method,env_steps") and {x.split(",")[0] for x in rows[1:]} == {"rl", "imagine"}
    assert "Phase 5: actor-critic in imagination" in open(os.path.join(out, "report.md")).read()


def test_all_quick_with_tiny_vjepa2_then_report(tiny_run):
    out = tiny_run
    r = results(out)
    assert r["encoder"]["id"] == "tiny" and r["encoder"]["dim"] == 64
    assert r["encoder"]["rope"] == "cached, input grid" and r["config"]["encoder_info"] == r["encoder"]
    assert set(r["plan"]) == set(vr.PLANS) and set(r["dynamics"]) == set(vr.DYNAMICS)
    assert set(r["probe"]) == {"encoder", "random_init", "state"} and "rl" in r["eval"]
    assert r["rl"]["runs"]["rl"]["env_steps"] == 80
    # BC trained on lean frames is not evaluated on the full look by mistake
    code, _, err = cli("eval", "--quick", "--encoder", "tiny", "--out", out, "--force", "--set", "render=full")
    assert_one_line_error(code, err, "made with lean@256 rendering, this run uses full@256")
    os.remove(os.path.join(out, "report.md"))
    ok("report", "--out", out)  # no encoder needed, nothing re-run
    text = open(os.path.join(out, "report.md")).read()
    assert "NOT V-JEPA 2" in text and "python vjepa_reacher.py all --quick --encoder tiny" in text
    pngs = {os.path.basename(f) for f in glob.glob(os.path.join(out, "*.png"))}
    assert pngs == set(re.findall(r"\]\(([\w.]+\.png)\)", text)) and len(pngs) >= 4
    assert len(glob.glob(os.path.join(out, "*.gif"))) == 3


@pytest.mark.parametrize("encoder", ["state", "tiny"])
def test_seed_recipe_runs_and_is_recorded(tmp_path, encoder):
    """--recipe seed end to end. state: random shooting toward the seed's random-run goal (500 random steps), CEM
    with the weighted cost; tiny: the pixel knobs (fp16 weights, the predictor's forward, one frame x8 for goals and
    MPC, 224 px). Sizes are tiny, and tiny skips the stages the recipe does not change (eval, rl, probe)."""
    out = str(tmp_path / "run")
    common = ["--quick", "--recipe", "seed", "--encoder", encoder, "--out", out, *TINY, "--set", "execute=mean",
              "--set", "goal_horizon=12", "--dynamics", "mlp", "mlp_rollout5"]
    if encoder == "state":
        ok("all", *common, "--plans", "random/mlp", "cem/mlp")
    else:
        for stage in ("collect", "bc", "explore", "dynamics", "plan"):
            ok(stage, *common, "--episodes", "4", "--steps", "12", "--plans", "cem/mlp")
    r = results(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg == r["config"] and cfg["recipe"] == "seed"
    # the seed's column, then --quick's sizes, then --set; random shooting's length follows plan_steps
    expected = dict(vr.RECIPES["seed"], rollout_epochs=vr.QUICK["rollout_epochs"], plan_steps=6, rs_plan_steps=6,
                    goal_horizon=12, execute="mean")
    assert {k: cfg[k] for k in vr.KNOBS} == expected  # every knob recorded as it ran
    assert r["bc"]["split"] == "transition" and r["dynamics"]["mlp_rollout5"]["rollout_weights"] == pytest.approx(
        [0.04, 0.08, 0.12, 0.16, 0.2])  # the seed's: step h weighs (h+1)/5, then /5
    assert set(r["plan"]) == ({"random/mlp", "cem/mlp"} if encoder == "state" else {"cem/mlp"})
    text = open(os.path.join(out, "report.md")).read()
    assert "Recipe `seed`" in text and "reproduced on purpose by `--recipe seed`" in text  # the seed's quirks, named
    if encoder == "tiny":
        assert "224 px" in text and "x8" in text
        assert cfg["rope_grid"] == "checkpoint" and cfg["encoder_info"]["rope"] == "cached, checkpoint grid"
    else:
        assert "another episode" in text


def test_one_exploration_episode_gives_finite_kstep_errors(tmp_path):
    out = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ok("explore", "--encoder", "state", "--out", out, "--episodes", "1", "--steps", "8")
        ok("dynamics", "--encoder", "state", "--out", out, "--dynamics", "mlp", "--dyn-epochs", "1")
    d = results(out)["dynamics"]["mlp"]
    assert np.isfinite(d["kstep_error"]).all() and np.isfinite(d["kstep_copy"]).all()


def test_several_seeds_write_paired_aggregates(light_runs):
    multi = light_runs["multi"]
    s = json.load(open(os.path.join(multi, "seeds.json")))
    assert s["seeds"] == [3, 2147483647]
    bc = s["headline"]["bc"]
    per_seed = [results(os.path.join(multi, f"seed_{seed}"))["eval"]["bc"] for seed in s["seeds"]]
    assert bc["per_seed"] == [m["success"] for m in per_seed]
    assert (bc["mean"], bc["ci95_across_seeds"]) == pytest.approx(report.across_seeds(bc["per_seed"]))
    assert bc["wilson_per_seed"] == [pytest.approx(report.wilson(round(m["success"] * m["n"]), m["n"]))
                                     for m in per_seed]  # each seed over its own episodes: none counted twice
    assert "pooled" not in json.dumps(s["headline"])
    expert = s["headline"]["expert p"]  # the same for every training seed: one evaluation, not two
    assert len(expert["per_seed"]) == 1 and expert["n_per_seed"] == [per_seed[0]["n"]]
    assert "MPC cem/mlp" in s["headline"]
    for seed in s["seeds"]:
        assert results(os.path.join(multi, f"seed_{seed}"))["config"]["seed"] == seed
    text = open(os.path.join(multi, "seeds.md")).read()
    row = table_rows(text)["bc"]
    assert "mean ± 95% across seeds" in text
    assert row[2] == f"{100 * bc['mean']:.1f} ± {100 * bc['ci95_across_seeds']:.1f}"
    assert "[seed 3](seed_3/report.md)" in open(os.path.join(multi, "report.md")).read()


def comparable(r):
    """results.json without wall times and the options that name the run folder."""
    r = copy.deepcopy(r)
    r.pop("timing"), r.pop("config")
    for p in r["plan"].values():
        p.pop("ms_per_action")
    for run in list(r["rl"]["runs"].values()) + [r["imagine"]]:
        run.pop("seconds")
        for point in run["curve"]:
            point.pop("seconds")
    r["imagine"]["eval"].pop("ms_per_action"), r["eval"]["imagine"].pop("ms_per_action")
    assert "seconds" not in json.dumps(r) and "ms_" not in json.dumps(r)  # no other wall time left to compare
    return r


def test_same_seed_same_numbers(light_runs):
    """--seed 3 under an absolute --out gives what --seeds 3 ... gave under a relative one."""
    a = results(os.path.join(light_runs["multi"], "seed_3"))
    b = results(light_runs["again"])
    assert comparable(a) == comparable(b)
    assert a["config"]["seed"] == b["config"]["seed"] == 3 and a["config"]["out"] != b["config"]["out"]


def test_odd_but_valid_inputs_run(tmp_path):
    out = str(tmp_path / "run")
    ok("all", "--encoder", "state", "--out", out, *TINY, *LIGHT, "--steps", "8", "--episodes", "1",
       "--eval-episodes", "1", "--horizon", "1", "--epsilon", "1", "--plan-episodes", "1", "--probe-episodes", "1")
    r = results(out)
    assert 0 <= r["eval"]["bc"]["success"] <= 1 and set(r["plan"]) == set(LIGHT[LIGHT.index("--plans") + 1:])
    assert all(np.isfinite(d["val_loss"]) for d in r["dynamics"].values())
    assert r["bc"]["train_samples"] == r["bc"]["val_samples"] == 8  # one episode: trained and validated on it


# ---------------------------------------------------------------------------------------------
# modal_app.py: everything but Modal itself, in-process, with `tiny` on a local folder as the volume
# ---------------------------------------------------------------------------------------------
def import_modal_app():
    pytest.importorskip("modal", reason="the modal package is not installed (pip install modal)")
    import modal_app
    return modal_app


# A laptop launching `modal run` has only modal: these imports raise, as if nothing else were installed.
WITHOUT_PIPELINE_DEPS = """
import importlib.abc, sys
BLOCKED = {"numpy", "torch", "transformers", "dm_control", "mujoco", "vjepa_reacher"}
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Blocked())
import modal_app
assert not BLOCKED & {m.partition(".")[0] for m in sys.modules}
assert modal_app.vjepa_reacher is None
"""

# A smoke-sized job: 4 tiny episodes of 5 steps; options as `modal run modal_app.py --args "..."` passes them.
MODAL_TINY = ["--encoder", "tiny", "--episodes", "4", "--steps", "5", "--batch-size", "2", "--eval-episodes", "2",
              "--long-episodes", "0"]  # eval: no 1,000-step episodes of the tiny encoder


def local_remote(modal_app, calls, fail=()):
    """The pipeline's remote calls, run here; collect_shards returns what starmap(..., return_exceptions=True)
    would, and shard i fails on the n-th collection if (n, i) is in `fail`."""
    def collect_shards(job, todo):
        calls.append(list(todo))
        results = []
        for i in todo:
            try:
                if (len(calls), i) in fail:
                    raise RuntimeError("container preempted")
                results.append(modal_app.collect_job(job, i))
            except Exception as e:
                results.append(e)
        return results
    return dict(todo_shards=modal_app.todo_shards_job, collect_shards=collect_shards, merge=modal_app.merge_job)


def fake_collect(modal_app, job, shards):
    """Each shard's meta.json as collect_shard writes it for `job`, without collecting."""
    args = modal_app.parse_job(job)
    for i in shards:
        folder = os.path.join(job.out, "shards", vr.dataset_name(args.expert, args.epsilon), f"shard_{i}of{job.shards}")
        os.makedirs(folder)
        meta = dict(modal_app.expected_meta(args, i, job.shards), encoder={"id": args.encoder, "dim": 64})
        json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))


def test_modal_app_imports_with_nothing_but_modal():
    import re
    modal_app = import_modal_app()
    p = subprocess.run([sys.executable, "-c", WITHOUT_PIPELINE_DEPS], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    # The image installs the runtime lines of requirements.txt, and not modal or pytest.
    lines = [l.split("#")[0].strip() for l in open(os.path.join(HERE, "requirements.txt"))]
    runtime = [l for l in lines if l and re.split(r"[<>=!~\[ ]", l)[0].lower() not in ("modal", "pytest")]
    assert sorted(modal_app.PACKAGES) == sorted(runtime)
    # ...and ships every local module the script imports, and those they import (add_local_python_source takes
    # one file per module name).
    todo, local = ["vjepa_reacher"], set()
    while todo:
        name = todo.pop()
        local.add(name)
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            todo += [n for n in names if os.path.exists(os.path.join(HERE, n + ".py")) and n not in local]
    assert local <= set(modal_app.SOURCES)


def test_modal_app_main_passes_its_options_to_the_pipeline(monkeypatch):
    import modal
    modal_app = import_modal_app()
    # `modal run` resolves every function's declared secrets at start, so none declares one.
    objects = list(vars(modal_app).values())
    functions = [f for f in objects if isinstance(f, modal.Function)]
    assert len(functions) == 4 and not any(isinstance(c, modal.Cls) for c in objects)
    assert all(not f._spec_.secrets for f in functions)  # modal 1.6.4: _FunctionSpec.secrets
    seen = {}
    monkeypatch.setattr(modal_app, "run_pipeline", lambda job, **calls: seen.update(calls, job=job))
    main = modal_app.main.info.raw_f  # the entry point's own function, without `modal run`
    main()
    assert seen["evaluate"] is None and vars(seen["job"]) == vars(modal_app.Job("/vol/runs/modal"))
    main(args="--recipe seed --set cost=final --force", shards=2, evaluate=True)
    assert seen["evaluate"] is not None
    # --args reaches every stage as typed; GPU jobs ask for CUDA, and the shard comes from --shards.
    job = seen["job"]
    assert job.args == ["--recipe", "seed", "--set", "cost=final", "--force"] and job.shards == 2
    argv = modal_app.cli("collect", job, shard=1, gpu=True)
    assert argv[:6] == ["collect", *job.args] and argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--shard") + 1] == "1/2" and argv[argv.index("--out") + 1] == "/vol/runs/modal"
    assert "--force" in modal_app.cli("merge", job) and "--device" not in modal_app.cli("merge", job)
    args = modal_app.parse_job(job)
    assert args.recipe == "seed" and args.cost == "final" and args.force


def test_modal_app_pipeline_runs_locally_reports_failed_shards_and_resumes(tmp_path, capsys):
    modal_app = import_modal_app()
    assert modal_app.vjepa_reacher is vr  # imports the script, copies nothing
    job = modal_app.Job(str(tmp_path / "runs" / "modal"), MODAL_TINY, shards=2, device="cpu")  # no CUDA here
    calls = []
    remote = dict(local_remote(modal_app, calls, fail={(1, 0)}), evaluate=modal_app.bc_eval_job)
    with pytest.raises(SystemExit, match=r"1 of 2 shards failed \(\[0\]; first: container preempted\).*re-run "
                                         r"the same command to collect the rest$"):
        modal_app.run_pipeline(job, **remote)
    assert "shard 0/2 failed: container preempted" in capsys.readouterr().out
    assert calls == [[0, 1]] and modal_app.todo_shards_job(job) == [0]  # shard 1 finished despite shard 0
    assert os.listdir(job.out) == ["shards"]  # concurrent shards write only their own folders
    data_dir = modal_app.run_pipeline(job, **remote)  # the same command again
    assert calls[1] == [0]  # only the missing shard
    data = vr.load_dataset(data_dir)
    assert data["z"].shape == (4, 6, 64) and data["meta"]["shards"] == 2
    assert os.path.exists(os.path.join(job.out, "eval.json"))
    # --force (in --args) redoes every shard.
    forced = modal_app.Job(job.out, MODAL_TINY + ["--force"], shards=2)
    modal_app.run_pipeline(forced, modal_app.todo_shards_job, lambda job, todo: calls.append(todo) or todo,
                           merge=lambda job: "data")
    assert calls[2] == [0, 1]
    # ...so after a forced run that failed, the same command again would delete the shards that finished.
    with pytest.raises(SystemExit, match="re-run the same command without --force in --args to collect the rest"):
        modal_app.run_pipeline(forced, modal_app.todo_shards_job, lambda job, todo: [RuntimeError("preempted"), None],
                               merge=lambda job: "data")


def test_modal_rerun_with_more_episodes_collects_only_the_new_ones(tmp_path, capsys):
    """Issue 22: `--episodes 4` then 8 into one run folder gave 4, because any shard with a meta.json counted."""
    modal_app = import_modal_app()
    out, calls = str(tmp_path / "run"), []
    remote = local_remote(modal_app, calls)
    modal_app.run_pipeline(modal_app.Job(out, MODAL_TINY, shards=2, device="cpu"), **remote)
    more = modal_app.Job(out, MODAL_TINY + ["--episodes", "8"], shards=2, device="cpu")
    data = vr.load_dataset(modal_app.run_pipeline(more, **remote))
    assert data["z"].shape[0] == 8 and calls == [[0, 1], [0, 1]]
    assert data["meta"]["seeds"] == vr.episode_seeds("collect", 8, 0)
    assert capsys.readouterr().out.count("2 of 4 episodes already saved") == 2  # the script resumed each shard
    modal_app.run_pipeline(more, **remote)  # the same again: every shard matches, none is collected
    assert len(calls) == 2 and "2 of 2 shards already finished" in capsys.readouterr().out


def test_modal_rerun_with_other_shards_is_refused_before_collecting_until_forced(tmp_path):
    """Issue 22: after a 2-shard run that did not finish, a 3-shard run collected all 3 shards and then stopped at
    merge, which found the 2-shard folders too (seeds twice, or an incomplete shard)."""
    modal_app = import_modal_app()
    out, calls = str(tmp_path / "run"), []
    remote = local_remote(modal_app, calls, fail={(1, 0)})
    with pytest.raises(SystemExit, match="1 of 2 shards failed"):
        modal_app.run_pipeline(modal_app.Job(out, MODAL_TINY, shards=2, device="cpu"), **remote)
    with pytest.raises(SystemExit) as e:
        modal_app.run_pipeline(modal_app.Job(out, MODAL_TINY, shards=3, device="cpu"), **remote)
    msg = str(e.value)
    assert msg.startswith("error: check: ") and "\n" not in msg and "--shards 2" in msg
    assert msg.index("another --run") < msg.index("--force in --args (deletes them all")
    assert calls == [[0, 1]]  # refused before any shard started
    forced = modal_app.Job(out, MODAL_TINY + ["--force"], shards=3, device="cpu")
    data = vr.load_dataset(modal_app.run_pipeline(forced, **remote))
    assert calls[1] == [0, 1, 2] and data["meta"]["shards"] == 3 and data["z"].shape[0] == 4
    assert sorted(os.listdir(os.path.join(out, "shards", "jacobian_eps0"))) == [f"shard_{i}of3" for i in range(3)]


@pytest.mark.parametrize("change, key", [(["--steps", "6"], "steps"), (["--encoder", "state"], "encoder"),
                                         (["--set", "render=full"], "render"), (["--set", "frame_size=224"], "render"),
                                         (["--set", "episode_seeds=seed"], None), (["--seed", "1"], None)])
def test_modal_shards_made_with_other_options_are_recollected_or_refused(tmp_path, change, key):
    """A shard is finished only if its meta.json matches the job. Other seeds: collected again (the script resumes);
    another encoder, render or length: refused with one line, before any GPU starts; --force re-collects."""
    modal_app = import_modal_app()
    job = modal_app.Job(str(tmp_path / "run"), MODAL_TINY, shards=2)
    fake_collect(modal_app, job, range(2))
    assert modal_app.todo_shards_job(job) == []
    other = modal_app.Job(job.out, MODAL_TINY + change, shards=2)
    if key is None:
        assert modal_app.todo_shards_job(other) == [0, 1]
    else:
        with pytest.raises(RuntimeError, match=rf"shard_0of2 was made with {key}=.*another --run.*--force in --args "
                                               r"\(it deletes the episodes in .*jacobian_eps0") as e:
            modal_app.todo_shards_job(other)
        assert "\n" not in str(e.value)
    assert modal_app.todo_shards_job(modal_app.Job(job.out, MODAL_TINY + change + ["--force"], shards=2)) == [0, 1]


@pytest.mark.parametrize("args, shards, fragment", [
    ("--expert P", 10, "argument --expert: invalid choice: 'P'"),
    ("--episodes 4", 5, "--shards must be between 1 and --episodes (4)"),
    ("--out elsewhere", 10, "--args may not hold --out"),
    ("--shard 0/2", 10, "--args may not hold --shard")])
def test_modal_bad_options_fail_locally_with_one_line_before_anything_starts(monkeypatch, capsys, args, shards,
                                                                             fragment):
    modal_app = import_modal_app()
    monkeypatch.setattr(modal_app, "run_pipeline", lambda *a, **k: pytest.fail("a remote call would start"))
    with pytest.raises(SystemExit) as e:
        modal_app.main.info.raw_f(args=args, shards=shards)
    msg = str(e.value)
    assert msg.startswith("error: --args: ") and fragment in msg and "\n" not in msg
    assert capsys.readouterr().err == ""  # argparse's usage block is not shown: the one line says it all


def test_modal_script_exits_become_exceptions_with_the_scripts_line(tmp_path):
    """Modal's return_exceptions catches Exception, not SystemExit: a bad option inside a container must not
    escape as SystemExit, and a user error (exit 1) must carry its one line."""
    modal_app = import_modal_app()
    with pytest.raises(RuntimeError, match=r"argument --expert: invalid choice: 'P'"):
        modal_app.call_script(vr.main, ["collect", "--expert", "P"], echo=False)
    with pytest.raises(RuntimeError, match=r"^missing .*meta\.json: run the `collect` stage first$"):
        modal_app.call_script(vr.main, ["bc", "--encoder", "state", "--out", str(tmp_path)], echo=False)
    assert modal_app.last_line("usage: ...\nvjepa_reacher.py: error: argument --x\n") == "argument --x"
    with pytest.raises(SystemExit) as e:  # --help still prints help and ends with exit 0
        modal_app.call_script(vr.parse_args, ["--help"], echo=False)
    assert e.value.code == 0


def test_modal_renders_with_egl_only_where_a_context_works(monkeypatch, tmp_path):
    """Issue 27: EGL was chosen because libEGL_nvidia.so.0 opened, not because a context worked."""
    modal_app = import_modal_app()
    assert "libosmesa6" in modal_app.APT
    assert modal_app.gl_backend("import os; assert os.environ['MUJOCO_GL'] == 'egl'") == "egl"  # the check passes
    assert modal_app.gl_backend("raise SystemExit(1)") == "osmesa"  # the check fails
    if os.environ.get("MUJOCO_GL") == "egl":  # this suite renders with EGL (as CI does), so a context works here
        assert modal_app.gl_backend() == "egl"
    # The real check, with a vendor library that loads but is no EGL driver: no context, so OSMesa.
    vendor = tmp_path / "vendor.json"
    vendor.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "libc.so.6"}}')
    monkeypatch.setenv("__EGL_VENDOR_LIBRARY_FILENAMES", str(vendor))
    assert modal_app.gl_backend() == "osmesa"


def readme_modal_commands():
    """The `modal run modal_app.py` and `modal volume get` lines of the README's code blocks, split as a shell
    would: the options of each run, and each fetch line."""
    blocks = open(os.path.join(HERE, "README.md")).read().split("```")[1::2]
    lines = [t for b in blocks for l in b.splitlines() if "modal" in (t := shlex.split(l, comments=True))]
    fetch = [l for l in lines if l[l.index("modal") + 1:][:2] == ["volume", "get"]]
    return [l[3:] for l in lines if l[:3] == ["modal", "run", "modal_app.py"]], fetch


def test_modal_readme_commands_run_in_sequence_without_force(monkeypatch, tmp_path):
    """Issue 27: the smoke run took Phase 1's run folder, so Phase 1 was refused, then the seed recipe."""
    from modal.cli.run import _get_click_command_for_local_entrypoint
    modal_app = import_modal_app()
    monkeypatch.setattr(modal_app, "VOLUME", str(tmp_path))
    jobs = []
    monkeypatch.setattr(modal_app, "run_pipeline", lambda job, **calls: jobs.append(job))
    command = _get_click_command_for_local_entrypoint(modal_app.app, modal_app.main)  # `modal run`'s own parser
    runs, _ = readme_modal_commands()
    assert len(runs) >= 5 and "smoke" in runs[0]
    for argv in runs:  # in the README's order: smoke, Phase 1, ..., seed
        modal_app.main.info.raw_f(**command.make_context("modal run modal_app.py", argv).params)
        todo = modal_app.todo_shards_job(jobs[-1])  # RuntimeError: refused
        assert todo in ([], list(range(jobs[-1].shards))), argv
        fake_collect(modal_app, jobs[-1], todo)
    assert len({job.out for job in jobs}) == 3  # smoke, Phase 1 (+ Phase 2b), the seed's recipe


def test_modal_fetch_command_puts_the_run_folder_in_runs(monkeypatch, tmp_path):
    """Issue 27: `modal volume get vjepa-reacher runs/modal ./runs/modal` put files in ./runs/modal/modal/. The
    printed fetch line goes through modal 1.6.4's own `volume get`, with a volume that is a local folder."""
    from click.testing import CliRunner
    from modal.cli import volume as volume_cli
    from modal.cli.entry_point import entrypoint_cli
    from modal.types import FileEntry, FileEntryType
    modal_app = import_modal_app()
    monkeypatch.setattr(modal_app, "VOLUME", str(tmp_path / "vol"))
    job = modal_app.Job(str(tmp_path / "vol" / "runs" / "smoke"), MODAL_TINY, shards=2)
    fake_collect(modal_app, job, range(2))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        modal_app.run_pipeline(job, lambda job: [], None, merge=lambda job: "data")
    fetch = out.getvalue().strip().rpartition("fetch it: ")[2]
    assert fetch == "mkdir -p runs && modal volume get vjepa-reacher runs/smoke runs"
    assert readme_modal_commands()[1] and all(line[-1] == "runs" for line in readme_modal_commands()[1])

    class Volume:  # modal.Volume's listing and reading, on the local folder
        from_name = classmethod(lambda cls, name, environment_name=None: cls())

        async def iterdir(self, path, recursive=True):
            for d, dirs, files in os.walk(os.path.join(modal_app.VOLUME, path)):
                for name in dirs + files:
                    p = os.path.join(d, name)
                    kind = FileEntryType.DIRECTORY if os.path.isdir(p) else FileEntryType.FILE
                    yield FileEntry(os.path.relpath(p, modal_app.VOLUME), kind, 0, os.path.getsize(p))

        async def read_file(self, path):
            yield open(os.path.join(modal_app.VOLUME, path), "rb").read()
    monkeypatch.setattr(volume_cli, "_Volume", Volume)
    monkeypatch.chdir(tmp_path)
    mkdir, get = fetch.split(" && ")
    os.makedirs(shlex.split(mkdir)[-1])
    result = CliRunner().invoke(entrypoint_cli, shlex.split(get)[1:])
    assert result.exit_code == 0, result.output
    got = sorted(os.path.relpath(f, "runs/smoke") for f in glob.glob("runs/smoke/**/*.json", recursive=True))
    assert got == sorted(os.path.relpath(f, job.out) for f in glob.glob(f"{job.out}/**/*.json", recursive=True))
    assert len(got) == 2
