"""A lean forward pass for Llama-family causal LMs (Llama, Qwen2, Qwen3), on the HF module's own weights.

The transformers forward is general; a GRPO step on one machine pays for that generality three times:

  * decoding: every new token goes through the generic forward (mask builders, cache objects, output
    dataclasses). For a small model one decode step is almost all Python overhead;
  * the reference and training passes encode each prompt once per completion, G times;
  * padding: completions of different lengths are padded to the longest, and every padded position
    is paid for in every linear layer (the linear layers are ~95% of the FLOPs).

This module computes the same function (float32 logits equal the transformers forward to ~1e-6;
tests/test_native.py) with:

  * a static KV cache and a decode step of plain tensor ops, with each layer's q/k/v and gate/up
    weights concatenated once per rollout so a step runs 4 matrix products per layer, not 7;
  * ``completion_logits``: each distinct prompt of a batch encoded once; its keys and values are
    shared by the completions that answer it (autograd sums their gradients back);
  * packed tokens: the linear layers, norms and rotary embeddings see only real tokens; only the
    attention product itself is laid out padded (a few percent of the FLOPs).

No weight is copied or owned here: every call reads the parameters of the Hugging Face module, so
optimizer steps, LoRA adapters (called as modules) and checkpoints (saved by transformers) need nothing.
Architectures outside the family fall back to the transformers forward (``unsupported_reason``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zerorl.lm.decode_step import attend_cache, linear, pack_weight
from zerorl.lm.decode_step import scripted_decode_layers as _compiled_decode_layers
from zerorl.lm.forward import position_ids_from_mask
from zerorl.lm.parallel import openmp_waits_passively

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# scaled_dot_product_attention(..., enable_gqa=True) exists from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the native forward (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers"
    if getattr(config, "attention_dropout", 0.0):
        return "attention_dropout > 0"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    base = getattr(model, "model", None)
    if not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a *ForCausalLM with .model.{embed_tokens,layers,norm,rotary_emb}"
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "lm_head is not an nn.Linear"
    return None


# Below this many FLOPs per decoder layer and pass, a second intra-op thread costs more than it gives under
# OMP_WAIT_POLICY=PASSIVE: each of the pass's many small ops wakes it (measured on 2 cores, benchmarks/RESULTS.md:
# a 1M-parameter model decodes 1.9× faster and trains 1.4× faster on one thread; a 31.5M model's decode, ~0.5 GFLOP
# per layer, is 1.3× faster on two). Under libgomp's default policy (a waiting thread spins briefly) two threads
# win at every size measured (session 9, 1.0M model: `cpu_workers=1 micro_batch_size=8` 0.335–0.358 → 0.247–0.250 s
# per step, its one-batch decode 88 → 74 ms), so ``threads_for`` applies the threshold under PASSIVE only.
SMALL_WORK_FLOPS_PER_LAYER = 4e8

# From this many FLOPs per decoder layer and decode step, a rollout decodes faster as one batch on all the intra-op
# threads than as prompt shards on single-threaded workers: a matrix product split over the threads streams each
# weight from memory once, while every shard streams all of them. Measured on 2 cores under libgomp's default wait
# policy (session 9, packed weights): 31.5M model, 64 rows 0.75 against 0.89 s per rollout, 32 rows 0.50 against
# 0.64 s; 1.0M model (3e7 FLOPs per layer at 64 rows) 74 ms either way. Under OMP_WAIT_POLICY=PASSIVE every split op
# pays for waking its threads and shards win at every size (31.5M: 0.95 against 1.15 s; 1.0M: 78 against 195 ms),
# so the rollout shards there (``zerorl.lm.parallel.openmp_waits_passively``).
THREADED_DECODE_FLOPS_PER_LAYER = 1e8

# A rollout decodes with its weights packed for the GEMM (zerorl.lm.decode_step.pack_weight: float32 by MKL,
# bf16 by oneDNN) when the decoder layers and the LM head take at most this many bytes in float32: the packed
# copies live beside the weights for the rollout, which a 0.5B model (~2 GB in float32) should not pay in memory.
PACKED_WEIGHTS_BUDGET = 512 * 2**20


def layer_flops(model: nn.Module, tokens: int) -> float:
    """2 · (parameters per decoder layer) · tokens: the matmul FLOPs of one layer's forward over ``tokens``."""
    layers = model.model.layers
    return 2.0 * sum(p.numel() for p in layers[0].parameters()) * tokens


