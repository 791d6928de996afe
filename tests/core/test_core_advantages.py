"""Advantage estimators against hand arithmetic, reference loops and invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerorl.core import advantages

# Two prompts, G = 4. Group 1 = [1, 0, 1, 0]: mean 0.5, deviations ±0.5,
# unbiased var = 4·0.25/3 = 1/3, std = 0.577350 → Â = ±0.5/0.577350 = ±0.866025.
# Group 2 = [3, 3, 3, 3]: std 0 → Â = 0/(0 + eps) = 0.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0])


def test_grpo_group_scale_by_hand():
    expected = torch.tensor([0.866025, -0.866025, 0.866025, -0.866025, 0, 0, 0, 0])
    torch.testing.assert_close(advantages.grpo(REWARDS, 4), expected, atol=1e-5, rtol=0)


def test_grpo_batch_scale_by_hand():
    # batch mean = 14/8 = 1.75; squared deviations 0.5625, 3.0625, 0.5625, 3.0625, 4 × 1.5625 → 13.5;
    # unbiased var = 13.5/7 = 1.928571, std = 1.388730; group-centred ±0.5 / 1.388730 = ±0.360041.
    expected = torch.tensor([0.360041, -0.360041, 0.360041, -0.360041, 0, 0, 0, 0])
    torch.testing.assert_close(advantages.grpo(REWARDS, 4, scale="batch"), expected, atol=1e-5, rtol=0)


def test_dr_grpo_only_centres():
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])
    torch.testing.assert_close(advantages.grpo(REWARDS, 4, scale="none"), expected)
    torch.testing.assert_close(advantages.get_estimator("dr_grpo")(REWARDS, 4), expected)


def test_rloo_by_hand():
    # [1, 0, 1, 0]: Â_0 = 1 − (0+1+0)/3 = 2/3, Â_1 = 0 − (1+1+0)/3 = −2/3.
    # [3, 0, 6] (G = 3): Â = 3 − 3 = 0, 0 − 4.5 = −4.5, 6 − 1.5 = 4.5.
    torch.testing.assert_close(
        advantages.rloo(torch.tensor([1.0, 0, 1, 0]), 4), torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3])
    )
    torch.testing.assert_close(advantages.rloo(torch.tensor([3.0, 0, 6]), 3), torch.tensor([0.0, -4.5, 4.5]))


def test_reinforce_pp_outcome_by_hand():
    # [1, 2, 3, 6]: mean 3, deviations −2, −1, 0, 3, var = 14/3, std = 2.160247.
    expected = torch.tensor([-0.925820, -0.462910, 0.0, 1.388730])
    torch.testing.assert_close(
        advantages.reinforce_pp(torch.tensor([1.0, 2, 3, 6])), expected, atol=1e-5, rtol=0
    )


def test_reinforce_pp_token_form_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.5, 0.0, 1.0, 99.0], [2.0, 0.0, 99.0, 99.0]])  # 99 = padding garbage
    # token rewards = −0.1·kl, + reward on the last valid token:
    #   row 0: −0.05, 0, −0.1 + 1 = 0.9         → returns-to-go 0.85, 0.9, 0.9
    #   row 1: −0.2, 0 − 1 = −1                 → returns-to-go −1.2, −1.0
    # whitening over the 5 valid returns: mean 0.09, unbiased std = sqrt(4.742/4) = 1.088807
    expected = torch.tensor(
        [
            [0.76 / 1.088807, 0.81 / 1.088807, 0.81 / 1.088807, 0.0],
            [-1.29 / 1.088807, -1.09 / 1.088807, 0.0, 0.0],
        ]
    )
    got = advantages.reinforce_pp(torch.tensor([1.0, -1.0]), mask=mask, kl=kl, kl_coef=0.1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_registry_and_errors():
    assert set(advantages.ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp"}
    torch.testing.assert_close(advantages.get_estimator("grpo")(REWARDS, 4), advantages.grpo(REWARDS, 4))
    with pytest.raises(ValueError, match="dr_grpo"):  # the message lists the valid names
        advantages.get_estimator("ppo")
    with pytest.raises(ValueError, match="8 % 3"):
        advantages.grpo(REWARDS, 3)
    with pytest.raises(ValueError, match="group_size ≥ 2"):
        advantages.grpo(REWARDS, 1)
    assert torch.equal(advantages.grpo(REWARDS, 1, scale="none"), torch.zeros(8))
    with pytest.raises(ValueError, match="scale"):
        advantages.grpo(REWARDS, 4, scale="global")


@settings(max_examples=40, deadline=None)
@given(
    group_size=st.integers(2, 6),
    num_groups=st.integers(1, 4),
    data=st.data(),
)
def test_group_advantages_sum_to_zero_per_group(group_size, num_groups, data):
    values = data.draw(
        st.lists(st.floats(-10, 10), min_size=group_size * num_groups, max_size=group_size * num_groups)
    )
    rewards = torch.tensor(values, dtype=torch.float64)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = advantages.get_estimator(name)(rewards, group_size).view(num_groups, group_size)
        torch.testing.assert_close(
            adv.sum(dim=1), torch.zeros(num_groups, dtype=torch.float64), atol=1e-6, rtol=0
        )


# --- GAE over token sequences ---


def gae_reference_loop(rewards, values, lengths, gamma, lam):
    """Plain python GAE over each right-padded row (the textbook recursion, nothing shared)."""
    out = torch.zeros_like(values)
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            out[b, t] = running
    return out


def test_gae_by_hand_2x4():
    # γ = 0.9, λ = 0.5 (γλ = 0.45).
    # row 0 (4 valid): r = [0, 0, 0, 1], V = [0.5, 0.6, 0.7, 0.8]
    #   t=3: δ = 1 − 0.8 = 0.2                   Â = 0.2
    #   t=2: δ = 0.9·0.8 − 0.7 = 0.02            Â = 0.02 + 0.45·0.2    = 0.11
    #   t=1: δ = 0.9·0.7 − 0.6 = 0.03            Â = 0.03 + 0.45·0.11   = 0.0795
    #   t=0: δ = 0.9·0.6 − 0.5 = 0.04            Â = 0.04 + 0.45·0.0795 = 0.075775
    # row 1 (2 valid, garbage 7 / 9 in the padding): r = [0, −1], V = [0.2, −0.4]
    #   t=1: δ = −1 − (−0.4) = −0.6              Â = −0.6
    #   t=0: δ = 0.9·(−0.4) − 0.2 = −0.56        Â = −0.56 + 0.45·(−0.6) = −0.83
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, -1.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.2, -0.4, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = advantages.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.075775, 0.0795, 0.11, 0.2], [-0.83, -0.6, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.575775, 0.6795, 0.81, 1.0], [-0.63, -1.0, 0.0, 0.0]]))


def test_gae_matches_reference_loop_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 0]
    rewards = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    expected = gae_reference_loop(rewards, values, lengths, gamma=0.97, lam=0.9)
    adv, ret = advantages.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, 0.0))
    garbage = torch.where(mask, rewards, float("nan")), torch.where(mask, values, float("inf"))
    adv2, ret2 = advantages.gae(*garbage, mask, gamma=0.97, lam=0.9)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


# --- GAE for vectorized classic-control rollouts ---


def test_gae_classic_done_in_the_middle():
    # γ = 0.5, λ = 1, one env. dones[2] = 1: obs 2 starts a new episode, so step 1 was terminal.
    # r = [1, 2, 3], V = [1, 1, 1], last_value = 4, last_done = 0.
    #   t=2: δ = 3 + 0.5·4 − 1 = 4                   Â = 4
    #   t=1: δ = 2 + 0.5·1·0 − 1 = 1 (no bootstrap)   Â = 1 + 0 = 1
    #   t=0: δ = 1 + 0.5·1 − 1 = 0.5                  Â = 0.5 + 0.5·1·1 = 1.0
    # returns = Â + V = [2, 2, 5] (= discounted returns 1 + 0.5·2, 2, 3 + 0.5·4, as λ = 1 implies).
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.ones(3, 1)
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    adv, ret = advantages.gae_classic(
        rewards, values, dones, torch.tensor([4.0]), torch.tensor([0.0]), gamma=0.5, lam=1.0
    )
    torch.testing.assert_close(adv, torch.tensor([[1.0], [1.0], [4.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.0], [2.0], [5.0]]))

    # Step 1 was truncated (time limit) with V(final obs) = 6: its reward becomes 2 + 0.5·6 = 5,
    #   t=1: δ = 5 − 1 = 4, Â = 4;  t=0: Â = 0.5 + 0.5·4 = 2.5;  returns [3.5, 5, 5].
    adv, ret = advantages.gae_classic(
        rewards,
        values,
        dones,
        torch.tensor([4.0]),
        torch.tensor([0.0]),
        gamma=0.5,
        lam=1.0,
        truncation_values=torch.tensor([[0.0], [6.0], [0.0]]),
    )
    torch.testing.assert_close(ret, torch.tensor([[3.5], [5.0], [5.0]]))

    # last_done = 1: the observation after the rollout starts a new episode, no bootstrap from 4.
    adv, _ = advantages.gae_classic(
        rewards, values, dones, torch.tensor([4.0]), torch.tensor([1.0]), 0.5, 1.0
    )
    assert math.isclose(adv[2, 0].item(), 3.0 - 1.0)
