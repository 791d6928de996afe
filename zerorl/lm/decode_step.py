"""The decoder layers of one decode step as a TorchScript function.

A decode step is ~25 ops per layer on a handful of rows: for a small model almost all of it is Python and
dispatcher work, and eager Python holds the GIL for that work, so rollout shards on two CPU workers wait for
each other (measured: 1.0M model, 32 rows a shard, 90 ms alone and 170–210 ms for two at once). TorchScript
runs the same ATen ops from its own interpreter, which does less work per op and does not hold the GIL: two
such shards take as long as one (48 against 47 ms). The 31.5M model's rollout (two shards) is ~15% faster;
the 1.0M model's ~10% on one shard, and with the per-prompt sampling streams of session 6 it is sharded too.

``decode_layers`` is the float32 eager loop of ``zerorl.lm.native.DecodeState.step`` op for op (no fusion:
TorchScript does not fuse on a CPU unless asked), so it computes the same numbers (tests/test_native.py
compares the tokens and log-probs of whole rollouts, bit for bit). ``scripted_decode_layers`` compiles it once;
where TorchScript is missing or fails (it is in maintenance mode upstream), the eager loop is used.
"""

from __future__ import annotations

import threading
import warnings
from typing import List, Optional  # noqa: UP035  (TorchScript reads these annotations)

import torch
import torch.nn.functional as F


def _mkl_packing_available() -> bool:
    try:
        torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018  (registered at all?)
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkl.is_available()


# MKL's GEMM on a weight packed once (cblas_sgemm_pack; what torch.compile's CPU freezing uses) skips the
# re-packing of the weight that every plain call does. At decode sizes (a few dozen rows) that is most of
# the cost: measured here, one thread, 32 rows: [512 → 4096] 1,336 → 906 µs, [2048 → 512] 716 → 459 µs,
# and [128 → 512] (the 1.0M model) 67 → 52 µs. Packing the 31.5M model costs ~12 ms per rollout.
MKL_PACKED_LINEAR = _mkl_packing_available()
# cblas_sgemm_pack's nominal row count. The packed weight serves any row count (checked: pack_weight), but its
# speed does depend on the hint: packed for 32 rows, the GEMM slowed down past 32 rows (33 rows: 1,958 against
# 1,425 µs at 32); packed for 512 it beats the plain GEMM at every count from 8 to 512 rows (measured here).
_PACK_HINT = 512
_PACKING_CHECKED: dict = {}  # (out, in) → whether a packed weight of that shape reproduces F.linear here


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:  # noqa: UP045
    """MKL's packed copy of a float32 CPU weight [out, in] for ``linear``, or None where MKL packing is not
    available, or (checked once per shape and process, at 1, 5 and 33 rows) does not give F.linear's numbers."""
    if not MKL_PACKED_LINEAR or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    weight = weight.detach().contiguous()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, _PACK_HINT)
    shape = tuple(weight.shape)
    if shape not in _PACKING_CHECKED:
        probes = [torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)) for rows in (1, 5, 33)]
        _PACKING_CHECKED[shape] = all(
            torch.allclose(torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0]), F.linear(x, weight),
                           rtol=1e-4, atol=1e-4 * float(weight.abs().max()) * shape[1] ** 0.5) for x in probes)
    return packed if _PACKING_CHECKED[shape] else None


def _mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                packed: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                  packed: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return F.linear(x, weight, bias)


# x Wᵀ + b, through the packed weight when there is one. Chosen once: TorchScript compiles what this name is
# bound to, and a torch build without MKL has no mkl::_mkl_linear to compile against.
linear = _mkl_linear if MKL_PACKED_LINEAR else _plain_linear


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
        scores = q @ keys[i][:, :, : column + 1].transpose(2, 3)
        if mask is not None:
            scores = scores + mask
        out = scores.softmax(-1) @ values[i][:, :, : column + 1]
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


__all__ = ["MKL_PACKED_LINEAR", "decode_layers", "linear", "pack_weight", "scripted_decode_layers"]
