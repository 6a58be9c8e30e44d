"""Offline OPSO training: dataset -> updates on windows -> periodic OGBench evaluation -> checkpoints and curves;
and the evaluation of any saved checkpoint.

    python offline_trainer.py --dataset pointmaze-medium-navigate-v0 --dataset_dir datasets/generated
    python offline_trainer.py --dataset antmaze-medium-navigate-v0 --max_trajectories 100 --batch_size 16 --num_epochs 200
    python offline_trainer.py evaluate runs/offline/best_model.pth --dataset pointmaze-medium-navigate-v0 \
        [--subgoal_source proposer ...]      # acting flags override the checkpoint's

Outputs in --save_dir: best_model.pth (replaced only when evaluation success strictly improves),
last_model.pth (every epoch; --resume continues from it), metrics.csv (one row per epoch),
training_curves.png, config.json.
"""
import argparse
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from offline_agent import CHECKPOINT_KEYS, AgentConfig, OfflineAgent
from ogbench_utils import (DEFAULT_DATASET_DIR, NUM_EVAL_TASKS, WindowSampler, check_dataset_name, env_name_of,
                           env_sizes, evaluate, load_datasets, read_provenance)
from utils import (CSVLogger, RunConfig, RunFolder, UserError, add_flags, average, check_finite, check_finite_actions, check_finite_weights,
                   config_from_args, exit_on_user_error, explicit_flags, field_names, flag, load_checkpoint,
                   non_negative_int, num_updates_per_epoch, plot_curves, positive_float, positive_int, resumed_flags,
                   save_checkpoint, set_seed, setup_torch, write_json)

LOSS_COLUMNS = ["critic/loss", "value/loss", "infonce/loss", "state/loss", "reward/loss", "inverse/loss",
                "proposer/loss", "critic/q_mean", "value/v_mean", "inverse/advantage_mean", "inverse/action_mse",
                "infonce/accuracy", "train/grad_norm", "critic_steps/critic_loss", "inverse/transition_loss"]
EVAL_COLUMNS = (["success"] + [f"task{k}_success" for k in range(1, NUM_EVAL_TASKS + 1)]
                + ["non_finite_episodes", "episode_length"])
CURVE_PANELS = [("critic loss", ["critic/loss"]), ("value loss", ["value/loss"]), ("state loss", ["state/loss"]),
                ("reward/done loss", ["reward/loss"]), ("InfoNCE loss", ["infonce/loss"]),
                ("inverse / proposer loss", ["inverse/loss", "inverse/transition_loss", "proposer/loss"]),
                ("evaluation success", ["eval/success"])]
RUN_FILES = ("metrics.csv", "last_model.pth", "best_model.pth", "config.json", "training_curves.png")
RUN_KEYS = ("epoch", "best_success", "elapsed", "run_config", "rng_torch", "rng_sampler")
# flags a resumed run may take anew; every other flag is the run's own (a differing one is refused)
MAY_CHANGE_ON_RESUME = ("num_epochs", "time_budget", "eval_every", "device", "threads", "no_progress", "resume",
                        "overwrite", "save_dir")
SCAN_STATE_SIZE = 16   # d_state of the Mamba blocks


@dataclass
class OfflineRunConfig(RunConfig):
    num_epochs: int = flag(200, "epochs; one epoch = ceil(transitions / (batch_size * context_length)) updates",
                           positive_int)
    updates_per_epoch: Optional[int] = flag(None, "override the updates per epoch (default: one pass over the "
                                                  "transitions)", positive_int)
    eval_every: int = flag(10, "evaluate every N epochs (and at the end)", positive_int)
    time_budget: Optional[float] = flag(None, "minutes of training (updates and periodic evaluations) before a "
                                              "final evaluation", positive_float)


