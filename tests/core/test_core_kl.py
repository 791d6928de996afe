"""KL estimators k1, k2, k3: formulas by hand, non-negativity, Monte-Carlo unbiasedness."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerorl.core.kl import kl_estimate


def test_estimators_by_hand():
    # π_θ(a) = 0.5, π_ref(a) = 0.25 → logp − ref = ln 2 = 0.693147
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.693147]))  # ln 2
    torch.testing.assert_close(
        kl_estimate(logp, ref, "k2"), torch.tensor([0.240227])
    )  # ½ (ln 2)² = ½·0.480453
    # k3: r = π_ref/π_θ = 0.5 → r − 1 − ln r = 0.5 − 1 + 0.693147 = 0.193147
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([0.193147]))
    # identical policies: every estimator is exactly 0
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp, kind).item() == 0.0


def test_k3_clamp_keeps_extreme_tokens_finite():
    logp, ref = torch.tensor([-200.0, 0.0]), torch.tensor([0.0, -200.0])
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    torch.testing.assert_close(k3, torch.tensor([math.exp(20) - 21, math.exp(-20) + 19]))


def test_errors():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(torch.zeros(2), torch.zeros(3), "k1")


def test_k3_keeps_its_digits_near_zero_in_float32():
    """x = ref − logp = 1e-4: k3 = x²/2 + x³/6 + … = 5.0002e-9. exp(x) − x − 1 in float32 gives 0.0 (every digit
    below float32's 1.2e-7 at 1 cancels); expm1(x) − x keeps them."""
    logp = torch.tensor([0.0], dtype=torch.float32)
    ref = torch.tensor([1e-4], dtype=torch.float32)
    assert math.isclose(kl_estimate(logp, ref, "k3").item(), 5.0001667e-9, rel_tol=1e-3)
    small = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * scale
                       for scale in (1e-2, 1e-4, 1e-8)])
    assert (kl_estimate(torch.zeros_like(small), small, "k3") >= 0).all()


@settings(max_examples=100, deadline=None)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_k2_k3_are_non_negative(logp, ref):
    logp_t, ref_t = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
    assert kl_estimate(logp_t, ref_t, "k3").item() >= 0.0
    assert kl_estimate(logp_t, ref_t, "k2").item() >= 0.0


def test_monte_carlo_mean_matches_exact_categorical_kl():
    # p = π_θ = [0.5, 0.3, 0.2], q = π_ref = [0.3, 0.3, 0.4]
    # KL(p‖q) = 0.5 ln(5/3) + 0.3 ln 1 + 0.2 ln(1/2) = 0.255413 − 0.138629 = 0.116784
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    assert math.isclose(exact, 0.116784, abs_tol=1e-6)
    gen = torch.Generator().manual_seed(1234)
    actions = torch.multinomial(p, 200_000, replacement=True, generator=gen)  # samples from π_θ
    logp, ref = p.log()[actions], q.log()[actions]
    # k3's std here is 0.106, so its standard error is 0.106/√200000 = 0.00024 (0.2 % of the KL)
    assert abs(kl_estimate(logp, ref, "k3").mean().item() - exact) < 0.01 * exact
    assert (
        abs(kl_estimate(logp, ref, "k1").mean().item() - exact) < 0.04 * exact
    )  # k1: std 0.46 → standard error 0.9 %
