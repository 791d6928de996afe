"""Natural-gradient machinery: CG, Fisher-vector products, line search and a full TRPO step."""

import math

import torch

from zerorl.core import trust_region as tr

NUM_STATES, NUM_ACTIONS = 4, 3


def test_conjugate_gradient_solves_spd_50x50():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    a = m @ m.T + 5.0 * torch.eye(50, dtype=torch.float64)  # SPD, condition number ~ 40
    b = torch.randn(50, generator=gen, dtype=torch.float64)
    x = tr.conjugate_gradient(lambda v: a @ v, b, iters=50, tol=1e-24)
    assert (a @ x - b).norm() < 1e-6
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_conjugate_gradient_by_hand_2x2():
    # A = [[4, 1], [1, 3]], b = [1, 2] → x = A⁻¹ b = [1/11, 7/11]; CG is exact in n = 2 iterations.
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    x = tr.conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), iters=2)
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))


def test_flat_params_round_trip():
    module = torch.nn.Linear(3, 2)
    params = list(module.parameters())
    flat = tr.flat_params(params)
    assert flat.shape == (8,)
    tr.set_flat_params(params, torch.arange(8.0))
    torch.testing.assert_close(module.weight, torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(module.bias, torch.tensor([6.0, 7.0]))
    grad = tr.flat_grad((module.weight * 2).sum() + module.bias[0] * 0, params)
    torch.testing.assert_close(grad, torch.tensor([2.0] * 6 + [0.0, 0.0]))


def softmax_policy_problem(seed=0):
    """Linear softmax policy over one-hot states, fixed sampled actions and advantages."""
    gen = torch.Generator().manual_seed(seed)
    policy = torch.nn.Linear(NUM_STATES, NUM_ACTIONS, bias=False).double()
    with torch.no_grad():
        policy.weight.copy_(0.5 * torch.randn(NUM_ACTIONS, NUM_STATES, generator=gen, dtype=torch.float64))
    states = torch.eye(NUM_STATES, dtype=torch.float64).repeat(8, 1)  # 32 samples, 8 per state
    with torch.no_grad():
        old_log_probs_all = policy(states).log_softmax(-1)
    actions = torch.multinomial(old_log_probs_all.exp(), 1, generator=gen).squeeze(-1)
    old_logp = old_log_probs_all.gather(-1, actions[:, None]).squeeze(-1)
    advantages = torch.randn(32, generator=gen, dtype=torch.float64)

    def surrogate_fn():  # E_{π_old}[π_θ/π_old · Â], to maximize
        logp = policy(states).log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1)
        return (torch.exp(logp - old_logp) * advantages).mean()

    def kl_fn():  # mean over states of the exact KL(π_old(·|s) ‖ π_θ(·|s))
        log_probs = policy(states).log_softmax(-1)
        return (old_log_probs_all.exp() * (old_log_probs_all - log_probs)).sum(-1).mean()

    return policy, states, old_log_probs_all, surrogate_fn, kl_fn


