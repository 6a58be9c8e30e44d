"""OGBench datasets and environments: loading, local generation, windows with goal relabelling, evaluation.

Conventions follow OGBench (Park et al., 2024): its file format, its GCDataset goal relabelling
(current 0.2 / same-trajectory future at a geometric offset 0.5 / random 0.3; success when the goal
index equals the current index; reward = success - 1; mask = 1 - success) and its evaluation protocol
(five tasks, `reset(options=dict(task_id=k))`, goal from `info['goal']`, success as reported).

Command line:
    python ogbench_utils.py generate pointmaze-medium-navigate-v0 [--episodes N] [--max_steps M]
        [--noise X] [--seed S] [--dataset_dir DIR] [--expert FILE] [--overwrite]
    python ogbench_utils.py oracle antmaze-medium-navigate-v0     # the recipe's oracle-steered policy's success
"""
import argparse
import datetime
import os
import tempfile
import urllib.error
import zipfile
from collections import deque
from dataclasses import dataclass

import gymnasium
import numpy as np
import torch
from tqdm import tqdm

from utils import DEFAULT_DATASET_DIR, UserError, exit_on_user_error, non_negative_float, positive_int, read_json, write_json

GENERATED_DATASET_DIR = "datasets/generated"

OFFICIAL_LOCOMOTION = [f"antmaze-{size}-{kind}-v0" for size in ("medium", "large")
                       for kind in ("navigate", "explore", "stitch")]
OFFICIAL_LOCOMOTION += [f"humanoidmaze-{size}-{kind}-v0" for size in ("medium", "large")
                        for kind in ("navigate", "stitch")]
POINTMAZE = [f"pointmaze-{size}-{kind}-v0" for size in ("medium", "large", "giant", "teleport")
             for kind in ("navigate", "stitch", "explore")]
SUPPORTED_DATASETS = POINTMAZE + OFFICIAL_LOCOMOTION

# OGBench's recipe (data_gen_scripts/generate_locomaze.py and its commands) per dataset kind.
RECIPES = {
    "navigate": dict(episodes=1000, max_steps=1001, noise=0.5),
    "stitch": dict(episodes=5000, max_steps=201, noise=0.5),
    "explore": dict(episodes=10000, max_steps=501, noise=1.0),
}
ANT_NOISE = 0.2             # antmaze navigate/stitch: the expert's action noise (generate_locomaze.py's default)
SMOKE_RECIPE = dict(episodes=20, max_steps=201, noise=0.0)  # humanoidmaze: random actions, tests only
STITCH_CELLS = 4             # stitch episodes start this many maze cells (BFS) from their goal
EXPLORE_DIRECTION_STEPS = 10  # explore re-samples its random direction this often

VALUE_GOAL_PROBS = dict(cur=0.2, traj=0.5, rand=0.3)  # OGBench GCDataset value_p_* defaults
NUM_EVAL_TASKS = 5


# ----------------------------------------------------------------------------- names

def check_dataset_name(name):
    if name not in SUPPORTED_DATASETS:
        raise UserError(f"unknown dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}")


def dataset_kind(name):
    return name.split("-")[-2]


def env_name_of(name):
    """'pointmaze-medium-navigate-v0' -> 'pointmaze-medium-v0' (OGBench drops the dataset type)."""
    parts = name.split("-")
    return "-".join(parts[:-2] + parts[-1:])


def make_env(name, max_episode_steps=None, **env_kwargs):
    """The dataset's environment; max_episode_steps None keeps the environment's own limit."""
    check_dataset_name(name)
    import ogbench  # noqa: F401  (registers the environments)
    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = max_episode_steps
    return gymnasium.make(env_name_of(name), **env_kwargs)


def reset_seeded(env, seed, options):
    """env.reset(seed=seed) with the action space seeded too: OGBench's maze reset takes a few random actions
    (action_space.sample(), which reset's seed leaves alone) before it reads the goal observation, so without
    this an ant's goal joints, and every evaluation after them, would differ from run to run."""
    env.action_space.seed(seed)
    return env.reset(seed=seed, options=options)


# ----------------------------------------------------------------------------- loading

