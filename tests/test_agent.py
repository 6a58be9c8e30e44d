"""Losses on hand-computed cases, the EMA rule, learning on a fixed batch, acting and checkpoints."""
import math

import numpy as np
import pytest
import torch

from offline_agent import (AgentConfig, DataSubgoals, NearestByPosition, OfflineAgent, StallSwitch, SubgoalTable,
                           advantage_weights, at_positions, expectile_loss, info_nce_loss, positions_with_a_subgoal,
                           rows_with_a_subgoal)
from ogbench_utils import Trajectories, WindowSampler
from utils import UserError, load_checkpoint, save_checkpoint

SMALL = dict(obs_dim=2, action_dim=2, latent_dim=8, d_model=16, n_layers=1, hidden_dim=32,
             context_length=12, subgoal_steps=3, subgoal_source="proposer", goal_reach_steps=0, mamba_backend="torch")


def small_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    return OfflineAgent(AgentConfig(**dict(SMALL, **overrides)))


def normalized_agent(data, **overrides):
    agent = small_agent(**overrides)
    agent.set_normalization(data.observations)
    return agent


def small_batch(seed=0, obs_dim=2):
    rng = np.random.default_rng(seed)
    lengths = [30, 40, 50]
    terminals = np.zeros(sum(lengths), bool)
    terminals[np.cumsum(lengths) - 1] = True
    obs = np.cumsum(rng.normal(size=(sum(lengths), obs_dim)), 0).astype(np.float32)
    actions = np.clip(rng.normal(size=(sum(lengths), 2)), -1, 1).astype(np.float32)
    data = Trajectories.from_terminals(obs, actions, terminals)
    return data, WindowSampler(data, 12, 3, 0.99, seed=seed).sample(8)


def test_expectile_loss_hand_computed():
    diff = torch.tensor([2.0, -2.0, 0.0])
    torch.testing.assert_close(expectile_loss(diff, 0.9), torch.tensor([0.9 * 4, 0.1 * 4, 0.0]))


def test_advantage_weights_are_exponential_and_clipped():
    weights = advantage_weights(torch.tensor([0.0, 1.0, 10.0]), beta=2.0, max_weight=100.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, math.exp(2.0), 100.0]))


def test_info_nce_hand_computed():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    loss, accuracy = info_nce_loss(anchors, positives, temperature=0.5)
    # each row: cosine logits (1, 0) / 0.5 = (2, 0) with the right answer first -> log(1 + e^-2)
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-2))))
    assert accuracy == 1.0


def test_targets_move_by_the_ema_rule():
    agent = small_agent(tau=0.25)
    before = [p.clone() for p in agent.targets["q1"].parameters()]
    with torch.no_grad():
        for p in agent.heads.q1.parameters():
            p.add_(1.0)
    agent.update_targets()
    for old, new, online in zip(before, agent.targets["q1"].parameters(), agent.heads.q1.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)


def test_update_lowers_the_losses_on_a_fixed_batch():
    data, batch = small_batch()
    agent = normalized_agent(data, lr=1e-3)
    first = agent.update(batch)
    for _ in range(60):
        last = agent.update(batch)
    for key in ("critic/loss", "state/loss", "reward/loss", "inverse/action_mse"):
        assert last[key] < first[key], key
    assert agent.step == 61
    assert {"critic/q_mean", "inverse/advantage_mean", "infonce/accuracy"} <= set(first)


