"""Mean +/- std over seeds of the final evaluation of runs (offline or online), and its change from the first.

    python benchmarks/summarize.py runs/bench/pointmaze-medium-navigate-v0-seed*
    python benchmarks/summarize.py runs/bench/online-pointmaze-medium-navigate-v0-seed* --last 3
    python benchmarks/summarize.py runs/bench/online-DATASET-default-seed{18,19,20} \
        --control runs/bench/online-DATASET-control-seed{18,19,20}

For online runs (more than two evaluations) it also prints, per seed and over seeds, the mean of the last --last
evaluations (OGBench reports the mean of its last three) and the dip: the lowest evaluation after the first,
minus the first (the checkpoint's own success before any online step). With --control (the same seeds' runs
without online data, in the same order) it prints the gain from online data: treatment minus control on the mean
of the last evaluations, per seed and as mean +/- std. With --per_task N (online runs whose goals are the evaluation
tasks in turn, `--goal_source tasks`: `online_trainer.task_of_episode`) it prints each task's exploring success
per block of N episodes and its mean over the last evaluations: which tasks the online phase learns.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ogbench_utils import NUM_EVAL_TASKS  # noqa: E402
from online_trainer import task_of_episode  # noqa: E402
from utils import non_negative_int, read_csv, read_json  # noqa: E402


def run_summary(run_dir, last=3):
    for name in ("metrics.csv", "online_metrics.csv"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            columns = read_csv(path)
            evaluated = np.isfinite(columns["eval/success"])
            success = columns["eval/success"][evaluated]
            wall = columns["time/elapsed_s"][-1]
            tasks = [columns[f"eval/task{i}_success"][evaluated][-1] for i in range(1, NUM_EVAL_TASKS + 1)
                     if f"eval/task{i}_success" in columns]
            return dict(run=run_dir, first=success[0], final=success[-1], evaluations=success,
                        last_mean=success[-last:].mean(), dip=(success[1:].min() - success[0]) if len(success) > 1
                        else 0.0, rows=len(columns["eval/success"]), wall_min=wall / 60, step=columns["step"][-1],
                        tasks=tasks)
    raise SystemExit(f"no metrics file in {run_dir}")


def per_task_lines(run_dir, block, last):
    """Each task's exploring success per block of episodes, and its mean over the last evaluations."""
    config = os.path.join(run_dir, "config.json")
    goal_source = read_json(config).get("goal_source", "tasks") if os.path.exists(config) else "tasks"
    if goal_source != "tasks":
        return [f"  per task: not read, this run's goals are --goal_source {goal_source}, not the tasks in turn"]
    columns = read_csv(os.path.join(run_dir, "online_metrics.csv"))
    episode, success = columns["episode"].astype(int), columns["online/success"]
    task = task_of_episode(episode)
    blocks = []
    for start in range(1, int(episode.max()) + 1, block):
        rows = (episode >= start) & (episode < start + block)
        blocks.append(f"{start}-{start + block - 1}: " + " ".join(
            f"{success[rows & (task == t)].mean():.2f}" if (rows & (task == t)).any() else "-"
            for t in range(1, NUM_EVAL_TASKS + 1)))
    evaluated = np.isfinite(columns["eval/success"])
    last_tasks = [columns[f"eval/task{t}_success"][evaluated][-last:].mean() for t in range(1, NUM_EVAL_TASKS + 1)]
    return [f"  exploring success of tasks 1-{NUM_EVAL_TASKS} per {block} episodes: " + "; ".join(blocks),
            f"  tasks 1-{NUM_EVAL_TASKS}, mean of the last {last} evaluations: "
            + " ".join(f"{v:.2f}" for v in last_tasks)]


def spread(values):
    values = np.asarray(values)
    return f"{values.mean():.3f} +/- {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (one per seed)")
    parser.add_argument("--last", type=int, default=3, help="evaluations averaged at the end of an online run")
    parser.add_argument("--control", nargs="+", default=[], metavar="RUN",
                        help="the control's online run folders, one per run above, in the same order")
    parser.add_argument("--per_task", type=non_negative_int, default=0, metavar="N",
                        help="online runs on the tasks' goals: each task's exploring success per N episodes")
    args = parser.parse_args()
    if args.control and len(args.control) != len(args.runs):
        parser.error(f"--control takes one run per run above: {len(args.runs)} runs, {len(args.control)} controls")
    rows = [run_summary(r, args.last) for r in args.runs]
    online = all(len(r["evaluations"]) > 2 for r in rows)
    for r in rows:
        print(f"{r['run']}: first evaluation {r['first']:.3f}, final evaluation {r['final']:.3f}, "
              f"{int(r['step'])} updates, {r['wall_min']:.1f} min"
              + (f"; tasks 1-5: {' '.join(f'{t:.2f}' for t in r['tasks'])}" if r["tasks"] else ""))
        if online:
            print(f"  evaluations {' '.join(f'{s:.2f}' for s in r['evaluations'])}; mean of the last {args.last} "
                  f"{r['last_mean']:.3f}; dip {r['dip']:+.3f}")
        if online and args.per_task:
            print("\n".join(per_task_lines(r["run"], args.per_task, args.last)))
    final = np.array([r["final"] for r in rows])
    first = np.array([r["first"] for r in rows])
    print(f"final success over {len(rows)} seeds: {spread(final)} (mean +/- std); min {final.min():.3f}, "
          f"max {final.max():.3f}")
    if len(first) and not np.allclose(first, final):
        print(f"change from the first evaluation: {spread(final - first)}")
    if online:
        last_mean = np.array([r["last_mean"] for r in rows])
        print(f"mean of the last {args.last} evaluations over {len(rows)} seeds: {spread(last_mean)}; change from "
              f"the first: {spread(last_mean - first)}; worst dip {min(r['dip'] for r in rows):+.3f}")
    if args.control:
        gain = [r["last_mean"] - run_summary(c, args.last)["last_mean"] for r, c in zip(rows, args.control)]
        print(f"gain from online data (treatment minus control, mean of the last {args.last}): "
              f"{' '.join(f'{g:+.3f}' for g in gain)}; {spread(gain)}")


if __name__ == "__main__":
    main()
