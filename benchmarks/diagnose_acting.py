"""Where does a checkpoint's policy fail: the subgoal choice or the inverse dynamics?

Evaluates one checkpoint (OGBench protocol, all episodes side by side) with the subgoal z' chosen by:
  search    the agent's policy search (argmax Q over its candidates)
  proposer  the proposer alone, z' = P(z, z_g)
  goal      the goal itself, z' = z_g
  oracle    the maze's oracle subgoal (the next cell on the shortest path), encoded as z' = E([s'])
and, as a ceiling for this environment, the oracle policy itself (unit step towards the oracle subgoal,
no learning). Pointmaze only (the oracle needs the maze's map).

    python benchmarks/diagnose_acting.py runs/offline/last_model.pth [--modes search,proposer,goal,oracle,oracle_policy]
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --trace 4     # one episode of task 4, oracle subgoals
    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --distances   # I(z, E([o_{t+d}]), z_g) on the data
"""
import argparse

import numpy as np
import torch

from common import machine_line
from offline_agent import OfflineAgent
from ogbench_utils import GENERATED_DATASET_DIR, dataset_paths, evaluate, make_env
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

    def __init__(self, agent, maze, goals, mode):
        self.agent, self.mode = agent, mode
        self.actor = agent.make_actor(goals)
        self.oracle = OraclePolicy(maze, goals)

    def act(self, observations):
        if self.mode == "search":
            return self.actor.act(observations)
        z, z_goal = self.actor.latent(observations), self.actor.z_goal
        with torch.no_grad():
            if self.mode == "proposer":
                z_next = self.agent.heads.proposer(z, z_goal)
            elif self.mode == "goal":
                z_next = z_goal
            else:
                z_next = self.agent.encoder.encode_goals(torch.as_tensor(self.oracle.subgoals(observations)))
            observations = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
            return self.agent.inverse_action(z, observations, z_next, z_goal).clamp(-1, 1).numpy()

    def keep(self, rows):
        self.actor.keep(rows)
        self.oracle.keep(rows)


def trace_episode(agent, dataset, task, seed, steps=400, every=40):
    """Position, oracle subgoal, the action I gives for it and the oracle's direction, every `every` steps."""
    env = make_env(dataset)
    observation, info = env.reset(seed=seed, options=dict(task_id=task))
    actor = SubgoalOverride(agent, env.unwrapped, info["goal"][None], "oracle")
    print(f"task {task}: goal {np.round(info['goal'][:2], 2)}")
    for t in range(steps):
        subgoal = actor.oracle.subgoals(observation[None])[0]
        action = actor.act(observation[None])[0]
        if t % every == 0:
            direction = (subgoal - observation[:2]) / (np.linalg.norm(subgoal - observation[:2]) + 1e-6)
            print(f"  t {t:3d}  position {np.round(observation[:2], 2)}  subgoal {np.round(subgoal, 2)}  "
                  f"action {np.round(action, 2)}  oracle direction {np.round(direction, 2)}")
        observation, _, _, _, info = env.step(action)
        if info.get("success"):
            print(f"  success at t {t}")
            return


def inverse_by_subgoal_distance(agent, dataset_file, windows=64, seed=0, distances=(1, 5, 10, 25, 50), goal_ahead=60):
    """On dataset windows: the inverse dynamics' action for the data's own state d steps ahead as z'.

    Prints, per d, the mean distance to that state, the mean action norm and the mean cosine between the
    action and the displacement: how far from the training distance k the inverse dynamics still steers.
    """
    data = np.load(dataset_file)
    observations, actions = data["observations"], data["actions"]
    ends = np.flatnonzero(data["terminals"])
    length, rng = agent.context_length, np.random.default_rng(seed)
    starts_of = np.r_[0, ends[:-1] + 1]
    room = ends - starts_of + 1 - length - goal_ahead
    episodes = rng.choice(np.flatnonzero(room > 0), size=windows)
    starts = starts_of[episodes] + rng.integers(0, room[episodes])
    now = starts + length - 1
    with torch.no_grad():
        z = agent.encoder(torch.as_tensor(np.stack([observations[s:s + length] for s in starts])))[:, -1]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="a pointmaze dataset name")
    parser.add_argument("--modes", default="search,proposer,goal,oracle,oracle_policy")
    parser.add_argument("--eval_episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=int, default=None, metavar="TASK",
                        help="instead of evaluating, print one episode of this task with oracle subgoals")
    parser.add_argument("--distances", action="store_true",
                        help="instead of evaluating, probe the inverse dynamics with subgoals d steps ahead in the data")
    parser.add_argument("--dataset_dir", default=GENERATED_DATASET_DIR, help="where the dataset file is (for --distances)")
    args = parser.parse_args()
    print(machine_line())
    agent = OfflineAgent.from_checkpoint(load_checkpoint(args.checkpoint))
    if args.trace is not None:
        return trace_episode(agent, args.dataset, args.trace, args.seed)
    if args.distances:
        return inverse_by_subgoal_distance(agent, dataset_paths(args.dataset, args.dataset_dir)[0], seed=args.seed)
    maze = make_env(args.dataset).unwrapped

    class Agent:  # evaluate() asks its agent for an actor
        def __init__(self, mode):
            self.mode = mode

        def make_actor(self, goals, mode=None):
            if self.mode == "oracle_policy":
                return OraclePolicy(maze, goals)
            return SubgoalOverride(agent, maze, goals, self.mode)

    for mode in args.modes.split(","):
        torch.manual_seed(args.seed)
        result = evaluate(Agent(mode), args.dataset, args.eval_episodes, seed=args.seed, progress=False)
        tasks = " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))
        print(f"{mode:>13}: success {result['success']:.2f}  (tasks {tasks})", flush=True)


if __name__ == "__main__":
    main()
