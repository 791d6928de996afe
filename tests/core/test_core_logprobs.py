"""Chunked log-probs and entropy against the full log_softmax, in float32, bfloat16 and with temperature."""

import math

import pytest
import torch

from zerorl.core.logprobs import entropy_from_logits, logprobs_from_logits, selective_log_softmax


def reference_logp(logits, ids, temperature=1.0):
    return (logits.float() / temperature).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def reference_entropy(logits):
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def random_batch(dtype=torch.float32, seed=0, shape=(3, 5, 37)):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * 4).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return logits, ids


def test_by_hand():
    # logits [0, ln 3] → softmax [1/4, 3/4]; log π(token 1) = ln 0.75 = −0.287682
    # H = −(¼ ln ¼ + ¾ ln ¾) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert math.isclose(
        selective_log_softmax(logits, torch.tensor([[1]])).item(), math.log(0.75), abs_tol=1e-6
    )
    assert math.isclose(entropy_from_logits(logits).item(), 0.562335, abs_tol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_float32_matches_log_softmax_gather_values_and_grads(chunk_size):
    logits, ids = random_batch()
    logits_a = logits.clone().requires_grad_(True)
    logits_b = logits.clone().requires_grad_(True)
    got = selective_log_softmax(logits_a, ids, chunk_size=chunk_size)
    expected = reference_logp(logits_b, ids)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=chunk_size), reference_entropy(logits), atol=1e-5, rtol=0
    )


def test_bfloat16_is_upcast_per_chunk():
    logits, ids = random_batch(torch.bfloat16)
    got = selective_log_softmax(logits, ids, chunk_size=4)
    # float32 math on the bf16 values: agrees to 1e-5, which bf16 arithmetic (8-bit mantissa) could not.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_logp(logits, ids), atol=1e-5, rtol=0)
    bf16_math = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1).float()
    assert (bf16_math - got).abs().max() > 1e-3  # the test can tell the difference
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=4), reference_entropy(logits), atol=1e-5, rtol=0
    )


def test_bfloat16_and_temperature_gradients_match_float32_reference():
    for dtype, temperature in ((torch.bfloat16, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.3)):
        logits, ids = random_batch(dtype, seed=3)
        logits_a = logits.clone().requires_grad_(True)
        logits_b = logits.clone().float().requires_grad_(True)
        got = logprobs_from_logits(logits_a, ids, temperature=temperature, chunk_size=4)
        expected = reference_logp(logits_b, ids, temperature)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        assert logits_a.grad.dtype == dtype
        atol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16 gradient storage rounds to ~3 digits
        torch.testing.assert_close(logits_a.grad.float(), logits_b.grad, atol=atol, rtol=1e-2)


def test_float32_path_is_twice_differentiable():
    # TRPO's Fisher-vector products backprop through the gradient of a KL built on these log-probs.
    logits, ids = random_batch(torch.float64)
    logits = logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(
        selective_log_softmax(logits, ids, chunk_size=4).sum(), logits, create_graph=True
    )
    (hvp,) = torch.autograd.grad((grad * grad).sum(), logits)
    logits_ref = logits.detach().clone().requires_grad_(True)
    ref = logits_ref.log_softmax(-1).gather(-1, ids[..., None]).sum()
    (grad_ref,) = torch.autograd.grad(ref, logits_ref, create_graph=True)
    (hvp_ref,) = torch.autograd.grad((grad_ref * grad_ref).sum(), logits_ref)
    torch.testing.assert_close(hvp, hvp_ref)


def test_masked_vocabulary_entropy_is_finite():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert math.isclose(entropy_from_logits(logits).item(), math.log(2.0), abs_tol=1e-6)


def test_errors():
    logits, ids = random_batch()
    with pytest.raises(ValueError, match="token_ids"):
        selective_log_softmax(logits, ids[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)
