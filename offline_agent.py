"""The offline OPSO agent: losses, one update on a batch of windows, and acting by policy search.

Losses (SPEC.md, "Offline training"): a k-step critic Q(z_t, z', z_g), z' the subgoal k steps ahead, with
clipped double Q and EMA targets (Edwards et al., 2020; HIQL's k-step latent subgoals, Park et al., 2023),
an expectile value V(z_t, z_g) (IQL, Kostrikov et al., 2021), InfoNCE between a state and a future state
of its trajectory (CRL, Eysenbach et al., 2022), state and reward/done predictors, inverse dynamics and an
advantage-weighted subgoal proposer (AWR, Peng et al., 2019); the inverse dynamics' own weights have
their own temperature (`inverse_beta`, 0 by default: measured, see BENCHMARKS.md).
Acting: a subgoal z', and the action I(z, z', z_g). With subgoal_source='proposer', SPEC's policy search:
candidates z' (the proposer, noisy copies, goal-biased interpolations z + alpha (z_g - z)), the one with the
largest Q wins; with subgoal_source='data' (`SubgoalTable`), a real dataset state k steps on from one of the
dataset states nearest to the agent, the one with the largest V(z', z_g); by default (subgoal_source='switch')
the data's subgoal until the agent stalls, then the policy search's until it stalls again, and so on
(`StallSwitch`; measured, see BENCHMARKS.md).
"""
import copy
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from model import EncoderConfig, HeadsConfig, MambaEncoder, OPSOHeads
from utils import CHECKPOINT_FORMAT, UserError

MAX_ADVANTAGE_WEIGHT = 100.0   # AWR weights exp(beta * A) are clipped here (OGBench's choice)
GRAD_CLIP_NORM = 10.0
INFONCE_SAMPLES = 256          # anchors per batch for InfoNCE; the other rows are the negatives
INFONCE_TEMPERATURE = 0.1


@dataclass
class AgentConfig:
    obs_dim: int
    action_dim: int
    latent_dim: int = 64
    d_model: int = 128
    n_layers: int = 2
    hidden_dim: int = 256
    context_length: int = 100
    subgoal_steps: int = 25
    discount: float = 0.99
    expectile: float = 0.9
    beta: float = 3.0
    inverse_beta: Optional[float] = 0.0
    lr: float = 3e-4
    tau: float = 0.02
    infonce_coef: float = 0.1
    state_coef: float = 1.0
    reward_coef: float = 1.0
    proposer_coef: float = 1.0
    num_noisy_candidates: int = 8
    candidate_noise: float = 0.1
    num_interpolations: int = 0
    hindsight_bound: bool = False
    subgoal_latent: str = "goal"
    advantage: str = "kstep"
    inverse_state: str = "history"
    inverse_subgoal: str = "uniform"
    critic_steps: int = 1
    critic_step_proposer: bool = False
    critic_batch: str = "windows"
    subgoal_source: str = "switch"
    data_neighbors: int = 4096
    data_stride: int = 5
    data_lookahead: Optional[int] = None
    stall_steps: int = 50
    stall_radius: float = 1.0
    mamba_backend: str = "auto"


class Latents(NamedTuple):
    z: torch.Tensor             # z_t, the encoder's output over the window
    z_next: torch.Tensor        # z', the subgoal k steps ahead, as Q, I, the reward head and P see it
    z_future: torch.Tensor      # z_{t+k} as a history latent, for the value bootstrap V(z_{t+k}, z_g)
    z_value_goal: torch.Tensor
    z_actor_goal: torch.Tensor
    z_state: torch.Tensor       # the inverse dynamics' state input: z_t, or E([o_t]) (inverse_state='observation')
    z_inverse_next: torch.Tensor  # the inverse dynamics' subgoal: z', or the one d ~ U{1..k} steps ahead ('uniform')


SUBGOAL_LATENTS = ("goal", "history")
ADVANTAGES = ("q", "kstep")
INVERSE_STATES = ("history", "observation")
INVERSE_SUBGOALS = ("k", "uniform")
CRITIC_BATCHES = ("windows", "transitions")
SUBGOAL_SOURCES = ("proposer", "data", "switch")


