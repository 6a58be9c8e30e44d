"""Where does a checkpoint's policy fail: the subgoal choice or the inverse dynamics?

Evaluates one checkpoint (OGBench protocol, all episodes side by side) with the subgoal z' chosen by:
  search    the agent's policy search (argmax Q over its candidates)
  proposer  the proposer alone, z' = P(z, z_g)
  snapped   the encoding E([s]) of the dataset state (among --bank random ones) nearest to P(z, z_g)
  bank      no proposer: of the --bank dataset states that V deems reachable within k steps, the one
            with the largest V(E([s]), z_g)
  goal      the goal itself, z' = z_g
  oracle    the maze's oracle subgoal (the next cell on the shortest path), encoded as z' = E([s'])
and, as a ceiling for this environment, the oracle policy itself (unit step towards the oracle subgoal,
no learning). Pointmaze only (the oracle needs the maze's map).

    python benchmarks/diagnose_acting.py runs/offline/last_model.pth [--modes search,proposer,goal,oracle,oracle_policy]
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --trace 4 [--trace_mode proposer]  # one episode of task 4
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --distances   # I(z, E([o_{t+d}]), z_g) on the data
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --high_level  # V and the subgoals vs shortest paths
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --on_policy   # the proposals on the agent's own rollouts
"""
import argparse
import math

import numpy as np
import torch

from common import machine_line
from offline_agent import OfflineAgent
from ogbench_utils import (GENERATED_DATASET_DIR, dataset_paths, evaluate, make_env, return_of_reaching,
                           set_run_subgoal_data)
from utils import load_checkpoint


class OraclePolicy:
    """Unit step towards the oracle subgoal, for a batch of episodes (the evaluate() actor interface)."""

    def __init__(self, maze, goals):
        self.maze, self.goals = maze, np.asarray(goals)

    def subgoals(self, observations):
        return np.stack([np.asarray(self.maze.get_oracle_subgoal(o[:2], g[:2])[0])
                         for o, g in zip(observations, self.goals)]).astype(np.float32)

    def act(self, observations):
        offset = self.subgoals(observations) - np.asarray(observations)[:, :2]
        return offset / (np.linalg.norm(offset, axis=1, keepdims=True) + 1e-6)

    def keep(self, rows):
        self.goals = self.goals[rows]


class SubgoalOverride:
    """The agent's actor with z' replaced by one of the modes above."""

    def __init__(self, agent, maze, goals, mode, bank=None):
        self.agent, self.mode, self.bank = agent, mode, bank
        self.bank_to_goal = None
        self.actor = agent.make_actor(goals)
        self.oracle = OraclePolicy(maze, goals)

    def act(self, observations):
        if self.mode == "search":
            return self.actor.act(observations)   # (last_subgoal is not recorded for the search)
        observation_tensor = self.actor.observation_tensor(observations)
        z, z_goal = self.actor.latent(observation_tensor), self.actor.z_goal
        with torch.no_grad():
            if self.mode == "proposer":
                z_next = self.agent.heads.proposer(z, z_goal)
            elif self.mode == "bank":
                z_next = self.bank_subgoal(z, z_goal)
            elif self.mode == "snapped":
                z_next = self.bank.latents[self.bank.nearest(self.agent.heads.proposer(z, z_goal))[0]]
            elif self.mode == "goal":
                z_next = z_goal
            else:
                z_next = self.agent.encoder.encode_goals(torch.as_tensor(self.oracle.subgoals(observations)))
            self.last_subgoal = z_next
            return self.agent.inverse_action(z, observation_tensor, z_next, z_goal).clamp(-1, 1).numpy()

    def bank_subgoal(self, z, z_goal):
        """Among the bank's states s that V deems reachable within k steps (V(z, E([s])) >= the return of
        reaching in k steps), the one with the largest V(E([s]), z_g); the most reachable one if none is."""
        latents, value = self.bank.latents, self.agent.heads.value
        n, m = len(z), len(latents)
        if self.bank_to_goal is None:            # V(E([s]), z_g): fixed for the episode
            self.bank_to_goal = value(latents.expand(n, -1, -1), z_goal.unsqueeze(1).expand(-1, m, -1))
        reach = value(z.unsqueeze(1).expand(-1, m, -1), latents.expand(n, -1, -1))
        reachable = reach >= return_of_reaching(self.agent.config.subgoal_steps, self.agent.config.discount)
        score = torch.where(reachable, self.bank_to_goal, torch.full_like(reach, -math.inf))
        score = torch.where(reachable.any(1, keepdim=True), score, reach)
        return latents[score.argmax(1)]

    def keep(self, rows):
        self.actor.keep(rows)
        self.oracle.keep(rows)
        if self.bank_to_goal is not None:
            self.bank_to_goal = self.bank_to_goal[torch.as_tensor(rows)]


