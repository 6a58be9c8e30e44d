"""Does a checkpoint's value know the maze? V(E([s]), E([g])) against the shortest-path distance from s to g.

Draws pairs of dataset states (s, g) and compares V on their single-observation encodings (what the `data` rule
ranks subgoals by) with the maze distance in cells (BFS over the free cells, x-y being the first two observation
numbers in every OGBench maze). Pairs are split into
  same trajectory  g lies ahead of s on the trajectory s belongs to: a value of the data's own paths suffices
  stitched         g lies on another trajectory: V must join trajectories to rank these (stitch data)
and for each group the rank correlation (Spearman) of V with minus the distance is printed, with the mean V per
distance, so a value that saturates or ranks only its own trajectories shows.

    python benchmarks/diagnose_value.py runs/bench/pointmaze-medium-stitch-v0-seed0/last_model.pth \
        --dataset pointmaze-medium-stitch-v0
"""
import argparse
import numpy as np
import torch

from common import machine_line
from offline_agent import OfflineAgent
from ogbench_utils import DEFAULT_DATASET_DIR, cell_distances, load_datasets, make_env
from utils import load_checkpoint


def all_cell_distances(maze_map):
    """{start cell: {cell: BFS distance}} over every free cell."""
    return {start: cell_distances(maze_map, start)
            for start in ((int(i), int(j)) for i, j in zip(*np.nonzero(maze_map == 0)))}


def spearman(x, y):
    rank = lambda v: np.argsort(np.argsort(v)).astype(np.float64)
    return float(np.corrcoef(rank(x), rank(y))[0, 1]) if len(x) > 2 else float("nan")


def draw_pairs(data, num_pairs, rng):
    """Half same-trajectory pairs (g uniformly ahead of s), half uniform pairs (mostly other trajectories)."""
    s = rng.integers(len(data), size=num_pairs)
    ends = data.traj_ends[s]
    ahead = np.minimum(s + 1 + (rng.random(num_pairs) * (ends - s)).astype(np.int64), ends)
    g = np.where(np.arange(num_pairs) < num_pairs // 2, ahead, rng.integers(len(data), size=num_pairs))
    same = (data.traj_ends[g] == ends) & (g >= s)
    return s, g, same


@torch.no_grad()
def values(agent, observations, goals, chunk=4096):
    out = []
    for start in range(0, len(observations), chunk):
        z = agent.encoder.encode_goals(torch.as_tensor(observations[start:start + chunk]))
        z_goal = agent.encoder.encode_goals(torch.as_tensor(goals[start:start + chunk]))
        out.append(agent.heads.value(z, z_goal).numpy())
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an OPSO checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset_dir", default=None, help="its folder (default: the training run's)")
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine_line())
    checkpoint = load_checkpoint(args.checkpoint)
    agent = OfflineAgent.from_checkpoint(checkpoint)
    dataset_dir = args.dataset_dir or checkpoint.get("run_config", {}).get("dataset_dir", DEFAULT_DATASET_DIR)
    data, _ = load_datasets(args.dataset, dataset_dir)
    maze = make_env(args.dataset).unwrapped
    table = all_cell_distances(maze.maze_map)
    s, g, same = draw_pairs(data, args.pairs, np.random.default_rng(args.seed))
    obs = data.observations
    cell = lambda xy: tuple(int(c) for c in maze.xy_to_ij(xy))
    distance = np.array([table[cell(obs[a, :2])][cell(obs[b, :2])] for a, b in zip(s, g)])
    v = values(agent, obs[s], obs[g])
    print(f"{args.checkpoint} (step {checkpoint['step']}), {args.dataset}: {args.pairs} pairs")
    for name, rows in (("same trajectory", same), ("stitched", ~same), ("all", np.ones_like(same))):
        print(f"{name:>16}: {rows.sum():6d} pairs, Spearman(V, -distance) {spearman(v[rows], -distance[rows]):+.3f}")
    print("cells  mean V (same trajectory)  mean V (stitched)  stitched pairs")
    for d in range(distance.max() + 1):
        at = distance == d
        if at.any():
            mean = lambda rows: f"{v[rows].mean():8.1f}" if rows.any() else "       -"
            print(f"{d:5d}  {mean(at & same):>24}  {mean(at & ~same):>17}  {int((at & ~same).sum()):14d}")


if __name__ == "__main__":
    main()
