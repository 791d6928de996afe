"""Classic-control PPO / TRPO: distribution maths, normalization, config errors, learning, trust region, CLI."""

from __future__ import annotations

import copy
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from zerorl.classic.agents import ActorCritic
from zerorl.classic.cli import main
from zerorl.classic.config import ConfigError, PPOConfig, TRPOConfig, default_config_path, load_config
from zerorl.classic.envs import Normalizer, RunningMeanStd, make_vector_env
from zerorl.classic.ppo import train_ppo
from zerorl.classic.rollout import RolloutCollector
from zerorl.classic.tracking import RunLogger
from zerorl.classic.trpo import train_trpo, trust_region_policy_update


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _box(n: int) -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (n,), np.float32)


# --- distribution maths against torch.distributions --------------------------------------------


def test_categorical_logprob_entropy_kl_match_torch_distributions():
    torch.manual_seed(0)
    agent = ActorCritic(_box(3), gym.spaces.Discrete(4), [8])
    old, new = (torch.randn(5, 4),), (torch.randn(5, 4),)
    actions = torch.tensor([0, 3, 1, 2, 3])
    p, q = torch.distributions.Categorical(logits=old[0]), torch.distributions.Categorical(logits=new[0])
    torch.testing.assert_close(agent.log_prob(old, actions), p.log_prob(actions))
    torch.testing.assert_close(agent.entropy(old), p.entropy())
    torch.testing.assert_close(agent.kl(old, new), torch.distributions.kl_divergence(p, q))
    assert agent.kl(old, old).abs().max() < 1e-6


def test_gaussian_logprob_entropy_kl_match_torch_distributions():
    torch.manual_seed(0)
    agent = ActorCritic(_box(3), _box(2), [8], log_std_init=-0.5)
    old = (torch.randn(5, 2), torch.full((5, 2), -0.5))
    new = (torch.randn(5, 2), torch.full((5, 2), 0.3))
    actions = torch.randn(5, 2)
    p = torch.distributions.Normal(old[0], old[1].exp())
    q = torch.distributions.Normal(new[0], new[1].exp())
    torch.testing.assert_close(agent.log_prob(old, actions), p.log_prob(actions).sum(-1))
    torch.testing.assert_close(agent.entropy(old), p.entropy().sum(-1))
    torch.testing.assert_close(agent.kl(old, new), torch.distributions.kl_divergence(p, q).sum(-1))
    # Hand value, one dimension: μ 0 → 1, σ 1 → 1: KL = (0 − 1)² / 2 = 0.5.
    one = agent.kl((torch.zeros(1, 1), torch.zeros(1, 1)), (torch.ones(1, 1), torch.zeros(1, 1)))
    assert one.item() == pytest.approx(0.5)


def test_gumbel_max_sampling_matches_softmax_frequencies():
    torch.manual_seed(0)
    agent = ActorCritic(_box(3), gym.spaces.Discrete(3), [8])
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(40_000, 3)
    freq = torch.bincount(agent.sample((logits,)), minlength=3).float() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.01, rtol=0)


# --- normalization ------------------------------------------------------------------------------


def test_running_mean_std_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(300, 2))
    rms = RunningMeanStd((2,))
    for chunk in np.split(data, 6):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-4)


def test_reward_normalizer_scales_by_return_std_and_resets_on_done():
    norm = Normalizer((1,), num_envs=1, gamma=0.5, normalize_obs=False, normalize_reward=True)
    norm.reward(np.array([1.0]), np.array([False]))  # discounted return 1
    assert norm.discounted_return[0] == 1.0
    scaled = norm.reward(np.array([1.0]), np.array([True]))  # return 1.5, then reset by done
    assert norm.discounted_return[0] == 0.0
    assert scaled[0] == pytest.approx(1.0 / math.sqrt(norm.return_rms.var + 1e-8))
    obs = np.array([[5.0]])
    assert norm.obs(obs, update=True) is obs  # observation normalization off: untouched


def test_time_limit_truncation_bootstraps_from_final_observation_value():
    # Pendulum never terminates; every episode is cut at 200 steps by its time limit.
    envs = make_vector_env("Pendulum-v1", 2)
    norm = Normalizer((3,), 2, 0.9, normalize_obs=False, normalize_reward=False)
    collector = RolloutCollector(envs, norm, num_steps=201, seed=0)
    agent = ActorCritic(envs.single_observation_space, envs.single_action_space, [8])
    batch = collector.collect(agent)
    envs.close()
    assert batch.truncation_values[:199].abs().sum() == 0 and batch.truncation_values[200].abs().sum() == 0
    assert (batch.truncation_values[199] != 0).all()  # V(final obs) of both envs at the time limit
    assert batch.dones[200].tolist() == [1.0, 1.0]  # obs 200 starts a new episode
    assert len(batch.episode_returns) == 2 and batch.episode_lengths == [200, 200]


# --- configuration and errors -------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"])
def test_tuned_yaml_defaults_exist_and_validate(algo, env_id):
    if (algo, env_id) == ("trpo", "Pendulum-v1") and not default_config_path(algo, env_id).is_file():
        pytest.skip("no tuned TRPO Pendulum config")
    assert default_config_path(algo, env_id).is_file()
    config = load_config(algo, env_id)
    assert config.env_id == env_id and isinstance(config, PPOConfig if algo == "ppo" else TRPOConfig)


