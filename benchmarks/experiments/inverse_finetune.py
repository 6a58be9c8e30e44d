"""Does more training of the low level on single transitions fix its failures at walls? (issue 24)

Loads a checkpoint, measures the inverse dynamics' action error I(E([o_t]), E([o_{t+d}])) -> a_t (d uniform in
1..k) on the training data's transitions, split into those where the point touches a wall and the rest, then trains
the inverse head alone for --steps steps of --batch independent transitions on the frozen encoder (the loss of
`--inverse_transitions`, `OfflineAgent.transition_inverse_loss`) and measures again. With --out it saves the
checkpoint with the new inverse head, to act with (`diagnose_acting.py`, `offline_trainer.py evaluate`). Pointmaze
only (the wall test reads x-y as the point's). The readings in BENCHMARKS.md ran an earlier version that drew its
transitions with its own sampler (the same distribution, other draws; commit 1f17f54).

    python benchmarks/experiments/inverse_finetune.py runs/bench/pointmaze-medium-stitch-v0-seed19/last_model.pth \\
        --dataset pointmaze-medium-stitch-v0 --steps 2000 --out runs/exp/inverse_ft19.pth
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from offline_agent import OfflineAgent   # noqa: E402
from ogbench_utils import WindowSampler, load_datasets, make_env   # noqa: E402
from utils import load_checkpoint, save_checkpoint, set_seed   # noqa: E402

CONTACT = 1.2   # |offset from the cell centre| beyond which the point (radius ~0.7, cell half-width 2) touches


def touches_wall(maze, xy):
    """Whether the point at xy is within reach of a wall cell beside its own cell, in x or y."""
    i, j = maze.xy_to_ij(xy)
    cx, cy = maze.ij_to_xy((i, j))
    dx, dy = xy[0] - cx, xy[1] - cy
    walls = maze.maze_map
    return bool((abs(dx) > CONTACT and walls[i, j + int(np.sign(dx))] == 1)
                or (abs(dy) > CONTACT and walls[i + int(np.sign(dy)), j] == 1))


def encode(agent, batch):
    """E([o_t]) and E([o_{t+d}]) of a batch of transitions, held."""
    with torch.no_grad():
        return agent.encoder.encode_goals(torch.stack([batch["observations"], batch["inverse_observations"]]))


def report(label, agent, probe, contact):
    """I's action error on the probe's transitions at wall contact and elsewhere."""
    z, z_subgoal = encode(agent, probe)
    with torch.no_grad():
        errors = [agent.transition_inverse_loss(z[rows], z_subgoal[rows], probe["actions"][rows]).item()
                  for rows in (contact, ~contact)]
    print(f"{label}: action error (sum of squares) at wall contact {errors[0]:.3f} ({int(contact.sum())} rows), "
          f"elsewhere {errors[1]:.3f} ({int((~contact).sum())} rows)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset_dir", default="datasets/generated")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the checkpoint with the trained inverse head here")
    args = parser.parse_args()
    set_seed(args.seed)
    checkpoint = load_checkpoint(args.checkpoint)
    agent = OfflineAgent.from_checkpoint(checkpoint)
    if agent.config.inverse_goal != "subgoal":
        raise SystemExit("this experiment trains I(z, z', z'): the checkpoint's inverse_goal must be 'subgoal'")
    data, _ = load_datasets(args.dataset, args.dataset_dir)
    maze = make_env(args.dataset).unwrapped
    sampler = WindowSampler(data, **agent.config.sampler_settings(), seed=args.seed)
    k = agent.config.subgoal_steps
    probe = sampler.sample_transitions(16384, k)
    contact = torch.tensor([touches_wall(maze, xy) for xy in probe["observations"][:, :2].numpy()])
    pushes = probe["actions"][contact].square().sum(-1).mean()
    print(f"{args.checkpoint}: {contact.float().mean():.3f} of the data's steps touch a wall (mean |a|^2 there "
          f"{pushes:.2f})")
    report("before", agent, probe, contact)
    optimizer = torch.optim.Adam(agent.heads.inverse.parameters(), lr=args.lr)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = sampler.sample_transitions(args.batch, k)
        loss = agent.transition_inverse_loss(*encode(agent, batch), batch["actions"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 4) == 0:
            report(f"after {step} steps ({time.time() - start:.0f} s)", agent, probe, contact)
    if args.out:
        checkpoint["heads"] = agent.heads.state_dict()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_checkpoint(checkpoint, args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
