"""Evaluation throughput: environment steps per second for a 5-task evaluation, all episodes side by
side (one batched policy call per step) vs one episode at a time. An untrained agent, so episodes run
to the step limit and both modes do the same work.

    python benchmarks/bench_eval.py [--dataset pointmaze-medium-navigate-v0 --episodes 4 --max_steps 200]
"""
import argparse
import time
import types

import torch

from common import machine_line
from offline_agent import AgentConfig, OfflineAgent
from ogbench_utils import NUM_EVAL_TASKS, evaluate, make_env


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="OGBench dataset (its environment)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    parser.add_argument("--max_steps", type=int, default=200, help="steps per episode")
    parser.add_argument("--acting", choices=["recurrent", "window"], default="recurrent", help="acting mode")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(machine_line())
    env = make_env(args.dataset)
    agent = OfflineAgent(AgentConfig(obs_dim=env.observation_space.shape[0], action_dim=env.action_space.shape[0],
                                     mamba_backend="torch"))
    env.close()
    policy = types.SimpleNamespace(make_actor=lambda goals: agent.make_actor(goals, context=args.acting))
    common = dict(progress=False, max_episode_steps=args.max_steps)

    start = time.perf_counter()
    batched = evaluate(policy, args.dataset, args.episodes, **common)
    batched_rate = batched["env_steps"] / (time.perf_counter() - start)

    start, steps = time.perf_counter(), 0
    for task in range(1, NUM_EVAL_TASKS + 1):
        for episode in range(args.episodes):
            steps += evaluate(policy, args.dataset, 1, seed=episode, tasks=[task], **common)["env_steps"]
    sequential_rate = steps / (time.perf_counter() - start)
    print(f"{args.dataset}, {NUM_EVAL_TASKS} tasks x {args.episodes} episodes x {args.max_steps} steps, "
          f"acting {args.acting}")
    print(f"batched: {batched_rate:,.0f} env steps/s; one at a time: {sequential_rate:,.0f} env steps/s; "
          f"ratio {batched_rate / sequential_rate:.1f}x")


if __name__ == "__main__":
    main()
