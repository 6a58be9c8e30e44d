"""Where does a checkpoint's policy fail: the subgoal choice (the high level) or the inverse dynamics (the low)?

Evaluates one checkpoint (OGBench protocol, all episodes side by side) with the subgoal z' chosen by:
  default        the checkpoint's own acting rule (its subgoal_source)
  proposer       the proposer alone, z' = P(z, z_g)
  goal           the goal itself, z' = z_g
  oracle         the maze's oracle subgoal: the observation with its x-y moved to the centre of the next cell on the
                 shortest path, encoded as z' = E([s']), and in the goal's cell the goal itself; the inverse
                 dynamics' success under a perfect high level
  oracle_policy  no learning: the dataset recipe's own policy (pointmaze: the unit step to the oracle's subgoal;
                 antmaze: the directional expert steered by it), the ceiling the data sets
Works on every OGBench maze (x-y are the first two observation numbers in each). With --plot_dir, each mode's
x-y paths are drawn over the maze, one panel per task (DIR/paths_MODE.png): where the failing episodes end up.
With --history none every mode acts on z_t = E([o_t]), the current observation alone, instead of the recent
history: on the mazes, whose observations are Markov, a low level that stalls only with its history copies its
past actions (the copycat problem) rather than failing to read the subgoal.

    python benchmarks/diagnose_acting.py runs/offline/last_model.pth --dataset pointmaze-medium-navigate-v0
    python benchmarks/diagnose_acting.py CKPT --dataset antmaze-medium-navigate-v0 --modes default,oracle --eval_episodes 20
    python benchmarks/diagnose_acting.py CKPT --dataset pointmaze-medium-stitch-v0 --modes default --plot_dir runs/paths
"""
import argparse
import os

import numpy as np
import torch

from common import machine_line
from offline_agent import Actor, OfflineAgent
from offline_trainer import set_run_subgoal_data
from ogbench_utils import NUM_EVAL_TASKS, OracleSubgoals, data_policy, evaluate, make_env
from utils import atomic_write, load_checkpoint

MODES = ("default", "proposer", "goal", "oracle", "oracle_policy")


class SubgoalOverride(Actor):
    """The agent's greedy actor with its subgoal replaced by one of the modes above."""

    def __init__(self, agent, goals, mode, maze):
        super().__init__(agent, goals)
        self.mode, self.oracle, self.goal_xys = mode, OracleSubgoals(maze), np.asarray(goals)[:, :2]

    def subgoal(self, z, here, observations):
        if self.mode == "proposer":
            return self.agent.heads.proposer(z, self.z_goal)
        if self.mode == "goal":
            return self.z_goal
        moved = observations.cpu().numpy().copy()
        moved[:, :2] = [self.oracle.subgoal_xy(o[:2], g) for o, g in zip(moved, self.goal_xys)]
        # in the goal's cell the oracle names the cell's centre, up to 1.4 units from the (noisy) goal and so
        # outside pointmaze's 1.0 success radius: there the subgoal is the goal itself
        in_goal_cell = torch.as_tensor([self.oracle.in_goal_cell(o[:2], g) for o, g in zip(moved, self.goal_xys)],
                                       device=self.agent.device)
        z_oracle = self.agent.encoder.encode_goals(torch.as_tensor(moved, device=self.agent.device))
        return torch.where(in_goal_cell.unsqueeze(-1), self.z_goal, z_oracle)

    def keep(self, rows):
        super().keep(rows)
        self.goal_xys = self.goal_xys[np.asarray(rows)]


class OverridePolicy:
    def __init__(self, agent, mode, maze):
        self.agent, self.mode, self.maze = agent, mode, maze

    def make_actor(self, goals):
        return SubgoalOverride(self.agent, goals, self.mode, self.maze)


