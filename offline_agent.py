"""The offline OPSO agent: its config, one method per loss, one `update`, and acting (`Actor`).

Losses (SPEC.md, "Offline training"), each in its own method returning (loss, info):
  critic    k-step Q(z_t, z', z_g) toward the k-step return + gamma^k V_target(E([o_{t+k}]), z_g), twin Q's with
            EMA targets (Edwards et al., 2020; HIQL's k-step latent subgoals, Park et al., 2023)
  value     V(E([o_t]), z_g) by k-step expectile TD on independent transitions, in its own steps (HIQL's value,
            k steps at a time; the expectile of IQL, Kostrikov et al., 2021)
  infonce   z_t against the encoding of a future state of its trajectory (CRL, Eysenbach et al., 2022)
  state, reward    the auxiliary predictors
  inverse   I(z_t, z'', .) -> a_t, z'' a state d ~ U{1..k} steps ahead, its goal input z'' itself by default
            (inverse_goal 'subgoal': HIQL's low level sees only its subgoal) or z_g, unweighted (inverse_beta 0)
  proposer  P(z_t, z_g) -> z', weighted by exp(beta A) with HIQL's k-step advantage (AWR, Peng et al., 2019)
`update` takes one gradient step on all but the value on a batch of windows, then `critic_steps` critic steps on
single-observation latents and `value_steps` value steps on batches of transitions. Acting (`Actor`): a subgoal
z' by the config's rule, then the action I(z, z', .):
  proposer  SPEC's policy search: the proposal P(z, z_g), noisy copies, goal-biased interpolations; argmax Q
  data      a real dataset state k steps on from one of the dataset states nearest to o_t's x-y, the one
            with the largest V(z', z_g) (`SubgoalTable`)
  switch    (default) `data` until the agent stalls, then `proposer` until it stalls again (`StallSwitch`)
and under every rule the goal itself once V says it is within `goal_reach_steps` (HIQL's subgoal target is the
state k ahead, never past the goal).
The measurements behind each default are in BENCHMARKS.md.
"""
import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from model import MAMBA_BACKENDS, EncoderConfig, HeadsConfig, MambaEncoder, OPSOHeads
from ogbench_utils import return_of_reaching
from utils import (CHECKPOINT_FORMAT, UserError, context_int, discount_float, flag, non_negative_float,
                   non_negative_int, positive_float, positive_int, unit_float)

MAX_ADVANTAGE_WEIGHT = 100.0   # AWR weights exp(beta * A) are clipped here (OGBench's choice)
GRAD_CLIP_NORM = 10.0
INFONCE_SAMPLES = 256          # anchors per batch for InfoNCE; the other rows are the negatives
INFONCE_TEMPERATURE = 0.1
SUBGOAL_SOURCES = ("proposer", "data", "switch")
CHECKPOINT_KEYS = ("agent_config", "step", "encoder", "heads", "targets", "optimizer")
# what a checkpoint saved before a field existed was trained with (a new default must not change an old agent)
BEFORE_THE_FIELD = dict(inverse_goal="goal", inverse_transitions=0)


