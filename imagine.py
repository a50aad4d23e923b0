"""Behaviour learning in imagination: DreamerV3's actor-critic on fixed-size vectors, through a given dynamics model.

An actor and a critic learn only from rollouts that a differentiable dynamics model f(z, a) -> z' and a learned reward
head r(z') imagine from replay latents. A Dyna loop acts with the actor in the real environment, adds what it sees to
replay, and refits the dynamics and the reward head on replay, warm-started (never from scratch: the seed's Dyna loops
that retrained from scratch lost what they had learned). It imports nothing from vjepa_reacher.py, only sac.py's replay
buffer and MLP; copy both files.

    learner = Imagination(dynamics, mean, std)          # dynamics: nn.Module f(z, a) on standardised z
    learner.add_episode({"z": z, "actions": a, "rewards": r})   # z (T+1, D), a (T, A), r (T,): replay
    learner.refit()                                     # reward head and dynamics on replay; returns their losses
    info = learner.update()                             # one imagination update of the actor and the critic
    actions = learner(z, obs)                           # a ~ pi(z) (B, A) for raw z (B, D), to explore
    actions = learner.greedy(z, obs)                    # tanh(mean), for evaluation
    curve = dyna(learner, play, seeds, chunk, evaluate, eval_every)     # the whole loop

Equations (DreamerV3, Hafner et al. 2023; danijar/dreamerv3 agent.py `imag_loss`, `lambda_return`; configs.yaml):
  imagine  z_0 from replay (no gradient); a_t ~ pi(z_t), z_{t+1} = f(z_t, a_t), r_{t+1} = r(z_{t+1}), t < H = 15
  return   R_H = v'(z_H);  R_t = r_{t+1} + gamma ((1 - lambda) v'(z_{t+1}) + lambda R_{t+1});  lambda = 0.95, v' slow
  scale    S = max(1, P95(R) - P5(R)), both percentiles an EMA with decay 0.99 (debiased)
  actor    dynamics: minimise -sum_t w_t (R_t / S + eta H_t), gradients through f and r into pi (continuous default)
           reinforce: minimise -sum_t w_t (log pi(a_t | z_t) sg((R_t - v'(z_t)) / S) + eta H_t);  eta = 3e-4
  critic   minimise sum_t w_t [(v(z_t) - sg R_t)^2 + (v(z_t) - sg v'(z_t))^2];  v' <- v' + 0.02 (v - v') each update
  w_t = gamma^t.  H_t: entropy of the Gaussian before the tanh (the tanh-Gaussian's has no closed form).
Deliberate differences from DreamerV3: a deterministic dynamics model given from outside (not its RSSM); MSE in place
of its symlog two-hot losses (rewards here are in [0, 1], returns < 70); gamma = 1 - 1/67 = 0.985, a third of a
200-step episode, as its 1 - 1/333 is a third of DMC's 1,000 steps; Adam at 3e-4 (its 4e-5 needs far more updates).
"""
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sac


def lambda_return(rewards, values, gamma, lam):
    """rewards (H, B) = r_1..r_H, values (H+1, B) = v(z_0..z_H) -> R (H, B), R_t = r_{t+1} + gamma ((1 - lam)
    v_{t+1} + lam R_{t+1}) with R_H = v_H: DreamerV3's lambda_return for episodes that never terminate."""
    R, out = values[-1], []
    for t in reversed(range(len(rewards))):
        R = rewards[t] + gamma * ((1 - lam) * values[t + 1] + lam * R)
        out.append(R)
    return torch.stack(out[::-1])


class ReturnScale:
    """DreamerV3's return normaliser: S = max(limit, hi - lo), lo and hi the EMAs (decay, debiased) of the 5th and
    95th percentiles of the returns seen; `limit` 1 keeps small returns from being blown up."""

    def __init__(self, decay=0.99, low=0.05, high=0.95, limit=1.0):
        self.decay, self.q, self.limit = decay, torch.tensor([low, high]), limit
        self.ema, self.weight = torch.zeros(2), 0.0

    def __call__(self, returns):
        self.ema = self.decay * self.ema + (1 - self.decay) * torch.quantile(returns.detach().flatten().cpu(), self.q)
        self.weight = self.decay * self.weight + (1 - self.decay)
        lo, hi = (self.ema / self.weight).tolist()
        return max(self.limit, hi - lo)


