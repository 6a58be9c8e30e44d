"""Losses on hand-computed cases, the EMA rule, learning on a fixed batch, acting and checkpoints."""
import math

import numpy as np
import pytest
import torch

from offline_agent import (AgentConfig, DataSubgoals, OfflineAgent, StallSwitch, advantage_weights, at_positions,
                           expectile_loss, info_nce_loss)
from ogbench_utils import Trajectories, WindowSampler
from utils import UserError, load_checkpoint, save_checkpoint

SMALL = dict(obs_dim=2, action_dim=2, latent_dim=8, d_model=16, n_layers=1, hidden_dim=32,
             context_length=12, subgoal_steps=3, subgoal_source="proposer", mamba_backend="torch")


def small_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    return OfflineAgent(AgentConfig(**dict(SMALL, **overrides)))


def normalized_agent(data, **overrides):
    agent = small_agent(**overrides)
    agent.set_normalization(data.observations)
    return agent


def small_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [30, 40, 50]
    terminals = np.zeros(sum(lengths), bool)
    terminals[np.cumsum(lengths) - 1] = True
    obs = np.cumsum(rng.normal(size=(sum(lengths), 2)), 0).astype(np.float32)
    actions = np.clip(rng.normal(size=(sum(lengths), 2)), -1, 1).astype(np.float32)
    data = Trajectories.from_terminals(obs, actions, terminals)
    return data, WindowSampler(data, 12, 3, 0.99, seed=seed, inverse_subgoals=True).sample(8)


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
    assert {"critic/q_mean", "value/v_max", "inverse/advantage_mean", "infonce/accuracy"} <= set(first)


def test_critic_target_is_never_below_the_hindsight_return():
    data, batch = small_batch()
    targets = {}
    for bound in (True, False):
        agent = normalized_agent(data, hindsight_bound=bound)
        torch.nn.init.constant_(agent.targets["value"].net[-1].bias, -1e4)   # a hopeless target critic
        latents = agent.encode_batch(batch)
        valid = batch["future_valid"].float()
        info = agent.critic_loss(latents.z, latents.z_next, latents.z_future, latents.z_value_goal, batch, valid)[1]
        targets[bound] = info["critic/target_mean"].item()
    worst = -1 / (1 - agent.config.discount)
    assert targets[False] < 10 * worst
    assert worst <= targets[True] <= 0


def test_goal_style_subgoal_is_the_goal_encoding_of_the_state_k_steps_ahead():
    data, batch = small_batch()
    for kind in ("goal", "history"):
        agent = normalized_agent(data, subgoal_latent=kind)
        with torch.no_grad():
            latents = agent.encode_batch(batch)
            b, i = 1, 2
            state_ahead = batch["observations"][b, batch["future_offset"][b, i]]
            goal_style = agent.encoder.encode_goals(state_ahead)
            history = agent.encoder(batch["observations"])[b, batch["future_offset"][b, i]]
        assert torch.allclose(latents.z_future[b, i], history, atol=1e-5)   # the bootstrap keeps the history
        expected = goal_style if kind == "goal" else history
        assert torch.allclose(latents.z_next[b, i], expected, atol=1e-5)


def test_observation_inverse_state_ignores_the_history():
    data, batch = small_batch()
    agent = normalized_agent(data, inverse_state="observation")
    with torch.no_grad():
        lat = agent.encode_batch(batch)
        torch.testing.assert_close(lat.z_state, agent.encoder.encode_goals(batch["observations"]))
        obs, z_next, z_goal = batch["observations"][:, -1], lat.z_next[:, 0], lat.z_actor_goal[:, 0]
        one = agent.inverse_action(lat.z[:, -1], obs, z_next, z_goal)
        other = agent.inverse_action(torch.randn_like(lat.z[:, -1]), obs, z_next, z_goal)
        torch.testing.assert_close(one, other)
        history = small_agent(inverse_state="history")
        assert not torch.allclose(history.inverse_action(lat.z[:, -1], obs, z_next, z_goal),
                                  history.inverse_action(torch.randn_like(lat.z[:, -1]), obs, z_next, z_goal))


