"""TRPO's natural-gradient step: conjugate gradient on Fisher-vector products, then a line search.

The article's TRPO problem (Schulman et al. 2015, eq. 14):

    max_θ  E_{π_old}[ π_θ(a|s) / π_old(a|s) · Â(s, a) ]   s.t.   E_s[ KL(π_old(·|s) ‖ π_θ(·|s)) ] ≤ δ

Linearizing the surrogate (gradient g) and taking the KL to second order (its Hessian at θ_old is the
Fisher matrix F) gives the step direction x = F⁻¹g and the largest step within the KL ball,
s = sqrt(2δ / xᵀFx) · x (Appendix C). F is never formed: conjugate gradient only needs products Fv,
which double backprop of the mean KL gives at the cost of two backward passes. A backtracking line
search then checks the real (not approximated) KL and surrogate.

Works on any list of parameters — a whole nn.Module, or only its LoRA adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class LineSearchResult:
    accepted: bool
    step_fraction: float  # fraction of the full step that was applied (0 when rejected)
    backtracks: int  # number of halvings before acceptance (max_backtracks when rejected)
    kl: float  # mean KL measured at the final parameters
    surrogate_after: float


@dataclass
class TRPOStepInfo:
    accepted: bool
    step_fraction: float
    backtracks: int
    kl: float  # mean KL(π_old ‖ π_θ) measured after the step (after restoring, if rejected)
    surrogate_before: float
    surrogate_after: float
    expected_improvement: float  # gᵀs for the full step s (first-order prediction)
    grad_norm: float  # ‖g‖ of the surrogate gradient


def flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """All parameters concatenated into one detached 1-D tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a 1-D tensor back into the parameters, in `flat_params` order."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"set_flat_params: got {flat.numel()} numbers for {total} parameter entries.")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def flat_grad(
    output: torch.Tensor,
    params: Sequence[torch.Tensor],
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """∂output/∂params as one 1-D tensor; parameters the output does not depend on get zeros."""
    grads = torch.autograd.grad(
        output, list(params), retain_graph=retain_graph, create_graph=create_graph, allow_unused=True
    )
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10, tol: float = 1e-10
) -> torch.Tensor:
    """Solve A x = b for symmetric positive-definite A given only v ↦ Av (Hestenes & Stiefel 1952;
    Nocedal & Wright, Algorithm 5.2; TRPO uses 10 iterations). Starts at x = 0 and stops after `iters`
    iterations or when the squared residual rᵀr < tol.

        α = rᵀr / pᵀAp;  x += α p;  r −= α Ap;  p = r + (r'ᵀr' / rᵀr) p
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual @ residual
    for _ in range(iters):
        if residual_sq < tol:
            break
        a_direction = matvec(direction)
        alpha = residual_sq / (direction @ a_direction)
        x += alpha * direction
        residual -= alpha * a_direction
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def fisher_vector_product(
    kl_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], damping: float = 0.1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ (∇²_θ KL̄) v + damping · v, by double backprop (Pearlmutter 1994; Schulman et al. 2015 App. C).

    kl_fn() must return the mean KL(π_old ‖ π_θ) as a scalar with graph; its Hessian at θ = θ_old is
    the Fisher information matrix. KL̄ and ∇KL̄ are computed once here; each product then costs one
    backward pass of (∇KL̄ · v). Damping keeps F + damping·I well-conditioned for CG.
    """
    kl = kl_fn()
    if not kl.requires_grad:
        raise ValueError(
            "fisher_vector_product: kl_fn() returned a tensor without a graph; compute the KL from the "
            "current policy's outputs with gradients enabled (π_old detached)."
        )
    kl_grad = flat_grad(kl, params, create_graph=True)

    def fvp(vector: torch.Tensor) -> torch.Tensor:
        grad_dot_vector = kl_grad @ vector.detach()
        hessian_vector = flat_grad(grad_dot_vector, params, retain_graph=True)
        return hessian_vector + damping * vector

    return fvp


