"""Greedy success of finished offline runs under other acting settings, with their training untouched.

Offline training never acts, so re-evaluating a run's last checkpoint with another search setting is what
the benchmark would have reported with that setting. Each run is evaluated with its own training seed (as
the trainer's final evaluation is), so the row with no overrides reproduces the benchmark's numbers.

    python benchmarks/acting_sweep.py runs/bench/navigate-seed0 runs/bench/navigate-seed1 \
        --settings "" "num_noisy_candidates=32" "candidate_noise=0.3"
"""
import argparse

import numpy as np
import torch

from common import evaluate_like_the_run, load_run, machine_line, task_line

ACTING_FIELDS = {"num_noisy_candidates": int, "candidate_noise": float, "num_interpolations": int}


def parse_setting(text):
    overrides = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in ACTING_FIELDS:
            raise SystemExit(f"{key!r} is not an acting setting; choose from {sorted(ACTING_FIELDS)}")
        overrides[key] = ACTING_FIELDS[key](value)
    return overrides


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="offline run folders (with last_model.pth and config.json)")
    parser.add_argument("--settings", nargs="+", default=[""],
                        help='acting overrides, one comma-separated "key=value,..." per setting ("" = the run\'s own)')
    parser.add_argument("--eval_episodes", type=int, default=20, help="episodes per task")
    args = parser.parse_args()
    print(machine_line())
    for setting in args.settings:
        overrides = parse_setting(setting)
        successes = []
        for run_dir in args.runs:
            config, agent = load_run(run_dir, **overrides)
            result = evaluate_like_the_run(agent, config, args.eval_episodes)
            successes.append(result["success"])
            print(f"  {setting or '(own)':>40} {run_dir}: {result['success']:.3f} (tasks {task_line(result)})", flush=True)
        print(f"{setting or '(own)'}: {np.mean(successes):.3f} +/- {np.std(successes, ddof=1) if len(successes) > 1 else 0:.3f} "
              f"over {len(successes)} runs", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