def test_uniform_inverse_subgoal_is_the_goal_encoding_of_the_sampled_state():
    data = small_batch()[0]
    sampler = WindowSampler(data, context_length=12, subgoal_steps=3, discount=0.99, seed=0, inverse_subgoals=True)
    batch = sampler.sample(4)
    agent = normalized_agent(data, inverse_subgoal="uniform")
    with torch.no_grad():
        lat = agent.encode_batch(batch)
        b, i = 2, 1
        state = batch["observations"][b, batch["inverse_offset"][b, i]]
        torch.testing.assert_close(lat.z_inverse_next[b, i], agent.encoder.encode_goals(state))
    info = agent.update(batch)
    assert np.isfinite(info["inverse/loss"])


def test_kstep_advantage_is_the_data_return_plus_discounted_value_ahead_minus_value():
    data, batch = small_batch()
    agent = normalized_agent(data, advantage="kstep")
    with torch.no_grad():
        lat = agent.encode_batch(batch)
        advantage = agent.policy_advantage(lat.z, lat.z_next, lat.z_future, lat.z_actor_goal, batch)
        v_now = agent.heads.value(lat.z, lat.z_actor_goal)
        v_ahead = agent.heads.value(lat.z_future, lat.z_actor_goal)
    reached = batch["actor_kstep_masks"] == 0
    assert reached.any() and (~reached).any()
    expected = batch["actor_kstep_returns"] + batch["kstep_discounts"] * v_ahead * (~reached) - v_now
    torch.testing.assert_close(advantage, expected)


def test_checkpoints_from_before_the_subgoal_option_load_with_history_subgoals():
    state = small_agent(subgoal_latent="history").state_dict()
    for key in ("subgoal_latent", "advantage", "inverse_beta", "inverse_subgoal", "subgoal_source"):
        del state["agent_config"][key]
    config = OfflineAgent.from_checkpoint(state).config
    assert (config.subgoal_latent, config.advantage, config.inverse_beta, config.inverse_subgoal,
            config.subgoal_source) == ("history", "q", None, "k", "proposer")
    with pytest.raises(ValueError, match="subgoal_latent"):
        small_agent(subgoal_latent="future")


def test_act_gives_actions_in_range_for_a_batch_of_environments():
    agent = small_agent()
    windows = np.random.default_rng(0).normal(size=(7, 5, 2)).astype(np.float32) * 10
    actions = agent.act(windows, windows[:, -1] + 3)
    assert actions.shape == (7, 2) and np.all(np.abs(actions) <= 1.0)


def test_candidates_hold_the_proposal_noisy_copies_and_step_limited_interpolations():
    agent = small_agent(num_noisy_candidates=3, num_interpolations=4)
    z, z_goal = torch.zeros(2, 8), torch.ones(2, 8)
    proposal = agent.heads.proposer(z, z_goal)
    candidates = agent.candidates(z, z_goal)
    assert candidates.shape == (2, 1 + 3 + 4, 8)
    torch.testing.assert_close(candidates[:, 0], proposal)
    interpolations = candidates[:, 4:]
    alphas = interpolations[..., 0]                                    # z = 0, z_g = 1: the point is alpha * 1
    torch.testing.assert_close(interpolations, alphas.unsqueeze(-1).expand(-1, -1, 8))
    reach = (proposal.norm(dim=-1) / math.sqrt(8)).clamp(max=1.0)
    torch.testing.assert_close(alphas[:, -1], reach)                   # the largest step equals the proposal's
    far_goal = torch.full((2, 8), 1e3)
    far_step = agent.heads.proposer(z, far_goal).norm(dim=-1, keepdim=True)
    assert torch.all(agent.candidates(z, far_goal)[:, 4:].norm(dim=-1) <= far_step * 1.0001)