@contextlib.contextmanager
def threads_for(flops_per_layer: float):
    """Run a pass on one intra-op thread when its work per layer is small and OpenMP's idle threads sleep at once
    (see SMALL_WORK_FLOPS_PER_LAYER)."""
    before = torch.get_num_threads()
    if before <= 1 or flops_per_layer >= SMALL_WORK_FLOPS_PER_LAYER or not openmp_waits_passively():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """RMSNorm as Llama/Qwen compute it: w · (x / sqrt(mean(x²) + ε)) in float32, cast back to x's dtype."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        # One kernel (and, in training, one saved tensor fewer): the same products in the same order.
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps=norm.variance_epsilon)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _silu_grad(grad: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """grad ⊙ silu'(g) = grad ⊙ σ(g)(1 + g(1 − σ(g))). Torch's silu_backward does it in one pass over the
    MLP-wide tensors (a SwiGLU backward then makes five passes, not ten), but has no derivative of its own:
    under a double backward (TRPO's Fisher-vector products) the formula is spelled out in differentiable ops."""
    if not torch.is_grad_enabled():
        return torch.ops.aten.silu_backward(grad, gate)
    sigmoid = torch.sigmoid(gate)
    return grad * (sigmoid * (1 + gate * (1 - sigmoid)))


class SwiGLUDown(torch.autograd.Function):
    """y = (silu(g) ⊙ u) Wᵀ, saving only g and u for backward: silu(g) ⊙ u (two MLP-wide tensors) is
    recomputed there instead of kept, which cuts the MLP's saved activations from four tensors to two.

        ∂y/∂W = gyᵀ a,   ga = gy W,   ∂/∂u = ga ⊙ silu(g),   ∂/∂g = ga ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))
    where a = silu(g) ⊙ u and silu(g) = g σ(g).
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        grad_a = grad_out @ weight
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ (silu * up).reshape(-1, up.shape[-1])
        grad_up = grad_a * silu if ctx.needs_input_grad[1] else None
        grad_gate = _silu_grad(grad_a * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, grad_weight


# Under bf16 autocast, packed row counts are rounded up to a multiple of this. oneDNN builds (and keeps) one
# bf16 matmul kernel per distinct shape: with a new token count in every micro-batch it spent time building
# them and kept hundreds (the 1.0M model's peak RSS 811 MB under bf16 against 415 MB in float32).
AUTOCAST_ROW_BUCKET = 64


def _row_bucket(device: torch.device) -> int:
    return AUTOCAST_ROW_BUCKET if torch.is_autocast_enabled(device.type) else 1


@dataclass
class _Layout:
    """Where the real tokens of a [rows, width] block sit, for packing and unpacking.

    ``pack`` may append filler rows (copies of the first token) so that the packed length is a multiple of
    ``bucket``; they are computed and dropped by ``unpack``, so no real token, loss or gradient sees them.
    """

    rows: int
    width: int
    index: torch.Tensor  # [N] flat positions (row·width + column) of the real tokens
    packed_index: torch.Tensor  # [N + filler] what pack gathers

    @classmethod
    def from_mask(cls, mask: torch.Tensor, bucket: int = 1) -> _Layout:
        index = mask.reshape(-1).nonzero().squeeze(1)
        filler = -len(index) % bucket if len(index) else 0
        packed_index = torch.cat([index, index[:1].expand(filler)]) if filler else index
        return cls(mask.shape[0], mask.shape[1], index, packed_index)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] → [N (+ filler), ...]"""
        return padded.reshape(self.rows * self.width, *padded.shape[2:]).index_select(0, self.packed_index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[N (+ filler), ...] → [rows, width, ...], zeros where there is no token."""
        flat = packed.new_zeros(self.rows * self.width, *packed.shape[1:])
        real = packed[: len(self.index)]
        return flat.index_copy(0, self.index, real).reshape(self.rows, self.width, *packed.shape[1:])


@dataclass
class _Segment:
    """Tokens that attend together: a padded block's layout and its attention mask [B, 1, T, S]. A segment with
    ``prefix_rows`` also reads the keys and values of the segment before it, row ``prefix_rows[b]`` for its row b
    (the completions of a group read their prompt's)."""

    layout: _Layout
    mask: torch.Tensor
    mask_2d: torch.Tensor
    prefix_rows: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Packed rows, filler included."""
        return len(self.layout.packed_index)

    @classmethod
    def prompts(cls, mask: torch.Tensor) -> _Segment:
        """Causal attention within each row of a padded block [B, T]. A padding position attends only to itself,
        so no softmax row is empty (an empty row would be NaN and poison the masked keys through 0·NaN)."""
        mask = mask.bool()
        width = mask.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        attend = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=mask.device)
        return cls(_Layout.from_mask(mask, _row_bucket(mask.device)), attend[:, None], mask)

    @classmethod
    def completions(cls, mask: torch.Tensor, prompt_mask: torch.Tensor, row_prompt: torch.Tensor) -> _Segment:
        """Completion inputs [B, T] after the prompts [P, Lp]: row b reads its prompt ``row_prompt[b]`` (its real
        tokens) and its own earlier inputs."""
        rows, width = mask.shape
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        key_prompt = prompt_mask[row_prompt][:, None, :].expand(rows, width, -1)
        attend = torch.cat([key_prompt, causal[None].expand(rows, -1, -1)], dim=2)[:, None]
        return cls(_Layout.from_mask(mask, _row_bucket(mask.device)), attend, mask, row_prompt)


class NativeDecoder:
    """Lean forward passes over a Hugging Face Llama / Qwen2 / Qwen3 causal LM's parameters."""

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"NativeDecoder: {reason}; use the transformers forward (native_model=false).")
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        base = model.model
        self.embed, self.layers, self.final_norm, self.rotary = base.embed_tokens, base.layers, base.norm, \
            base.rotary_emb
        self.lm_head = model.lm_head
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")

    # ------------------------------------------------------------------------------------------
    # Building blocks shared by the training forward and the prefill (packed tokens, module calls)
    # ------------------------------------------------------------------------------------------
    def _qkv(self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Packed h [N, D] → rotated q [N, H, d], k [N, Hkv, d] and v [N, Hkv, d]."""
        n = h.shape[0]
        q = attn.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _mlp(self, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        down = mlp.down_proj
        if torch.is_grad_enabled() and isinstance(down, nn.Linear) and down.bias is None \
                and not torch.is_autocast_enabled(h.device.type):
            return SwiGLUDown.apply(gate, up, down.weight)
        return down(F.silu(gate) * up)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, d] for packed positions [N] (the model's own rotary module: any RoPE scaling)."""
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0, :, None, :], sin[0, :, None, :]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ/√d + mask) v for padded q [B, H, T, d], keys/values [B, Hkv, S, d], mask [B, 1, T, S]
        (boolean, True = attend)."""
        # Grouped-query attention: query head h reads key/value head h // group. torch ≥ 2.5 does that inside the
        # kernel (no repeated copy of the keys and values, nor a sum over the copies in backward: the attention
        # pass −33% on the 31.5M model's shapes, the same numbers).
        gqa = {}
        if self.group > 1 and _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        elif self.group > 1:
            keys = keys.repeat_interleave(self.group, dim=1)
            values = values.repeat_interleave(self.group, dim=1)
        device = q.device.type
        autocast_on = torch.is_autocast_enabled(device)
        if device == "cpu" and (autocast_on or values.dtype != torch.float32):
            # On a CPU, in float32: torch's bf16 flash-attention backward there is ~3× slower than float32's
            # for these short sequences (31.5M model, bf16: the training pass −12%, benchmarks/RESULTS.md),
            # and float32 scores are the more precise softmax. Attention is a few % of the FLOPs; the matrix
            # products around it stay in bf16.
            out_dtype = torch.get_autocast_dtype(device) if autocast_on else values.dtype
            with torch.autocast(device, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                                     scale=self.scale, **gqa)
            return out.to(out_dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, **gqa)

    def _block(self, layer: nn.Module, x: torch.Tensor, cos, sin, segments: list[_Segment]):
        """One decoder layer over packed x [N, D], the segments' tokens laid end to end. The linear layers,
        norms and rotations run once over all N tokens; attention runs per segment, padded. Returns (x, the
        segments' (k, v), each padded [B, Hkv, T, d])."""
        attn = layer.self_attn
        q, k, v = self._qkv(attn, rms_norm(x, layer.input_layernorm), cos, sin)
        outs, cache, start = [], [], 0
        for segment in segments:
            end = start + segment.size
            qs, ks, vs = (segment.layout.unpack(t[start:end]).transpose(1, 2) for t in (q, k, v))
            keys, values = ks, vs
            if segment.prefix_rows is not None:  # each row also reads the keys/values of its prompt
                prefix_keys, prefix_values = cache[-1]
                keys = torch.cat([prefix_keys[segment.prefix_rows], ks], 2)
                values = torch.cat([prefix_values[segment.prefix_rows], vs], 2)
            out = self._attend(qs, keys, values, segment.mask).transpose(1, 2)  # [B, T, H, d]
            outs.append(segment.layout.pack(out).reshape(end - start, -1))
            cache.append((ks, vs))
            start = end
        x = x + attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))
        x = x + self._mlp(layer.mlp, rms_norm(x, layer.post_attention_layernorm))
        return x, cache

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Run a padded batch [B, T] through the decoder layers; return (packed output [N, D] before the final
        norm, its layout, per-layer (k, v) [B, Hkv, T, d] with zeros at padding)."""
        segment = _Segment.prompts(mask)
        if position_ids is None:
            position_ids = position_ids_from_mask(segment.mask_2d)
        x = self.embed(segment.layout.pack(input_ids))
        cos, sin = self._rope(x, segment.layout.pack(position_ids))
        cache = []
        for layer in self.layers:
            x, ((k, v),) = self._block(layer, x, cos, sin, [segment])
            cache.append((k, v))
        return x, segment.layout, cache

    def encode_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Run left-padded prompts [P, Lp]; return (last hidden [P, D] before the final norm, per-layer (k, v)
        [P, Hkv, Lp, d])."""
        x, layout, cache = self._encode(prompt_ids, prompt_mask)
        # Left padding: the last column holds each prompt's last real token.
        return layout.unpack(x)[:, -1], cache

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] of a padded batch, as a transformers base model returns its
        last_hidden_state (zeros at padding). Padding may sit on the left and on the right of each row."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        x, layout, _ = self._encode(input_ids, mask, position_ids)
        return layout.unpack(rms_norm(x, self.final_norm))

    # ------------------------------------------------------------------------------------------
    # Training / reference: logits of every completion token, prompts shared, tokens packed
    # ------------------------------------------------------------------------------------------
    def completion_logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, Lc, V] predicting each completion token: the same numbers as
        ``zerorl.lm.forward.completion_logits`` with the transformers forward (zeros where the mask is 0).

        Rows with identical prompts (a GRPO group) share one encoding of that prompt.
        """
        unique_prompts, row_prompt = torch.unique(prompt_ids * prompt_mask - (1 - prompt_mask), dim=0,
                                                  return_inverse=True)
        first_row = torch.zeros(len(unique_prompts), dtype=torch.long, device=row_prompt.device)
        first_row.scatter_(0, row_prompt, torch.arange(len(row_prompt), device=row_prompt.device))
        p_ids, p_mask = prompt_ids[first_row], prompt_mask[first_row]
        keep = p_mask.any(0).nonzero()
        start = int(keep[0]) if len(keep) else 0
        p_ids, p_mask = p_ids[:, start:], p_mask[:, start:]
        # One pass over the prompts' tokens and the completions' tokens together: every linear layer runs one
        # matrix product over both (a prompt alone is a few rows: a product of its own would read every weight
        # for them, and its weight gradient would be a second one to add); attention runs per segment.
        prompt = _Segment.prompts(p_mask)
        segments = [prompt]
        positions = [prompt.layout.pack(position_ids_from_mask(prompt.mask_2d))]
        token_ids = [prompt.layout.pack(p_ids)]
        rows, length = completion_ids.shape
        targets = completion_mask.bool()
        if length > 1:  # completion inputs o_0 .. o_{Lc-2}: input t is needed iff token t+1 is real
            completion = _Segment.completions(targets[:, 1:], p_mask.bool(), row_prompt)
            segments.append(completion)
            prompt_lengths = p_mask.sum(1)[row_prompt]
            positions.append(completion.layout.pack(prompt_lengths[:, None]
                                                    + torch.arange(length - 1, device=targets.device)))
            token_ids.append(completion.layout.pack(completion_ids[:, :-1]))
        x = self.embed(torch.cat(token_ids))
        cos, sin = self._rope(x, torch.cat(positions))
        for layer in self.layers:
            x, _ = self._block(layer, x, cos, sin, segments)
        # Left padding: the last column of a prompt holds its last real token, which predicts o_0.
        prompt_last = prompt.layout.unpack(x[: prompt.size])[:, -1]
        hidden_columns = [prompt_last[row_prompt][:, None, :]]
        if length > 1:
            hidden_columns.append(completion.layout.unpack(x[prompt.size:]))
        hidden = torch.cat(hidden_columns, dim=1)  # [B, Lc, D]
        target_layout = _Layout.from_mask(targets, _row_bucket(targets.device))
        logits = self.lm_head(rms_norm(target_layout.pack(hidden), self.final_norm))
        return target_layout.unpack(logits)

    # ------------------------------------------------------------------------------------------
    # Decoding: static KV cache, fused weights, one token per row per step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_weights(self, device_type: str = "cpu") -> DecodeWeights:
        """Each layer's q|k|v and gate|up weights concatenated, cast to the autocast dtype when autocast is on
        (built per decode batch, or once for all the shards of a sharded rollout, which share them)."""
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # The weights packed for the GEMM as well (decode_step.pack_weight), while the copies stay small.
        pack = dtype in (None, torch.bfloat16) and device_type == "cpu" \
            and sum(p.numel() * p.element_size() for p in [*self.layers.parameters(), self.lm_head.weight]) \
            <= PACKED_WEIGHTS_BUDGET
        layers = [(_fused([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], dtype, pack),
                   _fused([layer.self_attn.o_proj], dtype, pack),
                   _fused([layer.mlp.gate_proj, layer.mlp.up_proj], dtype, pack),
                   _fused([layer.mlp.down_proj], dtype, pack))
                  for layer in self.layers]
        return DecodeWeights(layers, _fused([self.lm_head], dtype, pack))

    def scripted_decode_layers(self, weights: DecodeWeights, device_type: str = "cpu"):
        """zerorl.lm.decode_step's TorchScript layers when a decode step over ``weights`` is exactly its ops (no
        q/k norms, every layer's weights fused, float32 embeddings and norms, one RMSNorm ε, each bias in every
        layer or in none; the weights float32, or in the autocast dtype under autocast), else None.

        Under autocast the scripted layers run the eager loop's ops with the same casts: autocast acts where an
        op is dispatched, which is the same whether Python or TorchScript's interpreter calls it (tested: the
        same tokens and log-probs)."""
        if self.qk_norm:
            return None
        weight_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else torch.float32
        norms = [norm for layer in self.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        epsilons = {getattr(norm, "variance_epsilon", None) for norm in norms}
        if len(epsilons) != 1 or None in epsilons or self.embed.weight.dtype != torch.float32 \
                or any(norm.weight.dtype != torch.float32 for norm in norms):
            return None
        if any(fused is None for layer in weights.layers for fused in layer):
            return None  # a module call (e.g. LoRA-wrapped)
        if any(t is not None and t.dtype != weight_dtype for layer in weights.layers for fused in layer for t in fused):
            return None
        has_bias = [{layer[i][1] is not None for layer in weights.layers} for i in range(4)]  # q|k|v, o, gate|up, down
        if any(len(present) != 1 for present in has_bias) or True in has_bias[2]:
            return None  # decode_layers takes each bias for all layers or none, and no gate|up bias
        if len({fused[2] is not None for layer in weights.layers for fused in layer}) != 1:
            return None  # and every weight packed, or none
        return _compiled_decode_layers()

    @torch.no_grad()
    def start_decoding(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, row_prompt: torch.Tensor,
                       max_new_tokens: int, weights: DecodeWeights | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Prefill the distinct prompts once; return (next-token logits per row [b, V], the decode state)."""
        last, prompt_cache = self.encode_prompts(prompt_ids, prompt_mask)
        logits = self.lm_head(rms_norm(last, self.final_norm))[row_prompt]
        weights = weights if weights is not None else self.decode_weights(prompt_ids.device.type)
        return logits, DecodeState(self, prompt_cache, prompt_mask, row_prompt, max_new_tokens, weights)


