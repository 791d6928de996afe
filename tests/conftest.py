"""Fixtures shared by the PPO and TRPO test modules."""

import pytest

from zerorl.lm.models import build_tiny_model


@pytest.fixture(scope="module")
def random_tiny_model(tmp_path_factory):
    """A randomly initialized tiny Qwen2 (hidden 32, one layer): it samples characters nearly uniformly."""
    return build_tiny_model(tmp_path_factory.mktemp("base") / "model", hidden_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, seed=0)


@pytest.fixture(scope="module")
def digits_reward(tmp_path_factory):
    """A dense reward a random model can learn in a few steps and that differs between completions (so every
    step moves the weights): the fraction of a completion's characters that are digits."""
    path = tmp_path_factory.mktemp("reward") / "digits.py"
    path.write_text("def digits(prompts, completions, **columns):\n"
                    "    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]\n")
    return f"{path}:digits"
