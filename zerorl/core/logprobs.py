"""Per-token log-probabilities and entropies from logits, chunked to bound memory.

A policy's logits are [B, T, V] with V ≈ 32k–150k. `log_softmax(logits).gather(...)` materializes a
second [B, T, V] tensor, in float32 when the model runs in bf16 (2× the logits' memory), only to keep
B·T numbers. Here positions are processed in chunks of `chunk_size` rows: each chunk is upcast to
float32, reduced with logsumexp and gathered, then dropped.

    log π(a | s) = z_a − logsumexp(z)                (z = logits / temperature)
    H(π(· | s))  = logsumexp(z) − Σ_v softmax(z)_v z_v = −Σ_v p_v log p_v
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 256  # rows of V logits per chunk: 256 × 151k × 4 B ≈ 155 MB of float32 scratch


def _check(logits: torch.Tensor, chunk_size: int, fn: str) -> None:
    if logits.dim() < 2:
        raise ValueError(f"{fn}: logits must be [..., V], got shape {tuple(logits.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be ≥ 1, got {chunk_size}.")


def _chunked_selected_logp(
    logits: torch.Tensor, token_ids: torch.Tensor, chunk_size: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (log π(token), logsumexp) for flat logits [N, V] and ids [N], one chunk at a time."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    selected, lse = [], []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].to(out_dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        chunk_lse = torch.logsumexp(chunk, dim=-1)
        ids = token_ids[start : start + chunk_size, None]
        selected.append(chunk.gather(-1, ids).squeeze(-1) - chunk_lse)
        lse.append(chunk_lse)
    return torch.cat(selected), torch.cat(lse)


class _LeanSelectiveLogSoftmax(torch.autograd.Function):
    """Memory-lean gradient for low-precision logits or temperature ≠ 1.

    Autograd through `chunk.float() / T` would save a float32 copy of every chunk, i.e. the full
    [B, T, V] float32 tensor we set out to avoid. This saves only the original logits and the per-row
    logsumexp, and recomputes softmax chunk by chunk in backward:
        ∂ log π(a) / ∂ logits_v = (1[v = a] − softmax(z)_v) / T
    It is differentiable once: double backward (TRPO's Fisher-vector products) needs float32 logits
    at temperature 1, which take the plain autograd path.
    """

    @staticmethod
    def forward(ctx, logits, token_ids, chunk_size, temperature):
        with torch.no_grad():
            selected, lse = _chunked_selected_logp(logits, token_ids, chunk_size, temperature)
        ctx.save_for_backward(logits, token_ids, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return selected

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, token_ids, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            probs = torch.exp(logits[rows].to(lse.dtype) / ctx.temperature - lse[rows, None])
            grad = grad_out[rows, None] * -probs
            grad.scatter_add_(-1, token_ids[rows, None], grad_out[rows, None])
            grad_logits[rows] = grad / ctx.temperature
        return grad_logits, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log π(token) = logits[token] − logsumexp(logits), per position, without a [..., V] log-softmax.

    logits [..., V] (any float dtype; each chunk is upcast to float32), token_ids [...] → float32 [...]
    (float64 for float64 logits). Matches `logits.float().log_softmax(-1).gather(-1, ids)` to float
    rounding. Autograd works; float32/float64 logits at temperature 1 use plain autograd (differentiable
    twice, as TRPO needs), other cases a custom once-differentiable backward that keeps no float32 copy.
    """
    _check(logits, chunk_size, "selective_log_softmax")
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"selective_log_softmax: token_ids has shape {tuple(token_ids.shape)}, expected "
            f"{tuple(logits.shape[:-1])} (the logits' shape without the vocabulary dimension)."
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = token_ids.reshape(-1).long()
    plain = logits.dtype in (torch.float32, torch.float64) and temperature == 1.0
    if plain or not (torch.is_grad_enabled() and logits.requires_grad):
        selected, _ = _chunked_selected_logp(flat_logits, flat_ids, chunk_size, temperature)
    else:
        selected = _LeanSelectiveLogSoftmax.apply(flat_logits, flat_ids, chunk_size, temperature)
    return selected.view(token_ids.shape)


def logprobs_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per position.

    Trainers must score tokens with the same temperature they sampled with, otherwise the ratio
    π_θ/π_old is 1 only in name at the start of each iteration. The division happens per chunk.
    """
    if temperature <= 0:
        raise ValueError(
            f"logprobs_from_logits: temperature must be > 0, got {temperature}; greedy decoding has no "
            "log-probs to train on, use a small positive temperature."
        )
    return selective_log_softmax(logits, token_ids, chunk_size=chunk_size, temperature=temperature)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v z_v = −Σ_v p_v log p_v per position, float32 [...].

    Chunked like `selective_log_softmax`. It is usually logged under torch.no_grad(); with gradients
    enabled (an entropy bonus) autograd keeps each chunk's float32 softmax for backward.
    """
    _check(logits, chunk_size, "entropy_from_logits")
    flat = logits.reshape(-1, logits.shape[-1])
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    entropies = []
    for start in range(0, flat.shape[0], chunk_size):
        # −inf logits (a masked vocabulary) would give 0 · −inf = NaN in Σ p z; the most negative finite
        # number gives the same entropy with 0 there.
        chunk = flat[start : start + chunk_size].to(out_dtype).clamp(min=torch.finfo(out_dtype).min)
        probs = torch.softmax(chunk, dim=-1)
        entropies.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(dim=-1))
    return torch.cat(entropies).view(logits.shape[:-1])