@dataclass
class Trajectories:
    """Observations and actions of whole trajectories laid end to end, with each step's trajectory end."""
    observations: np.ndarray   # (T, obs_dim) float32
    actions: np.ndarray        # (T, action_dim) float32; the last action of a trajectory is never used
    traj_ends: np.ndarray      # (T,) index of the last step of the trajectory each step belongs to
    commanded_goals: np.ndarray = None  # online episodes only: (T, obs_dim) the goal the agent was given
    reached: np.ndarray = None          # online episodes only: (T,) the environment's success at this step

    @classmethod
    def from_terminals(cls, observations, actions, terminals, max_trajectories=None):
        """Cut at `terminals` (True on the last step of each trajectory); keep the first N."""
        ends = np.flatnonzero(terminals)
        if len(ends) == 0 or ends[-1] != len(terminals) - 1:
            ends = np.append(ends, len(terminals) - 1)  # an unterminated tail is a trajectory too
        if max_trajectories is not None:
            ends = ends[:max_trajectories]
        size = ends[-1] + 1
        lengths = np.diff(np.concatenate([[-1], ends]))
        return cls(np.asarray(observations[:size], np.float32), np.asarray(actions[:size], np.float32),
                   np.repeat(ends, lengths))

    @property
    def num_trajectories(self):
        return len(np.unique(self.traj_ends))

    def __len__(self):
        return len(self.observations)

    def trajectory_lengths(self):
        ends = np.unique(self.traj_ends)
        return np.diff(np.concatenate([[-1], ends]))

    @classmethod
    def empty(cls, obs_dim, action_dim):
        return cls(np.zeros((0, obs_dim), np.float32), np.zeros((0, action_dim), np.float32),
                   np.zeros(0, np.int64), np.zeros((0, obs_dim), np.float32), np.zeros(0, bool))

    def append(self, observations, actions, commanded_goal, reached):
        """Add one online episode: its observations, actions, the goal it was given and the env's success."""
        start, length = len(self), len(observations)
        self.observations = np.concatenate([self.observations, np.asarray(observations, np.float32)])
        self.actions = np.concatenate([self.actions, np.asarray(actions, np.float32)])
        self.traj_ends = np.concatenate([self.traj_ends, np.full(length, start + length - 1)])
        goals = np.repeat(np.asarray(commanded_goal, np.float32)[None], length, axis=0)
        self.commanded_goals = np.concatenate([self.commanded_goals, goals])
        self.reached = np.concatenate([self.reached, np.asarray(reached, bool)])


def dataset_paths(name, dataset_dir):
    base = os.path.join(os.path.expanduser(dataset_dir), name)
    return base + ".npz", base + "-val.npz"


def load_datasets(name, dataset_dir=DEFAULT_DATASET_DIR, max_trajectories=None):
    """(train, val) Trajectories through ogbench.make_env_and_datasets; download where possible."""
    check_dataset_name(name)
    import ogbench
    train_path, val_path = dataset_paths(name, dataset_dir)
    if not (os.path.exists(train_path) and os.path.exists(val_path)):
        _download_or_explain(name, dataset_dir)
    obs_dim, action_dim = env_sizes(name)
    for path in (train_path, val_path):
        check_dataset_file(path, obs_dim, action_dim)
    try:
        train, val = ogbench.make_env_and_datasets(name, dataset_dir=os.path.expanduser(dataset_dir),
                                                   dataset_only=True, compact_dataset=True)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"dataset file {train_path} (or its -val file) is corrupt or incomplete "
                        f"({type(error).__name__}: {error}); delete it and download or generate it again") from None
    return tuple(_to_trajectories(d, max_trajectories) for d in (train, val))


def env_sizes(name):
    """(observation size, action size) of a dataset's environment."""
    env = make_env(name)
    sizes = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    return sizes


def check_dataset_file(path, obs_dim, action_dim):
    """One line naming the file and the problem, before OGBench's loader meets it (it assumes a well-formed file)."""
    def bad(problem):
        return UserError(f"dataset file {path} {problem}; delete it and download or generate it again")
    try:
        with np.load(path) as raw:
            columns = {k: raw[k] for k in ("observations", "actions", "terminals")}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"dataset file {path} is corrupt or incomplete ({type(error).__name__}: {error}); delete it "
                        "and download or generate it again") from None
    observations, actions, terminals = columns["observations"], columns["actions"], columns["terminals"]
    if observations.ndim != 2 or observations.shape[1] != obs_dim:
        raise bad(f"has observations of shape {observations.shape}; the environment's are (steps, {obs_dim})")
    if actions.ndim != 2 or actions.shape[1] != action_dim:
        raise bad(f"has actions of shape {actions.shape}; the environment's are (steps, {action_dim})")
    if not len(observations) == len(actions) == len(terminals):
        raise bad(f"has {len(observations)} observations, {len(actions)} actions and {len(terminals)} terminals; "
                  "they must be as many")
    if len(observations) < 2:
        raise bad(f"has {len(observations)} steps; a dataset needs at least one transition")
    if np.asarray(terminals, bool).all():
        raise bad("ends a trajectory at every step: it holds no transition")
    for key, values in (("observations", observations), ("actions", actions)):
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            raise bad(f"has NaN or Inf in its {key} (first at step {int(np.argmin(finite))})")


