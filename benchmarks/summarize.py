"""Mean +/- std over seeds of the final evaluation of runs (offline or online), and its change from the first.

    python benchmarks/summarize.py runs/bench/pointmaze-medium-navigate-v0-seed*
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import read_csv  # noqa: E402


def run_summary(run_dir):
    for name in ("metrics.csv", "online_metrics.csv"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            columns = read_csv(path)
            evaluated = np.isfinite(columns["eval/success"])
            success = columns["eval/success"][evaluated]
            wall = columns["time/elapsed_s"][-1]
            tasks = [columns[f"eval/task{i}_success"][evaluated][-1] for i in range(1, 6)
                     if f"eval/task{i}_success" in columns]
            return dict(run=run_dir, first=success[0], final=success[-1], rows=len(columns["eval/success"]),
                        wall_min=wall / 60, step=columns["step"][-1], tasks=tasks)
    raise SystemExit(f"no metrics file in {run_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (one per seed)")
    args = parser.parse_args()
    rows = [run_summary(r) for r in args.runs]
    for r in rows:
        print(f"{r['run']}: first evaluation {r['first']:.3f}, final evaluation {r['final']:.3f}, "
              f"{int(r['step'])} updates, {r['wall_min']:.1f} min"
              + (f"; tasks 1-5: {' '.join(f'{t:.2f}' for t in r['tasks'])}" if r["tasks"] else ""))
    final = np.array([r["final"] for r in rows])
    first = np.array([r["first"] for r in rows])
    print(f"final success over {len(rows)} seeds: {final.mean():.3f} +/- {final.std(ddof=1) if len(rows) > 1 else 0:.3f} "
          f"(mean +/- std); min {final.min():.3f}, max {final.max():.3f}")
    if len(first) and not np.allclose(first, final):
        change = final - first
        print(f"change from the first evaluation: {change.mean():+.3f} +/- {change.std(ddof=1) if len(rows) > 1 else 0:.3f}")


if __name__ == "__main__":
    main()
