"""Offline update throughput: one full OPSO update (encoder, all heads, all losses, Adam step) on
batch_size windows x context_length steps, in transitions per second, and a training step with its
`--critic_steps` critic and value steps on single-observation latents; then a profile of where the time goes.

    python benchmarks/bench_update.py [--batch_size 16 --context_length 100 --repeats 10 --profile]
"""
import argparse

import numpy as np
import torch

from common import machine_line, median_seconds
from offline_agent import AgentConfig, OfflineAgent
from ogbench_utils import Trajectories, WindowSampler


def synthetic_maze_data(num_trajectories=50, length=1001, seed=0):
    """Random-walk 2-D trajectories: the update's cost does not depend on the data's content."""
    rng = np.random.default_rng(seed)
    obs = np.cumsum(rng.normal(scale=0.2, size=(num_trajectories * length, 2)), 0).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(num_trajectories * length, 2)).astype(np.float32)
    terminals = np.zeros(num_trajectories * length, bool)
    terminals[length - 1::length] = True
    return Trajectories.from_terminals(obs, actions, terminals)


def update_timings(agent, sampler, batch_size, repeats, timer=median_seconds, device="cpu"):
    """(seconds of an update alone, seconds of a training step: the update and its critic steps), medians."""
    batches = [sampler.sample(batch_size, device) for _ in range(4 * (1 + agent.config.critic_steps))]
    counter = iter(range(10**9))

    def training_step(critic_steps):
        first = (next(counter) % 4) * (1 + agent.config.critic_steps)
        agent.update(batches[first], batches[first + 1:first + 1 + critic_steps])
    return (timer(lambda: training_step(0), repeats),
            timer(lambda: training_step(agent.config.critic_steps), repeats))


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
    c = agent.config
    sampler = WindowSampler(data, **c.sampler_settings())
    seconds, step_seconds = update_timings(agent, sampler, args.batch_size, args.repeats)
    transitions = args.batch_size * args.context_length
    sample_seconds = median_seconds(lambda: sampler.sample(args.batch_size), args.repeats)
    print(f"update: {args.batch_size} windows x {args.context_length} steps = {transitions} transitions, "
          f"median {seconds * 1000:.1f} ms -> {transitions / seconds:,.0f} transitions/s "
          f"(sampling a batch: {sample_seconds * 1000:.2f} ms)")
    print(f"training step with the default {c.critic_steps} critic step(s): median {step_seconds * 1000:.1f} ms "
          f"(a critic step: ~{(step_seconds - seconds) * 1000 / max(1, c.critic_steps):.1f} ms)")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(3):
                agent.update(sampler.sample(args.batch_size))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