def build_parser():
    parser = argparse.ArgumentParser(description="Offline OPSO training on an OGBench dataset "
                                                 "(`offline_trainer.py evaluate -h`: evaluate a checkpoint).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, OfflineRunConfig)
    add_flags(parser, AgentConfig)
    return parser


def warn_if_smoke_data(dataset, dataset_dir):
    provenance = read_provenance(dataset, dataset_dir)
    if provenance and provenance.get("smoke"):
        print(f"warning: {dataset} in {dataset_dir} is SMOKE data (random actions); results are not a benchmark")


def check_batch_fits_in_memory(batch_size, config):
    """The encoder's scan keeps (L, batch, 2 d_model, d_state) floats for its backward: refuse what cannot fit."""
    needed = config.context_length * batch_size * 2 * config.d_model * SCAN_STATE_SIZE * 4 * config.n_layers
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available / 2:
        raise UserError(f"--batch_size {batch_size} x --context_length {config.context_length} needs about "
                        f"{needed / 2**30:.0f} GiB for the encoder's scan states alone; this machine has "
                        f"{available / 2**30:.0f} GiB: use a smaller --batch_size")


def draw_batches(sampler, agent, batch_size, device):
    """The update's batch of windows, one fresh batch per critic step and one batch of transitions per value step."""
    c = agent.config
    windows = [sampler.sample(batch_size, device) for _ in range(1 + c.critic_steps)]
    transitions = [sampler.sample_transitions(c.value_batch_size, c.subgoal_steps, device)
                   for _ in range(c.value_steps)]
    return windows[0], windows[1:], transitions


def parse_run(argv):
    """The run's flags; with --resume, the run's own, with the flags that may change applied (one line refusing
    any other that differs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dataset_name(args.dataset)
    args.dataset_dir = os.path.abspath(os.path.expanduser(args.dataset_dir))   # resolvable from anywhere later
    folder = RunFolder(args.save_dir, RUN_FILES, "last_model.pth")
    folder.check(args.resume, args.overwrite)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(folder.path("last_model.pth"), required=CHECKPOINT_KEYS + RUN_KEYS)
        given = explicit_flags(parser, argv)
        if "dataset_dir" in given:
            given["dataset_dir"] = args.dataset_dir
        args = argparse.Namespace(**resumed_flags(checkpoint["run_config"], given, MAY_CHANGE_ON_RESUME))
    return args, folder, checkpoint


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate_command(argv[1:])
    args, folder, checkpoint = parse_run(argv)
    run = config_from_args(OfflineRunConfig, args)
    check_dataset_name(run.dataset)
    device = setup_torch(run.threads, run.device)
    set_seed(run.seed)
    train, _ = load_datasets(run.dataset, run.dataset_dir, run.max_trajectories)
    warn_if_smoke_data(run.dataset, run.dataset_dir)
    obs_dim, action_dim = env_sizes(run.dataset)
    if checkpoint is not None:
        agent = OfflineAgent.from_checkpoint(checkpoint, device=device)
        agent.check_env_sizes(obs_dim, action_dim, source=folder.path("last_model.pth"))
    else:
        agent = OfflineAgent(config_from_args(AgentConfig, args, obs_dim=obs_dim, action_dim=action_dim), device=device)
        agent.set_normalization(train.observations)
    check_batch_fits_in_memory(run.batch_size, agent.config)
    agent.set_subgoal_data(train)
    return folder.run(run.resume, lambda: train_offline(agent, train, run, args, folder, checkpoint, device))


def train_offline(agent, train, run, args, folder, checkpoint, device):
    write_json(folder.path("config.json"), dict(vars(args), device=str(device)))
    c = agent.config
    sampler = WindowSampler(train, **c.sampler_settings(), seed=run.seed)
    if checkpoint is not None:
        start_epoch, best_success, elapsed = checkpoint["epoch"] + 1, checkpoint["best_success"], checkpoint["elapsed"]
        torch.set_rng_state(checkpoint["rng_torch"].cpu())
        sampler.rng.bit_generator.state = checkpoint["rng_sampler"]
    else:
        start_epoch, best_success, elapsed = 1, -math.inf, 0.0
    if sampler.window_length < c.context_length:
        print(f"note: trajectories are shorter than --context_length; windows of {sampler.window_length} steps")
    updates = run.updates_per_epoch or num_updates_per_epoch(len(train), run.batch_size, c.context_length)
    logger = CSVLogger(folder.path("metrics.csv"), resume=run.resume, keep_rows_until=("epoch", start_epoch - 1))
    print(f"{run.dataset}: {train.num_trajectories} trajectories, {len(train)} transitions, "
          f"{updates} updates per epoch, device {device}")

    for epoch in range(start_epoch, run.num_epochs + 1):
        epoch_start = time.time()
        infos = []
        bar = tqdm(range(updates), desc=f"epoch {epoch}/{run.num_epochs}", leave=False, disable=run.no_progress)
        for _ in bar:
            infos.append(agent.update(*draw_batches(sampler, agent, run.batch_size, device)))
            check_finite(infos[-1], agent.step)
            if len(infos) % 10 == 1:
                bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in infos[-1].items() if k in LOSS_COLUMNS[:7]})
        check_finite_weights(agent.named_weights(), agent.step)   # before anything of this epoch is saved
        means = average(infos)
        row = {"epoch": epoch, "step": agent.step, **{k: means[k] for k in LOSS_COLUMNS if k in means}}
        elapsed += time.time() - epoch_start
        out_of_time = run.time_budget is not None and elapsed >= run.time_budget * 60
        last_epoch = epoch == run.num_epochs or out_of_time
        result = {}
        if epoch % run.eval_every == 0 or last_epoch:
            eval_start = time.time()
            result = evaluate(agent, run.dataset, run.eval_episodes, seed=run.seed, progress=not run.no_progress,
                              max_episode_steps=run.max_episode_steps)
            check_finite_actions(result, agent.step)
            if not last_epoch:
                elapsed += time.time() - eval_start
            if result["success"] > best_success:
                best_success = result["success"]
                save_checkpoint(checkpoint_dict(agent, epoch, best_success, elapsed, args, sampler),
                                folder.path("best_model.pth"))
        row.update({f"eval/{k}": result.get(k, float("nan")) for k in EVAL_COLUMNS})
        row.update({"time/elapsed_s": elapsed, "time/epoch_s": time.time() - epoch_start})
        logger.log(row)  # before the checkpoint: a resume drops rows newer than its checkpoint
        save_checkpoint(checkpoint_dict(agent, epoch, best_success, elapsed, args, sampler), folder.path("last_model.pth"))
        folder.committed()
        plot_curves(logger.path, folder.path("training_curves.png"), "epoch", CURVE_PANELS,
                    title=f"OPSO offline: {run.dataset}")
        summary = (f"epoch {epoch}: critic {row['critic/loss']:.3f} value {row['value/loss']:.3f} "
                   f"infonce {row['infonce/loss']:.3f} inverse {row['inverse/loss']:.3f}")
        if result:
            summary += f" | success {result['success']:.3f} (best {best_success:.3f})"
        tqdm.write(summary)
        if out_of_time:
            tqdm.write(f"time budget of {run.time_budget} min reached after epoch {epoch}")
            break
    return best_success


def checkpoint_dict(agent, epoch, best_success, elapsed, args, sampler):
    state = agent.state_dict()
    state.update(epoch=epoch, best_success=best_success, elapsed=elapsed, run_config=vars(args),
                 rng_torch=torch.get_rng_state(), rng_sampler=sampler.rng.bit_generator.state)
    return state


# ----------------------------------------------------------------------------- evaluating a checkpoint

def set_run_subgoal_data(agent, run_config, dataset=None, dataset_dir=None, max_trajectories=None):
    """An agent acting with the data's states gets the training set of its run (run_config: the trainer's flags,
    as in the checkpoint or config.json); the arguments given override the run's. Other agents: no-op."""
    if not agent.config.acts_with_data:
        return
    train, _ = load_datasets(dataset or run_config["dataset"],
                             dataset_dir or run_config.get("dataset_dir", DEFAULT_DATASET_DIR),
                             max_trajectories or run_config.get("max_trajectories"))
    agent.set_subgoal_data(train)