def _to_trajectories(compact, max_trajectories):
    # compact datasets keep every observation; valids == 0 marks each trajectory's last step
    terminals = compact["valids"] == 0
    return Trajectories.from_terminals(compact["observations"], compact["actions"], terminals, max_trajectories)


def _download_or_explain(name, dataset_dir):
    import ogbench
    try:
        ogbench.download_datasets([name], dataset_dir=os.path.expanduser(dataset_dir))
    except (urllib.error.URLError, OSError, ValueError) as error:
        for path in dataset_paths(name, dataset_dir):
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        raise UserError(
            f"dataset {name} is not in {dataset_dir}/ and could not be downloaded ({type(error).__name__}). "
            f"Generate a local copy with `python ogbench_utils.py generate {name}` ({generated_what(name)}) and "
            f"pass --dataset_dir {GENERATED_DATASET_DIR}") from None


def generated_what(name):
    """What `generate` makes for a dataset, in a few words (never the official file)."""
    family = name.split("-")[0]
    if family == "humanoidmaze":
        return "a tiny random-action SMOKE set for tests, not a benchmark: the humanoid expert is out of reach"
    steer = "the shipped ant expert steered by the maze's oracle" if family == "antmaze" else "the maze's oracle"
    return f"OGBench's recipe and sizes with {steer}, not the official file"


# ----------------------------------------------------------------------------- windows and goals

