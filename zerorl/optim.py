"""AdamW and the learning-rate schedule the LM trainers use, without ``torch.optim``'s machinery.

Why not ``torch.optim.AdamW``: constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (and
with it torch.fx and sympy), ~70 MB resident that a training process on a small model never uses —
more than the whole state of the default model. The update below is the same: on CPU and CUDA it calls
the kernel ``torch.optim.AdamW(fused=True)`` calls, ``torch._fused_adamw_`` (tests/test_optim.py checks the
parameters bit for bit against it), and the state dicts have ``torch.optim``'s layout and keys, so
checkpoints written by either load into the other (tests/test_optim.py).

AdamW (Loshchilov & Hutter, 2019), per parameter θ with gradient g at step t:

    θ ← θ − lr·λ·θ                                   (decoupled weight decay)
    m ← β₁ m + (1 − β₁) g,     v ← β₂ v + (1 − β₂) g²
    θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")
_TORCH_GROUP_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                      "differentiable": False, "fused": True, "decoupled_weight_decay": True}


class AdamW:
    """AdamW over parameter groups (a list of tensors, or dicts with "params" and per-group "lr")."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = []
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            group["betas"] = tuple(group["betas"])
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param not in self.state:
                    self.state[param] = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                                         "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                         "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            by_device: dict[tuple, list[torch.Tensor]] = {}
            for param in params:
                by_device.setdefault((param.device, param.dtype), []).append(param)
            for (device, _), same in by_device.items():
                self._update(same, group, device)

    def _update(self, params: list[torch.Tensor], group: dict, device: torch.device) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        torch._foreach_add_(steps, 1.0)
        if device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adamw_"):
            # The kernel behind torch.optim.AdamW(fused=True): one pass over each tensor, no temporaries.
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
            return
        for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            t = float(step)
            param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))

    # --- checkpoints: torch.optim's layout (state by parameter index, groups without the tensors) ---------
    def state_dict(self) -> dict:
        index, groups, state = 0, [], {}
        for group in self.param_groups:
            indices = []
            for param in group["params"]:
                if param in self.state:
                    state[index] = dict(self.state[param])
                indices.append(index)
                index += 1
            # torch.optim.AdamW's group keys too, so that it can load this and take the same (fused) steps.
            groups.append({**{k: v for k, v in group.items() if k != "params"}, **_TORCH_GROUP_FLAGS,
                           "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError("optimizer state does not match this optimizer's parameter groups (a checkpoint of "
                             "another model or algorithm?)")
        self.state = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for key in (*_GROUP_KEYS, "initial_lr"):
                if key in saved:
                    group[key] = tuple(saved[key]) if key == "betas" else saved[key]
            for index, param in zip(saved["params"], group["params"]):
                entry = state_dict["state"].get(index)
                if entry is None:
                    continue
                if tuple(entry["exp_avg"].shape) != tuple(param.shape):
                    raise ValueError(f"optimizer state for parameter {index} has shape {tuple(entry['exp_avg'].shape)}"
                                     f", the parameter {tuple(param.shape)} (a checkpoint of another model?)")
                self.state[param] = {
                    "step": torch.as_tensor(entry["step"], dtype=torch.float32).to(param.device).clone(),
                    "exp_avg": entry["exp_avg"].to(device=param.device, dtype=param.dtype).clone(),
                    "exp_avg_sq": entry["exp_avg_sq"].to(device=param.device, dtype=param.dtype).clone(),
                }


class LRSchedule:
    """lr of each group = its initial lr × factor(step), as ``torch.optim.lr_scheduler.LambdaLR`` sets it
    (factor(0) at construction, factor(n) after the n-th ``step()``)."""

    def __init__(self, optimizer: AdamW, factor: Callable[[int], float]):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        # LambdaLR's keys, so that torch.optim.lr_scheduler.LambdaLR can load it too.
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "_step_count": self.last_epoch + 1,
                "_last_lr": self.get_last_lr(), "lr_lambdas": [None] * len(self.base_lrs)}

    def load_state_dict(self, state_dict: dict) -> None:  # also reads a LambdaLR's state dict
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict.get("base_lrs", self.base_lrs))
        self._apply()


__all__ = ["AdamW", "LRSchedule"]