def test_subgoal_and_value_inputs_are_goal_encodings_of_single_states_and_z_the_window_latent():
    data, batch = small_batch()
    agent = normalized_agent(data)
    with torch.no_grad():
        latents = agent.encode_windows(batch)
        b, i = 1, 2
        state_ahead = batch["observations"][b, batch["future_offset"][b, i]]
        torch.testing.assert_close(latents.z, agent.encoder(batch["observations"]))
        torch.testing.assert_close(latents.z_subgoal[b, i], agent.encoder.encode_goals(state_ahead), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(latents.z_obs[b, i], agent.encoder.encode_goals(batch["observations"][b, i]),
                                   rtol=1e-5, atol=1e-5)


def test_inverse_subgoal_is_the_goal_encoding_of_the_sampled_state():
    data, batch = small_batch()
    agent = normalized_agent(data)
    with torch.no_grad():
        lat = agent.encode_windows(batch)
        b, i = 2, 1
        state = batch["observations"][b, batch["inverse_offset"][b, i]]
        torch.testing.assert_close(lat.z_inverse_subgoal[b, i], agent.encoder.encode_goals(state))
    info = agent.update(batch)
    assert np.isfinite(info["inverse/loss"])


def test_inverse_loss_is_unweighted_by_default_and_weighted_with_inverse_beta():
    data, batch = small_batch()
    rows, _ = rows_with_a_subgoal(batch)
    losses = {}
    for inverse_beta in (0.0, 2.0):
        agent = normalized_agent(data, inverse_beta=inverse_beta)
        with torch.no_grad():
            lat = agent.encode_windows(batch).at_rows(*positions_with_a_subgoal(batch))
            advantage = agent.actor_advantage(lat, rows)
            loss, info = agent.inverse_loss(lat, rows, advantage)
        losses[inverse_beta] = (loss, info["inverse/action_mse"], advantage, lat)
    loss, mse, _, _ = losses[0.0]
    torch.testing.assert_close(loss, mse)
    loss, _, advantage, lat = losses[2.0]
    error = (agent.action(lat.z, lat.z_inverse_subgoal, lat.z_actor_goal) - rows["actions"]).square().sum(-1)
    expected = (torch.exp(2.0 * advantage).clamp(max=100.0) * error).mean()
    torch.testing.assert_close(loss, expected.detach())


def test_window_losses_equal_their_masked_means_over_whole_windows_and_ignore_positions_without_a_subgoal():
    data, batch = small_batch()
    agent = normalized_agent(data)
    valid = batch["future_valid"].float()
    with torch.no_grad():
        _, info = agent.total_loss(batch)
        lat = agent.encode_windows(batch)                      # the whole windows, as a slow reference
        next_v = agent.targets["value"](lat.z_subgoal, lat.z_value_goal)
        target = batch["kstep_returns"] + batch["kstep_discounts"] * batch["kstep_masks"] * next_v
        q1, q2 = agent.heads.q_values(lat.z, lat.z_subgoal, lat.z_value_goal)
        critic = (((q1 - target).square() + (q2 - target).square()) * valid).sum() / valid.sum()
        spoiled = dict(batch)
        for key in ("kstep_returns", "actor_kstep_returns", "rewards", "actions", "value_goals"):
            noise = 1e3 * torch.randn_like(batch[key])
            mask = (1 - valid).reshape(*valid.shape, *[1] * (noise.dim() - 2))
            spoiled[key] = batch[key] + noise * mask
        _, spoiled_info = agent.total_loss(spoiled)
    assert info["critic/loss"].item() == pytest.approx(critic.item(), rel=1e-5)
    assert 0 < valid.sum() < valid.numel()
    for key in ("critic/loss", "reward/loss", "inverse/loss", "proposer/loss"):
        assert spoiled_info[key].item() == pytest.approx(info[key].item(), rel=1e-5), key


def test_a_checkpoint_of_the_older_format_is_one_clear_line(tmp_path):
    state = small_agent().state_dict()
    state["format"] = "opso-checkpoint-v1"
    save_checkpoint(state, tmp_path / "old.pth")
    with pytest.raises(UserError, match="older format .*opso-checkpoint-v1.* retrain it, or read it with commit"):
        load_checkpoint(tmp_path / "old.pth")
    with pytest.raises(UserError, match="subgoal_source"):
        small_agent(subgoal_source="dataset")


def test_actors_give_actions_in_range_for_a_batch_of_environments():
    agent = small_agent()
    observations = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32) * 10
    for context in ("recurrent", "window"):
        actor = agent.make_actor(observations[-1] + 3, context=context)
        for t in range(5):
            actions = actor.act(observations[t])
        assert actions.shape == (7, 2) and np.all(np.abs(actions) <= 1.0)
    with pytest.raises(ValueError, match="context"):
        agent.make_actor(observations[-1], context="full")


