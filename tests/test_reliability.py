"""Bad input, interrupted runs, resume, non-finite losses and determinism (issue: reliability)."""
import os
import random
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import offline_trainer
from conftest import TINY_DATASET
from ogbench_utils import load_datasets
from test_trainer import ROOT, TINY_RUN, run_cli
from utils import UserError, load_checkpoint, read_csv

LOSS_KEYS = ("critic/loss", "value/loss", "infonce/loss", "inverse/loss", "eval/success")


def tiny(tiny_dataset_dir, save_dir, *extra):
    return TINY_RUN + ["--dataset_dir", tiny_dataset_dir, "--save_dir", str(save_dir), *extra]


def copy_dataset(tiny_dataset_dir, target):
    target.mkdir(exist_ok=True)
    for suffix in (".npz", "-val.npz"):
        source = os.path.join(tiny_dataset_dir, TINY_DATASET + suffix)
        (target / (TINY_DATASET + suffix)).write_bytes(open(source, "rb").read())
    return target


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_key"])
def test_corrupt_dataset_is_a_clear_error(tiny_dataset_dir, tmp_path, damage):
    directory = copy_dataset(tiny_dataset_dir, tmp_path / "data")
    path = directory / f"{TINY_DATASET}.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:
        raw = dict(np.load(path))
        del raw["terminals"]
        np.savez(path, **raw)
    with pytest.raises(UserError, match="corrupt or incomplete"):
        load_datasets(TINY_DATASET, str(directory))


def test_corrupt_dataset_through_the_cli_has_no_traceback(tiny_dataset_dir, tmp_path):
    directory = copy_dataset(tiny_dataset_dir, tmp_path / "data")
    (directory / f"{TINY_DATASET}.npz").write_bytes(b"garbage")
    result = run_cli("--dataset", TINY_DATASET, "--dataset_dir", str(directory), "--save_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "corrupt" in result.stderr


def test_trajectories_shorter_than_the_context_still_train(tiny_dataset_dir, tmp_path):
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "run", "--context_length", "200", "--num_epochs", "1",
                              "--eval_every", "1"))
    assert (tmp_path / "run" / "last_model.pth").exists()


@pytest.mark.parametrize("content,message", [(b"junk", "not a readable checkpoint"), (None, "does not exist")])
def test_bad_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "model.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_a_torch_file_that_is_not_an_opso_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not an OPSO checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_loading_does_not_execute_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    torch.save({"format": "opso-checkpoint-v1", "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_resume_continues_exactly(tiny_dataset_dir, tmp_path):
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "straight", "--num_epochs", "4", "--eval_every", "2"))
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "resumed", "--num_epochs", "2", "--eval_every", "2"))
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "resumed", "--num_epochs", "4", "--eval_every", "2",
                              "--resume"))
    straight, resumed = read_csv(tmp_path / "straight/metrics.csv"), read_csv(tmp_path / "resumed/metrics.csv")
    assert list(resumed["epoch"]) == [1, 2, 3, 4] and list(resumed["step"]) == list(straight["step"])
    for key in LOSS_KEYS:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


def test_resume_drops_rows_newer_than_the_checkpoint(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "2"))
    with open(save_dir / "metrics.csv") as f:
        lines = f.readlines()
    with open(save_dir / "metrics.csv", "a") as f:
        f.write(lines[-1].replace("2,6,", "3,9,", 1))   # a row whose checkpoint never landed
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "3", "--resume"))
    assert list(read_csv(save_dir / "metrics.csv")["epoch"]) == [1, 2, 3]


def test_same_seed_same_metrics_bit_for_bit(tiny_dataset_dir, tmp_path):
    for name in ("a", "b"):
        offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / name))
    first, second = read_csv(tmp_path / "a/metrics.csv"), read_csv(tmp_path / "b/metrics.csv")
    for key in first:
        if not key.startswith("time/"):
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_non_finite_loss_stops_with_the_loss_and_step(tiny_dataset_dir, tmp_path, monkeypatch):
    from offline_agent import OfflineAgent
    update = OfflineAgent.update

    def poisoned(self, *args):
        info = update(self, *args)
        if self.step == 5:
            info["critic/loss"] = float("nan")
        return info
    monkeypatch.setattr(OfflineAgent, "update", poisoned)
    save_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite critic/loss \(nan\) at step 5"):
        offline_trainer.main(tiny(tiny_dataset_dir, save_dir))
    assert load_checkpoint(save_dir / "last_model.pth")["step"] == 3   # epoch 1's checkpoint survives


@pytest.mark.slow
def logged_rows(path):
    """Complete rows of a metrics file (a line still being written has no newline yet)."""
    return path.read_text().count("\n") - 1 if path.exists() else 0


