"""Policy and value losses (to MINIMIZE) and the one aggregation function they share.

Every per-token quantity comes with its mask [B, T] (True = completion token that counts). Padded
positions are replaced by zeros with torch.where before any arithmetic, so garbage there (inf, NaN,
huge log-probs) changes neither the loss, nor the metrics, nor the gradient (which is exactly 0 there).

Metrics are returned as detached 0-dim tensors, not python floats: calling .item() here would force a
device sync on every micro-batch; the trainer converts them once per logging step.
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
POLICY_LOSS_KINDS = ("clip", "reinforce")

# Same bound as kl.py's k3: exp(±20) is far outside any useful ratio yet can never overflow.
LOG_RATIO_CLAMP = 20.0


def _check_mask(values: torch.Tensor, mask: torch.Tensor, fn: str) -> torch.Tensor:
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(
            f"{fn}: expected per-token values and mask of the same shape [B, T]; got values "
            f"{tuple(values.shape)} and mask {tuple(mask.shape)}."
        )
    return mask.bool()


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero padded positions by selection (not multiplication: inf · 0 = NaN)."""
    return torch.where(mask, values, torch.zeros_like(values))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(values, mask).sum() / mask.sum().clamp(min=1)


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str = "seq-mean-token-mean", norm: float | None = None
) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar (verl core_algos.agg_loss's modes).

        "seq-mean-token-mean":      1/G Σ_i 1/|o_i| Σ_t v_{i,t}          the article's GRPO objective
                                    (DeepSeekMath eq. 3). Rows with no valid token are left out of
                                    the mean over sequences (their 1/|o_i| is undefined).
        "token-mean":               Σ_{i,t} v_{i,t} / Σ_i |o_i|          DAPO (Yu et al. 2025, eq. 8):
                                    every token weighs the same, long answers are not down-weighted.
        "seq-mean-token-sum-norm":  1/G Σ_i (Σ_t v_{i,t}) / norm         Dr. GRPO (Liu et al. 2025, §3.2):
                                    a constant norm (default T = mask.shape[-1], pass the max
                                    completion length) removes the length bias of 1/|o_i|.

    All modes return 0 (not NaN) when no token is valid.
    """
    mask = _check_mask(values, mask, "losses.aggregate")
    values = _masked(values, mask)
    if mode == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1)
        seq_means = values.sum(dim=-1) / tokens_per_seq.clamp(min=1)
        return seq_means.sum() / (tokens_per_seq > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        norm = float(mask.shape[-1]) if norm is None else float(norm)
        if norm <= 0:
            raise ValueError(f"losses.aggregate: norm must be > 0 (e.g. max_completion_length), got {norm}.")
        return values.sum(dim=-1).mean() / norm
    raise ValueError(f"losses.aggregate: unknown mode {mode!r}; choose one of {list(AGGREGATION_MODES)}.")


def _broadcast_advantages(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    if advantages.shape == logp.shape:
        return advantages
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        return advantages[:, None].expand_as(logp)
    raise ValueError(
        f"losses.policy_loss: advantages must be [B]={logp.shape[0]} (one per sequence) or [B, T]="
        f"{tuple(logp.shape)} (per token); got {tuple(advantages.shape)}."
    )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg_mode: str = "seq-mean-token-mean",
    ratio_level: str = "token",
    norm: float | None = None,
    dual_clip: float | None = None,
    kind: str = "clip",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss (PPO, Schulman et al. 2017, eq. 7; GRPO, DeepSeekMath eq. 3), negated:

        r_t = π_θ(a_t|s_t) / π_old(a_t|s_t) = exp(logp − old_logp)
        ℓ_t = −min(r_t Â_t, clip(r_t, 1 − ε_low, 1 + ε_high) Â_t)
        loss = aggregate(ℓ, mask, loss_agg_mode)

    Options:
      clip_eps_high: DAPO's "clip-higher" (Yu et al. 2025, eq. 10); defaults to clip_eps_low.
      dual_clip = c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): for Â < 0
          ℓ_t = min(ℓ_t, −c Â_t), so a huge ratio on a bad action cannot produce an unbounded loss.
      ratio_level="sequence": GSPO (Zheng et al. 2025, eq. 7 and the GSPO-token form, eq. 13):
          s_i = exp(1/|o_i| Σ_t (logp − old_logp)), used per token as
          s_{i,t} = sg[s_i] · π_θ(o_{i,t}) / sg[π_θ(o_{i,t})]  — numerically s_i for every token, and with
          "seq-mean-token-mean" its gradient is exactly GSPO's sequence gradient s_i Â_i 1/|o_i| Σ_t ∇log π;
          the same holds for every aggregation mode when Â is one value per sequence [B]. Token-level
          advantages [B, T] give GSPO-token's gradient, which by design is not the derivative of the
          reported loss value. GSPO uses tiny ε (≈ 3e-4 / 4e-4).
      kind="reinforce": vanilla policy gradient ℓ_t = −Â_t log π_θ(a_t|s_t) (Williams 1992), no ratio or
          clip; its value is not comparable to the clip loss, only its gradient −Â ∇log π is.

    Args:
        logp: log π_θ of the sampled tokens [B, T] (with graph); old_logp: log π_old [B, T] (no graph).
        advantages: [B] (broadcast over tokens) or [B, T]; mask: [B, T].
    The log-ratio is clamped to [−20, 20] before exp (no overflow, zero gradient beyond).

    Returns (loss, metrics) with detached 0-dim tensors:
        clip_ratio/low_fraction   valid tokens with r < 1 − ε_low and Â < 0 (the low clip is active)
        clip_ratio/high_fraction  valid tokens with r > 1 + ε_high and Â > 0 (the high clip is active)
        clip_ratio                their sum
        clip_ratio/dual_fraction  (only with dual_clip) valid tokens with Â < 0 and r > c
        ratio_mean, ratio_min, ratio_max   over valid tokens (1 when there is none)
        approx_kl                 token mean of k3 = (r − 1) − log r, estimating KL(π_old ‖ π_θ)
    """
    mask = _check_mask(logp, mask, "losses.policy_loss")
    if old_logp.shape != logp.shape:
        raise ValueError(
            f"losses.policy_loss: old_logp has shape {tuple(old_logp.shape)}, expected {tuple(logp.shape)}."
        )
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(
            f"losses.policy_loss: unknown ratio_level {ratio_level!r}; choose one of {list(RATIO_LEVELS)}."
        )
    if kind not in POLICY_LOSS_KINDS:
        raise ValueError(
            f"losses.policy_loss: unknown kind {kind!r}; choose one of {list(POLICY_LOSS_KINDS)}."
        )
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if clip_eps_low < 0 or clip_eps_high < 0:
        raise ValueError(
            f"losses.policy_loss: clip_eps_low={clip_eps_low} and clip_eps_high={clip_eps_high} must be ≥ 0."
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"losses.policy_loss: dual_clip must be > 1 (typically 3), got {dual_clip}.")

    advantages = _masked(_broadcast_advantages(advantages.detach(), logp), mask)
    # Select before exp: garbage log-probs at padded positions never enter the graph.
    log_ratio = _masked(logp - old_logp.detach(), mask)
    token_log_ratio = log_ratio.detach()
    if ratio_level == "sequence":
        tokens_per_seq = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / tokens_per_seq
        # sg[log s_i] + log π − sg[log π]: value log s_i, gradient ∇log π per token.
        log_ratio = _masked(seq_log_ratio.detach() + logp - logp.detach(), mask)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    if kind == "reinforce":
        per_token = -advantages * _masked(logp, mask)
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
        per_token = torch.maximum(unclipped, clipped)  # max of negatives = −min of the objectives
        if dual_clip is not None:
            per_token = torch.where(
                advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token
            )
    loss = aggregate(per_token, mask, loss_agg_mode, norm=norm)

    with torch.no_grad():
        ratio = ratio.detach()
        if kind == "clip":
            low = mask & (ratio < 1.0 - clip_eps_low) & (advantages < 0)
            high = mask & (ratio > 1.0 + clip_eps_high) & (advantages > 0)
        else:
            low = high = torch.zeros_like(mask)
        any_valid = mask.any()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        metrics = {
            "clip_ratio/low_fraction": _masked_mean(low.to(ratio.dtype), mask),
            "clip_ratio/high_fraction": _masked_mean(high.to(ratio.dtype), mask),
            "ratio_mean": torch.where(any_valid, _masked_mean(ratio, mask), one),
            # ratio > 0, so 0 / +inf at padded positions never win the max / min.
            "ratio_max": torch.where(any_valid, _masked(ratio, mask).max(), one),
            "ratio_min": torch.where(
                any_valid, torch.where(mask, ratio, torch.full_like(ratio, float("inf"))).min(), one
            ),
            # per-token ratio even under GSPO: this is the quantity TRPO's constraint bounds.
            "approx_kl": _masked_mean(
                torch.expm1(token_log_ratio.clamp(max=LOG_RATIO_CLAMP)) - token_log_ratio, mask
            ),
        }
        metrics["clip_ratio"] = metrics["clip_ratio/low_fraction"] + metrics["clip_ratio/high_fraction"]
        if dual_clip is not None and kind == "clip":
            dual = mask & (advantages < 0) & (ratio > dual_clip)
            metrics["clip_ratio/dual_fraction"] = _masked_mean(dual.to(ratio.dtype), mask)
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value-function loss, optionally clipped around the rollout-time values (PPO2 baselines; Andrychowicz
    et al. 2021, "What Matters in On-Policy RL", §3.1; Huang et al. 2022, "37 PPO details", #9):

        unclipped:  ½ (V − R)²
        clipped:    ½ max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)

    values: V_θ [B, T] (with graph); old_values: V at rollout time [B, T]; returns: targets R [B, T]
    (from `advantages.gae`). Metrics (detached 0-dim tensors):
        vf_clipfrac       fraction of valid tokens where the clipped term is the larger (clip active)
        value_mean        mean of V over valid tokens
        vf_explained_var  1 − Var(R − V) / Var(R) over valid tokens (1 = perfect, ≤ 0 = no better than a constant)
    """
    mask = _check_mask(values, mask, "losses.value_loss")
    for name, other in (("old_values", old_values), ("returns", returns)):
        if other.shape != values.shape:
            raise ValueError(
                f"losses.value_loss: {name} has shape {tuple(other.shape)}, expected {tuple(values.shape)}."
            )
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"losses.value_loss: clip_range must be > 0 or None, got {clip_range}.")
    values = _masked(values, mask)
    old_values = _masked(old_values.detach(), mask)
    returns = _masked(returns.detach(), mask)

    unclipped = (values - returns).square()
    if clip_range is None:
        per_token = 0.5 * unclipped
        clip_active = torch.zeros_like(mask)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped.detach() > unclipped.detach()
    loss = aggregate(per_token, mask, loss_agg_mode, norm=norm)

    with torch.no_grad():
        v = values.detach()
        returns_mean = _masked_mean(returns, mask)
        returns_var = _masked_mean((returns - returns_mean).square(), mask)
        error = returns - v
        error_var = _masked_mean((error - _masked_mean(error, mask)).square(), mask)
        metrics = {
            "vf_clipfrac": _masked_mean(clip_active.to(v.dtype), mask),
            "value_mean": _masked_mean(v, mask),
            "vf_explained_var": 1.0 - error_var / returns_var.clamp(min=1e-8),
        }
    return loss, metrics
