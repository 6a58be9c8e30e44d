"""Offline update throughput: one OPSO window update (encoder, all heads, every loss but the value's, Adam step)
on batch_size windows x context_length steps, in transitions per second; a value step (V's k-step TD on
--value_batch_size transitions), in value backups per second; a training step (the update, its `--critic_steps`
critic steps and `--value_steps` value steps); then a profile of where an update's time goes.

    python benchmarks/bench_update.py [--batch_size 16 --context_length 100 --value_batch_size 1024 --repeats 10 --profile]
"""
import argparse

import numpy as np
import torch

from common import machine_line, median_seconds
from offline_agent import AgentConfig, OfflineAgent
from ogbench_utils import Trajectories, WindowSampler
from utils import positive_int


def synthetic_maze_data(num_trajectories=50, length=1001, seed=0):
    """Random-walk 2-D trajectories: the update's cost does not depend on the data's content."""
    rng = np.random.default_rng(seed)
    obs = np.cumsum(rng.normal(scale=0.2, size=(num_trajectories * length, 2)), 0).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(num_trajectories * length, 2)).astype(np.float32)
    terminals = np.zeros(num_trajectories * length, bool)
    terminals[length - 1::length] = True
    return Trajectories.from_terminals(obs, actions, terminals)


def update_timings(agent, sampler, batch_size, repeats, timer=median_seconds, device="cpu"):
    """Medians: (seconds of a window update alone, of one value step, of a training step: the update, its critic
    steps and its value steps)."""
    c = agent.config
    batches = [sampler.sample(batch_size, device) for _ in range(4 * (1 + c.critic_steps))]
    transitions = [sampler.sample_transitions(c.value_batch_size, c.subgoal_steps, device)
                   for _ in range(4 * c.value_steps)]
    counter = iter(range(10**9))

    def training_step(critic_steps, value_steps):
        i = next(counter) % 4
        first = i * (1 + c.critic_steps)
        agent.update(batches[first], batches[first + 1:first + 1 + critic_steps],
                     transitions[i * c.value_steps:i * c.value_steps + value_steps])

    def value_step():
        agent.gradient_step(agent.value_step_loss(transitions[next(counter) % len(transitions)])[0])
    return (timer(lambda: training_step(0, 0), repeats), timer(value_step, repeats),
            timer(lambda: training_step(c.critic_steps, c.value_steps), repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="windows per update")
    parser.add_argument("--context_length", type=int, default=100, help="steps per window")
    parser.add_argument("--repeats", type=int, default=10, help="timed updates (median reported)")
    parser.add_argument("--value_batch_size", type=positive_int, default=AgentConfig.value_batch_size,
                        help="transitions per value step (the training default unless given)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="print the top operators of a profiled update")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    data = synthetic_maze_data()
    agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, context_length=args.context_length,
                                     value_batch_size=args.value_batch_size, mamba_backend="torch"))
    agent.set_normalization(data.observations)
    c = agent.config
    sampler = WindowSampler(data, **c.sampler_settings())
    seconds, value_seconds, step_seconds = update_timings(agent, sampler, args.batch_size, args.repeats)
    transitions = args.batch_size * args.context_length
    sample_seconds = median_seconds(lambda: sampler.sample(args.batch_size), args.repeats)
    print(f"update: {args.batch_size} windows x {args.context_length} steps = {transitions} transitions, "
          f"median {seconds * 1000:.1f} ms -> {transitions / seconds:,.0f} transitions/s "
          f"(sampling a batch: {sample_seconds * 1000:.2f} ms)")
    print(f"value step: {c.value_batch_size} transitions, median {value_seconds * 1000:.1f} ms -> "
          f"{c.value_batch_size / value_seconds:,.0f} value backups/s")
    print(f"training step with the defaults' {c.critic_steps} critic and {c.value_steps} value steps: median "
          f"{step_seconds * 1000:.1f} ms -> {(transitions + c.value_steps * c.value_batch_size) / step_seconds:,.0f} "
          f"transitions/s through the losses ({c.value_steps * c.value_batch_size / step_seconds:,.0f} of them value "
          f"backups)")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(3):
                agent.update(sampler.sample(args.batch_size))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
