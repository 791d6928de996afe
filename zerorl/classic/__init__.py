"""PPO and TRPO on Gymnasium classic control, built on the same zerorl.core math as the LM trainers.

    from zerorl.classic import load_config, train_ppo, evaluate
    config = load_config("ppo", "CartPole-v1", total_steps=50_000)
    agent, normalizer = train_ppo(config)
"""

from zerorl.classic.agents import ActorCritic
from zerorl.classic.config import ClassicConfig, ConfigError, PPOConfig, TRPOConfig, load_config
from zerorl.classic.evaluate import evaluate
from zerorl.classic.ppo import train_ppo
from zerorl.classic.trpo import train_trpo

__all__ = [
    "ActorCritic",
    "ClassicConfig",
    "ConfigError",
    "PPOConfig",
    "TRPOConfig",
    "evaluate",
    "load_config",
    "train_ppo",
    "train_trpo",
]