def expectile_loss(diff, expectile):
    """IQL's asymmetric square: weight `expectile` where diff = target - prediction > 0, else 1 - expectile."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff.square()


def advantage_weights(advantage, beta, max_weight=MAX_ADVANTAGE_WEIGHT):
    return torch.exp(beta * advantage).clamp(max=max_weight)


def info_nce_loss(anchors, positives, temperature=INFONCE_TEMPERATURE):
    """Cross-entropy of matching row i to row i; logits are cosine similarities / temperature.

    Cosine logits are bounded, so the loss cannot grow with the latents' scale, which the critic sets.
    """
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    labels = torch.arange(len(anchors), device=anchors.device)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def at_positions(sequences, offsets):
    """sequences (B, W, D) read at window positions offsets (B, W): out[b, i] = sequences[b, offsets[b, i]]."""
    return torch.gather(sequences, 1, offsets.unsqueeze(-1).expand(-1, -1, sequences.shape[-1]))


def valid_rows(batch):
    """The positions of a batch of windows that have a subgoal k steps ahead (future_valid), flattened:
    every per-position entry (N, ...) and the observation k steps ahead, o_{t+k} (N, obs_dim)."""
    mask = batch["future_valid"]
    b, t = mask.nonzero(as_tuple=True)
    rows = {key: value[b, t] for key, value in batch.items() if value.shape[:2] == mask.shape}
    return rows, batch["observations"][b, batch["future_offset"][b, t]]


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class OfflineAgent:
    """Encoder + heads + EMA target critics + one Adam optimiser."""

    def __init__(self, config: AgentConfig, device="cpu"):
        if config.subgoal_latent not in SUBGOAL_LATENTS:
            raise ValueError(f"subgoal_latent must be one of {SUBGOAL_LATENTS}, got {config.subgoal_latent!r}")
        if config.inverse_state not in INVERSE_STATES:
            raise ValueError(f"inverse_state must be one of {INVERSE_STATES}, got {config.inverse_state!r}")
        if config.inverse_subgoal not in INVERSE_SUBGOALS:
            raise ValueError(f"inverse_subgoal must be one of {INVERSE_SUBGOALS}, got {config.inverse_subgoal!r}")
        if config.critic_batch not in CRITIC_BATCHES:
            raise ValueError(f"critic_batch must be one of {CRITIC_BATCHES}, got {config.critic_batch!r}")
        if config.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {config.advantage!r}")
        if config.subgoal_source not in SUBGOAL_SOURCES:
            raise ValueError(f"subgoal_source must be one of {SUBGOAL_SOURCES}, got {config.subgoal_source!r}")
        if min(config.data_neighbors, config.data_stride, 1 if config.data_lookahead is None else config.data_lookahead) < 1:
            raise ValueError(f"data_neighbors, data_stride and data_lookahead must be >= 1, got {config.data_neighbors}, "
                             f"{config.data_stride} and {config.data_lookahead}")
        if config.stall_steps < 1 or not config.stall_radius > 0:
            raise ValueError(f"stall_steps must be >= 1 and stall_radius > 0, got {config.stall_steps} and "
                             f"{config.stall_radius}")
        self.config = config
        self.device = torch.device(device)
        self.encoder = MambaEncoder(self.encoder_config(), backend=config.mamba_backend).to(self.device)
        self.heads = OPSOHeads(HeadsConfig(config.latent_dim, config.obs_dim, config.action_dim,
                                           config.hidden_dim)).to(self.device)
        self.targets = torch.nn.ModuleDict(dict(q1=copy.deepcopy(self.heads.q1), q2=copy.deepcopy(self.heads.q2),
                                                value=copy.deepcopy(self.heads.value))).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.lr)
        self.step = 0
        self.subgoal_data = None

    def encoder_config(self):
        c = self.config
        return EncoderConfig(c.obs_dim, c.latent_dim, c.d_model, c.n_layers)

    @property
    def context_length(self):
        return self.config.context_length

    def parameters(self):
        return list(self.encoder.parameters()) + list(self.heads.parameters())

    def set_normalization(self, observations):
        """Observation mean/std of the dataset, kept in the encoder's buffers (and so in checkpoints)."""
        observations = np.asarray(observations)
        self.encoder.set_normalization(observations.mean(0), observations.std(0))

    @property
    def acts_with_data(self):
        """Whether acting needs the dataset's states (subgoal_source 'data' or 'switch')."""
        return self.config.subgoal_source in ("data", "switch")

    def set_subgoal_data(self, dataset):
        """The dataset whose real states subgoal_source 'data' and 'switch' act with (not saved in checkpoints: the
        trainers and `ogbench_utils.py evaluate` set it from the dataset they load)."""
        c = self.config
        self.subgoal_data = DataSubgoals.from_dataset(dataset, c.subgoal_steps, c.data_stride, c.data_lookahead,
                                                      self.device)

    # ------------------------------------------------------------------ latents

    def encode_batch(self, batch):
        """Latents of a batch: z_t (B, W, Z) from the window, the subgoal z', the future state z_{t+k}, goals.

        With subgoal_latent='goal', z' = E([o_{t+k}]) is encoded like a goal: it holds only the state k steps
        ahead, so the proposer, the critic and the inverse dynamics see at acting time the kind of z' they
        were trained on, and I(z, z', z_g) cannot read a_t off the history (o_{t+1}) inside z_{t+k}. The
        value bootstrap V(z_{t+k}, z_g) keeps the history latent either way (V is trained on history latents).
        """
        c, observations = self.config, batch["observations"]
        z = self.encoder(observations)                                            # (B, W, Z)
        z_future = at_positions(z, batch["future_offset"])                       # z_{t+k}, history latent
        goals = [batch["value_goals"], batch["actor_goals"]]
        encode_observations = c.subgoal_latent == "goal" or c.inverse_state == "observation"
        if encode_observations:   # E([o_t]) at every window position, read at the subgoal offsets below
            goals.append(observations)
        encoded = self.encoder.encode_goals(torch.stack(goals))
        z_observation = encoded[2] if encode_observations else None
        subgoal_source = z_observation if c.subgoal_latent == "goal" else z
        z_next = at_positions(subgoal_source, batch["future_offset"])
        z_inverse_next = (at_positions(subgoal_source, batch["inverse_offset"]) if c.inverse_subgoal == "uniform"
                          else z_next)
        z_state = z_observation if c.inverse_state == "observation" else z
        return Latents(z, z_next, z_future, encoded[0], encoded[1], z_state, z_inverse_next)

    # ------------------------------------------------------------------ losses

    def critic_loss(self, z, z_next, z_future, z_goal, batch, valid):
        with torch.no_grad():
            next_v = self.targets["value"](z_future, z_goal)
            q_target = batch["kstep_returns"] + batch["kstep_discounts"] * batch["kstep_masks"] * next_v
            if self.config.hindsight_bound:
                # the data's path to a same-trajectory goal is a return the agent can achieve, so the target
                # never goes below it: long distances are known at once instead of after many backups
                q_target = torch.maximum(q_target, batch["hindsight_returns"])
        q1, q2 = self.heads.q_values(z, z_next, z_goal)
        loss = masked_mean((q1 - q_target).square() + (q2 - q_target).square(), valid)
        return loss, {"critic/loss": loss, "critic/q_mean": masked_mean(q1, valid),
                      "critic/q_min": q1[valid > 0].min(), "critic/q_max": q1[valid > 0].max(),
                      "critic/target_mean": masked_mean(q_target, valid)}

    def value_loss(self, z, z_next, z_goal, valid):
        with torch.no_grad():
            q_target = torch.minimum(self.targets["q1"](z, z_next, z_goal), self.targets["q2"](z, z_next, z_goal))
        v = self.heads.value(z, z_goal)
        loss = masked_mean(expectile_loss(q_target - v, self.config.expectile), valid)
        return loss, {"value/loss": loss, "value/v_mean": masked_mean(v, valid),
                      "value/v_min": v[valid > 0].min(), "value/v_max": v[valid > 0].max()}

    def infonce_loss(self, z, z_actor_goal, step_valid):
        flat_z, flat_g = z.reshape(-1, z.shape[-1]), z_actor_goal.reshape(-1, z.shape[-1])
        valid_rows = torch.nonzero(step_valid.reshape(-1)).squeeze(1)
        rows = valid_rows[torch.randperm(len(valid_rows), device=z.device)[:INFONCE_SAMPLES]]
        loss, accuracy = info_nce_loss(flat_z[rows], flat_g[rows])
        return loss, {"infonce/loss": loss, "infonce/accuracy": accuracy}

    def state_loss(self, z, batch):
        obs = self.encoder.normalize(batch["observations"])
        predicted_delta = self.heads.state(z[:, :-1], batch["actions"][:, :-1])
        error = (predicted_delta - (obs[:, 1:] - obs[:, :-1])).square().mean(-1)
        loss = masked_mean(error, batch["next_valid"][:, :-1].float())
        return loss, {"state/loss": loss}

    def reward_loss(self, z, z_next, z_goal, batch, valid):
        reward_pred, done_logit = self.heads.reward(z, z_next, z_goal).unbind(-1)
        reward_mse = masked_mean((reward_pred - batch["rewards"]).square(), valid)
        done_bce = masked_mean(F.binary_cross_entropy_with_logits(
            done_logit, batch["successes"].float(), reduction="none"), valid)
        loss = reward_mse + done_bce
        return loss, {"reward/loss": loss, "reward/reward_mse": reward_mse, "reward/done_bce": done_bce}

    def policy_losses(self, z, z_state, z_next, z_inverse_next, z_future, z_goal, batch, valid):
        """Inverse dynamics I(z, z', z_g) -> a and proposer P(z, z_g) -> z', both advantage-weighted."""
        with torch.no_grad():
            advantage = self.policy_advantage(z, z_next, z_future, z_goal, batch)
            weights = advantage_weights(advantage, self.config.beta)
            inverse_beta = self.config.beta if self.config.inverse_beta is None else self.config.inverse_beta
            inverse_weights = advantage_weights(advantage, inverse_beta)
        action = self.heads.action(z_state, z_inverse_next, z_goal)
        action_error = (action - batch["actions"]).square().sum(-1)
        inverse = masked_mean(inverse_weights * action_error, valid)
        proposer = self.proposer_loss(z, z_next, z_goal, weights, valid)
        info = {"inverse/loss": inverse, "inverse/action_mse": masked_mean(action_error, valid),
                "inverse/advantage_mean": masked_mean(advantage, valid), "inverse/weight_mean": masked_mean(weights, valid),
                "proposer/loss": proposer}
        return inverse, proposer, info

    def proposer_loss(self, z, z_next, z_goal, weights, valid):
        """AWR for P(z, z_g) -> z': the data's subgoal, weighted by exp(beta A); no gradient into the latents."""
        proposal = self.heads.proposer(z.detach(), z_goal.detach())
        return masked_mean(weights * (proposal - z_next.detach()).square().sum(-1), valid)

    def policy_advantage(self, z, z_next, z_future, z_goal, batch):
        """A(z, z', z_g) = Q - V(z, z_g), Q either the target critics' min ('q') or the data's own k-step
        return to the goal plus the discounted V(z_{t+k}, z_g) ('kstep', HIQL's high-level advantage): the
        environment is deterministic, so the k-step target is Q of the data's z' without the critic's fit error.
        """
        v = self.heads.value(z, z_goal)
        if self.config.advantage == "kstep":
            bootstrap = batch["kstep_discounts"] * batch["actor_kstep_masks"] * self.heads.value(z_future, z_goal)
            return batch["actor_kstep_returns"] + bootstrap - v
        return torch.minimum(self.targets["q1"](z, z_next, z_goal), self.targets["q2"](z, z_next, z_goal)) - v

    # ------------------------------------------------------------------ update

    def update(self, batch):
        """One gradient step on every loss; returns a dict of floats, namespaced per loss."""
        c = self.config
        z, z_next, z_future, z_value_goal, z_actor_goal, z_state, z_inverse_next = self.encode_batch(batch)
        valid = batch["future_valid"].float()
        critic, info = self.critic_loss(z, z_next, z_future, z_value_goal, batch, valid)
        value, value_info = self.value_loss(z, z_next.detach(), z_value_goal, valid)
        infonce, infonce_info = self.infonce_loss(z, z_actor_goal, batch["step_valid"])
        state, state_info = self.state_loss(z, batch)
        reward, reward_info = self.reward_loss(z, z_next, z_value_goal, batch, valid)
        inverse, proposer, policy_info = self.policy_losses(z, z_state, z_next, z_inverse_next, z_future, z_actor_goal, batch, valid)
        total = (critic + value + c.infonce_coef * infonce + c.state_coef * state + c.reward_coef * reward
                 + inverse + c.proposer_coef * proposer)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        self.update_targets()
        self.step += 1
        for extra in (value_info, infonce_info, state_info, reward_info, policy_info):
            info.update(extra)
        info.update({"train/total_loss": total, "train/grad_norm": grad_norm})
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in info.items()}

    def critic_update(self, batch):
        """A critic and value step on single-observation latents: z_t = E([o_t]), z_{t+k} = E([o_{t+k}]).

        The critic needs many backups to carry values across a maze; without the window encoder a step
        costs about 35% of an `update` (BENCHMARKS.md), so `critic_steps` of them per update multiply the
        backups. Only the positions with a subgoal k ahead are encoded (a batch of windows or of transitions).
        """
        c = self.config
        rows, future_observations = valid_rows(batch)
        inputs = [rows["observations"], future_observations, rows["value_goals"]]
        if c.critic_step_proposer:
            inputs.append(rows["actor_goals"])
        encoded = self.encoder.encode_goals(torch.stack(inputs))
        z_observation, z_future, z_goal = encoded[:3]
        valid = torch.ones(len(z_observation), device=z_observation.device)
        critic, _ = self.critic_loss(z_observation, z_future, z_future, z_goal, rows, valid)
        value, _ = self.value_loss(z_observation, z_future.detach(), z_goal, valid)
        info = {"critic_steps/critic_loss": critic, "critic_steps/value_loss": value}
        total = critic + value
        if c.critic_step_proposer:   # the proposer learns on E([o_t]) too, as often as the critic
            with torch.no_grad():
                advantage = self.policy_advantage(z_observation, z_future, z_future, encoded[3], rows)
            weights = advantage_weights(advantage, c.beta)
            proposer = self.proposer_loss(z_observation, z_future, encoded[3], weights, valid)
            info["critic_steps/proposer_loss"] = proposer
            total = total + c.proposer_coef * proposer
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        self.update_targets()
        return {k: float(v.detach()) for k, v in info.items()}

    def proposer_update(self, batch):
        """One AWR step of the proposer alone; the encoder, critics, value and inverse dynamics stay frozen.

        P's targets E([o_{t+k}]) move with the encoder during joint training, so at the end P lags the
        latents it is read against (BENCHMARKS.md, "proposer phase"); steps of P alone on the final
        encoder let it catch up. Only P's parameters get gradients, so the shared Adam (which skips
        parameters without one) moves nothing else, and the target critics are not touched.
        """
        with torch.no_grad():
            lat = self.encode_batch(batch)
            advantage = self.policy_advantage(lat.z, lat.z_next, lat.z_future, lat.z_actor_goal, batch)
            weights = advantage_weights(advantage, self.config.beta)
        loss = self.proposer_loss(lat.z, lat.z_next, lat.z_actor_goal, weights, batch["future_valid"].float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.heads.proposer.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        return {"proposer/loss": float(loss.detach())}

    def train_step(self, draw_windows, draw_transitions=None):
        """`update` on one batch of windows, then `critic_steps` critic steps on fresh batches: of windows,
        or, with critic_batch='transitions', of independent transitions (draw_transitions() -> batch)."""
        draw = draw_transitions if self.config.critic_batch == "transitions" else draw_windows
        if draw is None and self.config.critic_steps > 0:   # before the update, so a misuse changes nothing
            raise ValueError("critic_batch='transitions' needs a draw_transitions function")
        info = self.update(draw_windows())
        for _ in range(self.config.critic_steps):
            info.update(self.critic_update(draw()))
        return info

    @torch.no_grad()
    def update_targets(self):
        for name, target in self.targets.items():
            for p_target, p in zip(target.parameters(), getattr(self.heads, name).parameters()):
                p_target.lerp_(p, self.config.tau)

    # ------------------------------------------------------------------ acting

    @torch.no_grad()
    def latents(self, observation_windows, goals):
        windows = torch.as_tensor(np.asarray(observation_windows), dtype=torch.float32, device=self.device)
        goals = torch.as_tensor(np.asarray(goals), dtype=torch.float32, device=self.device)
        return self.encoder(windows)[:, -1], self.encoder.encode_goals(goals)

    def subgoal_origin(self, z, observations):
        """Where the agent stands in the subgoals' space: E([o_t]) when subgoals are goal encodings, else z_t.
        Steps and interpolations towards z_g start here, so they stay in the space Q and I were trained on."""
        return self.encoder.encode_goals(observations) if self.config.subgoal_latent == "goal" else z

    def candidates(self, z, z_goal, origin=None):
        """(N, C, Z): the proposal, noisy copies of it, and goal-biased interpolations s + alpha (z_g - s)
        from the origin s (`subgoal_origin`; z when not given).

        Q has only seen subgoals k steps away; a far interpolation (through a wall, say) is out of its
        data and may look best for no reason. So alpha goes up to the proposal's step length
        ||P(z, z_g) - s|| / ||z_g - s|| (or to 1 when the goal is within one step).
        """
        c = self.config
        origin = z if origin is None else origin
        proposal = self.heads.proposer(z, z_goal)
        step = (proposal - origin).norm(dim=-1, keepdim=True)
        parts = [proposal.unsqueeze(1)]
        if c.num_noisy_candidates > 0:
            scale = c.candidate_noise * step / math.sqrt(z.shape[-1])
            noise = torch.randn(len(z), c.num_noisy_candidates, z.shape[-1], device=z.device)
            parts.append(proposal.unsqueeze(1) + scale.unsqueeze(1) * noise)
        if c.num_interpolations > 0:
            reach = (step / (z_goal - origin).norm(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
            fractions = torch.linspace(1.0 / c.num_interpolations, 1.0, c.num_interpolations, device=z.device)
            alphas = reach.unsqueeze(1) * fractions.view(1, -1, 1)
            parts.append(origin.unsqueeze(1) + alphas * (z_goal - origin).unsqueeze(1))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def search_subgoal(self, z, z_goal, origin=None):
        return self.best_by_q(z, self.candidates(z, z_goal, origin), z_goal)

    @torch.no_grad()
    def best_by_q(self, z, candidates, z_goal):
        """(N, Z): of candidates (N, C, Z), the one with the largest min(Q1, Q2)(z, z', z_g) per row."""
        n, num = candidates.shape[:2]
        z_rep, g_rep = (t.unsqueeze(1).expand(-1, num, -1) for t in (z, z_goal))
        q = torch.minimum(*self.heads.q_values(z_rep, candidates, g_rep))
        return candidates[torch.arange(n), q.argmax(dim=1)]

    @torch.no_grad()
    def subgoal_table(self, z_goal):
        """The data's subgoals valued for these goals (`SubgoalTable`) when acting with them, else None."""
        c = self.config
        if not self.acts_with_data:
            return None
        if self.subgoal_data is None:
            raise UserError(f"subgoal_source {c.subgoal_source!r} acts with the dataset's states, but none is set: "
                            "call agent.set_subgoal_data(dataset) (the trainers and the evaluate command do)")
        switch = None
        if c.subgoal_source == "switch":
            switch = StallSwitch(len(z_goal), c.stall_steps, c.stall_radius, z_goal.device)
        return SubgoalTable(self, self.subgoal_data, z_goal, switch=switch)

    @torch.no_grad()
    def choose_subgoal(self, z, z_goal, observations, table=None):
        """The greedy subgoal: the data's best real state near o_t (with a table), else the policy search's;
        with a table that has a `StallSwitch`, whichever of the two the switch says per episode."""
        if table is None:
            return self.search_subgoal(z, z_goal, self.subgoal_origin(z, observations))
        if table.switch is None:
            return table.subgoals(observations)
        on_data = table.switch.on_data(observations).unsqueeze(1)
        return torch.where(on_data, table.subgoals(observations),
                           self.search_subgoal(z, z_goal, self.subgoal_origin(z, observations)))

    @torch.no_grad()
    def act(self, observation_windows, goals, table=None):
        """Greedy actions in [-1, 1] for a batch: windows (N, l, obs_dim) of the last l <= L steps.
        Acting with the data's states, pass the goals' `subgoal_table` to act on many steps (else one is built;
        a table also holds the `StallSwitch`'s per-episode state)."""
        z, z_goal = self.latents(observation_windows, goals)
        observations = torch.as_tensor(np.asarray(observation_windows)[:, -1], dtype=torch.float32, device=self.device)
        table = table if table is not None else self.subgoal_table(z_goal)
        z_next = self.choose_subgoal(z, z_goal, observations, table)
        return self.inverse_action(z, observations, z_next, z_goal).clamp(-1, 1).cpu().numpy()

    def inverse_action(self, z, observations, z_next, z_goal):
        """I(z, z', z_g) in [-1, 1], its state input z_t or, with inverse_state='observation', E([o_t]).

        The history holds the velocity and so the last action; an inverse dynamics that sees it can learn
        to repeat that action (the copycat problem of behaviour cloning from histories) and stall once
        it slows down. E([o_t]) holds the current observation only.
        """
        if self.config.inverse_state == "observation":
            z = self.encoder.encode_goals(observations)
        return self.heads.action(z, z_next, z_goal)

    def make_actor(self, goals, mode="recurrent", streams=2):
        """A stateful greedy policy for a batch of episodes that all start now (see the actor classes)."""
        if mode == "recurrent":
            return RecurrentActor(self, goals, streams)
        if mode == "window":
            return WindowActor(self, goals)
        raise ValueError(f"acting mode must be 'recurrent' or 'window', got {mode!r}")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self):
        return {"format": CHECKPOINT_FORMAT, "agent_config": asdict(self.config), "step": self.step,
                "encoder": self.encoder.state_dict(), "heads": self.heads.state_dict(),
                "targets": self.targets.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.encoder.load_state_dict(state["encoder"])
        self.heads.load_state_dict(state["heads"])
        self.targets.load_state_dict(state["targets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    @classmethod
    def from_checkpoint(cls, checkpoint, device="cpu", **overrides):
        config = dict(checkpoint["agent_config"], **overrides)
        # checkpoints from before these options were trained with what the options now call their old values
        for key, old_value in (("subgoal_latent", "history"), ("advantage", "q"), ("inverse_beta", None),
                               ("inverse_subgoal", "k"), ("critic_steps", 0),
                               ("critic_step_proposer", False), ("critic_batch", "windows"),
                               ("subgoal_source", "proposer")):
            config.setdefault(key, old_value)
        agent = cls(AgentConfig(**config), device=device)
        agent.load_state_dict(checkpoint)
        return agent

    def check_env_sizes(self, obs_dim, action_dim, source="the checkpoint"):
        if (self.config.obs_dim, self.config.action_dim) != (obs_dim, action_dim):
            raise UserError(f"{source} was trained for observations of size {self.config.obs_dim} and actions of "
                            f"size {self.config.action_dim}, but the environment has {obs_dim} and {action_dim}")


class WindowActor:
    """Recomputes the encoder over the last L observations at every step: cost grows with L."""

    def __init__(self, agent, goals):
        self.agent, self.goals = agent, np.asarray(goals, np.float32)
        self.history = None
        with torch.no_grad():
            z_goal = agent.encoder.encode_goals(torch.as_tensor(self.goals, device=agent.device))
        self.table = agent.subgoal_table(z_goal)

    def act(self, observations):
        observations = np.asarray(observations, np.float32)[:, None]
        if self.history is not None:
            keep = self.agent.context_length - 1
            observations = np.concatenate([self.history[:, max(0, self.history.shape[1] - keep):], observations], axis=1)
        self.history = observations
        return self.agent.act(self.history, self.goals, self.table)

    def keep(self, rows):
        """Keep only these episodes (the others ended)."""
        self.history, self.goals = self.history[rows], self.goals[rows]
        if self.table is not None:
            self.table.keep(rows)


class RecurrentActor:
    """Constant cost per step with the encoder's recurrent step mode.

    A recurrent state over the whole episode would see more history than any training window, so
    `streams` recurrent states are restarted in turn, every L / streams steps; the policy reads the
    oldest one. Its latent is exactly the encoder's output for the last c observations, with
    c = t + 1 early on and then c in [L - L/streams + 1, L]: the contexts the training windows hold.
    """

    def __init__(self, agent, goals, streams=2):
        self.agent = agent
        length = agent.context_length
        self.period = max(1, length // streams)
        self.streams = max(1, min(streams, length))
        goals = torch.as_tensor(np.asarray(goals), dtype=torch.float32, device=agent.device)
        with torch.no_grad():
            self.z_goal = agent.encoder.encode_goals(goals)
        self.table = agent.subgoal_table(self.z_goal)
        self.caches = [None] * self.streams
        self.starts = [None] * self.streams
        self.t = 0

    @torch.no_grad()
    def act(self, observations):
        observations = self.observation_tensor(observations)
        z = self.last_latent = self.latent(observations)   # kept for diagnostics (diagnose_acting --on_policy)
        z_next = self.agent.choose_subgoal(z, self.z_goal, observations, self.table)
        return self.agent.inverse_action(z, observations, z_next, self.z_goal).clamp(-1, 1).cpu().numpy()

    def observation_tensor(self, observations):
        """A float tensor on the agent's device (a tensor that already is one passes through uncopied)."""
        if not torch.is_tensor(observations):
            observations = np.asarray(observations)
        return torch.as_tensor(observations, dtype=torch.float32, device=self.agent.device)

    @torch.no_grad()
    def latent(self, observations):
        """Feed one observation per episode; the latent of the oldest stream."""
        obs = self.observation_tensor(observations)
        if self.t % self.period == 0:                       # restart the stream whose turn it is
            s = (self.t // self.period) % self.streams
            self.caches[s], self.starts[s] = self.agent.encoder.allocate_inference_cache(len(obs)), self.t
        latents = {s: self.agent.encoder.step(obs, cache) for s, cache in enumerate(self.caches) if cache is not None}
        oldest = min(latents, key=lambda s: self.starts[s])
        self.t += 1
        return latents[oldest]

    def keep(self, rows):
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.agent.device)
        self.z_goal = self.z_goal[rows]
        if self.table is not None:
            self.table.keep(rows)
        self.caches = [None if c is None else [(conv[rows], ssm[rows]) for conv, ssm in c] for c in self.caches]


class DataSubgoals:
    """Real states of the data as subgoals (subgoal_source='data'): every `stride`-th dataset state o_i; o_j,
    the state k steps later in its own trajectory (j = min(i + k, its last step)); and the state `lookahead`
    steps later (clamped alike), where the trajectory is headed, which the subgoal is valued by (None: the
    successor itself)."""

    def __init__(self, states, successors, lookaheads=None, device="cpu"):
        def tensor(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
        self.states, self.successors = tensor(states), tensor(successors)
        self.lookaheads = None if lookaheads is None else tensor(lookaheads)

    @classmethod
    def from_dataset(cls, dataset, steps, stride, lookahead=None, device="cpu"):
        rows = np.arange(0, len(dataset), stride)

        def ahead(n):
            return dataset.observations[np.minimum(rows + n, dataset.traj_ends[rows])]
        return cls(dataset.observations[rows], ahead(steps),
                   None if lookahead in (None, steps) else ahead(lookahead), device)

    def __len__(self):
        return len(self.states)


class SubgoalTable:
    """The data's subgoals for a batch of episodes: at o_t, of the `data_neighbors` kept states nearest to o_t
    (in normalised observations), the successor o_j with the largest V(E([o_j]), z_g) is the subgoal.

    Each candidate is a real state about k steps from the agent, so Q(z, z', z_g), k rewards of -1 plus
    gamma^k V(z', z_g), ranks them as V does; V is trained on these very encodings and Q scored on such
    pairs picked worse (BENCHMARKS.md, "Real states as subgoals"). Unlike the proposer's regression, which
    can land between two paths around a wall, the subgoal is always a state the data reached. The goals
    stay fixed over the episodes, so V is computed for every (state, goal) once, here; a step then costs
    a nearest-neighbour search.
    """

    def __init__(self, agent, data, z_goal, chunk=65536, switch=None):
        self.agent, self.switch = agent, switch
        self.neighbors = min(agent.config.data_neighbors, len(data))
        encoder, value = agent.encoder, agent.heads.value
        self.states = encoder.normalize(data.states)

        def encode(states):
            return torch.cat([encoder.encode_goals(part) for part in states.split(chunk)])
        self.latents = encode(data.successors)
        valued = self.latents if data.lookaheads is None else encode(data.lookaheads)
        self.values = torch.stack([torch.cat([value(part, goal.expand_as(part)) for part in valued.split(chunk)])
                                   for goal in z_goal])

    def nearest(self, observations):
        """(N, neighbors): indices of the kept states nearest to each observation (N, obs_dim)."""
        distances = torch.cdist(self.agent.encoder.normalize(observations), self.states)
        return distances.topk(self.neighbors, dim=1, largest=False).indices

    def subgoals(self, observations):
        """(N, Z): each episode's subgoal latent at observations (N, obs_dim)."""
        nearest = self.nearest(observations)
        best = nearest.gather(1, self.values.gather(1, nearest).argmax(dim=1, keepdim=True)).squeeze(1)
        return self.latents[best]

    def keep(self, rows):
        self.values = self.values[rows]
        if self.switch is not None:
            self.switch.keep(rows)


class StallSwitch:
    """Which episodes act on the data's subgoals, the others on the policy search's (subgoal_source='switch').

    The two rules fail different tasks of the same checkpoint, and both fail the same way: the agent comes to
    rest, pushing into a wall or at a state none of whose candidates looks better (BENCHMARKS.md, "Where the
    policy fails"). So each episode starts on the data's subgoals and swaps to the other rule whenever its
    position, the first two observation dimensions (x-y in OGBench's mazes), has moved less than `radius`
    over the last `steps` steps; after a swap it gets `steps` steps before it can swap again.
    """

    def __init__(self, episodes, steps, radius, device="cpu"):
        self.steps, self.radius = steps, radius
        self.data = torch.ones(episodes, dtype=torch.bool, device=device)
        self.since_swap = torch.zeros(episodes, dtype=torch.long, device=device)
        self.positions = None   # (N, steps, 2): the last `steps` positions, a ring buffer
        self.t = 0

    def on_data(self, observations):
        """(N,) bool: call once per step with the observations (N, obs_dim); True where the data's subgoal acts."""
        position = observations[:, :2]
        if self.positions is None:
            self.positions = position.unsqueeze(1).repeat(1, self.steps, 1)
        slot = self.t % self.steps
        self.since_swap += 1
        stalled = (self.since_swap > self.steps) & ((position - self.positions[:, slot]).norm(dim=-1) < self.radius)
        self.data ^= stalled
        self.since_swap[stalled] = 0
        self.positions[:, slot] = position
        self.t += 1
        return self.data

    def keep(self, rows):
        self.data, self.since_swap = self.data[rows], self.since_swap[rows]
        if self.positions is not None:
            self.positions = self.positions[rows]
