"""Rollout collection shared by the classic PPO and TRPO recipes: T steps of N environments into one batch.

The loop is the hot path of a classic-control run, so it is lean on purpose: one batched forward per
vector step under no_grad, preallocated numpy buffers (writing a numpy row costs far less than a
torch index_put), no per-step `.item()`, and the final-observation bootstrap only on steps where an
episode was actually cut by a time limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from zerorl.classic.agents import ActorCritic
from zerorl.classic.envs import Normalizer
from zerorl.core.advantages import gae_classic


@dataclass
class RolloutBatch:
    """One rollout, [T, N, ...] tensors (CleanRL layout). `dones[t]` marks obs[t] as the first of a
    new episode (gae_classic's convention); `truncation_values[t]` holds V(final obs) where step t
    hit a time limit."""

    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    values: torch.Tensor
    truncation_values: torch.Tensor
    last_value: torch.Tensor
    last_done: torch.Tensor
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    episode_steps: list[int] = field(default_factory=list)  # global step at which each episode ended

    def advantages_and_returns(self, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
        return gae_classic(
            self.rewards,
            self.values,
            self.dones,
            self.last_value,
            self.last_done,
            gamma=gamma,
            lam=gae_lambda,
            truncation_values=self.truncation_values,
        )


class RolloutCollector:
    """Steps a vector env with the current policy; keeps env state and episode statistics across rollouts."""

    def __init__(self, envs: gym.vector.VectorEnv, normalizer: Normalizer, num_steps: int, seed: int) -> None:
        self.envs, self.normalizer, self.num_steps = envs, normalizer, num_steps
        self.num_envs = envs.num_envs
        obs_shape = envs.single_observation_space.shape
        action_space = envs.single_action_space
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        action_shape = () if self.discrete else action_space.shape
        if not self.discrete:
            self.action_low, self.action_high = action_space.low, action_space.high
        T, N = num_steps, self.num_envs
        self.obs = np.zeros((T, N, *obs_shape), np.float32)
        self.actions = np.zeros((T, N, *action_shape), np.int64 if self.discrete else np.float32)
        self.logprobs = np.zeros((T, N), np.float32)
        self.rewards = np.zeros((T, N), np.float32)
        self.dones = np.zeros((T, N), np.float32)
        self.values = np.zeros((T, N), np.float32)
        self.truncation_values = np.zeros((T, N), np.float32)

        raw_obs, _ = envs.reset(seed=seed)
        self.next_obs = normalizer.obs(raw_obs, update=True).astype(np.float32)
        self.next_done = np.zeros(N, np.float32)
        # Undiscounted, unnormalized returns: what the published results and the user care about.
        self.running_return = np.zeros(N, np.float64)
        self.running_length = np.zeros(N, np.int64)
        self.global_step = 0

    def collect(self, agent: ActorCritic) -> RolloutBatch:
        episode_returns: list[float] = []
        episode_lengths: list[int] = []
        episode_steps: list[int] = []
        self.truncation_values.fill(0.0)
        for t in range(self.num_steps):
            obs_tensor = torch.from_numpy(self.next_obs)
            action, logprob, value = agent.act(obs_tensor)
            self.obs[t] = self.next_obs
            self.dones[t] = self.next_done
            self.actions[t] = action.numpy()
            self.logprobs[t] = logprob.numpy()
            self.values[t] = value.numpy()

            env_action = self.actions[t]
            if not self.discrete:
                # The Gaussian sample is stored unclipped (its log-prob is exact); the env gets a legal action.
                env_action = np.clip(env_action, self.action_low, self.action_high)
            raw_obs, reward, terminated, truncated, infos = self.envs.step(env_action)
            self.global_step += self.num_envs
            done = terminated | truncated

            self.running_return += reward
            self.running_length += 1
            self.rewards[t] = self.normalizer.reward(reward, done)
            if done.any():
                for i in np.flatnonzero(done):
                    episode_returns.append(float(self.running_return[i]))
                    episode_lengths.append(int(self.running_length[i]))
                    episode_steps.append(self.global_step)
                self.running_return[done] = 0.0
                self.running_length[done] = 0
                cut = np.flatnonzero(truncated & ~terminated)
                if cut.size:
                    # Time limit, not a terminal state: bootstrap from V(real final obs), not from 0.
                    final_obs = np.stack([infos["final_obs"][i] for i in cut])
                    final_obs = self.normalizer.obs(final_obs, update=False).astype(np.float32)
                    with torch.no_grad():
                        self.truncation_values[t, cut] = agent.value(torch.from_numpy(final_obs)).numpy()
            self.next_obs = self.normalizer.obs(raw_obs, update=True).astype(np.float32)
            self.next_done = done.astype(np.float32)

        with torch.no_grad():
            last_value = agent.value(torch.from_numpy(self.next_obs))
        # Copies: the numpy buffers are reused by the next rollout while this batch may still be alive.
        return RolloutBatch(
            obs=torch.tensor(self.obs),
            actions=torch.tensor(self.actions),
            logprobs=torch.tensor(self.logprobs),
            rewards=torch.tensor(self.rewards),
            dones=torch.tensor(self.dones),
            values=torch.tensor(self.values),
            truncation_values=torch.tensor(self.truncation_values),
            last_value=last_value,
            last_done=torch.tensor(self.next_done),
            episode_returns=episode_returns,
            episode_lengths=episode_lengths,
            episode_steps=episode_steps,
        )
