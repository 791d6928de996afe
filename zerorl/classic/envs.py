"""Vectorized Gymnasium environments and running observation / reward normalization.

Environments are built with `gymnasium.make_vec` in SAME_STEP autoreset mode: when an episode ends,
`step` returns the first observation of the next episode and puts the last one in
`infos["final_obs"]`. That is the convention GAE wants (every stored transition is a real one) and it
gives the final observation needed to bootstrap V(s_T) when an episode is cut by a time limit.

The normalizer follows SB3's VecNormalize: observations are whitened with running mean/variance and
clipped; rewards are divided by the running standard deviation of the discounted return (not
centred, so the sign of a reward never flips) and clipped. Statistics are frozen for evaluation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from zerorl.classic.config import ConfigError


def make_vector_env(env_id: str, num_envs: int, mode: str = "sync") -> gym.vector.VectorEnv:
    """Build `num_envs` copies of `env_id`; raise ConfigError for ids or spaces we cannot train on."""
    try:
        envs = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode=mode,
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        )
    except gym.error.Error as err:
        raise ConfigError(
            f"unknown Gymnasium environment env_id={env_id!r} ({err}); "
            "use a registered id such as CartPole-v1, Acrobot-v1 or Pendulum-v1"
        ) from err
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        envs.close()
        raise ConfigError(f"env_id={env_id!r} has observation space {obs_space}; the MLP agent needs a 1-D Box")
    if not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)):
        envs.close()
        raise ConfigError(f"env_id={env_id!r} has action space {act_space}; supported: Discrete or Box")
    return envs


class RunningMeanStd:
    """Running mean and variance of a stream of batches (Chan et al. parallel update)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4  # SB3's prior: avoids dividing by zero before the first update

    def update(self, batch: np.ndarray) -> None:
        batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total


class Normalizer:
    """Observation whitening and reward scaling for a vector of `num_envs` environments."""

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        num_envs: int,
        gamma: float,
        normalize_obs: bool,
        normalize_reward: bool,
        obs_clip: float = 10.0,
        reward_clip: float = 10.0,
        epsilon: float = 1e-8,
    ) -> None:
        self.normalize_obs, self.normalize_reward = normalize_obs, normalize_reward
        self.obs_rms, self.return_rms = RunningMeanStd(obs_shape), RunningMeanStd(())
        self.gamma, self.obs_clip, self.reward_clip, self.epsilon = gamma, obs_clip, reward_clip, epsilon
        self.discounted_return = np.zeros(num_envs, np.float64)

    def obs(self, obs: np.ndarray, update: bool) -> np.ndarray:
        if not self.normalize_obs:
            return obs
        if update:
            self.obs_rms.update(obs)
        normed = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon)
        return np.clip(normed, -self.obs_clip, self.obs_clip).astype(np.float32)

    def reward(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        if not self.normalize_reward:
            return reward
        # Scale by the std of the discounted return: keeps value targets O(1) whatever the reward scale.
        self.discounted_return = self.discounted_return * self.gamma + reward
        self.return_rms.update(self.discounted_return)
        self.discounted_return[done] = 0.0
        scaled = reward / np.sqrt(self.return_rms.var + self.epsilon)
        return np.clip(scaled, -self.reward_clip, self.reward_clip)

    def state_dict(self) -> dict[str, Any]:
        return {
            "obs_mean": self.obs_rms.mean.tolist(),
            "obs_var": self.obs_rms.var.tolist(),
            "obs_count": self.obs_rms.count,
            "return_var": float(self.return_rms.var),
        }