def test_candidates_hold_the_proposal_noisy_copies_and_step_limited_interpolations():
    agent = small_agent(num_noisy_candidates=3, num_interpolations=4)
    z, z_goal = torch.zeros(2, 8), torch.ones(2, 8)
    proposal = agent.heads.proposer(z, z_goal)
    candidates = agent.candidates(z, z_goal, z)
    assert candidates.shape == (2, 1 + 3 + 4, 8)
    torch.testing.assert_close(candidates[:, 0], proposal)
    interpolations = candidates[:, 4:]
    alphas = interpolations[..., 0]                                    # z = 0, z_g = 1: the point is alpha * 1
    torch.testing.assert_close(interpolations, alphas.unsqueeze(-1).expand(-1, -1, 8))
    reach = (proposal.norm(dim=-1) / math.sqrt(8)).clamp(max=1.0)
    torch.testing.assert_close(alphas[:, -1], reach)                   # the largest step equals the proposal's
    far_goal = torch.full((2, 8), 1e3)
    far_step = agent.heads.proposer(z, far_goal).norm(dim=-1, keepdim=True)
    assert torch.all(agent.candidates(z, far_goal, z)[:, 4:].norm(dim=-1) <= far_step * 1.0001)


def test_critic_steps_train_the_critic_on_single_observation_latents_only():
    data, batch = small_batch()
    agent = normalized_agent(data, lr=1e-3)
    untouched = [p.clone() for p in list(agent.heads.inverse.parameters()) + list(agent.heads.proposer.parameters())]
    first = agent.critic_step_loss(batch)[1]["critic_steps/critic_loss"].item()
    for _ in range(40):
        agent.gradient_step(agent.critic_step_loss(batch)[0])
    assert agent.critic_step_loss(batch)[1]["critic_steps/critic_loss"].item() < first
    for before, after in zip(untouched, list(agent.heads.inverse.parameters()) + list(agent.heads.proposer.parameters())):
        torch.testing.assert_close(before, after)


def test_critic_step_on_valid_rows_equals_the_masked_loss_over_whole_windows():
    data, batch = small_batch()
    agent = normalized_agent(data)
    valid = batch["future_valid"].float()
    with torch.no_grad():
        z, z_goal = agent.encoder.encode_goals(torch.stack([batch["observations"], batch["value_goals"]]))
        z_ahead = at_positions(z, batch["future_offset"])
        next_v = agent.targets["value"](z_ahead, z_goal)
        target = batch["kstep_returns"] + batch["kstep_discounts"] * batch["kstep_masks"] * next_v
        q1, q2 = agent.heads.q_values(z, z_ahead, z_goal)
        critic = (((q1 - target).square() + (q2 - target).square()) * valid).sum() / valid.sum()
        _, info = agent.critic_step_loss(batch)
    assert float(info["critic_steps/critic_loss"]) == pytest.approx(float(critic), rel=1e-5)


def test_update_runs_one_critic_step_per_extra_batch_and_counts_one_update():
    data, batch = small_batch()
    agent = normalized_agent(data, critic_steps=2)
    seen = []
    original = agent.critic_step_loss
    agent.critic_step_loss = lambda b: seen.append(b) or original(b)
    other = WindowSampler(data, 12, 3, 0.99, seed=5).sample(8)
    info = agent.update(batch, [other, batch])
    assert seen == [other, batch] and agent.step == 1 and "critic_steps/critic_loss" in info
    assert "critic_steps/critic_loss" not in agent.update(batch)


def act_on(agent, observations, goals, context="recurrent"):
    """The actions of a fresh actor for these goals after it has seen `observations` (the same in every episode)."""
    actor = agent.make_actor(goals, context=context)
    for observation in observations:
        actions = actor.act(np.repeat(observation[None], len(goals), 0))
    return actions


def test_checkpoint_round_trips_to_the_same_actions(tmp_path):
    data, batch = small_batch()
    agent = normalized_agent(data)
    for _ in range(3):
        agent.update(batch)
    path = tmp_path / "agent.pth"
    save_checkpoint(agent.state_dict(), path)
    restored = OfflineAgent.from_checkpoint(load_checkpoint(path))
    torch.manual_seed(1)
    expected = act_on(agent, data.observations[:10], data.observations[20:24])
    torch.manual_seed(1)
    np.testing.assert_array_equal(act_on(restored, data.observations[:10], data.observations[20:24]), expected)
    assert restored.step == 3
    torch.testing.assert_close(restored.encoder.obs_mean, agent.encoder.obs_mean)
    # the optimiser state came back too: one more identical update gives identical weights
    agent.update(batch)
    restored.update(batch)
    for a, b in zip(agent.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b)


