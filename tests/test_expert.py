"""The directional ant expert: SAC's pieces, the shipped weights, and antmaze data generated with them."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import expert
import ogbench_utils
from ogbench_utils import generate, load_datasets
from utils import UserError, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_sac(seed=0):
    torch.manual_seed(seed)
    return expert.SAC(expert.SACConfig(obs_dim=5, action_dim=2, hidden_dim=32, lr=1e-3))


def fixed_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(observations=torch.randn(n, 5, generator=g), actions=torch.rand(n, 2, generator=g) * 2 - 1,
                rewards=torch.randn(n, generator=g), masks=torch.ones(n),
                next_observations=torch.randn(n, 5, generator=g))


def test_squashed_gaussian_log_prob_matches_a_change_of_variables_reference():
    actor = expert.Actor(expert.SACConfig(obs_dim=3, action_dim=2, hidden_dim=16))
    torch.manual_seed(0)
    obs = torch.randn(200, 3)
    actions, log_probs = actor.sample(obs)
    mean, log_std = actor(obs)
    pre_tanh = torch.atanh(actions.double().clamp(-1 + 1e-12, 1 - 1e-12))
    reference = (torch.distributions.Normal(mean.double(), log_std.double().exp()).log_prob(pre_tanh)
                 - torch.log1p(-actions.double().square())).sum(-1)
    torch.testing.assert_close(log_probs.double(), reference, atol=1e-3, rtol=1e-4)
    assert actions.abs().max() < 1


def test_actor_starts_near_zero_with_ogbench_small_final_layer():
    actor = expert.Actor(expert.SACConfig())
    mean, _ = actor(torch.randn(100, 29))
    assert mean.abs().max() < 0.1


def test_sac_update_lowers_the_critic_loss_on_a_fixed_batch():
    sac, batch = small_sac(), fixed_batch()
    first = sac.critic_loss(batch)[0].item()
    for _ in range(200):
        sac.update(batch)
    assert sac.critic_loss(batch)[0].item() < 0.5 * first


def test_sac_actor_loss_leaves_the_critic_untouched():
    sac, batch = small_sac(), fixed_batch()
    loss, _ = sac.actor_and_alpha_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in sac.critic.parameters())
    assert all(p.grad is not None for p in sac.actor.parameters()) and sac.log_alpha.grad is not None


def test_temperature_falls_when_the_entropy_is_above_its_target():
    sac, batch = small_sac(), fixed_batch()
    _, info = sac.actor_and_alpha_loss(batch)
    assert info["actor/entropy"] > sac.target_entropy   # a fresh wide Gaussian
    sac.update(batch)
    assert sac.log_alpha.item() < 0


def test_shipped_expert_loads_and_acts_deterministically_in_range():
    policy = expert.load_expert()
    inputs = np.random.default_rng(0).normal(size=(7, 29)).astype(np.float32)
    actions = policy(inputs)
    assert actions.shape == (7, 8) and np.all(np.abs(actions) <= 1)
    np.testing.assert_array_equal(actions, policy(inputs))
    side = json.load(open(expert.DEFAULT_EXPERT[:-4] + ".json"))
    assert side["sha256"] == policy.sha256() and side["steps"] > 0 and "command" in side


def test_missing_or_foreign_expert_file_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="ant expert file .* does not exist"):
        expert.load_expert(str(tmp_path / "nope.pth"))
    foreign = tmp_path / "foreign.pth"
    save_checkpoint({"format": "opso-checkpoint-v1"}, foreign)
    with pytest.raises(UserError, match="is not an ant expert file"):
        expert.load_expert(str(foreign))
    result = subprocess.run([sys.executable, "ogbench_utils.py", "generate", "antmaze-medium-navigate-v0",
                             "--episodes", "1", "--dataset_dir", str(tmp_path / "d"), "--expert", str(foreign)],
                            cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "is not an ant expert file" in result.stderr


def cells_visited(observations, maze):
    return {maze.xy_to_ij(xy) for xy in observations[:, :2]}


def test_antmaze_generated_with_the_expert_moves_through_the_maze(tmp_path):
    generate("antmaze-medium-navigate-v0", episodes=2, max_steps=200, seed=0, dataset_dir=str(tmp_path),
             progress=False)
    import ogbench
    data = ogbench.load_dataset(str(tmp_path / "antmaze-medium-navigate-v0.npz"))
    assert data["observations"].shape[1] == 29 and data["actions"].shape[1] == 8
    provenance = json.load(open(tmp_path / "antmaze-medium-navigate-v0.json"))
    assert provenance["smoke"] is False and provenance["expert_sha256"] == expert.load_expert().sha256()
    train, _ = load_datasets("antmaze-medium-navigate-v0", str(tmp_path))
    env = ogbench_utils.make_env("antmaze-medium-navigate-v0")
    maze = env.unwrapped
    expert_cells = [len(cells_visited(train.observations[train.traj_ends == end], maze))
                    for end in np.unique(train.traj_ends)]
    # the same episodes with random actions stay in their start cell or next to it
    random_cells = []
    for seed in range(2):
        ob, _ = env.reset(seed=seed)
        obs = [ob]
        env.action_space.seed(seed)
        for _ in range(200):
            obs.append(env.step(env.action_space.sample())[0])
        random_cells.append(len(cells_visited(np.asarray(obs), maze)))
    env.close()
    assert min(expert_cells) >= 3 and max(random_cells) <= 2, (expert_cells, random_cells)


def test_humanoid_smoke_dataset_has_the_real_sizes_and_says_it_is_smoke(tmp_path):
    generate("humanoidmaze-medium-navigate-v0", episodes=2, max_steps=15, seed=0, dataset_dir=str(tmp_path),
             progress=False)
    train, val = load_datasets("humanoidmaze-medium-navigate-v0", str(tmp_path))
    env = ogbench_utils.make_env("humanoidmaze-medium-navigate-v0")
    sizes = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    assert train.observations.shape == (30, sizes[0]) and train.actions.shape == (30, sizes[1])
    assert val.num_trajectories == 1
    provenance = json.load(open(tmp_path / "humanoidmaze-medium-navigate-v0.json"))
    assert provenance["smoke"] is True and "SMOKE" in provenance["recipe"]


def test_expert_training_runs_logs_and_resumes_to_the_same_weights(tmp_path):
    common = ["train", "--steps", "60", "--seed_steps", "40", "--log_every", "30", "--eval_episodes", "1",
              "--no_progress", "--threads", "1"]
    straight, split = tmp_path / "a", tmp_path / "b"
    expert.main(common + ["--save_dir", str(straight), "--out", str(straight / "x.pth")])
    expert.main(["train", "--steps", "30", "--seed_steps", "40", "--log_every", "30", "--eval_episodes", "1",
                 "--no_progress", "--threads", "1", "--save_dir", str(split), "--out", str(split / "x.pth")])
    expert.main(common + ["--save_dir", str(split), "--out", str(split / "x.pth"), "--resume"])
    a, b = (torch.load(d / "x.pth", weights_only=True)["actor"] for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (straight / "expert_metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,episodes,train/episode_return")
    assert math.isfinite(float(rows[2].split(",")[3]))   # critic loss logged once updates ran
