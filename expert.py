"""The directional ant expert that OGBench's antmaze data recipe steers: soft actor-critic on `online-ant-xy`.

OGBench collected its antmaze datasets with a SAC policy (Haarnoja et al., 2018) trained for 400K steps on
`online-ant-xy-v0`: `ogbench.online_locomotion`'s ant (27 numbers: the ant without its x-y) plus a unit
direction (2), rewarded by its displacement along that direction, which is resampled every 100 steps
(`GymXYWrapper`). In a maze the recipe feeds the expert `ob[2:]` and the unit direction to the oracle's
subgoal. This module trains that expert with OGBench's settings (`impls/agents/sac.py`: 2x256 GELU
networks, batch 256, Adam 1e-4, discount 0.99, target rate 0.005, min of twin critics, tanh-Gaussian actor
with state-dependent std and a final layer initialised at scale 0.01, learned temperature with target
entropy -0.5 dim(A); 10K random-action steps, then one update per environment step; masks = not terminated)
and serves the trained actor to `ogbench_utils.py generate`. A data tool, not part of the agent.

    python expert.py train --steps 400000 --out experts/ant_expert.pth    # about an hour on 2 cores
    python expert.py train --save_dir runs/expert --resume                # continue a killed run
    python expert.py evaluate experts/ant_expert.pth                      # its directional return
"""
import argparse
import datetime
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import (CSVLogger, RunFolder, UserError, exit_on_user_error, load_checkpoint, plot_curves, positive_int,
                   save_checkpoint, write_json)

EXPERT_FORMAT = "opso-ant-expert-v1"          # the shipped actor weights
EXPERT_RUN_FORMAT = "opso-ant-expert-run-v1"   # a training run's state, for --resume
ANT_ENV = "online-ant-v0"
DIRECTION_RESAMPLE_STEPS = 100                # GymXYWrapper's interval in OGBench's expert training
DEFAULT_EXPERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experts", "ant_expert.pth")
LOG_STD_RANGE = (-5.0, 2.0)
RUN_FILES = ("expert_metrics.csv", "last_expert_run.pth", "expert_curves.png")


@dataclass
class SACConfig:
    obs_dim: int = 29
    action_dim: int = 8
    hidden_dim: int = 256
    lr: float = 1e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005
    target_entropy_multiplier: float = 0.5
    actor_init_scale: float = 0.01


def glorot_mlp(in_dim, hidden_dim, out_dim=None):
    """Linear-GELU stack with Flax's default init (Glorot uniform, zero bias); no final layer if out_dim is None."""
    layers = [nn.Linear(in_dim, hidden_dim), nn.GELU(approximate="tanh"),
              nn.Linear(hidden_dim, hidden_dim), nn.GELU(approximate="tanh")]
    if out_dim is not None:
        layers.append(nn.Linear(hidden_dim, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """tanh-squashed Gaussian with state-dependent std; the deterministic action is tanh(mean)."""

    def __init__(self, config: SACConfig):
        super().__init__()
        self.trunk = glorot_mlp(config.obs_dim, config.hidden_dim)
        self.mean = nn.Linear(config.hidden_dim, config.action_dim)
        self.log_std = nn.Linear(config.hidden_dim, config.action_dim)
        for layer in (self.mean, self.log_std):   # variance scale 0.01 = Glorot with gain 0.1
            nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(config.actor_init_scale))
            nn.init.zeros_(layer.bias)

    def forward(self, observations):
        h = self.trunk(observations)
        return self.mean(h), self.log_std(h).clamp(*LOG_STD_RANGE)

    def sample(self, observations):
        """Reparameterised actions and their log-probabilities under the squashed Gaussian."""
        mean, log_std = self(observations)
        pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
        gaussian_log_prob = (-0.5 * ((pre_tanh - mean) / log_std.exp()).square() - log_std
                             - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log |d tanh(u) / du| = log(1 - tanh(u)^2), written stably
        log_det = (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh), gaussian_log_prob - log_det

    def deterministic(self, observations):
        return torch.tanh(self(observations)[0])


class TwinCritic(nn.Module):
    def __init__(self, config: SACConfig):
        super().__init__()
        self.q1 = glorot_mlp(config.obs_dim + config.action_dim, config.hidden_dim, 1)
        self.q2 = glorot_mlp(config.obs_dim + config.action_dim, config.hidden_dim, 1)

    def forward(self, observations, actions):
        x = torch.cat([observations, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class SAC:
    """Twin critics with EMA targets, the actor and the log-temperature, one Adam over all of them."""

    def __init__(self, config: SACConfig):
        self.config = config
        self.actor, self.critic = Actor(config), TwinCritic(config)
        self.target_critic = TwinCritic(config).requires_grad_(False)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -config.target_entropy_multiplier * config.action_dim
        self.optimizer = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters(), self.log_alpha],
                                          lr=config.lr)

    def critic_loss(self, batch):
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_actions, next_log_probs = self.actor.sample(batch["next_observations"])
            next_q = torch.minimum(*self.target_critic(batch["next_observations"], next_actions))
            target_q = batch["rewards"] + self.config.discount * batch["masks"] * (next_q - alpha * next_log_probs)
        q1, q2 = self.critic(batch["observations"], batch["actions"])
        loss = 0.5 * ((q1 - target_q).square().mean() + (q2 - target_q).square().mean())
        return loss, {"critic/loss": loss, "critic/q_mean": q1.mean()}

    def actor_and_alpha_loss(self, batch):
        alpha = self.log_alpha.exp()
        actions, log_probs = self.actor.sample(batch["observations"])
        self.critic.requires_grad_(False)   # the actor's loss moves the actor only
        q = torch.minimum(*self.critic(batch["observations"], actions))
        self.critic.requires_grad_(True)
        actor_loss = (alpha.detach() * log_probs - q).mean()
        entropy = -log_probs.detach().mean()
        alpha_loss = alpha * (entropy - self.target_entropy)
        return actor_loss + alpha_loss, {"actor/loss": actor_loss, "actor/entropy": entropy, "alpha/value": alpha,
                                         "alpha/loss": alpha_loss}

    def update(self, batch):
        """One gradient step on all three losses (computed with the parameters before the step)."""
        critic_loss, info = self.critic_loss(batch)
        actor_loss, actor_info = self.actor_and_alpha_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        (critic_loss + actor_loss).backward()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()),
                                 self.config.tau)
        info.update(actor_info)
        return {k: float(v.detach()) for k, v in info.items()}

    def state_dict(self):
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(state["optimizer"])


