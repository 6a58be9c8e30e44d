"""An experiment, not a default: acting with the data's subgoals (`--subgoal_source data` or `switch`) where the
dataset states nearest to the agent are found by x-y position alone instead of the whole normalised observation.

On the ant, 27 of the 29 observation numbers are joints and velocities, so the nearest states in normalised
observation space may lie anywhere in the maze; on pointmaze the two metrics are one. Evaluates a checkpoint
(5 tasks x N episodes) with that one change, so the result sits beside `offline_trainer.py evaluate`'s.

    python benchmarks/experiments/data_by_position.py CKPT --dataset antmaze-medium-stitch-v0 --seed 0 \
        --subgoal_source data
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import offline_agent  # noqa: E402
from offline_agent import CHECKPOINT_KEYS, OfflineAgent  # noqa: E402
from offline_trainer import set_run_subgoal_data  # noqa: E402
from ogbench_utils import evaluate  # noqa: E402
from utils import load_checkpoint, set_seed  # noqa: E402


def nearest_by_position(self, observations):
    """(N, neighbors): the kept states nearest to each observation by x-y (the first two numbers)."""
    xy = self.encoder.normalize(observations)[:, :2]
    distances = torch.cdist(xy, self.states[:, :2])
    return distances.topk(self.neighbors, dim=1, largest=False).indices


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset_dir", default="datasets/generated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_episodes", type=int, default=20)
    parser.add_argument("--subgoal_source", choices=["data", "switch"], default="data")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint, required=CHECKPOINT_KEYS)
    agent = OfflineAgent.from_checkpoint(checkpoint, subgoal_source=args.subgoal_source)
    set_run_subgoal_data(agent, checkpoint.get("run_config", {}), args.dataset, args.dataset_dir)
    offline_agent.SubgoalTable.nearest = nearest_by_position
    set_seed(args.seed)
    result = evaluate(agent, args.dataset, args.eval_episodes, seed=args.seed, progress=False)
    result.update(checkpoint=args.checkpoint, subgoal_source=args.subgoal_source, neighbours="x-y")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
