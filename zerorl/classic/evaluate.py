"""Deterministic evaluation: the trained policy's mode (argmax / Gaussian mean), frozen normalization."""

from __future__ import annotations

import numpy as np
import torch

from zerorl.classic.agents import ActorCritic
from zerorl.classic.envs import Normalizer, make_vector_env

# Evaluation envs are seeded apart from the training envs so that no evaluation episode replays a
# start state the agent trained on.
EVAL_SEED_OFFSET = 1_000_000


@torch.no_grad()
def evaluate(
    agent: ActorCritic, env_id: str, normalizer: Normalizer, episodes: int, seed: int, mode: str = "sync"
) -> np.ndarray:
    """Run `episodes` episodes in parallel (one per env copy) and return their undiscounted returns."""
    envs = make_vector_env(env_id, episodes, mode)
    try:
        raw_obs, _ = envs.reset(seed=seed + EVAL_SEED_OFFSET)
        returns = np.zeros(episodes, np.float64)
        running = np.ones(episodes, bool)  # an env stops counting after its first episode ends
        while running.any():
            obs = torch.from_numpy(normalizer.obs(raw_obs, update=False).astype(np.float32))
            action = agent.mode(agent.policy_params(obs)).numpy()
            if not agent.discrete:
                space = envs.single_action_space
                action = np.clip(action, space.low, space.high)
            raw_obs, reward, terminated, truncated, _ = envs.step(action)
            returns += reward * running
            running &= ~(terminated | truncated)
    finally:
        envs.close()
    return returns
