"""Does logging slow training? Updates per second of the bare loop (sample + update) against the same
loop with everything offline_trainer.py does around it: the finite check and tqdm bar every update, and
every epoch the CSV row, the last checkpoint and the curve plot.

    python benchmarks/bench_logging.py [--updates_per_epoch 50 --epochs 3 --repeats 3]

A short epoch (50 updates, against the trainer's ~625 on a 1M-step dataset) exaggerates the per-epoch
costs on purpose: it is an upper bound on the overhead.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from bench_update import synthetic_maze_data
from common import machine_line
from offline_agent import AgentConfig, OfflineAgent
from offline_trainer import CURVE_PANELS, LOSS_COLUMNS
from ogbench_utils import WindowSampler
from utils import CSVLogger, average, check_finite, plot_curves, save_checkpoint


def run_epochs(agent, sampler, args, out_dir=None):
    """Seconds for `args.epochs` epochs; with out_dir, with the trainer's logging and outputs."""
    logger = CSVLogger(os.path.join(out_dir, "metrics.csv")) if out_dir else None
    start = time.perf_counter()
    for epoch in range(args.epochs):
        infos = []
        bar = tqdm(range(args.updates_per_epoch), disable=out_dir is None, leave=False, desc="with logging")
        for _ in bar:
            infos.append(agent.update(sampler.sample(args.batch_size)))
            if out_dir:
                check_finite(infos[-1], agent.step)
                if len(infos) % 10 == 1:
                    bar.set_postfix({k.split("/")[0]: f"{infos[-1][k]:.3f}" for k in LOSS_COLUMNS[:6]})
        if out_dir:
            means = average(infos)
            logger.log({"epoch": epoch, **{k: means[k] for k in LOSS_COLUMNS if k in means}})
            save_checkpoint(agent.state_dict(), os.path.join(out_dir, "last_model.pth"))
            plot_curves(logger.path, os.path.join(out_dir, "training_curves.png"), "epoch", CURVE_PANELS)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="windows per update")
    parser.add_argument("--updates_per_epoch", type=int, default=50, help="updates between two epoch ends")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    data = synthetic_maze_data()
    agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, mamba_backend="torch"))
    agent.set_normalization(data.observations)
    sampler = WindowSampler(data, **agent.config.sampler_settings())
    for _ in range(3):
        agent.update(sampler.sample(args.batch_size))
    bare, logged = [], []
    for _ in range(args.repeats):   # interleaved, so drift in machine load hits both alike
        bare.append(run_epochs(agent, sampler, args))
        with tempfile.TemporaryDirectory() as out_dir:
            logged.append(run_epochs(agent, sampler, args, out_dir))
    updates = args.epochs * args.updates_per_epoch
    bare_rate, logged_rate = updates / statistics.median(bare), updates / statistics.median(logged)
    print(f"{updates} updates ({args.epochs} epochs of {args.updates_per_epoch}): bare loop {bare_rate:.2f} updates/s, "
          f"with the trainer's logging, checkpoint and plot {logged_rate:.2f} updates/s "
          f"(overhead {100 * (1 - logged_rate / bare_rate):.1f}%)")


if __name__ == "__main__":
    main()
