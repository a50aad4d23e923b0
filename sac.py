"""Soft actor-critic on fixed-size vectors (here: frozen V-JEPA 2 embeddings), in one copyable file.

CleanRL's sac_continuous_action.py in spirit (twin Q + Polyak targets, tanh-Gaussian actor, automatic entropy
tuning, random warm-up), without its env loop: `SACAgent` is called as policy(z, obs) -> actions by whatever
loop steps the environments, learns while it acts, and takes finished episodes through `add_episode`.
It imports nothing from vjepa_reacher.py; copy the file whole into another project.

    agent = SACAgent(dim, mean, std, action_repeat=2)      # mean, std: standardisation of z; action_dim=2
    actions = agent(z, obs)                                # (B, A); learns once the buffer is warm
    agent.add_episode({"z": z, "actions": a, "rewards": r})  # z (T+1, D), a (T, A), r (T,)
    greedy_actions = agent.greedy(z, obs)                  # deterministic tanh(mean), for evaluation
    curve = train(agent, play, seeds, 8, evaluate, 10_000)  # or the whole loop: play(seeds) -> episodes

References: Haarnoja et al. 2018 (SAC, and its automatic temperature), CleanRL (Huang et al. 2022).
"""
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
        self.z, self.z_next = np.zeros((capacity, dim), np.float32), np.zeros((capacity, dim), np.float32)
        self.a = np.zeros((capacity, action_dim), np.float32)
        self.r, self.done = np.zeros(capacity, np.float32), np.zeros(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def __len__(self):
        return self.size

    def add_episode(self, z, actions, rewards, terminal=False):
        """Append the T transitions of one episode: z (T+1, D), actions (T, A), rewards (T,)."""
        T = len(actions)
        rows = (self.pos + np.arange(T)) % self.capacity
        self.z[rows], self.z_next[rows] = z[:-1], z[1:]
        self.a[rows], self.r[rows], self.done[rows] = actions, rewards, 0.0
        self.done[rows[-1]] = float(terminal)
        self.pos, self.size = (self.pos + T) % self.capacity, min(self.size + T, self.capacity)

    def sample(self, n, rng):
        """n uniformly drawn transitions: dict of tensors z (n, D), a (n, A), r (n,), z_next (n, D), done (n,)."""
        idx = rng.integers(0, self.size, n)
        return {k: torch.from_numpy(getattr(self, k)[idx]) for k in ("z", "a", "r", "z_next", "done")}


def sac_update(nets, optims, batch, gamma=0.99, tau=0.005, target_entropy=None, generator=None):
    """One gradient step of SAC on a batch of standardised transitions (z, a, r, z_next, done); returns floats.
    nets: actor, critic (QNet), critic_target, log_alpha; optims: actor, critic, alpha (Adam).
      1. critic: regress q1, q2 (z, a) on r + gamma (1 - done) [min Q_target(z', a') - alpha log pi(a'|z')],
         a' ~ pi(z'): the soft Bellman target.
      2. actor: minimise alpha log pi(a|z) - min Q(z, a) with a ~ pi(z) reparameterised (CleanRL every other
         step with two updates; one every step here is the same count, simpler).
      3. alpha: move log alpha so that the policy's entropy tracks target_entropy (None: -action_dim, SAC's).
      4. Polyak: critic_target <- tau critic + (1 - tau) critic_target."""
    actor, critic, critic_target, log_alpha = nets["actor"], nets["critic"], nets["critic_target"], nets["log_alpha"]
    alpha = log_alpha.exp().detach()
    target_entropy = -batch["a"].shape[-1] if target_entropy is None else target_entropy
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

    Called as policy(z, obs) on a lockstep batch z (B, D) it returns actions (B, action_dim): uniform random for the
    first learning_starts control steps, then a ~ pi(z). It counts control steps (B x action_repeat per call)
    and, once the buffer holds batch_size transitions, makes updates_per_step gradient updates per decision
    (per transition collected), so learning happens while the episodes run. `greedy` is the deterministic
    policy tanh(mean) for evaluation: it neither counts steps nor learns.
    """

    def __init__(self, dim, mean, std, action_repeat=2, hidden=256, batch_size=256, learning_starts=5_000,
                 updates_per_step=1.0, actor_lr=3e-4, critic_lr=1e-3, gamma=0.99, tau=0.005, capacity=100_000, seed=0,
                 device="cpu", action_dim=2):  # 2: reacher's two joint torques
        # CleanRL's defaults: hidden 256, batch 256, actor lr 3e-4, critic and alpha lr 1e-3, tau 0.005, gamma 0.99,
        # one update per transition (per decision; DrQ's too), learning_starts 5,000 (25 random episodes of 200 steps).
        # capacity in transitions, not CleanRL's 1M: at D=1024 each costs 8 kB (z and z_next); size it to the whole run.
        self.device, self.action_repeat, self.batch_size = device, action_repeat, batch_size
        self.gamma, self.tau, self.action_dim = gamma, tau, action_dim
        self.learning_starts, self.updates_per_step = learning_starts, updates_per_step
        self.mean, self.std = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (mean, std))
        with torch.random.fork_rng(devices=[]):  # --seed alone fixes the initial weights; caller's RNG untouched
            torch.manual_seed(seed)
            actor, critic = Actor(dim, action_dim, hidden).to(device), QNet(dim, action_dim, hidden).to(device)
        critic_target = QNet(dim, action_dim, hidden).to(device).requires_grad_(False)
        critic_target.load_state_dict(critic.state_dict())
        log_alpha = torch.zeros((), device=device, requires_grad=True)  # alpha starts at 1, as CleanRL
        self.nets = {"actor": actor, "critic": critic, "critic_target": critic_target, "log_alpha": log_alpha}
        self.optims = {"actor": torch.optim.Adam(actor.parameters(), lr=actor_lr),
                       "critic": torch.optim.Adam(critic.parameters(), lr=critic_lr),
                       "alpha": torch.optim.Adam([log_alpha], lr=critic_lr)}
        self.target_entropy = -float(action_dim)  # SAC's heuristic
        self.buffer = ReplayBuffer(dim, capacity, action_dim)
        self.rng, self.generator = np.random.default_rng(seed), torch.Generator(device).manual_seed(seed)
        self.env_steps, self.updates, self.owed, self.info, self.returns = 0, 0, 0.0, {}, []

    def standardize(self, z):
        return (torch.as_tensor(z, dtype=torch.float32, device=self.device) - self.mean) / self.std

    @torch.no_grad()
    def greedy(self, z, obs):
        """The deterministic policy tanh(mean), actions (B, A) for raw embeddings z (B, D): for evaluation."""
        return torch.tanh(self.nets["actor"](self.standardize(z))[0]).cpu().numpy()

    def __call__(self, z, obs):
        B = len(z)
        if self.env_steps < self.learning_starts:
            a = self.rng.uniform(-1, 1, size=(B, self.action_dim)).astype(np.float32)
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
        """Store a finished episode (z (T+1, D), actions (T, A), rewards (T,)); `train` passes it each episode
        that play returns. Episodes of a lockstep chunk arrive when the chunk ends: one chunk later than
        CleanRL's add after every step."""
        self.buffer.add_episode(ep["z"], ep["actions"], ep["rewards"])
        self.returns.append(float(ep["rewards"].sum()))

    def update(self):
        batch = {k: v.to(self.device) for k, v in self.buffer.sample(self.batch_size, self.rng).items()}
        batch["z"], batch["z_next"] = self.standardize(batch["z"]), self.standardize(batch["z_next"])
        self.info = sac_update(self.nets, self.optims, batch, self.gamma, self.tau, self.target_entropy, self.generator)
        self.updates += 1


def train(agent, play, seeds, chunk, evaluate, eval_every):
    """Run SAC over episodes `seeds`, `chunk` at a time: play(seeds) plays them with the agent as their policy
    (it learns as it acts) and returns the finished episodes, which go into its buffer. Every eval_every control
    steps, and at the end, evaluate(agent) -> {success, return} adds a point to the learning curve, returned."""
    curve, next_eval, t0 = [], eval_every, time.time()
    for start in range(0, len(seeds), chunk):
        for ep in play(seeds[start:start + chunk]):
            agent.add_episode(ep)
        if agent.env_steps >= next_eval or start + chunk >= len(seeds):
            m = evaluate(agent)
            curve.append({"step": agent.env_steps, "updates": agent.updates, "success": m["success"],
                          "return": m["return"], "train_return": float(np.mean(agent.returns[-2 * chunk:])),
                          "seconds": round(time.time() - t0, 1), **agent.info})
            print(f"sac: {agent.env_steps:,} env steps | eval success {m['success']:.2f} | return {m['return']:.1f} | "
                  f"{time.time() - t0:.0f} s", flush=True)
            while next_eval <= agent.env_steps:
                next_eval += eval_every
    return curve
