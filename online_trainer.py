"""Online OPSO fine-tuning: offline checkpoint -> exploring episodes in the OGBench environment -> updates on
a mix of offline and online windows -> periodic greedy evaluation.

    python online_trainer.py --dataset pointmaze-medium-navigate-v0 --dataset_dir datasets/generated \
        --checkpoint runs/offline/best_model.pth --max_episodes 300
    python online_trainer.py --dataset antmaze-medium-navigate-v0 --max_episodes 1000 --batch_size 8

Outputs in --save_dir: online_metrics.csv (one row per episode; row 0 is the checkpoint before any
online step), online_training_curves.png, best_online_model.pth (by greedy evaluation),
last_online_model.pth, config.json.
"""
import argparse
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from offline_agent import CHECKPOINT_KEYS
from ogbench_utils import (NUM_EVAL_TASKS, Trajectories, WindowSampler, check_dataset_name, concat_batches, env_name_of,
                           evaluate, load_datasets, make_env, maze_cells, reset_seeded)
from online_agent import OnlineAgent, exploration_schedule, online_fraction_of_batch
from utils import (CSVLogger, RunConfig, RunFolder, UserError, add_flags, check_finite, check_finite_actions,
                   check_finite_weights, exit_on_user_error, explicit_flags, flag, load_checkpoint, non_negative_int,
                   plot_curves, positive_float, positive_int, resumed_flags, save_checkpoint, set_seed, setup_torch,
                   unit_float, write_json)

RUN_FILES = ("online_metrics.csv", "last_online_model.pth", "best_online_model.pth", "config.json",
             "online_training_curves.png")
COLUMNS = ["episode", "step", "env_steps", "online/success", "online/episode_reward", "online/episode_length",
           "exploration/epsilon", "exploration/action_noise", "exploration/explored_fraction", "train/total_loss",
           "critic/loss", "value/loss", "inverse/loss", "infonce/loss", "train/online_windows",
           "eval/success"] + [f"eval/task{k}_success" for k in range(1, NUM_EVAL_TASKS + 1)] + [
           "eval/non_finite_episodes", "time/elapsed_s"]
CURVE_PANELS = [("train loss", ["train/total_loss"]), ("episode success", ["online/success"]),
                ("episode reward", ["online/episode_reward"]), ("epsilon", ["exploration/epsilon"]),
                ("action noise", ["exploration/action_noise"]), ("greedy evaluation success", ["eval/success"])]
SUCCESS_SMOOTHING = 20  # episodes in the moving average of the logged online success
ONLINE_KEYS = ("phase", "episode", "best_success", "run_config", "run", "online_buffer", "rng_torch", "rng_goals",
               "rng_samplers")
# what the runs saved before a flag existed did, for resuming them
BEFORE_THE_FLAG = dict(online_low_level="train")
# flags a resumed online run may take anew; every other flag is the run's own (a differing one is refused)
MAY_CHANGE_ON_RESUME = ("eval_every", "device", "threads", "no_progress", "resume", "overwrite", "save_dir")


@dataclass
class OnlineRunConfig(RunConfig):
    checkpoint: str = flag("runs/offline/best_model.pth", "offline checkpoint to start from")
    batch_size: int = flag(8, "windows per update", positive_int)
    save_dir: str = flag("runs/online", "output folder")
    max_episodes: int = flag(1000, "online episodes", positive_int)
    updates_per_episode: int = flag(10, "gradient updates after each episode (0 to only collect)", non_negative_int)
    online_ratio: float = flag(0.5, "share of each batch's windows drawn from the online buffer (once it holds data)",
                               unit_float)
    online_low_level: str = flag("frozen", "frozen: the encoder and the inverse dynamics keep the checkpoint's "
                                           "weights, online updates train the value, critic and proposer; train: "
                                           "every network learns online", choices=["frozen", "train"])
    commanded_goal_prob: float = flag(0.2, "share of online value goals replaced by the episode's own goal and the "
                                           "env's success", unit_float)
    online_lr: Optional[float] = flag(None, "learning rate from the offline-to-online switch (default: the "
                                            "checkpoint's)", positive_float)
    epsilon_start: float = flag(0.30, "goal-biased exploration rate, start", unit_float)
    epsilon_end: float = flag(0.05, "goal-biased exploration rate, end", unit_float)
    action_noise_start: float = flag(0.20, "Gaussian action noise std, start", unit_float)
    action_noise_end: float = flag(0.05, "Gaussian action noise std, end", unit_float)
    goal_source: str = flag("tasks", "online goals: the five evaluation tasks in turn, or random maze cells",
                            choices=["tasks", "random"])
    eval_every: int = flag(50, "greedy evaluation every N episodes (and at the end)", positive_int)