def test_recurrent_history_latents_equal_the_encoder_over_its_context():
    """Stream restarts every L/2 steps: the latent used is E(last c observations), c in [L/2+1, L]."""
    agent = small_agent(context_length=6)
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(3, 20, 2)).astype(np.float32))
    history = agent.make_actor(obs[:, -1], context="recurrent", streams=2).history
    for t in range(20):
        with torch.no_grad():
            z = history.latent(obs[:, t])
            start = min(s for s in history.starts if s is not None)
            expected = agent.encoder(obs[:, start:t + 1])[:, -1]
        if t >= 3:
            assert 6 // 2 + 1 <= t - start + 1 <= 6
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_window_history_latent_is_the_encoder_over_the_last_l_observations():
    agent = small_agent(context_length=4)
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(2, 9, 2)).astype(np.float32))
    history = agent.make_actor(obs[:, -1], context="window").history
    with torch.no_grad():
        for t in range(9):
            z = history.latent(obs[:, t])
        torch.testing.assert_close(z, agent.encoder(obs[:, 5:9])[:, -1])


def test_window_and_recurrent_contexts_act_alike_within_the_first_window():
    agent = small_agent(context_length=8, num_noisy_candidates=0)
    obs = np.random.default_rng(2).normal(size=(4, 2)).astype(np.float32)
    goals = np.random.default_rng(3).normal(size=(3, 2)).astype(np.float32)
    np.testing.assert_allclose(act_on(agent, obs, goals, "window"), act_on(agent, obs, goals, "recurrent"),
                               rtol=1e-4, atol=1e-5)


def test_policy_search_starts_its_interpolations_at_the_agents_point_in_the_subgoals_space():
    agent = small_agent(num_noisy_candidates=0, num_interpolations=3)
    origin, z_goal = torch.zeros(2, 8), torch.ones(2, 8)
    interpolations = agent.candidates(torch.randn(2, 8), z_goal, origin)[:, 1:]
    torch.testing.assert_close(interpolations, interpolations[..., :1].expand(-1, -1, 8))   # on the origin-goal segment


# ----------------------------------------------------------------------------- subgoals from the data

def test_data_subgoals_are_the_states_k_steps_ahead_in_their_own_trajectory():
    data, _ = small_batch()
    bank = DataSubgoals.from_dataset(data, steps=3, stride=4)
    rows = np.arange(0, len(data), 4)
    np.testing.assert_array_equal(bank.states.numpy(), data.observations[rows])
    for row, successor in zip(rows, bank.successors.numpy()):
        ahead = np.flatnonzero((data.observations == successor).all(1))
        assert len(ahead) == 1 and data.traj_ends[ahead[0]] == data.traj_ends[row]  # never crosses an episode end
        assert ahead[0] == min(row + 3, data.traj_ends[row])                          # ahead, clamped at the end


@pytest.mark.parametrize("neighbors", [1, 7, 1000])     # 1000: more than the 60 kept states, so all of them
def test_data_subgoal_is_the_successor_of_a_state_nearest_by_position_with_the_best_value(neighbors):
    data, _ = small_batch(obs_dim=4)
    agent = normalized_agent(data, obs_dim=4, subgoal_source="data", data_neighbors=neighbors, data_stride=2)
    agent.set_subgoal_data(data)
    observations = torch.as_tensor(data.observations[[3, 50, 101]]) + 0.3
    goals = torch.as_tensor(data.observations[[20, 0, 119]])
    bank = agent.subgoal_data
    with torch.no_grad():
        z_goal = agent.encoder.encode_goals(goals)
        chosen = SubgoalTable(agent, z_goal).subgoals(observations)
        # reference: brute force in float64 over the bank
        positions = agent.encoder.normalize(bank.states)[:, :2].double()
        nearest = torch.cdist(agent.encoder.normalize(observations)[:, :2].double(), positions).argsort(dim=1)
        nearest = nearest[:, :neighbors]
        for i in range(3):
            valued = agent.encoder.encode_goals(bank.successors[nearest[i]])
            values = agent.heads.value(valued, z_goal[i].expand_as(valued))
            best = nearest[i][values.argmax()]
            torch.testing.assert_close(chosen[i], agent.encoder.encode_goals(bank.successors[best][None])[0])