@dataclass
class AgentConfig:
    """Everything that defines an agent; each field with a help text is a flag of the trainers (and, in the
    'acting' group, of `offline_trainer.py evaluate`)."""
    obs_dim: int
    action_dim: int
    # model
    context_length: int = flag(100, "observations per window (encoder context L)", context_int, group="model")
    d_model: int = flag(128, "Mamba width", positive_int, group="model")
    n_layers: int = flag(2, "Mamba blocks", positive_int, group="model")
    latent_dim: int = flag(64, "size of the latent z", positive_int, group="model")
    hidden_dim: int = flag(256, "width of every head MLP", positive_int, group="model")
    mamba_backend: str = flag("auto", "auto: mamba_ssm on CUDA when installed, else the PyTorch twin",
                              choices=list(MAMBA_BACKENDS), group="model")
    # training
    subgoal_steps: int = flag(25, "k: the subgoal z' is the state k steps ahead (README: why 25)", positive_int,
                              group="training")
    lr: float = flag(3e-4, "Adam learning rate", positive_float, group="training")
    discount: float = flag(0.99, "discount gamma", discount_float, group="training")
    expectile: float = flag(0.9, "expectile of the value loss", unit_float, group="training")
    beta: float = flag(3.0, "inverse temperature of the proposer's advantage weights", non_negative_float,
                       group="training")
    inverse_goal: str = flag("subgoal", "the goal input of the inverse dynamics I(z, z', .): the episode's goal z_g, or "
                                     "the subgoal z' itself (HIQL's low level sees only its subgoal)",
                             choices=["goal", "subgoal"], group="training")
    inverse_beta: float = flag(0.0, "inverse temperature of the inverse dynamics' weights (0: unweighted)",
                               non_negative_float, group="training")
    tau: float = flag(0.02, "EMA rate of the target critics", unit_float, group="training")
    infonce_coef: float = flag(0.1, "weight of the InfoNCE loss", non_negative_float, group="training")
    state_coef: float = flag(1.0, "weight of the state-prediction loss", non_negative_float, group="training")
    reward_coef: float = flag(1.0, "weight of the reward/done loss", non_negative_float, group="training")
    proposer_coef: float = flag(1.0, "weight of the proposer loss", non_negative_float, group="training")
    critic_steps: int = flag(0, "extra critic steps per update on single-observation latents E([o_t])",
                             non_negative_int, group="training")
    value_steps: int = flag(4, "value steps per update on independent transitions: V(E([o]), E([g])) by k-step "
                               "expectile TD", positive_int, group="training")
    value_batch_size: int = flag(1024, "transitions per value step", positive_int, group="training")
    inverse_transitions: int = flag(1, "1: each value step also trains the inverse dynamics on its transitions, "
                                       "I(E([o_t]), E([o_{t+d}])) -> a_t with d uniform in 1..k (0: windows only)",
                                    choices=[0, 1], type=int, group="training")
    # acting
    subgoal_source: str = flag("switch", "acting: the policy search over the proposal ('proposer'), the best real "
                                         "dataset state by V near the agent ('data'), or 'data' until the agent "
                                         "stalls, then 'proposer' until it stalls again ('switch')",
                               choices=list(SUBGOAL_SOURCES), group="acting")
    num_noisy_candidates: int = flag(8, "policy search: noisy copies of the proposed subgoal", non_negative_int,
                                     group="acting")
    candidate_noise: float = flag(0.1, "policy search: noise of those copies, relative to the proposal's step",
                                  non_negative_float, group="acting")
    num_interpolations: int = flag(0, "policy search: goal-biased interpolations s + alpha (z_g - s) (SPEC's; "
                                      "0 by default: measured worse)", non_negative_int, group="acting")
    data_neighbors: int = flag(4096, "data/switch: dataset states nearest by x-y whose successors are the candidates",
                               positive_int, group="acting")
    data_stride: int = flag(5, "data/switch: keep every N-th dataset state as a candidate", positive_int,
                            group="acting")
    stall_steps: int = flag(50, "switch: an episode has stalled when it moved less than --stall_radius over this "
                                "many steps", positive_int, group="acting")
    stall_radius: float = flag(1.0, "switch: the stall distance, in x-y units of the maze", positive_float,
                               group="acting")
    goal_reach_steps: int = flag(25, "every rule: the subgoal is the goal itself once V(E([o_t]), z_g) says it is "
                                     "at most this many steps away (0: never; 25: the default k)", non_negative_int,
                                 group="acting")

    def __post_init__(self):
        """The constraints between fields (each field's own range is its flag's type)."""
        if self.subgoal_source not in SUBGOAL_SOURCES:
            raise UserError(f"subgoal_source must be one of {SUBGOAL_SOURCES}, got {self.subgoal_source!r}")
        if self.value_steps < 1:
            raise UserError(f"--value_steps must be >= 1 (V is trained by them alone), got {self.value_steps}")
        if self.inverse_goal not in ("goal", "subgoal"):
            raise UserError(f"inverse_goal must be 'goal' or 'subgoal', got {self.inverse_goal!r}")
        if self.inverse_transitions and self.inverse_goal != "subgoal":
            raise UserError("--inverse_transitions 1 trains I(z, z', z') on transitions, which carry no actor goal: "
                            "it needs --inverse_goal subgoal")
        if self.stall_steps < 1 or not self.stall_radius > 0:
            raise UserError(f"stall_steps must be >= 1 and stall_radius > 0, got {self.stall_steps} and "
                            f"{self.stall_radius}")
        if not 1 <= self.subgoal_steps < self.context_length:
            raise UserError(f"--subgoal_steps ({self.subgoal_steps}) must be smaller than --context_length "
                            f"({self.context_length}): the subgoal lies inside the window")
        if not 0.0 <= self.discount < 1.0:
            raise UserError(f"--discount must be in [0, 1), got {self.discount}")

    def sampler_settings(self):
        """The `WindowSampler` keywords this config sets."""
        return dict(context_length=self.context_length, subgoal_steps=self.subgoal_steps, discount=self.discount)

    @property
    def acts_with_data(self):
        """Whether acting needs the dataset's states (subgoal_source 'data' or 'switch')."""
        return self.subgoal_source in ("data", "switch")


class Latents(NamedTuple):
    """The latents of a batch, named as the losses read them (`OfflineAgent.encode_windows`)."""
    z: torch.Tensor                  # z_t: the encoder over the window (for a critic step: E([o_t]))
    z_obs: torch.Tensor              # E([o_t]): what V reads
    z_subgoal: torch.Tensor          # z' = E([o_{t+k}]): the subgoal that Q, the reward head and P see, and the
                                     # value bootstrap V(E([o_{t+k}]), z_g)
    z_inverse_subgoal: torch.Tensor  # E([o_{t+d}]), d ~ U{1..k}: the inverse dynamics' subgoal
    z_value_goal: torch.Tensor       # E([g]) of the value goals (OGBench's relabelling)
    z_actor_goal: torch.Tensor       # E([g]) of the actor goals (same-trajectory future)

    def at_rows(self, b, t):
        """The latents of window positions (b, t) as rows (N, latent)."""
        return Latents(*(None if z is None else z[b, t] for z in self))


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


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def positions_with_a_subgoal(batch):
    """(b, t): the window positions with a subgoal k steps ahead (future_valid)."""
    return batch["future_valid"].nonzero(as_tuple=True)