def build_parser():
    parser = argparse.ArgumentParser(description="Online OPSO fine-tuning from an offline checkpoint.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, OnlineRunConfig)
    return parser


def check_schedules(parser, args):
    if args.epsilon_end > args.epsilon_start:
        parser.error(f"--epsilon_end ({args.epsilon_end}) must not exceed --epsilon_start ({args.epsilon_start})")
    if args.action_noise_end > args.action_noise_start:
        parser.error("--action_noise_end must not exceed --action_noise_start")


def task_of_episode(episode):
    """The evaluation task online episode `episode` (from 1; an int or an array) aims at with --goal_source tasks."""
    return (episode - 1) % NUM_EVAL_TASKS + 1


def reset_for_goal(env, episode, goal_source, rng, seed):
    """Reset one episode: the evaluation tasks in turn, or a random start and goal cell."""
    if goal_source == "tasks":
        options = dict(task_id=task_of_episode(episode))
    else:
        free, _ = maze_cells(env.unwrapped.maze_map)
        init, goal = rng.choice(len(free), size=2, replace=False)
        options = dict(task_info=dict(init_ij=free[init], goal_ij=free[goal]))
    np.random.seed(seed)  # the maze draws its start and goal noise from numpy's global RNG
    ob, info = reset_seeded(env, seed, options)
    return ob, info["goal"]


def run_episode(env, actor, ob):
    """One exploring episode; returns observations, actions (last one unused), reached flags, reward."""
    observations, actions, reached, reward_sum = [ob], [], [False], 0.0
    done = False
    while not done:
        action = actor.act(ob[None])[0]
        ob, reward, terminated, truncated, info = env.step(action)
        observations.append(ob)
        actions.append(action)
        reached.append(bool(info["success"]))
        reward_sum += reward
        done = terminated or truncated
    actions.append(np.zeros_like(actions[-1]))
    return np.asarray(observations), np.asarray(actions), np.asarray(reached), reward_sum


def mixed_batch(offline_sampler, online_sampler, batch_size, online_ratio, method="sample", **kwargs):
    """batch_size windows (method 'sample') or transitions ('sample_transitions'), a share of them from the online
    buffer: (batch, online rows)."""
    n_online = online_fraction_of_batch(batch_size, online_ratio, len(online_sampler.data))

    def draw(sampler, n):
        return getattr(sampler, method)(n, **kwargs)
    if n_online == 0:
        return draw(offline_sampler, batch_size), 0
    if n_online == batch_size:
        return draw(online_sampler, batch_size), n_online
    return concat_batches(draw(offline_sampler, batch_size - n_online), draw(online_sampler, n_online)), n_online


def parse_run(argv):
    """The run's flags and the checkpoint it starts from; with --resume, the online run's own flags, with the ones
    that may change applied (one line refusing any other that differs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_schedules(parser, args)
    check_dataset_name(args.dataset)
    args.dataset_dir = os.path.abspath(os.path.expanduser(args.dataset_dir))
    folder = RunFolder(args.save_dir, RUN_FILES, "last_online_model.pth")
    folder.check(args.resume, args.overwrite)
    if args.resume:
        checkpoint = load_checkpoint(folder.path("last_online_model.pth"), required=CHECKPOINT_KEYS + ONLINE_KEYS)
        given = explicit_flags(parser, argv)
        if "dataset_dir" in given:
            given["dataset_dir"] = args.dataset_dir
        run_config = {**BEFORE_THE_FLAG, **checkpoint["run_config"]}
        args = argparse.Namespace(**resumed_flags(run_config, given, MAY_CHANGE_ON_RESUME, "the online run"))
    else:
        checkpoint = load_checkpoint(args.checkpoint, required=CHECKPOINT_KEYS)
        trained_on = checkpoint.get("run_config", {}).get("dataset")
        if trained_on and env_name_of(trained_on) != env_name_of(args.dataset):
            raise UserError(f"{args.checkpoint} was trained on {trained_on}; fine-tuning it in "
                            f"{env_name_of(args.dataset)} would mix two mazes: pass a checkpoint of that maze")
    check_dataset_name(args.dataset)   # the resumed run's own
    return args, folder, checkpoint


def main(argv=None):
    args, folder, checkpoint = parse_run(argv)
    device = setup_torch(args.threads, args.device)
    env = make_env(args.dataset, args.max_episode_steps)
    agent = OnlineAgent.from_checkpoint(checkpoint, device=device)
    agent.check_env_sizes(env.observation_space.shape[0], env.action_space.shape[0],
                          source=folder.path("last_online_model.pth") if args.resume else args.checkpoint)
    set_seed(args.seed)
    offline_data, _ = load_datasets(args.dataset, args.dataset_dir, args.max_trajectories)
    agent.set_subgoal_data(offline_data)
    try:
        return folder.run(args.resume, lambda: train_online(agent, env, offline_data, args, folder, checkpoint, device))
    finally:
        env.close()


def train_online(agent, env, offline_data, args, folder, checkpoint, device):
    write_json(folder.path("config.json"), dict(vars(args), device=str(device)))
    paths = {name: folder.path(f"{name}_online_model.pth") for name in ("best", "last")}
    c = agent.config
    offline_sampler = WindowSampler(offline_data, **c.sampler_settings(), seed=args.seed)
    online_data = Trajectories.empty(c.obs_dim, c.action_dim)
    online_sampler = WindowSampler(online_data, **c.sampler_settings(), seed=args.seed + 1,
                                   commanded_goal_prob=args.commanded_goal_prob)
    goal_rng = np.random.default_rng(args.seed)
    start = time.time()
    if args.resume:
        run = restore_run(checkpoint, agent, online_data, online_sampler, offline_sampler, goal_rng)
        logger = CSVLogger(folder.path("online_metrics.csv"), resume=True,
                           keep_rows_until=("episode", run["episode"]))
        start -= run["elapsed"]
    else:
        agent.start_online(args.online_lr or c.lr)
        logger = CSVLogger(folder.path("online_metrics.csv"))
        initial = evaluate(agent, args.dataset, args.eval_episodes, seed=args.seed, progress=not args.no_progress,
                           max_episode_steps=args.max_episode_steps)
        check_finite_actions(initial, agent.step)
        run = dict(episode=0, best_success=initial["success"], env_steps=0, recent_success=[])
        log_row(logger, args, dict(episode=0, step=agent.step, env_steps=0, **eval_columns(initial)), start)
        save_checkpoint(online_checkpoint(agent, run, args, start, online_data, (offline_sampler, online_sampler),
                                          goal_rng), paths["best"])
        folder.committed()
        tqdm.write(f"checkpoint {args.checkpoint}: greedy success {run['best_success']:.3f} before online fine-tuning")
    if args.online_low_level == "frozen":
        agent.freeze_low_level()

    bar = tqdm(range(run["episode"] + 1, args.max_episodes + 1), desc="online", disable=args.no_progress)
    for episode in bar:
        epsilon, noise = exploration_schedule(vars(args), episode - 1, args.max_episodes)
        ob, goal = reset_for_goal(env, episode, args.goal_source, goal_rng, seed=args.seed * 1_000_003 + episode)
        actor = agent.make_explorer(np.asarray(goal, np.float32)[None], epsilon, noise)
        observations, actions, reached, reward = run_episode(env, actor, ob)
        online_data.append(observations, actions, goal, reached)
        online_sampler.refresh()
        run["episode"], run["env_steps"] = episode, run["env_steps"] + len(actions) - 1
        infos, online_windows = [], []
        for _ in range(args.updates_per_episode):
            draws = [mixed_batch(offline_sampler, online_sampler, args.batch_size, args.online_ratio, device=device)
                     for _ in range(1 + c.critic_steps)]
            value_batches = [mixed_batch(offline_sampler, online_sampler, c.value_batch_size, args.online_ratio,
                                         "sample_transitions", steps=c.subgoal_steps, device=device)[0]
                             for _ in range(c.value_steps)]
            online_windows += [n_online for _, n_online in draws]
            infos.append(agent.update(draws[0][0], [batch for batch, _ in draws[1:]], value_batches))
            check_finite(infos[-1], agent.step)
        check_finite_weights(agent.named_weights(), agent.step)   # before anything of this episode is saved
        run["recent_success"] = (run["recent_success"] + [float(reached.any())])[-SUCCESS_SMOOTHING:]
        row = dict(episode=episode, step=agent.step, env_steps=run["env_steps"], **{
            "online/success": float(reached.any()), "online/episode_reward": reward,
            "online/episode_length": len(actions) - 1, "exploration/epsilon": epsilon,
            "exploration/action_noise": noise,
            "exploration/explored_fraction": actor.explored_steps / max(1, len(actions) - 1),
            "train/online_windows": float(np.mean(online_windows)) if online_windows else 0.0})
        if infos:
            row.update({k: float(np.mean([i[k] for i in infos])) for k in
                        ("train/total_loss", "critic/loss", "value/loss", "inverse/loss", "infonce/loss")})
        samplers = (offline_sampler, online_sampler)
        if episode % args.eval_every == 0 or episode == args.max_episodes:
            result = evaluate(agent, args.dataset, args.eval_episodes, seed=args.seed, progress=not args.no_progress,
                              max_episode_steps=args.max_episode_steps)
            check_finite_actions(result, agent.step)
            row.update(eval_columns(result))
            if result["success"] > run["best_success"]:
                run["best_success"] = result["success"]
                save_checkpoint(online_checkpoint(agent, run, args, start, online_data, samplers, goal_rng),
                                paths["best"])
            tqdm.write(f"episode {episode}: greedy success {result['success']:.3f} (best {run['best_success']:.3f})")
        log_row(logger, args, row, start)  # before the checkpoint: a resume drops rows newer than its checkpoint
        save_checkpoint(online_checkpoint(agent, run, args, start, online_data, samplers, goal_rng), paths["last"])
        folder.committed()
        bar.set_postfix(success=f"{np.mean(run['recent_success']):.2f}", eps=f"{epsilon:.2f}",
                        loss=f"{row.get('train/total_loss', float('nan')):.2f}")
    return run["best_success"]


BUFFER_FIELDS = ("observations", "actions", "traj_ends", "commanded_goals", "reached")


def online_checkpoint(agent, run, args, start, online_data, samplers, goal_rng):
    """Everything --resume needs: the agent, the run counters, the replay buffer and every random stream."""
    state = agent.state_dict()
    state.update(phase=agent.phase, episode=run["episode"], best_success=run["best_success"], run_config=vars(args),
                 run=dict(run, elapsed=time.time() - start),
                 online_buffer={k: torch.as_tensor(getattr(online_data, k)) for k in BUFFER_FIELDS},
                 rng_torch=torch.get_rng_state(), rng_goals=goal_rng.bit_generator.state,
                 rng_samplers=[s.rng.bit_generator.state for s in samplers])
    return state


def restore_run(checkpoint, agent, online_data, online_sampler, offline_sampler, goal_rng):
    if "online_buffer" not in checkpoint:
        raise UserError("the checkpoint to resume is not an online run's last_online_model.pth")
    agent.phase = checkpoint["phase"]
    for key in BUFFER_FIELDS:
        setattr(online_data, key, checkpoint["online_buffer"][key].numpy())
    online_sampler.refresh()
    for sampler, rng_state in zip((offline_sampler, online_sampler), checkpoint["rng_samplers"]):
        sampler.rng.bit_generator.state = rng_state
    goal_rng.bit_generator.state = checkpoint["rng_goals"]
    torch.set_rng_state(checkpoint["rng_torch"].cpu())
    return dict(checkpoint["run"])


def eval_columns(result):
    keys = ["success"] + [f"task{i}_success" for i in range(1, NUM_EVAL_TASKS + 1)] + ["non_finite_episodes"]
    return {f"eval/{k}": result[k] for k in keys}


def log_row(logger, args, row, start):
    row["time/elapsed_s"] = time.time() - start
    logger.log({k: row.get(k, float("nan")) for k in COLUMNS})
    plot_curves(logger.path, os.path.join(args.save_dir, "online_training_curves.png"), "episode", CURVE_PANELS,
                title=f"OPSO online: {args.dataset}")


if __name__ == "__main__":
    exit_on_user_error(main)