@pytest.mark.parametrize("k", [1, 50, 3000])        # 3000: every kept position
def test_nearest_by_position_finds_exactly_the_k_nearest_in_every_cell(k):
    rng = np.random.default_rng(1)
    # two dense clusters and a sparse spread: the k-th distance differs by cell
    positions = torch.as_tensor(np.concatenate([rng.normal(0, 0.05, (1500, 2)), rng.normal(2, 0.3, (1000, 2)),
                                                rng.uniform(-3, 3, (500, 2))]), dtype=torch.float32)
    search = NearestByPosition(positions, k)
    for _ in range(5):   # later calls reuse the cells found by earlier ones
        queries = torch.as_tensor(np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.uniform(-6, 6, (20, 2))]),
                                  dtype=torch.float32)
        found = search(queries).sort(dim=1).values
        reference = torch.cdist(queries.double(), positions.double()).argsort(dim=1)[:, :k].sort(dim=1).values
        assert torch.equal(found, reference)
    assert len(search.discs) > 1


def test_actors_share_one_position_index_until_the_normalisation_or_the_data_changes():
    data, _ = small_batch(obs_dim=4)
    agent = normalized_agent(data, obs_dim=4, subgoal_source="data", data_neighbors=7, data_stride=2)
    agent.set_subgoal_data(data)
    goals = data.observations[[20, 0, 119]]
    first = agent.make_actor(goals)
    first.act(data.observations[[3, 50, 101]])
    assert agent.make_actor(goals).table.nearest is first.table.nearest     # the cells searched stay searched

    agent.set_normalization(data.observations * 2.0)
    renormalised = agent.make_actor(goals).table.nearest
    assert renormalised is not first.table.nearest
    torch.testing.assert_close(renormalised.positions, agent.encoder.normalize(agent.subgoal_data.states)[:, :2])
    agent.set_subgoal_data(data)                                             # the data set anew: a new index
    assert agent.make_actor(goals).table.nearest is not renormalised


def test_data_subgoals_computed_when_first_met_equal_a_full_table_over_steps_and_finished_episodes():
    data, _ = small_batch(obs_dim=4)
    agent = normalized_agent(data, obs_dim=4, subgoal_source="data", data_neighbors=9, data_stride=1)
    agent.set_subgoal_data(data)
    bank, rng = agent.subgoal_data, np.random.default_rng(2)
    goals = torch.as_tensor(data.observations[[20, 0, 119, 77]])
    with torch.no_grad():
        z_goal = agent.encoder.encode_goals(goals)
        table = SubgoalTable(agent, z_goal, chunk=7)
        latents = agent.encoder.encode_goals(bank.successors)
        values = torch.stack([agent.heads.value(latents, z.expand_as(latents)) for z in z_goal])
        positions = agent.encoder.normalize(bank.states)[:, :2]
        rows = torch.arange(4)
        for step in range(6):
            if step == 3:
                rows = rows[[0, 2, 3]]
                table.keep(torch.tensor([0, 2, 3]))
            observations = torch.as_tensor(data.observations[rng.choice(len(data), len(rows))]) + 0.2
            nearest = torch.cdist(agent.encoder.normalize(observations)[:, :2], positions).topk(9, largest=False)[1]
            best = nearest.gather(1, values[rows].gather(1, nearest).argmax(1, keepdim=True)).squeeze(1)
            torch.testing.assert_close(table.subgoals(observations), latents[best])
        assert table.valued.any() and not table.valued.all()    # the pairs met, not every pair
        torch.testing.assert_close(table.values[table.valued], values[rows][table.valued])


@pytest.mark.parametrize("context", ["recurrent", "window"])
@pytest.mark.parametrize("source", ["data", "switch"])
def test_data_subgoal_actors_act_in_range_and_drop_finished_episodes(context, source):
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source=source, data_neighbors=5)
    agent.set_subgoal_data(data)
    goals = data.observations[[10, 60, 110]]
    actor = agent.make_actor(goals, context=context)
    action = actor.act(data.observations[[0, 40, 80]])
    assert action.shape == (3, 2) and np.abs(action).max() <= 1
    actor.keep(np.array([0, 2]))
    assert actor.act(data.observations[[1, 81]]).shape == (2, 2)
    assert len(actor.table.values) == 2 and (source == "data" or len(actor.switch.data) == 2)