def trace_episode(agent, dataset, task, seed, mode="oracle", bank=None, steps=400, every=40):
    """Position, the subgoal (a learnt z' is shown as the dataset state of the bank whose encoding is
    nearest to it), the action I gives for it and the oracle's direction, every `every` steps."""
    env = make_env(dataset)
    observation, info = env.reset(seed=seed, options=dict(task_id=task))
    actor = SubgoalOverride(agent, env.unwrapped, info["goal"][None], mode, bank)
    print(f"task {task}: goal {np.round(info['goal'][:2], 2)}, subgoals: {mode}")
    for t in range(steps):
        oracle = actor.oracle.subgoals(observation[None])[0]
        action = actor.act(observation[None])[0]
        if t % every == 0:
            shown = oracle if mode == "oracle" else bank.nearest_states(actor.last_subgoal)[0, :2]
            direction = (oracle - observation[:2]) / (np.linalg.norm(oracle - observation[:2]) + 1e-6)
            print(f"  t {t:3d}  position {np.round(observation[:2], 2)}  subgoal {np.round(shown, 2)}  "
                  f"action {np.round(action, 2)}  oracle direction {np.round(direction, 2)}")
        observation, _, _, _, info = env.step(action)
        if info.get("success"):
            print(f"  success at t {t}")
            return


class EncodedBank:
    """Random dataset states and their encodings E([s]): reads a latent back as its nearest dataset state."""

    def __init__(self, agent, dataset_file, size, seed):
        observations = np.load(dataset_file)["observations"]
        self.states = observations[np.random.default_rng(seed).choice(len(observations), size=size, replace=False)]
        with torch.no_grad():
            self.latents = agent.encoder.encode_goals(torch.as_tensor(self.states))

    def nearest(self, latents):
        """(indices into the bank, latent distance to them)."""
        gap, index = torch.cdist(latents, self.latents).min(1)
        return index, gap

    def nearest_states(self, latents):
        return self.states[self.nearest(latents)[0].numpy()]


def data_windows(data, length, count, rng, ahead=0):
    """`count` windows of `length` dataset steps with `ahead` more steps after them in the same trajectory:
    (windows (count, length, obs_dim), index of each window's last step)."""
    observations, ends = data["observations"], np.flatnonzero(data["terminals"])
    starts_of = np.r_[0, ends[:-1] + 1]
    room = ends - starts_of + 1 - length - ahead
    episodes = rng.choice(np.flatnonzero(room > 0), size=count)
    starts = starts_of[episodes] + rng.integers(0, room[episodes])
    return np.stack([observations[s:s + length] for s in starts]), starts + length - 1


def inverse_by_subgoal_distance(agent, dataset_file, windows=64, seed=0, distances=(1, 5, 10, 25, 50), goal_ahead=60):
    """On dataset windows: the inverse dynamics' action for the data's own state d steps ahead as z'.

    Prints, per d, the mean distance to that state, the mean action norm and the mean cosine between the
    action and the displacement: how far from the training distance k the inverse dynamics still steers.
    """
    data = np.load(dataset_file)
    observations, actions = data["observations"], data["actions"]
    window_obs, now = data_windows(data, agent.context_length, windows, np.random.default_rng(seed), goal_ahead)
    with torch.no_grad():
        z = agent.encoder(torch.as_tensor(window_obs))[:, -1]
        z_goal = agent.encoder.encode_goals(torch.as_tensor(observations[now + goal_ahead]))
        print(f"data actions: mean norm {np.linalg.norm(actions[now], axis=1).mean():.2f}; goal {goal_ahead} steps ahead")
        for d in distances:
            z_next = agent.encoder.encode_goals(torch.as_tensor(observations[now + d]))
            action = agent.inverse_action(z, torch.as_tensor(observations[now]), z_next, z_goal).numpy()
            offset = observations[now + d, :action.shape[1]] - observations[now, :action.shape[1]]
            norm = np.linalg.norm(action, axis=1)
            cosine = (action * offset).sum(1) / (norm * np.linalg.norm(offset, axis=1) + 1e-9)
            print(f"  d {d:3d}: distance {np.linalg.norm(offset, axis=1).mean():.2f}  action norm {norm.mean():.2f}  "
                  f"cos(action, displacement) {cosine.mean():+.2f}")


def average_ranks(values):
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    for value in np.unique(values):
        ranks[values == value] = ranks[values == value].mean()
    return ranks


