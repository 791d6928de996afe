"""The R1 output format: ``<think> ... </think> <answer> ... </answer>``.

DeepSeek-R1-Zero (paper, section 2.2.2) rewards two things with rules: accuracy and format. The format
reward is 1 iff the completion is exactly one reasoning block followed by exactly one answer block.
Everything here is linear-time in the completion length (no backtracking regex on untrusted text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
R1_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Anchored on both ends; the lazy groups cannot backtrack far because `has_r1_format` first checks that
# each tag occurs exactly once, so the match is one linear scan.
_R1_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)

# Answers longer than this are not answers; refusing them bounds the work every verifier does.
MAX_ANSWER_CHARS = 1000


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or TRL's conversational form ``[{"role", "content"}, ...]``
    (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(
        f"a completion must be a string or a list of chat messages with a string 'content', "
        f"got {type(completion).__name__}: {str(completion)[:80]!r}"
    )


def has_r1_format(completion: str) -> bool:
    """True iff ``completion`` is ``<think>…</think>`` then ``<answer>…</answer>``, each tag exactly once,
    with only whitespace around and between the two blocks."""
    if any(completion.count(tag) != 1 for tag in R1_TAGS):
        return False  # duplicated, nested or missing tags
    return _R1_FORMAT_RE.match(completion) is not None


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 for each completion in the strict R1 format (see ``has_r1_format``), else 0.0."""
    return [1.0 if has_r1_format(completion_text(c)) else 0.0 for c in completions]


def extract_answer(completion: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The stripped content of the last ``<answer>…</answer>`` block, or None when there is none or it is
    longer than ``max_chars`` characters."""
    close = completion.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = completion.rfind(ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    content = completion[open_ + len(ANSWER_OPEN) : close]
    if len(content) > max_chars:
        return None
    return content.strip()