class ReplayBuffer:
    """Transitions in preallocated arrays; uniform sampling."""

    FIELDS = ("observations", "actions", "rewards", "masks", "next_observations")

    def __init__(self, capacity, obs_dim, action_dim):
        shapes = dict(observations=(obs_dim,), actions=(action_dim,), rewards=(), masks=(),
                      next_observations=(obs_dim,))
        self.arrays = {k: np.zeros((capacity, *shapes[k]), np.float32) for k in self.FIELDS}
        self.size = 0

    def add(self, **transition):
        for key in self.FIELDS:
            self.arrays[key][self.size] = transition[key]
        self.size += 1

    def sample(self, batch_size, rng):
        rows = rng.integers(self.size, size=batch_size)
        return {k: torch.from_numpy(v[rows]) for k, v in self.arrays.items()}

    def state_dict(self):
        return {k: torch.from_numpy(v[:self.size].copy()) for k, v in self.arrays.items()}

    def load_state_dict(self, state):
        self.size = len(state["rewards"])
        for key in self.FIELDS:
            self.arrays[key][:self.size] = state[key].numpy()


def make_directional_env():
    """OGBench's expert-training task: the online ant, its observation + a unit direction, rewarded along it."""
    import gymnasium
    import ogbench.online_locomotion  # noqa: F401  (registers online-ant-v0)
    from ogbench.online_locomotion.wrappers import GymXYWrapper
    return GymXYWrapper(gymnasium.make(ANT_ENV), resample_interval=DIRECTION_RESAMPLE_STEPS)


