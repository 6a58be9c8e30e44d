"""Subgoals from the data: does choosing among real states beat the proposer's regression?

The proposer P(z, z_g) regresses the data's subgoal under AWR weights; where the data's paths fan out
(around a wall) a regression can land between them, on no state at all. Here the candidates are real
states instead: the `--neighbors` dataset states nearest to the agent's observation (raw observations;
every `--stride`-th training state), each followed k steps along its own trajectory (clamped at its end),
encoded like the training's subgoals, z' = E([o_{t'+k}]). Q(z, z', z_g) picks one, as the policy search
does (`--score q`), or the value from the candidate on, V(z', z_g) (`--score value`, HIQL's choice of
subgoal; V is trained on single-observation latents E([o_t]) by the critic steps), and I(z, z', z_g) acts on it; `--with_proposal` adds P's proposal to the candidates. Acting only: it
re-evaluates finished runs' last checkpoints with the trainer's final-evaluation protocol (the run's seed).

    python benchmarks/data_subgoals.py runs/bench/navigate-uniform-seed{0,1,2} --neighbors 512 --score value
"""
import argparse
import time

import numpy as np
import torch

from common import evaluate_like_the_run, load_run, machine_line, task_line
from offline_agent import RecurrentActor
from ogbench_utils import load_datasets


class SubgoalBank:
    """Dataset states and the goal encodings of their successors k steps ahead in their own trajectory."""

    def __init__(self, agent, train, stride, chunk=65536):
        rows = np.arange(0, len(train), stride)
        ahead = np.minimum(rows + agent.config.subgoal_steps, train.traj_ends[rows])
        device = agent.device
        self.states = torch.as_tensor(train.observations[rows], device=device)
        successors = torch.as_tensor(train.observations[ahead], device=device)
        with torch.no_grad():
            self.latents = torch.cat([agent.encoder.encode_goals(successors[i:i + chunk])
                                      for i in range(0, len(successors), chunk)])

    def nearest(self, observations, neighbors):
        """(N, M, Z): the successor latents of the M bank states nearest to each observation."""
        indices = torch.cdist(observations, self.states).topk(neighbors, largest=False).indices
        return self.latents[indices]


class DataSubgoalActor(RecurrentActor):
    """The recurrent actor with the bank's successors (and optionally the proposal) as search candidates."""

    def __init__(self, agent, goals, bank, neighbors, with_proposal, score):
        super().__init__(agent, goals)
        self.bank, self.neighbors, self.with_proposal, self.score = bank, neighbors, with_proposal, score

    @torch.no_grad()
    def act(self, observations):
        observations = self.observation_tensor(observations)
        z = self.latent(observations)
        candidates = self.bank.nearest(observations, self.neighbors)
        if self.with_proposal:
            candidates = torch.cat([self.agent.heads.proposer(z, self.z_goal).unsqueeze(1), candidates], dim=1)
        if self.score == "q":
            z_next = self.agent.best_by_q(z, candidates, self.z_goal)
        else:
            values = self.agent.heads.value(candidates, self.z_goal.unsqueeze(1).expand_as(candidates))
            z_next = candidates[torch.arange(len(candidates)), values.argmax(dim=1)]
        return self.agent.inverse_action(z, observations, z_next, self.z_goal).clamp(-1, 1).cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="offline run folders (with last_model.pth and config.json)")
    parser.add_argument("--neighbors", type=int, default=512, help="nearest dataset states per step")
    parser.add_argument("--stride", type=int, default=5, help="keep every N-th training state in the bank")
    parser.add_argument("--score", choices=["q", "value"], default="q",
                        help="pick the candidate with the largest min Q(z, z', z_g), or V(z', z_g)")
    parser.add_argument("--with_proposal", action="store_true", help="the proposal is a candidate too")
    parser.add_argument("--eval_episodes", type=int, default=None, help="episodes per task (default: the run's)")
    args = parser.parse_args()
    print(machine_line())
    successes = []
    for run in args.runs:
        config, agent = load_run(run)
        train, _ = load_datasets(config["dataset"], config["dataset_dir"], config["max_trajectories"])
        start = time.time()
        bank = SubgoalBank(agent, train, args.stride)
        agent.make_actor = lambda goals, mode="recurrent", streams=2: DataSubgoalActor(
            agent, goals, bank, args.neighbors, args.with_proposal, args.score)
        result = evaluate_like_the_run(agent, config, args.eval_episodes)
        successes.append(result["success"])
        print(f"{run}: data subgoals ({args.neighbors} neighbours, stride {args.stride}, score {args.score}"
              f"{', with the proposal' if args.with_proposal else ''}): success {result['success']:.2f} "
              f"(tasks {task_line(result)}), {time.time() - start:.0f} s", flush=True)
    if len(successes) > 1:
        print(f"mean over {len(successes)} runs: {np.mean(successes):.3f} +/- {np.std(successes, ddof=1):.3f}")


if __name__ == "__main__":
    main()
