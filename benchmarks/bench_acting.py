"""Acting cost per step against the context length: recomputing the encoder over the last L observations
(window) vs the recurrent step mode with restarted streams (recurrent), for a batch of environments (the
policy search's acting); then, with --bank_sizes, the data's subgoals (subgoal_source='data') over banks
of M kept states: the table built when the episodes start (V for every state and goal) and the cost of a
recurrent step (nearest-neighbour search included) with `--neighbors` candidates.

    python benchmarks/bench_acting.py [--envs 100 --lengths 25 50 100 200 --steps 30]
    python benchmarks/bench_acting.py --lengths --bank_sizes 50000 200000 --neighbors 4096
"""
import argparse
import time

import numpy as np
import torch

from common import machine_line, median_seconds
from offline_agent import AgentConfig, DataSubgoals, OfflineAgent


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
    parser.add_argument("--bank_sizes", type=int, nargs="*", default=[], help="data subgoals: kept states M")
    parser.add_argument("--neighbors", type=int, default=AgentConfig.data_neighbors, help="data subgoals: candidates")
    args = parser.parse_args()
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
    if args.bank_sizes:
        print(f"data subgoals, {args.neighbors} neighbours, context 100: table (s) when the episodes start, ms per step")
    for size in args.bank_sizes:
        agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, subgoal_source="data", data_neighbors=args.neighbors,
                                         mamba_backend="torch"))
        agent.subgoal_data = DataSubgoals(*rng.normal(size=(2, size, 2)))
        start = time.perf_counter()
        agent.make_actor(rng.normal(size=(args.envs, 2)).astype(np.float32))
        table = time.perf_counter() - start
        print(f"{size:>8} states: table {table:.1f} s, step {per_step_ms(agent, 'recurrent', args.envs, args.steps, rng):.1f} ms")


if __name__ == "__main__":
    main()