@pytest.mark.parametrize("source", ["data", "switch"])
def test_data_subgoals_without_a_dataset_fail_with_a_clear_message(source):
    agent = small_agent(subgoal_source=source)
    with pytest.raises(UserError, match="set_subgoal_data"):
        agent.make_actor(np.zeros((2, 2), np.float32))
    with pytest.raises(UserError, match="stall_radius"):
        small_agent(subgoal_source="switch", stall_radius=0.0)


def test_stall_switch_swaps_an_episode_each_time_it_rests_and_never_one_that_moves():
    switch = StallSwitch(3, steps=4, radius=0.5)
    still = torch.tensor([[1.0, 1.0, 9.0]])             # x-y at rest; the third dimension is not the position
    sources = []
    for t in range(16):
        moving = torch.tensor([[0.3 * t, 0.0, 0.0]])    # 1.2 units per 4 steps: never stalled
        creeping = torch.tensor([[0.1 * t, 0.0, 0.0]])  # 0.4 units per 4 steps: stalled
        sources.append(switch.on_data(torch.cat([still, moving, creeping])).tolist())
    sources = np.array(sources)
    assert sources[:, 1].all()
    # a rest is seen once `steps` positions are behind the episode; after a swap it waits `steps` steps again
    expected = [True] * 4 + [False] * 5 + [True] * 5 + [False] * 2
    assert sources[:, 0].tolist() == expected and sources[:, 2].tolist() == expected
    switch.keep(torch.tensor([2, 0]))
    assert switch.on_data(torch.cat([creeping, still]) + 5.0).tolist() == [False, False]


def test_switch_acting_gives_the_data_subgoal_until_a_stall_then_the_policy_search():
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source="switch", data_neighbors=5, stall_steps=2, stall_radius=0.1,
                             num_noisy_candidates=0)
    agent.set_subgoal_data(data)
    observations = torch.as_tensor(data.observations[[3, 50]])
    moved = observations.clone()
    actor = agent.make_actor(data.observations[[20, 90]])
    with torch.no_grad():
        z = agent.encoder.encode_goals(observations)            # any latent: only the subgoal rule is tested
        data_subgoals = actor.table.subgoals(observations)
        searched = agent.search_subgoal(z, actor.z_goal, z)
        for t in range(4):                                       # episode 0 rests, episode 1 moves 1 unit per step
            moved[1] = observations[1] + t
            chosen = actor.subgoal(z, agent.encoder.encode_goals(moved), moved)
            torch.testing.assert_close(chosen[0], data_subgoals[0] if t < 2 else searched[0])
            torch.testing.assert_close(chosen[1], actor.table.subgoals(moved)[1])
    assert not torch.equal(data_subgoals[0], searched[0])


@pytest.mark.parametrize("source", ["proposer", "switch"])
def test_the_subgoal_is_the_goal_itself_where_v_puts_it_within_goal_reach_steps(source, monkeypatch):
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source=source, data_neighbors=5, num_noisy_candidates=0,
                             goal_reach_steps=3)
    agent.set_subgoal_data(data)
    observations = torch.as_tensor(data.observations[[3, 50, 90]])
    actor = agent.make_actor(data.observations[[20, 60, 100]])
    three_steps = -(1 - 0.99 ** 3) / (1 - 0.99)              # V of a state 3 rewards of -1 from its goal
    values = torch.tensor([-1.0, three_steps, three_steps - 0.01])
    with torch.no_grad():
        z = agent.encoder.encode_goals(observations)
        monkeypatch.setattr(actor, "value_here", lambda _: values)
        chosen = actor.subgoal(z, z, observations)
        by_rule = agent.make_actor(data.observations[[20, 60, 100]]).rule_subgoal(z, z, observations)
    torch.testing.assert_close(chosen[:2], actor.z_goal[:2])
    torch.testing.assert_close(chosen[2], by_rule[2])
    assert not torch.equal(by_rule[0], actor.z_goal[0])


