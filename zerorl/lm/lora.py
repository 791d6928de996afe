"""A small LoRA (Hu et al. 2021) for PPO / TRPO on models too large to train whole.

    y = W x + (α / r) · B A x          W frozen; A [r, in] and B [out, r] trained; B = 0 at the start

so the adapted model equals the base model before the first update. TRPO's natural-gradient step then
runs over A and B only: the Fisher-vector products and the conjugate gradient live in a space of
r·(in + out) numbers per layer instead of in·out.

``peft`` is not required (and not imported): this is the one idea of LoRA, in one small module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# The linear layers of Qwen2 / Llama blocks (attention and MLP); lm_head and embeddings stay frozen.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (α/r)·B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be ≥ 1, got {rank}.")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.enabled = True
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        # B = 0: the product BA is 0, so the wrapped layer starts exactly at the base layer.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft initialize A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.enabled:
            out = out + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return out

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W + (α/r)·B A folded in (for saving a standard HF model)."""
        layer = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                          dtype=self.base.weight.dtype, device=self.base.weight.device)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Freeze ``model`` and wrap its target linear layers in place; returns the LoRA parameters."""
    model.requires_grad_(False)
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                replaced.append(name)
    if not replaced:
        raise ValueError(f"apply_lora: no nn.Linear named one of {list(targets)} in "
                         f"{type(model).__name__}; pass the names of its projection layers as targets.")
    return lora_parameters(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its merged ``nn.Linear`` in place (the model saves as plain HF)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model without adapters: π_ref for free, no second copy of the weights in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