class WindowSampler:
    """Batches of windows of consecutive steps inside one trajectory, with relabelled goals.

    Windows have `context_length` positions; a trajectory shorter than that gives one window padded
    with its last step, and the padding is marked invalid (`step_valid` False). For every position t
    (dataset index i):
      future_offset   position of min(i + k, window end) in the window (k = subgoal_steps)
      future_valid    the future is exactly k ahead, or the trajectory ended before
      inverse_offset  position of min(i + d, window end), d uniform in 1..k: subgoals for the inverse
                      dynamics at several distances
      value_goals     OGBench value goals: current (0.2), same-trajectory future at a geometric offset
                      with p = 1 - discount (0.5), random dataset state (0.3); on online data a share
                      `commanded_goal_prob` of them is replaced by the goal the agent was given
      rewards/successes  success = (goal index == i) (or the env's success for commanded goals),
                      reward = success - 1 (OGBench's mask = 1 - success is kstep_masks' one-step case)
      kstep_returns   discounted rewards over the k steps, stopping at success; kstep_masks 0 if the goal
                      is reached within them (no bootstrap), else 1; kstep_discounts = discount ** steps
      actor_goals     same-trajectory future, uniform between i + 1 and the trajectory end (OGBench actor)
      actor_kstep_returns/_masks  kstep_returns and kstep_masks towards the actor goal
      next_valid      t + 1 is inside the window and the trajectory
    """

    def __init__(self, data: Trajectories, context_length, subgoal_steps, discount, seed=0,
                 goal_probs=VALUE_GOAL_PROBS, commanded_goal_prob=0.0):
        if abs(sum(goal_probs.values()) - 1.0) > 1e-6:
            raise ValueError(f"goal probabilities must sum to 1, got {goal_probs}")
        self.data = data
        self.window_length = context_length
        self.subgoal_steps = subgoal_steps
        self.discount = discount
        self.goal_probs = goal_probs
        self.commanded_goal_prob = commanded_goal_prob
        self.rng = np.random.default_rng(seed)
        self.refresh()

    def refresh(self):
        """Recompute the window starts (after the data grew)."""
        self.valid_starts = self._window_starts(self.window_length)
        self.transition_starts = np.flatnonzero(self.data.traj_ends != np.arange(len(self.data)))
        if self.data.reached is not None:
            self.next_reached = self._next_reached()

    def _window_starts(self, length):
        """Steps a window of `length` can start at: room for it, or the start of a shorter trajectory."""
        n = len(self.data)
        positions = np.arange(n)
        room = self.data.traj_ends - positions + 1
        is_start = np.r_[True, self.data.traj_ends[:-1] == positions[:-1]] if n else np.zeros(0, bool)
        return np.flatnonzero((room >= length) | (is_start & (room < length)))

    def _next_reached(self):
        """For each step, the first step at or after it (same episode) where the env reported success."""
        never = np.iinfo(np.int64).max
        result = np.full(len(self.data), never, np.int64)
        upcoming = never
        for i in range(len(self.data) - 1, -1, -1):
            if self.data.traj_ends[i] == i:
                upcoming = never
            if self.data.reached[i]:
                upcoming = i
            result[i] = upcoming
        return result

    def sample(self, batch_size, device="cpu"):
        """batch_size windows of `context_length` steps (OGBench's conventions: the class docstring)."""
        rng, k, gamma, window_length = self.rng, self.subgoal_steps, self.discount, self.window_length
        starts = self.valid_starts[rng.integers(len(self.valid_starts), size=batch_size)]
        positions = starts[:, None] + np.arange(window_length)                    # (B, W)
        traj_end = self.data.traj_ends[starts][:, None]
        step_valid = positions <= traj_end
        idx = np.minimum(positions, traj_end)
        window_end = np.minimum(starts[:, None] + window_length - 1, traj_end)
        future = np.minimum(idx + k, window_end)
        steps_ahead = future - idx
        future_valid = step_valid & (steps_ahead >= 1) & ((steps_ahead == k) | (future == traj_end))

        obs = self.data.observations
        value_goals, success, kstep_returns, goal_within_k = self._relabel(idx, traj_end, steps_ahead)

        uniform = rng.random(idx.shape)
        actor_goals = np.round(np.minimum(idx + 1, traj_end) * uniform + traj_end * (1 - uniform)).astype(np.int64)
        to_actor_goal = actor_goals - idx

        inverse = np.minimum(idx + rng.integers(1, k + 1, size=idx.shape), window_end)
        batch = dict(
            observations=obs[idx], actions=self.data.actions[idx], step_valid=step_valid,
            future_offset=future - starts[:, None], future_valid=future_valid, inverse_offset=inverse - starts[:, None],
            value_goals=value_goals, rewards=success.astype(np.float32) - 1.0, successes=success,
            kstep_returns=kstep_returns.astype(np.float32), kstep_masks=(~goal_within_k).astype(np.float32),
            kstep_discounts=(gamma ** steps_ahead).astype(np.float32), actor_goals=obs[actor_goals],
            actor_kstep_returns=return_of_reaching(np.minimum(to_actor_goal, steps_ahead), gamma).astype(np.float32),
            actor_kstep_masks=(to_actor_goal >= steps_ahead).astype(np.float32),
            next_valid=step_valid & (positions < window_end),
        )
        return {key: torch.as_tensor(np.ascontiguousarray(v), device=device) for key, v in batch.items()}

    def sample_transitions(self, batch_size, steps, device="cpu"):
        """batch_size independent steps o_t (never a trajectory's last), each with o_{t+n}, n = min(steps, steps to
        the trajectory's end), and the value goals, returns, masks and discounts of the class docstring over n;
        and for the inverse dynamics a_t and o_{t+d}, d uniform in 1..steps (also clipped to the trajectory)."""
        rng, gamma = self.rng, self.discount
        idx = self.transition_starts[rng.integers(len(self.transition_starts), size=batch_size)]
        traj_end = self.data.traj_ends[idx]
        future = np.minimum(idx + steps, traj_end)
        steps_ahead = future - idx
        value_goals, _, returns, goal_within = self._relabel(idx, traj_end, steps_ahead)
        inverse = np.minimum(idx + rng.integers(1, steps + 1, size=batch_size), traj_end)
        batch = dict(observations=self.data.observations[idx], future_observations=self.data.observations[future],
                     value_goals=value_goals, returns=returns.astype(np.float32),
                     masks=(~goal_within).astype(np.float32), discounts=(gamma ** steps_ahead).astype(np.float32),
                     actions=self.data.actions[idx], inverse_observations=self.data.observations[inverse])
        return {key: torch.as_tensor(np.ascontiguousarray(v), device=device) for key, v in batch.items()}

    def _relabel(self, idx, traj_end, steps_ahead):
        """OGBench's value goals for the steps idx, and toward them: success at idx, the discounted return over
        the next steps_ahead steps (stopping at success), and whether the goal is reached within them."""
        goal_idx = self._value_goal_indices(idx, traj_end)
        value_goals = self.data.observations[goal_idx]
        success = goal_idx == idx
        to_goal = np.where((goal_idx >= idx) & (goal_idx <= traj_end), goal_idx - idx, np.iinfo(np.int64).max)
        if self.commanded_goal_prob > 0:
            commanded = self.rng.random(idx.shape) < self.commanded_goal_prob
            value_goals[commanded] = self.data.commanded_goals[idx[commanded]]
            success = np.where(commanded, self.data.reached[idx], success)
            to_goal = np.where(commanded, self.next_reached[idx] - idx, to_goal)
            to_goal[commanded & (self.next_reached[idx] == np.iinfo(np.int64).max)] = np.iinfo(np.int64).max
        returns = return_of_reaching(np.minimum(to_goal, steps_ahead), self.discount)
        return value_goals, success, returns, to_goal < steps_ahead

    def _value_goal_indices(self, idx, traj_end):
        rng, p = self.rng, self.goal_probs
        offsets = rng.geometric(p=1.0 - self.discount, size=idx.shape)         # in [1, inf)
        traj_goals = np.minimum(idx + offsets, traj_end)
        random_goals = rng.integers(len(self.data), size=idx.shape)
        choice = rng.random(idx.shape)
        goals = np.where(choice < p["cur"], idx, traj_goals)
        return np.where(choice >= p["cur"] + p["traj"], random_goals, goals)


