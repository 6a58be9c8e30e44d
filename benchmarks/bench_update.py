"""Offline update throughput: one full OPSO update (encoder, all heads, all losses, Adam step) on
batch_size windows x context_length steps, in transitions per second; one critic step (critic and value on
single-observation latents, `--critic_steps` of them follow each update), on the same windows and on as many
independent transitions; then a profile of where the time goes.

    python benchmarks/bench_update.py [--batch_size 16 --context_length 100 --repeats 10 --profile]
"""
import argparse

import numpy as np
import torch

from common import machine_line, median_seconds
from offline_agent import AgentConfig, OfflineAgent
from ogbench_utils import Trajectories, sampler_for


def synthetic_maze_data(num_trajectories=50, length=1001, seed=0):
    """Random-walk 2-D trajectories: the update's cost does not depend on the data's content."""
    rng = np.random.default_rng(seed)
    obs = np.cumsum(rng.normal(scale=0.2, size=(num_trajectories * length, 2)), 0).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(num_trajectories * length, 2)).astype(np.float32)
    terminals = np.zeros(num_trajectories * length, bool)
    terminals[length - 1::length] = True
    return Trajectories.from_terminals(obs, actions, terminals)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="windows per update")
    parser.add_argument("--context_length", type=int, default=100, help="steps per window")
    parser.add_argument("--repeats", type=int, default=10, help="timed updates (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="print the top operators of a profiled update")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    data = synthetic_maze_data()
    agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, context_length=args.context_length,
                                     mamba_backend="torch"))
    agent.set_normalization(data.observations)
    sampler = sampler_for(agent.config, data)
    batches = [sampler.sample(args.batch_size) for _ in range(4)]
    counter = iter(range(10**9))
    seconds = median_seconds(lambda: agent.update(batches[next(counter) % 4]), args.repeats)
    transitions = args.batch_size * args.context_length
    sample_seconds = median_seconds(lambda: sampler.sample(args.batch_size), args.repeats)
    critic_seconds = median_seconds(lambda: agent.critic_update(batches[next(counter) % 4]), args.repeats)
    transition_batches = [sampler.sample_transitions(transitions) for _ in range(4)]
    transition_critic_seconds = median_seconds(lambda: agent.critic_update(transition_batches[next(counter) % 4]),
                                               args.repeats)
    transition_sample_seconds = median_seconds(lambda: sampler.sample_transitions(transitions), args.repeats)
    print(f"update: {args.batch_size} windows x {args.context_length} steps = {transitions} transitions, "
          f"median {seconds * 1000:.1f} ms -> {transitions / seconds:,.0f} transitions/s "
          f"(sampling a batch: {sample_seconds * 1000:.2f} ms)")
    print(f"critic step on the same batch: median {critic_seconds * 1000:.1f} ms; a training step with the default "
          f"{agent.config.critic_steps} critic step(s): {(seconds + agent.config.critic_steps * critic_seconds) * 1000:.1f} ms")
    print(f"critic step on {transitions} independent transitions (--critic_batch transitions): median "
          f"{transition_critic_seconds * 1000:.1f} ms (sampling them: {transition_sample_seconds * 1000:.2f} ms)")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for i in range(3):
                agent.update(batches[i])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
