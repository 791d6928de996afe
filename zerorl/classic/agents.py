"""MLP actor-critic for classic control: a categorical or diagonal-Gaussian policy and a value head.

Same architecture as CleanRL's ppo.py / ppo_continuous_action.py and SB3's MlpPolicy: separate actor
and critic MLPs (64, 64, tanh), orthogonal init with gain √2 on hidden layers, 0.01 on the policy
output (so the initial policy is near uniform / near zero mean) and 1 on the value output, and a
state-independent log σ for continuous actions.

The distribution maths is written out on plain tensors instead of torch.distributions: building a
`Categorical`/`Normal` object (argument checks, broadcasting) costs more than the MLP itself at
rollout time, and TRPO needs the exact KL between the old and the new policy anyway.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from zerorl.classic.config import ClassicConfig
from zerorl.classic.envs import Normalizer, make_vector_env

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def layer_init(layer: nn.Linear, gain: float, bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim: int, hidden_sizes: list[int], out_dim: int, activation: str, out_gain: float) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, width), math.sqrt(2.0)), act()]
        in_dim = width
    layers.append(layer_init(nn.Linear(in_dim, out_dim), out_gain))
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """π(a|s) and V(s). `policy_params(obs)` returns the distribution's tensors:
    discrete: (logits [B, A],); continuous: (mean [B, A], log_std [B, A])."""

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden_sizes: list[int],
        activation: str = "tanh",
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        obs_dim = int(np.prod(observation_space.shape))
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        action_dim = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        self.actor = mlp(obs_dim, hidden_sizes, action_dim, activation, out_gain=0.01)
        self.critic = mlp(obs_dim, hidden_sizes, 1, activation, out_gain=1.0)
        if not self.discrete:
            # State-independent log σ (CleanRL, SB3 without gSDE): exploration shrinks as training goes.
            self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def policy_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.actor(obs)
        if self.discrete:
            return (out,)
        return out, self.log_std.expand_as(out)

    def log_prob(self, params: tuple[torch.Tensor, ...], actions: torch.Tensor) -> torch.Tensor:
        """log π(a|s) per sample, [B]."""
        if self.discrete:
            log_probs = torch.log_softmax(params[0], dim=-1)
            return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        mean, log_std = params
        # log N(a; μ, σ) = −(a − μ)² / 2σ² − log σ − ½ log 2π, summed over action dimensions.
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - LOG_SQRT_2PI).sum(-1)

    def entropy(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """H[π(·|s)] per sample, [B]."""
        if self.discrete:
            log_probs = torch.log_softmax(params[0], dim=-1)
            return -(log_probs.exp() * log_probs).sum(-1)
        # H[N(μ, σ)] = ½ + ½ log 2π + log σ per dimension.
        return (0.5 + LOG_SQRT_2PI + params[1]).sum(-1)

    def kl(self, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Exact KL(π_old(·|s) ‖ π_new(·|s)) per sample, [B] (the TRPO constraint, Schulman et al. 2015)."""
        if self.discrete:
            old_logp = torch.log_softmax(old[0], dim=-1)
            new_logp = torch.log_softmax(new[0], dim=-1)
            # Σ_a p_old(a) (log p_old(a) − log p_new(a))
            return (old_logp.exp() * (old_logp - new_logp)).sum(-1)
        (mu0, log_std0), (mu1, log_std1) = old, new
        # log(σ1/σ0) + (σ0² + (μ0 − μ1)²) / 2σ1² − ½, summed over dimensions.
        var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
        return (log_std1 - log_std0 + (var0 + (mu0 - mu1).pow(2)) / (2 * var1) - 0.5).sum(-1)

    def sample(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.discrete:
            # Gumbel-max: argmax(logits + Gumbel noise) is an exact sample of softmax(logits),
            # without the per-call overhead of torch.multinomial / Categorical.
            uniform = torch.rand_like(params[0]).clamp_(1e-20, 1.0)
            return torch.argmax(params[0] - torch.log(-torch.log(uniform)), dim=-1)
        mean, log_std = params
        return mean + torch.exp(log_std) * torch.randn_like(mean)

    def mode(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The deterministic action used for evaluation: argmax for discrete, the mean for Gaussian."""
        return params[0].argmax(-1) if self.discrete else params[0]

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rollout step: sampled action, its log-prob under the current policy, and V(s)."""
        params = self.policy_params(obs)
        action = self.sample(params)
        return action, self.log_prob(params, action), self.value(obs)


def seed_and_build(config: ClassicConfig) -> tuple[gym.vector.VectorEnv, Normalizer, ActorCritic]:
    """What PPO and TRPO do first, in this order (the order fixes every random stream that follows): seed
    torch and numpy, then make the vector env, its observation/reward normalizer and the agent."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    envs = make_vector_env(config.env_id, config.num_envs, config.vectorization_mode)
    normalizer = Normalizer(envs.single_observation_space.shape, config.num_envs, config.gamma,
                            config.normalize_obs, config.normalize_reward, config.obs_clip, config.reward_clip)
    agent = ActorCritic(envs.single_observation_space, envs.single_action_space, config.hidden_sizes,
                        config.activation, config.log_std_init)
    return envs, normalizer, agent