def return_of_reaching(steps, gamma):
    """Discounted sum of `steps` rewards of -1: the return of reaching the goal after that many steps."""
    return -(1.0 - gamma ** steps) / (1.0 - gamma)


def concat_batches(first, second):
    """One batch of windows from two samplers (offline and online), along the batch axis."""
    return {key: torch.cat([first[key], second[key]]) for key in first}


# ----------------------------------------------------------------------------- evaluation

def run_episodes(actor, envs, observations, progress):
    """Step all episodes side by side until each ends: success (N,), episode lengths (N,), and which episodes
    ended on a non-finite action (N,). Such an action never reaches the environment (MuJoCo would reset the
    state, and a point reset to (0, 0) can land on a goal): its episode ends there, as a failure."""
    n, max_steps = len(envs), envs[0].spec.max_episode_steps
    success, lengths, non_finite = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    active = np.arange(n)
    with tqdm(total=max_steps, desc="evaluate", leave=False, disable=not progress) as bar:
        for step in range(max_steps):
            actions = np.asarray(actor.act(observations[active]))
            keep = []
            for row, (i, action) in enumerate(zip(active, actions)):
                lengths[i] = step + 1
                if not np.all(np.isfinite(action)):
                    non_finite[i], success[i] = True, 0.0
                    continue
                ob, _, terminated, truncated, info = envs[i].step(action)
                observations[i] = ob
                success[i] = max(success[i], info["success"])
                if not (terminated or truncated):
                    keep.append(row)
            if len(keep) < len(active):
                active = active[keep]
                if len(active) == 0:
                    break
                actor.keep(np.asarray(keep))
            bar.update(1)
            bar.set_postfix(active=len(active), success=f"{success.mean():.2f}")
    return success, lengths, non_finite


def evaluate(policy, dataset_name, episodes_per_task, seed=0, progress=True, tasks=None, max_episode_steps=None):
    """OGBench's protocol, all episodes side by side: one batched policy call per step.

    The actor protocol, the only thing evaluation knows of a policy: `policy.make_actor(goals)` (goals
    (N, obs_dim)) returns an actor with `act(observations (N', obs_dim)) -> actions (N', action_dim)` and
    `keep(rows)`, called when episodes end with the rows (into the last `act` call) that go on.
    `tasks` defaults to the five evaluation tasks; `max_episode_steps` to the environment's limit.
    Returns {'success': mean over tasks, 'task{k}_success': per task, 'non_finite_episodes': episodes ended by
    a NaN or Inf action ('task{k}_non_finite' per task), 'episode_length': mean, 'env_steps'}.
    """
    tasks = list(tasks or range(1, NUM_EVAL_TASKS + 1))
    # the maze's start and goal noise comes from numpy's global RNG: seed it, so every evaluation of a
    # run (and of a resumed run) starts from the same positions
    np.random.seed(seed)
    envs, goals, observations, task_of = [], [], [], []
    for task_id in tasks:
        for episode in range(episodes_per_task):
            env = make_env(dataset_name, max_episode_steps)
            ob, info = reset_seeded(env, seed * 100_003 + task_id * 1_000 + episode, dict(task_id=task_id))
            envs.append(env)
            goals.append(info["goal"])
            observations.append(ob)
            task_of.append(task_id)
    # the search's noisy candidates draw from torch's RNG: seed it too, in a fork, so an evaluation is the
    # same whenever it runs (in training or from the checkpoint later) and leaves the caller's stream alone
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        actor = policy.make_actor(np.asarray(goals, np.float32))
        success, lengths, non_finite = run_episodes(actor, envs, np.asarray(observations, np.float32), progress)
    for env in envs:
        env.close()
    task_of = np.asarray(task_of)
    result = {f"task{k}_success": float(success[task_of == k].mean()) for k in tasks}
    result["success"] = float(np.mean([result[f"task{k}_success"] for k in tasks]))
    result.update({f"task{k}_non_finite": int(non_finite[task_of == k].sum()) for k in tasks})
    result["non_finite_episodes"] = int(non_finite.sum())
    result["episode_length"] = float(lengths.mean())
    result["env_steps"] = int(lengths.sum())
    return result


# ----------------------------------------------------------------------------- generation

