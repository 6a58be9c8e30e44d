"""Generated datasets, trajectories, windows and OGBench's goal relabelling conventions."""
import json
import os
import urllib.error

import numpy as np
import ogbench
import pytest

import ogbench_utils
from ogbench_utils import Trajectories, WindowSampler, generate, load_datasets
from utils import UserError
from conftest import TINY_DATASET


def index_of(observations):
    """The dataset index of each observation of `synthetic` data (observation i is i)."""
    return np.asarray(observations)[..., 0].astype(np.int64)


def synthetic(lengths, obs_dim=3):
    total = sum(lengths)
    terminals = np.zeros(total, bool)
    terminals[np.cumsum(lengths) - 1] = True
    obs = np.arange(total, dtype=np.float32)[:, None].repeat(obs_dim, 1)  # observation i is i
    return Trajectories.from_terminals(obs, np.zeros((total, 2), np.float32), terminals)


def test_generated_files_load_with_ogbench_and_have_ogbench_format(tiny_dataset_dir):
    path = os.path.join(tiny_dataset_dir, f"{TINY_DATASET}.npz")
    raw = np.load(path)
    assert raw["observations"].dtype == np.float32 and raw["actions"].dtype == np.float32
    assert raw["terminals"].dtype == bool
    assert raw["observations"].shape == (4 * 60, 2) and raw["qpos"].shape == (240, 2) and raw["qvel"].shape == (240, 2)
    assert raw["terminals"].sum() == 4 and np.all(np.flatnonzero(raw["terminals"]) == np.arange(59, 240, 60))
    assert np.abs(raw["actions"]).max() <= 1.0
    loaded = ogbench.load_dataset(path)
    assert loaded["observations"].shape == (4 * 59, 2)  # OGBench drops each trajectory's last observation
    val = np.load(path.replace(".npz", "-val.npz"))
    assert val["terminals"].sum() == 1
    provenance = json.load(open(path.replace(".npz", ".json")))
    assert provenance["generator"] == "ogbench_utils.py generate" and provenance["episodes"] == 4
    assert provenance["smoke"] is False and provenance["seed"] == 0


def test_stitch_episodes_start_four_cells_from_their_goal(tmp_path):
    generate("pointmaze-medium-stitch-v0", episodes=3, max_steps=30, seed=1, dataset_dir=str(tmp_path), progress=False)
    raw = np.load(tmp_path / "pointmaze-medium-stitch-v0.npz")
    assert raw["terminals"].sum() == 3 and len(raw["terminals"]) == 90


def test_load_datasets_cuts_trajectories_and_keeps_the_first_n(tiny_dataset_dir):
    train, val = load_datasets(TINY_DATASET, tiny_dataset_dir, max_trajectories=3)
    assert train.num_trajectories == 3 and len(train) == 180
    assert list(train.trajectory_lengths()) == [60, 60, 60]
    assert val.num_trajectories == 1


def test_missing_dataset_offline_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")
    monkeypatch.setattr(ogbench, "download_datasets", offline)
    with pytest.raises(UserError, match="python ogbench_utils.py generate pointmaze-medium-navigate-v0"):
        load_datasets(TINY_DATASET, str(tmp_path))
    with pytest.raises(UserError, match="the shipped ant expert steered by the maze's oracle, not the official file"):
        load_datasets("antmaze-medium-navigate-v0", str(tmp_path))
    with pytest.raises(UserError, match="SMOKE set for tests, not a benchmark"):
        load_datasets("humanoidmaze-medium-navigate-v0", str(tmp_path))


def test_unknown_dataset_lists_supported_ones():
    with pytest.raises(UserError, match="antmaze-medium-navigate-v0"):
        load_datasets("antmaze-tiny-navigate-v0", "datasets")


def test_windows_never_cross_a_trajectory_boundary():
    data = synthetic([30, 12, 50, 25])
    sampler = WindowSampler(data, context_length=12, subgoal_steps=5, discount=0.99, seed=0)
    for _ in range(20):
        batch = sampler.sample(64)
        idx = index_of(batch["observations"])
        ends = data.traj_ends[idx]
        assert np.all(ends == ends[:, :1])                            # one trajectory per window
        assert np.all(np.diff(idx, axis=1) == 1)                       # consecutive steps
        future = np.take_along_axis(idx, batch["future_offset"].numpy(), axis=1)
        assert np.all(future <= ends) and np.all(future >= idx)
        valid = batch["future_valid"].numpy()
        assert np.all((future - idx)[valid] <= 5)
        assert np.all(((future - idx) == 5) | (future == ends) | ~valid)


