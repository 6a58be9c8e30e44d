"""Where does a checkpoint's policy fail: the subgoal choice (the high level) or the inverse dynamics (the low)?

Evaluates one checkpoint (OGBench protocol, all episodes side by side) with the subgoal z' chosen by:
  default        the checkpoint's own acting rule (its subgoal_source)
  proposer       the proposer alone, z' = P(z, z_g)
  goal           the goal itself, z' = z_g
  oracle         the maze's oracle subgoal: the observation with its x-y moved to the centre of the next cell on the
                 shortest path, encoded as z' = E([s']); the inverse dynamics' success under a perfect high level
  oracle_policy  no learning: the dataset recipe's own policy (pointmaze: the unit step to the oracle's subgoal;
                 antmaze: the directional expert steered by it), the ceiling the data sets
Works on every OGBench maze (x-y are the first two observation numbers in each).

    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --dataset pointmaze-medium-navigate-v0
    python benchmarks/diagnose_acting.py CKPT --dataset antmaze-medium-navigate-v0 --modes default,oracle --eval_episodes 20
"""
import argparse

import numpy as np
import torch

from common import machine_line
from offline_agent import Actor, OfflineAgent
from offline_trainer import set_run_subgoal_data
from ogbench_utils import OracleSubgoals, data_policy, evaluate, make_env
from utils import load_checkpoint

MODES = ("default", "proposer", "goal", "oracle", "oracle_policy")


class SubgoalOverride(Actor):
    """The agent's greedy actor with its subgoal replaced by one of the modes above."""

    def __init__(self, agent, goals, mode, maze):
        super().__init__(agent, goals)
        self.mode, self.oracle, self.goal_xys = mode, OracleSubgoals(maze), np.asarray(goals)[:, :2]

    def subgoal(self, z, observations):
        if self.mode == "proposer":
            return self.agent.heads.proposer(z, self.z_goal)
        if self.mode == "goal":
            return self.z_goal
        moved = observations.cpu().numpy().copy()
        moved[:, :2] = [self.oracle.subgoal_xy(o[:2], g) for o, g in zip(moved, self.goal_xys)]
        return self.agent.encoder.encode_goals(torch.as_tensor(moved, device=self.agent.device))

    def keep(self, rows):
        super().keep(rows)
        self.goal_xys = self.goal_xys[np.asarray(rows)]


class OverridePolicy:
    def __init__(self, agent, mode, maze):
        self.agent, self.mode, self.maze = agent, mode, maze

    def make_actor(self, goals):
        return SubgoalOverride(self.agent, goals, self.mode, self.maze)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an OPSO checkpoint")
    parser.add_argument("--dataset", required=True, help="the dataset whose environment (and data, for 'default' "
                                                         "acting with the data's states) to use")
    parser.add_argument("--dataset_dir", default=None, help="its folder (default: the training run's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--eval_episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed")
    parser.add_argument("--max_episode_steps", type=int, default=None, help="episode limit (default: the env's)")
    args = parser.parse_args()
    print(machine_line())
    checkpoint = load_checkpoint(args.checkpoint)
    env = make_env(args.dataset)
    maze = env.unwrapped
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "oracle_policy":
            policy = data_policy(args.dataset, maze)
        elif mode == "default":
            policy = OfflineAgent.from_checkpoint(checkpoint)
            set_run_subgoal_data(policy, checkpoint.get("run_config", {}), args.dataset, args.dataset_dir)
        else:
            policy = OverridePolicy(OfflineAgent.from_checkpoint(checkpoint, subgoal_source="proposer"), mode, maze)
        result = evaluate(policy, args.dataset, args.eval_episodes, seed=args.seed, progress=False,
                          max_episode_steps=args.max_episode_steps)
        tasks = " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))
        print(f"{mode:>14}: success {result['success']:.3f} (tasks {tasks}), mean episode length "
              f"{result['episode_length']:.0f}", flush=True)
    env.close()


if __name__ == "__main__":
    main()