class NoHistory:
    """The actor's history replaced by the current observation: z_t = E([o_t]) (--history none)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def latent(self, observations):
        return self.encoder.encode_goals(observations)

    def keep(self, rows):
        pass


class WithoutHistory:
    """Wraps a policy: its actors act on E([o_t]) instead of the history latent."""

    def __init__(self, policy, agent):
        self.policy, self.agent = policy, agent

    def make_actor(self, goals):
        actor = self.policy.make_actor(goals)
        actor.history = NoHistory(self.agent.encoder)
        return actor


class PathRecorder:
    """Wraps a policy: records every episode's x-y at each step of the evaluation (episodes in evaluate's order)."""

    def __init__(self, policy):
        self.policy, self.paths, self.goals = policy, [], None

    def make_actor(self, goals):
        self.goals = np.asarray(goals)[:, :2]
        self.paths = [[] for _ in goals]
        return _RecordingActor(self.policy.make_actor(goals), self.paths)


class _RecordingActor:
    def __init__(self, actor, paths):
        self.actor, self.paths, self.rows = actor, paths, np.arange(len(paths))

    def act(self, observations):
        for row, ob in zip(self.rows, np.asarray(observations)):
            self.paths[row].append(ob[:2].copy())
        return self.actor.act(observations)

    def keep(self, rows):
        self.rows = self.rows[rows]
        self.actor.keep(rows)


def plot_paths(maze, recorder, episodes_per_task, max_steps, title, png_path):
    """One panel per task: the maze's walls, each episode's path (green if it ended before the step limit, i.e.
    reached its goal, red if it ran out of time), its start (dot) and goal (star)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    unit = maze._maze_unit
    walls = [maze.ij_to_xy(ij) for ij in zip(*np.nonzero(maze.maze_map == 1))]
    fig, axes = plt.subplots(1, NUM_EVAL_TASKS, figsize=(4 * NUM_EVAL_TASKS, 4))
    for task, ax in enumerate(axes):
        for x, y in walls:
            ax.add_patch(Rectangle((x - unit / 2, y - unit / 2), unit, unit, color="0.75"))
        rows = range(task * episodes_per_task, (task + 1) * episodes_per_task)
        paths = [np.asarray(recorder.paths[row]) for row in rows]
        ended_early = [len(path) < max_steps for path in paths]
        for path, early in zip(paths, ended_early):
            ax.plot(path[:, 0], path[:, 1], color="tab:green" if early else "tab:red", lw=0.8, alpha=0.6)
            ax.plot(*path[0], "o", color="k", ms=3)
        ax.plot(*recorder.goals[rows[0]], "*", color="gold", ms=14, mec="k")
        ax.set_title(f"task {task + 1}: {sum(ended_early)}/{episodes_per_task} ended early")
        ax.set_aspect("equal")
        ax.autoscale_view()
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an OPSO checkpoint")
    parser.add_argument("--dataset", required=True, help="the dataset whose environment (and data, for 'default' "
                                                         "acting with the data's states) to use")
    parser.add_argument("--dataset_dir", default=None, help="its folder (default: the training run's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--eval_episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed")
    parser.add_argument("--max_episode_steps", type=int, default=None, help="episode limit (default: the env's)")
    parser.add_argument("--history", choices=("recurrent", "none"), default="recurrent",
                        help="the latent the agent acts on: its recent history (as trained and evaluated) or the "
                             "current observation alone (the copycat check; not for oracle_policy)")
    parser.add_argument("--plot_dir", default=None, help="draw each mode's x-y paths per task to DIR/paths_MODE.png")
    args = parser.parse_args()
    print(machine_line())
    checkpoint = load_checkpoint(args.checkpoint)
    env = make_env(args.dataset, args.max_episode_steps)
    maze = env.unwrapped
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "oracle_policy":
            policy = data_policy(args.dataset, maze)
        elif mode == "default":
            policy = OfflineAgent.from_checkpoint(checkpoint)
            set_run_subgoal_data(policy, checkpoint.get("run_config", {}), args.dataset, args.dataset_dir)
        else:
            policy = OverridePolicy(OfflineAgent.from_checkpoint(checkpoint, subgoal_source="proposer"), mode, maze)
        if args.history == "none" and mode != "oracle_policy":
            policy = WithoutHistory(policy, policy.agent if isinstance(policy, OverridePolicy) else policy)
        if args.plot_dir:
            policy = PathRecorder(policy)
        result = evaluate(policy, args.dataset, args.eval_episodes, seed=args.seed, progress=False,
                          max_episode_steps=args.max_episode_steps)
        tasks = " ".join(f"{result[f'task{k}_success']:.2f}" for k in range(1, 6))
        label = mode if args.history == "recurrent" else f"{mode} (history {args.history})"
        print(f"{label:>14}: success {result['success']:.3f} (tasks {tasks}), mean episode length "
              f"{result['episode_length']:.0f}", flush=True)
        if args.plot_dir:
            os.makedirs(args.plot_dir, exist_ok=True)
            suffix = "" if args.history == "recurrent" else f"_history_{args.history}"
            plot_paths(maze, policy, args.eval_episodes, env.spec.max_episode_steps,
                       f"{args.dataset}, {mode}{suffix}: {args.checkpoint}",
                       os.path.join(args.plot_dir, f"paths_{mode}{suffix}.png"))
    env.close()


if __name__ == "__main__":
    main()
