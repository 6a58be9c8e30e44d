"""Acting cost per step against the context length: recomputing the encoder over the last L observations
(window) vs the recurrent step mode with restarted streams (recurrent), for a batch of environments (the
policy search's acting); then, with --checkpoint, the data's subgoals (subgoal_source='data') of a trained agent
over its dataset's kept states, with 100 of the dataset's own trajectories as the agents' paths: ms per step of
the subgoal choice (nearest-neighbour search, E([o_j]) and V for the states first met) for each cell side of the
search (`NearestByPosition.CELL_OF_RADIUS`).

    python benchmarks/bench_acting.py [--envs 100 --lengths 25 50 100 200 --steps 30]
    python benchmarks/bench_acting.py --lengths \
        --checkpoint runs/bench/pointmaze-medium-navigate-v0-seed12/last_model.pth --dataset pointmaze-medium-navigate-v0 --dataset_dir datasets/generated --cell_fractions 0.25 0.5 1.0
    python benchmarks/bench_acting.py --lengths --threads 1 --online_run runs/online
"""
import argparse
import os
import time

import numpy as np
import torch

from common import machine_line, median_seconds
from offline_agent import CHECKPOINT_KEYS, AgentConfig, NearestByPosition, OfflineAgent, SubgoalTable
from ogbench_utils import load_datasets
from utils import load_checkpoint


def per_step_ms(agent, mode, envs, steps, rng):
    goals = rng.normal(size=(envs, 2)).astype(np.float32)
    observations = rng.normal(size=(steps * 3, envs, 2)).astype(np.float32)
    actor = agent.make_actor(goals, context=mode)
    for t in range(agent.context_length):  # fill the context first: the steady state is what we time
        actor.act(observations[t % len(observations)])
    counter = iter(range(10**9))
    return 1000 * median_seconds(lambda: actor.act(observations[next(counter) % len(observations)]), steps, warmup=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=100, help="environments acting side by side")
    parser.add_argument("--lengths", type=int, nargs="*", default=[25, 50, 100, 200], help="context lengths")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting (median reported)")
    parser.add_argument("--checkpoint", help="data subgoals: a trained agent's checkpoint")
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="data subgoals: its dataset")
    parser.add_argument("--dataset_dir", default="datasets/generated", help="data subgoals: where the dataset is")
    parser.add_argument("--path_steps", type=int, default=1000, help="data subgoals: steps of each path")
    parser.add_argument("--cell_fractions", type=float, nargs="+", default=[NearestByPosition.CELL_OF_RADIUS],
                        help="data subgoals: cell sides to time, over the median r_k")
    parser.add_argument("--online_run", help="an online run's folder: its episodes' position lookups, a new index "
                                             "per episode against one")
    parser.add_argument("--repeats", type=int, default=2, help="--online_run: alternating repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(machine_line())
    print(f"{args.envs} environments; ms per acting step (encoder + subgoal + inverse dynamics)")
    if args.lengths:
        print(f"policy search: {'context':>8}{'window ms':>12}{'recurrent ms':>14}{'ratio':>8}")
    for length in args.lengths:
        agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, context_length=length, subgoal_source="proposer",
                                         mamba_backend="torch"))
        window = per_step_ms(agent, "window", args.envs, args.steps, rng)
        recurrent = per_step_ms(agent, "recurrent", args.envs, args.steps, rng)
        print(f"{'':>15}{length:>8}{window:>12.1f}{recurrent:>14.1f}{window / recurrent:>8.1f}")
    if args.checkpoint:
        data_subgoal_costs(args)
    if args.online_run:
        index_per_episode_costs(args)


def data_subgoal_costs(args):
    agent = OfflineAgent.from_checkpoint(load_checkpoint(args.checkpoint, required=CHECKPOINT_KEYS))
    data, _ = load_datasets(args.dataset, args.dataset_dir, None)
    agent.set_subgoal_data(data)
    rng = np.random.default_rng(0)
    starts = rng.choice(np.concatenate([[0], np.unique(data.traj_ends)[:-1] + 1]), args.envs, replace=False)
    steps = np.arange(args.path_steps)
    paths = np.stack([data.observations[np.minimum(s + steps, data.traj_ends[s])] for s in starts], 1)
    goals = torch.as_tensor(data.observations[rng.choice(len(data), args.envs)])
    print(f"data subgoals of {args.checkpoint}: {len(agent.subgoal_data)} kept states, "
          f"{agent.config.data_neighbors} neighbours, {args.envs} dataset trajectories x {args.path_steps} steps")
    for fraction in args.cell_fractions:
        NearestByPosition.CELL_OF_RADIUS = fraction
        agent.subgoal_index = None   # the agent keeps its index: a new cell side needs a new one
        with torch.no_grad():
            table = SubgoalTable(agent, agent.encoder.encode_goals(goals))
            start = time.perf_counter()
            for observations in torch.as_tensor(paths):
                table.subgoals(observations)
        step_ms = 1000 * (time.perf_counter() - start) / args.path_steps
        print(f"cell side {fraction} x median r_k: {step_ms:.1f} ms per step, {len(table.nearest.discs)} cells, "
              f"(state, goal) pairs valued {table.valued.float().mean():.2f}")


def index_per_episode_costs(args):
    """The position lookups of an online run's episodes, one step at a time: a new index for every episode (as
    every explorer built its own before 2d7a557) against the agent's one index."""
    checkpoint = load_checkpoint(os.path.join(args.online_run, "last_online_model.pth"), required=CHECKPOINT_KEYS)
    agent = OfflineAgent.from_checkpoint(checkpoint)
    data, _ = load_datasets(checkpoint["run_config"]["dataset"], args.dataset_dir, None)
    agent.set_subgoal_data(data)
    positions = agent.encoder.normalize(agent.subgoal_data.states)[:, :2]
    buffer = checkpoint["online_buffer"]
    ends = buffer["traj_ends"].numpy()
    episodes = [agent.encoder.normalize(buffer["observations"][s:ends[s] + 1])[:, :2]
                for s in np.r_[0, np.flatnonzero(np.diff(ends)) + 1]]

    def lookups(new_index_per_episode):
        start, index = time.perf_counter(), None
        for episode in episodes:
            if index is None or new_index_per_episode:
                index = NearestByPosition(positions, min(agent.config.data_neighbors, len(positions)))
            for position in episode:
                index(position[None])
        return time.perf_counter() - start
    print(f"position lookups of {len(episodes)} online episodes ({sum(map(len, episodes))} steps) of {args.online_run}")
    for _ in range(args.repeats):
        print(f"a new index per episode {lookups(True):.1f} s, one index {lookups(False):.1f} s")


if __name__ == "__main__":
    main()