def test_short_trajectories_give_padded_windows_marked_invalid():
    data = synthetic([8, 6, 30])
    sampler = WindowSampler(data, context_length=10, subgoal_steps=3, discount=0.99, seed=0)
    for _ in range(10):
        batch = {k: v.numpy() for k, v in sampler.sample(32).items()}
        assert batch["observations"].shape == (32, 10, 3)
        lengths = batch["step_valid"].sum(1)
        assert set(lengths) <= {8, 6, 10}
        ends = data.traj_ends[index_of(batch["observations"])]
        assert np.all(ends == ends[:, :1])
        assert not np.any(batch["future_valid"] & ~batch["step_valid"])
        assert not np.any(batch["next_valid"] & ~batch["step_valid"])
        short = lengths < 10
        # the last real step of a short window has no next step and no future
        last = lengths[short] - 1
        assert not np.any(batch["next_valid"][short, last])


def test_goal_relabelling_frequencies_match_ogbench():
    data = synthetic([1000] * 60)
    sampler = WindowSampler(data, context_length=10, subgoal_steps=1, discount=0.9, seed=0)
    idx, goals = [], []
    for _ in range(40):
        batch = sampler.sample(128)
        idx.append(index_of(batch["observations"]).ravel())
        goals.append(index_of(batch["value_goals"]).ravel())
    idx, goals = np.concatenate(idx), np.concatenate(goals)
    same_future = (data.traj_ends[goals] == data.traj_ends[idx]) & (goals > idx)
    n = len(idx)
    tolerance = 4 * np.sqrt(0.25 / n) + 0.005  # 4 standard errors, plus random goals landing in the future
    assert abs(np.mean(goals == idx) - 0.2) < tolerance
    assert abs(np.mean(same_future) - 0.5) < tolerance
    assert abs(np.mean(~same_future & (goals != idx)) - 0.3) < tolerance
    offsets = (goals - idx)[same_future & (goals - idx < 200)]
    assert abs(offsets.mean() - 1 / (1 - 0.9)) < 0.5                # geometric offset with p = 1 - discount


def test_rewards_and_masks_follow_the_convention():
    sampler = WindowSampler(synthetic([40, 40]), context_length=10, subgoal_steps=4, discount=0.9, seed=3)
    batch = {k: v.numpy() for k, v in sampler.sample(256).items()}
    success = index_of(batch["value_goals"]) == index_of(batch["observations"])
    assert success.any() and not success.all()
    assert np.array_equal(batch["successes"], success)
    assert np.array_equal(batch["rewards"], success - 1.0)


def test_kstep_return_stops_at_the_goal():
    sampler = WindowSampler(synthetic([40]), context_length=10, subgoal_steps=4, discount=0.9, seed=0)
    batch = {k: v.numpy() for k, v in sampler.sample(512).items()}
    idx = index_of(batch["observations"])
    to_goal = index_of(batch["value_goals"]) - idx
    ahead = np.take_along_axis(idx, batch["future_offset"], 1) - idx
    for case, steps, mask in [(to_goal == 0, 0, 0.0), (to_goal == 2, 2, 0.0)]:
        rows = case & (ahead == 4)
        assert rows.any()
        np.testing.assert_allclose(batch["kstep_returns"][rows], -(1 - 0.9 ** steps) / (1 - 0.9), rtol=1e-6)
        assert np.all(batch["kstep_masks"][rows] == mask)
    far = (to_goal > 4) & (ahead == 4)
    np.testing.assert_allclose(batch["kstep_returns"][far], -(1 - 0.9 ** 4) / 0.1, rtol=1e-6)
    assert np.all(batch["kstep_masks"][far] == 1.0)
    np.testing.assert_allclose(batch["kstep_discounts"], 0.9 ** ahead, rtol=1e-6)


def test_transitions_are_single_steps_with_n_step_returns_toward_their_goals():
    data = synthetic([30, 20, 40])
    sampler = WindowSampler(data, context_length=10, subgoal_steps=4, discount=0.9, seed=0)
    batch = {k: v.numpy() for k, v in sampler.sample_transitions(4096, steps=5).items()}
    idx, ahead = index_of(batch["observations"]), index_of(batch["future_observations"])
    ends = data.traj_ends[idx]
    assert np.all(idx != ends)                                            # never a trajectory's last step
    assert np.array_equal(ahead, np.minimum(idx + 5, ends))              # n steps on, inside the trajectory
    np.testing.assert_allclose(batch["discounts"], 0.9 ** (ahead - idx), rtol=1e-6)
    to_goal = index_of(batch["value_goals"]) - idx
    same = data.traj_ends[index_of(batch["value_goals"])] == ends
    for case, steps in [(to_goal == 0, 0), (same & (to_goal == 3) & (ahead - idx == 5), 3)]:
        assert case.any()
        np.testing.assert_allclose(batch["returns"][case], -(1 - 0.9 ** steps) / 0.1, rtol=1e-6)
        assert np.all(batch["masks"][case] == 0.0)                        # reached: no bootstrap
    far = ~(same & (to_goal >= 0) & (to_goal < ahead - idx))
    np.testing.assert_allclose(batch["returns"][far], -(1 - 0.9 ** (ahead - idx)[far]) / 0.1, rtol=1e-6)
    assert np.all(batch["masks"][far] == 1.0)


