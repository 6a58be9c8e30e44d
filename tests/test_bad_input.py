"""Reliability, second round (issue 27): runs that cannot mix, models that cannot diverge into a checkpoint, and
one clear line for every bad input, with the files already on disk left as they were."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import offline_trainer
import ogbench_utils
import online_trainer
from conftest import TINY_DATASET
from offline_agent import AgentConfig, OfflineAgent
from test_reliability import copy_dataset, tiny
from test_trainer import ROOT, run_cli
from utils import UserError, exit_on_user_error, load_checkpoint, read_csv, save_checkpoint

OFFLINE_FILES = ("metrics.csv", "last_model.pth", "best_model.pth", "config.json", "training_curves.png")


def online_flags(tiny_dataset_dir, checkpoint, save_dir, *extra):
    return ["--dataset", TINY_DATASET, "--dataset_dir", tiny_dataset_dir, "--checkpoint", str(checkpoint),
            "--save_dir", str(save_dir), "--max_episodes", "1", "--updates_per_episode", "1", "--batch_size", "2",
            "--eval_every", "1", "--eval_episodes", "1", "--device", "cpu", "--no_progress", "--max_episode_steps", "30",
            *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset_dir, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("finished") / "run"
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1", "--eval_every", "1"))
    return save_dir


def snapshot(folder, names=OFFLINE_FILES):
    return {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}


# ----------------------------------------------------------------------------- a diverged model is never saved

def poison_weights_at(monkeypatch, step):
    update = OfflineAgent.update

    def poisoned(self, *args):
        info = update(self, *args)
        if self.step == step:
            with torch.no_grad():
                self.heads.inverse.net[0].weight.fill_(float("nan"))
        return info
    monkeypatch.setattr(OfflineAgent, "update", poisoned)


def test_non_finite_weights_stop_the_run_before_they_are_saved(tiny_dataset_dir, tmp_path, monkeypatch):
    poison_weights_at(monkeypatch, 6)   # the last update of epoch 2: the weights, not a loss, show it first
    save_dir = tmp_path / "run"
    with pytest.raises(UserError, match="training diverged: 1 weight tensors are not finite at step 6"):
        offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--eval_every", "1"))
    for name in ("last_model.pth", "best_model.pth"):
        checkpoint = load_checkpoint(save_dir / name)
        assert checkpoint["step"] == 3 and all(torch.isfinite(t).all() for t in checkpoint["heads"].values())


def test_an_infinite_learning_rate_is_an_argparse_error():
    result = run_cli("--lr", "inf")
    assert result.returncode == 2 and "--lr" in result.stderr and "finite" in result.stderr


def test_an_evaluation_with_non_finite_actions_stops_the_run(tiny_dataset_dir, tmp_path, monkeypatch):
    from offline_agent import Actor
    monkeypatch.setattr(Actor, "perturb", lambda self, action: action * float("nan"))
    with pytest.raises(UserError, match="non-finite actions in 5 evaluation episodes"):
        offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / "best_model.pth").exists()


# ----------------------------------------------------------------------------- resume continues one run only

@pytest.mark.parametrize("flag,value", [("--lr", "0.001"), ("--d_model", "32"), ("--discount", "0.9"),
                                        ("--subgoal_steps", "4"), ("--batch_size", "8"), ("--seed", "3"),
                                        ("--dataset", "pointmaze-large-navigate-v0")])
def test_resume_refuses_a_changed_setting_naming_it(finished_run, tmp_path, flag, value):
    before = snapshot(finished_run)
    with pytest.raises(UserError, match=f"cannot change {flag} "):
        offline_trainer.main(["--save_dir", str(finished_run), "--resume", flag, value])
    assert snapshot(finished_run) == before


def test_resume_keeps_the_runs_settings_and_takes_more_epochs(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--lr", "0.001", "--num_epochs", "1", "--eval_every", "1"))
    offline_trainer.main(["--save_dir", str(save_dir), "--resume", "--num_epochs", "2", "--lr", "0.001"])
    checkpoint = load_checkpoint(save_dir / "last_model.pth")
    assert checkpoint["epoch"] == 2 and checkpoint["agent_config"]["lr"] == 0.001
    assert checkpoint["run_config"]["num_epochs"] == 2 and checkpoint["run_config"]["batch_size"] == 4
    assert list(read_csv(save_dir / "metrics.csv")["epoch"]) == [1, 2]


def test_online_resume_refuses_another_dataset_and_learning_rate(tiny_dataset_dir, finished_run, tmp_path):
    online_dir = tmp_path / "online"
    online_trainer.main(online_flags(tiny_dataset_dir, finished_run / "last_model.pth", online_dir))
    for flag, value in (("--dataset", "pointmaze-large-navigate-v0"), ("--online_lr", "0.01")):
        with pytest.raises(UserError, match=f"cannot change {flag} "):
            online_trainer.main(["--save_dir", str(online_dir), "--resume", "--max_episodes", "1", flag, value])


# ----------------------------------------------------------------------------- overwrite and the run folder

def test_overwrite_with_a_corrupt_dataset_leaves_the_old_run_whole(tiny_dataset_dir, finished_run, tmp_path):
    before = snapshot(finished_run)
    directory = copy_dataset(tiny_dataset_dir, tmp_path / "data")
    (directory / f"{TINY_DATASET}.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        offline_trainer.main(tiny(str(directory), finished_run, "--overwrite"))
    assert snapshot(finished_run) == before


def test_overwrite_restores_the_old_run_if_the_new_one_fails_before_its_first_checkpoint(tiny_dataset_dir, tmp_path,
                                                                                     monkeypatch):
    save_dir = tmp_path / "run"
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1", "--eval_every", "1"))
    before = snapshot(save_dir)
    poison_weights_at(monkeypatch, 1)
    with pytest.raises(UserError, match="diverged"):
        offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--overwrite", "--lr", "0.001"))
    assert snapshot(save_dir) == before and not (save_dir / ".previous-run").exists()


def test_a_run_that_never_checkpointed_does_not_block_a_plain_rerun(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "config.json").write_text("{}")
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1", "--eval_every", "1"))
    assert load_checkpoint(save_dir / "last_model.pth")["epoch"] == 1


def test_a_fresh_run_keeps_the_users_tmp_files_and_drops_its_own(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "notes.tmp").write_text("mine")
    (save_dir / "last_model.pth.abc123.tmp").write_text("half-written by a killed run")
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1", "--eval_every", "1"))
    assert (save_dir / "notes.tmp").read_text() == "mine" and not (save_dir / "last_model.pth.abc123.tmp").exists()


def test_a_save_dir_that_is_a_file_or_under_one_is_one_line(tiny_dataset_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for save_dir, message in ((a_file, "is a file, not a folder"), (a_file / "run", "cannot")):
        with pytest.raises(UserError, match=message):
            offline_trainer.main(tiny(tiny_dataset_dir, save_dir))
    assert a_file.read_text() == "keep me"


def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_stays(tiny_dataset_dir, tmp_path, monkeypatch):
    save_dir = tmp_path / "run"
    offline_trainer.main(tiny(tiny_dataset_dir, save_dir, "--num_epochs", "1", "--eval_every", "1"))
    before = (save_dir / "last_model.pth").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="could not write .*No space left on device"):
        offline_trainer.main(["--save_dir", str(save_dir), "--resume", "--num_epochs", "2"])
    assert (save_dir / "last_model.pth").read_bytes() == before


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags,message", [
    (["--context_length", "1"], "--context_length: must be at least 2"),
    (["--context_length", "20", "--subgoal_steps", "20"], "--subgoal_steps (20) must be smaller than --context_length"),
    (["--discount", "1.0"], "--discount: must be in [0, 1)"),
    (["--seed", "-1"], "--seed: must be an integer >= 0"),
    (["--threads", "-1"], "--threads: must be an integer >= 0"),
    (["--num_noisy_candidates", "-1"], "--num_noisy_candidates: must be an integer >= 0"),
    (["--num_interpolations", "-3"], "--num_interpolations: must be an integer >= 0"),
    (["--beta", "nan"], "--beta: must be a finite number >= 0"),
])
def test_impossible_flags_are_one_line(tiny_dataset_dir, tmp_path, flags, message):
    result = run_cli(*flags, "--dataset_dir", tiny_dataset_dir, "--save_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(tiny_dataset_dir, tmp_path):
    with pytest.raises(UserError, match="--batch_size 100000000 x --context_length 20 needs about"):
        offline_trainer.main(tiny(tiny_dataset_dir, tmp_path / "r", "--batch_size", "100000000"))
    assert not (tmp_path / "r" / "config.json").exists()


def test_negative_updates_per_episode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        online_trainer.main(["--updates_per_episode", "-3"])
    assert "--updates_per_episode: must be an integer >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- datasets

def write_dataset(directory, observations, actions, terminals):
    directory.mkdir(exist_ok=True)
    for suffix in (".npz", "-val.npz"):
        np.savez(directory / f"{TINY_DATASET}{suffix}", observations=observations, actions=actions, terminals=terminals)
    return directory


def good_columns(steps=20):
    terminals = np.zeros(steps, bool)
    terminals[-1] = True
    return np.zeros((steps, 2), np.float32), np.zeros((steps, 2), np.float32), terminals


def damaged(kind):
    observations, actions, terminals = good_columns()
    if kind == "wrong size":
        observations = np.zeros((20, 5), np.float32)
    elif kind == "1-D":
        observations = np.zeros(20, np.float32)
    elif kind == "fewer actions":
        actions = actions[:15]
    elif kind == "all terminals":
        terminals = np.ones(20, bool)
    elif kind == "one step":
        observations, actions, terminals = observations[:1], actions[:1], terminals[-1:]
    elif kind == "zero steps":
        observations, actions, terminals = observations[:0], actions[:0], terminals[:0]
    elif kind == "nan observation":
        observations[7, 1] = np.nan
    elif kind == "inf action":
        actions[3, 0] = np.inf
    return observations, actions, terminals


@pytest.mark.parametrize("kind,message", [
    ("wrong size", "observations of shape (20, 5); the environment's are (steps, 2)"),
    ("1-D", "observations of shape (20,)"),
    ("fewer actions", "20 observations, 15 actions and 20 terminals"),
    ("all terminals", "ends a trajectory at every step"),
    ("one step", "has 1 steps"),
    ("zero steps", "has 0 steps"),
    ("nan observation", "NaN or Inf in its observations (first at step 7)"),
    ("inf action", "NaN or Inf in its actions (first at step 3)"),
])
def test_a_malformed_dataset_is_one_line_naming_the_file(tmp_path, kind, message):
    directory = write_dataset(tmp_path / "data", *damaged(kind))
    with pytest.raises(UserError) as error:
        ogbench_utils.load_datasets(TINY_DATASET, str(directory))
    assert message in str(error.value) and f"{TINY_DATASET}.npz" in str(error.value)
    result = run_cli("--dataset", TINY_DATASET, "--dataset_dir", str(directory), "--save_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


def test_generate_checks_its_output_before_collecting_and_keeps_existing_data(tiny_dataset_dir, tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    collected = []
    monkeypatch.setattr(ogbench_utils, "_collect_episodes", lambda *args: collected.append(1) or [])
    with pytest.raises(UserError, match="is a file, not a folder"):
        ogbench_utils.generate(TINY_DATASET, episodes=1, max_steps=10, dataset_dir=str(a_file), progress=False)
    existing = copy_dataset(tiny_dataset_dir, tmp_path / "data")
    before = (existing / f"{TINY_DATASET}.npz").read_bytes()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        ogbench_utils.generate(TINY_DATASET, episodes=1, max_steps=10, dataset_dir=str(existing), progress=False)
    assert collected == [] and (existing / f"{TINY_DATASET}.npz").read_bytes() == before


# ----------------------------------------------------------------------------- checkpoints and commands

def test_evaluate_from_another_folder_finds_the_runs_data(tiny_dataset_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    copy_dataset(tiny_dataset_dir, work / "datasets")
    train = subprocess.run([sys.executable, os.path.join(ROOT, "offline_trainer.py"),
                            *tiny("datasets", "run", "--num_epochs", "1", "--eval_every", "1")],
                           cwd=work, capture_output=True, text=True, timeout=180)
    assert train.returncode == 0, train.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "offline_trainer.py"), "evaluate",
                             str(work / "run" / "last_model.pth"), "--dataset", TINY_DATASET, "--eval_episodes", "1",
                             "--max_episode_steps", "20"], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert '"success": ' in result.stdout and "NaN" not in result.stdout


def checkpoint_of_another_maze(path):
    agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, latent_dim=8, d_model=16, n_layers=1, hidden_dim=32,
                                     context_length=20, subgoal_steps=5, subgoal_source="proposer"))
    save_checkpoint(dict(agent.state_dict(), run_config={"dataset": "pointmaze-large-navigate-v0"}), path)
    return path


def test_a_checkpoint_of_another_maze_is_refused_online_and_warned_in_evaluate(tiny_dataset_dir, tmp_path, capsys):
    checkpoint = checkpoint_of_another_maze(tmp_path / "large.pth")
    with pytest.raises(UserError, match="trained on pointmaze-large-navigate-v0.*would mix two mazes"):
        online_trainer.main(online_flags(tiny_dataset_dir, checkpoint, tmp_path / "o"))
    offline_trainer.main(["evaluate", str(checkpoint), "--dataset", TINY_DATASET, "--eval_episodes", "1",
                          "--max_episode_steps", "10"])
    assert "warning: " in capsys.readouterr().err


def test_an_incomplete_checkpoint_and_a_folder_are_one_line(tmp_path):
    state = checkpoint_of_another_maze(tmp_path / "full.pth")
    partial = load_checkpoint(state)
    del partial["heads"]
    save_checkpoint(partial, tmp_path / "partial.pth")
    for path, message in ((tmp_path / "partial.pth", "incomplete OPSO checkpoint: it lacks heads"),
                          (tmp_path, "is a folder; pass the OPSO checkpoint file in it")):
        result = subprocess.run([sys.executable, "offline_trainer.py", "evaluate", str(path), "--dataset", TINY_DATASET],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "onto the csv"])
def test_plot_command_bad_input_is_one_line(finished_run, tmp_path, case):
    csv_path = {"missing": tmp_path / "none.csv", "empty": tmp_path / "empty.csv",
                "onto the csv": finished_run / "metrics.csv"}[case]
    if case == "empty":
        csv_path.write_text("")
    out = csv_path if case == "onto the csv" else tmp_path / "out.png"
    before = csv_path.read_bytes() if csv_path.exists() else None
    result = subprocess.run([sys.executable, "utils.py", "plot", str(csv_path), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert (csv_path.read_bytes() if csv_path.exists() else None) == before


@pytest.mark.parametrize("turned_into", [None, ImportError])
def test_ctrl_c_is_one_line_even_when_a_library_turns_it_into_another_error(turned_into, capsys):
    """numpy's C import hook replaces a KeyboardInterrupt met inside an extension's import by an ImportError."""
    def main():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            if turned_into is not None:
                raise turned_into("numpy.core.multiarray failed to import") from None
            raise
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            exit_on_user_error(main)
    finally:
        signal.signal(signal.SIGINT, before)
    assert exit_info.value.code == 130 and capsys.readouterr().err.startswith("interrupted; ")


def test_an_error_without_ctrl_c_keeps_its_traceback():
    def main():
        raise ImportError("a real one")
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(ImportError):
            exit_on_user_error(main)
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_names_the_last_checkpoint_and_exits_130(tiny_dataset_dir, tmp_path):
    save_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "offline_trainer.py", *tiny(tiny_dataset_dir, save_dir,
                                "--num_epochs", "100000", "--eval_every", "100000")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600   # generous: a loaded machine only makes it wait longer
    while not (save_dir / "last_model.pth").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"interrupted; the last checkpoint is {save_dir / 'last_model.pth'}" in stderr or \
        f"interrupted; the last checkpoint is {save_dir / 'best_model.pth'}" in stderr
