"""Policy/value losses and aggregation: hand-computed values, finite-difference gradients, padding invariance."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerorl.core import losses

MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")

# B = 2, T = 3; row 1 has 2 valid tokens, position (1, 2) is padding.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
# ratios: row 0 = [1.5, 0.5, 1.0], row 1 = [1.1, 0.7, (pad)]; old_logp = 0 so logp = ln ratio.
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.0]])
SEQ_ADVANTAGES = torch.tensor([1.0, -2.0])


def logps(ratios=RATIOS, pad_logp=1e4, pad_old=-1e4):
    """logp with graph and old_logp; the padded position holds garbage that must not matter."""
    logp = ratios.log().clone()
    old = torch.zeros_like(logp)
    logp[1, 2], old[1, 2] = pad_logp, pad_old
    return logp.requires_grad_(True), old


# Per-token clipped loss, ε = 0.2 (clip range [0.8, 1.2]):
#   row 0, Â = +1: r = 1.5 → −min(1.5, 1.2) = −1.2;  r = 0.5 → −min(0.5, 0.8) = −0.5;  r = 1 → −1
#   row 1, Â = −2: r = 1.1 → −min(−2.2, −2.2) = 2.2;  r = 0.7 → −min(−1.4, −1.6) = 1.6
# row sums: −2.7 (3 tokens), 3.8 (2 tokens)
EXPECTED_LOSS = {
    "seq-mean-token-mean": 0.5,  # (−2.7/3 + 3.8/2) / 2 = (−0.9 + 1.9) / 2
    "token-mean": 0.22,  # (−2.7 + 3.8) / 5
    "seq-mean-token-sum-norm": 0.1375,  # (−2.7/4 + 3.8/4) / 2 with norm = 4
}


@pytest.mark.parametrize("mode", MODES)
def test_clipped_loss_by_hand(mode):
    logp, old = logps()
    loss, metrics = losses.policy_loss(logp, old, SEQ_ADVANTAGES, MASK, 0.2, loss_agg_mode=mode, norm=4)
    assert math.isclose(loss.item(), EXPECTED_LOSS[mode], abs_tol=1e-6)
    # high clip active at (0,0): r = 1.5 > 1.2 with Â > 0; low clip at (1,1): r = 0.7 < 0.8 with Â < 0.
    # (0,1): r = 0.5 < 0.8 but Â > 0, so the unclipped term is the min: not counted.
    expected_metrics = {
        "clip_ratio/low_fraction": 0.2,
        "clip_ratio/high_fraction": 0.2,
        "clip_ratio": 0.4,
        "ratio_mean": 0.96,  # (1.5 + 0.5 + 1 + 1.1 + 0.7) / 5
        "ratio_max": 1.5,
        "ratio_min": 0.5,
    }
    for name, value in expected_metrics.items():
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad
        assert math.isclose(metrics[name].item(), value, abs_tol=1e-6), name


def test_clipped_gradient_by_hand():
    logp, old = logps()
    loss, _ = losses.policy_loss(logp, old, SEQ_ADVANTAGES, MASK)
    loss.backward()
    # seq-mean-token-mean weights: row 0 tokens 1/(2·3), row 1 tokens 1/(2·2).
    # ∂(−r·Â)/∂logp = −r·Â where unclipped; 0 where the clipped term is the min (flat in r).
    #   (0,0) clipped → 0;  (0,1) −0.5·1/6 = −0.083333;  (0,2) −1·1/6 = −0.166667
    #   (1,0) −1.1·(−2)/4 = 0.55;  (1,1) clipped → 0;  (1,2) padding → exactly 0
    expected = torch.tensor([[0.0, -0.5 / 6, -1 / 6], [0.55, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_clip_higher_and_dual_clip():
    logp, old = logps()
    loss, metrics = losses.policy_loss(
        logp, old, SEQ_ADVANTAGES, MASK, 0.2, clip_eps_high=0.6, loss_agg_mode="token-mean"
    )
    # (0,0) now inside [0.8, 1.6]: −1.5 instead of −1.2 → (−3.0 + 3.8)/5 = 0.16
    assert math.isclose(loss.item(), 0.16, abs_tol=1e-6)
    assert metrics["clip_ratio/high_fraction"].item() == 0.0

    # Dual clip c = 3, Â = −2 at ratio 5: PPO gives −min(−10, 1.2·−2) = 10, dual clip caps it at −c·Â = 6.
    logp, old = logps(torch.tensor([[1.0, 1.0, 1.0], [5.0, 0.7, 1.0]]))
    loss, metrics = losses.policy_loss(
        logp, old, SEQ_ADVANTAGES, MASK, loss_agg_mode="token-mean", dual_clip=3.0
    )
    # tokens: −1, −1, −1, 6, 1.6 → 4.6 / 5 = 0.92
    assert math.isclose(loss.item(), 0.92, abs_tol=1e-6)
    assert math.isclose(metrics["clip_ratio/dual_fraction"].item(), 0.2, abs_tol=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        losses.policy_loss(logp, old, SEQ_ADVANTAGES, MASK, dual_clip=0.5)


def test_gspo_sequence_ratio_by_hand_and_gradient():
    logp, old = logps()
    loss, metrics = losses.policy_loss(logp, old, SEQ_ADVANTAGES, MASK, ratio_level="sequence")
    # s_0 = (1.5·0.5·1)^(1/3) = 0.908560; Â = 1, inside [0.8, 1.2] → −0.908560 per token
    # s_1 = (1.1·0.7)^(1/2) = 0.877496; Â = −2 → 1.754993 per token
    # seq-mean-token-mean = (−0.908560 + 1.754993) / 2 = 0.423217
    assert math.isclose(loss.item(), 0.423217, abs_tol=1e-6)
    assert math.isclose(metrics["ratio_max"].item(), 0.908560, abs_tol=1e-6)
    loss.backward()

    # GSPO's sequence-level objective written directly: −mean_i min(s_i Â_i, clip(s_i) Â_i).
    logp2, old2 = logps()
    seq_log_ratio = torch.where(MASK, logp2 - old2, 0.0).sum(-1) / MASK.sum(-1)
    s = seq_log_ratio.exp()
    direct = -torch.minimum(s * SEQ_ADVANTAGES, s.clamp(0.8, 1.2) * SEQ_ADVANTAGES).mean()
    direct.backward()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(logp.grad, logp2.grad)


def test_reinforce_kind_is_minus_advantage_times_logp():
    logp, old = logps()
    loss, metrics = losses.policy_loss(
        logp, old, SEQ_ADVANTAGES, MASK, loss_agg_mode="token-mean", kind="reinforce"
    )
    # −Σ Â·logp / 5 = −(ln 1.5 + ln 0.5 + 0 − 2 ln 1.1 − 2 ln 0.7) / 5
    expected = -(math.log(1.5) + math.log(0.5) - 2 * math.log(1.1) - 2 * math.log(0.7)) / 5
    assert math.isclose(loss.item(), expected, abs_tol=1e-6)
    assert metrics["clip_ratio"].item() == 0.0


def test_ratio_one_gives_minus_mean_advantage():
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])  # 99 is padding
    logp = torch.full((2, 3), -1.3)
    written_out = {
        "seq-mean-token-mean": -(6 / 3 + 9 / 2) / 2,  # −(2 + 4.5)/2 = −3.25
        "token-mean": -(1 + 2 + 3 + 4 + 5) / 5,  # −3
        "seq-mean-token-sum-norm": -(6 / 3 + 9 / 3) / 2,  # norm = T = 3 → −2.5
    }
    for mode, value in written_out.items():
        for kind in ("token", "sequence"):
            loss, metrics = losses.policy_loss(
                logp, logp, advantages, MASK, loss_agg_mode=mode, ratio_level=kind
            )
            assert math.isclose(loss.item(), value, abs_tol=1e-6), (mode, kind)
            assert metrics["clip_ratio"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_clipped_surrogate_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    # log-ratios in ±0.5: some tokens inside the clip range, some beyond (away from the kinks at ln 0.8, ln 1.2)
    logp = (old + (torch.rand(3, 5, generator=gen, dtype=torch.float64) - 0.5)).requires_grad_(True)
    token_advantages = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    seq_advantages = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    # GSPO's token form is the true derivative of its value only for one advantage per sequence
    # (with [B, T] advantages it is GSPO-token's gradient by design), so "sequence" gets [B].
    for mode in MODES:
        for level, advantages in (("token", token_advantages), ("sequence", seq_advantages)):

            def fn(lp, mode=mode, level=level, advantages=advantages):
                return losses.policy_loss(
                    lp, old, advantages, mask, 0.2, 0.28, mode, ratio_level=level, dual_clip=1.5
                )[0]

            assert torch.autograd.gradcheck(fn, (logp,), eps=1e-6, atol=1e-8)


GARBAGE = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 88.0, -88.0, 0.0])


@settings(max_examples=25, deadline=None)
@given(GARBAGE, GARBAGE, GARBAGE, GARBAGE, st.sampled_from(MODES), st.sampled_from(["token", "sequence"]))
def test_padding_never_changes_results(g_logp, g_old, g_adv, g_value, mode, level):
    gen = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    old = logp - 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    values, returns = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)

    def run(lp, ol, ad, va):
        lp = lp.clone().requires_grad_(True)
        va = va.clone().requires_grad_(True)
        loss, metrics = losses.policy_loss(
            lp, ol, ad, mask, 0.2, loss_agg_mode=mode, ratio_level=level, dual_clip=3.0
        )
        vloss, vmetrics = losses.value_loss(va, values, returns, mask, clip_range=0.2, loss_agg_mode=mode)
        (loss + vloss).backward()
        return [loss, vloss, lp.grad, va.grad, *metrics.values(), *vmetrics.values()]

    def corrupt(x, value):
        return torch.where(mask, x, value)

    clean = run(logp, old, adv, values)
    dirty = run(corrupt(logp, g_logp), corrupt(old, g_old), corrupt(adv, g_adv), corrupt(values, g_value))
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert torch.isfinite(clean[0]) and torch.isfinite(clean[1])


def test_aggregate_by_hand_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # seq-mean-token-mean: the empty row is left out → (2 + 4.5) / 2 = 3.25
    assert losses.aggregate(values, mask, "seq-mean-token-mean").item() == 3.25
    # token-mean: (1+2+3+4+5) / 5 = 3
    assert losses.aggregate(values, mask, "token-mean").item() == 3.0
    # seq-mean-token-sum-norm: every row counts, norm 10 → (6 + 9 + 0) / 10 / 3 = 0.5
    assert losses.aggregate(values, mask, "seq-mean-token-sum-norm", norm=10).item() == 0.5
    empty = torch.zeros_like(mask)
    for mode in MODES:
        assert losses.aggregate(values, empty, mode).item() == 0.0
    logp = torch.zeros(3, 3, requires_grad=True)
    loss, metrics = losses.policy_loss(logp, logp.detach(), torch.ones(3), empty)
    loss.backward()
    assert loss.item() == 0.0 and metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    with pytest.raises(ValueError, match="token-mean"):
        losses.aggregate(values, mask, "mean")
    with pytest.raises(ValueError, match="advantages"):
        losses.policy_loss(logp, logp, torch.ones(4), mask)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 2.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 0: (1 − 2)² = 1; clipped V = 0.5 + clip(0.5, ±0.2) = 0.7 → (0.7 − 2)² = 1.69 → ½·1.69 = 0.845
    # token 1: (2 − 1)² = 1 both ways → 0.5.   token-mean = (0.845 + 0.5)/2 = 0.6725
    loss, metrics = losses.value_loss(values, old_values, returns, mask, clip_range=0.2)
    assert math.isclose(loss.item(), 0.6725, abs_tol=1e-6)
    assert math.isclose(metrics["vf_clipfrac"].item(), 0.5)
    loss.backward()
    # ∂/∂V: token 0 is on the clipped branch and V − V_old = 0.5 > 0.2, so the gradient is 0;
    # token 1: ½·2·(2 − 1)/2 = 0.5
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5]]))
    loss, metrics = losses.value_loss(values, old_values, returns, mask)
    assert math.isclose(loss.item(), 0.5) and metrics["vf_clipfrac"].item() == 0.0  # ½ (1 + 1) / 2
    # explained variance: R = [2, 1] (var 0.25), R − V = [1, −1] (var 1) → 1 − 1/0.25 = −3
    assert math.isclose(metrics["vf_explained_var"].item(), -3.0)
