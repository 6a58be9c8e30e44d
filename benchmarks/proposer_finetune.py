"""Is the proposer under-trained? Train only P(z, z_g) of a finished run further, everything else frozen.

The encoder, the value and the inverse dynamics stay as the run left them; P gets `--steps` more AWR steps
(its own loss, the run's advantage and beta) on fresh windows, then the greedy evaluation is repeated with
the run's seed. If success climbs towards what the oracle's subgoals give, the budget was short of proposer
steps; if not, P's objective is what fails. A diagnostic, not a training mode: the run's 30 minutes are
already spent before it starts.

    python benchmarks/proposer_finetune.py runs/bench/navigate-uniform-seed1 --steps 1000 --eval_at 0,500,1000
"""
import argparse
import json
import os
import time

import torch

from common import machine_line
from offline_agent import OfflineAgent, advantage_weights
from ogbench_utils import evaluate, load_datasets, sampler_for
from utils import load_checkpoint, set_seed


def proposer_optimizer(agent):
    return torch.optim.Adam(agent.heads.proposer.parameters(), lr=agent.config.lr)


def proposer_step(agent, optimizer, batch):
    """One AWR step of P alone; the latents, advantages and every other network are left untouched."""
    with torch.no_grad():
        lat = agent.encode_batch(batch)
        valid = batch["future_valid"].float()
        advantage = agent.policy_advantage(lat.z, lat.z_next, lat.z_future, lat.z_actor_goal, batch)
        weights = advantage_weights(advantage, agent.config.beta)
    loss = agent.proposer_loss(lat.z, lat.z_next, lat.z_actor_goal, weights, valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def greedy_success(agent, config):
    set_seed(config["seed"])
    result = evaluate(agent, config["dataset"], config["eval_episodes"], seed=config["seed"], progress=False,
                      max_episode_steps=config.get("max_episode_steps"))
    return result["success"], " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an offline run folder (last_model.pth, config.json)")
    parser.add_argument("--steps", type=int, default=1000, help="proposer-only steps")
    parser.add_argument("--eval_at", default="0,500,1000", help="evaluate after these many steps")
    args = parser.parse_args()
    print(machine_line())
    with open(os.path.join(args.run, "config.json")) as f:
        config = json.load(f)
    agent = OfflineAgent.from_checkpoint(load_checkpoint(os.path.join(args.run, "last_model.pth")))
    train, _ = load_datasets(config["dataset"], config["dataset_dir"], config["max_trajectories"])
    sampler = sampler_for(agent.config, train, seed=config["seed"] + 1000)   # windows the run did not draw
    optimizer = proposer_optimizer(agent)
    eval_at = sorted(int(s) for s in args.eval_at.split(","))
    losses, start = [], time.time()
    for step in range(args.steps + 1):
        if step in eval_at:
            success, tasks = greedy_success(agent, config)
            recent = sum(losses[-100:]) / max(len(losses[-100:]), 1)
            print(f"{args.run}: after {step} proposer steps ({time.time() - start:.0f} s): success {success:.2f} "
                  f"(tasks {tasks}); proposer loss {recent:.3f}", flush=True)
        if step < args.steps:
            losses.append(proposer_step(agent, optimizer, sampler.sample(config["batch_size"])))


if __name__ == "__main__":
    main()