class OracleSubgoals:
    """env.get_oracle_subgoal, cached: it depends only on the (start cell, goal cell) pair."""

    def __init__(self, maze_env):
        self.env = maze_env
        self.cache = {}

    def subgoal_xy(self, xy, goal_xy):
        """The centre of the next cell on the shortest path from xy's cell to goal_xy's (OGBench's oracle)."""
        key = (self.env.xy_to_ij(xy), self.env.xy_to_ij(goal_xy))
        if key not in self.cache:
            self.cache[key] = np.asarray(self.env.get_oracle_subgoal(xy, goal_xy)[0])
        return self.cache[key]

    def in_goal_cell(self, xy, goal_xy):
        return self.env.xy_to_ij(xy) == self.env.xy_to_ij(goal_xy)

    def direction(self, xy, goal_xy):
        offset = self.subgoal_xy(xy, goal_xy) - xy
        return offset / (np.linalg.norm(offset) + 1e-6)


def maze_cells(maze_map):
    """All free cells, and the 'vertex' cells (free cells that are not straight hallway)."""
    free, vertex = [], []
    for i, j in zip(*np.nonzero(maze_map == 0)):
        free.append((int(i), int(j)))
        vertical = maze_map[i - 1, j] == 0 and maze_map[i + 1, j] == 0 and maze_map[i, j - 1] == 1 and maze_map[i, j + 1] == 1
        horizontal = maze_map[i, j - 1] == 0 and maze_map[i, j + 1] == 0 and maze_map[i - 1, j] == 1 and maze_map[i + 1, j] == 1
        if not (vertical or horizontal):
            vertex.append((int(i), int(j)))
    return free, vertex


def cell_distances(maze_map, start):
    """BFS distance (in cells) from start to every free cell it connects to: {cell: distance}."""
    dist = {start: 0}
    queue = deque([start])
    while queue:
        i, j = queue.popleft()
        for di, dj in ((-1, 0), (0, -1), (1, 0), (0, 1)):
            cell = (i + di, j + dj)
            if maze_map[cell] == 0 and cell not in dist:
                dist[cell] = dist[(i, j)] + 1
                queue.append(cell)
    return dist


def cells_at_distance(maze_map, start, distance):
    """Free cells exactly `distance` BFS steps from start."""
    dist = cell_distances(maze_map, start)
    return [cell for cell, d in dist.items() if d == distance]


GENERATION_LANES = 100   # episodes collected side by side: one batched policy call per step


class OraclePolicy:
    """OGBench's data policy for a maze: the unit direction to the oracle's subgoal, followed by the point mass
    as it is, by the ant through its directional expert (fed the observation without x-y and the direction)."""

    def __init__(self, maze_env, expert=None):
        self.oracle, self.expert = OracleSubgoals(maze_env), expert

    def directions(self, observations, goal_xys):
        return np.stack([self.oracle.direction(o[:2], g) for o, g in zip(observations, goal_xys)])

    def __call__(self, observations, directions):
        if self.expert is None:
            return directions
        return self.expert(np.concatenate([np.asarray(observations)[:, 2:], directions], axis=1))

    def make_actor(self, goals):
        """The evaluate() protocol: steer towards goal observations (x-y in their first two numbers)."""
        return OracleActor(self, np.asarray(goals)[:, :2])


class OracleActor:
    def __init__(self, policy, goal_xys):
        self.policy, self.goal_xys = policy, goal_xys

    def act(self, observations):
        return self.policy(observations, self.policy.directions(observations, self.goal_xys))

    def keep(self, rows):
        self.goal_xys = self.goal_xys[rows]


def data_policy(name, maze_env, expert_path=None):
    """The policy a dataset's recipe steers (None for humanoidmaze: its expert is out of reach, SMOKE data)."""
    family = name.split("-")[0]
    if family == "humanoidmaze":
        return None
    if family == "antmaze":
        from expert import DEFAULT_EXPERT, load_expert
        return OraclePolicy(maze_env, load_expert(expert_path or DEFAULT_EXPERT))
    return OraclePolicy(maze_env)


def generation_recipe(name, episodes=None, max_steps=None, noise=None):
    family, kind = name.split("-")[0], dataset_kind(name)
    recipe = dict(SMOKE_RECIPE if family == "humanoidmaze" else RECIPES[kind])
    if family == "antmaze" and kind != "explore":
        recipe["noise"] = ANT_NOISE
    recipe.update({k: v for k, v in dict(episodes=episodes, max_steps=max_steps, noise=noise).items() if v is not None})
    if recipe["episodes"] < 1 or recipe["max_steps"] < 2 or recipe["noise"] < 0:
        raise UserError(f"need episodes >= 1, max_steps >= 2, noise >= 0; got {recipe}")
    return recipe


