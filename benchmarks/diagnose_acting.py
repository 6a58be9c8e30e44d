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
"""
import argparse

import numpy as np
import torch

from common import machine_line
from offline_agent import OfflineAgent
from ogbench_utils import evaluate, make_env
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="a pointmaze dataset name")
    parser.add_argument("--modes", default="search,proposer,goal,oracle,oracle_policy")
    parser.add_argument("--eval_episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=int, default=None, metavar="TASK",
                        help="instead of evaluating, print one episode of this task with oracle subgoals")
    args = parser.parse_args()
    print(machine_line())
    agent = OfflineAgent.from_checkpoint(load_checkpoint(args.checkpoint))
    if args.trace is not None:
        return trace_episode(agent, args.dataset, args.trace, args.seed)
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
