"""zerorl: DeepSeek-R1-Zero-style RL (GRPO, PPO, TRPO) for language models and classic control."""

__version__ = "0.1.0"
