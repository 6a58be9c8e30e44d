"""Offline OPSO training: dataset -> updates on windows -> periodic OGBench evaluation -> checkpoints and curves.

    python offline_trainer.py --dataset pointmaze-medium-navigate-v0 --dataset_dir datasets/generated
    python offline_trainer.py --dataset antmaze-medium-navigate-v0 --max_trajectories 100 --batch_size 16 --num_epochs 200

Outputs in --save_dir: best_model.pth (replaced only when evaluation success strictly improves),
last_model.pth (every epoch; --resume continues from it), metrics.csv (one row per epoch),
training_curves.png, config.json.
"""
import argparse
import glob
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from offline_agent import (ADVANTAGES, CRITIC_BATCHES, INVERSE_STATES, INVERSE_SUBGOALS, SUBGOAL_LATENTS, SUBGOAL_SOURCES,
                           AgentConfig, OfflineAgent)
from ogbench_utils import (DEFAULT_DATASET_DIR, SUPPORTED_DATASETS, check_dataset_name, evaluate,
                           load_datasets, make_env, read_provenance, sampler_for)
from utils import (UserError, CSVLogger, exit_on_user_error, load_checkpoint, non_negative_int, num_updates_per_epoch,
                   plot_curves, positive_float, positive_int, resolve_device, save_checkpoint, set_seed, unit_float,
                   write_json)

LOSS_COLUMNS = ["critic/loss", "value/loss", "infonce/loss", "state/loss", "reward/loss", "inverse/loss",
                "proposer/loss", "critic/q_mean", "value/v_mean", "inverse/advantage_mean", "inverse/action_mse",
                "infonce/accuracy", "train/grad_norm"]
CRITIC_STEP_COLUMNS = ["critic_steps/critic_loss", "critic_steps/value_loss",   # with --critic_steps
                       "critic_steps/proposer_loss"]                            # and --critic_step_proposer 1
CURVE_PANELS = [("critic loss", ["critic/loss"]), ("value loss", ["value/loss"]), ("state loss", ["state/loss"]),
                ("reward/done loss", ["reward/loss"]), ("InfoNCE loss", ["infonce/loss"]),
                ("inverse / proposer loss", ["inverse/loss", "proposer/loss"]),
                ("evaluation success", ["eval/success"])]
RUN_FILES = ("metrics.csv", "last_model.pth", "best_model.pth", "config.json", "training_curves.png")


