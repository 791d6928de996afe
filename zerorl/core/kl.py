"""Per-token KL estimators k1, k2, k3 (Schulman, "Approximating KL Divergence", 2020).

All three estimate KL(π_θ ‖ π_ref) from tokens sampled from π_θ (in practice from π_old ≈ π_θ).
With the per-token log-ratio  log r = log π_ref(a) − log π_θ(a):

    k1 = −log r            = log π_θ − log π_ref          unbiased, high variance, can be negative
    k2 = ½ (log r)²                                       biased, low variance, ≥ 0
    k3 = (r − 1) − log r   = exp(ref − logp) − (ref − logp) − 1
                                                          unbiased, low variance, ≥ 0 (r − 1 ≥ log r)

k3 is the estimator of the GRPO paper (Shao et al. 2024, DeepSeekMath, eq. 4):
    D_KL(π_θ ‖ π_ref) = π_ref/π_θ − log(π_ref/π_θ) − 1.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(20) ≈ 4.9e8: far beyond any ratio a healthy run sees, and far below float32 overflow (exp(88)).
K3_LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Elementwise KL(π_θ ‖ π_ref) estimate from per-token log-probs of the sampled tokens.

    Args:
        logp: log π_θ(token), any shape (typically [B, T]); gradients flow through it.
        ref_logp: log π_ref(token), same shape (usually computed under no_grad).
        kind: "k1" → logp − ref_logp;
              "k2" → ½ (logp − ref_logp)²;
              "k3" → exp(ref_logp − logp) − (ref_logp − logp) − 1   (GRPO, DeepSeekMath eq. 4).

    k3 is evaluated as expm1(x) − x with x = ref_logp − logp: the same function, without the cancellation
    of exp(x) − x − 1 near x = 0. The log-ratio is clamped to [−20, 20] before exp so a single wild token
    cannot overflow to inf (and poison the loss with NaN); inside that range the value is exactly the
    formula, outside it the gradient is zero (verl's `kl_penalty("low_var_kl")` clamps the result for the
    same reason).

    Returns a tensor shaped like `logp`; mask and aggregate it with `losses.aggregate`.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"kl_estimate: logp has shape {tuple(logp.shape)} but ref_logp has shape "
            f"{tuple(ref_logp.shape)}; pass per-token log-probs of the same tokens for both."
        )
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        # The same formula, as expm1(x) − x: exp(x) − x − 1 cancels every digit below the float's precision
        # at 1 near x = 0, where a policy close to π_ref puts almost every token (float32, x = 1e-4: 0.0
        # instead of 5.0e-9), and came out below 0 for a third of small x.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; choose one of {list(KL_ESTIMATORS)}.")
