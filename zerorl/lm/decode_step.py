"""The decoder layers of one decode step as a TorchScript function.

A decode step is ~25 ops per layer on a handful of rows: for a small model almost all of it is Python and
dispatcher work, and eager Python holds the GIL for that work, so rollout shards on two CPU workers wait for
each other (measured: 1.0M model, 32 rows a shard, 90 ms alone and 170–210 ms for two at once). TorchScript
runs the same ATen ops from its own interpreter, which does less work per op and does not hold the GIL: two
such shards take as long as one (48 against 47 ms). The 31.5M model's rollout (two shards) is ~15% faster;
the 1.0M model's (one shard: splitting its rows would change its sampling streams) ~10%.

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


def decode_layers(x: torch.Tensor, qkv_w: List[torch.Tensor], qkv_b: List[torch.Tensor],  # noqa: UP006
                  o_w: List[torch.Tensor], o_b: List[torch.Tensor], gate_up_w: List[torch.Tensor],  # noqa: UP006
                  down_w: List[torch.Tensor], down_b: List[torch.Tensor], norm1: List[torch.Tensor],  # noqa: UP006
                  norm2: List[torch.Tensor], keys: List[torch.Tensor], values: List[torch.Tensor],  # noqa: UP006
                  cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor], column: int,  # noqa: UP045
                  num_heads: int, num_kv_heads: int, head_dim: int, scale: float, eps: float) -> torch.Tensor:
    """x [b, D] through every decoder layer for the token at KV-cache column ``column``; writes that column
    of ``keys`` / ``values`` [b, Hkv, S, d]. Weights per layer: fused q|k|v (and its bias; an empty list = no
    bias), o (bias), gate|up, down (bias) and the two RMSNorm weights. Llama / Qwen2 without q/k norms."""
    rows = x.shape[0]
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    half = head_dim // 2
    for i in range(len(qkv_w)):
        h = F.rms_norm(x, [x.shape[-1]], norm1[i], eps)
        fused = F.linear(h, qkv_w[i], qkv_b[i] if len(qkv_b) > 0 else None)
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
        x = x + F.linear(out.reshape(rows, q_width), o_w[i], o_b[i] if len(o_b) > 0 else None)
        h = F.rms_norm(x, [x.shape[-1]], norm2[i], eps)
        gate, up = F.linear(h, gate_up_w[i]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, down_w[i], down_b[i] if len(down_b) > 0 else None)
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


__all__ = ["decode_layers", "scripted_decode_layers"]
