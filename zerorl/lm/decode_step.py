"""The decoder layers of one decode step as a TorchScript function.

A decode step is ~25 ops per layer on a handful of rows: for a small model almost all of it is Python and
dispatcher work, and eager Python holds the GIL for that work, so rollout shards on two CPU workers wait for
each other (measured: 1.0M model, 32 rows a shard, 90 ms alone and 170–210 ms for two at once). TorchScript
runs the same ATen ops from its own interpreter, which does less work per op and does not hold the GIL: two
such shards take as long as one (48 against 47 ms). The 31.5M model's rollout (two shards) is ~15% faster;
the 1.0M model's ~10% on one shard, and with the per-prompt sampling streams of session 6 it is sharded too.

``decode_layers`` is the eager loop of ``zerorl.lm.native.DecodeState.step`` op for op (no fusion: TorchScript
does not fuse on a CPU unless asked), so it computes the same numbers, in float32 and under bf16 autocast
(which acts where each op is dispatched, from Python or from TorchScript alike); tests/test_native.py compares
the tokens and log-probs of whole rollouts, bit for bit. ``scripted_decode_layers`` compiles it once; where
TorchScript is missing or fails (it is in maintenance mode upstream), the eager loop is used.

Both loops run their matrix products through ``linear``: on weights packed once per rollout (``pack_weight``)
where this build and CPU can, else plain F.linear.
"""

from __future__ import annotations

import threading
import warnings
from typing import List, Optional  # noqa: UP035  (TorchScript reads these annotations)

import torch
import torch.nn.functional as F


def _registered(*ops: str) -> bool:
    try:
        for op in ops:
            namespace, name = op.split("::")
            getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


# A GEMM on a weight packed once skips the re-packing of the weight that every plain call does. At decode
# sizes (a few dozen rows, every weight streaming from memory) that is much of the cost. Measured here on one
# thread at 32 rows, cycling through 16 weights [512 → 4096]:
#   float32, MKL (cblas_sgemm_pack, what torch.compile's CPU freezing uses): 1,936 → 1,393 µs per weight;
#   bfloat16, oneDNN (its weight reorder; the same kernel, the same numbers): 794 → 489 µs.
# Packing the 31.5M model costs ~12 ms per rollout.
MKL_PACKED_LINEAR = torch.backends.mkl.is_available() and _registered("mkl::_mkl_linear",
                                                                       "mkl::_mkl_reorder_linear_weight")
ONEDNN_PACKED_BF16_LINEAR = torch.backends.mkldnn.is_available() \
    and _registered("mkldnn::_linear_pointwise", "mkldnn::_reorder_linear_weight", "mkldnn::_is_mkldnn_bf16_supported") \
    and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
# The nominal row count a weight is packed for. The packed weight serves any row count (checked: pack_weight), but
# its speed depends on the hint: packed for 32 rows, MKL's GEMM slowed down past 32 rows (33 rows: 1,958 against
# 1,425 µs at 32). On one thread 256 and 512 run alike from 32 to 512 rows; on two threads a weight packed for 512
# rows is not split well where it is narrow: [64 rows, 2048 → 512] 739 against 395 µs packed for 256, [64, 512 →
# 512] 175 against 101 µs, and still 2,723 against 1,400 µs at 256 rows; [512 → 4096] runs alike (session 9).
# MKL also packs for the calling thread's thread count: a weight packed on a one-thread worker ran a two-thread GEMM
# at half speed (2,164 against 1,141 µs), while one packed on two threads runs a one-thread GEMM at full speed
# (1,310 against 1,324 µs). So the caller packs, with all its threads, also for the workers' shards.
_PACK_HINT = 256
_PACKING_CHECKED: dict = {}  # (dtype, out, in) → whether a packed weight of that kind reproduces F.linear here


def _mkl_fp32(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])


def _onednn_bf16(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    # Not an autocast op: the input is cast here, as autocast casts a linear layer's input.
    return torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), packed, bias, "none", [], "")


def _not_packed(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return F.linear(x, weight, bias)  # never reached: pack_weight packs nothing that this build cannot run


# Bound once: TorchScript compiles what these names are bound to, and a torch build without MKL (or oneDNN) has
# no mkl::_mkl_linear (mkldnn::_linear_pointwise) to compile against.
_packed_fp32 = _mkl_fp32 if MKL_PACKED_LINEAR else _not_packed
_packed_bf16 = _onednn_bf16 if ONEDNN_PACKED_BF16_LINEAR else _not_packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
           packed: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """x Wᵀ + b, through ``packed`` (``pack_weight(weight)``) when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    if weight.dtype == torch.float32:
        return _packed_fp32(x, packed, weight, bias)
    return _packed_bf16(x, packed, weight, bias)


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:  # noqa: UP045
    """A packed copy of a CPU weight [out, in] for ``linear`` — float32 by MKL, bfloat16 by oneDNN — or None where
    this build or CPU cannot, or where (checked once per dtype, shape and process, at 1, 5 and 33 rows) the
    packed GEMM does not give F.linear's numbers."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    weight = weight.detach().contiguous()
    if weight.dtype == torch.float32 and MKL_PACKED_LINEAR:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, _PACK_HINT)
    elif weight.dtype == torch.bfloat16 and ONEDNN_PACKED_BF16_LINEAR:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)
    else:
        return None
    kind = (weight.dtype, *weight.shape)
    if kind not in _PACKING_CHECKED:
        probes = [torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)).to(weight.dtype)
                  for rows in (1, 5, 33)]
        tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits of mantissa
        scale = float(weight.abs().max()) * weight.shape[1] ** 0.5
        _PACKING_CHECKED[kind] = all(
            torch.allclose(linear(x, weight, None, packed).float(), F.linear(x, weight).float(), rtol=tolerance,
                           atol=tolerance * scale) for x in probes)
    return packed if _PACKING_CHECKED[kind] else None


