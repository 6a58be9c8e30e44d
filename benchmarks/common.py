"""Shared by the benchmark scripts: the machine line, timing with warm-up and medians."""
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine_line():
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cpus, {platform.system()}, python {platform.python_version()}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def load_run(run_dir, **overrides):
    """(config.json as a dict, the agent of last_model.pth with acting overrides) of a finished offline run;
    an agent acting with the data's subgoals gets the run's training set."""
    from offline_agent import OfflineAgent
    from ogbench_utils import set_run_subgoal_data
    from utils import load_checkpoint
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    agent = OfflineAgent.from_checkpoint(load_checkpoint(os.path.join(run_dir, "last_model.pth")), **overrides)
    set_run_subgoal_data(agent, config)
    return config, agent


def evaluate_like_the_run(agent, config, episodes=None):
    """The trainer's final evaluation of the run: its dataset, seed, episode limit (and episodes unless given)."""
    from ogbench_utils import evaluate
    return evaluate(agent, config["dataset"], episodes or config["eval_episodes"], seed=config["seed"],
                    progress=False, max_episode_steps=config.get("max_episode_steps"))


def task_line(result):
    return " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))