def test_transitions_carry_the_action_and_an_inverse_subgoal_uniformly_1_to_n_ahead_in_the_trajectory():
    data = synthetic([300, 200, 400])
    data.actions[:] = np.arange(len(data), dtype=np.float32)[:, None]       # action i is i too
    batch = {k: v.numpy() for k, v in WindowSampler(data, context_length=10, subgoal_steps=4, discount=0.9,
                                                    seed=3).sample_transitions(20000, steps=5).items()}
    idx, subgoal = index_of(batch["observations"]), index_of(batch["inverse_observations"])
    ends = data.traj_ends[idx]
    assert np.array_equal(batch["actions"][:, 0], idx)                        # a_t of the same step
    assert np.all((subgoal > idx) & (subgoal <= np.minimum(idx + 5, ends)))  # 1..n ahead, never past the end
    inside = idx + 5 <= ends
    counts = np.bincount(subgoal[inside] - idx[inside], minlength=6)[1:] / inside.sum()
    assert np.all(np.abs(counts - 0.2) < 4 * np.sqrt(0.2 * 0.8 / inside.sum()))  # uniform over 1..5


def test_transition_goal_frequencies_match_ogbench():
    data = synthetic([1000] * 60)
    batch = WindowSampler(data, context_length=10, subgoal_steps=1, discount=0.9, seed=1).sample_transitions(20000, 1)
    idx, goals = index_of(batch["observations"]), index_of(batch["value_goals"])
    same_future = (data.traj_ends[goals] == data.traj_ends[idx]) & (goals > idx)
    tolerance = 4 * np.sqrt(0.25 / len(idx)) + 0.005
    assert abs(np.mean(goals == idx) - 0.2) < tolerance
    assert abs(np.mean(same_future) - 0.5) < tolerance
    assert abs(np.mean(~same_future & (goals != idx)) - 0.3) < tolerance


def test_actor_goals_are_future_states_of_the_same_trajectory():
    data = synthetic([30, 30, 30])
    batch = WindowSampler(data, 10, 3, 0.99, seed=0).sample(128)
    idx = index_of(batch["observations"])
    goal_idx = batch["actor_goals"].numpy()[..., 0].astype(int)
    ends = data.traj_ends[idx]
    assert np.all((goal_idx >= np.minimum(idx + 1, ends)) & (goal_idx <= ends))


def test_inverse_subgoals_lie_1_to_k_steps_ahead_in_the_same_trajectory():
    data = synthetic([40, 40])
    batch = {k: v.numpy() for k, v in WindowSampler(data, 10, 4, 0.9, seed=2).sample(256).items()}
    idx = index_of(batch["observations"])
    inverse = np.take_along_axis(idx, batch["inverse_offset"], 1)
    valid = batch["future_valid"]
    assert np.all((inverse - idx)[valid] >= 1) and np.all((inverse - idx)[valid] <= 4)
    assert len(np.unique((inverse - idx)[valid])) == 4
    assert np.array_equal(data.traj_ends[inverse], data.traj_ends[idx])


def test_actor_kstep_return_stops_at_the_actor_goal():
    batch = {k: v.numpy() for k, v in WindowSampler(synthetic([40]), 10, 4, 0.9, seed=1).sample(512).items()}
    idx = index_of(batch["observations"])
    to_goal = index_of(batch["actor_goals"]) - idx
    ahead = np.take_along_axis(idx, batch["future_offset"], 1) - idx
    near, far = (to_goal < ahead), (to_goal >= ahead) & (ahead > 0)
    assert near.any() and far.any()
    np.testing.assert_allclose(batch["actor_kstep_returns"][near], -(1 - 0.9 ** to_goal[near]) / 0.1, rtol=1e-5)
    np.testing.assert_allclose(batch["actor_kstep_returns"][far], -(1 - 0.9 ** ahead[far]) / 0.1, rtol=1e-5)
    assert np.all(batch["actor_kstep_masks"][near] == 0) and np.all(batch["actor_kstep_masks"][far] == 1)


def test_generator_command_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ogbench_utils.main(["generate", TINY_DATASET, "--episodes", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err



def test_the_oracle_knows_when_the_agent_is_in_its_goals_cell():
    env = ogbench_utils.make_env("pointmaze-medium-navigate-v0")
    maze = env.unwrapped
    oracle = ogbench_utils.OracleSubgoals(maze)
    goal = np.asarray(maze.ij_to_xy((1, 1)))
    unit = maze._maze_unit
    assert oracle.in_goal_cell(goal + 0.4 * unit, goal)          # OGBench's goal noise stays in the cell
    assert not oracle.in_goal_cell(goal + np.array([unit, 0.0]), goal)
    env.close()