def add_model_flags(parser):
    """Flags of the agent's architecture and losses (shared with online_trainer.py)."""
    d = AgentConfig(obs_dim=0, action_dim=0)
    parser.add_argument("--context_length", type=positive_int, default=d.context_length,
                        help="observations per window (encoder context)")
    parser.add_argument("--d_model", type=positive_int, default=d.d_model, help="Mamba width")
    parser.add_argument("--n_layers", type=positive_int, default=d.n_layers, help="Mamba blocks")
    parser.add_argument("--latent_dim", type=positive_int, default=d.latent_dim, help="size of the latent z")
    parser.add_argument("--hidden_dim", type=positive_int, default=d.hidden_dim, help="width of every head MLP")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--subgoal_steps", type=positive_int, default=d.subgoal_steps,
                        help="k: z' is the latent k steps ahead (see README for the measurement behind the default)")
    parser.add_argument("--discount", type=unit_float, default=d.discount, help="discount gamma")
    parser.add_argument("--expectile", type=unit_float, default=d.expectile, help="expectile tau of the value loss")
    parser.add_argument("--beta", type=float, default=d.beta, help="inverse temperature of the advantage weights")
    parser.add_argument("--inverse_beta", type=float, default=d.inverse_beta,
                        help="inverse temperature of the inverse dynamics' weights (None: --beta; 0: unweighted)")
    parser.add_argument("--tau", type=unit_float, default=d.tau, help="EMA rate of the target critics")
    parser.add_argument("--infonce_coef", type=float, default=d.infonce_coef, help="weight of the InfoNCE loss")
    parser.add_argument("--hindsight_bound", type=int, choices=[0, 1], default=int(d.hindsight_bound),
                        help="1: critic targets are at least the return of the data's own path to the goal")
    parser.add_argument("--subgoal_latent", choices=list(SUBGOAL_LATENTS), default=d.subgoal_latent,
                        help="z' as the goal encoder's latent of o_{t+k} ('goal'), or the window's z_{t+k} ('history')")
    parser.add_argument("--advantage", choices=list(ADVANTAGES), default=d.advantage,
                        help="AWR advantage of I and P: target critics' Q - V ('q'), or k-step return + V(z_{t+k}) - V ('kstep')")
    parser.add_argument("--inverse_state", choices=list(INVERSE_STATES), default=d.inverse_state,
                        help="state input of the inverse dynamics: the history latent z_t, or E([o_t]) ('observation')")
    parser.add_argument("--inverse_subgoal", choices=list(INVERSE_SUBGOALS), default=d.inverse_subgoal,
                        help="subgoals of the inverse dynamics' training: k steps ahead, or d ~ U{1..k} ('uniform')")
    parser.add_argument("--num_noisy_candidates", type=int, default=d.num_noisy_candidates,
                        help="policy search: noisy copies of the proposed subgoal")
    parser.add_argument("--num_interpolations", type=int, default=d.num_interpolations,
                        help="policy search: goal-biased interpolations z + alpha (z_g - z)")
    parser.add_argument("--subgoal_source", choices=list(SUBGOAL_SOURCES), default=d.subgoal_source,
                        help="acting: the policy search over the proposal ('proposer'), the best real dataset state "
                             "by V among the successors of the agent's nearest dataset states ('data'), or the data's "
                             "until the agent stalls, then the other rule until it stalls again ('switch')")
    parser.add_argument("--data_neighbors", type=positive_int, default=d.data_neighbors,
                        help="subgoal_source 'data': nearest dataset states per step whose successors are candidates")
    parser.add_argument("--data_stride", type=positive_int, default=d.data_stride,
                        help="subgoal_source 'data': keep every N-th dataset state as a candidate")
    parser.add_argument("--data_lookahead", type=positive_int, default=d.data_lookahead,
                        help="subgoal_source 'data': value each candidate by the state this many steps on along its "
                             "trajectory (default: k, the candidate itself)")
    parser.add_argument("--stall_steps", type=positive_int, default=d.stall_steps,
                        help="subgoal_source 'switch': an episode has stalled when it moved less than --stall_radius "
                             "over this many steps")
    parser.add_argument("--stall_radius", type=positive_float, default=d.stall_radius,
                        help="subgoal_source 'switch': the stall distance, in x-y units of the maze")
    parser.add_argument("--critic_steps", type=non_negative_int, default=d.critic_steps,
                        help="extra critic/value steps on single-observation latents per update")
    parser.add_argument("--critic_batch", choices=list(CRITIC_BATCHES), default=d.critic_batch,
                        help="batches of the critic steps: windows like the update's, or as many independent transitions")
    parser.add_argument("--critic_step_proposer", type=int, choices=[0, 1], default=int(d.critic_step_proposer),
                        help="1: the critic steps also train the proposer P(E([o_t]), z_g) (AWR, as in the update)")
    parser.add_argument("--mamba_backend", choices=["auto", "torch", "cuda"], default=d.mamba_backend,
                        help="auto: mamba_ssm on CUDA when installed, else the PyTorch fallback")