def test_fisher_vector_product_is_fisher_times_v():
    policy, states, old_log_probs_all, _, kl_fn = softmax_policy_problem()
    params = list(policy.parameters())
    fvp = tr.fisher_vector_product(kl_fn, params, damping=0.1)
    # Explicit Fisher at θ_old: F = E_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ
    jac = torch.autograd.functional.jacobian(lambda w: (states @ w.T).log_softmax(-1), policy.weight.detach())
    jac = jac.reshape(len(states), NUM_ACTIONS, -1)  # [S, A, P]
    probs = old_log_probs_all.exp()
    fisher = torch.einsum("sa,sap,saq->pq", probs, jac, jac) / len(states)
    v = torch.randn(fisher.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(fvp(v), fisher @ v + 0.1 * v)
    torch.testing.assert_close(fvp(2 * v), 2 * (fisher @ v + 0.1 * v))  # the graph is reusable


def test_trpo_step_raises_surrogate_within_kl_bound():
    policy, _, _, surrogate_fn, kl_fn = softmax_policy_problem()
    max_kl = 0.01
    info = tr.trpo_step(policy, surrogate_fn, kl_fn, max_kl=max_kl, damping=1e-3)
    assert info.accepted
    assert info.surrogate_after > info.surrogate_before
    assert info.kl <= max_kl
    # the step is sized to reach the KL boundary: the measured KL is of the order of δ, not negligible
    assert info.kl > 0.25 * max_kl * info.step_fraction**2
    assert math.isclose(info.surrogate_after, surrogate_fn().item(), rel_tol=1e-12)
    assert math.isclose(info.kl, kl_fn().item(), rel_tol=1e-12)
    assert info.expected_improvement > 0 and info.grad_norm > 0


def test_trpo_step_on_explicit_parameter_subset():
    # Only the second layer is trained (as with LoRA adapters); the first must not move.
    gen = torch.Generator().manual_seed(1)
    body, head = torch.nn.Linear(NUM_STATES, 5).double(), torch.nn.Linear(5, NUM_ACTIONS).double()
    states = torch.eye(NUM_STATES, dtype=torch.float64)
    with torch.no_grad():
        old = head(torch.tanh(body(states))).log_softmax(-1)
    advantages = torch.randn(NUM_STATES, NUM_ACTIONS, generator=gen, dtype=torch.float64)

    def log_probs():
        return head(torch.tanh(body(states))).log_softmax(-1)

    def surrogate_fn():  # all actions weighted by π_old: Σ_a π_θ(a|s) Â(s, a)
        return (log_probs().exp() * advantages).sum(-1).mean()

    def kl_fn():
        return (old.exp() * (old - log_probs())).sum(-1).mean()

    body_before = tr.flat_params(list(body.parameters())).clone()
    info = tr.trpo_step(head.parameters(), surrogate_fn, kl_fn, max_kl=0.02)
    assert info.accepted and info.surrogate_after > info.surrogate_before and info.kl <= 0.02
    assert torch.equal(tr.flat_params(list(body.parameters())), body_before)


def test_line_search_backtracks_a_huge_step_into_the_trust_region():
    policy, _, _, surrogate_fn, kl_fn = softmax_policy_problem()
    params = list(policy.parameters())
    grad = tr.flat_grad(surrogate_fn(), params)
    huge_step = 50.0 * grad / grad.norm()  # far outside any reasonable KL ball
    max_kl = 0.01
    before = surrogate_fn().item()
    result = tr.backtracking_line_search(
        params,
        surrogate_fn,
        kl_fn,
        huge_step,
        max_kl,
        expected_improvement=float(grad @ huge_step),
        max_backtracks=20,
        accept_ratio=0.0,
    )
    assert result.accepted and result.backtracks > 0  # the full step was rejected
    assert result.kl <= max_kl and kl_fn().item() <= max_kl
    assert result.surrogate_after > before


def test_line_search_restores_parameters_when_nothing_is_acceptable():
    policy, _, _, surrogate_fn, kl_fn = softmax_policy_problem()
    params = list(policy.parameters())
    original = tr.flat_params(params).clone()
    grad = tr.flat_grad(surrogate_fn(), params)
    # Impossible constraint: any non-zero step has KL > 0 = δ.
    result = tr.backtracking_line_search(
        params,
        surrogate_fn,
        kl_fn,
        grad,
        max_kl=0.0,
        expected_improvement=float(grad @ grad),
        max_backtracks=5,
    )
    assert not result.accepted and result.step_fraction == 0.0 and result.backtracks == 5
    assert torch.equal(tr.flat_params(params), original)  # bit for bit
    # A step against the gradient lowers the surrogate: rejected even with a generous δ.
    result = tr.backtracking_line_search(
        params,
        surrogate_fn,
        kl_fn,
        -1e-3 * grad,
        max_kl=10.0,
        expected_improvement=-1e-3 * float(grad @ grad),
    )
    assert not result.accepted
    assert torch.equal(tr.flat_params(params), original)
    # trpo_step with δ = 1e-300: the step (~1e-150) vanishes in float64 rounding, the surrogate does
    # not improve, every fraction is rejected, and the policy is left exactly where it was.
    info = tr.trpo_step(policy, surrogate_fn, kl_fn, max_kl=1e-300, max_backtracks=3)
    assert not info.accepted
    assert torch.equal(tr.flat_params(params), original)
