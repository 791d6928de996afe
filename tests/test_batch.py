"""RolloutBatch slicing and the evaluation statistics."""

import math

import torch

from zerorl.lm.batch import RolloutBatch
from zerorl.lm.evaluate import pass_at_k, proportion_ci


def _batch():
    # 3 completions; prompts left-padded to 3, completions right-padded to 4.
    return RolloutBatch(
        prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        completion_ids=torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [1, 1, 1, 2]]),
        completion_mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
        sampling_logprobs=torch.zeros(3, 4), prompt_index=torch.tensor([0, 0, 1]),
        completion_texts=["a", "b", "c"], rewards=torch.tensor([1.0, 0.0, 2.0]),
        advantages=torch.tensor([0.5, -0.5, 0.0]))


def test_select_trims_padding_columns():
    sub = _batch().select(torch.tensor([0, 1]))
    # Row 1 has a full prompt, so no prompt column can go; completions need only 2 columns.
    assert sub.prompt_ids.shape == (2, 3)
    assert sub.completion_ids.tolist() == [[1, 2], [3, 0]]
    assert sub.completion_texts == ["a", "b"]
    assert sub.rewards.tolist() == [1.0, 0.0]
    only_short = _batch().select(torch.tensor([2]))
    assert only_short.prompt_ids.tolist() == [[4]]


def test_micro_batches_cover_every_row_once():
    parts = _batch().micro_batches(2)
    assert [len(p) for p in parts] == [2, 1]
    assert sum((p.completion_texts for p in parts), []) == ["a", "b", "c"]


def test_pass_at_k_matches_the_formula():
    # n = 4 samples, c = 1 correct, k = 2: 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5
    assert math.isclose(pass_at_k(4, 1, 2), 0.5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0


def test_wilson_interval_contains_p_and_is_bounded():
    lo, hi = proportion_ci(50, 100)
    assert lo < 0.5 < hi and math.isclose(hi - 0.5, 0.5 - lo, rel_tol=1e-9)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3)  # Wilson 95% for 50/100
    assert proportion_ci(0, 10)[0] == 0.0