def test_critic_update_trains_the_critic_on_single_observation_latents_only():
    data, batch = small_batch()
    agent = normalized_agent(data, lr=1e-3)
    untouched = [p.clone() for p in list(agent.heads.inverse.parameters()) + list(agent.heads.proposer.parameters())]
    first = agent.critic_update(batch)
    for _ in range(40):
        last = agent.critic_update(batch)
    assert last["critic_steps/critic_loss"] < first["critic_steps/critic_loss"]
    for before, after in zip(untouched, list(agent.heads.inverse.parameters()) + list(agent.heads.proposer.parameters())):
        torch.testing.assert_close(before, after)
    assert agent.step == 0                                              # critic steps are not updates


def test_critic_step_proposer_trains_the_proposer_but_not_the_inverse_dynamics():
    data, batch = small_batch()
    agent = normalized_agent(data, lr=1e-3, critic_step_proposer=True)
    inverse = [p.clone() for p in agent.heads.inverse.parameters()]
    proposer = [p.clone() for p in agent.heads.proposer.parameters()]
    for _ in range(3):
        info = agent.critic_update(batch)
    assert math.isfinite(info["critic_steps/proposer_loss"]) and agent.step == 0
    for before, after in zip(inverse, agent.heads.inverse.parameters()):
        torch.testing.assert_close(before, after)
    assert not all(torch.equal(before, after) for before, after in zip(proposer, agent.heads.proposer.parameters()))


def test_proposer_update_moves_the_proposer_alone_even_after_joint_updates():
    data, batch = small_batch()
    agent = normalized_agent(data, lr=1e-3)
    for _ in range(2):   # Adam then holds moments for every parameter; those without a gradient must not move
        agent.update(batch)
    frozen = {name: {k: v.clone() for k, v in module.state_dict().items()}
              for name, module in [("encoder", agent.encoder), ("targets", agent.targets)]
              + [(n, m) for n, m in agent.heads.named_children() if n != "proposer"]}
    proposer = [p.clone() for p in agent.heads.proposer.parameters()]
    first = agent.proposer_update(batch)["proposer/loss"]
    for _ in range(40):
        last = agent.proposer_update(batch)["proposer/loss"]
    assert last < first and agent.step == 2
    modules = dict(agent.heads.named_children(), encoder=agent.encoder, targets=agent.targets)
    for name, state in frozen.items():
        for key, value in state.items():
            torch.testing.assert_close(value, modules[name].state_dict()[key], rtol=0, atol=0, msg=f"{name}.{key}")
    assert not any(torch.equal(b, a) for b, a in zip(proposer, agent.heads.proposer.parameters()))


def test_critic_update_on_valid_rows_equals_the_masked_losses_over_whole_windows():
    data, batch = small_batch()
    agent = normalized_agent(data)
    valid = batch["future_valid"].float()
    with torch.no_grad():
        z_observation, z_goal = agent.encoder.encode_goals(torch.stack([batch["observations"], batch["value_goals"]]))
        z_future = at_positions(z_observation, batch["future_offset"])
        critic, _ = agent.critic_loss(z_observation, z_future, z_future, z_goal, batch, valid)
        value, _ = agent.value_loss(z_observation, z_future, z_goal, valid)
    info = agent.critic_update(batch)
    assert info["critic_steps/critic_loss"] == pytest.approx(float(critic), rel=1e-5)
    assert info["critic_steps/value_loss"] == pytest.approx(float(value), rel=1e-5)


def test_critic_batch_transitions_draws_the_critic_steps_from_the_transition_draw():
    data, batch = small_batch()
    transitions = WindowSampler(data, 12, 3, 0.99, seed=1).sample_transitions(64)
    agent = normalized_agent(data, critic_steps=2, critic_batch="transitions")
    draws = []
    agent.train_step(lambda: draws.append("windows") or batch, lambda: draws.append("transitions") or transitions)
    assert draws == ["windows", "transitions", "transitions"]
    with pytest.raises(ValueError, match="draw_transitions"):
        agent.train_step(lambda: batch)


def test_train_step_draws_one_batch_per_step():
    data, batch = small_batch()
    agent = normalized_agent(data, critic_steps=2)
    draws = []
    info = agent.train_step(lambda: draws.append(1) or batch)
    assert len(draws) == 3 and agent.step == 1 and "critic_steps/value_loss" in info


