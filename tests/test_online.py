"""Online fine-tuning: schedules, exploration, the replay buffer, and an end-to-end run."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import offline_trainer
import online_trainer
from conftest import TINY_DATASET
from ogbench_utils import Trajectories, WindowSampler
from online_agent import OnlineAgent, exploration_schedule, goal_biased_subgoals, online_fraction_of_batch
from offline_agent import AgentConfig
from test_trainer import ROOT, TINY_RUN
from utils import CHECKPOINT_FORMAT, load_checkpoint, read_csv

SCHEDULE = dict(epsilon_start=0.3, epsilon_end=0.05, action_noise_start=0.2, action_noise_end=0.05)


def test_schedules_hit_their_start_and_end_values():
    assert exploration_schedule(SCHEDULE, 0, 300) == pytest.approx((0.3, 0.2))
    assert exploration_schedule(SCHEDULE, 299, 300) == pytest.approx((0.05, 0.05))
    epsilon, noise = exploration_schedule(SCHEDULE, 150, 301)
    assert epsilon == pytest.approx(0.175) and noise == pytest.approx(0.125)


def small_online_agent(subgoal_source="proposer"):
    torch.manual_seed(0)
    return OnlineAgent(AgentConfig(obs_dim=2, action_dim=2, latent_dim=8, d_model=16, n_layers=1, hidden_dim=32,
                                   context_length=8, subgoal_steps=2, subgoal_source=subgoal_source,
                                   data_neighbors=4, mamba_backend="torch"))


def test_epsilon_one_follows_the_goal_biased_rule():
    origin, z_goal, greedy = torch.zeros(500, 8), torch.ones(500, 8), torch.full((500, 8), 7.0)
    subgoal, explored = goal_biased_subgoals(origin, z_goal, 1.0, greedy)
    assert explored.all()
    alpha = subgoal[:, 0]
    assert torch.allclose(subgoal, alpha[:, None].expand(-1, 8))        # on the segment from the origin to z_g
    assert alpha.min() >= 0.2 and alpha.max() <= 1.0 and alpha.std() > 0.1
    subgoal, explored = goal_biased_subgoals(origin, z_goal, 0.0, greedy)
    assert not explored.any() and torch.equal(subgoal, greedy)


def test_exploration_interpolates_from_the_agents_point_in_the_subgoals_space():
    agent = small_online_agent()
    observations = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    explorer = agent.make_explorer(observations + 1, epsilon=1.0, action_noise=0.0)
    with torch.no_grad():
        obs = torch.as_tensor(observations)
        origin = agent.encoder.encode_goals(obs)
        subgoal = explorer.subgoal(torch.randn(300, 8), origin, obs)
        alpha = ((subgoal - origin) / (explorer.z_goal - origin))
    torch.testing.assert_close(alpha, alpha[:, :1].expand(-1, 8), rtol=1e-3, atol=1e-3)
    assert explorer.explored_steps == 300


def test_exploring_actions_are_in_range():
    agent = small_online_agent()
    goals = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    actor = agent.make_explorer(goals, epsilon=0.5, action_noise=5.0)
    for _ in range(5):
        actions = actor.act(goals * 3)
        assert actions.shape == (6, 2) and np.all(np.abs(actions) <= 1.0)


@pytest.mark.parametrize("source", ["data", "switch"])
def test_greedy_exploring_steps_with_data_subgoals_follow_the_data_table(source):
    agent = small_online_agent(source)
    rng = np.random.default_rng(1)
    data = Trajectories.from_terminals(rng.normal(size=(40, 2)), np.zeros((40, 2)), np.arange(40) % 10 == 9)
    agent.set_subgoal_data(data)
    goals, observations = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    explorer, greedy = agent.make_explorer(goals, epsilon=0.0, action_noise=0.0), agent.make_actor(goals)
    for _ in range(3):
        np.testing.assert_allclose(explorer.act(observations), greedy.act(observations), rtol=1e-5, atol=1e-6)


def test_replay_buffer_windows_never_cross_episodes():
    data = Trajectories.empty(2, 2)
    for length in (5, 30, 12, 40):
        obs = np.random.default_rng(length).normal(size=(length, 2))
        reached = np.zeros(length, bool)
        reached[-1] = length != 30
        data.append(obs, np.zeros((length, 2)), np.ones(2), reached)
    sampler = WindowSampler(data, 10, 3, 0.99, seed=0, commanded_goal_prob=0.5)
    index_of = {tuple(o): i for i, o in enumerate(data.observations)}   # random observations: each is unique
    for _ in range(20):
        batch = {k: v.numpy() for k, v in sampler.sample(16).items()}
        indices = np.array([[index_of[tuple(o)] for o in window] for window in batch["observations"]])
        ends = data.traj_ends[indices]
        assert np.all(ends == ends[:, :1])
        commanded = (batch["value_goals"] == 1.0).all(-1)                  # the commanded goal is (1, 1)
        assert commanded.any()
        # commanded goals: success is the environment's own flag
        np.testing.assert_array_equal(batch["successes"][commanded], data.reached[indices][commanded])


def test_online_transitions_toward_commanded_goals_stop_where_the_environment_reported_success():
    data = Trajectories.empty(2, 2)
    start = 0
    for length, reached_at in ((20, 7), (15, None)):
        obs = np.arange(start, start + length, dtype=np.float32)[:, None].repeat(2, 1)   # observation i is i
        reached = np.zeros(length, bool)
        if reached_at is not None:
            reached[reached_at:] = True
        data.append(obs, np.zeros((length, 2)), np.full(2, -1.0), reached)
        start += length
    batch = {k: v.numpy() for k, v in WindowSampler(data, 10, 3, 0.9, seed=0, commanded_goal_prob=1.0)
             .sample_transitions(512, steps=4).items()}
    idx = batch["observations"][:, 0].astype(int)
    assert np.all(batch["value_goals"] == -1.0)                          # every goal is the commanded one
    to_success = np.where(idx < 20, np.maximum(7 - idx, 0), 10**6)       # steps until the env said success
    ahead = batch["future_observations"][:, 0].astype(int) - idx
    reached = to_success < ahead
    assert reached.any() and (~reached).any()
    np.testing.assert_array_equal(batch["masks"], (~reached).astype(np.float32))
    np.testing.assert_allclose(batch["returns"], -(1 - 0.9 ** np.minimum(to_success, ahead)) / 0.1, rtol=1e-6)


def test_mixed_transitions_take_the_online_share_from_the_online_buffer():
    offline = Trajectories.from_terminals(np.zeros((50, 2), np.float32), np.zeros((50, 2), np.float32),
                                          np.arange(50) % 10 == 9)
    online = Trajectories.empty(2, 2)
    online.append(np.ones((30, 2)), np.zeros((30, 2)), np.ones(2), np.zeros(30, bool))
    samplers = [WindowSampler(d, 10, 3, 0.99, seed=0) for d in (offline, online)]
    batch, n_online = online_trainer.mixed_batch(*samplers, 8, 0.5, "sample_transitions", steps=3)
    assert n_online == 4
    np.testing.assert_array_equal(batch["observations"][:, 0].numpy(), [0, 0, 0, 0, 1, 1, 1, 1])


def test_online_share_of_the_batch():
    assert online_fraction_of_batch(8, 0.5, 0) == 0
    assert online_fraction_of_batch(8, 0.5, 100) == 4
    assert online_fraction_of_batch(8, 1.0, 100) == 8


def test_online_run_loads_the_offline_checkpoint_and_writes_every_output(tiny_dataset_dir, tmp_path):
    offline_dir = tmp_path / "offline"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(offline_dir)])
    online_dir = tmp_path / "online"
    online_trainer.main(["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir,
                         "--checkpoint", str(offline_dir / "best_model.pth"), "--save_dir", str(online_dir),
                         "--max_episodes", "2", "--updates_per_episode", "2", "--batch_size", "2",
                         "--eval_every", "2", "--eval_episodes", "1", "--device", "cpu", "--no_progress", "--max_episode_steps", "60"])
    for name in online_trainer.RUN_FILES:
        assert (online_dir / name).exists(), name
    metrics = read_csv(online_dir / "online_metrics.csv")
    assert list(metrics["episode"]) == [0, 1, 2]
    assert metrics["exploration/epsilon"][1] == pytest.approx(0.3)
    assert metrics["exploration/epsilon"][2] == pytest.approx(0.05)
    assert np.isfinite(metrics["eval/success"][[0, 2]]).all()
    offline_step = load_checkpoint(offline_dir / "best_model.pth")["step"]
    last = load_checkpoint(online_dir / "last_online_model.pth")
    assert last["step"] == offline_step + 4 and last["phase"] == "online"


def test_an_online_run_from_before_the_low_level_flag_resumes_training_it(tiny_dataset_dir, tmp_path):
    offline_dir = tmp_path / "offline"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(offline_dir)])
    online_dir = tmp_path / "online"
    common = ["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir, "--save_dir", str(online_dir)]
    online_trainer.main(common + ["--checkpoint", str(offline_dir / "best_model.pth"), "--max_episodes", "1",
                                  "--updates_per_episode", "1", "--batch_size", "2", "--eval_every", "1",
                                  "--eval_episodes", "1", "--no_progress", "--max_episode_steps", "40"])
    last = online_dir / "last_online_model.pth"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["run_config"]["online_low_level"]          # as saved before the flag existed
    torch.save(checkpoint, last)
    args, _, _ = online_trainer.parse_run(common + ["--resume"])
    assert args.online_low_level == "train"


def test_a_frozen_low_level_keeps_the_checkpoints_encoder_and_inverse_dynamics_through_a_resume(
        tiny_dataset_dir, tmp_path, monkeypatch):
    offline_dir = tmp_path / "offline"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(offline_dir)])
    online_dir = tmp_path / "online"
    run = ["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir, "--save_dir", str(online_dir),
           "--checkpoint", str(offline_dir / "best_model.pth"), "--updates_per_episode", "2", "--batch_size", "2",
           "--eval_every", "2", "--eval_episodes", "1", "--no_progress", "--max_episode_steps", "40",
           "--max_episodes", "4"]                               # the default low level: frozen
    run_episode, calls = online_trainer.run_episode, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt      # killed during the third episode: the rest runs after a resume
        return run_episode(*args, **kwargs)
    monkeypatch.setattr(online_trainer, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        online_trainer.main(run)
    monkeypatch.setattr(online_trainer, "run_episode", run_episode)
    online_trainer.main(run + ["--resume"])
    start = load_checkpoint(offline_dir / "best_model.pth")
    end = load_checkpoint(online_dir / "last_online_model.pth")
    assert end["episode"] == 4 and end["step"] == start["step"] + 8
    for name, tensor in start["encoder"].items():
        torch.testing.assert_close(end["encoder"][name], tensor, rtol=0, atol=0, msg=name)
    frozen = [name for name in start["heads"] if name.startswith("inverse.")]
    assert frozen
    for name in frozen:
        torch.testing.assert_close(end["heads"][name], start["heads"][name], rtol=0, atol=0, msg=name)
    for head in ("value.", "q1.", "proposer."):        # the high level learns
        assert any(not torch.equal(end["heads"][n], start["heads"][n]) for n in start["heads"] if n.startswith(head))


def test_checkpoint_for_another_environment_is_refused(tiny_dataset_dir, tmp_path):
    agent = OnlineAgent(AgentConfig(obs_dim=29, action_dim=8, latent_dim=8, d_model=16, n_layers=1, hidden_dim=32))
    from utils import save_checkpoint, UserError
    save_checkpoint(agent.state_dict(), tmp_path / "ant.pth")
    with pytest.raises(UserError, match="observations of size 29"):
        online_trainer.main(["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir,
                             "--checkpoint", str(tmp_path / "ant.pth"), "--save_dir", str(tmp_path / "o")])


def test_epsilon_end_above_start_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        online_trainer.main(["--epsilon_start", "0.1", "--epsilon_end", "0.2"])
    assert "--epsilon_end" in capsys.readouterr().err


@pytest.mark.parametrize("low_level", ["frozen", "train"])
def test_online_resume_matches_an_uninterrupted_run(tiny_dataset_dir, tmp_path, monkeypatch, low_level):
    offline_dir = tmp_path / "offline"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(offline_dir)])
    common = ["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir, "--checkpoint",
              str(offline_dir / "best_model.pth"), "--updates_per_episode", "2", "--batch_size", "2",
              "--eval_every", "2", "--eval_episodes", "1", "--device", "cpu", "--no_progress",
              "--max_episode_steps", "40", "--max_episodes", "4", "--online_low_level", low_level]
    online_trainer.main(common + ["--save_dir", str(tmp_path / "straight")])

    run_episode = online_trainer.run_episode
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt      # killed during the third episode
        return run_episode(*args, **kwargs)
    monkeypatch.setattr(online_trainer, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        online_trainer.main(common + ["--save_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(online_trainer, "run_episode", run_episode)
    online_trainer.main(common + ["--save_dir", str(tmp_path / "resumed"), "--resume"])
    straight = read_csv(tmp_path / "straight" / "online_metrics.csv")
    resumed = read_csv(tmp_path / "resumed" / "online_metrics.csv")
    assert list(resumed["episode"]) == [0, 1, 2, 3, 4]
    for key in straight:
        if not key.startswith("time/"):
            np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


def test_summary_reports_the_mean_of_the_last_evaluations_the_dip_and_the_gain_over_a_control(tmp_path):
    """Two hand-made online runs: evaluations 0.50 -> 0.30 0.60 0.70 0.80 and 0.20 -> 0.25 0.10 0.40 0.40; their
    controls end on 0.60 0.60 0.60 and 0.40 0.50 0.60."""
    runs = write_online_runs(tmp_path, "online", [(0.5, 0.3, 0.6, 0.7, 0.8), (0.2, 0.25, 0.1, 0.4, 0.4)])
    controls = write_online_runs(tmp_path, "control", [(0.5, 0.6, 0.6, 0.6, 0.6), (0.2, 0.3, 0.4, 0.5, 0.6)])
    out = subprocess.run([sys.executable, "benchmarks/summarize.py", *runs, "--last", "3", "--control", *controls],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "mean of the last 3 0.700; dip -0.200" in out            # (0.6 + 0.7 + 0.8) / 3; 0.3 - 0.5
    assert "mean of the last 3 0.300; dip -0.100" in out            # (0.1 + 0.4 + 0.4) / 3; 0.1 - 0.2
    assert "change from the first: 0.150 +/- 0.071; worst dip -0.200" in out   # 0.2 and 0.1
    assert "mean of the last 3): +0.100 -0.200; -0.050 +/- 0.212" in out       # 0.7 - 0.6; 0.3 - 0.5
    mismatched = subprocess.run([sys.executable, "benchmarks/summarize.py", *runs, "--control", controls[0]],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert mismatched.returncode == 2 and "--control takes one run per run above" in mismatched.stderr


def test_summary_per_task_reads_the_tasks_in_turn_per_block_of_episodes(tmp_path):
    """Episodes 1-10 aim at tasks 1-5, 1-5; only task 3's two episodes and task 5's second one succeed. Evaluations
    at episodes 0, 5 and 10, task t scoring t / 10, then t / 5, then 0."""
    run = tmp_path / "online-seed0"
    run.mkdir()
    tasks = ",".join(f"eval/task{t}_success" for t in range(1, 6))
    rows = [f"episode,step,online/success,eval/success,{tasks},time/elapsed_s"]
    for episode in range(11):
        success = "" if episode == 0 else int((episode - 1) % 5 + 1 == 3 or episode == 10)
        scores = {0: [t / 10 for t in range(1, 6)], 5: [t / 5 for t in range(1, 6)], 10: [0.0] * 5}.get(episode)
        evaluation = f"{np.mean(scores)},{','.join(map(str, scores))}" if scores else "," * 5
        rows.append(f"{episode},{10 * episode},{success},{evaluation},{episode}")
    (run / "online_metrics.csv").write_text("\n".join(rows) + "\n")
    out = subprocess.run([sys.executable, "benchmarks/summarize.py", str(run), "--per_task", "5", "--last", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "per 5 episodes: 1-5: 0.00 0.00 1.00 0.00 0.00; 6-10: 0.00 0.00 1.00 0.00 1.00" in out
    assert "tasks 1-5, mean of the last 2 evaluations: 0.10 0.20 0.30 0.40 0.50" in out   # (t / 5 + 0) / 2
    (run / "config.json").write_text('{"goal_source": "random"}')
    out = subprocess.run([sys.executable, "benchmarks/summarize.py", str(run), "--per_task", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "not read, this run's goals are --goal_source random" in out and "per 5 episodes" not in out


def write_online_runs(tmp_path, name, evaluations_per_seed):
    """online_metrics.csv folders with these greedy evaluations, an episode without one between each two."""
    runs = []
    for seed, evaluations in enumerate(evaluations_per_seed):
        run = tmp_path / f"{name}-seed{seed}"
        run.mkdir()
        rows = ["episode,step,eval/success,time/elapsed_s"]
        for i, success in enumerate(evaluations):
            rows += [f"{2 * i - 1},{20 * i - 10},,{i}"] * (i > 0) + [f"{2 * i},{20 * i},{success},{i}"]
        (run / "online_metrics.csv").write_text("\n".join(rows) + "\n")
        runs.append(str(run))
    return runs


def test_action_magnitudes_reads_blocks_of_episodes_without_their_padding_rows(tiny_dataset_dir, tmp_path):
    """Three hand-made episodes of 3, 2 and 4 executed actions, |a| 1.0, 0.5 and 0.25, each with its padding row."""
    actions, ends = [], []
    for value, length in ((1.0, 3), (0.5, 2), (0.25, 4)):
        ends += [len(ends) + length] * (length + 1)
        actions += [[value, -value]] * length + [[0.0, 0.0]]
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "online_buffer": {"actions": torch.tensor(actions),
                                                               "traj_ends": torch.tensor(ends)}},
               run / "last_online_model.pth")
    out = subprocess.run([sys.executable, "benchmarks/action_magnitudes.py", str(run), "--dataset", TINY_DATASET,
                          "--dataset_dir", tiny_dataset_dir, "--block", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "episodes 1-2: mean |a| 0.800, share of numbers with |a| > 0.95: 0.600" in out   # (3 x 1 + 2 x 0.5) / 5
    assert "episodes 3-3: mean |a| 0.250, share of numbers with |a| > 0.95: 0.000" in out