def rank_correlation(a, b):
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def high_level_probe(agent, maze, dataset_file, bank, windows=256, seed=0):
    """The high level on dataset windows with random dataset goals, against the maze's shortest paths.

    value: rank correlation between V(z_t, z_g) and minus the shortest-path distance in maze cells (1 for a
    value that orders states as the maze does). subgoals: each of the proposal P(z, z_g) and the policy
    search's choice is read back as the dataset state whose encoding E([s]) is nearest (in the bank);
    printed are the cosine between its direction from the agent and the oracle's (the next cell on the
    shortest path), over all pairs and over detours (where the straight line to the goal is more than 60
    degrees off the shortest path), the same for the straight line as a reference, its distance, and how far
    the latent is from that nearest encoding (off the data's manifold if far more than for the data's own
    state k steps ahead, printed as a reference; that one follows the data's path, not the random goal).
    """
    data = np.load(dataset_file)
    observations, rng = data["observations"], np.random.default_rng(seed)
    k, ahead = agent.config.subgoal_steps, (1, 10, 25, 50, 100)
    window_obs, now = data_windows(data, agent.context_length, windows, rng, ahead=max(k, *ahead))
    positions, goals = observations[now, :2], observations[rng.integers(len(observations), size=windows)]

    def cells_and_oracle(start, goal):
        subgoal, bfs = maze.get_oracle_subgoal(start, goal[:2])
        return bfs[maze.xy_to_ij(start)], np.asarray(subgoal)

    cells, oracle = zip(*(cells_and_oracle(p, g) for p, g in zip(positions, goals)))
    cells, oracle_dir = np.asarray(cells, float), np.asarray(oracle) - positions
    moving = (cells > 0) & (np.linalg.norm(oracle_dir, axis=1) > 1e-6)   # goal in another cell

    def cosines_to_oracle(direction):
        return (direction * oracle_dir).sum(1) / (np.linalg.norm(direction, axis=1) * np.linalg.norm(oracle_dir, axis=1) + 1e-9)

    straight = cosines_to_oracle(goals[:, :2] - positions)
    detour = moving & (straight < 0.5)          # the straight line is more than 60 degrees off the shortest path

    def cosine_to_oracle(direction):
        cos = cosines_to_oracle(direction)
        return f"{cos[moving].mean():+.2f} (on detours {cos[detour].mean():+.2f})"

    with torch.no_grad():
        z = agent.encoder(torch.as_tensor(window_obs))[:, -1]
        z_goal = agent.encoder.encode_goals(torch.as_tensor(goals))
        value = agent.heads.value(z, z_goal).numpy()
        origin = agent.subgoal_origin(z, torch.as_tensor(observations[now]))
        subgoals = {"proposal": agent.heads.proposer(z, z_goal), "search": agent.search_subgoal(z, z_goal, origin),
                    f"data o_t+{k}": agent.encoder.encode_goals(torch.as_tensor(observations[now + k]))}
        value_ahead = [agent.heads.value(z, agent.encoder.encode_goals(torch.as_tensor(observations[now + d]))).median()
                       for d in ahead]
    print("value along the data's own path: median V(z_t, E([o_t+d])) against the return of reaching in d steps: "
          + ", ".join(f"d {d}: {float(v):.1f} / {return_of_reaching(d, agent.config.discount):.1f}"
                      for d, v in zip(ahead, value_ahead)))
    reachable = cells >= 0
    print(f"value: rank correlation of V with -(shortest path in cells) {rank_correlation(value[reachable], -cells[reachable]):+.2f} "
          f"({reachable.sum()} pairs, {len(np.unique(cells[reachable]))} distinct distances)")
    print(f"straight line to the goal: cos to the oracle's direction {cosine_to_oracle(goals[:, :2] - positions)}; "
          f"{moving.sum()} pairs with the goal in another cell, {detour.sum()} of them detours (straight line > 60 degrees off)")
    for name, latent in subgoals.items():
        nearest, gap = bank.nearest(latent)
        decoded = bank.states[nearest.numpy(), :2]
        step = np.linalg.norm(decoded - positions, axis=1)
        print(f"{name:>12}: nearest dataset state: cos to the oracle's direction {cosine_to_oracle(decoded - positions)}, "
              f"distance from the agent {step.mean():.2f} (median {np.median(step):.2f}); latent gap to it "
              f"{gap.median():.3f} (median)")


