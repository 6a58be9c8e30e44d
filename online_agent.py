"""The online OPSO agent: the offline agent plus goal-biased exploration and the offline-to-online switch.

Exploration (SPEC.md, "Online fine-tuning"): with probability epsilon the subgoal is a goal-biased interpolation
z' = s + alpha (z_g - s), alpha ~ U(0.2, 1.0), from the agent's point s = E([o_t]) in the subgoals' space, else
the greedy subgoal; the action is I(z, z', z_g) plus Gaussian noise, clipped to [-1, 1]. Epsilon and the noise
decay linearly over the online run. Fine-tuning mixes offline and online windows (CORL / fql style: separate
buffers, a ratio, and a named switch `start_online` where the offline phase ends); every loss and update is the
offline agent's.
"""
import numpy as np
import torch

from offline_agent import Actor, OfflineAgent
from utils import linear_schedule

EXPLORE_ALPHA_RANGE = (0.2, 1.0)


class OnlineAgent(OfflineAgent):
    """Adds exploration and the offline-to-online switch."""

    phase = "offline"

    def start_online(self, lr):
        """The named switch: from here on, updates are online fine-tuning at learning rate `lr`.

        The offline phase has a constant learning rate and nothing else that is tied to its length;
        the optimiser's moments and the EMA targets carry over on purpose (no cold restart).
        """
        self.phase = "online"
        self.online_start_step = self.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def freeze_low_level(self):
        """The encoder and the inverse dynamics keep their weights from here on, so online updates move the high
        level alone (value, critic, proposer) on the representation the low level was trained on: on the ant the
        low level that followed the oracle's subgoals to 0.91-0.98 fell to 0.43-0.59 within 100-300 online
        episodes when it trained (BENCHMARKS.md, issue 25). Not saved in checkpoints: the trainer freezes again
        on resume."""
        self.encoder.requires_grad_(False)
        self.heads.inverse.requires_grad_(False)

    def make_explorer(self, goals, epsilon, action_noise, streams=2):
        return ExploringActor(self, goals, epsilon, action_noise, streams)


def goal_biased_subgoals(origin, z_goal, epsilon, greedy):
    """Per row, with probability epsilon, s + alpha (z_g - s) with alpha ~ U(0.2, 1) from the origin s; else the
    greedy subgoal. Returns (subgoals, which rows explored)."""
    n = len(origin)
    alpha = torch.empty(n, 1, device=origin.device).uniform_(*EXPLORE_ALPHA_RANGE)
    biased = origin + alpha * (z_goal - origin)
    explore = torch.rand(n, 1, device=origin.device) < epsilon
    return torch.where(explore, biased, greedy), explore.squeeze(1)


class ExploringActor(Actor):
    """The recurrent greedy actor with goal-biased exploration and Gaussian action noise."""

    def __init__(self, agent, goals, epsilon, action_noise, streams=2):
        super().__init__(agent, goals, "recurrent", streams)
        self.epsilon, self.action_noise = epsilon, action_noise
        self.explored_steps = 0

    def subgoal(self, z, here, observations):
        subgoals, explored = goal_biased_subgoals(here, self.z_goal, self.epsilon, super().subgoal(z, here, observations))
        self.explored_steps += int(explored.sum())
        return subgoals

    def perturb(self, action):
        return action + self.action_noise * torch.randn_like(action)


def exploration_schedule(config, episode, max_episodes):
    """(epsilon, action noise) for an episode: linear from start to end over the online run."""
    progress = episode / max(1, max_episodes - 1)
    return (linear_schedule(config["epsilon_start"], config["epsilon_end"], progress),
            linear_schedule(config["action_noise_start"], config["action_noise_end"], progress))


def online_fraction_of_batch(batch_size, online_ratio, online_transitions):
    """Windows drawn from the online buffer: none until it holds data, then round(ratio * batch)."""
    if online_transitions == 0:
        return 0
    return int(np.clip(round(online_ratio * batch_size), 0, batch_size))