def test_config_precedence_yaml_then_file_then_overrides_then_flags(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("num_envs: 4\nlearning_rate: 5.0e-4\nseed: 3\n")
    config = load_config(
        "ppo", "CartPole-v1", config_file=user, overrides={"learning_rate": "1e-4", "hidden_sizes": "[16, 16]"},
        seed=7, total_steps=4096,
    )  # fmt: skip
    tuned = load_config("ppo", "CartPole-v1")
    assert config.num_envs == 4 and config.learning_rate == 1e-4 and config.seed == 7
    assert config.hidden_sizes == [16, 16] and config.total_steps == 4096
    assert config.gae_lambda == tuned.gae_lambda  # untouched keys keep the tuned default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algo": "a2c"}, "unknown algo 'a2c'"),
        ({"overrides": {"learnin_rate": "1e-3"}}, "unknown config key 'learnin_rate'"),
        ({"overrides": {"num_envs": "four"}}, "num_envs='four'"),
        ({"overrides": {"gamma": "1.5"}}, "gamma=1.5"),
        ({"overrides": {"num_minibatches": "3"}}, "num_minibatches=3"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    kwargs = {"algo": "ppo", "env_id": "CartPole-v1", **kwargs}
    with pytest.raises(ConfigError, match=message):
        load_config(**kwargs)


def test_bad_env_id_and_missing_config_file_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown Gymnasium environment env_id='CartPool-v1'"):
        make_vector_env("CartPool-v1", 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("ppo", config_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="env_id='CartPool-v1'"):
        main(["--algo", "ppo", "--env", "CartPool-v1", "--steps", "2048", "--output-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown algo 'dqn'"):
        main(["--algo", "dqn", "--env", "CartPole-v1", "--output-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not key=value"):
        main(["--algo", "ppo", "--env", "CartPole-v1", "--output-dir", str(tmp_path), "learning_rate"])


# --- learning and the trust region --------------------------------------------------------------


def test_short_ppo_run_on_cartpole_improves_the_return():
    config = load_config("ppo", "CartPole-v1", total_steps=20_000, seed=1, progress=False)
    logger = RunLogger(None, config.total_steps, progress=False, desc="test")
    train_ppo(config, logger)
    returns = logger.episode_returns
    first, last = np.mean(returns[:30]), np.mean(returns[-10:])
    # A random CartPole policy lasts ~22 steps; after 20k steps PPO balances for well over 100.
    assert first < 40
    assert last > 120 and last > 3 * first


def _rollout_batch(env_id: str, seed: int, num_steps: int = 256):
    torch.manual_seed(seed)
    envs = make_vector_env(env_id, 4)
    norm = Normalizer(envs.single_observation_space.shape, 4, 0.99, False, False)
    agent = ActorCritic(envs.single_observation_space, envs.single_action_space, [32, 32])
    batch = RolloutCollector(envs, norm, num_steps, seed).collect(agent)
    envs.close()
    advantages, _ = batch.advantages_and_returns(0.99, 0.95)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    n = 4 * num_steps
    flat = batch.obs.reshape(n, -1), batch.actions.reshape(n, *batch.actions.shape[2:])
    return agent, flat[0], flat[1], batch.logprobs.reshape(-1, 1), advantages.reshape(-1, 1)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("max_kl", [0.001, 0.01, 0.05])
def test_trpo_accepted_step_respects_max_kl_measured_independently(env_id, max_kl):
    agent, obs, actions, old_logp, advantages = _rollout_batch(env_id, seed=0)
    before = copy.deepcopy(agent)
    config = TRPOConfig(env_id=env_id, max_kl=max_kl)
    info = trust_region_policy_update(agent, obs, actions, old_logp, advantages, config)
    assert info.accepted
    with torch.no_grad():
        measured_kl = agent.kl(before.policy_params(obs), agent.policy_params(obs)).mean().item()
        # Surrogate mean(r·Â) improved over its value 0 at θ_old (advantages are whitened).
        ratio = torch.exp(agent.log_prob(agent.policy_params(obs), actions) - old_logp.squeeze(-1))
        surrogate = (ratio * advantages.squeeze(-1)).mean().item()
    assert 0 < measured_kl <= max_kl
    assert measured_kl == pytest.approx(info.kl, rel=1e-4)
    assert measured_kl > max_kl / 20  # a real step, not a vanishing one (backtracks halve the step)
    assert surrogate > 0 and surrogate == pytest.approx(info.surrogate_after, rel=1e-3, abs=1e-6)
    # The critic is not part of the trust region.
    for p, q in zip(agent.critic.parameters(), before.critic.parameters()):
        assert torch.equal(p, q)


def test_short_trpo_run_every_update_within_max_kl():
    config = load_config(
        "trpo", "CartPole-v1", total_steps=8192, seed=2, progress=False, overrides={"max_kl": "0.02"}
    )
    logger = RunLogger(None, config.total_steps, progress=False, desc="test")
    train_trpo(config, logger)
    kls = [u["kl"] for u in logger.updates]
    accepted = [u["accepted"] for u in logger.updates]
    assert len(kls) == config.num_iterations
    assert all(kl <= 0.02 for kl in kls)
    assert sum(accepted) >= 0.75 * len(accepted)


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_cli_writes_metrics_summary_and_plot(tmp_path, algo):
    out = tmp_path / algo
    code = main(
        ["--algo", algo, "--env", "CartPole-v1", "--steps", "2048", "--seed", "0", "--output-dir", str(out),
         "--no-progress", "eval_episodes=20"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_return_mean", "eval_return_std", "wall_seconds"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key])
    assert summary["eval_episodes"] == 20 and len(summary["eval_returns"]) == 20
    assert summary["eval_return_mean"] == pytest.approx(np.mean(summary["eval_returns"]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    episodes = [line for line in lines if "episodic_return" in line]
    assert episodes and all(line["episodic_return"] >= 1 for line in episodes)
    assert any("kl" in line for line in lines)
    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