def test_killing_a_run_at_random_moments_leaves_loadable_checkpoints(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    command = [sys.executable, "offline_trainer.py", *tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1000",
                                                         "--updates_per_epoch", "1", "--eval_every", "3")]
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):
        extra = ["--resume"] if (save_dir / "last_model.pth").exists() else ["--overwrite"]
        rows = logged_rows(save_dir / "metrics.csv")
        process = subprocess.Popen(command + extra, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # however slow the machine, kill while it trains and saves: after a new row, within the next epochs
        deadline = time.monotonic() + 300
        while logged_rows(save_dir / "metrics.csv") <= rows:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before an epoch"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        for name in ("last_model.pth", "best_model.pth"):
            if (save_dir / name).exists():
                load_checkpoint(save_dir / name)
        metrics = read_csv(save_dir / "metrics.csv") if (save_dir / "metrics.csv").exists() else {"epoch": []}
        epochs = list(metrics["epoch"])
        assert epochs == list(range(1, len(epochs) + 1))            # no duplicated or missing rows
    assert kills == 6 and (save_dir / "last_model.pth").exists()


def test_generator_and_online_trainer_reject_unknown_datasets(tmp_path):
    import ogbench_utils
    import online_trainer
    with pytest.raises(UserError, match="unknown dataset"):
        ogbench_utils.main(["generate", "pointmaze-huge-navigate-v0", "--dataset_dir", str(tmp_path)])
    with pytest.raises(UserError, match="unknown dataset"):
        online_trainer.main(["--dataset", "pointmaze-huge-navigate-v0", "--save_dir", str(tmp_path / "o")])
    assert list(tmp_path.iterdir()) == []


def test_online_trainer_refuses_an_existing_run_and_a_missing_checkpoint(tiny_dataset_dir, tmp_path):
    import online_trainer
    with pytest.raises(UserError, match="does not exist"):
        online_trainer.main(["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir,
                             "--checkpoint", str(tmp_path / "missing.pth"), "--save_dir", str(tmp_path / "o")])
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "off", "--num_epochs", "1", "--eval_every", "1"))
    existing = tmp_path / "o"
    existing.mkdir()
    (existing / "online_metrics.csv").write_text("episode\n0\n")
    (existing / "last_online_model.pth").write_bytes(b"a run's checkpoint")
    with pytest.raises(UserError, match="--resume"):
        online_trainer.main(["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir,
                             "--checkpoint", str(tmp_path / "off" / "best_model.pth"), "--save_dir", str(existing)])
    assert (existing / "online_metrics.csv").read_text() == "episode\n0\n"


def test_online_trainer_on_a_corrupt_dataset_is_a_clear_error(tiny_dataset_dir, tmp_path):
    import online_trainer
    offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "off", "--num_epochs", "1", "--eval_every", "1"))
    directory = copy_dataset(tiny_dataset_dir, tmp_path / "data")
    (directory / f"{TINY_DATASET}.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt or incomplete"):
        online_trainer.main(["--dataset", TINY_DATASET, "--dataset_dir", str(directory),
                             "--checkpoint", str(tmp_path / "off" / "best_model.pth"), "--save_dir", str(tmp_path / "o")])
    assert not any((tmp_path / "o").glob("*.pth"))


class PoisonLastTask:
    """The maze's oracle policy, except that the episodes of the last task (evaluate lists them last) get NaN."""

    def __init__(self, maze, poisoned):
        from ogbench_utils import OraclePolicy
        self.oracle, self.poisoned = OraclePolicy(maze), poisoned

    def make_actor(self, goals):
        actor = self.oracle.make_actor(goals)
        rows = np.arange(len(goals)) >= len(goals) - self.poisoned
        oracle_act, oracle_keep = actor.act, actor.keep

        def act(observations):
            actions = oracle_act(observations)
            actions[rows] = np.nan
            return actions

        def keep(kept):
            nonlocal rows
            rows = rows[kept]
            oracle_keep(kept)
        actor.act, actor.keep = act, keep
        return actor


def test_a_nan_action_ends_its_episode_as_a_failure_counted_per_task():
    """MuJoCo resets a non-finite state and the point lands at (0, 0), inside task 5's goal: a NaN action
    must never reach the environment, or a policy that emits NaN would score there."""
    from ogbench_utils import evaluate, make_env
    env = make_env(TINY_DATASET)
    result = evaluate(PoisonLastTask(env.unwrapped, poisoned=2), TINY_DATASET, 2, seed=0, progress=False)
    env.close()
    assert result["task5_success"] == 0.0 and result["task5_non_finite"] == 2 and result["non_finite_episodes"] == 2
    assert all(result[f"task{k}_non_finite"] == 0 for k in range(1, 5))
    assert max(result[f"task{k}_success"] for k in range(1, 5)) > 0   # the same policy, unpoisoned, succeeds


class RecordGoals:
    """A policy that stands still and keeps the goals evaluation gives it."""

    def __init__(self, action_dim):
        self.action_dim, self.goals = action_dim, None

    def make_actor(self, goals):
        self.goals = goals
        return types.SimpleNamespace(act=lambda obs: np.zeros((len(obs), self.action_dim), np.float32),
                                     keep=lambda rows: None)


def test_antmaze_evaluation_gives_the_same_goal_observations_every_time():
    """OGBench's maze reset reads the goal observation after a few random actions drawn from the action space;
    unseeded, an ant's goal joints differed from run to run, and with them every antmaze evaluation."""
    from ogbench_utils import evaluate
    goals = []
    for _ in range(2):
        policy = RecordGoals(action_dim=8)
        evaluate(policy, "antmaze-medium-navigate-v0", 1, seed=3, progress=False, max_episode_steps=1)
        goals.append(policy.goals)
    assert goals[0].shape == (5, 29) and np.ptp(goals[0][:, 2:]) > 0
    np.testing.assert_array_equal(goals[0], goals[1])