def test_checkpoint_round_trips_to_the_same_actions(tmp_path):
    data, batch = small_batch()
    agent = normalized_agent(data)
    for _ in range(3):
        agent.update(batch)
    path = tmp_path / "agent.pth"
    save_checkpoint(agent.state_dict(), path)
    restored = OfflineAgent.from_checkpoint(load_checkpoint(path))
    windows = data.observations[:10][None].repeat(4, 0)
    torch.manual_seed(1)
    expected = agent.act(windows, data.observations[20:24])
    torch.manual_seed(1)
    np.testing.assert_array_equal(restored.act(windows, data.observations[20:24]), expected)
    assert restored.step == 3
    torch.testing.assert_close(restored.encoder.obs_mean, agent.encoder.obs_mean)
    # the optimiser state came back too: one more identical update gives identical weights
    agent.update(batch)
    restored.update(batch)
    for a, b in zip(agent.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b)


def test_recurrent_actor_latents_equal_the_encoder_over_its_context():
    """Stream restarts every L/2 steps: the latent used is E(last c observations), c in [L/2+1, L]."""
    agent = small_agent(context_length=6)
    obs = np.random.default_rng(0).normal(size=(3, 20, 2)).astype(np.float32)
    actor = agent.make_actor(obs[:, -1], mode="recurrent", streams=2)
    for t in range(20):
        actor.act(obs[:, t])
        start = min(s for s in actor.starts if s is not None)
        if t >= 3:
            assert 6 // 2 + 1 <= t - start + 1 <= 6
        cache = [c for c, s in zip(actor.caches, actor.starts) if s == start][0]
        with torch.no_grad():
            expected = agent.encoder(torch.as_tensor(obs[:, start:t + 1]))[:, -1]
            # re-run the oldest stream from its start to compare against the full forward
            fresh = agent.encoder.allocate_inference_cache(3)
            for j in range(start, t + 1):
                z = agent.encoder.step(torch.as_tensor(obs[:, j]), fresh)
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
        assert cache is not None


def test_window_actor_matches_act_on_the_last_l_observations():
    agent = small_agent(context_length=4, num_noisy_candidates=0)
    obs = np.random.default_rng(1).normal(size=(2, 9, 2)).astype(np.float32)
    actor = agent.make_actor(obs[:, -1], mode="window")
    for t in range(9):
        action = actor.act(obs[:, t])
    np.testing.assert_allclose(action, agent.act(obs[:, 5:9], obs[:, -1]), rtol=1e-5, atol=1e-6)


def test_subgoal_origin_lives_in_the_subgoals_space():
    observations, z = torch.randn(5, 2), torch.randn(5, 8)
    goal_style = small_agent(subgoal_latent="goal")
    torch.testing.assert_close(goal_style.subgoal_origin(z, observations), goal_style.encoder.encode_goals(observations))
    assert small_agent(subgoal_latent="history").subgoal_origin(z, observations) is z
    origin, z_goal = torch.zeros(2, 8), torch.ones(2, 8)
    agent = small_agent(num_noisy_candidates=0, num_interpolations=3)
    interpolations = agent.candidates(z[:2], z_goal, origin)[:, 1:]
    torch.testing.assert_close(interpolations, interpolations[..., :1].expand(-1, -1, 8))   # on the origin-goal segment


# ----------------------------------------------------------------------------- subgoals from the data

def test_data_subgoals_are_the_states_k_steps_ahead_in_their_own_trajectory():
    data, _ = small_batch()
    bank = DataSubgoals.from_dataset(data, steps=3, stride=4, lookahead=10)
    rows = np.arange(0, len(data), 4)
    np.testing.assert_array_equal(bank.states.numpy(), data.observations[rows])
    for steps, states in ((3, bank.successors), (10, bank.lookaheads)):
        for row, successor in zip(rows, states.numpy()):
            ahead = np.flatnonzero((data.observations == successor).all(1))
            assert len(ahead) == 1 and data.traj_ends[ahead[0]] == data.traj_ends[row]  # never crosses an episode end
            assert ahead[0] == min(row + steps, data.traj_ends[row])                      # ahead, clamped at the end