def check_writable_output(name, dataset_dir, overwrite):
    """Before any episode is collected: the folder can be written and no dataset is replaced by accident."""
    paths = dataset_paths(name, dataset_dir)
    if os.path.exists(dataset_dir) and not os.path.isdir(dataset_dir):
        raise UserError(f"--dataset_dir {dataset_dir} is a file, not a folder")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
    try:
        os.makedirs(dataset_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=dataset_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write to --dataset_dir {dataset_dir} ({error.strerror or type(error).__name__})") from None


def generate(name, episodes=None, max_steps=None, noise=None, seed=0, dataset_dir=None, progress=True,
             expert_path=None, overwrite=False):
    """Write DIR/<name>.npz, DIR/<name>-val.npz (a tenth as many episodes) and DIR/<name>.json by OGBench's
    recipe (data_gen_scripts/generate_locomaze.py), episodes side by side in lanes of GENERATION_LANES."""
    check_dataset_name(name)
    recipe = generation_recipe(name, episodes, max_steps, noise)
    dataset_dir = dataset_dir or GENERATED_DATASET_DIR
    check_writable_output(name, dataset_dir, overwrite)
    np.random.seed(seed)  # the maze environments draw their start and goal noise from numpy's global RNG
    total = recipe["episodes"] + max(1, recipe["episodes"] // 10)
    envs = [make_env(name, terminate_at_goal=False, max_episode_steps=recipe["max_steps"])
            for _ in range(min(GENERATION_LANES, total))]
    for lane, env in enumerate(envs):
        env.reset(seed=seed + lane)
        env.action_space.seed(seed + lane)
    policy = data_policy(name, envs[0].unwrapped, expert_path)
    episodes_out = []
    with tqdm(total=total, desc=f"generate {name}", disable=not progress) as bar:
        while len(episodes_out) < total:
            lanes = envs[:min(len(envs), total - len(episodes_out))]
            episodes_out += _collect_episodes(lanes, dataset_kind(name), recipe["noise"], policy)
            bar.update(len(lanes))
    for env in envs:
        env.close()
    columns = {k: np.concatenate([e[k] for e in episodes_out]) for k in episodes_out[0]}
    train_steps = sum(len(e["terminals"]) for e in episodes_out[:recipe["episodes"]])
    provenance = dict(generator="ogbench_utils.py generate", recipe=recipe_text(name, policy), dataset=name,
                      kind=dataset_kind(name), seed=seed, noise=recipe["noise"], episodes=recipe["episodes"],
                      val_episodes=total - recipe["episodes"], max_steps=recipe["max_steps"], smoke=policy is None,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if policy is not None and policy.expert is not None:
        provenance.update(expert=os.path.relpath(policy.expert.path), expert_sha256=policy.expert.sha256())
    _write_generated(name, dataset_dir, columns, train_steps, provenance)
    return dataset_paths(name, dataset_dir)


def recipe_text(name, policy):
    if policy is None:
        return "random actions: SMOKE DATA for tests, not a benchmark (the humanoid expert needs 40M SAC steps)"
    steer = "the directional ant expert (expert.py) fed ob[2:] and" if policy.expert is not None else ""
    return (f"OGBench {name.split('-')[0]} recipe: {steer} the unit direction to env.get_oracle_subgoal, "
            "plus Gaussian action noise, clipped").replace("  ", " ")


def _start_episode(env, kind, free, vertex):
    init = free[np.random.randint(len(free))]
    if kind == "stitch":
        near = cells_at_distance(env.unwrapped.maze_map, init, STITCH_CELLS)
        goal = near[np.random.randint(len(near))] if near else init
    else:
        goal = vertex[np.random.randint(len(vertex))]
    ob, _ = env.reset(options=dict(task_info=dict(init_ij=init, goal_ij=goal)))
    return ob


def _collect_episodes(envs, kind, noise, policy):
    """One episode per env, stepped together; each a dict of arrays in OGBench's dataset columns."""
    maze = envs[0].unwrapped
    free, vertex = maze_cells(maze.maze_map)
    observations = np.stack([_start_episode(env, kind, free, vertex) for env in envs])
    columns = [{k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")} for _ in envs]
    active, step, explore_directions = list(range(len(envs))), 0, None
    while active:
        if policy is None:
            actions = np.stack([envs[i].action_space.sample() for i in active])
        else:
            if kind == "explore":
                if step % EXPLORE_DIRECTION_STEPS == 0:
                    explore_directions = np.random.randn(len(envs), 2)
                    explore_directions /= np.linalg.norm(explore_directions, axis=1, keepdims=True) + 1e-6
                directions = explore_directions[active]
            else:
                goal_xys = [envs[i].unwrapped.cur_goal_xy for i in active]
                directions = policy.directions(observations[active], goal_xys)
            actions = policy(observations[active], directions)
            actions = np.clip(actions + np.random.normal(0, noise, actions.shape), -1, 1)
        still_active = []
        for i, action in zip(active, actions):
            next_ob, _, terminated, truncated, info = envs[i].step(action)
            done = terminated or truncated
            if info["success"] and kind == "navigate":  # navigate: a new goal whenever one is reached
                envs[i].unwrapped.set_goal(vertex[np.random.randint(len(vertex))])
            for key, value in (("observations", observations[i]), ("actions", action), ("terminals", done),
                               ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
                columns[i][key].append(np.copy(value))
            observations[i] = next_ob
            if not done:
                still_active.append(i)
        active, step = still_active, step + 1
    return [{k: np.asarray(v) for k, v in c.items()} for c in columns]


def _write_generated(name, dataset_dir, columns, train_steps, provenance):
    dtypes = dict(observations=np.float32, actions=np.float32, terminals=bool, qpos=np.float32, qvel=np.float32)
    arrays = {k: np.asarray(v, dtype=dtypes[k]) for k, v in columns.items()}
    train_path, val_path = dataset_paths(name, dataset_dir)
    os.makedirs(os.path.dirname(train_path), exist_ok=True)
    for path, part in ((train_path, slice(0, train_steps)), (val_path, slice(train_steps, None))):
        tmp = path[:-4] + ".partial.npz"   # np.savez appends .npz to other names
        np.savez_compressed(tmp, **{k: v[part] for k, v in arrays.items()})
        os.replace(tmp, path)
    provenance["train_steps"] = int(train_steps)
    provenance["val_steps"] = int(len(arrays["terminals"]) - train_steps)
    write_json(train_path[:-4] + ".json", provenance)


def read_provenance(name, dataset_dir):
    path = dataset_paths(name, dataset_dir)[0][:-4] + ".json"
    return read_json(path) if os.path.exists(path) else None


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description="OGBench datasets for OPSO.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an OGBench-format dataset locally (no internet needed)")
    gen.add_argument("dataset", help=f"dataset name, one of: {', '.join(SUPPORTED_DATASETS)}")
    gen.add_argument("--episodes", type=positive_int, default=None,
                     help="training episodes (default: OGBench's size, e.g. 1000 for navigate, 5000 for stitch)")
    gen.add_argument("--max_steps", type=positive_int, default=None,
                     help="steps per episode (default: 1001 navigate, 201 stitch, 501 explore)")
    gen.add_argument("--noise", type=non_negative_float, default=None,
                     help="std of the Gaussian action noise (default: 0.5; 1.0 for explore)")
    gen.add_argument("--seed", type=int, default=0, help="random seed")
    gen.add_argument("--dataset_dir", default=GENERATED_DATASET_DIR, help="output folder")
    gen.add_argument("--expert", default=None,
                     help="antmaze: the directional ant expert's weights (default: the shipped experts/ant_expert.pth)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    orc = commands.add_parser("oracle", help="success of a dataset recipe's oracle-steered policy on the 5 tasks "
                                             "(pointmaze: the oracle itself; antmaze: the expert; no noise)")
    orc.add_argument("dataset", help="dataset whose environment and recipe to use")
    orc.add_argument("--eval_episodes", type=positive_int, default=20, help="episodes per task")
    orc.add_argument("--seed", type=int, default=0, help="evaluation seed")
    orc.add_argument("--expert", default=None, help="antmaze: expert weights (default: the shipped one)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "oracle":
        return evaluate_oracle(args)
    paths = generate(args.dataset, args.episodes, args.max_steps, args.noise, args.seed, args.dataset_dir,
                     expert_path=args.expert, overwrite=args.overwrite)
    print(f"wrote {paths[0]}, {paths[1]} and {paths[0][:-4]}.json")
    print(f"train with: python offline_trainer.py --dataset {args.dataset} --dataset_dir {args.dataset_dir}")


def evaluate_oracle(args):
    """The ceiling a dataset's recipe sets: its oracle-steered data policy, greedy, on the evaluation tasks."""
    import json
    check_dataset_name(args.dataset)
    env = make_env(args.dataset)
    policy = data_policy(args.dataset, env.unwrapped, args.expert)
    env.close()
    if policy is None:
        raise UserError(f"{args.dataset} has no data policy here (SMOKE data only)")
    result = evaluate(policy, args.dataset, args.eval_episodes, seed=args.seed)
    result.update(policy="oracle" + ("+expert" if policy.expert is not None else ""), dataset=args.dataset,
                  eval_episodes=args.eval_episodes)
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    exit_on_user_error(main)
