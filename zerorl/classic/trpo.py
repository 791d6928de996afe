"""TRPO for Gymnasium classic control (Schulman et al. 2015), the article's constrained form:

    max_θ  E[ π_θ(a|s) / π_old(a|s) · Â ]   s.t.   E_s[ KL(π_old(·|s) ‖ π_θ(·|s)) ] ≤ δ

    for each iteration:
        collect num_steps × num_envs transitions with π_old            (rollout.RolloutCollector)
        GAE advantages and returns, time-limit bootstrap               (core.advantages.gae_classic)
        normalize advantages over the whole batch
        policy: one natural-gradient step — conjugate gradient on Fisher-vector products,
                then a backtracking line search that keeps the exact mean KL ≤ δ and the
                surrogate improving                                    (core.trust_region.trpo_step)
        value:  several epochs of minibatch Adam steps on ½ (V − R)²   (core.losses.value_loss)

The surrogate is core.losses.policy_loss with the clip switched off (ε = ∞ leaves r·Â untouched),
negated because trpo_step maximizes. The constraint uses the exact KL of the policy's distribution
(categorical or diagonal Gaussian), whose Hessian at θ_old is the Fisher matrix.
"""

from __future__ import annotations

import math
import time

import torch

from zerorl.classic.agents import ActorCritic, seed_and_build
from zerorl.classic.config import TRPOConfig
from zerorl.classic.envs import Normalizer
from zerorl.classic.rollout import RolloutCollector
from zerorl.classic.tracking import RunLogger
from zerorl.core.losses import policy_loss, value_loss
from zerorl.core.trust_region import TRPOStepInfo, trpo_step

# Without the clip, PPO's objective is TRPO's surrogate r·Â.
NO_CLIP = math.inf


def policy_parameters(agent: ActorCritic) -> list[torch.nn.Parameter]:
    """The parameters the trust region constrains: the actor MLP and, for Gaussians, log σ."""
    params = list(agent.actor.parameters())
    if not agent.discrete:
        params.append(agent.log_std)
    return params


def trust_region_policy_update(
    agent: ActorCritic,
    obs: torch.Tensor,
    actions: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    config: TRPOConfig,
) -> TRPOStepInfo:
    """max_θ mean(r·Â) s.t. mean KL(π_old ‖ π_θ) ≤ δ, one step in place; π_old is the current policy.

    obs [B, obs_dim], actions [B] or [B, A], old_logprobs and advantages [B, 1].
    """
    valid = torch.ones(obs.shape[0], 1, dtype=torch.bool)
    with torch.no_grad():
        # clone: for a Gaussian, log σ is an expanded view of the parameter itself, and trpo_step
        # updates parameters in place — without the copy "old" would silently follow "new".
        old_params = tuple(p.detach().clone() for p in agent.policy_params(obs))

    def surrogate() -> torch.Tensor:
        logp = agent.log_prob(agent.policy_params(obs), actions).unsqueeze(-1)
        loss, _ = policy_loss(logp, old_logprobs, advantages, valid, clip_eps_low=NO_CLIP, loss_agg_mode="token-mean")
        return -loss  # policy_loss is to minimize; trpo_step maximizes L = mean(r·Â)

    def mean_kl() -> torch.Tensor:
        return agent.kl(old_params, agent.policy_params(obs)).mean()

    return trpo_step(
        policy_parameters(agent),
        surrogate,
        mean_kl,
        max_kl=config.max_kl,
        cg_iters=config.cg_iters,
        damping=config.cg_damping,
        max_backtracks=config.max_backtracks,
        accept_ratio=config.accept_ratio,
    )


def train_trpo(config: TRPOConfig, logger: RunLogger | None = None) -> tuple[ActorCritic, Normalizer]:
    """Train a TRPO agent on `config.env_id`; returns the agent and the normalizer."""
    config.validate()
    envs, normalizer, agent = seed_and_build(config)
    critic_optimizer = torch.optim.Adam(agent.critic.parameters(), lr=config.critic_learning_rate, fused=True)
    collector = RolloutCollector(envs, normalizer, config.num_steps, config.seed)
    batch_size = config.batch_size
    critic_minibatch = min(config.critic_minibatch_size, batch_size)
    all_valid = torch.ones(batch_size, 1, dtype=torch.bool)
    start = time.perf_counter()

    try:
        for iteration in range(1, config.num_iterations + 1):
            remaining = 1.0 - (iteration - 1) / config.num_iterations
            critic_lr = config.critic_learning_rate * (remaining if config.anneal_lr else 1.0)
            critic_optimizer.param_groups[0]["lr"] = critic_lr

            batch = collector.collect(agent)
            advantages, returns = batch.advantages_and_returns(config.gamma, config.gae_lambda)
            if logger is not None:
                logger.episodes(batch.episode_steps, batch.episode_returns, batch.episode_lengths)

            b_obs = batch.obs.reshape(batch_size, -1)
            b_actions = batch.actions.reshape(batch_size, *batch.actions.shape[2:])
            b_logprobs = batch.logprobs.reshape(-1, 1)
            b_advantages = advantages.reshape(-1, 1)
            b_returns = returns.reshape(-1, 1)
            b_values = batch.values.reshape(-1, 1)
            if config.normalize_advantages:
                b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)

            # --- policy: one trust-region step on the whole batch -------------------------------
            step = trust_region_policy_update(agent, b_obs, b_actions, b_logprobs, b_advantages, config)

            # --- value function: several gradient steps per batch (TRPO itself has no value term)
            for _epoch in range(config.critic_epochs):
                order = torch.randperm(batch_size)
                for begin in range(0, batch_size, critic_minibatch):
                    idx = order[begin : begin + critic_minibatch]
                    v_loss, v_metrics = value_loss(
                        agent.value(b_obs[idx]).unsqueeze(-1), b_values[idx], b_returns[idx],
                        all_valid[: idx.numel()], clip_range=None, loss_agg_mode="token-mean",
                    )  # fmt: skip
                    critic_optimizer.zero_grad(set_to_none=True)
                    v_loss.backward()
                    critic_optimizer.step()

            if logger is not None:
                with torch.no_grad():
                    entropy = agent.entropy(agent.policy_params(b_obs)).mean()
                logger.update(
                    collector.global_step,
                    {
                        "kl": step.kl,
                        "accepted": float(step.accepted),
                        "step_fraction": step.step_fraction,
                        "backtracks": step.backtracks,
                        "surrogate_improvement": step.surrogate_after - step.surrogate_before,
                        "expected_improvement": step.expected_improvement,
                        "grad_norm": step.grad_norm,
                        "entropy": entropy,
                        "value_loss": v_loss.detach(),
                        "vf_explained_var": v_metrics["vf_explained_var"],
                        "learning_rate": critic_lr,
                        "sps": collector.global_step / (time.perf_counter() - start),
                    },
                )
    finally:
        envs.close()
    return agent, normalizer
