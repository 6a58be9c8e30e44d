"""Dataset generation speed: environment steps per second of the pointmaze generator (OGBench's recipe).

    python benchmarks/bench_generate.py [--dataset pointmaze-medium-navigate-v0 --episodes 50]
"""
import argparse
import tempfile
import time

from common import machine_line
from ogbench_utils import generate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0", help="dataset to generate (antmaze: with the shipped expert)")
    parser.add_argument("--episodes", type=int, default=50, help="training episodes (+10%% validation)")
    parser.add_argument("--max_steps", type=int, default=None, help="steps per episode (default: the recipe's)")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        train_path, _ = generate(args.dataset, episodes=args.episodes, max_steps=args.max_steps,
                                 dataset_dir=directory, progress=False)
        seconds = time.perf_counter() - start
        import json
        provenance = json.load(open(train_path[:-4] + ".json"))
    steps = provenance["train_steps"] + provenance["val_steps"]
    print(f"{args.dataset}: {steps:,} steps in {seconds:.1f} s -> {steps / seconds:,.0f} steps/s "
          f"(the 1,001,000-step default would take about {1_101_100 / (steps / seconds) / 60:.1f} min)")


if __name__ == "__main__":
    main()
