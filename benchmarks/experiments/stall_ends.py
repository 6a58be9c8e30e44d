"""Where a checkpoint's low level stalls under the oracle's subgoals, and which way it pushes there.

Runs one task's episodes with the maze's oracle subgoals (`diagnose_acting.py`'s `oracle` mode) on E([o_t]) alone
(`--history none`), then at each failed episode's last position prints the action I(E([o]), E([s'])) beside the unit
direction to the oracle's subgoal s': a cosine near or below 0 means the low level pushes into a wall and stays.
    python benchmarks/experiments/stall_ends.py runs/bench/pointmaze-medium-stitch-v0-seed19/last_model.pth \\
        --dataset pointmaze-medium-stitch-v0 --task 2 --seed 19
"""
import argparse
import os
import sys
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diagnose_acting import OverridePolicy, PathRecorder, WithoutHistory   # noqa: E402
from offline_agent import OfflineAgent   # noqa: E402
from ogbench_utils import OracleSubgoals, evaluate, make_env   # noqa: E402
from utils import load_checkpoint   # noqa: E402


def encode(agent, xy):
    return agent.encoder.encode_goals(torch.as_tensor(np.asarray(xy, np.float32)[None]))


@torch.no_grad()
def stall_line(agent, oracle, maze, path, goal):
    end = path[-1]
    subgoal = oracle.subgoal_xy(end, goal)
    action = agent.action(encode(agent, end), encode(agent, subgoal), encode(agent, goal))[0].numpy()
    direction = (subgoal - end) / (np.linalg.norm(subgoal - end) + 1e-6)
    cosine = float(action @ direction / (np.linalg.norm(action) + 1e-9))
    moved = np.linalg.norm(path[-1] - path[-50]) if len(path) > 50 else float("nan")
    return (f"end {np.round(end, 1)} cell {maze.xy_to_ij(end)}, moved {moved:.2f} in its last 50 steps; oracle "
            f"subgoal {np.round(subgoal, 1)}, direction {np.round(direction, 2)}; action {np.round(action, 2)} "
            f"(|a| {np.linalg.norm(action):.2f}, cosine {cosine:+.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--task", type=int, required=True, help="evaluation task, 1-5")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed")
    args = parser.parse_args()
    env = make_env(args.dataset)
    maze = env.unwrapped
    agent = OfflineAgent.from_checkpoint(load_checkpoint(args.checkpoint), subgoal_source="proposer")
    policy = PathRecorder(WithoutHistory(OverridePolicy(agent, "oracle", maze), agent))
    result = evaluate(policy, args.dataset, args.episodes, seed=args.seed, progress=False, tasks=[args.task])
    print(f"task {args.task}, oracle subgoals, no history: success {result['success']:.2f}")
    oracle, goal = OracleSubgoals(maze), policy.goals[0]
    stalls = Counter(stall_line(agent, oracle, maze, np.asarray(path), goal)
                     for path in policy.paths if len(path) == env.spec.max_episode_steps)
    for line, count in stalls.most_common():
        print(f"{count} x {line}")
    env.close()


if __name__ == "__main__":
    main()
