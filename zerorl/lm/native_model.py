"""Llama / Qwen2 / Qwen3 causal LMs built by zerorl itself from a Hugging Face model directory.

The module tree, parameter names and files are those of transformers (``model.layers.0.self_attn.q_proj
.weight``, ``config.json``, ``model.safetensors``), so a model saved here loads in transformers and
vice versa, and checkpoints, LoRA and the trainers do not see a difference. What differs is what it
costs to have one: importing transformers' modeling code brings in torch.fx, dynamo and sympy, ~100 MB of
resident memory before the first weight is read — more than a 1M-parameter model and its optimizer need
in all. Here the forward pass is ``zerorl.lm.native`` (the same function, tests/test_native_model.py)
and only transformers' light config and tokenizer modules are imported.

``load_native_model`` returns None when a directory is not a plain Llama-family checkpoint in
safetensors (another architecture, remote code, RoPE types that change with the sequence length, .bin
weights): the caller then loads it with transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from zerorl.lm.native import SUPPORTED_MODEL_TYPES, NativeDecoder, unsupported_reason

# RoPE types whose frequencies are fixed at load time (the "dynamic" ones change with the sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class Linear(nn.Linear):
    """nn.Linear without the random initialization: its weights come from the checkpoint."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without the random initialization: its weights come from the checkpoint."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))  # from the checkpoint
        self.variance_epsilon = eps


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    return {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


class RotaryEmbedding(nn.Module):
    """cos, sin of the rotary position embedding, computed as transformers computes them (float32)."""

    def __init__(self, config):
        super().__init__()
        params = _rope_parameters(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if params["rope_type"] == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            inv_freq, self.attention_scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, head_dim: int, qk_norm: bool):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.q_proj = Linear(config.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        # Qwen2's output projection has no bias; Llama/Qwen3 follow attention_bias.
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        self.o_proj = Linear(heads * head_dim, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.self_attn = Attention(config, head_dim, qk_norm=config.model_type == "qwen3")
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Backbone(nn.Module):
    """``model.model``: embeddings, decoder layers, final norm; called like transformers' base model."""

    def __init__(self, config):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, head_dim) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.causal_lm: NativeCausalLM | None = None  # set by the owner (not a submodule: no cycle)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_ignored):
        hidden = self.causal_lm._decoder().hidden_states(input_ids, attention_mask, position_ids)
        return SimpleNamespace(last_hidden_state=hidden)


class NativeCausalLM(nn.Module):
    """A transformers-compatible ``*ForCausalLM`` for the Llama family, on zerorl's forward pass."""

    def __init__(self, config, generation_config=None):
        super().__init__()
        self.config = config
        self.generation_config = generation_config
        self.model = Backbone(config)
        object.__setattr__(self.model, "causal_lm", self)  # a plain reference, not a registered submodule
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def _decoder(self) -> NativeDecoder:
        return NativeDecoder(self)

    @property
    def base_model(self) -> Backbone:
        return self.model

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, logits_to_keep: int = 0,
                **_ignored):
        """Logits [B, T, V] (the last ``logits_to_keep`` positions when > 0) and, with ``labels``, the
        next-token cross-entropy over labels ≠ −100 (float32), as transformers returns them."""
        hidden = self._decoder().hidden_states(input_ids, attention_mask, position_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t + 1
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json, generation_config.json and model.safetensors, readable by transformers."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # stored once, as transformers does
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def native_unsupported_reason(directory: Path) -> str | None:
    """Why ``directory`` must be loaded by transformers (None when zerorl can build it itself)."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"config.json unreadable ({error})"
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return f"model_type {raw.get('model_type')!r}"
    if raw.get("auto_map"):
        return "remote code (auto_map)"
    if not ((directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()):
        return "no safetensors weights"
    return None


def load_native_model(directory: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> NativeCausalLM | None:
    """Build the model of a local Llama/Qwen2/Qwen3 directory without transformers' modeling code, or
    return None when it needs transformers (see ``native_unsupported_reason``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig

    directory = Path(directory)
    if native_unsupported_reason(directory) is not None:
        return None
    config = AutoConfig.from_pretrained(directory)
    if _rope_parameters(config).get("rope_type", "default") not in STATIC_ROPE_TYPES:
        return None
    try:
        generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        generation_config = None
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # Parameters start as uninitialized storage (never touched, so never resident) and are replaced by
    # the checkpoint's tensors. (A "meta" device build would import torch's compiler stack: +100 MB.)
    model = NativeCausalLM(config, generation_config)
    if unsupported_reason(model) is not None:  # the same conditions as the native forward (activation, ...)
        return None
    state = {}
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    for name in files:
        state.update(load_file(str(directory / name)))
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        return None  # a layout this builder does not know (e.g. extra heads): let transformers load it
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = dtype
    return model.eval()


__all__ = ["NativeCausalLM", "load_native_model", "native_unsupported_reason"]
