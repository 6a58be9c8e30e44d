"""How strong are the actions an online run executes, against the offline data's? Mean |a| and the share of action
numbers at the bounds (|a| > 0.95), for the dataset and for each online run's replay buffer in blocks of episodes.

The inverse dynamics regresses actions (mean squared error), so it predicts the mean action of the data near a
(state, subgoal) pair; online windows then teach it the agent's own executed actions. Where the agent's actions
are weaker than the data's, that self-imitation was the suspect of the ant's online losses (issue 25); it was
cleared: without it (the retired `--online_inverse 0`) the low level fell as far (BENCHMARKS.md).

    python benchmarks/action_magnitudes.py runs/bench/online-antmaze-medium-navigate-v0-seed9 \
        runs/bench/online-antmaze-medium-navigate-v0-control-seed9 --dataset antmaze-medium-navigate-v0
"""
import argparse
import os

import numpy as np

from common import machine_line  # noqa: F401  (puts the repository on the path)
from ogbench_utils import load_datasets
from utils import load_checkpoint

BOUND = 0.95


def describe(actions):
    return f"mean |a| {np.abs(actions).mean():.3f}, share of numbers with |a| > {BOUND}: {(np.abs(actions) > BOUND).mean():.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="online run folders (their last_online_model.pth)")
    parser.add_argument("--dataset", required=True, help="the offline dataset the runs started from")
    parser.add_argument("--dataset_dir", default="datasets/generated")
    parser.add_argument("--block", type=int, default=100, help="episodes per block")
    args = parser.parse_args()
    data, _ = load_datasets(args.dataset, args.dataset_dir, None)
    print(f"{args.dataset} (offline): {describe(data.actions)}")
    for run in args.runs:
        buffer = load_checkpoint(os.path.join(run, "last_online_model.pth"), required=("online_buffer",))["online_buffer"]
        actions, ends = buffer["actions"].numpy(), buffer["traj_ends"].numpy()
        episode = np.searchsorted(np.unique(ends), np.arange(len(ends)))   # each row's episode, from 0
        executed = np.arange(len(ends)) != ends        # an episode's last row holds a padding action
        print(run)
        for first in range(0, episode.max() + 1, args.block):
            rows = executed & (episode >= first) & (episode < first + args.block)
            print(f"  episodes {first + 1}-{min(first + args.block, episode.max() + 1)}: {describe(actions[rows])}")


if __name__ == "__main__":
    main()