def tanh_log_prob(mean, std, u):
    """log pi(tanh(u)) (B,) for pre-tanh u: the Gaussian's log-density less log|d tanh/du| (as sac.Actor.sample)."""
    logp = (-0.5 * ((u - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    return logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)


class Imagination:
    """The actor-critic, its reward head, the given dynamics, replay (train and held-out), and the Dyna counters.

    Everything works on standardised z = (raw - mean) / std, the dynamics model's own space. Every `val_every`-th
    episode goes to the held-out replay, on which the reward head's and the dynamics' validation losses are measured
    at every refit (learner.refits): the seed's reward head overfitted as its validation loss rose unseen.
    """

    def __init__(self, dynamics, mean, std, action_dim=2, hidden=256, batch_size=64, horizon=15, gamma=0.985,
                 lam=0.95, actor_grad="dynamics", entropy=3e-4, slow_rate=0.02, lr=3e-4, grad_clip=100.0,
                 refit_steps=500, refit_lr=3e-4, val_every=10, capacity=1_000_000, seed=0, device="cpu"):
        # horizon 15, lambda 0.95, entropy 3e-4, slow critic 0.02 a step, clip 100: DreamerV3's configs.yaml.
        # batch 64 starts (DreamerV3: 16 x 64 = 1,024): on one core an update costs ~0.1 s at 64 and ~0.2 s at 256,
        # and 64 learned faster per second here (results/phase5/README.md).
        # refit 500 steps at 3e-4: warm-started, enough to take in the states the actor newly reaches.
        assert actor_grad in ("dynamics", "reinforce")
        self.horizon, self.gamma, self.lam, self.actor_grad, self.entropy = horizon, gamma, lam, actor_grad, entropy
        self.batch_size, self.slow_rate, self.grad_clip = batch_size, slow_rate, grad_clip
        self.device, self.refit_steps, self.val_every = device, refit_steps, val_every
        self.mean, self.std = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (mean, std))
        dim = self.mean.numel()
        with torch.random.fork_rng(devices=[]):  # the seed alone fixes the initial weights; caller's RNG untouched
            torch.manual_seed(seed)
            self.actor = sac.Actor(dim, action_dim, hidden).to(device)
            self.critic = sac.sac_mlp(dim, 1, hidden).to(device)
            self.reward = sac.sac_mlp(dim, 1, hidden).to(device).requires_grad_(False)  # trained only in refit
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.dynamics = dynamics.to(device).requires_grad_(False)  # fixed during behaviour learning
        self.optims = {"actor": torch.optim.Adam(self.actor.parameters(), lr),
                       "critic": torch.optim.Adam(self.critic.parameters(), lr),
                       "reward": torch.optim.Adam(self.reward.parameters(), 1e-3),
                       "dynamics": torch.optim.Adam(self.dynamics.parameters(), refit_lr)}
        self.scale = ReturnScale()
        self.replay = {"train": sac.ReplayBuffer(dim, capacity, action_dim),
                       "val": sac.ReplayBuffer(dim, capacity // val_every + 1, action_dim)}
        self.rng, self.generator = np.random.default_rng(seed), torch.Generator(device).manual_seed(seed)
        self.episodes, self.env_steps, self.updates, self.refits, self.info, self.seconds = 0, 0, 0, [], {}, 0.0

    def standardize(self, z):
        return (torch.as_tensor(z, dtype=torch.float32, device=self.device) - self.mean) / self.std

    def add_episode(self, ep):
        """A finished episode (z (T+1, D) raw, actions (T, A), rewards (T,)) into replay; counts its env steps."""
        split = "val" if self.episodes % self.val_every == self.val_every - 1 else "train"
        self.replay[split].add_episode(np.asarray(ep["z"], np.float32), ep["actions"], ep["rewards"])
        self.episodes, self.env_steps = self.episodes + 1, self.env_steps + len(ep["actions"])

    def batch(self, split, n):
        b = self.replay[split if len(self.replay[split]) else "train"].sample(n, self.rng)  # few episodes: no held-out
        return self.standardize(b["z"]), b["a"].to(self.device), b["r"].to(self.device), self.standardize(b["z_next"])

    def losses(self, split, n):
        """The reward head's MSE on r_t from z_{t+1} and the dynamics' SmoothL1 on z_{t+1}, on n replay samples."""
        z, a, r, z_next = self.batch(split, n)
        return F.mse_loss(self.reward(z_next).squeeze(-1), r), F.smooth_l1_loss(self.dynamics(z, a), z_next)

    def refit(self, steps=None):
        """Warm-started refit of the reward head and the dynamics on training replay, `steps` batches; the losses on
        held-out replay before and after are appended to self.refits and returned."""
        before = [x.item() for x in self.losses("val", 4096)]  # reward head and dynamics are frozen here: no graph
        self.reward.requires_grad_(True), self.dynamics.requires_grad_(True)
        for _ in range(self.refit_steps if steps is None else steps):
            reward_loss, dynamics_loss = self.losses("train", self.batch_size)
            for name, loss in (("reward", reward_loss), ("dynamics", dynamics_loss)):
                self.optims[name].zero_grad(set_to_none=True)
                loss.backward()
                self.optims[name].step()
        self.reward.requires_grad_(False), self.dynamics.requires_grad_(False)
        after = [x.item() for x in self.losses("val", 4096)]
        row = {"env_steps": self.env_steps, "reward_train": reward_loss.item(), "reward_val_before": before[0],
               "reward_val": after[0], "dynamics_train": dynamics_loss.item(), "dynamics_val": after[1]}
        self.refits.append(row)
        return row

    def imagine(self, z):
        """Roll the actor through the dynamics for H steps from z (B, D): latents (H+1, B, D), the actions' Gaussian
        log-probabilities and entropies (H, B). With actor_grad 'dynamics' the latents carry the actor's gradient."""
        backprop, zs, logps, ents = self.actor_grad == "dynamics", [z.detach()], [], []
        for _ in range(self.horizon):
            mean, log_std = self.actor(zs[-1])
            std = log_std.exp()
            u = mean + std * torch.randn(mean.shape, generator=self.generator, device=self.device)
            u = u if backprop else u.detach()
            logps.append(tanh_log_prob(mean, std, u))
            ents.append((std.log() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1))
            with torch.set_grad_enabled(backprop):
                zs.append(self.dynamics(zs[-1], torch.tanh(u)))
        return torch.stack(zs), torch.stack(logps), torch.stack(ents)

    def update(self):
        """One behaviour update from batch_size replay latents: imagine, lambda-returns, actor, critic, slow critic."""
        zs, logp, ent = self.imagine(self.batch("train", self.batch_size)[0])
        reward = self.reward(zs[1:]).squeeze(-1)  # (H, B): the reward of arriving at z_{t+1}
        slow = self.slow_critic(zs).squeeze(-1)  # (H+1, B)
        R = lambda_return(reward, slow, self.gamma, self.lam)
        S = self.scale(R)
        w = self.gamma ** torch.arange(self.horizon, device=self.device, dtype=torch.float32)[:, None]
        if self.actor_grad == "dynamics":
            actor_loss = -(w * (R / S + self.entropy * ent)).mean()
        else:
            actor_loss = -(w * (logp * ((R - slow[:-1]) / S).detach() + self.entropy * ent)).mean()
        v = self.critic(zs[:-1].detach()).squeeze(-1)
        critic_loss = (w * ((v - R.detach()) ** 2 + (v - slow[:-1].detach()) ** 2)).mean()
        for name, loss, net in (("actor", actor_loss, self.actor), ("critic", critic_loss, self.critic)):
            self.optims[name].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
            self.optims[name].step()
        with torch.no_grad():
            for p, p_slow in zip(self.critic.parameters(), self.slow_critic.parameters()):
                p_slow.lerp_(p, self.slow_rate)
        self.updates += 1
        self.info = {"actor_loss": actor_loss.item(), "critic_loss": critic_loss.item(), "return_scale": S,
                     "imagined_return": R[0].mean().item(), "imagined_reward": reward.mean().item(),
                     "entropy": ent.mean().item()}
        return self.info

    @torch.no_grad()
    def diagnose(self, episodes):
        """Where the learned policy's real episodes (z (T+1, D), actions, rewards) part from what it imagined: the
        reward head's MSE and the dynamics' 1-step L2 error along them, beside that error on held-out replay."""
        rows = []
        for ep in episodes:
            z, a = self.standardize(ep["z"]), torch.as_tensor(np.asarray(ep["actions"]), device=self.device)
            rows.append([((self.reward(z[1:]).squeeze(-1).cpu().numpy() - ep["rewards"]) ** 2).mean(),
                         (self.dynamics(z[:-1], a) - z[1:]).norm(dim=-1).mean().item(), ep["rewards"][-1] >= 1])
        rows, (z, a, _, z_next) = np.array(rows, np.float64), self.batch("val", 4096)
        out = {"replay_dynamics_error": (self.dynamics(z, a) - z_next).norm(dim=-1).mean().item()}
        for name, keep in (("success", rows[:, 2] == 1), ("failure", rows[:, 2] == 0)):
            out[name] = {"n": int(keep.sum()), "reward_mse": float(rows[keep, 0].mean()) if keep.any() else None,
                         "dynamics_error": float(rows[keep, 1].mean()) if keep.any() else None}
        return out

    @torch.no_grad()
    def __call__(self, z, obs):
        """a = tanh(u), u ~ the actor's Gaussian: actions (B, A) for raw z (B, D), to explore in the real env."""
        return self.actor.sample(self.standardize(z), self.generator)[0].cpu().numpy()

    @torch.no_grad()
    def greedy(self, z, obs):
        """tanh(mean) (B, A) for raw z (B, D): the deterministic policy, for evaluation (one forward pass); the
        time it takes adds up in self.seconds."""
        t0 = time.perf_counter()
        a = torch.tanh(self.actor(self.standardize(z))[0]).cpu().numpy()
        self.seconds += time.perf_counter() - t0
        return a


def dyna(learner, play, seeds, chunk, evaluate, eval_every, ratio=0.1, refit_every=2_000, pretrain=0, first_fit=2_000):
    """Dyna: the reward head's first fit (first_fit steps), `pretrain` imagination updates on the replay already
    held, then the real episodes `seeds`, `chunk` at a time: play(seeds) acts with the learner and returns the
    finished episodes, which go into replay; every refit_every env steps the reward head and dynamics are refitted;
    `ratio` updates follow each new env step.
    evaluate(learner) -> {success, return} at the start, every eval_every env steps and at the end: the curve."""
    curve, t0, owed = [], time.time(), 0.0

    def point():
        m = evaluate(learner)
        curve.append({"step": learner.env_steps, "updates": learner.updates, "success": m["success"],
                      "return": m["return"], "seconds": round(time.time() - t0, 1), **learner.refits[-1],
                      **learner.info})
        print(f"imagine: {learner.env_steps:,} env steps | {learner.updates:,} updates | eval success "
              f"{m['success']:.2f} | return {m['return']:.1f} | reward val {learner.refits[-1]['reward_val']:.4f} | "
              f"{time.time() - t0:.0f} s", flush=True)
    learner.refit(first_fit)
    for _ in range(pretrain):
        learner.update()
    point()
    next_refit, next_eval = learner.env_steps + refit_every, learner.env_steps + eval_every
    for start in range(0, len(seeds), chunk):
        before = learner.env_steps
        for ep in play(seeds[start:start + chunk]):
            learner.add_episode(ep)
        if learner.env_steps >= next_refit:
            learner.refit()
            next_refit += refit_every
        owed += ratio * (learner.env_steps - before)
        while owed >= 1:
            learner.update()
            owed -= 1
        if learner.env_steps >= next_eval or start + chunk >= len(seeds):
            point()
            while next_eval <= learner.env_steps:
                next_eval += eval_every
    return curve
