"""Advantage estimators: group-relative (GRPO, Dr. GRPO, RLOO), batch-normalized (REINFORCE++) and GAE.

Outcome-reward estimators take one scalar reward per completion, flat [N], where each run of
`group_size` contiguous entries holds the G completions of one prompt, and return one advantage per
completion [N]; the trainer broadcasts it over the completion's tokens. GAE works on per-token
rewards and values [B, T] (LM PPO) or [T, num_envs] (classic control).

All functions are pure and gradient-free: inputs are detached, since advantages are targets, not
something to differentiate through.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GRPO_SCALES = ("group", "batch", "none")


def _as_float_rewards(rewards: torch.Tensor, fn: str) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(
            f"{fn}: rewards must be flat [N] (one scalar per completion), got shape {tuple(rewards.shape)}; "
            "flatten the [num_prompts, group_size] rewards with .reshape(-1)."
        )
    rewards = rewards.detach()
    return rewards if rewards.is_floating_point() else rewards.float()


def _grouped(rewards: torch.Tensor, group_size: int, fn: str) -> torch.Tensor:
    """[N] → [N / group_size, group_size], validating the grouping."""
    if group_size < 1:
        raise ValueError(f"{fn}: group_size must be ≥ 1, got {group_size}.")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{fn}: {rewards.numel()} rewards cannot be split into groups of group_size={group_size} "
            f"({rewards.numel()} % {group_size} = {rewards.numel() % group_size}); pass all G completions "
            "of every prompt, contiguously."
        )
    return rewards.view(-1, group_size)


def grpo(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision):

        Â_i = (r_i − mean(r_group)) / (std(r_group) + eps)       scale="group"   (GRPO)
        Â_i = (r_i − mean(r_group)) / (std(r_batch) + eps)       scale="batch"   (TRL scale_rewards="batch")
        Â_i =  r_i − mean(r_group)                               scale="none"    (Dr. GRPO, Liu et al. 2025 §3.2)

    std is unbiased (Bessel-corrected), as torch.std. A group whose rewards are all equal gets 0
    advantages (0 / (0 + eps)), so it contributes no gradient. Dr. GRPO drops the std division because
    it up-weights prompts that are too easy or too hard (low std), a question-level difficulty bias.

    Args: rewards [N]; group_size G (N % G == 0); scale as above; eps avoids division by zero.
    Returns [N].
    """
    rewards = _as_float_rewards(rewards, "advantages.grpo")
    if scale not in GRPO_SCALES:
        raise ValueError(f"advantages.grpo: unknown scale {scale!r}; choose one of {list(GRPO_SCALES)}.")
    grouped = _grouped(rewards, group_size, "advantages.grpo")
    if scale != "none" and group_size < 2:
        raise ValueError(
            f"advantages.grpo: scale={scale!r} divides by an unbiased std, which needs group_size ≥ 2 "
            f"(got {group_size}); sample at least 2 completions per prompt or use scale='none'."
        )
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6):

        Â_i = r_i − 1/(G−1) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean(r_group))

    Each completion's baseline is the mean of the other G−1 completions of the same prompt, which
    keeps the policy-gradient estimate unbiased (the baseline does not depend on o_i).
    Returns [N].
    """
    rewards = _as_float_rewards(rewards, "advantages.rloo")
    grouped = _grouped(rewards, group_size, "advantages.rloo")
    if group_size < 2:
        raise ValueError(
            f"advantages.rloo: the leave-one-out baseline needs group_size ≥ 2, got {group_size}."
        )
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def _reverse_discounted_sum(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k ≥ t, k valid} γ^{(#valid steps from t to k)} r_k over valid tokens; padded → 0."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        valid = mask[:, t]
        running = torch.where(valid, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid, running, torch.zeros_like(running))
    return returns


def _last_valid_one_hot(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T], True only at each row's last valid token (all False for empty rows)."""
    # cumsum peaks first at the last valid token; argmax returns the first index of the peak.
    last = mask.long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(mask).scatter(-1, last, True)
    return one_hot & mask


