"""zerorl.optim: the same AdamW update and schedule as torch.optim, and checkpoints in its layout."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

from zerorl.optim import AdamW, LRSchedule


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_(),
            torch.randn(3, 4, generator=gen).requires_grad_()]


def _run(optimizer_cls, params, steps: int, schedule: bool, **kwargs):
    """A few steps on fixed pseudo-gradients, with a param-group layout like PPO's (policy + critic)."""
    groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-2}]
    optimizer = optimizer_cls(groups, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, **kwargs)
    scheduler = None
    if schedule:
        factor = lambda step: 0.5 ** step  # noqa: E731
        scheduler = LRSchedule(optimizer, factor) if optimizer_cls is AdamW else \
            torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for param in params:
            param.grad = None if (step == 1 and param is params[1]) else torch.randn(param.shape, generator=gen)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return optimizer, scheduler


def test_adamw_updates_equal_torch_fused_adamw_bit_for_bit():
    ours, theirs = _params(), _params()
    _run(AdamW, ours, steps=4, schedule=True)
    _run(torch.optim.AdamW, theirs, steps=4, schedule=True, fused=True)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_adamw_matches_the_formula_by_hand():
    """One parameter, two steps, against the docstring's update written out in float64."""
    param = torch.tensor([0.5, -1.0], requires_grad=True)
    optimizer = AdamW([param], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    theta, m, v = [0.5, -1.0], [0.0, 0.0], [0.0, 0.0]
    for t, grad in enumerate(([0.2, -0.4], [1.0, 0.3]), start=1):
        param.grad = torch.tensor(grad)
        optimizer.step()
        for i, g in enumerate(grad):
            theta[i] -= 0.1 * 0.1 * theta[i]
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.99 * v[i] + 0.01 * g * g
            theta[i] -= 0.1 * (m[i] / (1 - 0.9 ** t)) / (math.sqrt(v[i] / (1 - 0.99 ** t)) + 1e-8)
    assert torch.allclose(param.detach().double(), torch.tensor(theta, dtype=torch.float64), atol=1e-6, rtol=0)


def test_the_fallback_path_matches_torch_single_tensor_adamw(monkeypatch):
    """Devices without the fused kernel run the per-tensor formula: equal to torch's for-loop AdamW."""
    monkeypatch.delattr(torch, "_fused_adamw_")
    ours, theirs = _params(), _params()
    _run(AdamW, ours, steps=3, schedule=False)
    _run(torch.optim.AdamW, theirs, steps=3, schedule=False, foreach=False)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_state_dicts_load_both_ways_with_torch_optim_and_resume_exactly():
    """A checkpoint written by torch.optim (older zerorl runs) loads into ours and vice versa, and continuing
    from it gives what an uninterrupted run gives."""
    straight = _params()
    _run(AdamW, straight, steps=5, schedule=True)

    first = _params()
    torch_optimizer, torch_scheduler = _run(torch.optim.AdamW, first, steps=3, schedule=True, fused=True)
    resumed, scheduler = _run(AdamW, [p.detach().clone().requires_grad_() for p in first], steps=0, schedule=True)
    params = [p for group in resumed.param_groups for p in group["params"]]
    resumed.load_state_dict(torch_optimizer.state_dict())
    scheduler.load_state_dict(torch_scheduler.state_dict())
    assert scheduler.get_last_lr() == pytest.approx(torch_scheduler.get_last_lr())
    gen = torch.Generator().manual_seed(1)
    for step in range(5):  # replay the pseudo-gradient stream; apply only steps 3 and 4
        grads = [None if (step == 1 and i == 1) else torch.randn(p.shape, generator=gen) for i, p in enumerate(params)]
        if step < 3:
            continue
        for param, grad in zip(params, grads):
            param.grad = grad
        resumed.step()
        scheduler.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)

    # And back: torch.optim loads ours (a checkpoint for an older zerorl) and keeps stepping identically.
    twins = [p.detach().clone().requires_grad_() for p in params]
    back = torch.optim.AdamW([{"params": twins[:2], "lr": 1e-2}, {"params": twins[2:], "lr": 3e-2}], lr=1e-3)
    back_scheduler = torch.optim.lr_scheduler.LambdaLR(back, lambda step: 0.5 ** step)  # built, then restored
    back.load_state_dict(copy.deepcopy(resumed.state_dict()))  # as through a checkpoint file: no shared tensors
    back_scheduler.load_state_dict(scheduler.state_dict())
    assert back_scheduler.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    for param, twin in zip(params, twins):
        param.grad = twin.grad = torch.full(param.shape, 0.3)
    resumed.step()
    back.step()
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin)


def test_a_mismatched_checkpoint_is_refused_with_a_clear_error():
    optimizer, _ = _run(AdamW, _params(), steps=1, schedule=False)
    other = AdamW([torch.zeros(2, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(optimizer.state_dict())
    reshaped = [torch.zeros(5, 7, requires_grad=True), torch.zeros(5, requires_grad=True),
                torch.zeros(3, 4, requires_grad=True)]  # same groups and counts, another shape
    same_layout, _ = _run(AdamW, reshaped, steps=0, schedule=False)
    with pytest.raises(ValueError, match=r"shape \(7, 5\), the parameter \(5, 7\)"):
        same_layout.load_state_dict(optimizer.state_dict())


def test_building_the_optimizer_does_not_import_dynamo():
    """The point of zerorl.optim: torch.optim.Optimizer's constructor imports torch._dynamo (~70 MB)."""
    code = ("import sys, torch\nfrom zerorl.optim import AdamW, LRSchedule\n"
            "p = torch.nn.Parameter(torch.ones(3)); o = AdamW([p], lr=0.1); s = LRSchedule(o, lambda t: 1.0)\n"
            "p.grad = torch.ones(3); o.step(); s.step(); o.state_dict()\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