def test_act_places_the_agent_at_its_single_observation_encoding(monkeypatch):
    data, _ = small_batch()
    agent = normalized_agent(data, num_noisy_candidates=0, goal_reach_steps=3)
    observations = torch.as_tensor(data.observations[[3, 50]])
    actor = agent.make_actor(data.observations[[20, 60]])
    seen, rule = [], actor.rule_subgoal

    def recording_rule(z, here, obs):
        seen.append(here)
        return rule(z, here, obs)

    monkeypatch.setattr(actor, "rule_subgoal", recording_rule)
    actor.act(observations)
    with torch.no_grad():
        here = agent.encoder.encode_goals(observations)
        torch.testing.assert_close(seen[0], here)
        torch.testing.assert_close(actor.value_here(here), agent.heads.value(here, actor.z_goal))


def test_goal_reach_steps_zero_never_replaces_the_rules_subgoal():
    data, _ = small_batch()
    agent = normalized_agent(data, num_noisy_candidates=0)
    observations = torch.as_tensor(data.observations[[3, 50]])
    actor = agent.make_actor(data.observations[[3, 50]])    # each goal is the agent's own state: V cannot be nearer
    with torch.no_grad():
        z = agent.encoder.encode_goals(observations)
        torch.testing.assert_close(actor.subgoal(z, z, observations), actor.rule_subgoal(z, z, observations))


def test_data_subgoal_checkpoint_round_trips_to_the_same_actions(tmp_path):
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source="switch", data_neighbors=5, data_stride=3, stall_steps=7,
                             stall_radius=0.25)
    agent.set_subgoal_data(data)
    save_checkpoint(agent.state_dict(), tmp_path / "model.pth")
    restored = OfflineAgent.from_checkpoint(load_checkpoint(tmp_path / "model.pth"))
    assert (restored.config.subgoal_source, restored.config.data_neighbors, restored.config.data_stride,
            restored.config.stall_steps, restored.config.stall_radius) == ("switch", 5, 3, 7, 0.25)
    restored.set_subgoal_data(data)
    observations, goals = data.observations[30:35], data.observations[[5, 90]]
    torch.manual_seed(0)
    expected = act_on(agent, observations, goals)
    torch.manual_seed(0)
    np.testing.assert_array_equal(act_on(restored, observations, goals), expected)



def test_value_step_is_the_n_step_expectile_td_of_single_observation_encodings():
    data, _ = small_batch()
    agent = normalized_agent(data, value_steps=1, expectile=0.8, inverse_transitions=0)   # V's part alone
    batch = WindowSampler(data, 12, 3, 0.99, seed=2).sample_transitions(64, 3)
    assert (batch["masks"] == 0).any() and (batch["masks"] == 1).any()
    loss, _ = agent.value_step_loss(batch)
    with torch.no_grad():
        z, z_ahead, z_goal = (agent.encoder.encode_goals(batch[k]) for k in ("observations", "future_observations",
                                                                              "value_goals"))
        target = batch["returns"] + batch["discounts"] * batch["masks"] * agent.targets["value"](z_ahead, z_goal)
        expected = expectile_loss(target - agent.heads.value(z, z_goal), 0.8).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_value_step_trains_the_inverse_dynamics_on_its_transitions_only_with_inverse_transitions():
    data, _ = small_batch()
    data.actions[:] = np.random.default_rng(0).uniform(-1, 1, data.actions.shape)
    batch = WindowSampler(data, 12, 3, 0.99, seed=2).sample_transitions(64, 3)
    for flag in (0, 1):
        agent = normalized_agent(data, value_steps=1, inverse_goal="subgoal", inverse_transitions=flag)
        value_only = normalized_agent(data, value_steps=1, inverse_goal="subgoal", inverse_transitions=0)
        loss, info = agent.value_step_loss(batch)
        with torch.no_grad():
            z, z_sub = (agent.encoder.encode_goals(batch[k]) for k in ("observations", "inverse_observations"))
            inverse = (agent.heads.action(z, z_sub, z_sub) - batch["actions"]).square().sum(-1).mean()
        torch.testing.assert_close(loss.detach(), value_only.value_step_loss(batch)[0].detach() + flag * inverse)
        before = [p.clone() for p in agent.heads.inverse.parameters()]
        encoder_before = [p.clone() for p in agent.encoder.parameters()]
        agent.gradient_step(loss)
        moved = any(not torch.equal(a, b) for a, b in zip(before, agent.heads.inverse.parameters()))
        assert moved == bool(flag) and ("inverse/transition_loss" in info) == bool(flag)
        assert all(torch.equal(a, b) for a, b in zip(encoder_before, agent.encoder.parameters()))  # encodings held