def add_run_flags(parser):
    parser.add_argument("--dataset", default="pointmaze-medium-navigate-v0",
                        help=f"OGBench dataset, one of: {', '.join(SUPPORTED_DATASETS)}")
    parser.add_argument("--dataset_dir", default=DEFAULT_DATASET_DIR,
                        help="folder of the dataset files (generated ones: datasets/generated)")
    parser.add_argument("--eval_episodes", type=positive_int, default=20, help="evaluation episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    parser.add_argument("--max_episode_steps", type=positive_int, default=None,
                        help="episode limit for evaluation and online episodes (default: the environment's, "
                             "1000 for the mazes; shorter only for quick runs and tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --save_dir")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def build_parser():
    parser = argparse.ArgumentParser(description="Offline OPSO training on an OGBench dataset.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(parser)
    parser.add_argument("--max_trajectories", type=positive_int, default=None,
                        help="keep the first N trajectories (default: all)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="windows per update")
    parser.add_argument("--num_epochs", type=positive_int, default=200,
                        help="epochs; one epoch = ceil(transitions / (batch_size * context_length)) updates")
    parser.add_argument("--updates_per_epoch", type=positive_int, default=None,
                        help="override the updates per epoch (default: one pass over the transitions)")
    parser.add_argument("--eval_every", type=positive_int, default=10, help="evaluate every N epochs (and at the end)")
    parser.add_argument("--time_budget", type=positive_float, default=None,
                        help="minutes of training (updates and periodic evaluations) before a final evaluation")
    parser.add_argument("--proposer_phase", type=positive_float, default=None,
                        help="the last N minutes of --time_budget train the proposer alone on the frozen encoder "
                             "(checked at epoch ends; see README)")
    parser.add_argument("--save_dir", default="runs/offline", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --save_dir from last_model.pth")
    add_model_flags(parser)
    return parser


def agent_config_from_args(args, obs_dim, action_dim):
    fields = AgentConfig.__dataclass_fields__
    return AgentConfig(obs_dim=obs_dim, action_dim=action_dim,
                       **{k: v for k, v in vars(args).items() if k in fields and k not in ("obs_dim", "action_dim")})


def prepare_save_dir(save_dir, resume, overwrite, run_files=RUN_FILES):
    """Refuse to mix two runs' outputs: an existing run needs --resume or --overwrite."""
    existing = [f for f in run_files if os.path.exists(os.path.join(save_dir, f))]
    if existing and not (resume or overwrite):
        raise UserError(f"{save_dir} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it, --overwrite to replace it, or another --save_dir")
    if overwrite and not resume:
        for f in existing:
            os.remove(os.path.join(save_dir, f))
    os.makedirs(save_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(save_dir, "*.tmp")):  # half-written files of a killed run
        os.remove(stale)


def check_schedule(args):
    if args.proposer_phase is not None and (args.time_budget is None or args.proposer_phase >= args.time_budget):
        raise UserError(f"--proposer_phase ({args.proposer_phase} min) is the end of --time_budget "
                        f"({args.time_budget} min): it needs a --time_budget longer than itself")


def in_proposer_phase(args, elapsed):
    return args.proposer_phase is not None and elapsed >= (args.time_budget - args.proposer_phase) * 60


def warn_if_smoke_data(dataset, dataset_dir):
    provenance = read_provenance(dataset, dataset_dir)
    if provenance and provenance.get("smoke"):
        print(f"warning: {dataset} in {dataset_dir} is SMOKE data (random actions); results are not a benchmark")


def average(infos):
    return {k: float(np.mean([info[k] for info in infos])) for k in infos[0]}


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_dataset_name(args.dataset)
    check_schedule(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    prepare_save_dir(args.save_dir, args.resume, args.overwrite)
    set_seed(args.seed)
    train, _ = load_datasets(args.dataset, args.dataset_dir, args.max_trajectories)
    warn_if_smoke_data(args.dataset, args.dataset_dir)
    env = make_env(args.dataset)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()

    last_path = os.path.join(args.save_dir, "last_model.pth")
    if args.resume:
        checkpoint = load_checkpoint(last_path, map_location=device)
        agent = OfflineAgent.from_checkpoint(checkpoint, device=device)
        agent.check_env_sizes(obs_dim, action_dim, source=last_path)
        start_epoch, best_success = checkpoint["epoch"] + 1, checkpoint["best_success"]
        elapsed, proposer_steps = checkpoint["elapsed"], checkpoint.get("proposer_steps", 0)
        torch.set_rng_state(checkpoint["rng_torch"].cpu())
    else:
        agent = OfflineAgent(agent_config_from_args(args, obs_dim, action_dim), device=device)
        agent.set_normalization(train.observations)
        start_epoch, best_success, elapsed, proposer_steps = 1, -math.inf, 0.0, 0
    agent.set_subgoal_data(train)
    write_json(os.path.join(args.save_dir, "config.json"), dict(vars(args), device=str(device)))

    sampler = sampler_for(agent.config, train, seed=args.seed)
    if args.resume:
        sampler.rng.bit_generator.state = checkpoint["rng_sampler"]
    if sampler.window_length < args.context_length:
        print(f"note: trajectories are shorter than --context_length; windows of {sampler.window_length} steps")
    updates = args.updates_per_epoch or num_updates_per_epoch(len(train), args.batch_size, args.context_length)
    logger = CSVLogger(os.path.join(args.save_dir, "metrics.csv"), resume=args.resume,
                       keep_rows_until=("epoch", start_epoch - 1))
    print(f"{args.dataset}: {train.num_trajectories} trajectories, {len(train)} transitions, "
          f"{updates} updates per epoch, device {device}")

    for epoch in range(start_epoch, args.num_epochs + 1):
        epoch_start = time.time()
        infos = []
        proposer_only = in_proposer_phase(args, elapsed)
        bar = tqdm(range(updates), desc=f"epoch {epoch}/{args.num_epochs}" + (" (proposer)" if proposer_only else ""),
                   leave=False, disable=args.no_progress)
        for _ in bar:
            if proposer_only:
                infos.append(agent.proposer_update(sampler.sample(args.batch_size, device)))
                proposer_steps += 1
            else:
                infos.append(agent.train_step(lambda: sampler.sample(args.batch_size, device),
                                              lambda: sampler.sample_transitions(args.batch_size * args.context_length, device)))
            check_finite(infos[-1], agent.step)
            if len(infos) % 10 == 1:
                bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in infos[-1].items() if k in LOSS_COLUMNS[:7]})
        means = average(infos)
        row = {"epoch": epoch, "step": agent.step, "proposer_steps": proposer_steps,
               **{k: means[k] for k in LOSS_COLUMNS + CRITIC_STEP_COLUMNS if k in means}}
        elapsed += time.time() - epoch_start
        out_of_time = args.time_budget is not None and elapsed >= args.time_budget * 60
        last_epoch = epoch == args.num_epochs or out_of_time
        result = {}
        if epoch % args.eval_every == 0 or last_epoch:
            eval_start = time.time()
            result = evaluate(agent, args.dataset, args.eval_episodes, seed=args.seed, progress=not args.no_progress,
                              max_episode_steps=args.max_episode_steps)
            if not last_epoch:
                elapsed += time.time() - eval_start
            if result["success"] > best_success:
                best_success = result["success"]
                save_checkpoint(checkpoint_dict(agent, epoch, best_success, elapsed, proposer_steps, args, sampler),
                                os.path.join(args.save_dir, "best_model.pth"))
        row.update({f"eval/{k}": result.get(k, float("nan")) for k in
                    ["success"] + [f"task{i}_success" for i in range(1, 6)] + ["episode_length"]})
        row.update({"time/elapsed_s": elapsed, "time/epoch_s": time.time() - epoch_start})
        logger.log(row)  # before the checkpoint: a resume drops rows newer than its checkpoint
        save_checkpoint(checkpoint_dict(agent, epoch, best_success, elapsed, proposer_steps, args, sampler), last_path)
        plot_curves(logger.path, os.path.join(args.save_dir, "training_curves.png"), "epoch", CURVE_PANELS,
                    title=f"OPSO offline: {args.dataset}")
        summary = (f"epoch {epoch}: proposer alone, loss {row['proposer/loss']:.3f}" if proposer_only else
                   f"epoch {epoch}: critic {row['critic/loss']:.3f} value {row['value/loss']:.3f} "
                   f"infonce {row['infonce/loss']:.3f} inverse {row['inverse/loss']:.3f}")
        if result:
            summary += f" | success {result['success']:.3f} (best {best_success:.3f})"
        tqdm.write(summary)
        if out_of_time:
            tqdm.write(f"time budget of {args.time_budget} min reached after epoch {epoch}")
            break
    return best_success


def checkpoint_dict(agent, epoch, best_success, elapsed, proposer_steps, args, sampler):
    state = agent.state_dict()
    state.update(epoch=epoch, best_success=best_success, elapsed=elapsed, proposer_steps=proposer_steps, run_config=vars(args),
                 rng_torch=torch.get_rng_state(), rng_sampler=sampler.rng.bit_generator.state)
    return state


def check_finite(info, step):
    """Stop at the first non-finite loss, naming it; the checkpoints on disk are the last good ones."""
    for key, value in info.items():
        if not math.isfinite(value):
            raise UserError(f"non-finite {key} ({value}) at step {step}; stopping, the last good checkpoint is kept")


if __name__ == "__main__":
    exit_on_user_error(main)