def build_evaluate_parser():
    parser = argparse.ArgumentParser(prog="offline_trainer.py evaluate",
                                     description="Greedy OGBench evaluation (5 tasks) of a saved checkpoint.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="an OPSO checkpoint (best_model.pth, last_model.pth, ...)")
    parser.add_argument("--dataset", required=True, help="dataset whose environment to evaluate in")
    parser.add_argument("--eval_episodes", type=positive_int, default=20, help="episodes per task")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="evaluation seed")
    parser.add_argument("--max_episode_steps", type=positive_int, default=None,
                        help="cut episodes at this many steps (default: the environment's, e.g. 1000 for navigate)")
    parser.add_argument("--acting", choices=["recurrent", "window"], default="recurrent",
                        help="encoder context while acting: recurrent streams (constant cost) or the last L steps")
    parser.add_argument("--dataset_dir", default=None,
                        help="dataset folder for subgoal_source 'data'/'switch' (default: the training run's)")
    parser.add_argument("--max_trajectories", type=positive_int, default=None,
                        help="the first N trajectories, for subgoal_source 'data'/'switch' (default: the training run's)")
    add_flags(parser, AgentConfig, group="acting", overrides=True)
    return parser


def evaluate_command(argv):
    """Greedy evaluation of a saved agent; acting flags override the checkpoint's for this evaluation."""
    args = build_evaluate_parser().parse_args(argv)
    check_dataset_name(args.dataset)
    checkpoint = load_checkpoint(args.checkpoint, required=CHECKPOINT_KEYS)
    overrides = {k: getattr(args, k) for k in field_names(AgentConfig, "acting") if getattr(args, k) is not None}
    agent = OfflineAgent.from_checkpoint(checkpoint, **overrides)
    agent.check_env_sizes(*env_sizes(args.dataset), source=args.checkpoint)
    trained_on = checkpoint.get("run_config", {}).get("dataset")
    if trained_on and env_name_of(trained_on) != env_name_of(args.dataset):
        print(f"warning: {args.checkpoint} was trained on {trained_on}, not in {env_name_of(args.dataset)}'s maze",
              file=sys.stderr)
    set_run_subgoal_data(agent, checkpoint.get("run_config", {}), args.dataset, args.dataset_dir, args.max_trajectories)
    set_seed(args.seed)
    policy = types.SimpleNamespace(make_actor=lambda goals: agent.make_actor(goals, context=args.acting))
    result = evaluate(policy, args.dataset, args.eval_episodes, seed=args.seed, max_episode_steps=args.max_episode_steps)
    result.update(checkpoint=args.checkpoint, dataset=args.dataset, eval_episodes=args.eval_episodes, **overrides)
    print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()},
                     sort_keys=True, allow_nan=False))
    return result


if __name__ == "__main__":
    exit_on_user_error(main)
