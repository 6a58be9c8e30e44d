"""Subgoals from the data: which rule picks among real states, and with how many candidates?

The agent's `--subgoal_source data` (offline_agent.SubgoalTable) hands I the successor o_{i+k} of one of the
`--neighbors` dataset states nearest to the agent (every `--stride`-th training state), the one whose state
`--lookahead` steps on has the largest V(z', z_g). This script re-evaluates finished runs' last checkpoints
with that rule (`--score value`), or with the policy search's criterion instead, min Q(z, z', z_g) over the
candidates z' = E([o_{i+k}]) (`--score q`), optionally with P's proposal as one more candidate
(`--with_proposal`, Q only). Acting only, with the trainer's final-evaluation protocol (the run's seed).

    python benchmarks/data_subgoals.py runs/bench/navigate-uniform-seed{0,1,2} --neighbors 2048 --score value
"""
import argparse
import time

import numpy as np
import torch

from common import evaluate_like_the_run, load_run, machine_line, task_line
from offline_agent import RecurrentActor


class QRankedActor(RecurrentActor):
    """The recurrent actor with the data's candidates (and optionally the proposal) ranked by min Q."""

    def __init__(self, agent, goals, with_proposal):
        super().__init__(agent, goals)
        self.with_proposal = with_proposal

    @torch.no_grad()
    def act(self, observations):
        observations = self.observation_tensor(observations)
        z = self.latent(observations)
        candidates = self.table.latents[self.table.nearest(observations)]
        if self.with_proposal:
            candidates = torch.cat([self.agent.heads.proposer(z, self.z_goal).unsqueeze(1), candidates], dim=1)
        z_next = self.agent.best_by_q(z, candidates, self.z_goal)
        return self.agent.inverse_action(z, observations, z_next, self.z_goal).clamp(-1, 1).cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="offline run folders (with last_model.pth and config.json)")
    parser.add_argument("--neighbors", type=int, default=2048, help="nearest dataset states per step")
    parser.add_argument("--stride", type=int, default=5, help="keep every N-th training state")
    parser.add_argument("--lookahead", type=int, default=None, help="value by the state N steps on (default: k)")
    parser.add_argument("--score", choices=["q", "value"], default="value",
                        help="pick the candidate with the largest V ahead (the agent's rule), or min Q(z, z', z_g)")
    parser.add_argument("--with_proposal", action="store_true", help="the proposal is a candidate too (--score q)")
    parser.add_argument("--eval_episodes", type=int, default=None, help="episodes per task (default: the run's)")
    args = parser.parse_args()
    if args.with_proposal and args.score != "q":
        parser.error("--with_proposal ranks by Q: pass --score q")
    print(machine_line())
    successes = []
    for run in args.runs:
        config, agent = load_run(run, subgoal_source="data", data_neighbors=args.neighbors, data_stride=args.stride,
                                 data_lookahead=args.lookahead)
        start = time.time()
        if args.score == "q":
            agent.make_actor = lambda goals, mode="recurrent", streams=2: QRankedActor(agent, goals, args.with_proposal)
        result = evaluate_like_the_run(agent, config, args.eval_episodes)
        successes.append(result["success"])
        print(f"{run}: data subgoals ({args.neighbors} neighbours, stride {args.stride}, lookahead "
              f"{args.lookahead or 'k'}, score {args.score}{', with the proposal' if args.with_proposal else ''}): "
              f"success {result['success']:.2f} (tasks {task_line(result)}), {time.time() - start:.0f} s", flush=True)
    if len(successes) > 1:
        print(f"mean over {len(successes)} runs: {np.mean(successes):.3f} +/- {np.std(successes, ddof=1):.3f}")


if __name__ == "__main__":
    main()