def backtracking_line_search(
    params: Sequence[torch.Tensor],
    surrogate_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    full_step: torch.Tensor,
    max_kl: float,
    expected_improvement: float,
    surrogate_before: float | None = None,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
) -> LineSearchResult:
    """Try θ_old + f·s for f = 1, ½, ¼, … (max_backtracks tries); accept the first with

        KL̄(θ) ≤ δ   and   L(θ) − L(θ_old) > 0   and   L(θ) − L(θ_old) ≥ accept_ratio · f · gᵀs

    (Schulman et al. 2015 §6: "line search ... ensures improvement of the surrogate objective and
    satisfaction of the KL divergence constraint"; the ratio test is from the reference implementation).
    If none is accepted, the old parameters are restored bit for bit.
    """
    old = flat_params(params)
    with torch.no_grad():
        if surrogate_before is None:
            surrogate_before = float(surrogate_fn())
        for backtracks in range(max_backtracks):
            fraction = 0.5**backtracks
            set_flat_params(params, old + fraction * full_step)
            surrogate = float(surrogate_fn())
            kl = float(kl_fn())
            improvement = surrogate - surrogate_before
            if (
                math.isfinite(surrogate)
                and math.isfinite(kl)
                and kl <= max_kl
                and improvement > 0
                and improvement >= accept_ratio * fraction * expected_improvement
            ):
                return LineSearchResult(True, fraction, backtracks, kl, surrogate)
        set_flat_params(params, old)
        return LineSearchResult(False, 0.0, max_backtracks, float(kl_fn()), float(surrogate_fn()))


def _trainable(module_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(module_or_params, torch.nn.Module):
        params = [p for p in module_or_params.parameters() if p.requires_grad]
    else:
        params = list(module_or_params)
    if not params or not all(p.requires_grad for p in params):
        raise ValueError(
            "trpo_step: needs at least one parameter, all with requires_grad=True; got "
            f"{len(params)} parameters ({sum(not p.requires_grad for p in params)} frozen)."
        )
    return params


def trpo_step(
    module_or_params: torch.nn.Module | Iterable[torch.Tensor],
    surrogate_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    max_kl: float,
    cg_iters: int = 10,
    damping: float = 0.1,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
    gradient_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    fisher_fn: Callable[[float], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> TRPOStepInfo:
    """One TRPO update of the trainable parameters, in place (Schulman et al. 2015, §6 and App. C):

        g = ∇_θ L(θ)                       L = surrogate_fn(), e.g. mean(ratio · Â), to MAXIMIZE
        x ≈ F⁻¹ g                          cg_iters of CG on v ↦ (F + damping·I) v
        s = sqrt(2δ / xᵀFx) · x            the step that reaches ½ sᵀFs = δ
        θ ← θ_old + f·s                    f from `backtracking_line_search`

    surrogate_fn and kl_fn are called several times and must recompute from the current parameters.
    A caller that computes the same quantities its own way (e.g. split across workers) passes
    ``gradient_fn() → (L, g)`` and ``fisher_fn(damping) → v ↦ (F + damping·I) v``; the defaults are
    ``flat_grad`` of surrogate_fn() and ``fisher_vector_product`` of kl_fn.
    """
    if max_kl <= 0:
        raise ValueError(f"trpo_step: max_kl (δ) must be > 0, got {max_kl}; TRPO papers use 0.01.")
    params = _trainable(module_or_params)
    if gradient_fn is not None:
        surrogate, grad = gradient_fn()
    else:
        surrogate = surrogate_fn()
        grad = flat_grad(surrogate, params)
    surrogate_before = float(surrogate.detach())
    grad_norm = float(grad.norm())

    def rejected(expected: float) -> TRPOStepInfo:
        with torch.no_grad():
            kl = float(kl_fn())
        return TRPOStepInfo(False, 0.0, 0, kl, surrogate_before, surrogate_before, expected, grad_norm)

    if not math.isfinite(grad_norm) or grad_norm == 0.0:
        return rejected(0.0)
    fvp = fisher_fn(damping) if fisher_fn is not None else fisher_vector_product(kl_fn, params, damping)
    direction = conjugate_gradient(fvp, grad, iters=cg_iters)
    curvature = float(direction @ fvp(direction))  # xᵀFx
    del fvp  # frees the KL graph before the line search's forward passes
    if not math.isfinite(curvature) or curvature <= 0.0:
        return rejected(0.0)
    full_step = math.sqrt(2.0 * max_kl / curvature) * direction
    expected_improvement = float(grad @ full_step)
    result = backtracking_line_search(
        params,
        surrogate_fn,
        kl_fn,
        full_step,
        max_kl,
        expected_improvement,
        surrogate_before=surrogate_before,
        max_backtracks=max_backtracks,
        accept_ratio=accept_ratio,
    )
    return TRPOStepInfo(
        accepted=result.accepted,
        step_fraction=result.step_fraction,
        backtracks=result.backtracks,
        kl=result.kl,
        surrogate_before=surrogate_before,
        surrogate_after=result.surrogate_after,
        expected_improvement=expected_improvement,
        grad_norm=grad_norm,
    )