def test_inverse_transitions_needs_the_subgoal_as_the_inverse_dynamics_goal_input():
    with pytest.raises(UserError, match="inverse_goal subgoal"):
        small_agent(inverse_goal="goal", inverse_transitions=1)
    state = small_agent(inverse_goal="subgoal").state_dict()
    del state["agent_config"]["inverse_transitions"]                     # a checkpoint from before the field
    assert OfflineAgent.from_checkpoint(state).config.inverse_transitions == 0


def test_kstep_advantage_is_the_data_return_plus_discounted_value_ahead_minus_value_on_single_states():
    data, batch = small_batch()
    agent = normalized_agent(data, value_steps=1)
    with torch.no_grad():
        b, t = positions_with_a_subgoal(batch)
        lat = agent.encode_windows(batch)
        advantage = agent.actor_advantage(lat.at_rows(b, t), rows_with_a_subgoal(batch)[0])
        single = agent.encoder.encode_goals(batch["observations"])
        v_now = agent.heads.value(single, lat.z_actor_goal)
        v_ahead = agent.heads.value(at_positions(single, batch["future_offset"]), lat.z_actor_goal)
    expected = batch["actor_kstep_returns"] + batch["kstep_discounts"] * batch["actor_kstep_masks"] * v_ahead - v_now
    torch.testing.assert_close(advantage, expected[b, t])
    _, info = agent.total_loss(batch)
    assert "value/loss" not in info                           # V is trained by the value steps alone
    info = agent.update(batch, value_batches=[WindowSampler(data, 12, 3, 0.99).sample_transitions(32, 3)])
    assert np.isfinite(info["value/loss"]) and agent.step == 1


def test_value_steps_carry_the_value_across_two_trajectories_that_only_join():
    """a: (0,0) -> (1,0), b: (1,0) -> (2,0), c apart at y = 3. No trajectory goes from a's start to b's end; the
    value there must come from bootstrapping through the state a and b share, and stay below c's unreachable end."""
    n = 6
    a, b, c = (np.linspace(start, end, n).astype(np.float32) for start, end in
               [([0, 0], [1, 0]), ([1, 0], [2, 0]), ([0, 3], [2, 3])])
    observations = np.concatenate([a, b, c])
    terminals = np.zeros(len(observations), bool)
    terminals[[n - 1, 2 * n - 1, 3 * n - 1]] = True
    data = Trajectories.from_terminals(observations, np.zeros((len(observations), 2), np.float32), terminals)
    agent = normalized_agent(data, value_steps=1, lr=3e-3, discount=0.9, tau=0.1)
    sampler = WindowSampler(data, **agent.config.sampler_settings(), seed=0)
    for _ in range(800):
        agent.gradient_step(agent.value_step_loss(sampler.sample_transitions(128, 2))[0])
    with torch.no_grad():
        z = agent.encoder.encode_goals(torch.tensor(a[[0, 0]]))
        v_joined, v_apart = agent.heads.value(z, agent.encoder.encode_goals(torch.tensor(np.stack([b[-1], c[-1]]))))
    joined_path = -(1 - 0.9 ** (2 * (n - 1))) / 0.1                     # 10 steps: a, then b
    assert abs(float(v_joined) - joined_path) < 1.0
    assert float(v_joined) > float(v_apart) + 1.5                      # c's end: never reached, -10 at convergence


def test_a_checkpoint_saved_before_inverse_goal_acts_with_the_goal_input_it_was_trained_with():
    state = small_agent().state_dict()
    del state["agent_config"]["inverse_goal"], state["agent_config"]["inverse_transitions"]   # both came later
    assert OfflineAgent.from_checkpoint(state).config.inverse_goal == "goal"
    assert OfflineAgent.from_checkpoint(state, inverse_goal="subgoal").config.inverse_goal == "subgoal"
    assert OfflineAgent.from_checkpoint(small_agent().state_dict(), subgoal_source="data").config.inverse_goal == "subgoal"


def test_a_checkpoint_saved_before_the_fused_optimiser_resumes_fused():
    """torch restores the saved param groups' flags; a checkpoint from before `fused=True` must not switch it off."""
    state = small_agent().state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    agent = OfflineAgent.from_checkpoint(state)
    assert all(group["fused"] is True for group in agent.optimizer.param_groups)