def attend_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """softmax(q kᵀ + mask) v for grouped queries q [b, Hkv, group, d] (already scaled) against their key/value
    head's cache columns [b, Hkv, S, d], in the cache's dtype; mask [b, 1, 1, S] additive. Returns [b, Hkv, group, d].

    The products go through bmm's ``out=`` form, which autocast does not intercept. A CPU keeps a float32 cache
    (``native.DecodeState``): under bf16 autocast a plain product would cast the cache to bf16 at every layer and
    step, and bf16's batched product on a CPU copies the transposed keys (31.5M model, a rollout's attention
    103 → 50 ms). Float32 attention is also what the training pass computes there (``NativeDecoder._attend``)."""
    rows, kv_heads, group, head_dim = q.shape
    width, dtype = keys.shape[2], keys.dtype
    batched_keys = keys.reshape(rows * kv_heads, width, head_dim)  # a view: each cache row is contiguous
    scores = torch.empty(rows * kv_heads, group, width, dtype=dtype, device=q.device)
    torch.bmm(q.to(dtype).reshape(rows * kv_heads, group, head_dim), batched_keys.transpose(1, 2), out=scores)
    weights = scores.view(rows, kv_heads, group, width)
    if mask is not None:
        weights = weights + mask
    weights = weights.softmax(-1).to(dtype)
    out = torch.empty(rows * kv_heads, group, head_dim, dtype=dtype, device=q.device)
    torch.bmm(weights.view(rows * kv_heads, group, width), values.reshape(rows * kv_heads, width, head_dim), out=out)
    return out.view(rows, kv_heads, group, head_dim)


def decode_layers(x: torch.Tensor, qkv_w: List[torch.Tensor], qkv_b: List[torch.Tensor],  # noqa: UP006
                  o_w: List[torch.Tensor], o_b: List[torch.Tensor], gate_up_w: List[torch.Tensor],  # noqa: UP006
                  down_w: List[torch.Tensor], down_b: List[torch.Tensor], packed: List[torch.Tensor],  # noqa: UP006
                  norm1: List[torch.Tensor], norm2: List[torch.Tensor], keys: List[torch.Tensor],  # noqa: UP006
                  values: List[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,  # noqa: UP006
                  mask: Optional[torch.Tensor], column: int, num_heads: int, num_kv_heads: int,  # noqa: UP045
                  head_dim: int, scale: float, eps: float) -> torch.Tensor:
    """x [b, D] through every decoder layer for the token at KV-cache column ``column``; writes that column
    of ``keys`` / ``values`` [b, Hkv, S, d]. Weights per layer: fused q|k|v (and its bias; an empty list = no
    bias), o (bias), gate|up, down (bias) and the two RMSNorm weights; ``packed``: the four weights of each
    layer packed (``pack_weight``; 4 per layer, in that order), or empty. Llama / Qwen2 without q/k norms."""
    rows = x.shape[0]
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    half = head_dim // 2
    has_packed = len(packed) > 0
    for i in range(len(qkv_w)):
        h = F.rms_norm(x, [x.shape[-1]], norm1[i], eps)
        fused = linear(h, qkv_w[i], qkv_b[i] if len(qkv_b) > 0 else None, packed[4 * i] if has_packed else None)
        qk = fused[:, : q_width + kv_width].view(rows, num_heads + num_kv_heads, head_dim)
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        q, k, v = qk[:, :num_heads], qk[:, num_heads:], fused[:, q_width + kv_width :]
        keys[i][:, :, column] = k
        values[i][:, :, column] = v.view(rows, num_kv_heads, head_dim)
        q = q.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim) * scale
        out = attend_cache(q, keys[i][:, :, : column + 1], values[i][:, :, : column + 1], mask)
        x = x + linear(out.reshape(rows, q_width), o_w[i], o_b[i] if len(o_b) > 0 else None,
                       packed[4 * i + 1] if has_packed else None)
        h = F.rms_norm(x, [x.shape[-1]], norm2[i], eps)
        gate, up = linear(h, gate_up_w[i], None, packed[4 * i + 2] if has_packed else None).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, down_w[i], down_b[i] if len(down_b) > 0 else None,
                       packed[4 * i + 3] if has_packed else None)
    return x


_LOCK = threading.Lock()
_SCRIPTED: list = []  # [the compiled function], or [None] when TorchScript is not usable here


def scripted_decode_layers():
    """``decode_layers`` compiled by TorchScript (once per process), or None where that is not possible."""
    with _LOCK:
        if not _SCRIPTED:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice: the fallback stays
                    _SCRIPTED.append(torch.jit.script(decode_layers))
            except Exception:  # noqa: BLE001  (no TorchScript in this torch build, or it cannot compile this)
                _SCRIPTED.append(None)
        return _SCRIPTED[0]


__all__ = ["MKL_PACKED_LINEAR", "ONEDNN_PACKED_BF16_LINEAR", "attend_cache", "decode_layers", "linear", "pack_weight",
           "scripted_decode_layers"]