def rows_at(batch, positions):
    """Every per-position entry of a batch of windows at positions (b, t), flattened to rows (N, ...)."""
    b, t = positions
    return {key: value[b, t] for key, value in batch.items() if value.shape[:2] == batch["future_valid"].shape}


def rows_with_a_subgoal(batch):
    """The positions of a batch of windows that have a subgoal k steps ahead, flattened: every per-position entry
    (N, ...) and the observation k steps ahead, o_{t+k} (N, obs_dim)."""
    b, t = positions = positions_with_a_subgoal(batch)
    return rows_at(batch, positions), batch["observations"][b, batch["future_offset"][b, t]]


def floats(info):
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in info.items()}


class OfflineAgent:
    """Encoder + heads + EMA target critics + one Adam optimiser; `update(batch)` and `make_actor(goals)`."""

    def __init__(self, config: AgentConfig, device="cpu"):
        self.config = config
        self.device = torch.device(device)
        self.encoder = MambaEncoder(EncoderConfig(config.obs_dim, config.latent_dim, config.d_model, config.n_layers),
                                    backend=config.mamba_backend).to(self.device)
        self.heads = OPSOHeads(HeadsConfig(config.latent_dim, config.obs_dim, config.action_dim,
                                           config.hidden_dim)).to(self.device)
        self.targets = torch.nn.ModuleDict(dict(q1=copy.deepcopy(self.heads.q1), q2=copy.deepcopy(self.heads.q2),
                                                value=copy.deepcopy(self.heads.value))).requires_grad_(False)
        # fused: one kernel per step instead of a loop over ~100 tensors (BENCHMARKS.md, section 2)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.lr, fused=True)
        self.step = 0
        self.subgoal_data = self.subgoal_index = None

    @property
    def context_length(self):
        return self.config.context_length

    def parameters(self):
        return list(self.encoder.parameters()) + list(self.heads.parameters())

    def named_weights(self):
        """Every tensor a checkpoint holds for the networks (encoder, heads, targets), by name."""
        for prefix, module in (("encoder", self.encoder), ("heads", self.heads), ("targets", self.targets)):
            for name, tensor in module.state_dict().items():
                yield f"{prefix}.{name}", tensor

    def set_normalization(self, observations):
        """Observation mean/std of the dataset, kept in the encoder's buffers (and so in checkpoints)."""
        observations = np.asarray(observations)
        self.encoder.set_normalization(observations.mean(0), observations.std(0))

    def set_subgoal_data(self, dataset):
        """The dataset whose real states subgoal_source 'data' and 'switch' act with (not saved in checkpoints: the
        trainers and `offline_trainer.py evaluate` set it from the dataset they load)."""
        c = self.config
        self.subgoal_data = DataSubgoals.from_dataset(dataset, c.subgoal_steps, c.data_stride, self.device)
        self.subgoal_index = None

    def nearest_subgoal_states(self):
        """The kept states by position (`NearestByPosition`), one index shared by every actor: the full searches it
        caches depend on the normalised positions alone, which training never moves, so an online run builds it
        once and not at every episode (about 0.7 s of an ant episode; BENCHMARKS.md, "Acting cost")."""
        normalization = torch.cat([self.encoder.obs_mean[:2], self.encoder.obs_std[:2]])
        if self.subgoal_index is None or not torch.equal(self.subgoal_index[0], normalization):
            positions = self.encoder.normalize(self.subgoal_data.states)[:, :2]
            k = min(self.config.data_neighbors, len(self.subgoal_data))
            self.subgoal_index = normalization.clone(), NearestByPosition(positions, k)
        return self.subgoal_index[1]

    # ------------------------------------------------------------------ latents

    def encode_windows(self, batch):
        """Latents of a batch of windows (B, W, ...).

        The subgoals are encoded like goals, E([o_{t+k}]): they hold only the state k steps ahead, so the proposer,
        the critic and the inverse dynamics see at acting time the kind of z' they were trained on, and
        I(z, z', z_g) cannot read a_t off the history (o_{t+1}) inside a window latent. V reads single
        observations too (`value_step_loss`): a state's value does not depend on how the data came to it, so the
        trajectories that pass through it share it, which is what stitching needs.
        """
        observations = batch["observations"]
        z = self.encoder(observations)
        single = self.encoder.encode_goals(torch.stack([batch["value_goals"], batch["actor_goals"], observations]))
        z_value_goal, z_actor_goal, z_single = single[0], single[1], single[2]
        return Latents(z=z, z_obs=z_single, z_subgoal=at_positions(z_single, batch["future_offset"]),
                       z_inverse_subgoal=at_positions(z_single, batch["inverse_offset"]),
                       z_value_goal=z_value_goal, z_actor_goal=z_actor_goal)

    def encode_single_observations(self, rows, future_observations):
        """Latents of a critic step: z_t = E([o_t]) and z_{t+k} = E([o_{t+k}]), which is also its subgoal."""
        single = self.encoder.encode_goals(torch.stack([rows["observations"], future_observations, rows["value_goals"]]))
        z, z_ahead, z_goal = single[0], single[1], single[2]
        return Latents(z=z, z_obs=z, z_subgoal=z_ahead, z_inverse_subgoal=None, z_value_goal=z_goal,
                       z_actor_goal=None)

    # ------------------------------------------------------------------ losses

    # The losses below read rows: latents and batch entries of the positions with a subgoal (`at_rows`).
    def critic_loss(self, lat, rows):
        with torch.no_grad():
            next_v = self.targets["value"](lat.z_subgoal, lat.z_value_goal)
            q_target = rows["kstep_returns"] + rows["kstep_discounts"] * rows["kstep_masks"] * next_v
        q1, q2 = self.heads.q_values(lat.z, lat.z_subgoal, lat.z_value_goal)
        loss = ((q1 - q_target).square() + (q2 - q_target).square()).mean()
        return loss, {"critic/loss": loss, "critic/q_mean": q1.mean(), "critic/q_min": q1.min(),
                      "critic/q_max": q1.max(), "critic/target_mean": q_target.mean()}

    def infonce_loss(self, lat, step_valid):
        flat_z, flat_goal = lat.z.reshape(-1, lat.z.shape[-1]), lat.z_actor_goal.reshape(-1, lat.z.shape[-1])
        valid_positions = torch.nonzero(step_valid.reshape(-1)).squeeze(1)
        rows = valid_positions[torch.randperm(len(valid_positions), device=lat.z.device)[:INFONCE_SAMPLES]]
        loss, accuracy = info_nce_loss(flat_z[rows], flat_goal[rows])
        return loss, {"infonce/loss": loss, "infonce/accuracy": accuracy}

    def state_loss(self, lat, batch):
        obs = self.encoder.normalize(batch["observations"])
        predicted_delta = self.heads.state(lat.z[:, :-1], batch["actions"][:, :-1])
        error = (predicted_delta - (obs[:, 1:] - obs[:, :-1])).square().mean(-1)
        loss = masked_mean(error, batch["next_valid"][:, :-1].float())
        return loss, {"state/loss": loss}

    def reward_loss(self, lat, rows):
        reward_pred, done_logit = self.heads.reward(lat.z, lat.z_subgoal, lat.z_value_goal).unbind(-1)
        reward_mse = (reward_pred - rows["rewards"]).square().mean()
        done_bce = F.binary_cross_entropy_with_logits(done_logit, rows["successes"].float())
        loss = reward_mse + done_bce
        return loss, {"reward/loss": loss, "reward/reward_mse": reward_mse, "reward/done_bce": done_bce}

    def actor_advantage(self, lat, rows):
        """HIQL's high-level advantage toward the actor goal: the data's own k-step return plus the discounted
        V(z_{t+k}, z_g), minus V(z_t, z_g). The environment is deterministic, so the k-step target is Q of the
        data's z' without the critic's fit error."""
        with torch.no_grad():
            v = self.heads.value(lat.z_obs, lat.z_actor_goal)
            bootstrap = rows["kstep_discounts"] * rows["actor_kstep_masks"] * self.heads.value(lat.z_subgoal,
                                                                                                 lat.z_actor_goal)
            return rows["actor_kstep_returns"] + bootstrap - v

    def inverse_loss(self, lat, rows, advantage):
        """I(z_t, z'', z_g) -> a_t. Unweighted by default: exp(3 A) singles out a few transitions per batch and
        leaves I imprecise (BENCHMARKS.md)."""
        with torch.no_grad():
            weights = advantage_weights(advantage, self.config.inverse_beta)
        action_error = (self.action(lat.z, lat.z_inverse_subgoal, lat.z_actor_goal) - rows["actions"]).square().sum(-1)
        loss = (weights * action_error).mean()
        return loss, {"inverse/loss": loss, "inverse/action_mse": action_error.mean(),
                      "inverse/advantage_mean": advantage.mean()}

    def action(self, z, z_subgoal, z_goal):
        """I(z, z', .) with the config's goal input (`inverse_goal`)."""
        return self.heads.action(z, z_subgoal, z_subgoal if self.config.inverse_goal == "subgoal" else z_goal)

    def proposer_loss(self, lat, advantage):
        """AWR for P(z, z_g) -> z': the data's subgoal, weighted by exp(beta A); no gradient into the latents."""
        with torch.no_grad():
            weights = advantage_weights(advantage, self.config.beta)
        proposal = self.heads.proposer(lat.z.detach(), lat.z_actor_goal.detach())
        loss = (weights * (proposal - lat.z_subgoal.detach()).square().sum(-1)).mean()
        return loss, {"proposer/loss": loss, "proposer/weight_mean": weights.mean()}

    def total_loss(self, batch):
        """Every loss but the value's on a batch of windows, weighted and summed; (total, info namespaced per loss).
        InfoNCE and the state predictor read whole windows, the heads that need a subgoal only the positions
        that have one."""
        c = self.config
        lat = self.encode_windows(batch)
        positions = positions_with_a_subgoal(batch)
        rows, row_lat = rows_at(batch, positions), lat.at_rows(*positions)
        critic, info = self.critic_loss(row_lat, rows)
        infonce, infonce_info = self.infonce_loss(lat, batch["step_valid"])
        state, state_info = self.state_loss(lat, batch)
        reward, reward_info = self.reward_loss(row_lat, rows)
        advantage = self.actor_advantage(row_lat, rows)
        inverse, inverse_info = self.inverse_loss(row_lat, rows, advantage)
        proposer, proposer_info = self.proposer_loss(row_lat, advantage)
        total = (critic + c.infonce_coef * infonce + c.state_coef * state + c.reward_coef * reward
                 + inverse + c.proposer_coef * proposer)
        for extra in (infonce_info, state_info, reward_info, inverse_info, proposer_info):
            info.update(extra)
        info["train/total_loss"] = total
        return total, info

    def critic_step_loss(self, batch):
        """The critic loss on single-observation latents of the positions with a subgoal k ahead (a step costs
        about 35% of a full update, BENCHMARKS.md)."""
        rows, future_observations = rows_with_a_subgoal(batch)
        lat = self.encode_single_observations(rows, future_observations)
        critic, _ = self.critic_loss(lat, rows)
        return critic, {"critic_steps/critic_loss": critic}

    def value_step_loss(self, batch):
        """k-step expectile TD of V(E([o_t]), E([g])) on independent transitions (HIQL's value, k steps at a time):
        toward the return over k steps plus gamma^k V_target(E([o_{t+k}]), E([g])), no Q in between. The
        encodings are constants here: V fits the encoder the other losses shape, at a third of the cost of a step
        through it (and the value it learns ranks the maze as well, BENCHMARKS.md)."""
        inputs = ["observations", "future_observations", "value_goals"]
        if self.config.inverse_transitions:
            inputs.append("inverse_observations")
        with torch.no_grad():   # one encoder call for every encoding of the step
            z, z_ahead, z_goal, *z_inverse = self.encoder.encode_goals(torch.stack([batch[k] for k in inputs]))
            target = batch["returns"] + batch["discounts"] * batch["masks"] * self.targets["value"](z_ahead, z_goal)
        v = self.heads.value(z, z_goal)
        loss = expectile_loss(target - v, self.config.expectile).mean()
        info = {"value/loss": loss, "value/v_mean": v.mean()}
        if z_inverse:
            inverse = self.transition_inverse_loss(z, z_inverse[0], batch["actions"])
            loss = loss + inverse
            info["inverse/transition_loss"] = inverse
        return loss, info

    def transition_inverse_loss(self, z, z_subgoal, actions):
        """I(E([o_t]), E([o_{t+d}])) -> a_t on a value step's independent transitions, the encodings held: the
        windows give I about a thousand rows per update, too few for the data's noisy actions (four value steps
        give it four thousand more at a fraction of a window's cost; BENCHMARKS.md, issue 24)."""
        return (self.action(z, z_subgoal, z_subgoal) - actions).square().sum(-1).mean()

    # ------------------------------------------------------------------ update

    def update(self, batch, critic_batches=(), value_batches=()):
        """One gradient step on every loss of a batch of windows, then one critic step on each of
        `critic_batches` (the trainers pass `critic_steps` fresh batches) and one value step on each of
        `value_batches` (`value_steps` batches of transitions); returns a dict of floats."""
        total, info = self.total_loss(batch)
        info["train/grad_norm"] = self.gradient_step(total)
        self.step += 1
        for critic_batch in critic_batches:
            loss, critic_info = self.critic_step_loss(critic_batch)
            self.gradient_step(loss)
            info.update(critic_info)
        for value_batch in value_batches:
            loss, value_info = self.value_step_loss(value_batch)
            self.gradient_step(loss)
            info.update(value_info)
        return floats(info)

    def gradient_step(self, loss):
        """Backward, clip, Adam, EMA targets; the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        self.update_targets()
        return grad_norm

    @torch.no_grad()
    def update_targets(self):
        for name, target in self.targets.items():
            for p_target, p in zip(target.parameters(), getattr(self.heads, name).parameters()):
                p_target.lerp_(p, self.config.tau)

    # ------------------------------------------------------------------ acting

    def candidates(self, z, z_goal, origin):
        """(N, C, Z): the proposal, noisy copies of it, and goal-biased interpolations s + alpha (z_g - s) from the
        origin s = E([o_t]), the agent's point in the subgoals' space.

        Q has only seen subgoals k steps away; a far interpolation (through a wall, say) is out of its data and may
        look best for no reason. So alpha goes up to the proposal's step length ||P(z, z_g) - s|| / ||z_g - s||
        (or to 1 when the goal is within one step).
        """
        c = self.config
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
    def search_subgoal(self, z, z_goal, origin):
        """SPEC's policy search: of the candidates, the one with the largest min(Q1, Q2)(z, z', z_g) per row."""
        candidates = self.candidates(z, z_goal, origin)
        n, num = candidates.shape[:2]
        z_rep, g_rep = (t.unsqueeze(1).expand(-1, num, -1) for t in (z, z_goal))
        q = torch.minimum(*self.heads.q_values(z_rep, candidates, g_rep))
        return candidates[torch.arange(n), q.argmax(dim=1)]

    def make_actor(self, goals, context="recurrent", streams=2):
        """The greedy policy for a batch of episodes that all start now (`Actor`)."""
        return Actor(self, goals, context, streams)

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
        for group in self.optimizer.param_groups:   # checkpoints from before the fused optimiser say fused=None
            group["fused"] = True
        self.step = state["step"]

    @classmethod
    def from_checkpoint(cls, checkpoint, device="cpu", **overrides):
        """The agent a checkpoint holds (a dict from `utils.load_checkpoint(path, required=CHECKPOINT_KEYS)`)."""
        known = {f.name for f in fields(AgentConfig)}
        config = {**BEFORE_THE_FIELD, **checkpoint["agent_config"], **overrides}
        config = {k: v for k, v in config.items() if k in known}
        agent = cls(AgentConfig(**config), device=device)
        try:
            agent.load_state_dict(checkpoint)
        except (RuntimeError, KeyError, ValueError) as error:
            raise UserError(f"the checkpoint's weights do not match its own config ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]})") from None
        return agent

    def check_env_sizes(self, obs_dim, action_dim, source="the checkpoint"):
        if (self.config.obs_dim, self.config.action_dim) != (obs_dim, action_dim):
            raise UserError(f"{source} was trained for observations of size {self.config.obs_dim} and actions of "
                            f"size {self.config.action_dim}, but the environment has {obs_dim} and {action_dim}")


# ----------------------------------------------------------------------------- acting

class Actor:
    """The greedy policy for a batch of episodes that all start now: `act(observations) -> actions` and
    `keep(rows)` when some episodes end (the protocol `ogbench_utils.evaluate` steps).

    Each step: z_t from the episode's recent history (`RecurrentHistory` or `WindowHistory`), the subgoal z' by
    the config's subgoal_source, and the action I(z_t, z', z_g) in [-1, 1].
    """

    def __init__(self, agent, goals, context="recurrent", streams=2):
        self.agent = agent
        goals = torch.as_tensor(np.asarray(goals), dtype=torch.float32, device=agent.device)
        with torch.no_grad():
            self.z_goal = agent.encoder.encode_goals(goals)
        if context == "recurrent":
            self.history = RecurrentHistory(agent, streams)
        elif context == "window":
            self.history = WindowHistory(agent)
        else:
            raise ValueError(f"acting context must be 'recurrent' or 'window', got {context!r}")
        c = agent.config
        self.table = self.switch = None
        if c.acts_with_data:
            if agent.subgoal_data is None:
                raise UserError(f"subgoal_source {c.subgoal_source!r} acts with the dataset's states, but none is "
                                "set: call agent.set_subgoal_data(dataset) (the trainers and the evaluate command do)")
            with torch.no_grad():
                self.table = SubgoalTable(agent, self.z_goal)
        if c.subgoal_source == "switch":
            self.switch = StallSwitch(len(goals), c.stall_steps, c.stall_radius, agent.device)
        # V of a state the goal is goal_reach_steps from
        self.reach_value = return_of_reaching(c.goal_reach_steps, c.discount) if c.goal_reach_steps else None

    @torch.no_grad()
    def act(self, observations):
        observations = self.observation_tensor(observations)
        z = self.history.latent(observations)
        here = self.agent.encoder.encode_goals(observations)
        action = self.agent.action(z, self.subgoal(z, here, observations), self.z_goal)
        return self.perturb(action).clamp(-1, 1).cpu().numpy()

    def subgoal(self, z, here, observations):
        """The greedy subgoal by the config's rule, or the goal itself where it is within `goal_reach_steps` (the
        subgoal HIQL's high level is trained toward then: the state k ahead, but never past the goal).
        `here` is E([o_t]), the agent's point in the subgoals' space, encoded once per step."""
        subgoal = self.rule_subgoal(z, here, observations)
        if self.reach_value is None:
            return subgoal
        near = self.value_here(here) >= self.reach_value
        return torch.where(near.unsqueeze(-1), self.z_goal, subgoal)

    def value_here(self, here):
        """V(E([o_t]), z_g) of each episode: minus its discounted steps to go."""
        return self.agent.heads.value(here, self.z_goal)

    def rule_subgoal(self, z, here, observations):
        if self.table is None:
            return self.agent.search_subgoal(z, self.z_goal, here)
        if self.switch is None:
            return self.table.subgoals(observations)
        on_data = self.switch.on_data(observations).unsqueeze(1)
        return torch.where(on_data, self.table.subgoals(observations), self.agent.search_subgoal(z, self.z_goal, here))

    def perturb(self, action):
        """Greedy: the action as it is (the online explorer adds noise here)."""
        return action

    def observation_tensor(self, observations):
        """A float tensor on the agent's device (a tensor that already is one passes through uncopied)."""
        if not torch.is_tensor(observations):
            observations = np.asarray(observations)
        return torch.as_tensor(observations, dtype=torch.float32, device=self.agent.device)

    def keep(self, rows):
        """Keep only these episodes (the others ended)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.agent.device)
        self.z_goal = self.z_goal[rows]
        self.history.keep(rows)
        for part in (self.table, self.switch):
            if part is not None:
                part.keep(rows)


class RecurrentHistory:
    """z_t at constant cost per step with the encoder's recurrent step mode.

    A recurrent state over the whole episode would see more history than any training window, so `streams`
    recurrent states are restarted in turn, every L / streams steps; the latent is the oldest one's. It is exactly
    the encoder's output for the last c observations, with c = t + 1 early on and then c in [L - L/streams + 1, L]:
    the contexts the training windows hold.
    """

    def __init__(self, agent, streams=2):
        self.encoder = agent.encoder
        length = agent.context_length
        self.period = max(1, length // streams)
        self.streams = max(1, min(streams, length))
        self.caches = [None] * self.streams
        self.starts = [None] * self.streams
        self.t = 0

    def latent(self, observations):
        """Feed one observation per episode; the latent of the oldest stream."""
        if self.t % self.period == 0:                       # restart the stream whose turn it is
            s = (self.t // self.period) % self.streams
            self.caches[s], self.starts[s] = self.encoder.allocate_inference_cache(len(observations)), self.t
        latents = {s: self.encoder.step(observations, cache) for s, cache in enumerate(self.caches) if cache is not None}
        oldest = min(latents, key=lambda s: self.starts[s])
        self.t += 1
        return latents[oldest]

    def keep(self, rows):
        self.caches = [None if c is None else [(conv[rows], ssm[rows]) for conv, ssm in c] for c in self.caches]


class WindowHistory:
    """z_t by the encoder over the last L observations at every step: the cost grows with L."""

    def __init__(self, agent):
        self.encoder, self.length = agent.encoder, agent.context_length
        self.window = None

    def latent(self, observations):
        observations = observations.unsqueeze(1)
        if self.window is not None:
            observations = torch.cat([self.window[:, max(0, self.window.shape[1] - self.length + 1):], observations], 1)
        self.window = observations
        return self.encoder(self.window)[:, -1]

    def keep(self, rows):
        self.window = self.window[rows]


class DataSubgoals:
    """Real states of the data as subgoals: every `stride`-th dataset state o_i, and o_j, the state k steps later
    in its own trajectory (j = min(i + k, its last step))."""

    def __init__(self, states, successors, device="cpu"):
        def tensor(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
        self.states, self.successors = tensor(states), tensor(successors)

    @classmethod
    def from_dataset(cls, dataset, steps, stride, device="cpu"):
        rows = np.arange(0, len(dataset), stride)
        return cls(dataset.observations[rows], dataset.observations[np.minimum(rows + steps, dataset.traj_ends[rows])],
                   device)

    def __len__(self):
        return len(self.states)


class SubgoalTable:
    """The data's subgoals for a batch of episodes: at o_t, of the `data_neighbors` kept states nearest to o_t
    by position (the first two normalised observation numbers, x-y in every OGBench maze), the successor o_j
    with the largest V(E([o_j]), z_g) is the subgoal.

    By position, not the whole observation: on the ant 27 of 29 numbers are joints and velocities, and the
    states nearest in all of them lie anywhere in the maze (antmaze-medium-stitch: 0.00 against 0.28,
    BENCHMARKS.md); on pointmaze the two are one.

    Each candidate is a real state about k steps from the agent, so Q(z, z', z_g), k rewards of -1 plus
    gamma^k V(z', z_g), ranks them as V does; V is trained on these very encodings and Q scored on such pairs
    picked worse (BENCHMARKS.md). Unlike the proposer's regression, which can land between two paths around a
    wall, the subgoal is always a state the data reached. The goals stay fixed over the episodes, so E([o_j]) and
    V(E([o_j]), z_g) are computed once per state and goal, when a search first returns the state: an episode meets
    a fraction of the maze's states, and encoding all 200,000 took 6 s, longer than most episodes.
    """

    def __init__(self, agent, z_goal, chunk=4096):
        data = agent.subgoal_data
        self.encoder, self.value, self.chunk = agent.encoder, agent.heads.value, chunk
        self.successors, self.z_goal = data.successors, z_goal
        self.nearest = agent.nearest_subgoal_states()
        self.latents = torch.zeros(len(data), agent.config.latent_dim, device=z_goal.device)
        self.encoded = torch.zeros(len(data), dtype=torch.bool, device=z_goal.device)
        self.values = torch.zeros(len(z_goal), len(data), device=z_goal.device)
        self.valued = torch.zeros(len(z_goal), len(data), dtype=torch.bool, device=z_goal.device)

    def subgoals(self, observations):
        """(N, Z): each episode's subgoal latent at observations (N, obs_dim)."""
        nearest = self.nearest(self.encoder.normalize(observations)[:, :2])
        best = nearest.gather(1, self.values_of(nearest).argmax(dim=1, keepdim=True)).squeeze(1)
        return self.latents[best]

    def values_of(self, states):
        """(N, K): V(E([o_j]), z_g) of each episode's K states (N, K), computed for those not met before."""
        rows, columns = (~self.valued.gather(1, states)).nonzero(as_tuple=True)
        if len(rows):
            new = states[rows, columns]
            latents = self.latents_of(new)
            self.values[rows, new] = torch.cat([self.value(z, goal) for z, goal in
                                                zip(latents.split(self.chunk), self.z_goal[rows].split(self.chunk))])
            self.valued[rows, new] = True
        return self.values.gather(1, states)

    def latents_of(self, states):
        missing = states[~self.encoded[states]].unique()
        if len(missing):
            self.latents[missing] = torch.cat([self.encoder.encode_goals(part)
                                               for part in self.successors[missing].split(self.chunk)])
            self.encoded[missing] = True
        return self.latents[states]

    def keep(self, rows):
        self.z_goal, self.values, self.valued = self.z_goal[rows], self.values[rows], self.valued[rows]


class NearestByPosition:
    """The k kept positions nearest to each query, exactly, with a full search only once per grid cell visited.

    A query q in the square cell of centre c and half-diagonal d is within d of c, so c's k nearest lie within
    r_k(c) + d of q, and q's k nearest within r_k(c) + 2d of c (the triangle inequality twice). The states in that
    disc are found once per cell, by a full search from c, and each query is searched among its cell's disc only.
    The cell's side is a fraction of the typical r_k: a smaller one makes the discs tighter and the full searches
    more frequent (BENCHMARKS.md, "Acting cost").
    """

    CELL_OF_RADIUS = 0.5   # the cell's side over the median r_k of a sample of the kept positions
    SAMPLE = 64

    def __init__(self, positions, k):
        self.k, self.positions = k, positions
        sample = positions[::max(1, len(positions) // self.SAMPLE)]
        self.side = max(self.CELL_OF_RADIUS * self.kth_distance(self.distances_from(sample)).median().item(), 1e-6)
        self.discs = {}   # cell (i, j) -> (indices, positions) of the kept positions within r_k(c) + 2d of its centre

    def __call__(self, queries):
        """(N, k) indices of the kept positions nearest to queries (N, 2), in no particular order."""
        cells = [tuple(cell) for cell in torch.floor(queries / self.side).long().tolist()]
        self.add_discs(sorted(set(cells) - self.discs.keys()))
        discs = [self.discs[cell] for cell in cells]
        candidates = pad_sequence([indices for indices, _ in discs], batch_first=True, padding_value=-1)
        positions = pad_sequence([points for _, points in discs], batch_first=True, padding_value=math.inf)
        distances = squared_distances(queries.unsqueeze(1), positions)
        return candidates.gather(1, distances.topk(self.k, dim=1, largest=False, sorted=False).indices)

    def kth_distance(self, distances):
        """r_k from squared distances (n, M) to every kept position."""
        return distances.topk(self.k, dim=1, largest=False, sorted=False).values.amax(dim=1).sqrt()

    def distances_from(self, points):
        return squared_distances(points.unsqueeze(1), self.positions.unsqueeze(0))

    def add_discs(self, cells, chunk=64):
        for part in range(0, len(cells), chunk):
            keys = cells[part:part + chunk]
            centres = (torch.tensor(keys, dtype=self.positions.dtype, device=self.positions.device) + 0.5) * self.side
            distances = self.distances_from(centres)
            # 2d = the cell's diagonal; the margin covers float32 rounding of the two searches' distances
            radius = (self.kth_distance(distances) + math.sqrt(2) * self.side) * (1 + 1e-4) + 1e-6
            inside = distances <= radius.unsqueeze(1) ** 2
            for key, row in zip(keys, inside):
                indices = row.nonzero().squeeze(1)
                self.discs[key] = indices, self.positions[indices]


def squared_distances(a, b):
    """Squared Euclidean distances between broadcastable point sets a (..., 2) and b (..., 2) (padding at +inf
    is infinitely far)."""
    dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    return dx * dx + dy * dy


class StallSwitch:
    """Which episodes act on the data's subgoals, the others on the policy search's (subgoal_source='switch').

    The two rules fail different tasks of the same checkpoint, and both fail the same way: the agent comes to
    rest, pushing into a wall or at a state none of whose candidates looks better (BENCHMARKS.md). So each
    episode starts on the data's subgoals and swaps to the other rule whenever its position, the first two
    observation dimensions (x-y in every OGBench maze), has moved less than `radius` over the last `steps` steps;
    after a swap it gets `steps` steps before it can swap again.
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
