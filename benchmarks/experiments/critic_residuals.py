"""Where the critic misses: Q1(z, z', z_g) minus its target on one batch of windows, split by kind of row.

    python benchmarks/experiments/critic_residuals.py runs/exp/RUN/last_model.pth --dataset pointmaze-medium-stitch-v0
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from offline_agent import OfflineAgent, positions_with_a_subgoal, rows_with_a_subgoal  # noqa: E402
from ogbench_utils import DEFAULT_DATASET_DIR, WindowSampler, load_datasets  # noqa: E402
from utils import load_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset_dir", default=None, help="default: the training run's")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    agent = OfflineAgent.from_checkpoint(checkpoint)
    data, _ = load_datasets(args.dataset, args.dataset_dir or checkpoint.get("run_config", {}).get(
        "dataset_dir", DEFAULT_DATASET_DIR))
    batch = WindowSampler(data, **agent.config.sampler_settings(), seed=args.seed).sample(args.windows)
    rows, _ = rows_with_a_subgoal(batch)
    with torch.no_grad():
        lat = agent.encode_windows(batch).at_rows(*positions_with_a_subgoal(batch))
        loss, info = agent.critic_loss(lat, rows)
        next_v = agent.targets["value"](lat.z_subgoal, lat.z_value_goal)
        target = rows["kstep_returns"] + rows["kstep_discounts"] * rows["kstep_masks"] * next_v
        q1, _ = agent.heads.q_values(lat.z, lat.z_subgoal, lat.z_value_goal)
    every = torch.ones_like(target, dtype=torch.bool)
    current = (rows["value_goals"] == rows["observations"]).all(-1)
    reached = rows["kstep_masks"] == 0
    error = q1 - target
    print(f"{args.checkpoint} (step {checkpoint['step']}), {args.dataset}: {args.windows} windows, "
          f"critic loss (both Q's) {float(loss):.1f}")
    for name, mask in (("all", every), ("goal = current state", current),
                       ("other goals", ~current), ("goal reached within k", reached),
                       ("bootstrapped", ~reached)):
        e = error[mask]
        print(f"{name:>22}: {int(mask.sum()):5d} rows, MSE {float(e.square().mean()):7.1f}, mean error "
              f"{float(e.mean()):+6.2f}, mean target {float(target[mask].mean()):6.1f}, mean Q {float(q1[mask].mean()):6.1f}")


if __name__ == "__main__":
    main()
