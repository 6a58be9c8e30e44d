"""The online OPSO agent: the offline agent plus goal-biased exploration and offline-to-online fine-tuning.

Exploration (SPEC.md, "Online fine-tuning"): with probability epsilon the subgoal is a goal-biased
interpolation z' = s + alpha (z_g - s), alpha ~ U(0.2, 1.0), from the agent's point s in the subgoals'
space (E([o_t]) for goal-encoded subgoals, else z_t: OfflineAgent.subgoal_origin), else the greedy subgoal; the
action is I(z, z', z_g) plus Gaussian noise, clipped to [-1, 1]. Epsilon and the noise decay
linearly over the online run. Fine-tuning mixes offline and online windows (CORL / fql style:
separate buffers, a ratio, and a named switch `start_online` where the offline phase ends).
"""
import numpy as np
import torch

from offline_agent import OfflineAgent, RecurrentActor
from utils import linear_schedule

EXPLORE_ALPHA_RANGE = (0.2, 1.0)


class OnlineAgent(OfflineAgent):
    """Adds exploration and the offline-to-online switch; every loss and update is the offline one."""

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

    @torch.no_grad()
    def explore_subgoal(self, z, z_goal, epsilon, origin=None, generator=None, greedy=None):
        """Goal-biased interpolation s + alpha (z_g - s) from the origin s (`subgoal_origin`, z when not given)
        with probability epsilon per row, else the greedy subgoal (`greedy`; the policy search's if not given)."""
        n, origin = len(z), z if origin is None else origin
        alpha = torch.empty(n, 1, device=z.device).uniform_(*EXPLORE_ALPHA_RANGE, generator=generator)
        biased = origin + alpha * (z_goal - origin)
        explore = torch.rand(n, 1, device=z.device, generator=generator) < epsilon
        if explore.all():
            return biased, explore.squeeze(1)
        greedy = self.search_subgoal(z, z_goal, origin) if greedy is None else greedy
        return torch.where(explore, biased, greedy), explore.squeeze(1)

    def make_explorer(self, goals, epsilon, action_noise, streams=2):
        return ExploringActor(self, goals, epsilon, action_noise, streams)


class ExploringActor(RecurrentActor):
    """The recurrent actor with goal-biased exploration and Gaussian action noise."""

    def __init__(self, agent, goals, epsilon, action_noise, streams=2):
        super().__init__(agent, goals, streams)
        self.epsilon, self.action_noise = epsilon, action_noise
        self.explored_steps = 0

    @torch.no_grad()
    def act(self, observations):
        observations = self.observation_tensor(observations)
        z = self.latent(observations)
        origin = self.agent.subgoal_origin(z, observations)
        greedy = self.agent.choose_subgoal(z, self.z_goal, observations, self.table)
        z_next, explored = self.agent.explore_subgoal(z, self.z_goal, self.epsilon, origin, greedy=greedy)
        self.explored_steps += int(explored.sum())
        action = self.agent.inverse_action(z, observations, z_next, self.z_goal)
        action = action + self.action_noise * torch.randn_like(action)
        return action.clamp(-1, 1).cpu().numpy()


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