@dataclass
class DecodeWeights:
    """Per layer (q|k|v, o, gate|up, down) as (weight, bias, packed weight or None) — None where a layer must
    be called as a module (e.g. LoRA-wrapped) — and the LM head's."""

    layers: list[tuple]
    lm_head: tuple | None


def _fused(modules: list[nn.Module], dtype: torch.dtype | None, pack: bool = False) -> tuple | None:
    """(concatenated weight, concatenated bias, packed weight) of plain nn.Linear layers that read the same
    input, cast to ``dtype`` when given (autocast would otherwise cast every weight again at every decode
    step); the packed weight (``decode_step.pack_weight``) only with ``pack``, else None."""
    if not all(isinstance(m, nn.Linear) for m in modules):
        return None  # e.g. LoRA-wrapped layers: call them as modules
    weight = modules[0].weight if len(modules) == 1 else torch.cat([m.weight for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return weight, bias, pack_weight(weight) if pack else None


def _linear(x: torch.Tensor, fused, module: nn.Module) -> torch.Tensor:
    return linear(x.to(fused[0].dtype), *fused) if fused is not None else module(x)


class DecodeState:
    """The KV cache of rows being decoded: [b, Hkv, Lp + max_new, d] per layer, one column per step.

    All active rows write the same column at each step (finished rows leave the batch), so the key
    mask is the prompt's padding mask followed by ones.
    """

    def __init__(self, decoder: NativeDecoder, prompt_cache, prompt_mask, row_prompt, max_new_tokens: int,
                 weights: DecodeWeights):
        self.decoder = decoder
        prompt_width = prompt_mask.shape[1]
        rows = len(row_prompt)
        self.column = prompt_width
        self.keys, self.values = [], []
        device_type = prompt_cache[0][0].device.type
        # Attention runs in the cache's dtype (decode_step.attend_cache): the keys' and values' own dtype, except under
        # autocast. There a CPU keeps the cache in float32: bf16 attention on a CPU is slower (a copy of the transposed
        # keys per layer and step) and less precise. Elsewhere it is in the autocast dtype: half the memory, and a
        # GPU's bf16 products are the fast ones.
        cache_dtype = None
        if torch.is_autocast_enabled(device_type):
            cache_dtype = torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)
        for k, v in prompt_cache:
            shape = (rows, k.shape[1], prompt_width + max_new_tokens, k.shape[3])
            keys, values = k.new_empty(shape, dtype=cache_dtype), v.new_empty(shape, dtype=cache_dtype)
            keys[:, :, :prompt_width], values[:, :, :prompt_width] = k[row_prompt], v[row_prompt]
            self.keys.append(keys)
            self.values.append(values)
        self.key_mask = torch.cat([prompt_mask.bool()[row_prompt],
                                   prompt_mask.new_ones(rows, max_new_tokens, dtype=torch.bool)], dim=1)
        self.positions = prompt_mask.sum(1)[row_prompt]  # position of the first generated token
        self.has_padding = not bool(prompt_mask.bool().all())
        self.weights, self.lm_head = weights.layers, weights.lm_head
        # The layers as one TorchScript call where the eager loop below is plain ops on fused weights, float32 or
        # under autocast (zerorl.lm.decode_step).
        self.scripted = decoder.scripted_decode_layers(weights, device_type)
        if self.scripted is not None:
            qkv, o, gate_up, down = zip(*self.weights)  # per layer (weight, bias, packed) → per kind, over the layers
            self.script_weights = (
                [w for w, _, _ in qkv], [b for _, b, _ in qkv if b is not None], [w for w, _, _ in o],
                [b for _, b, _ in o if b is not None], [w for w, _, _ in gate_up], [w for w, _, _ in down],
                [b for _, b, _ in down if b is not None],
                [packed for layer in self.weights for _, _, packed in layer if packed is not None],
                [layer.input_layernorm.weight for layer in decoder.layers],
                [layer.post_attention_layernorm.weight for layer in decoder.layers])
            self.norm_eps = decoder.layers[0].input_layernorm.variance_epsilon

    def keep(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (the others finished), in that order. An order that moves rows only from beyond
        the new size into it (``rollout.compaction_order``) is done in place: those rows are copied and the caches
        cut to the new size (a view), where copying every layer's cache cost ~50 ms per 31.5M rollout."""
        size = len(index)
        moved = (index != torch.arange(size, device=index.device)).nonzero().flatten()
        sources = index[moved]
        if bool((sources >= size).all()):
            for cache in (self.keys, self.values):
                for layer, tensor in enumerate(cache):
                    if len(moved):
                        tensor[moved] = tensor[sources]
                    cache[layer] = tensor[:size]
        else:
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]
        self.key_mask, self.positions = self.key_mask[index], self.positions[index]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [b]; return the next-token logits [b, V]."""
        d = self.decoder
        column = self.column
        x = d.embed(tokens)
        cos, sin = d.rotary(x[:, None], self.positions[:, None])  # [b, 1, d]: broadcasts over heads
        mask = None
        if self.has_padding:
            mask = torch.zeros(self.key_mask[:, : column + 1].shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~self.key_mask[:, : column + 1], float("-inf"))[:, None, None, :]
        if self.scripted is not None:
            # The plain interpreter: the profiling executor would specialize again on every new shape (rows leave,
            # the cache grows a column per step) and fuses nothing on a CPU anyway (thread-local setting).
            with torch.jit.optimized_execution(False):
                x = self.scripted(x, *self.script_weights, self.keys, self.values, cos, sin, mask, column,
                                  d.num_heads, d.num_kv_heads, d.head_dim, d.scale, self.norm_eps)
        else:
            x = self._eager_layers(x, cos, sin, mask)
        self.column += 1
        self.positions = self.positions + 1
        return _linear(rms_norm(x, d.final_norm), self.lm_head, d.lm_head)

    def _eager_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        """The decoder layers of a step, op by op (any weights: fused or module calls, q/k norms, autocast)."""
        d = self.decoder
        rows, column = x.shape[0], self.column
        q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        for layer, keys, values, (qkv, o, gate_up, down) in zip(d.layers, self.keys, self.values, self.weights):
            attn, mlp = layer.self_attn, layer.mlp
            h = rms_norm(x, layer.input_layernorm)
            if qkv is not None and not d.qk_norm:
                # q and k heads side by side in the fused output: one rotation for both.
                fused = _linear(h, qkv, None)
                qk = rotate(fused[:, : q_width + kv_width].view(rows, d.num_heads + d.num_kv_heads, d.head_dim),
                            cos, sin)
                q, k, v = qk[:, : d.num_heads], qk[:, d.num_heads :], fused[:, q_width + kv_width :]
            else:
                if qkv is not None:
                    q, k, v = _linear(h, qkv, None).split([q_width, kv_width, kv_width], dim=-1)
                else:
                    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
                q = q.view(rows, d.num_heads, d.head_dim)
                k = k.view(rows, d.num_kv_heads, d.head_dim)
                if d.qk_norm:
                    q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys[:, :, column] = k
            values[:, :, column] = v.view(rows, d.num_kv_heads, d.head_dim)
            # Grouped query heads [b, Hkv, group, d] against their shared key/value head.
            q = q.reshape(rows, d.num_kv_heads, d.group, d.head_dim) * d.scale
            out = attend_cache(q, keys[:, :, : column + 1], values[:, :, : column + 1], mask)
            x = x + _linear(out.reshape(rows, q_width), o, attn.o_proj)
            h = rms_norm(x, layer.post_attention_layernorm)
            if gate_up is not None:
                gate, up = _linear(h, gate_up, None).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + _linear(F.silu(gate) * up, down, mlp.down_proj)
        return x


__all__ = ["SMALL_WORK_FLOPS_PER_LAYER", "SUPPORTED_MODEL_TYPES", "THREADED_DECODE_FLOPS_PER_LAYER", "DecodeState", "DecodeWeights", "NativeDecoder", "SwiGLUDown", "layer_flops", "rms_norm",
           "rotate", "threads_for", "unsupported_reason"]
