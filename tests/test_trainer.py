"""The offline trainer end to end on a tiny generated dataset, and its one-line errors."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import offline_trainer
from conftest import TINY_DATASET
from utils import load_checkpoint, read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--dataset", TINY_DATASET, "--context_length", "20", "--d_model", "16", "--latent_dim", "8",
            "--hidden_dim", "32", "--n_layers", "1", "--subgoal_steps", "5", "--batch_size", "4",
            "--num_epochs", "2", "--updates_per_epoch", "3", "--eval_every", "2", "--eval_episodes", "1",
            "--device", "cpu", "--no_progress", "--max_episode_steps", "60"]


def test_offline_trainer_writes_every_output(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir)])
    for name in ("best_model.pth", "last_model.pth", "training_curves.png", "metrics.csv", "config.json"):
        assert (save_dir / name).exists(), name
    metrics = read_csv(save_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and list(metrics["step"]) == [3, 6]
    assert 0.0 <= metrics["eval/success"][-1] <= 1.0
    assert all(math.isfinite(v) for v in metrics["value/loss"])   # from the default --value_steps
    checkpoint = load_checkpoint(save_dir / "last_model.pth")
    assert checkpoint["step"] == 6 and checkpoint["epoch"] == 2
    summary = subprocess.run([sys.executable, "benchmarks/summarize.py", str(save_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60).stdout
    final = metrics["eval/success"][-1]
    assert f"final evaluation {final:.3f}, 6 updates" in summary and "tasks 1-5: " in summary


def run_cli(*args):
    return subprocess.run([sys.executable, "offline_trainer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_unknown_dataset_is_one_line_without_traceback():
    result = run_cli("--dataset", "pointmaze-huge-navigate-v0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown dataset") and "pointmaze-medium-navigate-v0" in result.stderr


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--lr", "-1"), ("--expectile", "1.5"),
                                        ("--critic_steps", "-1")])
def test_impossible_flags_are_argparse_errors(flag, value):
    result = run_cli(flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr and flag in result.stderr


def test_existing_run_is_not_overwritten_silently(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "metrics.csv").write_text("epoch\n1\n")
    (save_dir / "last_model.pth").write_bytes(b"a run's checkpoint")
    result = run_cli(*TINY_RUN, "--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir))
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert (save_dir / "metrics.csv").read_text() == "epoch\n1\n"


@pytest.fixture(scope="module")
def deterministic_run(tiny_dataset_dir, tmp_path_factory):
    """A tiny finished run without noisy candidates: its greedy acting draws no random numbers."""
    save_dir = tmp_path_factory.mktemp("deterministic") / "run"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir),
                                     "--num_noisy_candidates", "0"])
    return save_dir


def test_evaluation_is_reproducible_and_leaves_the_callers_torch_stream_alone(deterministic_run):
    from offline_agent import OfflineAgent
    from ogbench_utils import evaluate
    # wide noisy candidates, so the search's draws change the actions
    agent = OfflineAgent.from_checkpoint(load_checkpoint(deterministic_run / "last_model.pth"),
                                         subgoal_source="proposer", num_noisy_candidates=8, candidate_noise=3.0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluate(agent, TINY_DATASET, 1, seed=5, progress=False, max_episode_steps=60)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    assert evaluate(agent, TINY_DATASET, 1, seed=5, progress=False, max_episode_steps=60) == first


def test_a_run_acting_with_data_subgoals_evaluates_and_keeps_the_setting(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir),
                                     "--subgoal_source", "data", "--data_neighbors", "8"])
    assert np.isfinite(read_csv(save_dir / "metrics.csv")["eval/success"][-1])
    config = load_checkpoint(save_dir / "last_model.pth")["agent_config"]
    assert (config["subgoal_source"], config["data_neighbors"]) == ("data", 8)
    evaluate = ["evaluate", str(save_dir / "last_model.pth"), "--dataset", TINY_DATASET, "--eval_episodes", "1",
                "--max_episode_steps", "60"]
    with_data = offline_trainer.main(evaluate)   # the run's dataset, found through the checkpoint's run_config
    with_proposer = offline_trainer.main(evaluate + ["--subgoal_source", "proposer"])
    with_switch = offline_trainer.main(evaluate + ["--subgoal_source", "switch", "--stall_steps", "5"])
    assert max(r["env_steps"] for r in (with_data, with_proposer, with_switch)) <= 5 * 60   # 5 tasks, one episode each
    assert "subgoal_source" not in with_data and with_proposer["subgoal_source"] == "proposer"
    assert (with_switch["subgoal_source"], with_switch["stall_steps"]) == ("switch", 5)


def test_the_flags_are_the_config_fields_and_evaluate_takes_the_acting_ones():
    from offline_agent import AgentConfig
    from utils import config_from_args, field_names
    train_help = offline_trainer.build_parser().format_help()
    assert all(f"--{name}" in train_help for name in field_names(AgentConfig) + field_names(offline_trainer.OfflineRunConfig))
    evaluate_help = offline_trainer.build_evaluate_parser().format_help()
    assert all(f"--{name}" in evaluate_help for name in field_names(AgentConfig, "acting"))
    assert "--lr" not in evaluate_help and "--subgoal_steps" not in evaluate_help
    defaults = offline_trainer.build_parser().parse_args([])
    assert config_from_args(AgentConfig, defaults, obs_dim=2, action_dim=2) == AgentConfig(obs_dim=2, action_dim=2)
    overrides = offline_trainer.build_evaluate_parser().parse_args(["x.pth", "--dataset", TINY_DATASET])
    assert all(getattr(overrides, name) is None for name in field_names(AgentConfig, "acting"))


def test_diagnose_acting_runs_every_mode_on_a_finished_run_and_draws_its_paths(deterministic_run, tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/diagnose_acting.py", str(deterministic_run / "last_model.pth"),
                             "--dataset", TINY_DATASET, "--eval_episodes", "1", "--max_episode_steps", "20",
                             "--plot_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for mode in ("default", "proposer", "goal", "oracle", "oracle_policy"):
        assert f"{mode:>14}: success " in result.stdout
        assert (tmp_path / f"paths_{mode}.png").stat().st_size > 10_000


def test_diagnose_acting_without_history_acts_on_the_current_observation_alone():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from diagnose_acting import WithoutHistory
    from test_agent import small_agent
    agent = small_agent(num_noisy_candidates=0)
    rng = np.random.default_rng(0)
    goals, last = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)

    def act_after(policy, history):
        actor = policy.make_actor(goals)
        for observation in history:
            actor.act(observation)
        return actor.act(last)

    histories = [rng.normal(size=(4, 3, 2)).astype(np.float32) * 5 for _ in range(2)]
    without = [act_after(WithoutHistory(agent, agent), h) for h in histories]
    assert np.allclose(without[0], without[1])
    with_history = [act_after(agent, h) for h in histories]
    assert not np.allclose(with_history[0], with_history[1])


def test_inverse_finetune_trains_the_inverse_head_alone_and_saves_a_checkpoint_that_acts(deterministic_run,
                                                                                       tiny_dataset_dir, tmp_path):
    from offline_agent import OfflineAgent
    out = tmp_path / "finetuned.pth"
    result = subprocess.run([sys.executable, "benchmarks/experiments/inverse_finetune.py",
                             str(deterministic_run / "last_model.pth"), "--dataset", TINY_DATASET, "--dataset_dir",
                             tiny_dataset_dir, "--steps", "8", "--batch", "64", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "before: action error" in result.stdout and "after 8 steps" in result.stdout
    before = load_checkpoint(deterministic_run / "last_model.pth")
    after = load_checkpoint(out)
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])
    changed = [k for k in before["heads"] if not torch.equal(before["heads"][k], after["heads"][k])]
    assert changed and all(k.startswith("inverse.") for k in changed)
    agent = OfflineAgent.from_checkpoint(after, subgoal_source="proposer")
    assert np.isfinite(agent.make_actor(np.zeros((1, agent.config.obs_dim), np.float32)).act(
        np.zeros((1, agent.config.obs_dim), np.float32))).all()


def test_stall_ends_reports_each_failed_episodes_last_action_against_the_oracles_direction(deterministic_run):
    result = subprocess.run([sys.executable, "benchmarks/experiments/stall_ends.py", str(deterministic_run / "last_model.pth"),
                             "--dataset", TINY_DATASET, "--task", "1", "--episodes", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    success = float(lines[0].rsplit(" ", 1)[1])
    failed = sum(int(line.split(" x ", 1)[0]) for line in lines[1:])
    assert failed == round(2 * (1 - success)) and all("cosine" in line for line in lines[1:])