def numpy_global_state():
    """numpy's global RNG state in types a weights_only checkpoint holds (its key array as a tensor)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return dict(name=name, key=torch.as_tensor(key.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                cached=float(cached))


def set_numpy_global_state(state):
    np.random.set_state((state["name"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached"]))


def env_state(env, ob, episode_return):
    """Everything the directional task needs to continue the current episode exactly (for --resume)."""
    ant, time_limit = env.unwrapped, env.env
    return dict(qpos=torch.as_tensor(ant.data.qpos.copy()), qvel=torch.as_tensor(ant.data.qvel.copy()),
                direction=torch.as_tensor(env.z.copy()), direction_steps=env.num_steps,
                elapsed_steps=time_limit._elapsed_steps, env_rng=ant.np_random.bit_generator.state,
                action_rng=env.action_space.np_random.bit_generator.state, ob=torch.as_tensor(ob),
                episode_return=float(episode_return))


def restore_env_state(env, state):
    ant = env.unwrapped
    env.reset()   # marks the episode as started for gymnasium's wrappers
    ant.set_state(state["qpos"].numpy(), state["qvel"].numpy())
    env.z, env.num_steps, env.env._elapsed_steps = state["direction"].numpy(), state["direction_steps"], state["elapsed_steps"]
    ant.np_random.bit_generator.state = state["env_rng"]
    env.action_space.np_random.bit_generator.state = state["action_rng"]
    return state["ob"].numpy(), state["episode_return"]


# ----------------------------------------------------------------------------- the trained policy

class ExpertPolicy:
    """The shipped actor, deterministic: (N, 29) inputs (the ant without x-y, a unit direction) -> (N, 8)."""

    def __init__(self, actor, config, path):
        self.actor, self.config, self.path = actor.eval(), config, path

    @torch.no_grad()
    def __call__(self, inputs):
        inputs = torch.as_tensor(np.asarray(inputs, np.float32))
        return self.actor.deterministic(inputs).numpy()

    def sha256(self):
        return file_sha256(self.path)


def load_expert(path=DEFAULT_EXPERT):
    """The expert actor saved by `train` (weights only, no code executed); one clear line if it is not one."""
    checkpoint = load_checkpoint(path, expected_format=EXPERT_FORMAT, kind="ant expert file")
    config = SACConfig(**checkpoint["config"])
    actor = Actor(config)
    try:
        actor.load_state_dict(checkpoint["actor"])
    except (RuntimeError, KeyError) as error:
        raise UserError(f"{path} is an ant expert file with unusable weights ({type(error).__name__})") from None
    return ExpertPolicy(actor, config, path)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def directional_return(actor, episodes, seed):
    """Mean return (displacement along the commanded directions) of the deterministic actor over full episodes."""
    outer_state = np.random.get_state()   # GymXYWrapper draws its directions from numpy's global RNG:
    np.random.seed(seed)                   # seed it here, and give the training stream back after
    env = make_directional_env()
    returns, lengths = [], []
    for episode in range(episodes):
        ob, _ = env.reset(seed=seed + episode)
        done, total, length = False, 0.0, 0
        while not done:
            action = actor.deterministic(torch.as_tensor(ob, dtype=torch.float32)[None])[0].numpy()
            ob, reward, terminated, truncated, _ = env.step(action)
            total, length, done = total + reward, length + 1, terminated or truncated
        returns.append(total)
        lengths.append(length)
    env.close()
    np.random.set_state(outer_state)
    return float(np.mean(returns)), float(np.mean(lengths))


def train(args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = RunFolder(args.save_dir, RUN_FILES, "last_expert_run.pth")
    folder.check(args.resume, args.overwrite)
    return folder.run(args.resume, lambda: train_sac(args, folder, folder.path("last_expert_run.pth")))


def train_sac(args, folder, run_path):
    env = make_directional_env()
    config = SACConfig(obs_dim=env.observation_space.shape[0], action_dim=env.action_space.shape[0])
    torch.manual_seed(args.seed)
    agent, buffer = SAC(config), ReplayBuffer(args.steps, config.obs_dim, config.action_dim)
    rng = np.random.default_rng(args.seed)
    np.random.seed(args.seed)
    env.action_space.seed(args.seed)
    progress = dict(step=0, episodes=0, elapsed=0.0, recent_returns=[])
    ob, _ = env.reset(seed=args.seed)
    episode_return = 0.0
    if args.resume:
        state = load_checkpoint(run_path, expected_format=EXPERT_RUN_FORMAT, kind="expert training run")
        agent.load_state_dict(state["agent"])
        buffer.load_state_dict(state["buffer"])
        progress = dict(state["progress"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["rng_torch"])
        ob, episode_return = restore_env_state(env, state["env"])
        set_numpy_global_state(state["rng_numpy"])   # after the env's reset, which draws from it
    logger = CSVLogger(folder.path("expert_metrics.csv"), resume=args.resume,
                       keep_rows_until=("step", progress["step"]))
    start = time.time() - progress["elapsed"]
    infos = []
    bar = tqdm(range(progress["step"] + 1, args.steps + 1), initial=progress["step"], total=args.steps,
               desc="SAC online-ant-xy", disable=args.no_progress, smoothing=0.05)
    for step in bar:
        if step <= args.seed_steps:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = agent.actor.sample(torch.as_tensor(ob, dtype=torch.float32)[None])[0][0].numpy()
        next_ob, reward, terminated, truncated, _ = env.step(action)
        buffer.add(observations=ob, actions=action, rewards=reward, masks=float(not terminated),
                   next_observations=next_ob)
        ob, episode_return = next_ob, episode_return + reward
        if terminated or truncated:
            progress["episodes"] += 1
            progress["recent_returns"] = (progress["recent_returns"] + [float(episode_return)])[-10:]
            ob, _ = env.reset()
            episode_return = 0.0
        if step > args.seed_steps:
            infos.append(agent.update(buffer.sample(config.batch_size, rng)))
        progress["step"] = step
        if step % args.log_every == 0 or step == args.steps:
            row = log_row(agent, progress, infos, step, start, args)
            logger.log(row)
            plot_curves(logger.path, folder.path("expert_curves.png"), "step", CURVE_PANELS,
                        title="SAC on online-ant-xy (directional ant expert)")
            bar.set_postfix(ret=f"{row['train/episode_return']:.1f}", eval=f"{row['eval/return']:.1f}",
                            alpha=f"{row.get('alpha/value', float('nan')):.3f}")
            infos = []
            progress["elapsed"] = time.time() - start
            save_checkpoint(dict(format=EXPERT_RUN_FORMAT, agent=agent.state_dict(), buffer=buffer.state_dict(),
                                 progress=progress, config=asdict(config), rng=rng.bit_generator.state,
                                 rng_torch=torch.get_rng_state(), rng_numpy=numpy_global_state(),
                                 env=env_state(env, ob, episode_return), args=vars(args)),
                            run_path)
            folder.committed()
            write_expert(agent.actor, config, args.out, dict(
                steps=step, seed=args.seed, command="python " + " ".join(sys.argv),
                directional_return=row["eval/return"], eval_episode_length=row["eval/episode_length"],
                eval_episodes=args.eval_episodes, train_minutes=round(progress["elapsed"] / 60, 1)))
    env.close()
    return progress


CURVE_PANELS = [("directional return", ["train/episode_return", "eval/return"]), ("critic loss", ["critic/loss"]),
                ("Q mean", ["critic/q_mean"]), ("temperature", ["alpha/value"]), ("entropy", ["actor/entropy"])]


def log_row(agent, progress, infos, step, start, args):
    row = {"step": step, "episodes": progress["episodes"],
           "train/episode_return": float(np.mean(progress["recent_returns"])) if progress["recent_returns"] else math.nan}
    for key in ("critic/loss", "critic/q_mean", "actor/loss", "actor/entropy", "alpha/value"):
        row[key] = float(np.mean([i[key] for i in infos])) if infos else math.nan
    row["eval/return"], row["eval/episode_length"] = directional_return(agent.actor, args.eval_episodes,
                                                                        seed=10_000 + step)
    row["time/elapsed_s"] = time.time() - start
    return row


def write_expert(actor, config, path, provenance):
    """The actor's weights (what `generate` needs) and a side file saying how they were made."""
    save_checkpoint(dict(format=EXPERT_FORMAT, config=asdict(config), actor=actor.state_dict()), path)
    provenance.update(env=f"{ANT_ENV} + GymXYWrapper(resample_interval={DIRECTION_RESAMPLE_STEPS})",
                      algorithm="SAC, OGBench's impls/agents/sac.py settings", sha256=file_sha256(path),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json(os.path.splitext(path)[0] + ".json", provenance)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description="The directional ant expert (SAC on online-ant-xy) for antmaze data.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="train the expert with SAC", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--steps", type=positive_int, default=400_000, help="environment steps (OGBench: 400K)")
    tr.add_argument("--seed_steps", type=positive_int, default=10_000, help="random-action steps before updates")
    tr.add_argument("--seed", type=int, default=0, help="random seed")
    tr.add_argument("--save_dir", default="runs/expert", help="run folder: metrics, curves, resumable state")
    tr.add_argument("--out", default="runs/expert/ant_expert.pth",
                    help="where the actor's weights (and a .json side file) are written at every log step; "
                         "experts/ant_expert.pth is the one `generate` uses")
    tr.add_argument("--log_every", type=positive_int, default=10_000,
                    help="steps between CSV rows, evaluations and checkpoints")
    tr.add_argument("--eval_episodes", type=positive_int, default=3, help="deterministic episodes per evaluation")
    tr.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --save_dir")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --save_dir")
    tr.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    ev = commands.add_parser("evaluate", help="directional return of a saved expert")
    ev.add_argument("expert", nargs="?", default=DEFAULT_EXPERT, help="expert weights file")
    ev.add_argument("--episodes", type=positive_int, default=10, help="episodes of 1000 steps")
    ev.add_argument("--seed", type=int, default=0, help="evaluation seed")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    expert = load_expert(args.expert)
    mean_return, length = directional_return(expert.actor, args.episodes, args.seed)
    print(f"{args.expert}: directional return {mean_return:.1f} over {args.episodes} episodes (mean length {length:.0f})")
    return mean_return


if __name__ == "__main__":
    exit_on_user_error(main)