def reinforce_pp(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262, §2): a critic-free estimator normalized over the batch.

    Outcome form (mask is None), one advantage per completion, rewards [N]:
        Â_i = (r_i − mean(r_batch)) / (std(r_batch) + eps)

    Token form (mask [B, T] given), rewards [B] (one scalar per completion), optional per-token KL [B, T]:
        r_{i,t} = −kl_coef · kl_{i,t} + 1[t is the last valid token] · r_i       (KL folded into reward)
        G_{i,t} = Σ_{k ≥ t} γ^{k−t} r_{i,k}                                        (return-to-go)
        Â_{i,t} = (G_{i,t} − mean(G)) / (std(G) + eps)    mean/std over all valid tokens of the batch
    and padded positions get 0. Returns [N] or [B, T].
    """
    if mask is None:
        rewards = _as_float_rewards(rewards, "advantages.reinforce_pp")
        if rewards.numel() < 2:
            raise ValueError(
                f"advantages.reinforce_pp: batch normalization needs ≥ 2 rewards, got {rewards.numel()}."
            )
        return (rewards - rewards.mean()) / (rewards.std() + eps)

    mask = mask.bool()
    rewards = _as_float_rewards(rewards, "advantages.reinforce_pp")
    if mask.dim() != 2 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages.reinforce_pp: token form needs rewards [B] and mask [B, T]; got rewards "
            f"{tuple(rewards.shape)} and mask {tuple(mask.shape)}."
        )
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if kl is not None:
        if kl.shape != mask.shape:
            raise ValueError(
                f"advantages.reinforce_pp: kl has shape {tuple(kl.shape)}, expected the mask's {tuple(mask.shape)}."
            )
        token_rewards = torch.where(mask, -kl_coef * kl.detach().to(rewards.dtype), token_rewards)
    token_rewards = token_rewards + _last_valid_one_hot(mask) * rewards[:, None]
    returns = _reverse_discounted_sum(token_rewards, mask, gamma)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"advantages.reinforce_pp: whitening needs ≥ 2 valid tokens, got {int(count)}.")
    mean = returns.sum() / count  # padded entries of `returns` are 0
    var = torch.where(mask, (returns - mean).square(), torch.zeros_like(returns)).sum() / (count - 1)
    return torch.where(mask, (returns - mean) / (var.sqrt() + eps), torch.zeros_like(returns))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over token sequences (Schulman et al. 2016, eq. 16):

        δ_t = r_t + γ V(s_{t+1}) − V(s_t)
        Â_t = δ_t + γλ Â_{t+1}            (Â after the last valid token = 0)
        R_t = Â_t + V(s_t)                (value-function targets)

    rewards, values, mask: [B, T]. Typically rewards are 0 except the scalar outcome reward on the last
    valid token (plus a per-token −β·KL in RLHF-style PPO). The value after the last valid token is 0
    (the episode ends there). Positions where mask is False are skipped, not treated as steps: the
    recursion carries Â and V(s_{t+1}) across them, so interior gaps (e.g. masked tool output) and
    padding both work, and garbage in padded rewards/values never leaks in. Padded positions return 0.

    Returns (advantages [B, T], returns [B, T]), detached.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"advantages.gae: rewards, values and mask must all be [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}."
        )
    rewards, values, mask = rewards.detach(), values.detach(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid, delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        advantages[:, t] = advantage
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def gae_classic(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    last_done: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
    truncation_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE for vectorized environment rollouts, CleanRL's convention (ppo.py, Huang et al. 2022).

    Shapes: rewards, values, dones [T, num_envs]; last_value, last_done [num_envs].
    Convention: dones[t] = 1 means observation t is the FIRST of a new episode (the previous episode
    ended with action t−1), exactly what CleanRL stores as `dones[step] = next_done`; last_done and
    last_value describe the observation after the final step. Then, with nonterminal_{t+1} = 1 − done_{t+1}:

        δ_t = r_t + γ V(s_{t+1}) · nonterminal_{t+1} − V(s_t)
        Â_t = δ_t + γλ · nonterminal_{t+1} · Â_{t+1}
        R_t = Â_t + V(s_t)

    Truncation (time limits): an episode cut by a time limit should still bootstrap from the value of
    its real final observation. Mark truncated ends as done (CleanRL: next_done = terminated | truncated)
    and pass truncation_values [T, num_envs] = V(final observation of step t) where step t ended by
    truncation, 0 elsewhere; then δ_t gains + γ · truncation_values[t] (Stable-Baselines3's approach;
    Pardo et al. 2018, "Time Limits in RL").

    Returns (advantages [T, num_envs], returns [T, num_envs]), detached.
    """
    if not (rewards.shape == values.shape == dones.shape) or rewards.dim() != 2:
        raise ValueError(
            f"advantages.gae_classic: rewards, values and dones must all be [T, num_envs]; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(dones.shape)}."
        )
    if last_value.shape != values.shape[1:] or last_done.shape != values.shape[1:]:
        raise ValueError(
            f"advantages.gae_classic: last_value and last_done must be [num_envs]={tuple(values.shape[1:])}; "
            f"got {tuple(last_value.shape)} and {tuple(last_done.shape)}."
        )
    rewards, values = rewards.detach(), values.detach()
    if truncation_values is not None:
        if truncation_values.shape != rewards.shape:
            raise ValueError(
                f"advantages.gae_classic: truncation_values has shape {tuple(truncation_values.shape)}, "
                f"expected {tuple(rewards.shape)}."
            )
        rewards = rewards + gamma * truncation_values.detach()
    dones = dones.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(last_value, dtype=values.dtype)
    for t in reversed(range(values.shape[0])):
        if t == values.shape[0] - 1:
            next_nonterminal = 1.0 - last_done.to(values.dtype)
            next_value = last_value.detach().to(values.dtype)
        else:
            next_nonterminal = 1.0 - dones[t + 1]
            next_value = values[t + 1]
        delta = rewards[t] + gamma * next_value * next_nonterminal - values[t]
        next_advantage = delta + gamma * lam * next_nonterminal * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


# --- registry of outcome-reward estimators: uniform signature fn(rewards [N], group_size, eps) -> [N] ---

OutcomeAdvantageFn = Callable[..., torch.Tensor]


def _grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    return grpo(rewards, group_size, scale="group", eps=eps)


def _dr_grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    return grpo(rewards, group_size, scale="none", eps=eps)


def _rloo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    return rloo(rewards, group_size)


def _reinforce_pp(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    # group_size is unused: REINFORCE++ normalizes over the whole batch, not per prompt.
    return reinforce_pp(rewards, eps=eps)


ADVANTAGE_ESTIMATORS: dict[str, OutcomeAdvantageFn] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}


def get_estimator(name: str) -> OutcomeAdvantageFn:
    """Outcome-reward estimator by name: fn(rewards [N], group_size, eps=1e-6) -> advantages [N]."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}."
        ) from None
