"""Is the proposer under-trained? Train only P(z, z_g) of a finished run further, everything else frozen.

The encoder, the value and the inverse dynamics stay as the run left them; P gets `--steps` more AWR steps
(OfflineAgent.proposer_update: its own loss, the run's advantage and beta, the run's Adam state) on fresh
windows, then the greedy evaluation is repeated with the run's seed. If success climbs towards what the
oracle's subgoals give, the budget was short of proposer steps; if not, P's objective is what fails. A diagnostic: the run's 30 minutes are already spent before it
starts (offline_trainer.py --proposer_phase is the same inside the budget). Before the trainer's phase existed
this script gave P a fresh Adam; the numbers in benchmarks/results/proposer_finetune.txt are from that version.

    python benchmarks/proposer_finetune.py runs/bench/navigate-uniform-seed1 --steps 1000 --eval_at 0,500,1000
"""
import argparse
import time

from common import evaluate_like_the_run, load_run, machine_line, task_line
from ogbench_utils import load_datasets, sampler_for


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an offline run folder (last_model.pth, config.json)")
    parser.add_argument("--steps", type=int, default=1000, help="proposer-only steps")
    parser.add_argument("--eval_at", default="0,500,1000", help="evaluate after these many steps")
    args = parser.parse_args()
    print(machine_line())
    config, agent = load_run(args.run)
    train, _ = load_datasets(config["dataset"], config["dataset_dir"], config["max_trajectories"])
    sampler = sampler_for(agent.config, train, seed=config["seed"] + 1000)   # windows the run did not draw
    eval_at = sorted(int(s) for s in args.eval_at.split(","))
    losses, start = [], time.time()
    for step in range(args.steps + 1):
        if step in eval_at:
            result = evaluate_like_the_run(agent, config)
            recent = sum(losses[-100:]) / max(len(losses[-100:]), 1)
            print(f"{args.run}: after {step} proposer steps ({time.time() - start:.0f} s): success "
                  f"{result['success']:.2f} (tasks {task_line(result)}); proposer loss {recent:.3f}", flush=True)
        if step < args.steps:
            losses.append(agent.proposer_update(sampler.sample(config["batch_size"]))["proposer/loss"])


if __name__ == "__main__":
    main()