def on_policy_probe(agent, dataset, bank, resets=3, steps=300, every=20):
    """The proposal's direction at the states the greedy agent itself visits, with and without its history.

    Every `every` steps of `resets` greedy episodes per task (up to `steps` steps; an agent that is stuck
    contributes the same place many times): the cosine between the direction to the proposal (read back as
    its nearest bank state) and the oracle's, with z the agent's history latent and with z = E([o_t]).
    The same cosine with and without the history says the history is not what misleads the proposer.
    """
    env = make_env(dataset)
    maze = env.unwrapped

    def cosine(proposal, position, goal):
        direction = bank.nearest_states(proposal)[0, :2] - position
        oracle = np.asarray(maze.get_oracle_subgoal(position, goal[:2])[0]) - position
        return direction @ oracle / (np.linalg.norm(direction) * np.linalg.norm(oracle) + 1e-9)

    with_history, without = [], []
    for task in range(1, 6):
        for reset in range(resets):
            observation, info = env.reset(seed=reset, options=dict(task_id=task))
            goal = info["goal"]
            actor = agent.make_actor(goal[None].astype(np.float32))
            for t in range(steps):
                action = actor.act(observation[None])[0]
                if t % every == every // 2:
                    with torch.no_grad():
                        z_now = agent.encoder(actor.observation_tensor(observation[None])[:, None])[:, -1]
                        for latent, found in ((actor.last_latent, with_history), (z_now, without)):
                            found.append(cosine(agent.heads.proposer(latent, actor.z_goal), observation[:2], goal))
                observation, _, _, _, info = env.step(action)
                if info.get("success"):
                    break
    print(f"proposal on the agent's own rollouts ({len(with_history)} states, 5 tasks x {resets} episodes): cos to the "
          f"oracle's direction with the agent's history {np.mean(with_history):+.2f}, without it (z = E([o_t])) "
          f"{np.mean(without):+.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="a pointmaze dataset name")
    parser.add_argument("--modes", default="search,proposer,goal,oracle,oracle_policy")
    parser.add_argument("--eval_episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--bank", type=int, default=5000, help="dataset states encoded to read latents back as states ('snapped', --high_level, traces)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=int, default=None, metavar="TASK",
                        help="instead of evaluating, print one episode of this task (subgoals: --trace_mode)")
    parser.add_argument("--trace_mode", default="oracle", choices=["oracle", "proposer", "snapped", "bank", "goal"],
                        help="subgoals of the traced episode")
    parser.add_argument("--distances", action="store_true",
                        help="instead of evaluating, probe the inverse dynamics with subgoals d steps ahead in the data")
    parser.add_argument("--high_level", action="store_true",
                        help="instead of evaluating, probe the value and the subgoals against the maze's shortest paths")
    parser.add_argument("--on_policy", action="store_true",
                        help="instead of evaluating, probe the proposals at the states the greedy agent visits")
    parser.add_argument("--dataset_dir", default=GENERATED_DATASET_DIR,
                        help="where the dataset file is (for --distances and --high_level)")
    args = parser.parse_args()
    print(machine_line())
    checkpoint = load_checkpoint(args.checkpoint)
    agent = OfflineAgent.from_checkpoint(checkpoint)
    set_run_subgoal_data(agent, checkpoint.get("run_config", {}), args.dataset, args.dataset_dir)
    dataset_file = dataset_paths(args.dataset, args.dataset_dir)[0]
    needs_bank = args.high_level or args.on_policy or "snapped" in args.modes or "bank" in args.modes or (args.trace is not None and args.trace_mode != "oracle")
    bank = EncodedBank(agent, dataset_file, args.bank, args.seed) if needs_bank else None
    if args.trace is not None:
        return trace_episode(agent, args.dataset, args.trace, args.seed, args.trace_mode, bank)
    if args.on_policy:
        torch.manual_seed(args.seed)   # the noisy candidates of the search
        return on_policy_probe(agent, args.dataset, bank)
    if args.distances:
        return inverse_by_subgoal_distance(agent, dataset_file, seed=args.seed)
    maze = make_env(args.dataset).unwrapped
    if args.high_level:
        return high_level_probe(agent, maze, dataset_file, bank, seed=args.seed)

    class Agent:  # evaluate() asks its agent for an actor
        def __init__(self, mode):
            self.mode = mode

        def make_actor(self, goals, mode=None):
            if self.mode == "oracle_policy":
                return OraclePolicy(maze, goals)
            return SubgoalOverride(agent, maze, goals, self.mode, bank)

    for mode in args.modes.split(","):
        torch.manual_seed(args.seed)
        result = evaluate(Agent(mode), args.dataset, args.eval_episodes, seed=args.seed, progress=False)
        tasks = " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))
        print(f"{mode:>13}: success {result['success']:.2f}  (tasks {tasks})", flush=True)


if __name__ == "__main__":
    main()