@pytest.mark.parametrize("lookahead", [None, 8])
def test_data_subgoal_is_the_successor_of_a_nearest_state_with_the_best_value_ahead(lookahead):
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source="data", data_neighbors=7, data_stride=2, data_lookahead=lookahead)
    agent.set_subgoal_data(data)
    observations = torch.as_tensor(data.observations[[3, 50, 101]]) + 0.3
    goals = torch.as_tensor(data.observations[[20, 0, 119]])
    bank = agent.subgoal_data
    with torch.no_grad():
        z_goal = agent.encoder.encode_goals(goals)
        chosen = agent.subgoal_table(z_goal).subgoals(observations)
        # reference: brute force in float64 over the bank; V of the state `lookahead` on (k: the successor itself)
        states = agent.encoder.normalize(bank.states).double()
        nearest = torch.cdist(agent.encoder.normalize(observations).double(), states).argsort(dim=1)[:, :7]
        for i in range(3):
            valued = agent.encoder.encode_goals((bank.successors if lookahead is None else bank.lookaheads)[nearest[i]])
            values = agent.heads.value(valued, z_goal[i].expand_as(valued))
            best = nearest[i][values.argmax()]
            torch.testing.assert_close(chosen[i], agent.encoder.encode_goals(bank.successors[best][None])[0])


@pytest.mark.parametrize("mode", ["recurrent", "window"])
@pytest.mark.parametrize("source", ["data", "switch"])
def test_data_subgoal_actors_act_in_range_and_drop_finished_episodes(mode, source):
    data, _ = small_batch()
    agent = normalized_agent(data, subgoal_source=source, data_neighbors=5)
    agent.set_subgoal_data(data)
    goals = data.observations[[10, 60, 110]]
    actor = agent.make_actor(goals, mode=mode)
    action = actor.act(data.observations[[0, 40, 80]])
    assert action.shape == (3, 2) and np.abs(action).max() <= 1
    actor.keep(np.array([0, 2]))
    assert actor.act(data.observations[[1, 81]]).shape == (2, 2)
    # the table is the agent's own choice: act() without one builds the same
    window = data.observations[[79, 80, 81]][None].repeat(2, 0)
    np.testing.assert_allclose(agent.act(window, goals[:2]),
                               agent.act(window, goals[:2], agent.subgoal_table(agent.latents(window, goals[:2])[1])))


@pytest.mark.parametrize("source", ["data", "switch"])
def test_data_subgoals_without_a_dataset_fail_with_a_clear_message(source):
    agent = small_agent(subgoal_source=source)
    with pytest.raises(UserError, match="set_subgoal_data"):
        agent.make_actor(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="subgoal_source"):
        small_agent(subgoal_source="dataset")
    with pytest.raises(ValueError, match="stall_radius"):
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
    with torch.no_grad():
        z_goal = agent.encoder.encode_goals(torch.as_tensor(data.observations[[20, 90]]))
        z = agent.encoder.encode_goals(observations)            # any latent: only the subgoal rule is tested
        table = agent.subgoal_table(z_goal)
        data_subgoals = table.subgoals(observations)
        searched = agent.search_subgoal(z, z_goal, agent.subgoal_origin(z, observations))
        for t in range(4):                                       # episode 0 rests, episode 1 moves 1 unit per step
            moved[1] = observations[1] + t
            chosen = agent.choose_subgoal(z, z_goal, moved, table)
            torch.testing.assert_close(chosen[0], data_subgoals[0] if t < 2 else searched[0])
            torch.testing.assert_close(chosen[1], table.subgoals(moved)[1])
    assert not torch.equal(data_subgoals[0], searched[0])


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
    windows, goals = data.observations[None, 30:35].repeat(2, 0), data.observations[[5, 90]]
    np.testing.assert_array_equal(agent.act(windows, goals), restored.act(windows, goals))
