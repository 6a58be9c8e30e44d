"""The offline trainer end to end on a tiny generated dataset, and its one-line errors."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import offline_trainer
import ogbench_utils
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
    assert all(math.isfinite(v) for v in metrics["critic_steps/value_loss"])   # the default --critic_steps 1
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


def test_acting_sweep_reproduces_the_final_evaluation_of_a_run(deterministic_run):
    metrics = read_csv(deterministic_run / "metrics.csv")
    tasks = " ".join(f"{metrics[f'eval/task{k}_success'][-1]:.2f}" for k in range(1, 6))
    sweep = subprocess.run([sys.executable, "benchmarks/acting_sweep.py", str(deterministic_run), "--eval_episodes",
                            "1", "--settings", "", "num_interpolations=2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert sweep.returncode == 0, sweep.stderr
    own, interpolated = [line for line in sweep.stdout.splitlines() if line.startswith(" ")]
    assert f"{metrics['eval/success'][-1]:.3f} (tasks {tasks})" in own
    assert "num_interpolations=2" in interpolated
    bad = subprocess.run([sys.executable, "benchmarks/acting_sweep.py", str(deterministic_run), "--settings", "beta=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "'beta' is not an acting setting" in bad.stderr


def test_proposer_finetune_cli_evaluates_before_and_after(deterministic_run):
    cli = subprocess.run([sys.executable, "benchmarks/proposer_finetune.py", str(deterministic_run), "--steps", "2",
                          "--eval_at", "0,2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "after 0 proposer steps" in cli.stdout and "after 2 proposer steps" in cli.stdout


def test_data_subgoals_cli_ranks_by_value_or_q(deterministic_run):
    """Both scorings run on a finished run (all its 48 kept states are neighbours here)."""
    for extra, expected in ((["--score", "value"], "success "), (["--score", "q", "--with_proposal"], "success ")):
        cli = subprocess.run([sys.executable, "benchmarks/data_subgoals.py", str(deterministic_run), "--neighbors", "64",
                              "--eval_episodes", "1", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "data subgoals (64 neighbours, stride 5" in cli.stdout and expected in cli.stdout
    bad = subprocess.run([sys.executable, "benchmarks/data_subgoals.py", str(deterministic_run), "--with_proposal"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "pass --score q" in bad.stderr


def test_proposer_phase_ends_the_time_budget_with_proposer_only_epochs(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    budget_min, phase_min = 0.06, 0.03
    schedule = ["--num_epochs", "10000", "--updates_per_epoch", "20", "--eval_every", "10000",
                "--time_budget", str(budget_min), "--proposer_phase", str(phase_min)]
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir)] + schedule)
    m = read_csv(save_dir / "metrics.csv")
    joint = np.isfinite(m["critic/loss"])
    first_phase = int(np.argmin(joint))
    assert joint[0] and not joint[-1] and joint[:first_phase].all() and not joint[first_phase:].any()
    # an epoch is proposer-only once the time before it reached budget - phase, and the run stops at the budget
    elapsed_before = np.concatenate([[0.0], m["time/elapsed_s"][:-1]])
    assert (elapsed_before[first_phase:] >= (budget_min - phase_min) * 60).all()
    assert (elapsed_before[:first_phase] < (budget_min - phase_min) * 60).all()
    assert m["time/elapsed_s"][-1] >= budget_min * 60 and elapsed_before[-1] < budget_min * 60
    assert (m["step"][first_phase:] == m["step"][first_phase - 1]).all()          # no joint update in the phase
    assert list(m["proposer_steps"][first_phase:]) == [20 * (i + 1) for i in range(len(m["step"]) - first_phase)]
    assert np.isfinite(m["proposer/loss"]).all() and np.isfinite(m["eval/success"][-1])
    checkpoint = load_checkpoint(save_dir / "last_model.pth")
    assert checkpoint["proposer_steps"] == m["proposer_steps"][-1]
    summary = subprocess.run([sys.executable, "benchmarks/summarize.py", str(save_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60).stdout
    assert f"{int(m['step'][-1])} updates + {int(m['proposer_steps'][-1])} proposer steps" in summary
    # resuming a spent budget runs one more proposer-only epoch and carries the count on
    offline_trainer.main(TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir), "--resume"]
                         + schedule)
    resumed = read_csv(save_dir / "metrics.csv")
    assert len(resumed["epoch"]) == len(m["epoch"]) + 1 and resumed["proposer_steps"][-1] == m["proposer_steps"][-1] + 20
    assert resumed["step"][-1] == m["step"][-1]


def test_proposer_phase_needs_a_longer_time_budget():
    for extra in (["--proposer_phase", "1"], ["--proposer_phase", "2", "--time_budget", "2"]):
        result = run_cli(*extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: --proposer_phase") and "--time_budget" in result.stderr


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
    with_data = ogbench_utils.main(evaluate)   # the run's dataset, found through the checkpoint's run_config
    with_proposer = ogbench_utils.main(evaluate + ["--subgoal_source", "proposer"])
    with_switch = ogbench_utils.main(evaluate + ["--subgoal_source", "switch", "--stall_steps", "5"])
    assert max(r["env_steps"] for r in (with_data, with_proposer, with_switch)) <= 5 * 60   # 5 tasks, one episode each
    assert "subgoal_source" not in with_data and with_proposer["subgoal_source"] == "proposer"
    assert (with_switch["subgoal_source"], with_switch["stall_steps"]) == ("switch", 5)
